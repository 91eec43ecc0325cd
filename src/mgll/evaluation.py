r"""Held-out metrics that no compared loss trains on directly: the evaluation layer.

Pure torch, float64 throughout; nothing here is imported by the loss.  Every metric skips the
queries or classes it cannot score (no positive, or no negative) instead of counting them as
0 or 1, and says so in its docstring.

* :func:`linear_probe` / :func:`linear_probe_auroc`: logistic regression on frozen features,
  standardised on the probe set, with the L2 strength chosen by k-fold cross-validation
  (a fixed penalty on unit-norm features binds hardest on embeddings that sit in a narrow
  cone, and turns the probe into a copy of zero-shot).
* :func:`macro_auroc`: the mean of the per-class AUROCs that exist.
* :func:`caption_marginal_scores`: zero-shot class scores as a model's probability summed
  over the captions of a bank that contain the class (the other protocol next to class
  prompts, :class:`mgll.ZeroShotClassifier`; each suits a different loss, so report both).
* :func:`relevance`, :func:`mean_average_precision`, :func:`ndcg`: retrieval with binary
  (superset, exact set, shared label) or graded (Jaccard) relevance.

See the "Evaluation" page of the docs for the protocol, and the digits demo for how the
metrics compare CLIP and MGLL.  Shape letters: M images scored, D feature width, C classes,
Q queries, K captions of a bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mgll._evaluation_internals import (
    _check_grid,
    _check_probe,
    _fit,
    _fit_ridge,
    _moments,
    _nan_low,
    _ranking,
    _sets,
)
from mgll.zeroshot import multilabel_auroc

__all__ = [
    "caption_marginal_scores",
    "linear_probe",
    "linear_probe_auroc",
    "macro_auroc",
    "mean_average_precision",
    "ndcg",
    "relevance",
]

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_RULES = ("jaccard", "superset", "exact", "shares")
_SOLVERS = ("logistic", "ridge")


def macro_auroc(scores: Tensor, targets: Tensor) -> float:
    r"""Macro AUROC over the classes that have both a positive and a negative.

    .. math::
        \text{macro} = \frac{1}{|V|}\sum_{c \in V} \mathrm{AUC}_c, \qquad
        V = \{c : 0 < \textstyle\sum_i y_{ic} < M\}

    with :math:`\mathrm{AUC}_c` from :func:`mgll.zeroshot.multilabel_auroc` (ties count one
    half).  NaN when no class can be scored.

    Args:
        scores: real scores, higher = more likely positive.
        targets: 0/1 ground truth.

    Shape:
        - scores, targets: (M, C)
        - Output: a Python float

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.6, 0.3]])
        >>> macro_auroc(scores, torch.tensor([[1, 0], [0, 0], [1, 0]]))  # class 1: no positive
        1.0
    """
    per_class = multilabel_auroc(scores, targets)
    valid = per_class[~per_class.isnan()]
    return float(valid.mean()) if valid.numel() else float("nan")


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
        ValueError: mismatched shapes, fewer than 2 probe samples, an empty or non-positive
            grid, ``folds < 2`` or an unknown ``solver``.
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


def caption_marginal_scores(
    image_features: Tensor,
    caption_features: Tensor,
    caption_labels: Tensor,
    logit_scale: float | Tensor,
) -> Tensor:
    r"""Zero-shot class scores: a model's caption probabilities summed over a class's captions.

    .. math::
        P_{ik} = \operatorname{softmax}_k\big(s\,\langle \hat x_i, \hat t_k\rangle\big), \qquad
        \text{score}_{ic} = \sum_{k:\ c \in L_k} P_{ik} = (P L)_{ic}

    with :math:`\hat x, \hat t` L2-normalised, s the model's logit scale and :math:`L_k` the
    label set of caption k (only the captions' text decides which class a caption names,
    never the images' labels).  A loss trained to match each image with exactly its caption
    (CLIP) is scored on what it learned: which caption of the bank fits, and so which classes.

    Args:
        image_features: the images to score.
        caption_features: the embedded caption bank (e.g. every distinct training caption).
        caption_labels: 0/1 (or weights): which classes each caption names.
        logit_scale: s, positive, already exponentiated (the trained model's value).

    Shape:
        - image_features: (M, D); caption_features: (K, D); caption_labels: (K, C)
        - Output: (M, C) float64 scores in [0, 1]

    Example:
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # "3", "5", "3 and 5"
        >>> names = torch.tensor([[1, 0], [0, 1], [1, 1]])
        >>> caption_marginal_scores(images, captions, names, logit_scale=1.0)
        tensor([[0.8260, 0.5270],
                [0.5270, 0.8260]], dtype=torch.float64)

        (Image 0 has cosines 1, 0, 0.7071 with the captions, so P = (0.473, 0.174, 0.353):
        class "3" gets 0.473 + 0.353, class "5" gets 0.174 + 0.353.)
    """
    for name, t in (
        ("image_features", image_features),
        ("caption_features", caption_features),
        ("caption_labels", caption_labels),
    ):
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"`{name}` must be a 2-D tensor, got {got}")
    x, t = image_features.detach().double(), caption_features.detach().double()
    labels = caption_labels.detach().double()
    if x.shape[1] != t.shape[1] or labels.shape[0] != t.shape[0]:
        raise ValueError(
            "`image_features` (M, D), `caption_features` (K, D) and `caption_labels` (K, C) "
            f"must agree on D and K, got {tuple(x.shape)}, {tuple(t.shape)} and "
            f"{tuple(labels.shape)}"
        )
    scale = float(logit_scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"`logit_scale` must be positive and finite, got {scale}")
    p = torch.softmax(scale * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T, dim=1)
    return p @ labels


def relevance(query_labels: Tensor, item_labels: Tensor, rule: str) -> Tensor:
    r"""Relevance of every item to every query from their multi-hot label sets.

    .. math::
        \text{jaccard: } \frac{|q \cap i|}{|q \cup i|} \qquad
        \text{superset: } \mathbb 1[q \subseteq i] \qquad
        \text{exact: } \mathbb 1[q = i] \qquad
        \text{shares: } \mathbb 1[|q \cap i| > 0]

    An empty query set is relevant to nothing.  ``"superset"`` (the item holds every queried
    label) and graded ``"jaccard"`` are trained on by no loss of the demo; ``"exact"`` is
    CLIP's target (one caption, one label set) and ``"shares"`` is MGLL's any-overlap target,
    so report those two only as each loss's own target.

    Args:
        query_labels: 0/1 label sets of the queries.
        item_labels: 0/1 label sets of the items.
        rule: ``"jaccard"``, ``"superset"``, ``"exact"`` or ``"shares"``.

    Shape:
        - query_labels: (Q, C); item_labels: (N, C)
        - Output: (Q, N) float64

    Example:
        >>> q = torch.tensor([[1, 0, 0], [1, 1, 0]])
        >>> items = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 0]])
        >>> relevance(q, items, "superset")
        tensor([[1., 1., 0.],
                [1., 0., 0.]], dtype=torch.float64)
        >>> relevance(q, items, "jaccard")
        tensor([[0.5000, 0.5000, 0.0000],
                [1.0000, 0.3333, 0.5000]], dtype=torch.float64)
    """
    if rule not in _RULES:
        raise ValueError(f"`rule` must be one of {_RULES}, got {rule!r}")
    q, it = _sets("query_labels", query_labels), _sets("item_labels", item_labels)
    if q.shape[1] != it.shape[1]:
        raise ValueError(
            f"`query_labels` and `item_labels` must have the same C, got {tuple(q.shape)} and "
            f"{tuple(it.shape)}"
        )
    inter = q @ it.T
    q_size, i_size = q.sum(1, keepdim=True), it.sum(1)[None, :]
    nonempty = q_size > 0
    if rule == "jaccard":
        union = q_size + i_size - inter
        return torch.where(union > 0, inter / union.clamp_min(1), 0.0)
    if rule == "superset":
        hit = (inter == q_size) & nonempty
    elif rule == "exact":
        hit = (inter == q_size) & (inter == i_size) & nonempty
    else:
        hit = inter > 0
    return hit.double()


def mean_average_precision(
    scores: Tensor, relevant: Tensor, exclude: Tensor | None = None
) -> float:
    r"""Mean over queries of the average precision of ranking the items by score.

    .. math::
        \mathrm{AP}_q = \frac{1}{R_q}\sum_{r=1}^{N} \mathrm{P@}r \cdot \mathrm{rel}_q(r), \qquad
        \mathrm{mAP} = \frac{1}{|\{q: R_q > 0\}|}\sum_{q: R_q > 0} \mathrm{AP}_q

    with items ranked by descending score (ties kept in item order), :math:`R_q` the relevant
    items of query q and P@r the precision of the top r.  Queries without a relevant item
    are skipped; NaN when none has one.

    Args:
        scores: query-item scores, higher = ranked first.
        relevant: which items are relevant (any value > 0 counts).
        exclude: items to leave out of a query's ranking (e.g. the query image itself).

    Shape:
        - scores, relevant, exclude: (Q, N)
        - Output: a Python float

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
        >>> mean_average_precision(scores, torch.tensor([[1, 0, 1, 0]]))  # (1/1 + 2/3) / 2
        0.8333333333333333
    """
    s, rel = _ranking("relevant", scores, relevant, exclude)
    rel = (rel > 0).double()
    order = s.argsort(dim=1, descending=True, stable=True)
    hits_sorted = rel.gather(1, order)
    precision = hits_sorted.cumsum(1) / torch.arange(1, s.shape[1] + 1, dtype=torch.float64)
    n_rel = hits_sorted.sum(1)
    ap = (precision * hits_sorted).sum(1) / n_rel.clamp_min(1)
    keep = n_rel > 0
    return float(ap[keep].mean()) if bool(keep.any()) else float("nan")


def ndcg(
    scores: Tensor, gains: Tensor, exclude: Tensor | None = None, k: int | None = None
) -> float:
    r"""Mean normalised discounted cumulative gain with graded relevance (e.g. Jaccard).

    .. math::
        \mathrm{DCG}_q = \sum_{r=1}^{k} \frac{g_q(\pi_q(r))}{\log_2(r+1)}, \qquad
        \mathrm{nDCG} = \frac{1}{|\{q: \mathrm{IDCG}_q > 0\}|}
        \sum_{q} \frac{\mathrm{DCG}_q}{\mathrm{IDCG}_q}

    with :math:`\pi_q` the items by descending score (ties kept in item order) and IDCG the
    DCG of the items sorted by gain.  Queries without any positive gain are skipped; NaN
    when none has one.

    Args:
        scores: query-item scores.
        gains: non-negative graded relevance, e.g. ``relevance(q, items, "jaccard")``.
        exclude: items to leave out of a query's ranking.
        k: cut-off (default: the whole ranking).

    Shape:
        - scores, gains, exclude: (Q, N)
        - Output: a Python float

    Example:
        >>> scores = torch.tensor([[0.9, 0.5, 0.1]])
        >>> gains = torch.tensor([[0.5, 0.0, 1.0]])  # DCG = 0.5 + 1/2, IDCG = 1 + 0.5/log2(3)
        >>> round(ndcg(scores, gains), 4)
        0.7602
    """
    s, g = _ranking("gains", scores, gains, exclude)
    if bool((g < 0).any()):
        raise ValueError("`gains` must be non-negative")
    n = s.shape[1]
    k = n if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}")
    k = min(k, n)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    dcg = (g.gather(1, order) * discount).sum(1)
    ideal = (g.sort(dim=1, descending=True).values[:, :k] * discount).sum(1)
    keep = ideal > 0
    return float((dcg[keep] / ideal[keep]).mean()) if bool(keep.any()) else float("nan")
