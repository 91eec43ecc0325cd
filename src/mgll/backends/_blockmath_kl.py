r"""Smooth-KL block pieces (docs/smooth_kl.rst) for :mod:`~mgll.backends._blockmath`.

The :math:`w_{kl}\,\partial_{Z_{ik}} L_{sKL}` term of the block gradient: the paired form over
the samples in log space (every map the identity) and the pooled form through the maps
:math:`u^g = P^g T^g`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mgll._cooc import apply_map, apply_map_transposed


def kl_identity_terms(z: Tensor, rlse: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:math:`a = Q(\\log Q - \\log M)` and Q for a (G, r, k) tile of the paired sample support.

    :math:`\\log Q = Z - \\mathrm{lse}` and :math:`\\log M = \\log \\tfrac1G \\sum_g Q^g`, floored
    at the smallest positive float: where every :math:`Q^g` underflows, a is exactly 0 (never
    :math:`0 \\cdot \\infty`).  ``q`` may pass the row softmax when it is already computed.
    """
    lq = z - rlse
    q = lq.exp() if q is None else q
    lm = q.mean(0).clamp_min_(torch.finfo(q.dtype).tiny).log_()
    return lq.sub_(lm).mul_(q), q


def kl_identity(z: Tensor, rlse: Tensor, q: Tensor, want_grad: bool):
    """Paired smooth KL over the samples for full rows: the value and dL/dZ.

    Each row's :math:`\\sum_g \\mathrm{KL}(Q^g_i \\| M_i) \\ge 0` is clamped at 0 against rounding.
    Shape: z, q (G, r, N) (q the row softmax), rlse (G, r, 1).
    """
    a, q = kl_identity_terms(z, rlse, q)
    rows = a.sum(-1, keepdim=True)  # KL(Q^g_i || M_i)
    value = rows.sum(0).clamp_min(0).sum()
    if not want_grad:
        return value, None
    return value, a.addcmul_(q, rows, value=-1)


def kl_general_rows(probs: list[Tensor], maps: list[Tensor | None], part: list[bool]):
    """Pooled smooth KL of docs/smooth_kl.rst for full rows: per-row value and dL/du for each map.

    ``probs[g]`` is the row softmax (r, K_g); u^g = P^g T^g.  Returns the value summed over
    the rows and, per granularity that takes part, (u, dL/du, sum_j u dL/du).
    """
    us = [apply_map(p, t) for p, t, on in zip(probs, maps, part, strict=True) if on]
    return kl_from_u(us)


def kl_from_u(us: list[Tensor]):
    """Value and gradients of sum_g KL(Q^g || mean Q) given unnormalised u^g (r, J)."""
    u = torch.stack(us)  # (G', r, J)
    total = u.sum(-1, keepdim=True)
    den = torch.where(total > 0, total, torch.ones_like(total))
    q = u / den
    m = q.mean(0, keepdim=True)
    pos = q > 0
    ones = torch.ones_like(q)
    log_ratio = torch.log(torch.where(pos, q, ones)) - torch.log(
        torch.where(pos, m.expand_as(q), ones)
    )
    value = torch.where(pos, q * log_ratio, torch.zeros_like(q)).sum()
    gq = torch.where(pos, log_ratio, torch.where(m > 0, -ones, torch.zeros_like(q)))
    dot = (gq * q).sum(-1, keepdim=True)
    gu = torch.where(total > 0, (gq - dot) / den, gq)
    return value, u, gu, (gu * u).sum(-1, keepdim=True)


def kl_general_grad(p: Tensor, t, gu: Tensor, dot: Tensor, weight=None, out=None) -> Tensor:
    """dL/dZ for one granularity (r, k) from dL/du: softmax backward through u = P T.

    With ``weight`` the gradient is scaled by it; with ``out`` it is added to ``out`` in place
    (the weight folded into the small (r, J) factors: two full-size passes, not five).
    """
    if weight is not None:
        gu, dot = gu * weight, dot * weight
    gp = apply_map_transposed(gu, t)
    if gp is gu:
        gp = gp.clone()
    gp.sub_(dot)
    if out is None:
        return gp.mul_(p)
    return out.addcmul_(p, gp)
