r"""Analytic MGLL gradients on blocks of logits, shared by the ``fused`` and ``tiled`` backends.

Both backends see the logits :math:`Z^g = s\,X T_g^\top` one block at a time, a *block* being
a (G', rows, cols) stack of granularities that share their number of columns (paired mode
stacks all G; bank mode with uneven K_g has one granularity per stack).  With the global
statistics below, the gradient of the weighted loss w.r.t. one logit is local:

.. math::
    \frac{\partial L}{\partial Z_{ik}} =
      w_r\,(m^r_i\,P^r_{ik} - C_{ik}/c^r_i)
    + w_c\,(m^c_k\,P^c_{ik} - C_{ik}/c^c_k)
    + w_p\,(\sigma(Z_{ik}+b) - Y_{ik})
    + w_{kl}\,\partial_{Z_{ik}} L_{sKL}

with :math:`P^r, P^c` the row and column softmaxes, :math:`c^r, c^c` the row and column sums
of C, :math:`m^r, m^c` their anchor indicators, and the weights
:math:`w_r = \alpha_1\lambda_g/(2|A_r|)`, :math:`w_c = \alpha_1\lambda_g/(2|A_c|)`,
:math:`w_p = \alpha_2\lambda_g/\text{norm}`, :math:`w_{kl} = \alpha_3/N`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from mgll._problem import LossConfig, Problem

# ------------------------------------------------------------------------------ planning


@dataclass
class Stats:
    """Global per-granularity statistics and term weights, scaled by the output gradients."""

    row_inv: list[Tensor]  # (N,)  1 / row sum of C, 0 for rows without a positive
    row_mass: list[Tensor]  # (N,) 1 for anchor rows
    col_inv: list[Tensor]  # (K_g,)
    col_mass: list[Tensor]  # (K_g,)
    w_row: list[Tensor]  # scalars
    w_col: list[Tensor]
    w_pw: list[Tensor]
    w_kl: Tensor
    kl_on: bool  # at least two granularities take part in the smooth KL
    kl_identity: bool  # every map is the identity: the log-space paired form
    kl_part: list[bool]  # which granularities take part
    soft_target: bool


@dataclass
class Block:
    """Image rows ``rows`` against text columns ``cols[g]``; which side's terms it owns."""

    rows: slice
    cols: list[slice]
    do_rows: bool
    do_cols: bool
    groups: list[list[int]] = field(default_factory=list)  # granularities stacked together


@dataclass
class Plan:
    """Everything a backend needs besides the features: statistics, blocks and switches."""

    problem: Problem
    config: LossConfig
    ce: bool
    pw: bool
    kl: bool
    blocks: list[Block]
    stats: Stats | None = None


def make_plan(problem: Problem, config: LossConfig) -> Plan:
    """Decide which terms run and split the work into a row block and a column block."""
    ce = config.soft_clip_weight != 0
    pw = config.pointwise_weight != 0
    kl = config.smooth_kl_weight != 0 and problem.num_granularities > 1
    if kl:
        kl = sum(_takes_part(t) for t in problem.kl_maps) >= 2
    g_all = problem.num_granularities
    full = [slice(None)] * g_all
    if problem.is_full:
        blocks = [Block(slice(None), full, ce or pw or kl, ce)]
    else:
        blocks = [
            Block(problem.rows, full, ce or pw or kl, False),
            Block(slice(None), list(problem.cols), False, ce),
        ]
    blocks = [b for b in blocks if b.do_rows or b.do_cols]
    for b in blocks:
        b.groups = _group(problem, b.cols)
    plan = Plan(problem, config, ce, pw, kl, blocks)
    plan.stats = _make_stats(plan)
    return plan


def _takes_part(t: Tensor | None) -> bool:
    return t is None or bool((t > 0).any())


def _group(problem: Problem, cols: list[slice]) -> list[list[int]]:
    """Stack granularities whose column ranges have the same length (paired mode: all)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for g, (text, c) in enumerate(zip(problem.texts, cols, strict=True)):
        key = c.indices(text.shape[0])
        groups.setdefault((*key, text.shape[0]), []).append(g)
    return list(groups.values())


def _make_stats(plan: Plan) -> Stats:
    """Row/column sums of C and the term weights."""
    p, cfg = plan.problem, plan.config
    dtype, n = p.image.dtype, p.num_images
    st = Stats([], [], [], [], [], [], [], p.scale.new_zeros(()), plan.kl, False, [], False)
    for g, cooc in enumerate(p.cooc):
        rows, cols = cooc.line_sums(1, dtype), cooc.line_sums(0, dtype)
        st.row_mass.append((rows > 0).to(dtype))
        st.col_mass.append((cols > 0).to(dtype))
        st.row_inv.append(_inverse(rows))
        st.col_inv.append(_inverse(cols))
        lam = cfg.lam(g)
        half = 0.5 * cfg.soft_clip_weight * lam
        st.w_row.append(half / st.row_mass[g].sum().clamp_min(1))
        st.w_col.append(half / st.col_mass[g].sum().clamp_min(1))
        norm = n * cooc.shape[1] if cfg.pointwise_norm == "pairs" else n
        st.w_pw.append(p.scale.new_tensor(cfg.pointwise_weight * lam / norm))
    st.w_kl = p.scale.new_tensor(cfg.smooth_kl_weight / n)
    st.kl_identity = all(t is None for t in p.kl_maps)
    st.kl_part = [_takes_part(t) for t in p.kl_maps]
    st.soft_target = cfg.pointwise_target == "soft"
    return st


def scaled(st: Stats, grads: tuple[Tensor, Tensor, Tensor]) -> Stats:
    """The weights multiplied by the gradients of the three outputs (soft CLIP, pointwise, KL)."""
    return replace(
        st,
        w_row=[w * grads[0] for w in st.w_row],
        w_col=[w * grads[0] for w in st.w_col],
        w_pw=[w * grads[1] for w in st.w_pw],
        w_kl=st.w_kl * grads[2],
    )


def _inverse(x: Tensor) -> Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))


def sub(outer: slice, length: int, inner: slice) -> slice:
    """The global slice of ``range(length)[outer][inner]``."""
    r = range(length)[outer][inner]
    return slice(r.start, r.stop, r.step)


def size(s: slice, length: int) -> int:
    return len(range(length)[s])


# ------------------------------------------------------------------------- block pieces


def targets(problem: Problem, gs: list[int], rows: slice, cols: list[slice], dtype) -> Tensor:
    """C^g[rows, cols[g]] for the stacked granularities: (G', r, k)."""
    return torch.stack([problem.cooc[g].block(rows, cols[g], dtype) for g in gs])


def stacked(values: list[Tensor], gs: list[int], index: slice, dim: int) -> Tensor:
    """Per-granularity vectors indexed by ``index`` as (G', r, 1) (dim=1) or (G', 1, k) (dim=2)."""
    out = torch.stack([values[g][index] for g in gs])
    return out.unsqueeze(2) if dim == 1 else out.unsqueeze(1)


def scalars(values: list[Tensor], gs: list[int]) -> Tensor:
    return torch.stack([values[g] for g in gs]).reshape(-1, 1, 1)


def row_softmax(z: Tensor) -> tuple[Tensor, Tensor]:
    """Row softmax P and row log-sum-exp of a (G', r, k) block with complete rows."""
    top = z.amax(-1, keepdim=True)
    p = torch.sub(z, top).exp_()
    total = p.sum(-1, keepdim=True)
    return p.div_(total), top + total.log()


def pointwise(z: Tensor, y: Tensor, bias: Tensor | None, want_grad: bool):
    """Per-granularity sums of softplus(x) - y x, x = z + b, and sigmoid(x) - y.

    Uses exp and log only (``log1p`` and ``softplus`` are scalar loops on some CPUs):
    :math:`\\log(1+e) = \\log(u)\\,e/(u-1)` with :math:`u = 1 + e`, exact to a few ulp.
    """
    x = z if bias is None else z + bias
    e = x.abs().neg_().exp_()
    u = e + 1
    lp = torch.where(u == 1, e, u.log() * e / (u - 1))
    value = (x.clamp_min(0).add_(lp).sub_(y * x)).sum((1, 2))
    if not want_grad:
        return value, None
    sig = torch.where(x >= 0, 1.0 / u, e / u)
    return value, sig.sub_(y)


# ------------------------------------------------------------------------------ smooth KL


def kl_identity(z: Tensor, p: Tensor, rlse: Tensor, want_grad: bool):
    """Paired smooth KL over the samples in log space: value per granularity and dL/dZ.

    Shape: z, p (G, r, N) (p the row softmax), rlse (G, r, 1).
    """
    lq = z - rlse
    mean = p.mean(0)
    lm = mean.clamp_min_(torch.finfo(p.dtype).tiny).log_()
    a = lq.sub_(lm).mul_(p)  # q (log q - log m); 0 where q underflows
    rows = a.sum(-1, keepdim=True)  # KL(Q^g_i || M_i)
    if not want_grad:
        return rows.sum((1, 2)), None
    return rows.sum((1, 2)), a.sub_(p * rows)


def kl_general_rows(probs: list[Tensor], maps: list[Tensor | None], part: list[bool]):
    """Pooled smooth KL of SPEC 2.3b for full rows: per-row value and dL/du for each map.

    ``probs[g]`` is the row softmax (r, K_g); u^g = P^g T^g.  Returns the value summed over
    the rows and, per granularity that takes part, (u, dL/du, sum_j u dL/du).
    """
    us = [p if t is None else p @ t for p, t, on in zip(probs, maps, part, strict=True) if on]
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


def kl_general_grad(p: Tensor, t: Tensor | None, gu: Tensor, dot: Tensor) -> Tensor:
    """dL/dZ for one granularity (r, k) from dL/du: softmax backward through u = P T."""
    gp = gu if t is None else gu @ t.T
    return p * (gp - dot)
