"""Evaluation of the session's shared run: export/import, the k-NN command, IN1K top-1 with the
training head, a mismatched arch. Key layouts and k-NN's vote: tests/unit/test_eval.py."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from tests.helpers import REPO
from trex_fast.models.weights import backbone_state, load_backbone


@pytest.fixture
def trained(shared_run):
    """The session's shared run: (root, result) with root/data and root/run."""
    return shared_run


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "trex_fast.eval", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_in1k_with_the_training_head_matches_training_validation(trained):
    root, result = trained
    proc = _eval("in1k", f"--checkpoint={root / 'run' / 'checkpoint.pt'}",
                 f"--val={root / 'data' / 'val'}", "--num_workers=0", "--device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["images"] == 16
    assert report["top1"] == pytest.approx(result["val_top1"], abs=1e-6)
    assert report["top5"] >= report["top1"]


def test_export_then_import_gives_identical_features(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "r18.pth"
    proc = _eval("export", f"--checkpoint={root / 'run' / 'checkpoint.pt'}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bare = torchvision.models.resnet18()
    missing = bare.load_state_dict(torch.load(out), strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    from_ckpt = load_backbone(str(root / "run" / "checkpoint.pt"), "resnet18").eval()
    from_export = load_backbone(str(out), "resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(from_ckpt(x), from_export(x))


def test_bad_path_and_mismatched_arch_fail_clearly(trained):
    root, _ = trained
    with pytest.raises(FileNotFoundError, match="--backbone='nope.pth': no such file"):
        backbone_state("nope.pth", "resnet18")
    with pytest.raises(ValueError, match="is --arch right"):  # resnet18 weights as resnet50
        backbone_state(str(root / "run" / "backbone.pth"), "resnet50")
    with pytest.raises(ValueError, match="does not fit --arch=resnet34|is --arch right"):
        backbone_state(str(root / "run" / "backbone.pth"), "resnet34")


def test_knn_command_end_to_end(trained):
    root, _ = trained
    proc = _eval("knn", f"--backbone={root / 'run' / 'backbone.pth'}", "--arch=resnet18",
                 f"--train={root / 'data' / 'train'}", f"--val={root / 'data' / 'val'}",
                 "--image_size=32", "--num_workers=0", "--device=cpu", "--k=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["eval"] == "knn" and 0.0 <= report["top1"] <= 100.0


