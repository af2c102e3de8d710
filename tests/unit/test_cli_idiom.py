"""One CLI idiom (issue #23 item 2): every command's flags, --help and errors come from its
frozen dataclass through trex_fast.cli. Unit tests: no training, no subprocess."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import sys

import pytest

from tests.helpers import REPO  # noqa: E402
from trex_fast import train
from trex_fast.cli import FlagError, command, flag, make_settings, required, run_cli
from trex_fast.config import Config
from trex_fast.eval import cli as eval_cli
from trex_fast.eval.export import ExportSettings
from trex_fast.eval.in1k import In1kSettings
from trex_fast.eval.knn import KnnSettings
from trex_fast.eval.transfer import TransferSettings
from trex_fast.sweep import cli as sweep_cli


def _convert_tool():
    spec = importlib.util.spec_from_file_location("convert_in1k_tool",
                                                  os.path.join(REPO, "tools", "convert_in1k.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (program, entry point, its dataclass, argv before the flags, the flags a run needs, a flag to
# mistype and the name it is close to, a flag to give a wrong type and what the line says)
CONVERT = _convert_tool()
CLIS = {
    "train": ("trex_fast.train", train.main, Config, [], {}, "epochz", "epochs",
              ("lr", "fast", "expected a number")),
    "in1k": ("trex_fast.eval", eval_cli.COMMANDS["in1k"], In1kSettings, ["in1k"],
             {"checkpoint": "c.pt", "val": "v"}, "batch_sise", "batch_size",
             ("batch_size", 1.5, "expected an integer")),
    "knn": ("trex_fast.eval", eval_cli.COMMANDS["knn"], KnnSettings, ["knn"],
            {"backbone": "b.pth", "train": "t", "val": "v"}, "temprature", "temperature",
            ("k", "many", "expected an integer")),
    "transfer": ("trex_fast.eval", eval_cli.COMMANDS["transfer"], TransferSettings,
                 ["transfer"], {"backbone": "b.pth", "datasets": "dtd"}, "seed", "seeds",
                 ("in1k_top1", "high", "expected a number")),
    "export": ("trex_fast.eval", eval_cli.COMMANDS["export"], ExportSettings, ["export"],
               {"checkpoint": "c.pt", "out": "o.pth"}, "arc", "arch",
               ("trust_file", "yes", "expected True or False")),
    "sweep": ("trex_fast.sweep", sweep_cli.main, sweep_cli.SweepSettings, [],
              {"output_dir": "s"}, "gird", "grid", ("parallel", "two", "expected an integer")),
    "convert": ("convert_in1k", CONVERT.main, CONVERT.ConvertOptions, [],
                {"src": "s", "dst": "d"}, "formts", "formats",
                ("jpeg_quality", "high", "expected an integer")),
}


def _one_line(capsys, program: str, fn) -> str:
    with pytest.raises(SystemExit) as info:
        fn()
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("name", list(CLIS))
def test_signature_and_help_come_from_the_dataclass_and_list_every_flag(name, capsys,
                                                                        monkeypatch):
    program, main, settings, argv, *_ = CLIS[name]
    fields = dataclasses.fields(settings)
    params = inspect.signature(main).parameters
    assert [p for p in params if p != "unknown"] == [f.name for f in fields]
    for f in fields:  # the default a user sees is the dataclass's (preset's depends on --data)
        if f.default is not dataclasses.MISSING and f.name != "preset" \
                and not f.metadata.get("required"):
            default = params[f.name].default
            shown = ",".join(f.default) if isinstance(f.default, tuple) \
                and all(isinstance(v, str) for v in f.default) else f.default
            assert default == shown, f.name
    monkeypatch.setenv("PAGER", "cat")
    with pytest.raises(SystemExit) as info:
        run_cli({argv[0]: main} if argv else main, [*argv, "--help"])
    assert info.value.code == 0
    shown = capsys.readouterr()
    shown = shown.out + shown.err
    for f in fields:
        assert f"{f.name}: {f.metadata['help'][:40]}" in shown, f.name
        assert f"--{f.name}=" in shown, f.name


@pytest.mark.parametrize("name", list(CLIS))
def test_an_unknown_flag_is_one_line_with_close_matches(name, capsys):
    program, main, _, _, needed, typo, meant, _ = CLIS[name]
    line = _one_line(capsys, program, lambda: main(**needed, **{typo: 1}))
    assert f"--{typo}." in line and f"Did you mean --{meant}" in line


@pytest.mark.parametrize("name", list(CLIS))
def test_a_wrong_type_is_one_line_naming_the_flag_and_what_it_accepts(name, capsys):
    program, main, _, _, needed, _, _, (bad, value, accepted) = CLIS[name]
    line = _one_line(capsys, program, lambda: main(**{**needed, bad: value}))
    assert f"--{bad}={value!r}: {accepted}" in line


@pytest.mark.parametrize("name", ["in1k", "knn", "export", "convert"])
def test_a_missing_required_flag_is_one_line_naming_it(name, capsys):
    program, main, settings, _, needed, *_ = CLIS[name]
    missing = next(iter(needed))
    line = _one_line(capsys, program, lambda: main(**{k: v for k, v in needed.items()
                                                      if k != missing}))
    assert f"--{missing} is required" in line


@dataclasses.dataclass(frozen=True)
class _Toy:
    path: str = required("where")
    names: tuple[str, ...] = flag(("a", "b"), "some names")
    limit: int | None = flag(None, "an optional limit")
    rate: float = flag(0.5, "a rate")


def test_the_helper_reads_lists_optionals_and_refuses_what_it_cannot(monkeypatch, capsys):
    s = make_settings(_Toy, {"path": "p", "names": ("x", 3), "limit": None, "rate": 1})
    assert s == _Toy("p", ("x", "3"), None, 1.0) and isinstance(s.rate, float)
    assert make_settings(_Toy, {"path": "p", "names": "c,d"}).names == ("c", "d")
    with pytest.raises(FlagError, match=r"--rate=inf: must be a finite number"):
        make_settings(_Toy, {"path": "p", "rate": float("inf")})
    with pytest.raises(FlagError, match=r"--limit='x': expected an integer"):
        make_settings(_Toy, {"path": "p", "limit": "x"})
    runs = []
    main = command(_Toy, runs.append, "toy", "A toy command.")
    monkeypatch.setitem(sys.modules, "fire", None)  # the stand-in parser reads the same flags
    run_cli(main, ["--path=q", "--names=e,f"])
    assert runs == [_Toy("q", ("e", "f"))]
    line = _one_line(capsys, "toy", lambda: run_cli(main, ["--pth=q"]))
    assert "unknown flag --pth. Did you mean --path?" in line
