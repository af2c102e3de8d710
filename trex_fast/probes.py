"""Linear probes on frozen features, the paper's transfer protocol (RECIPE.md "Evaluation").

Small datasets: multinomial logistic regression fitted by L-BFGS on raw features, the
objective of scikit-learn's LogisticRegression(C): sum_i CE_i + ||W||^2 / (2 C) (bias not
penalised); C searched log-uniform in [1e-5, 1e6] on a 20 % per-class validation split, then
refitted on train + val. Large datasets: SGD logistic regression on L2-normalised features
(lr in [0.1, 100], wd in [1e-12, 1e-4], batch 1024, cosine), searched the same way.
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
    train_idx, val_idx = [], []
    for c in torch.unique(labels).tolist():
        members = np.flatnonzero(labels.numpy() == c)
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


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, C: float, num_classes: int,
              max_iter: int = 1000) -> LinearModel:
    """sum_i CE_i + ||W||^2 / (2C) minimised by L-BFGS in float64 (scikit-learn's objective)."""
    x = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
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
            epochs: int = 100, batch_size: int = 1024, seed: int = 0) -> LinearModel:
    """Logistic regression on L2-normalised features by SGD (momentum 0.9), cosine LR."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(x.float(), dim=1)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return LinearModel(layer.weight.detach(), layer.bias.detach(), normalize=True)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    return np.logspace(math.log10(lo), math.log10(hi), n).tolist()


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
          test_y: torch.Tensor, kind: str = "lbfgs", grid_size: int = 12,
          sgd_epochs: int = 100) -> dict:
    """Search the hyper-parameter on a 20 % per-class split, refit on all of train, score test."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    fit_idx, val_idx = per_class_split(train_y)
    if kind == "lbfgs":
        candidates = [{"C": c} for c in log_grid(*C_RANGE, grid_size)]

        def fit(x, y, h):
            return fit_lbfgs(x, y, h["C"], num_classes)
    elif kind == "sgd":
        side = max(2, int(round(math.sqrt(grid_size))))
        candidates = [{"lr": lr, "wd": wd} for lr in log_grid(*SGD_LR_RANGE, side)
                      for wd in log_grid(*SGD_WD_RANGE, side)]

        def fit(x, y, h):
            return fit_sgd(x, y, h["lr"], h["wd"], num_classes, epochs=sgd_epochs)
    else:
        raise ValueError(f"probe kind {kind!r}: accepted values are lbfgs, sgd")
    scores = [fit(train_x[fit_idx], train_y[fit_idx], h).top1(train_x[val_idx], train_y[val_idx])
              for h in candidates]
    best = candidates[int(np.argmax(scores))]  # ties: the first (for L-BFGS the smallest C)
    model = fit(train_x, train_y, best)
    return {"kind": kind, **best, "val_top1": max(scores), "top1": model.top1(test_x, test_y)}
