"""The three MGLL terms as sums over the rows of dense blocks (docs/concepts.rst).

Each function returns an *unnormalised* sum over the rows it is given; callers divide by the
global normaliser (anchor counts, N or N*K).  Keeping sums lets a process that owns only some
rows (distributed local loss) or a backend that works in row chunks add partial results exactly.
All inputs are already in the compute dtype (float32 or wider).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mgll.targets.cooc import apply_map, map_takes_part


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0`` and 0 elsewhere, with finite gradients everywhere."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def soft_ce_rows(logits: Tensor, cooc: Tensor, known: Tensor | None = None) -> Tensor:
    """sum_i sum_k -W_ik log softmax_k(Z_i) over rows with a positive, W = rows of C normalised.

    Shape: logits, cooc (n, K). Rows of ``cooc`` that are all zero contribute 0.  ``known``
    (n, K) bool: the softmax runs over the known pairs of each row only (``cooc`` is 0 at the
    others); a masked logit becomes the most negative float, whose exponential is exactly 0.
    """
    if known is not None:
        logits = logits.masked_fill(~known, torch.finfo(logits.dtype).min)
    weights = safe_divide(cooc, cooc.sum(1, keepdim=True))
    return -(weights * torch.log_softmax(logits, dim=1)).sum()


def known_part(cooc: Tensor) -> tuple[Tensor, Tensor]:
    """A block with NaN at its unknown pairs as (its weights, 0 at the unknowns; the known mask)."""
    known = ~torch.isnan(cooc)
    return torch.where(known, cooc, 0), known


def pointwise_targets(cooc: Tensor, target: str) -> Tensor:
    """Y of the pointwise term: ``"binary"`` 1[C > 0], ``"graded"`` min(C, 1), or ``"soft"`` C
    normalised per row."""
    if target == "binary":
        return (cooc > 0).to(cooc.dtype)
    if target == "graded":
        return cooc.clamp_max(1)
    return safe_divide(cooc, cooc.sum(1, keepdim=True))  # as the authors' code does


def pointwise_rows(logits: Tensor, targets: Tensor, known: Tensor | None = None) -> Tensor:
    """sum_ik -[Y log s(Z) + (1 - Y) log s(-Z)] = sum_ik softplus(Z) - Y Z  (stable form).

    softplus is ``logaddexp(Z, 0)``: stable, and its gradient is exactly sigmoid(Z) (torch's
    ``F.softplus`` returns Z itself above its threshold 20, a gradient of 1 instead of
    1 - 2e-9, visible in float64).

    Shape: logits, targets (n, K), bias already added to ``logits``; ``known`` (n, K) bool
    keeps the known pairs only.
    """
    terms = torch.logaddexp(logits, torch.zeros_like(logits)) - targets * logits
    return (terms if known is None else torch.where(known, terms, 0)).sum()


def smooth_kl_rows(
    logits: Sequence[Tensor], maps: Sequence, taking: Sequence[bool] | None = None
) -> Tensor:
    """sum_i sum_g KL(Q^g_i || M_i), Q^g_i = normalise(softmax(Z^g_i) T^g), M_i = mean_g Q^g_i.

    ``maps[g]`` is T^g (K_g x J; a tensor or a :class:`~mgll.targets.cooc.GroupMap`), or None for the
    identity (then K_g = J).  Granularities whose
    T^g has no positive entry have no distribution and take no part; with fewer than two taking
    part the term is 0.  Never NaN: identity maps stay in log space, the others mask 0 log 0.
    ``taking``: whether each map takes part, when already read (``Problem.kl_taking``).
    """
    maps = list(maps)
    if all(m is None for m in maps):  # the paper's paired form, exactly in log space
        log_q = torch.stack([torch.log_softmax(z, dim=1) for z in logits])  # (G, n, N)
        log_m = torch.logsumexp(log_q, dim=0) - math.log(len(logits))
        return _clamp_rows((log_q.exp() * (log_q - log_m)).sum((0, 2)))
    if taking is None:
        taking = [map_takes_part(t) for t in maps]
    probs = [
        apply_map(torch.softmax(z, dim=1), t)
        for z, t, on in zip(logits, maps, taking, strict=True)
        if on
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


def scale_free(c: Tensor) -> Tensor:
    """``c`` brought to a moderate scale by an exact power of two.

    Targets are scale-free (every term normalises them), so this changes no loss; it keeps every
    line sum in the float range, from subnormal entries (1e-45) to 3e38: when the largest entry
    is below 2^-60 or above 2^60 it is brought into [0.5, 1).  Moderate targets are left alone
    (scaling them down would round their subnormal entries).  A multiplication by a power of
    two is exact whenever the result is a normal number; a positive entry stays positive.
    """
    top = c.nan_to_num(0.0).amax() if c.numel() else c.new_zeros(())  # NaN: unknown pairs
    exp = torch.frexp(top)[1].to(torch.int64)  # top = m 2^e, m in [0.5, 1); frexp(0) = (0, 0)
    shift = torch.where((exp > 60) | (exp < -60), -exp, torch.zeros_like(exp))
    half = torch.div(shift, 2, rounding_mode="floor")
    two = c.new_tensor(2.0)
    scaled = c * two ** half.to(c.dtype) * two ** (shift - half).to(c.dtype)
    return keep_positive(scaled, c)  # 1[C > 0] unchanged


def normalise_lines(
    c: Tensor, dim: int, keep_support: bool = True, unknown: bool = False
) -> Tensor:
    """``c`` divided by its sums along ``dim`` (rows: 1, columns: 0); zero lines stay zero.

    A division, never a multiplication by ``1 / sum``: a subnormal sum (a row of ``exp(-100)``
    in float32) has no finite reciprocal, but dividing by it is exact to rounding.  With
    ``keep_support`` a positive entry stays positive (at least the smallest subnormal), so
    ``1[C > 0]`` read from the result is that of ``c``.  ``unknown``: ``c`` holds NaN at
    unknown pairs, which the sums skip.
    """
    sums = c.nansum(dim, keepdim=True) if unknown else c.sum(dim, keepdim=True)
    w = c / torch.where(sums > 0, sums, torch.ones_like(sums))  # an unknown (NaN) stays NaN
    return keep_positive(w, c) if keep_support else w


_SAME_WIDTH_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def keep_positive(x: Tensor, c: Tensor) -> Tensor:
    """``x``, with the smallest subnormal wherever ``c > 0`` but ``x`` underflowed to 0.

    Sets the lowest bit of those zeros (+0.0 has all bits 0), so that no arithmetic touches a
    subnormal number: on a CPU that costs a slow microcode assist per element.
    """
    ints = _SAME_WIDTH_INT[x.dtype]
    lost = (x == 0) & (c > 0)
    return (x.view(ints) | lost.to(ints)).view(x.dtype)


def partial_smooth_kl_rows(
    logits: Sequence[Tensor],
    owners: Sequence[Tensor | None],
    groups,
    annotated: Tensor,
    rows: slice,
) -> Tensor:
    """The smooth KL of image rows ``rows`` with unknowns (docs/partial_annotation.rst).

    Image i is compared at the granularities where it is annotated (``annotated`` (G, N) bool,
    granularities without a distribution already False), if there are two or more, over the
    samples annotated at each of them: Q^g_i = normalise(mask_i(softmax(Z^g_i) R^g) S).
    ``owners[g]`` is R^g (K_g x N) or None (paired), ``groups`` S (N x J, a tensor or a
    :class:`~mgll.targets.cooc.GroupMap`) or None.  Returns the sum over the rows.
    """
    take = annotated[:, rows]  # (G, n): where each image is compared
    compared = take.sum(0) >= 2
    # support[i, m]: sample m is annotated wherever image i is compared
    support = ~(take[:, :, None] & ~annotated[:, None, :]).any(0)
    q = []
    for z, r in zip(logits, owners, strict=True):
        if r is None:  # paired: the softmax over the support's texts (exact zeros elsewhere)
            over = torch.softmax(z.masked_fill(~support, torch.finfo(z.dtype).min), dim=1)
        else:
            over = (torch.softmax(z, dim=1) @ r) * support
        pooled = apply_map(over, groups)
        q.append(safe_divide(pooled, pooled.sum(1, keepdim=True)))
    q = torch.stack(q) * take[:, :, None]  # (G, n, J), zero where an image is not compared
    m = safe_divide(q.sum(0), take.sum(0)[:, None].to(q.dtype))
    positive = q > 0
    log_ratio = _safe_log(q, positive) - _safe_log(m.expand_as(q), positive)
    kl = torch.where(positive, q * log_ratio, torch.zeros_like(q)).sum((0, 2))
    return _clamp_rows(torch.where(compared, kl, 0))
