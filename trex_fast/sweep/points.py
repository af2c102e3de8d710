"""A sweep's points: parsing --grid/--base/sweep files, expanding them into validated
Points (each through the train CLI's own make_config), and each point's status on disk."""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass

from pipelines import atomic
from trex_fast import runlog
from trex_fast.cli import parse_flags
from trex_fast.config import Config, ConfigError, check_world, make_config, to_dict

POINT_NAME = "point.json"  # the sweep's record of a point: its knobs, flags, resolved config
SWEEP_NAME = "sweep.json"
_OWNED = ("output_dir", "resume")  # the sweep sets these per point


class SweepError(ValueError):
    """A sweep that cannot run as given; the message names the point and the key."""


@dataclass(frozen=True)
class Point:
    name: str
    knobs: dict  # what varies across the sweep: the grid's values or the named point's flags
    flags: dict  # base + knobs + output_dir: the train CLI's flags
    cfg: Config

    @property
    def run_dir(self) -> str:
        return self.cfg.output_dir

    def train_argv(self) -> list[str]:
        """The flags as `python -m trex_fast.train` reads them: repr is a Python literal for
        fire and the stand-in parser alike (strings quoted, tuples in parentheses)."""
        return [f"--{key}={value!r}" for key, value in self.flags.items()]


# ---------------------------------------------------------------------------------------------
# the spec: base, grid, named points
# ---------------------------------------------------------------------------------------------
def parse_base(base) -> dict:
    """'--data=DIR --preset=trex' (train CLI flags) or a mapping -> {name: value}."""
    if isinstance(base, dict):
        return dict(base)
    try:
        return parse_flags(shlex.split(str(base or "")))
    except SystemExit as e:  # parse_flags reports a non-flag word this way
        raise SweepError(f"--base: {e}") from None


def _top_level_parts(text: str) -> list[str]:
    """'64,(0.4,1.0),abc' -> ['64', '(0.4,1.0)', 'abc']: commas inside brackets stay."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def _literal_or_text(part: str):
    try:
        return ast.literal_eval(part)
    except (ValueError, SyntaxError):
        return part


def _values(key: str, text: str) -> list:
    """'1,3' -> [1, 3]; '(0.25,1.0),(0.4,1.0)' -> two tuples; 'trex,plain' -> two strings;
    each value is read on its own, so in '64,128,abc' only 'abc' stays a string (and the
    config check blames it, not 64)."""
    values = [_literal_or_text(part) for part in _top_level_parts(text)]
    if not values:
        raise SweepError(f"--grid: {key} has no values")
    return values


def parse_grid(grid) -> dict[str, list]:
    """'k1=a,b k2=c,d' or a mapping {k1: [a, b], ...} -> {knob: [values]}, in order."""
    if isinstance(grid, dict):
        return {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in grid.items()}
    parsed: dict[str, list] = {}
    for item in str(grid or "").split():
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise SweepError(f"--grid: {item!r} is not knob=value1,value2,...")
        parsed[key.replace("-", "_")] = _values(key, text)
    return parsed


def load_file(path: str) -> dict:
    """A sweep file: {base: {...} or '--flags', grid: {knob: [values]}, points: [{name, ...}]}."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml  # optional dependency: the `sweep` extra

        spec = yaml.safe_load(text) or {}
    else:
        spec = json.loads(text)
    unknown = set(spec) - {"base", "grid", "points"}
    if not isinstance(spec, dict) or unknown:
        raise SweepError(f"{path}: a sweep file holds base, grid and points; not {sorted(unknown)}")
    return spec


def _format(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_format(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def grid_name(knobs: dict) -> str:
    """{'pr_hidden_layers': 1, 'memory_size': 0} -> 'pr_hidden_layers-1__memory_size-0'."""
    return "__".join(f"{key}-{_format(value)}" for key, value in knobs.items()) or "base"


def expand(grid: dict[str, list], named: list[dict]) -> list[tuple[str, dict]]:
    """(name, knobs) of every point: the grid's product, then the named points."""
    points = []
    if grid:
        for combo in itertools.product(*grid.values()):
            knobs = dict(zip(grid, combo))
            points.append((grid_name(knobs), knobs))
    for i, entry in enumerate(named):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SweepError(f"points[{i}]: each named point is a mapping with a 'name'")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", entry["name"]):
            raise SweepError(f"points[{i}]: name {entry['name']!r} must be letters, digits and "
                             "._+- (it names the run directory)")
        points.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
    if not points:
        points.append(("base", {}))  # a sweep of one point: the base itself
    names = [name for name, _ in points]
    if len(set(names)) != len(names):
        shared = sorted({n for n in names if names.count(n) > 1})
        raise SweepError(f"two points share a name: {shared}")
    return points


def build_points(base: dict, grid: dict[str, list], named: list[dict], output_dir: str,
                 world_size: int = 1) -> list[Point]:
    """Validate every point with the train CLI's own code (make_config, check_world); the
    first error names the point and the flag, before any run directory exists."""
    points = []
    for name, knobs in expand(grid, named):
        flags = {**base, **knobs}
        for key in _OWNED:
            if key in flags:
                raise SweepError(f"point {name}: --{key} is set by the sweep (one run directory "
                                 "per point under --output_dir); remove it")
        flags["output_dir"] = os.path.join(os.path.abspath(output_dir), name)
        try:
            cfg = make_config(**flags)
            check_world(cfg, world_size)
        except ConfigError as e:
            raise SweepError(f"point {name}: {e}") from None
        points.append(Point(name, knobs, flags, cfg))
    return points


# ---------------------------------------------------------------------------------------------
# where each point stands
# ---------------------------------------------------------------------------------------------
def point_status(point: Point) -> str:
    """'finished' (its last epoch validated, backbone written), 'interrupted' (a checkpoint to
    continue from) or 'pending' (nothing yet)."""
    records = runlog.read_metrics(point.run_dir)
    last = records[-1] if records else {}
    if (last.get(runlog.EPOCH, 0) >= point.cfg.epochs and runlog.VAL_TOP1 in last
            and os.path.isfile(os.path.join(point.run_dir, "backbone.pth"))):
        return "finished"
    if os.path.isfile(os.path.join(point.run_dir, "checkpoint.pt")):
        return "interrupted"
    return "pending"


def write_point_records(points: list[Point], output_dir: str, spec: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    atomic.write_json(os.path.join(output_dir, SWEEP_NAME), spec)
    for point in points:
        os.makedirs(point.run_dir, exist_ok=True)
        atomic.write_json(os.path.join(point.run_dir, POINT_NAME), {
            "name": point.name, "knobs": point.knobs, "flags": point.flags,
            "train_argv": point.train_argv(), "config": to_dict(point.cfg)})
