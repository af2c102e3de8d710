"""What a piece of device code would cost on a GPU, counted on the CPU.

    with count_cost() as cost:
        run_something()
    cost.summary(scale=256 / batch_size)   # {"gb", "launches", "host_syncs", ...}

Every aten op is seen by a TorchDispatchMode (below autograd, so backward ops count too) and
every Triton launch by a patch of the launcher's `run` for the duration of the context:

- bytes: per op, the bytes of its distinct tensor arguments and outputs (a tensor passed twice,
  or written in place, counts once; a broadcast dim of stride 0 counts as size 1, since the
  kernel reads that memory once). Views and metadata-only ops count nothing, nor do
  allocations (`empty*`). Per Triton launch, numel * element_size of each distinct tensor
  argument.
- launches: the ops that would launch a device kernel, plus the Triton launches.
- host_syncs: the ops that make the host wait for the device on CUDA (`.item()`, `bool(t)`,
  `nonzero`, boolean-mask indexing, ...) and tensors built from Python data inside the context
  (`torch.tensor([...])`), plus `Tensor.tolist()` / `Tensor.item()` calls.
  `count_cost(strict=True)` raises HostSyncError at the first one instead.
- float64_tensors: numel of every float64 tensor an op produces.
- transfers: every copy between two devices (`copy_`, `.to()`), with its bytes and whether
  source and destination are both contiguous. A strided host-to-device copy is the costly
  kind: on CUDA torch stages it through a fresh pageable contiguous temporary and a blocking
  copy, whatever non_blocking says.
- host_allocations: bytes of every tensor allocated in host memory inside the context.

Under TRITON_INTERPRET=1 the interpreter copies each launch's tensors with aten ops; counting is
suspended while a launch runs, so only the launch itself is counted. The counts are a cost
model, not a measurement: an op that launches several kernels on CUDA counts as one launch.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


class HostSyncError(RuntimeError):
    """Raised by count_cost(strict=True) at the first op that would sync the host."""


# Views and metadata changes whose schema does not say so (the rest are found from the
# schema: every return aliases an input and nothing is written).
_METADATA_OPS = {
    "_unsafe_view", "set_", "resize_", "resize_as_", "as_strided_", "t_", "transpose_",
    "squeeze_", "unsqueeze_", "detach_", "swapdims_", "swapaxes_", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_contiguous", "is_strides_like_format",
    "is_non_overlapping_and_dense", "is_same_size", "size", "stride", "numel", "dim",
}
_ALLOCATION_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                   "empty_permuted"}
# Ops whose result the host needs before it can go on (the CUDA kernels copy it back and wait).
_SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "equal", "is_nonzero", "lift_fresh",
    "lift_fresh_copy", "repeat_interleave", "bincount",
}
# A boolean index tensor makes these call nonzero on the device and read its length.
_MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
# Ops that sync but launch no kernel (a device-to-host copy, or a tensor made on the host).
_SYNC_NO_LAUNCH = {"_local_scalar_dense", "lift_fresh", "is_nonzero"}


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _is_view(func) -> bool:
    """Every return aliases an input and nothing is written: view, expand, select, detach..."""
    schema = func._schema
    if func.namespace == "prim" or _op_name(func) in _METADATA_OPS:
        return True
    if not schema.returns or any(a.alias_info is not None and a.alias_info.is_write
                                 for a in schema.arguments):
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing `t`: numel * element_size, stride-0 dims once."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size() if t.numel() else 0


def _view_key(t: torch.Tensor):
    """The same memory, seen the same way: one key (a tensor passed twice counts once)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _distinct_tensors(values):
    seen = {}
    for value in values:
        if isinstance(value, torch.Tensor):
            seen.setdefault(_view_key(value), value)
    return list(seen.values())


@dataclass(frozen=True)
class Transfer:
    """One copy from one device's memory to another's, as it was asked for."""
    source: str  # device type, e.g. "cpu"
    target: str
    bytes: int
    contiguous: bool  # both sides contiguous: a single memcpy, no temporaries
    non_blocking: bool


def _transfer(func, args, kwargs, out) -> Transfer | None:
    """The copy `copy_(dst, src)` or `_to_copy(src) -> out` makes, when it crosses devices."""
    name = _op_name(func)
    if name == "copy_":
        source, target = args[1], args[0]
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    elif name == "_to_copy":
        source, target = args[0], out
        non_blocking = bool(kwargs.get("non_blocking", False))
    else:
        return None
    if not isinstance(source, torch.Tensor) or source.device.type == target.device.type:
        return None
    return Transfer(source.device.type, target.device.type, tensor_bytes(target),
                    source.is_contiguous() and target.is_contiguous(), non_blocking)


@dataclass
class Cost:
    strict: bool = False
    bytes: int = 0
    launches: int = 0
    host_syncs: list[str] = field(default_factory=list)
    float64_tensors: list[int] = field(default_factory=list)
    triton_launches: list[tuple[str, int]] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    host_allocations: list[int] = field(default_factory=list)
    ops: collections.Counter = field(default_factory=collections.Counter)
    suspended: int = 0  # > 0 while a Triton launch runs (the interpreter's copies are not ours)

    def host_sync(self, name: str) -> None:
        if self.strict:
            raise HostSyncError(f"host sync inside a no-sync region: {name}")
        self.host_syncs.append(name)

    def add_op(self, func, args, kwargs, out) -> None:
        name = _op_name(func)
        self.ops[str(func)] += 1
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        view = _is_view(func)
        if not view or name.startswith("lift_fresh"):  # a view makes no new tensor
            self.float64_tensors += [t.numel() for t in outputs if t.dtype == torch.float64]
        if name in _ALLOCATION_OPS:
            self.host_allocations += [tensor_bytes(t) for t in outputs if t.device.type == "cpu"]
        if view or name in _ALLOCATION_OPS:
            return
        transfer = _transfer(func, args, kwargs, out)
        if transfer is not None:
            self.transfers.append(transfer)
        inputs = tree_flatten((args, kwargs))[0]
        self.bytes += sum(tensor_bytes(t) for t in _distinct_tensors(inputs + outputs))
        self.launches += name not in _SYNC_NO_LAUNCH

    def add_triton_launch(self, name: str, args) -> None:
        tensors = _distinct_tensors(_triton_tensors(args))
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.triton_launches.append((name, size))
        self.bytes += size
        self.launches += 1

    def summary(self, scale: float = 1.0) -> dict:
        """Traffic scaled (e.g. to a batch of 256); launches and syncs do not scale."""
        return {"gb": self.bytes * scale / 1e9, "launches": self.launches,
                "host_syncs": len(self.host_syncs),
                "float64_over_64k": sum(n > 65536 for n in self.float64_tensors),
                "triton_launches": len(self.triton_launches)}


def _syncs(func, args, kwargs) -> bool:
    """Would this op make the host wait for the device on CUDA? Decided before it runs."""
    name = _op_name(func)
    if name in _SYNC_OPS:
        return True
    if name in _MASK_INDEX_OPS:
        indices = tree_flatten(args[1:2])[0]
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices)
    if kwargs.get("non_blocking") or any(a is True for a in args[2:]):
        return False
    if name == "_to_copy":  # a blocking copy from a CUDA tensor into host memory
        device = kwargs.get("device")
        return args[0].is_cuda and device is not None and torch.device(device).type == "cpu"
    if name == "copy_":
        return args[1].is_cuda and args[0].device.type == "cpu"
    return False


def _triton_tensors(values):
    """Tensors among a launch's arguments, looking inside tuples and TensorDescriptors."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _triton_tensors(value)
        elif isinstance(getattr(value, "base", None), torch.Tensor):
            yield value.base


class _CountMode(TorchDispatchMode):
    def __init__(self, cost: Cost):
        super().__init__()
        self.cost = cost

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.cost.suspended:
            if _syncs(func, args, kwargs):
                self.cost.host_sync(str(func))  # raises here when strict, before the op runs
            out = func(*args, **kwargs)
            self.cost.add_op(func, args, kwargs, out)
            return out
        return func(*args, **kwargs)


def _patched(cls, name: str, wrap):
    original = getattr(cls, name)
    setattr(cls, name, wrap(original))
    return lambda: setattr(cls, name, original)


def _host_read(cost: Cost, label: str):
    """Tensor.item / Tensor.tolist: record one sync and keep the inner aten op uncounted."""
    def wrap(original):
        def method(self, *args, **kwargs):
            if cost.suspended:
                return original(self, *args, **kwargs)
            cost.host_sync(label)
            cost.suspended += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                cost.suspended -= 1
        return method
    return wrap


def _triton_launch(cost: Cost, run_kernels: bool):
    def wrap(original):
        def run(self, *args, **kwargs):
            if cost.suspended:
                return original(self, *args, **kwargs)
            fn = getattr(self, "fn", self)
            cost.add_triton_launch(getattr(fn, "__name__", type(self).__name__),
                                   list(args) + list(kwargs.values()))
            if not run_kernels:  # the count depends on the arguments only
                return None
            cost.suspended += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                cost.suspended -= 1
        return run
    return wrap


def _triton_launchers() -> list:
    """The classes whose `run` launches a kernel: the interpreter's and the compiled one."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # triton is optional; without it nothing can launch
        return []
    return [InterpretedFunction, JITFunction]


@contextlib.contextmanager
def count_cost(strict: bool = False, run_kernels: bool = True):
    """Count bytes, launches, host syncs and float64 tensors of the code in the block.

    run_kernels=False records each Triton launch without running it (its outputs keep whatever
    memory they had): the counts are the same, and the interpreter's minutes are saved where
    only the cost is wanted."""
    cost = Cost(strict=strict)
    restore = [_patched(torch.Tensor, "item", _host_read(cost, "Tensor.item")),
               _patched(torch.Tensor, "tolist", _host_read(cost, "Tensor.tolist"))]
    restore += [_patched(cls, "run", _triton_launch(cost, run_kernels))
                for cls in _triton_launchers()]
    try:
        with _CountMode(cost):
            yield cost
    finally:
        for undo in reversed(restore):
            undo()
