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

import difflib
import inspect
import os
import shlex
import sys

from trex_fast.cli import run_cli
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


# ---------------------------------------------------------------------------------------------
# CLI (fire)
# ---------------------------------------------------------------------------------------------
def sweep(grid="", base="", file: str = "", output_dir: str = "", launcher: str = "local",
          parallel: int = 1, gpus: str = "", nproc_per_node: int = 1, nodes: int = 1,
          gpus_per_node: int = 1, partition: str = "", time_min: int = 4320, account: str = "",
          cluster: str = "slurm", wait: bool = True, knn: bool = False, transfer: str = "",
          tensorboard: bool = False, collect_only: bool = False, dry_run: bool = False) -> dict:
    """Run a sweep of trex_fast.train over the recipe's knobs, then collect it.

    Args:
        grid: 'knob=v1,v2 knob2=v3,v4': every combination is a point (tuples: (0.25,1.0),(0.4,1.0)).
        base: train flags shared by every point, e.g. '--data=DIR --preset=trex --epochs=100'.
        file: a JSON or YAML sweep file with base, grid and/or named points (docs/SWEEPS.md);
            --base and --grid add to (and override) it.
        output_dir: the sweep's directory: one run directory per point, the summary, the figure.
        launcher: local (points in turn, or --parallel at a time), torchrun or slurm.
        parallel: local/torchrun: points at a time, each on its own GPUs (CUDA_VISIBLE_DEVICES).
        gpus: local/torchrun: comma-separated GPU ids to share out; default 0..N-1.
        nproc_per_node: torchrun: processes (GPUs) per point.
        nodes: slurm: nodes per point.
        gpus_per_node: slurm: GPUs per node (one training process each).
        partition: slurm partition.
        time_min: slurm time limit per job, minutes; a timed-out job is requeued and resumes.
        account: slurm account.
        cluster: slurm (default), or submitit's local / debug executor (no Slurm needed).
        wait: slurm: wait for the jobs, then collect (else rerun with --collect_only later).
        knn: also collect k-NN top-1 on the point's data (trex_fast.eval knn).
        transfer: comma-separated transfer datasets: also collect mean log-odds (trex_fast.eval).
        tensorboard: every point also writes TensorBoard events (<point>/tensorboard), so
            that `tensorboard --logdir=<output_dir>` compares the points while they train.
        collect_only: launch nothing; collect the finished points.
        dry_run: validate and print the points and their commands; write and run nothing.
    """
    if not output_dir:
        raise SweepError("--output_dir is required (the sweep's directory)")
    spec = load_file(file) if file else {}
    base_flags = {**parse_base(spec.get("base", "")), **parse_base(base)}
    if tensorboard:
        base_flags["tensorboard"] = True  # a train flag: validated with the others
    grid_values = {**parse_grid(spec.get("grid", {})), **parse_grid(grid)}
    settings = sweep_launch.LaunchSettings(
        launcher, parallel, gpus, nproc_per_node, nodes, gpus_per_node, partition, time_min,
        account, cluster, wait)
    named = spec.get("points") or []
    points = build_points(base_flags, grid_values, named, output_dir, settings.world_size())
    statuses = {p.name: point_status(p) for p in points}
    for p in points:
        print(f"[trex_fast.sweep] {p.name}: {statuses[p.name]}", flush=True)
    if dry_run:
        for p in points:
            print(shlex.join(sweep_launch.train_command(p, settings)))
        return {"points": [p.name for p in points], "status": statuses}
    write_point_records(points, output_dir, {"base": base_flags, "grid": grid_values,
                                             "points": named,
                                             "launcher": sweep_launch.settings_dict(settings)})
    todo = [p for p in points if statuses[p.name] != "finished"]
    if todo and not collect_only:
        failed = sweep_launch.launch(todo, settings, output_dir)
    else:
        failed = []
    summary = sweep_report.collect(points, output_dir, knn=knn, transfer=transfer)
    for name in failed:
        print(f"[trex_fast.sweep] {name} failed: see {os.path.join(output_dir, name, 'train.log')}",
              file=sys.stderr)
    return {**summary, "failed": failed}


def main(**flags) -> None:
    accepted = list(inspect.signature(sweep).parameters)
    try:
        for name in flags:
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted, n=3)
                hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
                raise SweepError(f"unknown sweep flag --{name}.{hint} Train flags go in --base "
                                 "or --grid; run with --help for the sweep's flags.")
        result = sweep(**flags)
    except SweepError as e:
        print(f"trex_fast.sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("failed"):
        sys.exit(1)


main.__doc__ = sweep.__doc__


def main_cli() -> None:
    """`python -m trex_fast.sweep` (trex_fast/sweep/__main__.py)."""
    run_cli(sweep if "--help" in sys.argv or "-h" in sys.argv else main)
