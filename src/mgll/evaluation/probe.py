r"""The linear probe: logistic (or ridge) regression on frozen, standardised features, its L2
strength chosen by cross-validation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mgll.evaluation._finite import finite
from mgll.evaluation.auroc import macro_auroc
from mgll.evaluation.retrieval import label_sets

__all__ = ["linear_probe", "linear_probe_auroc"]

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

_SOLVERS = ("logistic", "ridge")


def linear_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 5,
    max_iter: int = 100,
    seed: int = 0,
    solver: str = "logistic",
) -> dict[str, object]:
    r"""Multi-label linear probe on frozen features, L2 strength by cross-validation.

    Protocol:

    1. Standardise every feature with the mean and standard deviation of the probe (train)
       set, :math:`z = (x - \mu) / \sigma` (:math:`\sigma` floored at 1e-8); the test features
       get the same transform.
    2. For each class c fit :math:`w_c, b_c` minimising

       .. math::
           \frac1n\sum_{i=1}^n \mathrm{BCE}\big(z_i^\top w_c + b_c,\ y_{ic}\big)
           + \lambda\,\lVert w_c\rVert^2

       (the bias is not penalised; scikit-learn's ``LogisticRegression(C=1 / (2 n λ))``
       minimises the same function), with L-BFGS (strong Wolfe line search) in float64.
       ``solver="ridge"`` instead minimises the squared error in closed form,

       .. math::
           \frac1n\sum_{i=1}^n \big(z_i^\top w_c + b_c - y_{ic}\big)^2 + \lambda\,\lVert w_c\rVert^2
           \ \Rightarrow\ w_c = (Z^\top Z / n + \lambda I)^{-1} Z^\top (y_c - \bar y_c) / n,
           \quad b_c = \bar y_c

       (one eigendecomposition per fold serves the whole grid: hundreds of times faster, for
       when many models must be probed on a small CPU budget; AUROC needs only the ranking).
    3. :math:`\lambda` is one value for all classes, chosen from ``l2_grid`` by ``folds``-fold
       cross-validation on the probe set: the folds come from a permutation seeded by
       ``seed``; each fold is standardised on its own training part; the out-of-fold scores
       of all folds are pooled and the :math:`\lambda` with the highest :func:`macro_auroc`
       wins (ties: the larger :math:`\lambda`).  The model is then refit on the whole probe set.

    Args:
        train_features: the probe set's frozen features.
        train_targets: its 0/1 multi-label ground truth.
        test_features: the features to score.
        l2_grid: candidate :math:`\lambda` values, positive.
        folds: number of cross-validation folds, at least 2 (reduced to n when n is smaller).
        max_iter: L-BFGS iterations per fit.
        seed: seeds the fold assignment.
        solver: ``"logistic"`` (default) or ``"ridge"``.

    Shape:
        - train_features: (n, D); train_targets: (n, C); test_features: (M, D)

    Returns:
        ``{"scores": (M, C) float64 logits, "l2": the chosen λ, "cv_auroc": {λ: pooled
        out-of-fold macro AUROC}}``.

    Raises:
        ValueError: mismatched shapes, fewer than 2 probe samples, non-finite features, an
            empty or non-positive grid, ``folds < 2`` or an unknown ``solver``.
        TypeError: non-tensor input.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(60, 4, generator=g)
        >>> y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], dim=1)
        >>> fit = linear_probe(x, y, x, l2_grid=(1e-3, 1.0), folds=3)
        >>> fit["scores"].shape, fit["l2"] in (1e-3, 1.0)
        (torch.Size([60, 2]), True)
        >>> macro_auroc(fit["scores"], y) > 0.95
        True
    """
    x, y, xt = _check_probe(train_features, train_targets, test_features)
    grid = _check_grid(l2_grid)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds!r}")
    if solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {_SOLVERS}, got {solver!r}")
    fit = _fit if solver == "logistic" else _fit_ridge
    n = x.shape[0]
    k = min(folds, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[perm] = torch.arange(n) % k
    oof = torch.zeros(len(grid), n, y.shape[1], dtype=torch.float64)
    for f in range(k):
        tr, va = fold_of != f, fold_of == f
        mu, sigma = _moments(x[tr])
        w, b = fit(((x[tr] - mu) / sigma), y[tr], grid, max_iter)
        oof[:, va] = torch.einsum("nd,ldc->lnc", (x[va] - mu) / sigma, w) + b[:, None]
    cv = {lam: macro_auroc(oof[j], y) for j, lam in enumerate(grid)}
    best = max(grid, key=lambda lam: (_nan_low(cv[lam]), lam))
    mu, sigma = _moments(x)
    w, b = fit((x - mu) / sigma, y, (best,), max_iter)
    scores = ((xt - mu) / sigma) @ w[0] + b[0]
    return {"scores": scores, "l2": best, "cv_auroc": cv}


def linear_probe_auroc(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    fraction: float = 1.0,
    seed: int = 0,
    **kwargs,
) -> float:
    r"""Held-out macro AUROC of :func:`linear_probe` fitted on a ``fraction`` of the probe set.

    .. math::
        \text{AUROC} = \operatorname{macro}\Big(\text{probe}_{S}(X_{\text{test}}),\ Y_{\text{test}}\Big),
        \qquad S = \text{the first } \max(2, \operatorname{round}(f\,n))
        \text{ of a permutation seeded by } \texttt{seed}

    so that the subsets of one seed are nested (the 1 % set lies inside the 10 % set),
    as medical-imaging papers report probes on 1 %, 10 % and 100 % of the labels.

    Args:
        train_features, train_targets, test_features: as for :func:`linear_probe`.
        test_targets: (M, C) 0/1 ground truth of the test features.
        fraction: the share of the probe set used, in (0, 1].
        seed: seeds the subset and the cross-validation folds.
        **kwargs: ``l2_grid``, ``folds``, ``max_iter``, ``solver`` of :func:`linear_probe`.

    Returns:
        The macro AUROC over the test classes with a positive and a negative (a float).

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> x = torch.randn(200, 3, generator=g)
        >>> y = torch.stack([x[:, 0] > 0.5, x[:, 1] < 0], dim=1)
        >>> linear_probe_auroc(x[:100], y[:100], x[100:], y[100:], fraction=0.2) > 0.9
        True
    """
    if isinstance(fraction, bool) or not (
        isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0
    ):
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
    _check_probe(train_features, train_targets, test_features)
    n = train_features.shape[0]
    size = min(n, max(2, round(fraction * n)))
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    fit = linear_probe(
        train_features[subset], train_targets[subset], test_features, seed=seed, **kwargs
    )
    return macro_auroc(fit["scores"], test_targets)


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
    y = label_sets("train_targets", y)
    return finite("train_features", x), y, finite("test_features", xt)


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
