"""`python -m trex_fast.train`: train t-ReX / t-ReX* (RECIPE.md). Wiring only.

With no flags it runs the demo: a small ImageNet-layout dataset of real JPEGs (made once,
cached), the demo preset on the CPU for a few minutes, validation, and where the outputs are.
With --data=<root> it trains for real; under torchrun, one process per GPU.
"""
from __future__ import annotations

import inspect
import os
import sys
import time

import torch
from tqdm import tqdm

from pipelines.batch import LoaderSettings
from trex_fast import bottleneck, distributed, runlog
from trex_fast import checkpoint as ckpt_lib
from trex_fast.build import build_state, resolve_device
from trex_fast.cli import run_cli
from trex_fast.config import FIELDS, Config, ConfigError, check_world, help_text, make_config
from trex_fast.data import build_data, resolve_data_root, resolve_pipeline
from trex_fast.loop import StopSignal, train_one_epoch
from trex_fast.model import backbone_state_dict
from trex_fast.safe_load import UnsafeFileError
from trex_fast.step import COMPUTE_DTYPES, TrainState, resolve_precision
from trex_fast.validation import evaluate


def _num_workers(cfg: Config, local_world_size: int) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    return max(1, min(16, (os.cpu_count() or 1) // local_world_size))


def _output_dir(cfg: Config) -> str:
    return cfg.output_dir or os.path.join("runs", cfg.preset)


def _log(message: str) -> None:
    print(f"[trex_fast] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def _resume(cfg: Config, state: TrainState, out_dir: str,
            num_classes: int) -> tuple[int, int, float]:
    """(epoch, step in epoch, elapsed seconds) to continue from; (0, 0, 0) for a fresh run."""
    path = cfg.resume or os.path.join(out_dir, ckpt_lib.CHECKPOINT_NAME)
    if not cfg.resume and not os.path.isfile(path):
        return 0, 0, 0.0
    ckpt = ckpt_lib.load_checkpoint(path, trust_file=cfg.trust_file)
    ckpt_lib.check_compatible(ckpt, cfg, num_classes)
    ckpt_lib.restore(state, ckpt)
    if ckpt["epoch"] >= cfg.epochs:
        _log(f"{path}: this run already finished its {cfg.epochs} epochs; reporting it again "
             "(raise --epochs to continue it)")
    else:
        _log(f"resumed from {path}: epoch {ckpt['epoch'] + 1}, global step {ckpt['step']}")
    return ckpt["epoch"], ckpt["step_in_epoch"], ckpt.get("elapsed_s", 0.0)


def _save(state: TrainState, path: str, epoch: int, step_in_epoch: int, num_classes: int,
          elapsed_s: float) -> None:
    ckpt = ckpt_lib.make_checkpoint(state, epoch, step_in_epoch, num_classes)
    ckpt["elapsed_s"] = elapsed_s
    ckpt_lib.save_atomic(ckpt, path)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Train (or continue) the run described by cfg; returns the last epoch's metrics."""
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto"
                                                  and torch.cuda.is_available())
    dist_info = distributed.init("cuda" if want_cuda else "cpu")
    try:
        return _run(cfg, dist_info)
    finally:
        distributed.shutdown()


def _run(cfg: Config, dist_info) -> dict:
    check_world(cfg, dist_info.world_size)
    device = resolve_device(cfg, dist_info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = _output_dir(cfg)
    ckpt_path = os.path.join(out_dir, ckpt_lib.CHECKPOINT_NAME)
    is_main = dist_info.is_main

    # ---- data ---------------------------------------------------------------------------
    root = resolve_data_root(cfg)
    precision_dtype = COMPUTE_DTYPES[resolve_precision(cfg.precision, device)]
    settings = LoaderSettings(cfg.batch_size, _num_workers(cfg, dist_info.local_world_size),
                              cfg.seed, dist_info.rank, dist_info.world_size, device,
                              precision_dtype, cfg.channels_last)
    train_data, val_data = build_data(cfg, root, settings)
    num_classes, steps_per_epoch = train_data.num_classes, train_data.steps_per_epoch

    # ---- model, EMA, memory, optimiser; resume ----------------------------------------------
    state = build_state(cfg, num_classes, steps_per_epoch, device, dist_info)
    if cfg.profile_steps:  # a fresh state: the run's own checkpoint is not touched
        return _profile(cfg, state, train_data, root, out_dir, is_main)
    start_epoch, start_step, elapsed_before = _resume(cfg, state, out_dir, num_classes)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        runlog.write_run_info(out_dir, cfg, device, {
            "resolved": {"data_root": root, "num_classes": num_classes,
                         "steps_per_epoch": steps_per_epoch, "world_size": dist_info.world_size,
                         "global_batch": cfg.batch_size * dist_info.world_size,
                         "peak_lr": state.schedule.peak_lr, "precision": state.precision,
                         "loss_impl": state.loss_impl, "num_workers": settings.num_workers}})
        runlog.truncate_metrics(out_dir, completed_epochs=start_epoch)
        _log(f"{cfg.preset} preset, {cfg.arch}, {num_classes} classes, {steps_per_epoch} steps/"
             f"epoch x {cfg.epochs} epochs on {device} ({state.precision}); outputs in {out_dir}")

    # ---- train --------------------------------------------------------------------------
    global_batch = cfg.batch_size * dist_info.world_size
    remaining = (cfg.epochs - start_epoch) * steps_per_epoch - start_step
    progress = (tqdm(total=max(remaining, 0), unit="img", unit_scale=global_batch,
                     dynamic_ncols=True, mininterval=2.0) if is_main else None)
    run_start = time.perf_counter()
    last: dict = {}
    try:
        with StopSignal() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                outcome = train_one_epoch(state, train_data, epoch, start_step, progress, stop,
                                          ckpt_path)
                elapsed = elapsed_before + time.perf_counter() - run_start
                if outcome.stopped_at is not None:  # a signal or --stop_at_step
                    if is_main:
                        _save(state, ckpt_path, epoch, outcome.stopped_at, num_classes, elapsed)
                        _log(f"stopped at global step {state.step}; checkpoint {ckpt_path}; "
                             "rerun the same command to continue")
                    return {"stopped_at_step": state.step, "signal": stop.received,
                            **outcome.totals.summary()}
                start_step = 0
                last = _end_of_epoch(cfg, state, val_data, epoch, outcome, out_dir, elapsed,
                                     is_main)
                if is_main:
                    _save(state, ckpt_path, epoch + 1, 0, num_classes, elapsed)
    finally:
        if progress is not None:
            progress.close()
    return _finish(cfg, state, val_data, out_dir, last, is_main)


def _profile(cfg: Config, state: TrainState, train_data, root: str, out_dir: str,
             is_main: bool) -> dict:
    warmup = max(3, cfg.profile_steps // 2)  # CPU and cuDNN warm up over several steps
    report = bottleneck.measure(state, train_data, resolve_pipeline(cfg, root), cfg.profile_steps,
                                warmup)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        runlog.write_json(os.path.join(out_dir, "bottleneck.json"), report)
        _log(f"profile over {cfg.profile_steps} steps: {report}")
        _log(report["verdict"])
    return report


def _end_of_epoch(cfg: Config, state: TrainState, val_data, epoch: int, outcome, out_dir: str,
                  elapsed: float, is_main: bool) -> dict:
    record = {"epoch": epoch + 1, "step": state.step, **outcome.totals.summary(),
              "lr": state.optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2)}
    last_epoch = epoch + 1 == cfg.epochs
    if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
        record.update(evaluate(state, val_data))
    if is_main:
        runlog.append_metrics(out_dir, record)
        if cfg.tensorboard:
            runlog.write_tensorboard(out_dir, record)
        runlog.plot_metrics(out_dir)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
        tqdm.write(f"[trex_fast] {shown}")
    return record


def _finish(cfg: Config, state: TrainState, val_data, out_dir: str, last: dict,
            is_main: bool) -> dict:
    if not last:  # the run had already finished: report it again
        last = {"epoch": cfg.epochs, "step": state.step, **evaluate(state, val_data)}
    if is_main:
        backbone_path = os.path.join(out_dir, "backbone.pth")
        ckpt_lib.save_atomic(backbone_state_dict(state.core), backbone_path)
        _log(f"done: val top-1 {last['val_top1']:.2f}% after {last['epoch']} epochs "
             f"({state.step} steps)")
        _log(f"outputs in {os.path.abspath(out_dir)}: config.json env.json metrics.jsonl "
             f"loss.png accuracy.png checkpoint.pt backbone.pth (torchvision {cfg.arch}, fc "
             "missing)")
    return last


# ---------------------------------------------------------------------------------------------
# CLI (fire)
# ---------------------------------------------------------------------------------------------
def main(**flags) -> None:
    try:
        cfg = make_config(**flags)
    except ConfigError as e:
        print(f"trex_fast.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = run(cfg)
    except UnsafeFileError as e:  # a refused --resume file: one line, no traceback
        print(f"trex_fast.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("signal"):  # preempted: saved, but tell the scheduler the job did not finish
        sys.exit(128 + result["signal"])


# fire builds --help from the signature and docstring: expose every Config field as a flag.
main.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                       default=None if name == "preset" else f.default)  # preset: see its help
     for name, f in FIELDS.items()]
    + [inspect.Parameter("unknown", inspect.Parameter.VAR_KEYWORD)])
main.__doc__ = f"""Train t-ReX / t-ReX* (RECIPE.md); with no flags, the CPU demo.

Flags (a flag given explicitly overrides the preset's value):
{help_text()}
"""


if __name__ == "__main__":
    run_cli(main)
