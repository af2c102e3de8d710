"""Linear probes on frozen features, the paper's transfer protocol (RECIPE.md "Evaluation").

Small datasets: multinomial logistic regression fitted by L-BFGS (up to 2,000 iterations) on
raw features, the objective of scikit-learn's LogisticRegression(C): sum_i CE_i + ||W||^2 / (2 C)
(bias not penalised); C searched log-uniform in [1e-5, 1e6]. Large datasets: SGD logistic
regression on L2-normalised features (lr in [0.1, 100], wd in [1e-12, 1e-4], batch 1024,
100 epochs, cosine stepped per epoch). Both searches are Optuna TPE, `trials` per dataset (30 in
the paper), each trial scored on a 20 % per-class validation split drawn from train with the
run's seed; the best is refitted on train + val and scores the test split. The split and the
sampler both follow the seed, so the paper averages seeds.
Score: top-1; the transfer average is the mean log-odds ln(p / (1 - p)).
"""
from __future__ import annotations

import math
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
    """(train indices, val indices): `fraction` of each class (at least one) goes to val."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    by_class = np.argsort(y, kind="stable")  # each class's indices ascending, classes in order
    _, starts, counts = np.unique(y[by_class], return_index=True, return_counts=True)
    train_idx, val_idx = [], []
    for start, count in zip(starts.tolist(), counts.tolist()):  # O(N log N), not O(N * C)
        members = by_class[start:start + count].copy()
        rng.shuffle(members)
        n_val = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    return torch.tensor(sorted(train_idx)), torch.tensor(sorted(val_idx))


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
        return 100.0 * (self.predict(x) == y).double().mean().item()


LBFGS_MAX_ITER = 2000  # the authors' cap
SGD_EPOCHS = 100
SGD_BATCH = 1024
TRIALS = 30  # Optuna trials per dataset (the paper's)


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, C: float, num_classes: int,
              max_iter: int = LBFGS_MAX_ITER) -> LinearModel:
    """sum_i CE_i + ||W||^2 / (2C) minimised by L-BFGS in float64 (scikit-learn's objective),
    on the device `x` lives on."""
    x = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device,
                    requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y, reduction="sum") + (w * w).sum() / (2 * C)
        loss.backward()
        return loss

    opt.step(closure)
    return LinearModel(w.detach(), b.detach())


def fit_sgd(x: torch.Tensor, y: torch.Tensor, lr: float, wd: float, num_classes: int,
            epochs: int = SGD_EPOCHS, batch_size: int = SGD_BATCH, seed: int = 0) -> LinearModel:
    """Logistic regression on L2-normalised features by SGD (momentum 0.9), the LR following a
    cosine stepped once per epoch (the authors' schedule), on the device `x` lives on."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(x.float(), dim=1)
    layer = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).to(x.device).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return LinearModel(layer.weight.detach(), layer.bias.detach(), normalize=True)


def _suggest(trial, kind: str) -> dict:
    if kind == "lbfgs":
        return {"C": trial.suggest_float("C", *C_RANGE, log=True)}
    if kind == "sgd":
        return {"lr": trial.suggest_float("lr", *SGD_LR_RANGE, log=True),
                "wd": trial.suggest_float("wd", *SGD_WD_RANGE, log=True)}
    raise ValueError(f"probe kind {kind!r}: accepted values are lbfgs, sgd")


def _fitter(kind: str, num_classes: int, sgd_epochs: int, seed: int):
    if kind == "lbfgs":
        return lambda x, y, h: fit_lbfgs(x, y, h["C"], num_classes)
    return lambda x, y, h: fit_sgd(x, y, h["lr"], h["wd"], num_classes, sgd_epochs, seed=seed)


def search(train_x: torch.Tensor, train_y: torch.Tensor, kind: str, num_classes: int,
           trials: int = TRIALS, seed: int = 0, sgd_epochs: int = SGD_EPOCHS) -> dict:
    """Optuna TPE over the probe's hyper-parameters (bounds above), each trial fitted on 80 %
    of each class of train and scored (top-1) on the other 20 %; split and sampler seeded.
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

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
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
