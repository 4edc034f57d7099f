"""Linear probe (CLIP paper, section 3.2): L2-regularised multinomial logistic regression on frozen image
features (standardised per dimension), the penalty chosen on a validation split, then refitted on train +
validation and scored on test.

The fit is full-batch L-BFGS in torch, so it runs on the CPU or a GPU alike. The objective is
    mean_i CE(x_i W + b, y_i) + (l2 / 2) * ||W||^2      (the bias is not penalised),
the same problem as scikit-learn's LogisticRegression with C = 1 / (l2 * n).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipline.config import LinearProbeConfig

log = logging.getLogger(__name__)


@dataclass
class LinearClassifier:
    weight: torch.Tensor
    """(d x classes)"""
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 300,
                 init: LinearClassifier | None = None, tol: float = 1e-5) -> LinearClassifier:
    """Minimise the penalised mean cross-entropy on (x, y) on x's device; ``init`` warm-starts the solver, which
    stops when no gradient entry exceeds ``tol`` (tighter than float32 features support only costs iterations)."""
    d = x.shape[1]
    weight = (init.weight.clone() if init else torch.zeros(d, n_classes, device=x.device, dtype=x.dtype))
    bias = (init.bias.clone() if init else torch.zeros(n_classes, device=x.device, dtype=x.dtype))
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-4, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearClassifier(weight.detach(), bias.detach())


def accuracy(clf: LinearClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((clf.logits(x).argmax(dim=1) == y).float().mean())


@dataclass
class ProbeResult:
    classifier: LinearClassifier
    l2: float
    """The penalty chosen on the validation split."""
    val_top1: float
    tried: dict[float, float]
    """Validation top-1 of every penalty tried."""


def sweep_l2(train_x, train_y, val_x, val_y, n_classes: int, cfg: LinearProbeConfig) -> tuple[float, dict]:
    """A log grid from strong to weak penalties (each fit warm-starts from the last), then rounds of halving
    the log step around the best so far. Ties go to the stronger penalty."""
    hi, lo = math.log10(cfg.l2_max), math.log10(cfg.l2_min)
    n = cfg.grid_points
    grid = [hi - i * (hi - lo) / (n - 1) for i in range(n)] if n > 1 else [(hi + lo) / 2]
    tried: dict[float, float] = {}
    warm = None

    def score(log_l2: float) -> float:
        nonlocal warm
        l2 = 10 ** log_l2
        if l2 not in tried:
            warm = fit_logistic(train_x, train_y, n_classes, l2, cfg.max_iter, init=warm)
            tried[l2] = accuracy(warm, val_x, val_y)
        return tried[l2]

    for g in grid:
        score(g)
    best = max(grid, key=lambda g: (score(g), g))
    step = (hi - lo) / (n - 1) if n > 1 else (hi - lo) / 2
    for _ in range(cfg.refine_steps):
        step /= 2
        candidates = [g for g in (best - step, best, best + step) if lo <= g <= hi]
        best = max(candidates, key=lambda g: (score(g), g))
    return 10 ** best, tried


def linear_probe(train_x, train_y, val_x, val_y, n_classes: int, cfg: LinearProbeConfig,
                 device: torch.device | str = "cpu") -> ProbeResult:
    """Choose the penalty on (val_x, val_y), then refit on train + val with it. The returned classifier takes
    raw features."""
    dev = torch.device(device)
    train_x, val_x = train_x.to(dev, torch.float32), val_x.to(dev, torch.float32)
    train_y, val_y = train_y.to(dev), val_y.to(dev)
    # Features of one model often share a large common direction, which makes the problem ill-conditioned for
    # L-BFGS; standardising each dimension (statistics of the training images only) removes that.
    all_x = torch.cat([train_x, val_x])
    mean, std = all_x.mean(dim=0), all_x.std(dim=0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    l2, tried = sweep_l2(train_x, train_y, val_x, val_y, n_classes, cfg)
    log.info("linear probe: l2 %.3g chosen (validation top-1 %.4f) from %s", l2, tried[l2], tried)
    clf = fit_logistic(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), n_classes, l2, cfg.max_iter)
    weight = clf.weight / std[:, None]
    return ProbeResult(LinearClassifier(weight, clf.bias - mean @ weight), l2, tried[l2], tried)


def holdout_split(n: int, proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train indices, validation indices); the validation part gets at least one sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(proportion * n)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
