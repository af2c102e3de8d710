"""`python -m trex_fast.sweep`: the recipe's ablations as one command (issue #17).

    python -m trex_fast.sweep --grid="pr_hidden_layers=1,3 memory_size=0,8192" \
        --base="--data=DIR --preset=trex --epochs=100" --output_dir=sweeps/NAME

A sweep is a base (train flags shared by every point), a grid (the product of each knob's
values) and/or named points (a file, JSON or YAML; docs/SWEEPS.md). Every point's flags go
through trex_fast.config.make_config, the train CLI's own validation, before anything runs.
Each point trains in its own run directory, <output_dir>/<point>, through
`python -m trex_fast.train`; a rerun skips finished points and relaunches the others, which
continue from their checkpoint through training's own resume. Then every finished point is
collected into summary.csv/json/md and tradeoff.png (trex_fast.sweep.report).
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, fields

from trex_fast.cli import command, flag, run_cli
from trex_fast.sweep import launch as sweep_launch
from trex_fast.sweep import report as sweep_report
from trex_fast.sweep.points import (
    SweepError,
    build_points,
    load_file,
    parse_base,
    parse_grid,
    point_status,
    write_point_records,
)

_LAUNCH = sweep_launch.LaunchSettings()  # the launch flags' defaults live there


@dataclass(frozen=True)
class SweepSettings:
    """`python -m trex_fast.sweep`: its flags."""
    grid: str = flag("", "'knob=v1,v2 knob2=v3,v4': every combination is a point (tuples: "
                         "(0.25,1.0),(0.4,1.0))")
    base: str = flag("", "train flags shared by every point, e.g. '--data=DIR --preset=trex "
                         "--epochs=100'")
    file: str = flag("", "a JSON or YAML sweep file with base, grid and/or named points "
                         "(docs/SWEEPS.md); --base and --grid add to (and override) it")
    output_dir: str = flag("", "the sweep's directory: one run directory per point, the "
                               "summary, the figure", required=True)
    launcher: str = flag(_LAUNCH.launcher, "local (points in turn, or --parallel at a time), "
                                           "torchrun or slurm")
    parallel: int = flag(_LAUNCH.parallel, "local/torchrun: points at a time, each on its own "
                                           "GPUs (CUDA_VISIBLE_DEVICES)")
    gpus: tuple[str, ...] = flag((), "local/torchrun: comma-separated GPU ids to share out; "
                                     "default 0..N-1")
    nproc_per_node: int = flag(_LAUNCH.nproc_per_node, "torchrun: processes (GPUs) per point")
    nodes: int = flag(_LAUNCH.nodes, "slurm: nodes per point")
    gpus_per_node: int = flag(_LAUNCH.gpus_per_node, "slurm: GPUs per node (one training "
                                                     "process each)")
    partition: str = flag(_LAUNCH.partition, "slurm partition")
    time_min: int = flag(_LAUNCH.time_min, "slurm time limit per job, minutes; a timed-out job "
                                           "is requeued and resumes")
    account: str = flag(_LAUNCH.account, "slurm account")
    cluster: str = flag(_LAUNCH.cluster, "slurm (default), or submitit's local / debug "
                                         "executor (no Slurm needed)")
    wait: bool = flag(_LAUNCH.wait, "slurm: wait for the jobs, then collect (else rerun with "
                                    "--collect_only later)")
    knn: bool = flag(False, "also collect k-NN top-1 on the point's data (trex_fast.eval knn)")
    transfer: tuple[str, ...] = flag((), "comma-separated transfer datasets: also collect mean "
                                         "log-odds (trex_fast.eval transfer)")
    tensorboard: bool = flag(False, "every point also writes TensorBoard events "
                                    "(<point>/tensorboard), so that `tensorboard "
                                    "--logdir=<output_dir>` compares the points while they "
                                    "train")
    collect_only: bool = flag(False, "launch nothing; collect the finished points")
    dry_run: bool = flag(False, "validate and print the points and their commands; write and "
                                "run nothing")

    def launch_settings(self) -> sweep_launch.LaunchSettings:
        values = {f.name: getattr(self, f.name) for f in fields(sweep_launch.LaunchSettings)}
        return sweep_launch.LaunchSettings(**{**values, "gpus": ",".join(self.gpus)})


def sweep(s: SweepSettings) -> dict:
    """Run a sweep of trex_fast.train over the recipe's knobs, then collect it; returns the
    points' status (dry run) or the summary rows, paths and failed points."""
    spec = load_file(s.file) if s.file else {}
    base_flags = {**parse_base(spec.get("base", "")), **parse_base(s.base)}
    if s.tensorboard:
        base_flags["tensorboard"] = True  # a train flag: validated with the others
    grid_values = {**parse_grid(spec.get("grid", {})), **parse_grid(s.grid)}
    settings = s.launch_settings()
    named = spec.get("points") or []
    points = build_points(base_flags, grid_values, named, s.output_dir, settings.world_size())
    statuses = {p.name: point_status(p) for p in points}
    for p in points:
        print(f"[trex_fast.sweep] {p.name}: {statuses[p.name]}", flush=True)
    if s.dry_run:
        for p in points:
            print(shlex.join(sweep_launch.train_command(p, settings)))
        return {"points": [p.name for p in points], "status": statuses}
    write_point_records(points, s.output_dir, {"base": base_flags, "grid": grid_values,
                                               "points": named,
                                               "launcher": sweep_launch.settings_dict(settings)})
    todo = [p for p in points if statuses[p.name] != "finished"]
    failed = sweep_launch.launch(todo, settings, s.output_dir) if todo and not s.collect_only \
        else []
    summary = sweep_report.collect(points, s.output_dir, knn=s.knn, transfer=s.transfer)
    for name in failed:
        print(f"[trex_fast.sweep] {name} failed: see "
              f"{os.path.join(s.output_dir, name, 'train.log')}", file=sys.stderr)
    return {**summary, "failed": failed}


def _sweep_then_exit(s: SweepSettings) -> None:
    if sweep(s).get("failed"):
        sys.exit(1)


main = command(SweepSettings, _sweep_then_exit, "trex_fast.sweep",
               "Run a sweep of trex_fast.train over the recipe's knobs, then collect it.",
               (SweepError,), noun="sweep flag",
               tail="Train flags go in --base or --grid; run with --help for the sweep's flags.")


def main_cli() -> None:
    """`python -m trex_fast.sweep` (trex_fast/sweep/__main__.py)."""
    run_cli(main)
