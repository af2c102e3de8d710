"""Weights-only loading (issue #18) at every entry point that takes a file: a crafted file never
runs code unless --trust_file=True; trex_fast's own checkpoints (the session's shared run) load
without it. The loader alone and the authors' formats: tests/unit/test_safe_load.py."""
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from tests._runs import EVERY_READ, run_config
from tests.helpers import REPO, WritesMarker
from trex_fast import train as train_cli
from trex_fast.checkpoint import load_checkpoint, rng_state, set_rng_state
from trex_fast.cli import parse_flags
from trex_fast.eval import cli as eval_cli
from trex_fast.eval.datasets import ImageList
from trex_fast.eval.export import ExportSettings, export
from trex_fast.eval.transfer import TransferSettings, cached_features, evaluate_transfer
from trex_fast.safe_load import UnsafeFileError, load_file
from trex_fast.train import run

ARCH_FLAGS = ["--preset=demo", "--warmup_epochs=0", "--arch=resnet18", "--batch_size=8",
              "--global_size=32", "--local_size=16", "--local_crops=2", "--memory_size=32",
              "--pr_hidden_dim=32", "--pr_bottleneck_dim=8", "--num_workers=0", "--device=cpu"]


def _config(root, out, **overrides):
    return run_config(root / "data", out, **EVERY_READ, **overrides)


@pytest.fixture
def trained(shared_run):
    """The session's shared run: (root, result) with root/data and root/run."""
    return shared_run


@pytest.fixture
def crafted(trained, tmp_path):
    """A backbone file and a checkpoint that are valid apart from a payload writing `marker`."""
    root, _ = trained
    marker = tmp_path / "marker"
    weights = torchvision.models.resnet18().state_dict()
    backbone = tmp_path / "crafted_backbone.pth"
    torch.save({"model": weights, "payload": WritesMarker(marker)}, backbone)
    ckpt = load_checkpoint(str(root / "run" / "checkpoint.pt"))
    checkpoint = tmp_path / "crafted_checkpoint.pt"
    torch.save({**ckpt, "payload": WritesMarker(marker)}, checkpoint)
    return {"marker": marker, "backbone": backbone, "checkpoint": checkpoint, "weights": weights}


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _assert_refused_in_one_line(proc, path, program):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert str(path) in errors[0] and "io.open" in errors[0]
    assert "--trust_file=True" in errors[0]


# ---------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------


def _one_error_line(capsys, program: str, call) -> str:
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_eval_and_train_report_an_empty_file_or_a_wrong_arch_in_one_line(trained, tmp_path,
                                                                         capsys):
    root, _ = trained
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    data = ["--num_workers=0", "--device=cpu", "--image_size=32",
            f"--train={root / 'data' / 'train'}", f"--val={root / 'data' / 'val'}"]
    line = _one_error_line(capsys, "trex_fast.eval", lambda: eval_cli.main(
        ["knn", f"--backbone={empty}", "--arch=resnet18", *data]))
    assert str(empty) in line and "empty" in line
    backbone = root / "run" / "backbone.pth"  # a resnet18
    line = _one_error_line(capsys, "trex_fast.eval", lambda: eval_cli.main(
        ["knn", f"--backbone={backbone}", "--arch=resnet50", *data]))
    assert str(backbone) in line and "--arch" in line
    line = _one_error_line(capsys, "trex_fast.train", lambda: train_cli.main(
        **parse_flags(ARCH_FLAGS), data=str(root / "data"), output_dir=str(tmp_path / "r"),
        resume=str(empty)))
    assert str(empty) in line and "empty" in line


# ---------------------------------------------------------------------------------------------
# the authors' release and trex_fast's own files
# ---------------------------------------------------------------------------------------------


def test_trex_fast_files_need_no_global_and_restore_the_rng_exactly(trained, tmp_path):
    root, _ = trained
    for name in ("checkpoint.pt", "backbone.pth"):
        path = root / "run" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], name
        torch.load(path, weights_only=True)  # plain torch, nothing allowed

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.standard_normal()  # a cached Gaussian in the numpy state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    set_rng_state(load_file(str(path)))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_a_checkpoint_from_before_weights_only_loads_only_with_trust_file(trained, tmp_path):
    root, _ = trained
    ckpt = load_checkpoint(str(root / "run" / "checkpoint.pt"))
    old = {**ckpt, "rng": {**ckpt["rng"], "numpy": np.random.get_state(),
                           "python": random.getstate()}}  # the layout before #18
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(UnsafeFileError, match="numpy"):
        load_checkpoint(str(path))
    loaded = load_checkpoint(str(path), trust_file=True)
    expected = (np.random.random(), random.random())
    set_rng_state(loaded["rng"])
    assert (np.random.random(), random.random()) == expected


# ---------------------------------------------------------------------------------------------
# every entry point that takes a file
# ---------------------------------------------------------------------------------------------
def test_eval_knn_refuses_a_crafted_backbone(trained, crafted):
    root, _ = trained
    proc = _cli("trex_fast.eval", "knn", f"--backbone={crafted['backbone']}", "--arch=resnet18",
                f"--train={root / 'data' / 'train'}", f"--val={root / 'data' / 'val'}",
                "--image_size=32", "--num_workers=0", "--device=cpu")
    _assert_refused_in_one_line(proc, crafted["backbone"], "trex_fast.eval")
    assert not crafted["marker"].exists()


def test_eval_in1k_refuses_a_crafted_checkpoint(trained, crafted):
    root, _ = trained
    proc = _cli("trex_fast.eval", "in1k", f"--checkpoint={crafted['checkpoint']}",
                f"--val={root / 'data' / 'val'}", "--num_workers=0", "--device=cpu")
    _assert_refused_in_one_line(proc, crafted["checkpoint"], "trex_fast.eval")
    assert not crafted["marker"].exists()


def test_eval_export_and_transfer_refuse_crafted_files(trained, crafted, tmp_path):
    root, _ = trained
    out = tmp_path / "out.pth"
    with pytest.raises(UnsafeFileError, match="crafted_checkpoint.pt"):
        export(ExportSettings(str(crafted["checkpoint"]), str(out)))
    with pytest.raises(UnsafeFileError, match="crafted_backbone.pth"):
        export(ExportSettings(str(crafted["backbone"]), str(out), arch="resnet18"))
    with pytest.raises(UnsafeFileError, match="crafted_backbone.pth"):
        evaluate_transfer(TransferSettings(str(crafted["backbone"]), (str(root / "data"),),
                                           arch="resnet18"))
    cache = tmp_path / "cache.pt"  # a feature cache someone else filled
    torch.save({"features": torch.ones(2, 4), "labels": torch.zeros(2),
                "payload": WritesMarker(crafted["marker"])}, cache)
    with pytest.raises(UnsafeFileError, match="cache.pt"):
        cached_features(None, ImageList([], None), str(cache), torch.device("cpu"), 2, 0)
    assert not out.exists() and not crafted["marker"].exists()


def test_eval_trust_file_flag_loads_the_crafted_checkpoint(crafted, tmp_path):
    out = tmp_path / "r18.pth"
    proc = _cli("trex_fast.eval", "export", f"--checkpoint={crafted['checkpoint']}",
                f"--out={out}", "--trust_file=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loading" in proc.stderr and "full pickle" in proc.stderr  # said out loud
    assert crafted["marker"].exists() and out.is_file()


def test_train_resume_refuses_a_crafted_checkpoint(trained, crafted, tmp_path):
    root, _ = trained
    proc = _cli("trex_fast.train", f"--data={root / 'data'}", f"--output_dir={tmp_path / 'r'}",
                f"--resume={crafted['checkpoint']}", "--epochs=1", *ARCH_FLAGS)
    _assert_refused_in_one_line(proc, crafted["checkpoint"], "trex_fast.train")
    assert not crafted["marker"].exists()


def test_train_resume_with_trust_file_loads_the_crafted_checkpoint(trained, crafted, tmp_path):
    root, result = trained
    with pytest.raises(UnsafeFileError):
        run(_config(root, tmp_path / "refused", resume=str(crafted["checkpoint"])))
    assert not crafted["marker"].exists()
    again = run(_config(root, tmp_path / "trusted", resume=str(crafted["checkpoint"]),
                        trust_file=True))  # the finished run, reported again
    assert crafted["marker"].exists()
    assert again["val_top1"] == pytest.approx(result["val_top1"], abs=1e-6)
