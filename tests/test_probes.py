"""Linear probes: the L-BFGS fit is scikit-learn's LogisticRegression; log-odds; transfer CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from trex_fast.probes import fit_lbfgs, fit_sgd, log_odds, per_class_split, probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n_per_class=40, classes=4, dim=12, seed=0, spread=1.5):
    """Gaussian classes around fixed centres; `seed` draws the samples (train vs test)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed))
    return x, y


def _objective(w, b, x, y, C):
    """scikit-learn's LogisticRegression objective: sum of CE + ||W||^2 / (2C)."""
    logits = x.double() @ w.t() + b
    return (torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            + (w * w).sum() / (2 * C)).item()


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_lbfgs_fit_equals_scikit_learn(C):
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs()
    test_x, test_y = _blobs(seed=1)
    ours = fit_lbfgs(x, y, C, num_classes=4)
    ref = sklearn.LogisticRegression(C=C, max_iter=10000, tol=1e-12).fit(
        x.double().numpy(), y.numpy())
    ref_w, ref_b = torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_)
    # the same objective, minimised at least as well, and the same solution up to flatness
    ours_obj, ref_obj = _objective(ours.weight, ours.bias, x, y, C), _objective(ref_w, ref_b, x,
                                                                                 y, C)
    assert ours_obj <= ref_obj * (1 + 1e-7) + 1e-9
    assert torch.allclose(ours.weight, ref_w, atol=5e-3, rtol=5e-3)
    sk_top1 = 100.0 * (ref.predict(test_x.double().numpy()) == test_y.numpy()).mean()
    assert ours.top1(test_x, test_y) == pytest.approx(sk_top1)


def test_probe_search_and_sgd_beat_chance_and_agree_with_sklearn_on_separable_data():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(spread=3.0)
    test_x, test_y = _blobs(seed=2, spread=3.0)
    result = probe(x, y, test_x, test_y, kind="lbfgs", trials=6)
    ref = sklearn.LogisticRegression(C=result["C"], max_iter=10000, tol=1e-12).fit(
        x.double().numpy(), y.numpy())
    assert result["top1"] == pytest.approx(
        100.0 * (ref.predict(test_x.double().numpy()) == test_y.numpy()).mean())
    sgd = fit_sgd(x, y, lr=1.0, wd=1e-6, num_classes=4, epochs=30)
    assert sgd.top1(test_x, test_y) > 90.0  # chance is 25 %


def test_per_class_split_takes_twenty_percent_of_each_class():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train_idx, val_idx = per_class_split(y)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(16))
    assert [int((y[val_idx] == c).sum()) for c in range(3)] == [2, 1, 0]


def test_log_odds_arithmetic():
    assert log_odds(50.0) == 0.0
    assert log_odds(75.0) == pytest.approx(math.log(3))
    assert log_odds(10.0) == pytest.approx(-math.log(9))
    assert math.isfinite(log_odds(100.0)) and math.isfinite(log_odds(0.0))


def test_transfer_command_end_to_end(tmp_path):
    from trex_fast.demo_data import write_dataset

    data = tmp_path / "textures"
    write_dataset(str(data), train_per_class=6, val_per_class=3)
    weights = tmp_path / "r18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cmd = [sys.executable, "-m", "trex_fast.eval", "transfer", f"--backbone={weights}",
           f"--datasets={data}", "--arch=resnet18", "--image_size=32", "--trials=3",
           "--seeds=1", f"--cache_dir={tmp_path / 'cache'}", f"--output_dir={tmp_path / 'out'}",
           "--num_workers=0", "--device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    top1 = report["top1"]["textures"]
    assert 0.0 <= top1 <= 100.0
    assert report["log_odds_mean"] == pytest.approx(log_odds(top1))
    assert "| textures |" in proc.stdout
    (backbone_cache,) = os.listdir(tmp_path / "cache")  # one folder per backbone
    assert len(os.listdir(tmp_path / "cache" / backbone_cache)) == 2  # train and val, cached
