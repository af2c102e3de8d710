"""Linear probes on frozen features, the paper's transfer protocol (RECIPE.md "Evaluation").

Both probes follow the authors' public transfer code (naver/trex, transfer/): their solver, its
stopping rule, their initialisation, schedule and sampler settings.
Small datasets: scikit-learn's LogisticRegression on raw features, lbfgs, at most 2,000
iterations, tol 1e-4 on the objective of the authors' scikit-learn (the stopping rule: at weak
regularisation the optimum is far, so where the solver stops decides the predictions); C
searched log-uniform in [1e-5, 1e6].
Large datasets: SGD logistic regression on L2-normalised features (lr in [0.1, 100], wd in
[1e-12, 1e-4], momentum 0.9, batch 1024, 100 epochs) from torch.nn.Linear's default init, the
cosine LR set after each epoch from that epoch's index (so epochs 0 and 1 both run at lr).
Both searches are Optuna TPE, `trials` per dataset (30 in the paper), multivariate with groups
for SGD and univariate for C; each trial is scored on a per-class validation split of
floor(0.2 n) images (at least 1) drawn from train with the run's seed; the best is refitted on
train + val and scores the test split. The split and the sampler both follow the seed, so the
paper averages seeds.
Score: top-1; the transfer average is the mean log-odds ln(p / (1 - p)).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

C_RANGE = (1e-5, 1e6)
SGD_LR_RANGE = (0.1, 100.0)
SGD_WD_RANGE = (1e-12, 1e-4)


def log_odds(top1_percent: float, eps: float = 1e-6) -> float:
    """ln(p / (1 - p)) for p = top-1 in [0, 1], clipped away from 0 and 1."""
    p = min(max(top1_percent / 100.0, eps), 1 - eps)
    return math.log(p / (1 - p))


def per_class_split(labels: torch.Tensor, fraction: float = 0.2,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): floor(`fraction` * n) of each class's n images (at least
    one, none of a single-image class) go to val, as the authors' split does."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    by_class = np.argsort(y, kind="stable")  # each class's indices ascending, classes in order
    _, starts, counts = np.unique(y[by_class], return_index=True, return_counts=True)
    train_idx, val_idx = [], []
    for start, count in zip(starts.tolist(), counts.tolist()):  # O(N log N), not O(N * C)
        members = by_class[start:start + count].copy()
        rng.shuffle(members)
        n_val = max(1, int(fraction * len(members))) if len(members) > 1 else 0
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    return torch.tensor(sorted(train_idx)), torch.tensor(sorted(val_idx))


def _top1(predicted: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (predicted == y).double().mean().item()


@dataclass
class LinearModel:
    weight: torch.Tensor  # [C, F]
    bias: torch.Tensor  # [C]
    normalize: bool = False  # L2-normalise inputs first (the SGD probe)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.normalize:
            x = F.normalize(x, dim=1)
        return (x @ self.weight.t() + self.bias).argmax(1)

    def top1(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return _top1(self.predict(x), y)


@dataclass
class SklearnModel:
    """A fitted scikit-learn classifier behind the probes' interface: its own predict (the
    authors' predictions, binary problems and classes absent from the fit included)."""
    estimator: object

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        # float64 as the fit: the same decision values as the authors' float32 input upcast
        labels = self.estimator.predict(x.detach().cpu().double().numpy())
        return torch.from_numpy(labels).to(x.device)

    def top1(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return _top1(self.predict(x), y)


LBFGS_MAX_ITER = 2000  # the authors' cap
LBFGS_TOL = 1e-4  # scikit-learn's default, which the authors keep: the stopping rule (lbfgs_tol)
SGD_EPOCHS = 100
SGD_BATCH = 1024
TRIALS = 30  # Optuna trials per dataset (the paper's)


def _sklearn():
    try:
        import sklearn
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ImportError("the L-BFGS probe is scikit-learn's LogisticRegression: pip install "
                          "'trex_fast[eval]' (or scikit-learn)") from e
    return LogisticRegression, ConvergenceWarning, sklearn.__version__


def lbfgs_tol(n_samples: int, sklearn_version: str) -> float:
    """The `tol` that stops where the authors' scikit-learn (<= 1.3, 2022-23) stopped with
    tol 1e-4. Up to 1.3 lbfgs minimised sum_i CE_i + ||W||^2 / (2C); 1.4 (PR #26721) divides
    that objective, and so the gradient that `tol` bounds, by n: the same gradient test is
    tol 1e-4 / n there (measured: the same test predictions as 1.3.2, docs/TRANSFER.md)."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", sklearn_version).groups())
    return LBFGS_TOL / n_samples if (major, minor) >= (1, 4) else LBFGS_TOL


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, C: float, *,
              max_iter: int = LBFGS_MAX_ITER) -> SklearnModel:
    """scikit-learn's LogisticRegression(C) with the authors' settings (L2 penalty, lbfgs,
    `max_iter`, tol 1e-4 on their objective: lbfgs_tol), fitted on the CPU in float64 (as
    scikit-learn's lbfgs of the authors' time converted its input; today's keeps float32
    input in float32): it minimises sum_i CE_i + ||W||^2 / (2C) (bias not penalised)."""
    LogisticRegression, ConvergenceWarning, version = _sklearn()
    estimator = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter,
                                   tol=lbfgs_tol(len(y), version))
    with warnings.catch_warnings():  # stopping at max_iter is the protocol, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(x.detach().cpu().double().numpy(), y.detach().cpu().numpy())
    return SklearnModel(estimator)


def sgd_epoch_lrs(lr: float, epochs: int) -> list[float]:
    """The LR each epoch trains at, as the authors set it: epoch 0 at `lr`, then after epoch e
    the cosine of e / epochs, so epoch k >= 1 runs at lr * (1 + cos(pi (k - 1) / epochs)) / 2."""
    return [lr * 0.5 * (1.0 + math.cos(math.pi * max(k - 1, 0) / epochs))
            for k in range(epochs)]


def linear_default(num_features: int, num_classes: int, seed: int) -> torch.nn.Linear:
    """torch.nn.Linear with its own default init (U(+-1/sqrt(F)) weight and bias), the authors'
    starting point, drawn on the CPU from `seed` without touching the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(num_features, num_classes)


def fit_sgd(x: torch.Tensor, y: torch.Tensor, lr: float, wd: float, num_classes: int,
            epochs: int = SGD_EPOCHS, batch_size: int = SGD_BATCH, seed: int = 0) -> LinearModel:
    """Logistic regression on L2-normalised features by SGD (momentum 0.9) from the Linear
    default init, the LR per epoch from sgd_epoch_lrs, on the device `x` lives on. (The
    authors also stop at a non-finite loss; with unit-norm inputs each step's gradient has
    norm at most 2 (weight and bias together), so within the lr range the loss stays finite:
    not checked per step, which would sync with the host every batch.)"""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(x.float(), dim=1)
    layer = linear_default(x.shape[1], num_classes, seed).to(x.device)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    for epoch_lr in sgd_epoch_lrs(lr, epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr
        for idx in torch.randperm(x.shape[0], generator=g).to(x.device).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
    return LinearModel(layer.weight.detach(), layer.bias.detach(), normalize=True)


def tpe_sampler(kind: str, seed: int):
    """The authors' Optuna sampler: TPE, multivariate with groups for the SGD probe's (lr, wd),
    univariate for the L-BFGS probe's C; seeded. Both set explicitly: recent optuna (5.1)
    defaults to multivariate, the versions of the authors' time to univariate."""
    import optuna

    joint = kind == "sgd"
    with warnings.catch_warnings():  # optuna flags multivariate/group as experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=joint, group=joint, seed=seed)


def _suggest(trial, kind: str) -> dict:
    if kind == "lbfgs":
        return {"C": trial.suggest_float("C", *C_RANGE, log=True)}
    if kind == "sgd":
        return {"lr": trial.suggest_float("lr", *SGD_LR_RANGE, log=True),
                "wd": trial.suggest_float("wd", *SGD_WD_RANGE, log=True)}
    raise ValueError(f"probe kind {kind!r}: accepted values are lbfgs, sgd")


def _fitter(kind: str, num_classes: int, sgd_epochs: int, seed: int):
    if kind == "lbfgs":
        return lambda x, y, h: fit_lbfgs(x, y, h["C"])
    return lambda x, y, h: fit_sgd(x, y, h["lr"], h["wd"], num_classes, sgd_epochs, seed=seed)


def search(train_x: torch.Tensor, train_y: torch.Tensor, kind: str, num_classes: int,
           trials: int = TRIALS, seed: int = 0, sgd_epochs: int = SGD_EPOCHS) -> dict:
    """Optuna TPE (tpe_sampler) over the probe's hyper-parameters (bounds above), each trial
    fitted on per_class_split's train part and scored (top-1) on its val part; split and
    sampler seeded.
    Returns {"best": params, "val_top1": best score, "trials": [(params, score), ...]}."""
    try:
        import optuna
    except ImportError as e:
        raise ImportError("the transfer probes search with optuna: pip install "
                          "'trex_fast[eval]' (or optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fit_idx, val_idx = per_class_split(train_y.cpu(), seed=seed)
    fit_idx, val_idx = fit_idx.to(train_x.device), val_idx.to(train_x.device)
    fit = _fitter(kind, num_classes, sgd_epochs, seed)

    def objective(trial) -> float:
        model = fit(train_x[fit_idx], train_y[fit_idx], _suggest(trial, kind))
        return model.top1(train_x[val_idx], train_y[val_idx])

    study = optuna.create_study(direction="maximize", sampler=tpe_sampler(kind, seed))
    study.optimize(objective, n_trials=trials)
    # ties: the earliest trial (optuna's best_trial keeps the first maximum)
    return {"best": dict(study.best_trial.params), "val_top1": study.best_value,
            "trials": [(dict(t.params), t.value) for t in study.trials]}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
          test_y: torch.Tensor, kind: str = "lbfgs", trials: int = TRIALS, seed: int = 0,
          sgd_epochs: int = SGD_EPOCHS) -> dict:
    """One seed of the protocol: search on the seeded 20 % split, refit the best on all of
    train (train + val), score test. Features may live on any device."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    found = search(train_x, train_y, kind, num_classes, trials, seed, sgd_epochs)
    model = _fitter(kind, num_classes, sgd_epochs, seed)(train_x, train_y, found["best"])
    return {"kind": kind, "seed": seed, **found["best"], "val_top1": found["val_top1"],
            "top1": model.top1(test_x, test_y)}
