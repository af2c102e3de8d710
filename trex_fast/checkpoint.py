"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the online network, the EMA network, the memory bank and its pointer, the
optimiser, the grad scaler, the schedule position (global step, epoch, step inside the epoch),
the RNG states, the config and the run plan. Under DDP it also holds every rank's rank-local
state (`ranks`, in rank order: BatchNorm buffers, which are per process without SyncBN, RNG
states and the epoch's metric sums), gathered to rank 0, so each rank resumes its own.
pipelines.atomic writes it (temporary file, fsync, rename, directory fsync), so a crash leaves
the previous checkpoint intact.

Everything in it is a tensor, list, tuple, dict, number, string or None (the numpy and Python RNG
states are converted), so it loads weights-only (trex_fast.safe_load, issue #18): reading a
checkpoint never runs code from it.
"""
from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from pipelines import atomic
from trex_fast.config import Config, to_dict
from trex_fast.optim import LRSchedule
from trex_fast.plan import schedule_facts
from trex_fast.safe_load import RELEASE_GLOBALS, UnsafeFileError, load_file
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


def _buffers(module: torch.nn.Module | None) -> dict | None:
    if module is None:
        return None
    return {name: b.detach().cpu().clone() for name, b in module.named_buffers()}


def _load_buffers(module: torch.nn.Module | None, saved: dict | None) -> None:
    if module is None:
        return
    for name, b in module.named_buffers():
        b.copy_(saved[name])


def rank_local_state(state: TrainState, epoch_sums: dict | None = None) -> dict:
    """What one rank holds that the others do not: the BatchNorm buffers of the online and EMA
    networks (per process without SyncBN; the weights are DDP's, the same everywhere), the RNG
    states and the metric sums of the epoch so far. The memory bank is filled from all ranks,
    so it is the same everywhere."""
    return {"buffers": {"online": _buffers(state.online), "ema": _buffers(state.ema)},
            "rng": rng_state(), "epoch_sums": epoch_sums}


def make_checkpoint(state: TrainState, epoch: int, step_in_epoch: int,
                    epoch_sums: dict | None = None, ranks: list[dict] | None = None) -> dict:
    """epoch/step_in_epoch: where training continues (step_in_epoch 0 = a fresh epoch);
    epoch_sums: the metric sums of the steps of this epoch already done (mid-epoch only);
    ranks: rank_local_state of every rank, in rank order (None: rank 0's state only)."""
    return {
        "online": state.online.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "memory": state.memory.state_dict() if state.memory is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "epoch_sums": epoch_sums,
        "rng": rng_state(),
        "config": to_dict(state.cfg),
        "plan": state.plan.to_dict(),
        "ranks": ranks,
    }


def load_checkpoint(path: str, trust_file: bool = False, flag: str = "--resume") -> dict:
    """A trex_fast checkpoint, loaded weights-only (trust_file: full pickle, see safe_load).

    The authors' release classes are allowed too, so that handing in one of their full
    checkpoints is told apart from a crafted file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path!r}: no such checkpoint file")
    ckpt = _renamed(load_file(path, trust_file=trust_file, allowed=RELEASE_GLOBALS))
    if not isinstance(ckpt, dict) or not {"online", "config", "rng"} <= ckpt.keys():
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NotACheckpointError(f"{flag}={path!r} is not a trex_fast checkpoint (found {found}); "
                         "released or torchvision weights go to the eval commands' --backbone")
    return ckpt


def _renamed(ckpt):
    """Older checkpoints: the online network was "core", the plan's facts sat at the top."""
    if not isinstance(ckpt, dict):
        return ckpt  # load_checkpoint names what it found
    if "core" in ckpt and "online" not in ckpt:
        ckpt["online"] = ckpt.pop("core")
        for mine in ckpt.get("ranks") or ():
            mine["buffers"]["online"] = mine["buffers"].pop("core")
    if not ckpt.get("plan") and "num_classes" in ckpt:
        ckpt["plan"] = {"num_classes": ckpt.pop("num_classes")}  # stored before the plan
    return ckpt


# ---------------------------------------------------------------------------------------------
# the checkpoints of one output directory: the newest is checkpoint.pt, older ones are named
# by their global step; at most `keep` are kept.
# ---------------------------------------------------------------------------------------------
_OLDER = re.compile(r"^checkpoint-step(\d+)\.pt$")


class CheckpointDir:
    def __init__(self, out_dir: str, keep: int):
        self.out_dir, self.keep = out_dir, keep
        self.newest = os.path.join(out_dir, CHECKPOINT_NAME)
        self._newest_step: int | None = None  # known once loaded or written here

    def _older(self) -> list[tuple[int, str]]:
        """(step, path) of the step-named checkpoints, newest first."""
        if not os.path.isdir(self.out_dir):
            return []
        found = [(int(m.group(1)), os.path.join(self.out_dir, name))
                 for name in os.listdir(self.out_dir) if (m := _OLDER.match(name))]
        return sorted(found, reverse=True)

    def candidates(self) -> list[str]:
        """Every checkpoint of the directory, newest first."""
        newest = [self.newest] if os.path.isfile(self.newest) else []
        return newest + [path for _, path in self._older()]

    def load_latest(self, trust_file: bool = False, log=print,
                    fresh_start: bool = False) -> tuple[str, dict] | None:
        """The newest checkpoint that loads; one that does not (e.g. truncated by a full disk)
        is reported by name and the one before it is tried. None if there is none. When there
        are checkpoints but none loads, UnreadableCheckpointError names them (a fresh run would
        overwrite them), unless fresh_start (--fresh_start) says to start from step 0."""
        unreadable = []
        for path in self.candidates():
            try:
                ckpt = load_checkpoint(path, trust_file)
            except UnsafeFileError:
                raise  # a crafted file is the user's to decide about, not to skip silently
            except Exception as e:  # any unreadable file: fall back to the previous one
                log(f"{path}: cannot be loaded ({_first_line(e)}); trying the previous "
                    "checkpoint")
                unreadable.append(path)
                continue
            if path == self.newest:
                self._newest_step = ckpt["step"]
            return path, ckpt
        if unreadable and not fresh_start:
            raise UnreadableCheckpointError(
                f"no checkpoint of {self.out_dir} can be loaded ({', '.join(unreadable)}); "
                "they are left as they are. Pass --fresh_start=True to start from step 0 and "
                "replace them, or use another --output_dir")
        if unreadable:
            log(f"--fresh_start=True: starting from step 0; {', '.join(unreadable)} will be "
                "replaced")
        return None

    def save(self, ckpt: dict) -> str:
        """Write ckpt as checkpoint.pt; the previous one becomes checkpoint-step<N>.pt, and
        only the newest `keep` survive. Each step is an atomic rename, so a kill at any moment
        leaves every checkpoint under its final name complete (a kill mid-write leaves a
        temporary file, which the next run's start removes: atomic.remove_stale_temps).
        Non-finite weights are refused (check_finite_weights)."""
        check_finite_weights(ckpt, self.newest)
        os.makedirs(self.out_dir, exist_ok=True)
        staged = atomic.write_temp(self.newest, lambda f: torch.save(ckpt, f))
        if os.path.isfile(self.newest):
            previous_step = (self._newest_step if self._newest_step is not None
                             else _step_of(self.newest))
            if previous_step is not None and previous_step != ckpt["step"]:
                os.replace(self.newest, os.path.join(
                    self.out_dir, f"checkpoint-step{previous_step:09d}.pt"))
        atomic.replace_durably(staged, self.newest)
        self._newest_step = ckpt["step"]
        for _, path in self._older()[max(self.keep - 1, 0):]:
            os.remove(path)
        return self.newest


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}"


class NonFiniteWeightsError(RuntimeError):
    """The weights to checkpoint hold inf or NaN; nothing was written."""


class UnreadableCheckpointError(RuntimeError):
    """Checkpoints exist in the output directory but none loads."""


def _float_tensors(tree):
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _float_tensors(value)


def left_behind(newest: str) -> str:
    """What a run that stops on an error leaves, for its message; newest: the output
    directory's checkpoint.pt."""
    if os.path.isfile(newest):
        return f"the last checkpoint ({newest}) is intact"
    return f"there is no checkpoint yet ({newest}): a rerun starts from step 0"


def check_finite_weights(ckpt: dict, newest: str) -> None:
    """Refuse to write a checkpoint whose networks or memory bank hold inf/NaN. One host sync
    per save (a save already copies every tensor to the host), never in the step."""
    tensors = [t for key in ("online", "ema", "memory") for t in _float_tensors(ckpt.get(key))]
    if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        raise NonFiniteWeightsError(
            f"the weights became non-finite (inf or NaN) by global step {ckpt['step']}; this "
            f"checkpoint was not written and {left_behind(newest)}. Try a lower --lr, "
            "--precision=fp32, or check the data.")


def _step_of(path: str) -> int | None:
    """The global step of a checkpoint file, or None if it cannot be read."""
    try:
        return int(load_file(path, allowed=RELEASE_GLOBALS)["step"])
    except Exception:  # unreadable: it is dropped rather than kept under a guessed name
        return None


# ---------------------------------------------------------------------------------------------
# resume compares plans (issue #15): a change that would make the run differ from an
# uninterrupted one is refused, naming every changed key with its old and new value.
# ---------------------------------------------------------------------------------------------
MODEL_KEYS = ("arch", "pr_hidden_layers", "pr_hidden_dim", "pr_bottleneck_dim",
              "pr_input_l2_norm", "memory_size", "clf_tau", "ema_momentum", "weight_decay",
              "momentum", "seed", "optimizer", "drop_path", "global_pool", "clip_grad")
CROP_KEYS = ("global_crops", "local_crops", "global_size", "local_size", "global_scale",
             "local_scale")
SCHEDULE_KEYS = ("epochs", "warmup_epochs", "lr", "min_lr")
PLAN_KEYS = ("global_batch", "world_size", "precision", "num_classes", "steps_per_epoch",
             "pipeline")


class NotACheckpointError(ValueError):
    """The file loads but is not a trex_fast checkpoint."""


class ResumeError(ValueError):
    """Resuming would not continue the checkpoint's run exactly; the message says why."""


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _changes(old: dict, new: dict, keys: tuple[str, ...]) -> list[tuple[str, object, object]]:
    return [(k, old[k], new[k]) for k in keys if k in old and not _same(old[k], new[k])]


def _schedule(config: dict, plan: dict) -> LRSchedule:
    """The schedule of `config` at the plan's batch and epoch length (the plan's own rule)."""
    facts = schedule_facts(config["lr"], config["epochs"], config["warmup_epochs"],
                           plan["global_batch"], plan["steps_per_epoch"])
    return LRSchedule(peak_lr=facts["peak_lr"], min_lr=config["min_lr"],
                      warmup_steps=facts["warmup_steps"], total_steps=facts["total_steps"])


def lr_before_after(ckpt: dict, cfg: Config, plan) -> tuple[float, float]:
    """The LR of the checkpoint's next step under its own schedule (the last step's, for a
    finished run) and under the new one."""
    new_plan = plan.to_dict()
    old_plan = {**new_plan, **ckpt["plan"]}  # checkpoints before #15 stored no plan
    old, step = _schedule(ckpt["config"], old_plan), ckpt["step"]
    return old(min(step, old.total_steps - 1)), _schedule(to_dict(cfg), new_plan)(step)


def check_resumable(ckpt: dict, cfg: Config, plan, reschedule: bool = False) -> list[str]:
    """Raise ResumeError naming every change that resuming cannot continue exactly; returns
    the lines to print about accepted changes (--reschedule)."""
    old_cfg, new_cfg = ckpt["config"], to_dict(cfg)
    old_plan = ckpt["plan"]
    new_plan = plan.to_dict()
    refused = [f"{k}: {a!r} -> {b!r}" for k, a, b in
               _changes(old_cfg, new_cfg, MODEL_KEYS + CROP_KEYS)
               + _changes(old_plan, new_plan, PLAN_KEYS)]
    if any(k == "world_size" for k, _, _ in _changes(old_plan, new_plan, PLAN_KEYS)):
        refused.append(
            "world_size: at the same global batch the data order re-shards exactly (every "
            "global step holds the same images), but BatchNorm statistics are per process and "
            "the memory bank is filled in rank order, so the run would still differ")
    schedule = _changes(old_cfg, new_cfg, SCHEDULE_KEYS)
    accepted = []
    if schedule:
        before, after = lr_before_after(ckpt, cfg, plan)
        named = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in schedule)
        jump = f"the LR at global step {ckpt['step']} goes from {before:.6g} to {after:.6g}"
        if reschedule:
            accepted.append(f"--reschedule: {named}; {jump}")
        else:
            refused.append(f"{named}: a schedule change, {jump} (pass --reschedule=True to "
                           "accept it)")
    if refused:
        raise ResumeError("cannot resume: the checkpoint's run differs from this one in "
                          + "; ".join(refused)
                          + ". Use the checkpoint's flags, or another --output_dir for a new run")
    return accepted


def restore(state: TrainState, ckpt: dict, rank: int = 0) -> dict | None:
    """Load ckpt into state as `rank`; returns that rank's epoch metric sums (None when the
    checkpoint holds rank 0's only and this is another rank: they cannot be recovered)."""
    state.online.load_state_dict(ckpt["online"])
    if state.ema is not None:
        state.ema.load_state_dict(ckpt["ema"])
        state.memory.load_state_dict(ckpt["memory"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.step = ckpt["step"]
    ranks = ckpt.get("ranks")  # world size changes are refused, so rank < len(ranks)
    if not ranks:  # single process, or written without the ranks' states
        set_rng_state(ckpt["rng"])
        return ckpt.get("epoch_sums") if rank == 0 else None
    mine = ranks[rank]
    _load_buffers(state.online, mine["buffers"]["online"])
    _load_buffers(state.ema, mine["buffers"]["ema"])
    set_rng_state(mine["rng"])
    return mine["epoch_sums"]
