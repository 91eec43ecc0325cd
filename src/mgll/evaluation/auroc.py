r"""AUROC for multi-label scores: per class, and its macro mean over the classes that have one."""

from __future__ import annotations

import torch
from torch import Tensor

from mgll.evaluation._finite import finite

__all__ = ["macro_auroc", "multilabel_auroc"]


def macro_auroc(scores: Tensor, targets: Tensor) -> float:
    r"""Macro AUROC over the classes that have both a positive and a negative.

    .. math::
        \text{macro} = \frac{1}{|V|}\sum_{c \in V} \mathrm{AUC}_c, \qquad
        V = \{c : 0 < \textstyle\sum_i y_{ic} < M\}

    with :math:`\mathrm{AUC}_c` from :func:`mgll.evaluation.multilabel_auroc` (ties count one
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


def multilabel_auroc(scores: Tensor, targets: Tensor) -> Tensor:
    r"""Per-class ROC AUC, rank-based (Mann-Whitney U) with average ranks for ties.

    .. math::
        \mathrm{AUC}_c = \frac{\sum_{i: y_{ic}=1} r_{ic} - P_c(P_c+1)/2}{P_c\,(M-P_c)}

    with :math:`r_{ic}` the 1-based rank of :math:`\text{score}_{ic}` within column c (tied
    scores share their average rank, so a tie counts one half) and :math:`P_c` the positives.
    A class whose ground truth has a single value (no positive or no negative) has no AUROC:
    its entry is NaN, and a macro average should skip it (``per_class.nanmean()``; this is
    what :meth:`ZeroShotClassifier.evaluate` does).

    Args:
        scores: any real scores, higher = more likely positive.
        targets: 0/1 ground truth.

    Shape:
        - scores: (M, C) (or (M,) for one class)
        - targets: same shape
        - Output: (C,) float64 (or a scalar for 1-D input)

    Example:
        >>> multilabel_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.7500, dtype=torch.float64)
    """
    s, y = _check_auroc(scores, targets)
    one = s.dim() == 1
    s, y = (s[:, None], y[:, None]) if one else (s, y)
    m = s.shape[0]
    pos = y.sum(0)
    neg = m - pos
    ranks = torch.stack([_average_ranks(s[:, c]) for c in range(s.shape[1])], dim=1)
    u = (ranks * y).sum(0) - pos * (pos + 1) / 2
    auc = u / (pos * neg).clamp_min(1)
    auc = torch.where((pos > 0) & (neg > 0), auc, torch.full_like(auc, float("nan")))
    return auc[0] if one else auc


def _average_ranks(x: Tensor) -> Tensor:
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2  # mean of ranks end-count+1 .. end
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def _check_auroc(scores: object, targets: object) -> tuple[Tensor, Tensor]:
    for name, x in (("scores", scores), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if scores.dim() not in (1, 2) or scores.shape != targets.shape or scores.shape[0] == 0:
        raise ValueError(
            f"`scores` and `targets` must have one shape, (M, C) or (M,) with M >= 1, got "
            f"{tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    s = finite("scores", scores)
    y = targets.detach().double()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError(f"`targets` must be 0/1, got values {torch.unique(y).tolist()[:5]}")
    return s, y
