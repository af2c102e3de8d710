"""Backbone weights in and out: trex_fast checkpoints, backbone.pth, torchvision and timm
state_dicts, `.safetensors` files (and the folders `export --format=hf` writes, which hold a
model.safetensors), and released files whose keys sit under `module.`, `model.`, `encoder.` or
`backbone.` prefixes, possibly inside a "model" / "state_dict" / "online" ("core" in older
trex_fast checkpoints) entry. Everything becomes the state_dict of the registry's backbone of
the arch (trex_fast.models.registry: the library's model without its classifier head). Torch
files load weights-only (the authors' full checkpoints, with their argparse.Namespace of
arguments, included; see trex_fast.safe_load); safetensors hold tensors only.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from pipelines import atomic
from trex_fast.models.net import build_backbone
from trex_fast.models.registry import DEFAULT_OPTIONS, TIMM_PREFIX, BackboneOptions
from trex_fast.safe_load import RELEASE_GLOBALS, BadFileError, load_file

_CONTAINERS = ("online", "core", "state_dict", "model", "teacher", "student")
_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "_orig_mod.")


def _unwrap(obj, path: str) -> dict:
    """The innermost dict of tensors: follow the usual container keys."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise BadFileError(f"--backbone={path!r}: expected a state_dict (a dict of tensors), "
                           f"found {type(obj).__name__}")
    return obj


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


SAFETENSORS = "model.safetensors"  # the weights file of a folder written by --format=hf


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(path)
    except (SafetensorError, OSError) as e:
        raise BadFileError(f"--backbone={path!r}: not a readable safetensors file ({e})") from None


def read_tensors(path: str, trust_file: bool = False) -> dict[str, torch.Tensor]:
    """The tensors a weights file (or an hf folder) holds, prefixes stripped."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SAFETENSORS)):
        path = os.path.join(path, SAFETENSORS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone={path!r}: no such file")
    if path.endswith(".safetensors"):
        raw = _read_safetensors(path)
    else:
        raw = _unwrap(load_file(path, trust_file=trust_file, allowed=RELEASE_GLOBALS), path)
    return {_strip(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _options(arch: str, tensors: dict) -> BackboneOptions:
    """A timm ViT trained with --global_pool=avg holds timm's fc_norm in place of norm: its
    weights say how to build it."""
    if arch.startswith(TIMM_PREFIX) and "fc_norm.weight" in tensors and (
            "norm.weight" not in tensors):
        return BackboneOptions(global_pool="avg")
    return DEFAULT_OPTIONS


def _matched(path: str, arch: str, trust_file: bool) -> tuple[nn.Module, dict]:
    """(the registry's `arch` backbone, the weights of `path` it takes), checked by name and
    shape."""
    tensors = read_tensors(path, trust_file)
    reference, _ = build_backbone(arch, _options(arch, tensors))
    wanted = reference.state_dict()
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise BadFileError(f"--backbone={path!r} has no weights for {len(missing)} of the "
                         f"{len(wanted)} tensors of {arch} (e.g. {missing[:3]}); "
                         "is --arch right?")
    wrong = [k for k in wanted if tensors[k].shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise BadFileError(f"--backbone={path!r} does not fit --arch={arch}: {k} has shape "
                         f"{tuple(tensors[k].shape)}, {arch} needs {tuple(wanted[k].shape)}")
    return reference, {k: tensors[k] for k in wanted}


def backbone_state(path: str, arch: str, trust_file: bool = False) -> dict[str, torch.Tensor]:
    """The `arch` backbone weights stored in `path` (classifier head left out); trust_file:
    load a torch file with full pickle (see safe_load)."""
    return _matched(path, arch, trust_file)[1]


def load_backbone(path: str, arch: str, trust_file: bool = False) -> nn.Module:
    """The registry's `arch` backbone (no head) with the weights from `path`."""
    backbone, state = _matched(path, arch, trust_file)
    backbone.load_state_dict(state)
    return backbone


def export_backbone(checkpoint: str, out: str, arch: str, trust_file: bool = False) -> str:
    """Write a checkpoint's backbone as a torch state_dict (loads into the library's model
    with only the head missing)."""
    state = backbone_state(checkpoint, arch, trust_file)
    atomic.save_torch(state, out)
    return out
