"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the online network, the EMA network, the memory bank and its pointer, the
optimiser, the grad scaler, the schedule position (global step, epoch, step inside the epoch),
the RNG states and the config. It is written to a temporary file, flushed, then renamed, so a
crash leaves the previous checkpoint intact.

Everything in it is a tensor, list, tuple, dict, number, string or None (the numpy and Python RNG
states are converted), so it loads weights-only (trex_fast.safe_load, issue #18): reading a
checkpoint never runs code from it.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from trex_fast.config import Config, to_dict
from trex_fast.safe_load import RELEASE_GLOBALS, load_file
from trex_fast.step import TrainState

CHECKPOINT_NAME = "checkpoint.pt"


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),  # [624] uint32 words
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_rng_state(state) -> None:
    if isinstance(state, tuple):  # checkpoints written before #18 (loaded with --trust_file)
        np.random.set_state(state)
        return
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    _set_numpy_rng_state(state["numpy"])
    python = state["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["internal"]), python["gauss_next"])
    random.setstate(python)


def save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_checkpoint(state: TrainState, epoch: int, step_in_epoch: int, num_classes: int) -> dict:
    """epoch/step_in_epoch: where training continues (step_in_epoch 0 = a fresh epoch)."""
    return {
        "core": state.core.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "memory": state.memory.state_dict() if state.memory is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "num_classes": num_classes,
        "rng": rng_state(),
        "config": to_dict(state.cfg),
    }


def load_checkpoint(path: str, trust_file: bool = False, flag: str = "--resume") -> dict:
    """A trex_fast checkpoint, loaded weights-only (trust_file: full pickle, see safe_load).

    The authors' release classes are allowed too, so that handing in one of their full
    checkpoints is told apart from a crafted file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path!r}: no such checkpoint file")
    ckpt = load_file(path, trust_file=trust_file, allowed=RELEASE_GLOBALS)
    if not isinstance(ckpt, dict) or not {"core", "config", "rng"} <= ckpt.keys():
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{flag}={path!r} is not a trex_fast checkpoint (found {found}); "
                         "released or torchvision weights go to the eval commands' --backbone")
    return ckpt


_ARCHITECTURE_KEYS = ("arch", "pr_hidden_layers", "pr_hidden_dim", "pr_bottleneck_dim",
                      "pr_input_l2_norm", "memory_size")


def check_compatible(ckpt: dict, cfg: Config, num_classes: int) -> None:
    """Resuming with another architecture or dataset is an error, not a silent reset."""
    old = ckpt["config"]
    for key in _ARCHITECTURE_KEYS:
        if old[key] != getattr(cfg, key):
            raise ValueError(f"cannot resume: the checkpoint has {key}={old[key]!r}, this run "
                             f"--{key}={getattr(cfg, key)!r}; use another --output_dir")
    if ckpt["num_classes"] != num_classes:
        raise ValueError(f"cannot resume: the checkpoint has {ckpt['num_classes']} classes, "
                         f"the data has {num_classes}")


def restore(state: TrainState, ckpt: dict) -> None:
    state.core.load_state_dict(ckpt["core"])
    if state.ema is not None:
        state.ema.load_state_dict(ckpt["ema"])
        state.memory.load_state_dict(ckpt["memory"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.step = ckpt["step"]
    set_rng_state(ckpt["rng"])
