"""Evaluation: checkpoint interop, export/import, k-NN, IN1K top-1 with the training head."""
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from tests.helpers import REPO
from trex_fast.eval.cli import knn_top1
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


@pytest.mark.parametrize("prefix, container", [
    ("module.", None), ("model.", "model"), ("module.encoder.", "state_dict"), ("", None)])
def test_prefixed_and_nested_keys_load(tmp_path, prefix, container):
    reference = torchvision.models.resnet18()
    weights = {prefix + k: v for k, v in reference.state_dict().items()}
    path = tmp_path / "released.pth"
    torch.save({container: weights, "epoch": 3} if container else weights, path)
    state = backbone_state(str(path), "resnet18")
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items()
               if not k.startswith("fc."))


def test_bad_path_and_mismatched_arch_fail_clearly(trained):
    root, _ = trained
    with pytest.raises(FileNotFoundError, match="--backbone='nope.pth': no such file"):
        backbone_state("nope.pth", "resnet18")
    with pytest.raises(ValueError, match="is --arch right"):  # resnet18 weights as resnet50
        backbone_state(str(root / "run" / "backbone.pth"), "resnet50")
    with pytest.raises(ValueError, match="does not fit --arch=resnet34|is --arch right"):
        backbone_state(str(root / "run" / "backbone.pth"), "resnet34")


def test_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    train, train_y = torch.randn(200, 16, generator=g), torch.randint(0, 5, (200,), generator=g)
    test, test_y = torch.randn(50, 16, generator=g), torch.randint(0, 5, (50,), generator=g)
    got = knn_top1(train, train_y, test, test_y, k=7, temperature=0.1, chunk=13)
    hits = 0
    tn = train / train.norm(dim=1, keepdim=True)
    for q, y in zip(test, test_y):
        sims = tn @ (q / q.norm())
        order = sims.argsort(descending=True)[:7]
        votes = [0.0] * 5
        for i in order.tolist():
            votes[int(train_y[i])] += float(torch.exp(sims[i] / 0.1))
        hits += int(max(range(5), key=lambda c: votes[c]) == int(y))
    assert got == pytest.approx(100.0 * hits / 50)
    # a separable case reaches 100 %
    assert knn_top1(torch.eye(4).repeat(3, 1), torch.arange(4).repeat(3), torch.eye(4),
                    torch.arange(4), k=3) == 100.0


def test_knn_command_end_to_end(trained):
    root, _ = trained
    proc = _eval("knn", f"--backbone={root / 'run' / 'backbone.pth'}", "--arch=resnet18",
                 f"--train={root / 'data' / 'train'}", f"--val={root / 'data' / 'val'}",
                 "--image_size=32", "--num_workers=0", "--device=cpu", "--k=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["eval"] == "knn" and 0.0 <= report["top1"] <= 100.0


def test_knn_matches_scikit_learn_weighted_neighbours():
    neighbors = pytest.importorskip("sklearn.neighbors")
    import numpy as np

    g = torch.Generator().manual_seed(1)
    train, train_y = torch.randn(300, 8, generator=g), torch.randint(0, 6, (300,), generator=g)
    test, test_y = torch.randn(80, 8, generator=g), torch.randint(0, 6, (80,), generator=g)
    ref = neighbors.KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute",
        weights=lambda dist: np.exp((1.0 - dist) / 0.07)).fit(train.double().numpy(),
                                                            train_y.numpy())
    expected = 100.0 * (ref.predict(test.double().numpy()) == test_y.numpy()).mean()
    assert knn_top1(train, train_y, test, test_y, k=20, temperature=0.07) == pytest.approx(
        expected)
