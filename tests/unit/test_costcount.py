"""count_cost on tiny programs whose cost is known by hand."""
import pytest
import torch
import triton
import triton.language as tl

from trex_fast.measure.costcount import HostSyncError, Transfer, count_cost


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


def test_elementwise_op_counts_inputs_and_output_once():
    a, b = torch.randn(1000), torch.randn(1000)
    with count_cost() as cost:
        a + b
    assert cost.bytes == 3 * 4000
    assert cost.launches == 1
    assert cost.ops["aten.add.Tensor"] == 1
    assert cost.host_syncs == []


def test_in_place_and_repeated_arguments_count_once():
    a, b = torch.randn(1000), torch.randn(1000)
    with count_cost() as cost:
        a.add_(b)  # reads a and b, writes a
        a * a  # reads a once, writes the product
    assert cost.bytes == 2 * 4000 + 2 * 4000
    assert cost.launches == 2


def test_views_and_allocations_cost_nothing():
    a = torch.randn(10, 100)
    with count_cost() as cost:
        a.view(1000)
        a.t()
        a.permute(1, 0)
        a[2:5, 0]
        a.unsqueeze(0).expand(3, 10, 100).squeeze(0)
        a.detach()
        a.reshape(100, 10)
        torch.empty(1000)
    assert cost.bytes == 0
    assert cost.launches == 0
    assert sum(cost.ops.values()) >= 8


def test_a_copy_behind_reshape_is_counted():
    a = torch.randn(10, 100)
    with count_cost() as cost:
        a.t().reshape(1000)  # not viewable: a clone
    assert cost.launches == 1
    assert cost.bytes == 2 * 4000


def test_broadcast_input_counts_its_memory_once():
    a, row = torch.randn(50, 20), torch.randn(20)
    with count_cost() as cost:
        a + row.expand(50, 20)
    assert cost.bytes == 4000 + 80 + 4000


@pytest.mark.parametrize("name,program", [
    ("Tensor.item", lambda x: x.sum().item()),
    ("Tensor.tolist", lambda x: x.tolist()),
    ("aten.lift_fresh", lambda x: torch.tensor([1, 2])),
    ("aten._local_scalar_dense", lambda x: bool(x[0] > 0)),
    ("aten.nonzero", lambda x: torch.nonzero(x)),
    ("aten.index.Tensor", lambda x: x[x > 0]),
    ("aten.masked_select", lambda x: torch.masked_select(x, x > 0)),
    ("aten._unique2", lambda x: torch.unique(x)),
    ("aten.equal", lambda x: torch.equal(x, x)),
])
def test_host_syncs_are_named(name, program):
    x = torch.randn(8)
    with count_cost() as cost:
        program(x)
    assert len(cost.host_syncs) == 1
    assert cost.host_syncs[0].startswith(name)
    with pytest.raises(HostSyncError, match=name.split(".")[-1]):
        with count_cost(strict=True):
            program(x)


def test_no_sync_code_passes_strict_and_patches_are_undone():
    x = torch.randn(8)
    with count_cost(strict=True) as cost:
        (x.clamp(min=0) * x).sum()
    assert cost.host_syncs == [] and cost.launches == 3
    assert isinstance(x.sum().item(), float)  # item works again outside
    with count_cost() as outer:
        x.tolist()
    assert outer.host_syncs == ["Tensor.tolist"]


def test_float64_tensors_are_recorded():
    with count_cost() as cost:
        small = torch.zeros(10, dtype=torch.float64)
        big = torch.ones(70_000, dtype=torch.float64)
        (big * 2).float()
        small.view(2, 5)  # a view produces no new tensor
    assert cost.float64_tensors == [10, 70_000, 70_000]
    summary = cost.summary(scale=2.0)
    assert summary["float64_over_64k"] == 2
    assert summary["gb"] == pytest.approx(2 * cost.bytes / 1e9)
    assert summary["launches"] == cost.launches == 4


def test_transfers_between_devices_and_host_allocations_are_recorded():
    """"meta" stands in for a device: copies to it are transfers, host-side copies are not."""
    host = torch.zeros(4, 6, dtype=torch.uint8)
    device = torch.empty(4, 6, dtype=torch.uint8, device="meta")
    with count_cost() as cost:
        staging = torch.empty(12, dtype=torch.uint8)
        staging.view(4, 3).copy_(host[:, :3])  # host to host
        device[:, :3].copy_(host[:, :3], non_blocking=True)  # strided
        staging.to("meta", non_blocking=True)
        device.copy_(host)  # blocking
        torch.empty(8, device="meta")
    assert cost.transfers == [Transfer("cpu", "meta", 12, False, True),
                              Transfer("cpu", "meta", 12, True, True),
                              Transfer("cpu", "meta", 24, True, False)]
    assert cost.host_allocations == [12]


def test_triton_launch_counts_its_arguments_not_the_interpreter_copies():
    x = torch.randn(1000)
    out = torch.empty_like(x)
    with count_cost() as cost:
        _scale_kernel[(4,)](x, out, x.numel(), BLOCK=256)
    torch.testing.assert_close(out, 2 * x)
    assert cost.triton_launches == [("_scale_kernel", 8000)]
    assert cost.bytes == 8000
    assert cost.launches == 1
    assert sum(cost.ops.values()) == 0
    assert cost.summary()["triton_launches"] == 1


@pytest.mark.gpu
def test_a_blocking_copy_to_the_host_is_a_sync_on_cuda():
    x = torch.randn(1000, device="cuda")
    with count_cost() as cost:
        x.cpu()
        torch.empty(1000, pin_memory=True).copy_(x, non_blocking=True)
        x * 2
    assert len(cost.host_syncs) == 1 and cost.host_syncs[0].startswith("aten._to_copy")
    assert cost.launches == 3
