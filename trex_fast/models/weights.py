"""Backbone weights in and out: trex_fast checkpoints, backbone.pth, torchvision state_dicts and
released files whose keys sit under `module.`, `model.`, `encoder.` or `backbone.` prefixes,
possibly inside a "model" / "state_dict" / "online" ("core" in older trex_fast checkpoints)
entry. Everything becomes the state_dict of a bare torchvision model of the arch (fc excluded).
Files load weights-only (the authors' full checkpoints, with their argparse.Namespace of
arguments, included); see trex_fast.safe_load.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from pipelines import atomic
from trex_fast.models.net import build_backbone
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


def backbone_state(path: str, arch: str, trust_file: bool = False) -> dict[str, torch.Tensor]:
    """The torchvision `arch` backbone weights stored in `path` (fc left out); trust_file: load
    with full pickle (see safe_load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone={path!r}: no such file")
    raw = load_file(path, trust_file=trust_file, allowed=RELEASE_GLOBALS)
    tensors = {_strip(k): v for k, v in _unwrap(raw, path).items() if isinstance(v, torch.Tensor)}
    reference, _ = build_backbone(arch)
    wanted = reference.state_dict()
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise BadFileError(f"--backbone={path!r} has no weights for {len(missing)} of the "
                         f"{len(wanted)} tensors of a torchvision {arch} (e.g. {missing[:3]}); "
                         "is --arch right?")
    wrong = [k for k in wanted if tensors[k].shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise BadFileError(f"--backbone={path!r} does not fit --arch={arch}: {k} has shape "
                         f"{tuple(tensors[k].shape)}, {arch} needs {tuple(wanted[k].shape)}")
    return {k: tensors[k] for k in wanted}


def load_backbone(path: str, arch: str, trust_file: bool = False) -> nn.Module:
    """A torchvision `arch` with fc = identity and the weights from `path`."""
    backbone, _ = build_backbone(arch)
    backbone.load_state_dict(backbone_state(path, arch, trust_file))
    return backbone


def export_backbone(checkpoint: str, out: str, arch: str, trust_file: bool = False) -> str:
    """Write a checkpoint's backbone as a torchvision state_dict (loads with only fc missing)."""
    state = backbone_state(checkpoint, arch, trust_file)
    atomic.save_torch(state, out)
    return out
