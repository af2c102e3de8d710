"""Linear probes as the authors run them (scikit-learn's L-BFGS and its stopping rule, the SGD
init and schedule, the TPE settings, the val split); log-odds. The transfer CLI end to end:
tests/e2e/test_transfer.py."""
import math
import warnings

import pytest
import torch

from trex_fast.eval.probes import (
    C_RANGE,
    SGD_LR_RANGE,
    SGD_WD_RANGE,
    fit_lbfgs,
    fit_sgd,
    lbfgs_tol,
    log_odds,
    per_class_split,
    probe,
    search,
    sgd_epoch_lrs,
)


def _blobs(n_per_class=40, classes=4, dim=12, seed=0, spread=1.5):
    """Gaussian classes around fixed centres; `seed` draws the samples (train vs test)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed))
    return x, y


def _authors_logistic_regression(C, n, tighter=1.0):
    """scikit-learn's LogisticRegression as the authors' transfer code builds it, tol 1e-4 on
    their scikit-learn's objective (sum over the n images; 1.4 and later average it)."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    averaged = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 4)
    tol = 1e-4 * tighter / (n if averaged else 1)
    return LogisticRegression(C=C, solver="lbfgs", max_iter=2000, tol=tol)


def _fit_predict(estimator, x, y, test_x):
    return torch.from_numpy(estimator.fit(x.double().numpy(), y.numpy())
                            .predict(test_x.double().numpy()))


# near-separable: 10 points per class in 32-d, so at weak regularisation the optimum is far
# away and where the solver stops decides the predictions (torch L-BFGS to a tight tolerance
# agreed with the authors' scikit-learn settings on 98.5 % of the test points at C = 1e5)
FIXED = {"n_per_class": 10, "classes": 4, "dim": 32, "spread": 0.5}


@pytest.mark.parametrize("C", [1e-3, 1.0, 1e2, 1e5])
def test_lbfgs_predictions_equal_scikit_learn_with_the_authors_settings(C):
    x, y = _blobs(**FIXED)
    test_x, test_y = _blobs(**{**FIXED, "n_per_class": 50}, seed=1)
    ours = fit_lbfgs(x, y, C).predict(test_x)
    assert torch.equal(ours, _fit_predict(_authors_logistic_regression(C, len(y)), x, y, test_x))
    if C == 1e5:  # the feature set tells stopping rules apart: a tighter tol predicts otherwise
        tighter = _authors_logistic_regression(C, len(y), tighter=1e-5)
        assert not torch.equal(ours, _fit_predict(tighter, x, y, test_x))


def test_lbfgs_binary_problem_predicts_as_scikit_learn():
    x, y = _blobs(**{**FIXED, "classes": 2})
    test_x, _ = _blobs(**{**FIXED, "classes": 2, "n_per_class": 50}, seed=1)
    ours = fit_lbfgs(x, y + 3, 1e5).predict(test_x)  # labels 3, 4: not 0..C-1
    ref = _authors_logistic_regression(1e5, len(y))
    assert torch.equal(ours, _fit_predict(ref, x, y + 3, test_x))


def test_probe_search_and_sgd_beat_chance_and_agree_with_sklearn_on_separable_data():
    x, y = _blobs(spread=3.0)
    test_x, test_y = _blobs(seed=2, spread=3.0)
    result = probe(x, y, test_x, test_y, kind="lbfgs", trials=6)
    sk = _fit_predict(_authors_logistic_regression(result["C"], len(y)), x, y, test_x)
    assert result["top1"] == pytest.approx(100.0 * (sk == test_y).double().mean().item())
    sgd = fit_sgd(x, y, lr=1.0, wd=1e-6, num_classes=4, epochs=30)
    assert sgd.top1(test_x, test_y) > 90.0  # chance is 25 %


def test_lbfgs_tol_keeps_the_authors_gradient_test_across_scikit_learn_versions():
    """scikit-learn 1.4 averaged the objective over the n images: tol scales by 1 / n."""
    assert lbfgs_tol(500, "1.3.2") == 1e-4
    assert lbfgs_tol(500, "1.4.0") == pytest.approx(2e-7)
    assert lbfgs_tol(500, "1.9.1") == pytest.approx(2e-7)
    assert lbfgs_tol(500, "1.4rc1") == pytest.approx(2e-7)  # pre-releases and dev builds
    assert lbfgs_tol(500, "1.10.dev0") == pytest.approx(2e-7)


def test_sgd_starts_from_the_linear_default_init():
    x, y = _blobs()
    start = fit_sgd(x, y, lr=1.0, wd=0.0, num_classes=4, epochs=0, seed=5)
    torch.manual_seed(5)
    default = torch.nn.Linear(12, 4)  # U(-1/sqrt(12), 1/sqrt(12)), weight and bias
    assert torch.equal(start.weight, default.weight) and torch.equal(start.bias, default.bias)
    assert start.weight.abs().min() > 0 and start.bias.abs().min() > 0
    other = fit_sgd(x, y, lr=1.0, wd=0.0, num_classes=4, epochs=0, seed=6)
    assert not torch.equal(start.weight, other.weight)


def test_sgd_lr_per_epoch_follows_the_authors_schedule(monkeypatch):
    """Epoch 0 at lr; after epoch e the LR becomes lr * (1 + cos(pi e / epochs)) / 2."""
    lr, epochs = 2.0, 4
    expected = [2.0, 2.0, 1.0 + math.cos(math.pi / 4), 1.0]
    assert sgd_epoch_lrs(lr, epochs) == pytest.approx(expected)
    seen = []
    step = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    x, y = _blobs(n_per_class=5)  # 20 images, one batch per epoch
    fit_sgd(x, y, lr=lr, wd=0.0, num_classes=4, epochs=epochs, batch_size=32)
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("kind, joint", [("sgd", True), ("lbfgs", False)])
def test_search_samples_as_the_authors_tpe(kind, joint):
    """The SGD search is multivariate TPE with groups, the L-BFGS one univariate, set
    explicitly (optuna's default changed across versions): the trials' parameters equal those
    of a study with the authors' sampler and the same objective."""
    optuna = pytest.importorskip("optuna")
    x, y = _blobs(n_per_class=10)
    trials, epochs = 13, 2  # past TPE's 10 random start-up trials
    fit_idx, val_idx = per_class_split(y, seed=0)

    def params_of(sampler):
        def objective(trial):
            if kind == "lbfgs":
                model = fit_lbfgs(x[fit_idx], y[fit_idx], trial.suggest_float(
                    "C", *C_RANGE, log=True))
            else:
                model = fit_sgd(x[fit_idx], y[fit_idx], trial.suggest_float(
                    "lr", *SGD_LR_RANGE, log=True), trial.suggest_float(
                    "wd", *SGD_WD_RANGE, log=True), 4, epochs)
            return model.top1(x[val_idx], y[val_idx])

        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=trials)
        return [t.params for t in study.trials]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        authors = params_of(optuna.samplers.TPESampler(multivariate=joint, group=joint,
                                                       seed=0))
    ours = [p for p, _ in search(x, y, kind, 4, trials=trials, seed=0,
                                 sgd_epochs=epochs)["trials"]]
    assert ours == authors
    if joint:  # the setting matters here: univariate TPE proposes other points
        assert params_of(optuna.samplers.TPESampler(multivariate=False, seed=0)) != authors


def test_runs_record_the_scikit_learn_version_the_probe_stopped_with():
    sklearn = pytest.importorskip("sklearn")
    from trex_fast.runlog import library_versions

    assert library_versions()["scikit-learn"] == sklearn.__version__


def test_per_class_split_takes_twenty_percent_of_each_class():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train_idx, val_idx = per_class_split(y)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(16))
    assert [int((y[val_idx] == c).sum()) for c in range(3)] == [2, 1, 0]


def test_per_class_split_floors_as_the_authors():
    """floor(0.2 n), at least 1: 8 -> 1, 13 -> 2, 3 -> 1 (rounding gave 2, 3, 1)."""
    y = torch.tensor([0] * 8 + [1] * 13 + [2] * 3)
    _, val_idx = per_class_split(y, seed=4)
    assert [int((y[val_idx] == c).sum()) for c in range(3)] == [1, 2, 1]


def test_log_odds_arithmetic():
    assert log_odds(50.0) == 0.0
    assert log_odds(75.0) == pytest.approx(math.log(3))
    assert log_odds(10.0) == pytest.approx(-math.log(9))
    assert math.isfinite(log_odds(100.0)) and math.isfinite(log_odds(0.0))
