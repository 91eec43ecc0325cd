"""The three MGLL terms as sums over the rows of dense blocks (SPEC section 2).

Each function returns an *unnormalised* sum over the rows it is given; callers divide by the
global normaliser (anchor counts, N or N*K).  Keeping sums lets a process that owns only some
rows (distributed local loss) or a backend that works in row chunks add partial results exactly.
All inputs are already in the compute dtype (float32 or wider).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0`` and 0 elsewhere, with finite gradients everywhere."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def soft_ce_rows(logits: Tensor, cooc: Tensor) -> Tensor:
    """sum_i sum_k -W_ik log softmax_k(Z_i) over rows with a positive, W = rows of C normalised.

    Shape: logits, cooc (n, K). Rows of ``cooc`` that are all zero contribute 0.
    """
    weights = safe_divide(cooc, cooc.sum(1, keepdim=True))
    return -(weights * torch.log_softmax(logits, dim=1)).sum()


def pointwise_targets(cooc: Tensor, target: str) -> Tensor:
    """Y of the pointwise term: ``"binary"`` 1[C > 0], ``"graded"`` min(C, 1), or ``"soft"`` C
    normalised per row."""
    if target == "binary":
        return (cooc > 0).to(cooc.dtype)
    if target == "graded":
        return cooc.clamp_max(1)
    return safe_divide(cooc, cooc.sum(1, keepdim=True))  # as the authors' code does


def pointwise_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """sum_ik -[Y log s(Z) + (1 - Y) log s(-Z)] = sum_ik softplus(Z) - Y Z  (stable form).

    Shape: logits, targets (n, K), bias already added to ``logits``.
    """
    return (F.softplus(logits) - targets * logits).sum()


def smooth_kl_rows(logits: Sequence[Tensor], maps: Sequence[Tensor | None]) -> Tensor:
    """sum_i sum_g KL(Q^g_i || M_i), Q^g_i = normalise(softmax(Z^g_i) T^g), M_i = mean_g Q^g_i.

    ``maps[g]`` is T^g (K_g x J), or None for the identity (then K_g = J).  Granularities whose
    T^g has no positive entry have no distribution and take no part; with fewer than two taking
    part the term is 0.  Never NaN: identity maps stay in log space, the others mask 0 log 0.
    """
    maps = list(maps)
    if all(m is None for m in maps):  # the paper's paired form, exactly in log space
        log_q = torch.stack([torch.log_softmax(z, dim=1) for z in logits])  # (G, n, N)
        log_m = torch.logsumexp(log_q, dim=0) - math.log(len(logits))
        return _clamp_rows((log_q.exp() * (log_q - log_m)).sum((0, 2)))
    probs = [
        torch.softmax(z, dim=1) if t is None else torch.softmax(z, dim=1) @ t
        for z, t in zip(logits, maps, strict=True)
        if t is None or bool((t > 0).any())
    ]
    if len(probs) < 2:
        return logits[0].new_zeros(())
    q = torch.stack([safe_divide(p, p.sum(1, keepdim=True)) for p in probs])  # (G', n, J)
    m = q.mean(0)
    positive = q > 0
    log_ratio = _safe_log(q, positive) - _safe_log(m.expand_as(q), positive)
    return _clamp_rows(torch.where(positive, q * log_ratio, torch.zeros_like(q)).sum((0, 2)))


def _clamp_rows(kl: Tensor) -> Tensor:
    """Sum of per-row KL values, each clamped at 0 in value only (straight-through gradient).

    A row whose G distributions agree has KL 0, but rounding in fp32 can leave about -1e-8;
    the clamp removes that sign error without touching the exact autograd gradient.
    """
    return (kl + (kl.clamp_min(0) - kl).detach()).sum()


def _safe_log(x: Tensor, mask: Tensor) -> Tensor:
    return torch.log(torch.where(mask, x, torch.ones_like(x)))
