"""`python -m trex_fast.train`: train t-ReX / t-ReX* (RECIPE.md). Wiring only.

With no flags it runs the demo: a small ImageNet-layout dataset of real JPEGs (made once,
cached), the demo preset on the CPU for a few minutes, validation, and where the outputs are.
With --data=<root> it trains for real; under torchrun, one process per GPU.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipelines import atomic
from trex_fast import availability, distributed, run_lock, runlog
from trex_fast import checkpoint as ckpt_lib
from trex_fast.build import build_state
from trex_fast.cli import fail, flags_signature, run_cli
from trex_fast.config import Config, ConfigError, help_text, make_config
from trex_fast.data import close_data, epoch_data_counts
from trex_fast.eval import final
from trex_fast.eval.in1k import evaluate
from trex_fast.loop import (
    CheckpointClock,
    EpochTotals,
    NonFiniteLossError,
    SecondSignal,
    StopSignal,
    train_one_epoch,
)
from trex_fast.measure import bottleneck
from trex_fast.models.net import backbone_state_dict
from trex_fast.models.registry import head_prefix
from trex_fast.plan import RunPlan, batch_deviation, output_dir, plan_run
from trex_fast.safe_load import BadFileError
from trex_fast.step import TrainState


def _log(message: str) -> None:
    print(f"[trex_fast] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# resume and checkpoints
# ---------------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """Where training continues: (0, 0) for a fresh run."""

    epoch: int = 0
    step_in_epoch: int = 0
    elapsed_s: float = 0.0
    epoch_sums: dict | None = None  # metric sums of the epoch's steps before step_in_epoch


def _find_checkpoint(cfg: Config, plan: RunPlan, ckpts: ckpt_lib.CheckpointDir):
    """(path, checkpoint) to resume from, already checked against the plan; None if fresh."""
    if cfg.resume:
        found = cfg.resume, ckpt_lib.load_checkpoint(cfg.resume, trust_file=cfg.trust_file)
    else:
        found = ckpts.load_latest(cfg.trust_file, log=_log, fresh_start=cfg.fresh_start)
    if found is None:
        return None
    path, ckpt = found
    for line in ckpt_lib.check_resumable(ckpt, cfg, plan, reschedule=cfg.reschedule):
        _log(line)
    return path, ckpt


def _resume(cfg: Config, plan: RunPlan, state: TrainState, found) -> Resumed:
    if found is None:
        return Resumed()
    path, ckpt = found
    sums = ckpt_lib.restore(state, ckpt, plan.rank)
    if ckpt["epoch"] >= cfg.epochs:
        _log(f"{path}: this run already finished its {cfg.epochs} epochs; reporting it again "
             "(more epochs change its LR schedule: see --reschedule)")
    else:
        _log(f"resumed from {path}: epoch {ckpt['epoch'] + 1}, global step {ckpt['step']}")
    return Resumed(ckpt["epoch"], ckpt["step_in_epoch"], ckpt.get("elapsed_s", 0.0), sums)


def _save(plan: RunPlan, state: TrainState, ckpts: ckpt_lib.CheckpointDir, epoch: int,
          step_in_epoch: int, elapsed_s: float, totals: EpochTotals | None = None) -> None:
    """Rank 0 writes. Every rank saves at the same step (the loop agrees on clock and signal
    stops at metric reads), so each one's rank-local state is gathered into the checkpoint
    (a collective, outside the step)."""
    sums = dict(totals.sums) if totals is not None and step_in_epoch else None
    ranks = None
    if plan.world_size > 1:
        ranks = distributed.gather_to_main(ckpt_lib.rank_local_state(state, sums))
    if not plan.is_main:
        return
    ckpt = ckpt_lib.make_checkpoint(state, epoch, step_in_epoch, sums, ranks)
    ckpt["elapsed_s"] = elapsed_s
    ckpts.save(ckpt)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    """Train (or continue) the run described by cfg; returns the last epoch's metrics."""
    device = availability.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = distributed.init(device.type)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return _run(cfg, dist_info, device)
    finally:
        distributed.shutdown()


def _run(cfg: Config, dist_info, device: torch.device) -> dict:
    # from here on a SIGTERM/SIGINT is a request to save and stop, even one that comes while
    # the loaders are being built (a scheduler's preemption can come at any moment)
    with StopSignal() as stop:
        return _run_stoppable(cfg, dist_info, device, stop)


def _run_stoppable(cfg: Config, dist_info, device: torch.device, stop: StopSignal) -> dict:
    # one run per output directory: rank 0, which writes the outputs, holds its lock before
    # any loader or model is built and before anything is written there (issue #26)
    out_dir = output_dir(cfg)
    with run_lock.held(out_dir, _log) if dist_info.is_main else nullcontext():
        if dist_info.is_main:
            for path in atomic.remove_stale_temps(out_dir):
                _log(f"removed {path}, left by a writer that was killed")
        plan, train_data, val_data = plan_run(cfg, dist_info, device)
        try:
            return _run_planned(cfg, plan, train_data, val_data, stop)
        finally:  # however the run ends, its loaders' workers end with it
            close_data(train_data, val_data)


def _run_planned(cfg: Config, plan: RunPlan, train_data, val_data, stop: StopSignal) -> dict:
    ckpts = ckpt_lib.CheckpointDir(plan.output_dir, cfg.keep_checkpoints)
    if cfg.profile_steps:  # a fresh state: the run's own checkpoints are not touched
        return _profile(cfg, plan, build_state(cfg, plan), train_data)
    found = _find_checkpoint(cfg, plan, ckpts)  # refuses a changed run before any work
    fin = final.plan_final(cfg, plan)  # a bad --val_images fails now, not after training
    state = build_state(cfg, plan)
    resumed = _resume(cfg, plan, state, found)
    if plan.is_main:
        runlog.write_run_info(plan.output_dir, cfg, plan.torch_device,
                              {"resolved": plan.to_dict()})
        runlog.truncate_metrics(plan.output_dir, completed_epochs=resumed.epoch)
        _log(f"{cfg.preset} preset, {cfg.arch}, {plan.num_classes} classes, "
             f"{plan.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {plan.device} "
             f"({plan.precision}); outputs in {plan.output_dir}")
        deviation = batch_deviation(cfg, plan)
        if deviation:
            _log(f"deviation from the recipe: {deviation}")
        _log(f"at the end: the training head's IN1K top-1 in fp32 on {fin.source}"
             + (f"; the IN1K linear probe on {fin.probe_root}" if fin.probe_root else ""))
    last = _train(cfg, plan, state, train_data, val_data, ckpts, resumed, stop)
    if "stopped_at_step" in last:
        return last
    return _finish(cfg, plan, state, val_data, last, fin)


def _train(cfg: Config, plan: RunPlan, state: TrainState, train_data, val_data,
           ckpts: ckpt_lib.CheckpointDir, resumed: Resumed, stop: StopSignal) -> dict:
    remaining = plan.total_steps - resumed.epoch * plan.steps_per_epoch - resumed.step_in_epoch
    progress = (tqdm(total=max(remaining, 0), unit="img", unit_scale=plan.global_batch,
                     dynamic_ncols=True, mininterval=2.0) if plan.is_main else None)
    run_start = time.perf_counter()
    clock = CheckpointClock(cfg.checkpoint_every_min)

    def elapsed() -> float:
        return resumed.elapsed_s + time.perf_counter() - run_start

    def stopped(totals: EpochTotals) -> dict:
        if plan.is_main:
            _log(f"stopped at global step {state.step}; checkpoint {ckpts.newest}; rerun the "
                 "same command to continue")
        return {"stopped_at_step": state.step, "signal": stop.requested(), **totals.summary()}

    last: dict = {}
    start_step = resumed.step_in_epoch
    try:
        for epoch in range(resumed.epoch, cfg.epochs):
            def clock_checkpoint(step_in_epoch: int, totals: EpochTotals, epoch=epoch) -> None:
                _save(plan, state, ckpts, epoch, step_in_epoch, elapsed(), totals)
                clock.reset()

            totals = EpochTotals()
            if start_step and resumed.epoch_sums:
                totals.add(resumed.epoch_sums)
            outcome = train_one_epoch(state, train_data, epoch, start_step, progress, stop,
                                      ckpts.newest, totals, clock, clock_checkpoint)
            if outcome.stopped_at is not None:  # a signal or --stop_at_step, mid-epoch
                _save(plan, state, ckpts, epoch, outcome.stopped_at, elapsed(), outcome.totals)
                return stopped(outcome.totals)
            start_step = 0
            last = _end_of_epoch(cfg, plan, state, val_data, epoch, outcome, elapsed(),
                                 epoch_data_counts(train_data, plan.torch_device))
            _save(plan, state, ckpts, epoch + 1, 0, elapsed())
            clock.reset()
            if stop.requested() is not None and epoch + 1 < cfg.epochs:  # at the epoch's end
                return stopped(outcome.totals)
    finally:
        if progress is not None:
            progress.close()
    return last


def _profile(cfg: Config, plan: RunPlan, state: TrainState, train_data) -> dict:
    warmup = max(3, cfg.profile_steps // 2)  # CPU and cuDNN warm up over several steps
    report = bottleneck.measure(state, train_data, plan.pipeline, cfg.profile_steps, warmup)
    if plan.is_main:
        atomic.write_json(os.path.join(plan.output_dir, "bottleneck.json"), report)
        _log(f"profile over {cfg.profile_steps} steps: {report}")
        _log(report["verdict"])
    return report


def _end_of_epoch(cfg: Config, plan: RunPlan, state: TrainState, val_data, epoch: int,
                  outcome, elapsed: float, data_counts: dict) -> dict:
    record = {runlog.EPOCH: epoch + 1, runlog.STEP: state.step, **outcome.totals.summary(),
              runlog.LR: state.optimizer.param_groups[0]["lr"],
              runlog.ELAPSED_S: round(elapsed, 2),
              **data_counts}  # e.g. corrupt_images (trex_fast.data.epoch_data_counts)
    last_epoch = epoch + 1 == cfg.epochs
    if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
        record.update(evaluate(state, val_data))
    if plan.is_main:
        runlog.append_metrics(plan.output_dir, record)
        if cfg.tensorboard:
            runlog.write_tensorboard(plan.output_dir, record)
        runlog.plot_metrics(plan.output_dir)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
        tqdm.write(f"[trex_fast] {shown}")
    return record


def _finish(cfg: Config, plan: RunPlan, state: TrainState, val_data, last: dict,
            fin: final.FinalPlan) -> dict:
    if not last:  # the run had already finished: report it again
        last = {runlog.EPOCH: cfg.epochs, runlog.STEP: state.step, **evaluate(state, val_data)}
    out_dir = plan.output_dir
    backbone_path = os.path.join(out_dir, "backbone.pth")
    if plan.is_main:
        atomic.save_torch(backbone_state_dict(state.online), backbone_path)
        _log(f"done: val top-1 {last[runlog.VAL_TOP1]:.2f}% after {last[runlog.EPOCH]} epochs "
             f"({state.step} steps)")
    # both IN1K figures, named (issue #25): every rank evaluates, rank 0 probes and writes
    record = final.final_figures(cfg, plan, state, fin, val_data, backbone_path, last)
    if plan.is_main:
        for line in final.report_lines(record):
            _log(line)
        _log(f"outputs in {os.path.abspath(out_dir)}: config.json env.json metrics.jsonl "
             f"{final.FINAL_JSON} loss.png accuracy.png checkpoint.pt backbone.pth "
             f"({cfg.arch}, {head_prefix(cfg.arch)} missing)")
    return last


# ---------------------------------------------------------------------------------------------
# CLI (fire)
# ---------------------------------------------------------------------------------------------
# A user's errors: one line `trex_fast.train: error: ...`, no traceback, exit 2 (issue #15).
USER_ERRORS = (BadFileError, ckpt_lib.ResumeError, ckpt_lib.NotACheckpointError,
               ckpt_lib.UnreadableCheckpointError, FileNotFoundError,
               availability.UnavailableError, run_lock.OutputDirError, run_lock.RunLockedError)
# A run that failed for a reason its message explains: one line too, exit 1 (issue #26).
RUN_FAILURES = (NonFiniteLossError, ckpt_lib.NonFiniteWeightsError, atomic.NoSpaceError)


def _exit(message: str, code: int):
    fail("trex_fast.train", message, code)


EXIT_CODES = ("Exit codes: 0 done; 2 a user's error; 1 a failed run; 128 + the signal when "
              "SIGTERM/SIGINT stopped it (saved after one signal, not after a second).")


def main(**flags) -> None:
    try:
        cfg = make_config(**flags)
    except ConfigError as e:
        _exit(f"error: {e}", 2)
    try:
        result = run(cfg)
    except (*USER_ERRORS, ConfigError) as e:  # ConfigError: the checks that need the world size
        _exit(f"error: {e}", 2)
    except RUN_FAILURES as e:
        _exit(f"error: {e}", 1)
    except SecondSignal as e:
        _exit(f"stopped by a second signal ({e.signum}) without saving; rerun the same "
              "command to continue from the last checkpoint", 128 + e.signum)
    if result.get("signal"):  # preempted: saved, but tell the scheduler the job did not finish
        sys.exit(128 + result["signal"])


# fire builds --help from the signature and docstring: every Config field is a flag.
main.__signature__ = flags_signature(Config, defaults={"preset": None})  # preset: see its help
main.__doc__ = f"""Train t-ReX / t-ReX* (RECIPE.md); with no flags, the CPU demo.

Flags (a flag given explicitly overrides the preset's value):
{help_text()}

{EXIT_CODES}
"""


if __name__ == "__main__":
    run_cli(main)
