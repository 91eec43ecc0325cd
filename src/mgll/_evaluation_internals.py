"""Private helpers of :mod:`mgll.evaluation`: input checks, and the linear probe's solvers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _ranking(name: str, scores: object, values: object, exclude: object) -> tuple[Tensor, Tensor]:
    for arg, t in (("scores", scores), (name, values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if scores.dim() != 2 or values.shape != scores.shape or scores.shape[1] == 0:
        raise ValueError(
            f"`scores` and `{name}` must have one (Q, N) shape with N >= 1, got "
            f"{tuple(scores.shape)} and {tuple(values.shape)}"
        )
    s, v = scores.detach().double(), values.detach().double()
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.shape != scores.shape:
            got = tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude).__name__
            raise ValueError(f"`exclude` must be a (Q, N) bool tensor like `scores`, got {got}")
        mask = exclude.bool()
        s = s.masked_fill(mask, -math.inf)
        v = v.masked_fill(mask, 0.0)
    return s, v


def _sets(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"`{name}` must be a 2-D multi-hot tensor (rows, C), got {got}")
    y = x.detach().double()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError(f"`{name}` must be 0/1, got values {torch.unique(y).tolist()[:5]}")
    return y


def _check_probe(x: object, y: object, xt: object) -> tuple[Tensor, Tensor, Tensor]:
    for name, t in (("train_features", x), ("train_targets", y), ("test_features", xt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(
            "`train_features` (n, D) and `train_targets` (n, C) must have the same n >= 2, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if xt.dim() != 2 or xt.shape[1] != x.shape[1]:
        raise ValueError(
            f"`test_features` must be (M, D={x.shape[1]}) like `train_features`, got "
            f"{tuple(xt.shape)}"
        )
    return x.detach().double(), _sets("train_targets", y), xt.detach().double()


def _check_grid(grid: object) -> tuple[float, ...]:
    values = tuple(float(v) for v in grid) if isinstance(grid, (list, tuple)) else ()
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(
            f"`l2_grid` must be a non-empty sequence of positive numbers, got {grid!r}"
        )
    return values


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), x.std(0, correction=0).clamp_min(1e-8)


def _fit(z: Tensor, y: Tensor, grid: Sequence[float], max_iter: int) -> tuple[Tensor, Tensor]:
    """One L-BFGS run over all grid values and classes at once (the objective separates)."""
    lam = torch.tensor(grid, dtype=torch.float64)[:, None, None]
    w = torch.zeros(len(grid), z.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(grid), 1, y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    n, d = z.shape
    target = y.repeat(1, len(grid))  # (n, L*C), grid value l in columns l*C .. l*C + C - 1

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w.permute(1, 0, 2).reshape(d, -1) + b.reshape(1, -1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
        loss = bce + (lam * w.pow(2)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()[:, 0]


def _fit_ridge(z: Tensor, y: Tensor, grid: Sequence[float], max_iter: int) -> tuple[Tensor, Tensor]:
    """Closed-form ridge for every grid value; z is standardised, so centring y fits the bias."""
    del max_iter
    n = z.shape[0]
    mean = y.mean(0)
    evals, evecs = torch.linalg.eigh(z.T @ z / n)
    proj = evecs.T @ (z.T @ (y - mean) / n)  # (D, C)
    lam = torch.tensor(grid, dtype=torch.float64)
    w = evecs[None] @ (proj[None] / (evals.clamp_min(0)[None, :, None] + lam[:, None, None]))
    return w, mean.expand(len(grid), -1).clone()


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x
