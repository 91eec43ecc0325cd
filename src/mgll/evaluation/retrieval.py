r"""Retrieval metrics: relevance of items to queries by their label sets, mAP and nDCG."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mgll.evaluation._finite import finite
from mgll.targets.renamed import renamed_value

__all__ = ["mean_average_precision", "ndcg", "relevance"]

_RULES = ("jaccard", "superset", "exact", "any")


def relevance(query_labels: Tensor, item_labels: Tensor, rule: str) -> Tensor:
    r"""Relevance of every item to every query from their multi-hot label sets.

    .. math::
        \text{jaccard: } \frac{|q \cap i|}{|q \cup i|} \qquad
        \text{superset: } \mathbb 1[q \subseteq i] \qquad
        \text{exact: } \mathbb 1[q = i] \qquad
        \text{any: } \mathbb 1[|q \cap i| > 0]

    An empty query set is relevant to nothing.  ``"jaccard"`` and ``"any"`` are the rules of
    the same names of :func:`mgll.targets.from_multi_hot` and the loss's ``overlap=`` on 0/1
    labels.  ``"superset"`` (the item holds every queried label) and graded ``"jaccard"`` are
    trained on by no loss of the demo; ``"exact"`` is CLIP's target (one caption, one label
    set) and ``"any"`` is MGLL's any-overlap target, so report those two only as each loss's
    own target.

    Args:
        query_labels: 0/1 label sets of the queries.
        item_labels: 0/1 label sets of the items.
        rule: ``"jaccard"``, ``"superset"``, ``"exact"`` or ``"any"`` (``"shares"``, its old
            name, is accepted with a DeprecationWarning until mgll 0.3).

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
    rule = renamed_value("relevance", "rule", rule, {"shares": "any"})
    if rule not in _RULES:
        raise ValueError(f"`rule` must be one of {_RULES}, got {rule!r}")
    q, it = label_sets("query_labels", query_labels), label_sets("item_labels", item_labels)
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

    Raises:
        ValueError: mismatched shapes, or a NaN / inf score or relevance outside ``exclude``
            (it would be ranked first or last and give a normal-looking number).

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

    Raises:
        ValueError: mismatched shapes, negative gains, a bad ``k``, or a NaN / inf score or
            gain outside ``exclude``.

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


def _ranking(name: str, scores: object, values: object, exclude: object) -> tuple[Tensor, Tensor]:
    for arg, t in (("scores", scores), (name, values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if scores.dim() != 2 or values.shape != scores.shape or scores.shape[1] == 0:
        raise ValueError(
            f"`scores` and `{name}` must have one (Q, N) shape with N >= 1, got "
            f"{tuple(scores.shape)} and {tuple(values.shape)}"
        )
    mask = None
    if exclude is not None:
        if not isinstance(exclude, Tensor) or exclude.shape != scores.shape:
            got = tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude).__name__
            raise ValueError(f"`exclude` must be a (Q, N) bool tensor like `scores`, got {got}")
        mask = exclude.bool()
    kept = None if mask is None else ~mask  # excluded entries are never ranked
    s, v = finite("scores", scores, kept), finite(name, values, kept)
    if mask is not None:
        s = s.masked_fill(mask, -math.inf)
        v = v.masked_fill(mask, 0.0)
    return s, v


def label_sets(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"`{name}` must be a 2-D multi-hot tensor (rows, C), got {got}")
    y = x.detach().double()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError(f"`{name}` must be 0/1, got values {torch.unique(y).tolist()[:5]}")
    return y
