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
from mgll._terms import safe_divide
from mgll.targets.cooc import apply_map, apply_map_transposed, dense_ranks
from mgll.targets.overlap import partial_overlap_into, partial_side, right_factors

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
    kl_identity: bool  # every map is the identity: the log-space paired form
    kl_part: list[bool]  # which granularities take part
    soft_target: bool
    graded_target: bool = False  # pointwise Y = min(C, 1)


@dataclass
class Block:
    """Image rows ``rows`` against text columns ``cols[g]``; which side's terms it owns."""

    rows: slice
    cols: list[slice]
    do_rows: bool
    do_cols: bool
    groups: list[list[int]] = field(default_factory=list)  # granularities stacked together


@dataclass
class Layout:
    """Which logits are computed, block by block: the part of a plan that reads no value.

    The compiled operator's backward rebuilds only this (:func:`make_layout`) to find its
    stored dZ stacks in the flat buffer.
    """

    num_images: int
    widths: list[int]  # K_g
    blocks: list[Block]


def make_layout(
    num_images: int,
    widths: list[int],
    rows: slice = slice(None),
    cols: list[slice] | None = None,
    *,
    row_terms: bool,
    col_terms: bool,
) -> Layout:
    """One block of every row and column, or a row block and a column block (a local loss).

    ``row_terms``: some term runs on the image rows; ``col_terms``: the soft CLIP's text
    columns run (the t2i direction).
    """
    full = [slice(None)] * len(widths)
    cols = full if cols is None else list(cols)
    if rows == slice(None) and all(c == slice(None) for c in cols):
        blocks = [Block(slice(None), full, row_terms, col_terms)]
    else:
        blocks = [Block(rows, full, row_terms, False), Block(slice(None), cols, False, col_terms)]
    blocks = [b for b in blocks if b.do_rows or b.do_cols]
    for b in blocks:
        b.groups = _group(widths, b.cols)
    return Layout(num_images, list(widths), blocks)


@dataclass
class Plan:
    """Everything a backend needs besides the features: statistics, blocks and switches.

    ``ce``, ``pw``, ``kl``: the problem's term switches (:class:`~mgll._problem.Problem`).
    """

    problem: Problem
    config: LossConfig
    ce: bool
    pw: bool
    kl: bool
    layout: Layout
    stats: Stats | None = None

    @property
    def blocks(self) -> list[Block]:
        return self.layout.blocks


def make_plan(problem: Problem, config: LossConfig) -> Plan:
    """Split the work into a row block and a column block, for the terms ``problem`` runs."""
    ce, pw, kl = problem.soft_clip_on, problem.pointwise_on, problem.smooth_kl_on
    widths = [t.shape[0] for t in problem.texts]
    layout = make_layout(
        problem.num_images, widths, problem.rows, problem.cols, row_terms=ce or pw or kl,
        col_terms=ce,
    )  # fmt: skip
    plan = Plan(problem, config, ce, pw, kl, layout)
    plan.stats = _make_stats(plan)
    return plan


def _group(widths: list[int], cols: list[slice]) -> list[list[int]]:
    """Stack granularities whose column ranges have the same length (paired mode: all)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for g, (k, c) in enumerate(zip(widths, cols, strict=True)):
        groups.setdefault((*c.indices(k), k), []).append(g)
    return list(groups.values())


def _make_stats(plan: Plan) -> Stats:
    """Row/column sums of C and the term weights."""
    p, cfg = plan.problem, plan.config
    dtype, n = p.image.dtype, p.num_images
    st = Stats([], [], [], [], [], [], [], p.scale.new_zeros(()), False, [], False)
    for g, cooc in enumerate(p.cooc):
        rows = cooc.line_sums(1, dtype)
        cols = rows if cooc.paired else cooc.line_sums(0, dtype)  # paired C is symmetric
        if p.col_weights[g] is not None:  # bank: the t2i side reads W^c (see Problem)
            weights = p.col_weights[g].to(dtype)
            cols = weights.nansum(0) if cooc.partial else weights.sum(0)
        st.row_mass.append((rows > 0).to(dtype))
        st.col_mass.append((cols > 0).to(dtype))
        st.row_inv.append(_inverse(rows))
        st.col_inv.append(_inverse(cols))
        lam = cfg.lam(g)
        half = 0.5 * cfg.soft_clip_weight_at(g) * lam
        st.w_row.append(half / st.row_mass[g].sum().clamp_min(1))
        st.w_col.append(half / st.col_mass[g].sum().clamp_min(1))
        norm = p.pointwise_norms[g]  # None: the term is off, its weight unused
        st.w_pw.append(
            cfg.pointwise_weight_at(g) * lam / _as_tensor(p.scale, 1 if norm is None else norm)
        )
    compared = n if p.partial is None else p.partial.compared.clamp_min(1)
    st.w_kl = cfg.smooth_kl_weight / _as_tensor(p.scale, compared)
    st.kl_identity = all(t is None for t in p.kl_maps)
    st.kl_part = list(p.kl_taking)  # read once, when the batch was built
    st.soft_target = cfg.pointwise_target == "soft"
    st.graded_target = cfg.pointwise_target == "graded"
    return st


def _as_tensor(like: Tensor, x: int | Tensor) -> Tensor:
    """A count (a Python int, or a tensor counted on the device) in ``like``'s dtype."""
    return x.to(like.dtype) if isinstance(x, Tensor) else like.new_tensor(x)


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


# ------------------------------------------------------------------------- block pieces


@dataclass
class GroupView:
    """Weights of one stack of granularities over one block's rows (n) and columns (k)."""

    gs: list[int]
    cols: slice  # global text columns, the same for every granularity of the stack
    row_inv: Tensor | None  # (G', n, 1) w_row / row sum of C    (soft CLIP, row side)
    row_mass: Tensor | None  # (G', n, 1) w_row * anchor
    col_inv: Tensor | None  # (G', 1, k) w_col / column sum of C (soft CLIP, column side)
    col_mass: Tensor | None  # (G', 1, k)
    w_pw: Tensor | None  # (G', 1, 1) pointwise weight, None when the block has no pointwise part
    y_coef: Tensor | None  # w_pw Y = C * y_coef ((G', n, 1) or (G', 1, 1)); None: Y = 1[C > 0]
    y_rows: Tensor | None  # soft targets: Y = C * y_rows (G', n, 1)
    ids: Tensor | None  # (G', N) stacked class ids when every C of the stack is paired ids
    graded: bool = False  # pointwise Y = min(C, 1) instead of 1[C > 0]
    partial: bool = False  # some pairs are unknown: NaN in the target blocks
    sides: dict = field(default_factory=dict)  # per-view pieces of the known-pair targets


def group_view(plan: Plan, st: Stats, blk: Block, gs: list[int], dtype) -> GroupView:
    p = plan.problem
    rows, cols = blk.rows, blk.cols[gs[0]]

    def rowwise(values):
        return torch.stack([values[g][rows] for g in gs]).unsqueeze(2)

    def colwise(values):
        return torch.stack([values[g][cols] for g in gs]).unsqueeze(1)

    def weights(values):
        return torch.stack([values[g] for g in gs]).reshape(-1, 1, 1)

    v = GroupView(gs, cols, None, None, None, None, None, None, None, None)
    if plan.ce and blk.do_rows:
        v.row_inv = rowwise(st.row_inv) * weights(st.w_row)
        v.row_mass = rowwise(st.row_mass) * weights(st.w_row)
    if plan.ce and blk.do_cols:
        v.col_inv = colwise(st.col_inv) * weights(st.w_col)
        v.col_mass = colwise(st.col_mass) * weights(st.w_col)
    if plan.pw and blk.do_rows:
        v.w_pw = weights(st.w_pw)
        if st.soft_target:
            v.y_rows = rowwise(st.row_inv)
            v.y_coef = v.y_rows * v.w_pw
        elif all(p.cooc[g].binary for g in gs) and not v.partial:  # 0/1: binary Y is C itself
            v.y_coef = v.w_pw
        v.graded = st.graded_target
    v.partial = any(p.cooc[g].partial for g in gs)
    if all(p.cooc[g].kind == "ids" for g in gs) and not v.partial:
        v.ids = torch.stack([_ranks(p.cooc[g].data, dtype) for g in gs])
    return v


_EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}


def _ranks(ids: Tensor, dtype) -> Tensor:
    """Class ids as their ranks 0..U-1 in ``dtype`` when exact there (fewer than 2**24 ids in float32).

    Comparing floats into a float buffer is one vectorised pass; comparing int64 ids and
    converting the bool result is several times slower on CPU.
    """
    if ids.shape[0] >= _EXACT_INTEGERS.get(dtype, 0):
        return ids
    return dense_ranks(ids)[0].to(dtype)  # sorting: no host sync


def targets(problem: Problem, v: GroupView, rows: slice, cols: list[slice], dtype) -> Tensor:
    """C^g[rows, cols[g]] for the stacked granularities: (G', r, k)."""
    if v.ids is not None:
        c = cols[v.gs[0]]
        a, b = v.ids[:, rows, None], v.ids[:, None, c]
        if not v.ids.is_floating_point():
            return (a == b).to(dtype)
        out = torch.empty(len(v.gs), a.shape[1], b.shape[2], dtype=dtype, device=a.device)
        return torch.eq(a, b, out=out)
    return torch.stack([problem.cooc[g].block(rows, cols[g], dtype) for g in v.gs])


def known_targets(c: Tensor | None, c_col: Tensor | None):
    """Targets with NaN at unknown pairs as (C, W^c with 0 there, the known mask)."""
    if c is None:
        return None, None, None
    known = ~torch.isnan(c)
    c = c.masked_fill(~known, 0)
    return c, (None if c_col is None else c_col.masked_fill(~known, 0)), known


def known_mask(problem: Problem, v: GroupView, rows: slice, cols: list[slice], dtype) -> Tensor:
    """The known pairs of ``C^g[rows, cols[g]]`` for the stacked granularities as 0/1 in
    ``dtype`` (G', r, k); for ids an outer product of the annotated rows and columns."""
    known = _stack_like(problem, v, rows, cols, dtype)
    for j, g in enumerate(v.gs):
        _fill(problem.cooc[g], v, g, rows, cols[g], None, known[j])
    return known


def partial_targets(problem: Problem, v: GroupView, rows: slice, cols: list[slice], dtype):
    """C^g[rows, cols[g]] with 0 at the unknown pairs and the known mask (0/1 in ``dtype``).

    The same values as :func:`targets` followed by :func:`known_targets`, without the NaN in
    between: ids compare as float ranks and take their mask as an outer product, multi-hot
    labels read the known pairs from the overlap rule directly (the columns' side of it
    computed once per view).  Both (G', r, k), written in place, never stacked.
    """
    c = _stack_like(problem, v, rows, cols, dtype)
    known = torch.empty_like(c)
    for j, g in enumerate(v.gs):
        _fill(problem.cooc[g], v, g, rows, cols[g], c[j], known[j])
    return c, known


def _stack_like(problem: Problem, v: GroupView, rows: slice, cols: list[slice], dtype) -> Tensor:
    r = len(range(problem.num_images)[rows])
    k = len(range(problem.cooc[v.gs[0]].shape[1])[cols[v.gs[0]]])
    return torch.empty(len(v.gs), r, k, dtype=dtype, device=problem.image.device)


def _fill(cooc, v: GroupView, g: int, rows: slice, col: slice, c: Tensor | None, known: Tensor):
    """One granularity's known-pair targets (``c``, skipped when None) and mask, in place."""
    dtype = known.dtype
    if cooc.kind == "ids":
        ranks, annotated = _cached(v, ("ids", g, dtype), lambda: _id_sides(cooc.data, dtype))
        torch.outer(annotated[rows], annotated[col], out=known)
        if c is not None and ranks.is_floating_point():
            torch.eq(ranks[rows, None], ranks[None, col], out=c).mul_(known)
        elif c is not None:
            c.copy_(ranks[rows, None] == ranks[None, col]).mul_(known)
        return
    if not cooc.partial:
        known.fill_(1)
        if c is not None:
            c.copy_(cooc.block(rows, col, dtype))
        return
    if cooc.kind == "multi_hot":
        key = ("multi_hot", g, dtype, col.start, col.stop, col.step)
        binary = cooc.zero_one_labels
        side, factors = _cached(v, key, lambda: _multi_hot_side(cooc.data[col].to(dtype), binary))
        a, b = cooc.data[rows].to(dtype), cooc.data[col].to(dtype)
        partial_overlap_into(
            a, b, cooc.rule, binary, b_side=side, b_factors=factors, known=known, weights=c
        )
        return
    block = cooc.data[rows, col].to(dtype)
    mask = ~torch.isnan(block)
    known.copy_(mask)
    if c is not None:
        c.copy_(block).masked_fill_(~mask, 0)  # block may be a view of the data


def _multi_hot_side(b: Tensor, binary: bool):
    """The columns' side of :func:`~mgll.targets.overlap.partial_overlap_into`, once per view."""
    side = partial_side(b, left=False)
    return side, right_factors(side) if binary else None


def _cached(v: GroupView, key, make):
    if key not in v.sides:
        v.sides[key] = make()
    return v.sides[key]


def _id_sides(ids: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """Class ids as ranks (as :func:`_ranks`; -1 has its own) and annotated as 0/1 in ``dtype``."""
    return _ranks(ids, dtype), (ids >= 0).to(dtype)


def keep_known(x: Tensor, known: Tensor | None) -> Tensor:
    """``x`` with 0 at the unknown pairs, in place; ``known`` a bool or a 0/1 float mask."""
    if known is None:
        return x
    return x.mul_(known) if known.is_floating_point() else x.masked_fill_(~known, 0)


def mask_logits(z: Tensor, known: Tensor | None) -> Tensor:
    """Unknown logits set to the most negative float, whose exponential is exactly 0."""
    return z if known is None else z.masked_fill(~known, torch.finfo(z.dtype).min)


def partial_kl_strip(
    problem: Problem,
    logits: list[Tensor],
    rows: slice,
    want_grad: bool,
    shifts=None,
    exps=None,
    *,
    weight: Tensor | None = None,
    outs: list[Tensor] | None = None,
):
    r"""The smooth KL of image rows ``rows`` with unknowns, and its gradient w.r.t. their logits.

    The value is :func:`mgll._terms.partial_smooth_kl_rows` (docs/partial_annotation.rst); the
    gradient is analytic, the derivative of exactly that expression:
    :math:`\partial/\partial q^g_j = [q^g_j > 0](\log(q^g_j/m_j) + 1) - [\exists h: q^h_j > 0]`
    for a granularity g where the image is compared, back through
    :math:`q = u / \sum u`, :math:`u = (\mathrm{softmax}(z) R \odot \mathrm{support}) S`.
    ``logits[g]`` holds the rows' full (r, K_g) logits; ``shifts[g]``, when given, a bound on
    them (:func:`usable_shift`): the support's softmax is then one exponential of the shifted
    logits times the support, never an exponential of a masked logit.  ``exps[g]``, when given
    (paired granularities with a shift), is that exponential :math:`e^{z - b}` already computed
    by the caller; it is overwritten.  ``outs``, when given, receive ``weight`` times the
    gradients in place (``outs[g] += weight * dL/dz^g``), and none is returned.
    """
    part = problem.partial
    dtype = logits[0].dtype
    take = part.annotated[:, rows]  # (G, n)
    count = take.sum(0)
    compared = count >= 2
    # the support: the samples annotated wherever the image is, i.e. at no granularity where the
    # image is and they are not: a count of small integers (exact), 0/1 in the compute dtype
    support = (take.T.to(dtype) @ (~part.annotated).to(dtype)).le_(0)  # (n, N)
    probs, us, shifted = [], [], []
    for g, (z, r) in enumerate(zip(logits, part.owners, strict=True)):
        shift = None if shifts is None else shifts[g]
        # paired with a shift: the softmax is 0 off the support exactly (e^{z - b} times it)
        shifted.append(r is None and shift is not None)
        if shifted[g]:  # kept as E and 1 / its row sum: prob = E / sum, never divided out
            e = exps[g] if exps is not None and exps[g] is not None else torch.sub(z, shift).exp_()
            e.mul_(support)
            total = e.sum(1, keepdim=True)
            inv = torch.where(total > 0, total, torch.ones_like(total)).reciprocal_()
            prob = (e, inv)
            pooled = apply_map(e, part.groups)  # E itself for the samples' support
            us.append(pooled * inv if pooled is e else pooled.mul_(inv))
        else:
            prob = torch.softmax(z if r is not None else mask_logits(z, support > 0), dim=1)
            us.append(apply_map((prob if r is None else prob @ r) * support, part.groups))
        probs.append(prob)
    u = torch.stack(us)  # (G, n, J)
    total = u.sum(-1, keepdim=True)
    q = safe_divide(u, total) * take[:, :, None]
    m = safe_divide(q.sum(0), count[:, None].to(q.dtype))
    positive = q > 0
    log_ratio = torch.where(positive, q, 1).log() - torch.where(positive, m.expand_as(q), 1).log()
    kl = torch.where(positive, q * log_ratio, 0).sum((0, 2))
    kl = torch.where(compared, kl, 0)
    value = kl.clamp_min(0).sum()  # each row's KL >= 0, up to rounding
    if not want_grad:
        return value, None
    any_positive = positive.any(0, keepdim=True)
    gq = torch.where(positive, log_ratio + 1, 0) - (take[:, :, None] & any_positive).to(q.dtype)
    gq = gq * compared[None, :, None]
    gu = safe_divide(gq - (q * gq).sum(-1, keepdim=True), total) * take[:, :, None]
    grads = []
    w = 1.0 if weight is None else weight
    for g, (prob, r) in enumerate(zip(probs, part.owners, strict=True)):
        if shifted[g]:
            # softmax backward, prob = E / sum (0 off the support, so is its gradient): its row
            # dot product sum_k prob_k (gu S^T)_k = gu . u in the small space of u, and the
            # factor w / sum folded into the (n, J) and (n, 1) pieces before they spread
            e, inv = prob
            scale = inv * w
            dot = (gu[g] * us[g]).sum(-1, keepdim=True).mul_(scale)
            h = apply_map_transposed(gu[g] * scale, part.groups).sub_(dot)
            if outs is None:
                grads.append(h.mul_(e))
            else:
                outs[g].addcmul_(e, h)
            continue
        g_over = apply_map_transposed(gu[g], part.groups) * support
        g_prob = g_over if r is None else g_over @ r.T
        dot = (prob * g_prob).sum(-1, keepdim=True)  # softmax backward, in place
        grad = g_prob.sub_(dot).mul_(prob)
        if outs is None:
            grads.append(grad if weight is None else grad.mul_(weight))
        else:
            outs[g].add_(grad.mul_(w))
    return value, (None if outs is not None else grads)


def col_targets(problem: Problem, v: GroupView, rows: slice, cols: list[slice], dtype):
    """W^c[rows, cols[g]] (bank targets normalised per column) for the t2i side, or None.

    None when the stack is paired: then the t2i side reads the same C as the i2t side.
    """
    if v.col_inv is None or all(problem.col_weights[g] is None for g in v.gs):
        return None
    return torch.stack([problem.col_weights[g][rows, cols[g]].to(dtype) for g in v.gs])


#: Largest logit bound used as a fixed log-sum-exp shift: exp(z - b) >= exp(-2 b) stays a
#: normal number (float32: exp(-80) > 1.2e-38; float64: exp(-700) > 2.2e-308).
_SHIFT_LIMIT = {torch.float32: 40.0, torch.float64: 350.0}


def usable_shift(bound: float | None, dtype: torch.dtype) -> float | None:
    r"""The batch's logit bound b (:attr:`~mgll._problem.Problem.logit_bound`) as the
    log-sum-exp shift, or None.

    When :math:`b` is small enough that :math:`e^{z-b}` can neither overflow nor underflow to
    a subnormal for :math:`|z| \le b`, it replaces the per-row and per-column maximum as the
    log-sum-exp shift (normalised features give :math:`b = s`): one pass fewer each.
    """
    limit = _SHIFT_LIMIT.get(dtype)
    return bound if bound is not None and limit is not None and bound <= limit else None


def row_softmax(z: Tensor, shift: float | None = None) -> tuple[Tensor, Tensor]:
    """Row softmax P and row log-sum-exp of a (G', r, k) block with complete rows.

    ``shift``: a bound on every logit from :func:`usable_shift`, used instead of the row maximum.
    """
    if shift is not None:
        p = torch.sub(z, shift).exp_()
        total = p.sum(-1, keepdim=True)
        return p.div_(total), total.log_().add_(shift)
    top = z.amax(-1, keepdim=True)
    p = torch.sub(z, top).exp_()
    total = p.sum(-1, keepdim=True)
    return p.div_(total), top + total.log()


def _part(x: Tensor | None, s: slice, dim: int) -> Tensor | None:
    if x is None:
        return None
    return x[:, s] if dim == 1 else x[..., s]


def tile_terms(
    z: Tensor,
    c: Tensor | None,
    v: GroupView,
    *,
    rs: slice,
    cs: slice,
    bias: Tensor | None,
    prob: Tensor | None,
    clse: Tensor | None,
    want_grad: bool,
    c_col: Tensor | None = None,
    col_part: Tensor | None = None,
    dz_out: Tensor | None = None,
    known: Tensor | None = None,
):
    r"""A tile's share of the terms that need no log-sum-exp, and its whole dL/dZ.

    Everything after the logits ``z``, the targets ``c`` and the view ``v`` is keyword-only:
    several arguments are slices or tensors of the same shape, and a swapped pair would give
    a wrong gradient without an error.

    ``rs``/``cs`` index the tile's rows/columns inside the block (``v``'s vectors); ``prob``
    is the row softmax of the tile and ``clse`` the column log-sum-exp (when those sides are
    owned and wanted).  ``c_col`` (bank targets: W^c of :func:`col_targets`) replaces ``c`` on
    the t2i side.  Returns the soft-CLIP share :math:`-\sum W Z`, the pointwise sum, dZ
    (or None) and the pointwise share of dL/db.  ``col_part``, when the caller has it, is the
    column-softmax part of dZ (column weight times column softmax), reused as dZ's buffer.
    ``dz_out``: where the pointwise term's last update writes dZ (may be ``z`` itself, which is
    not read after it), saving the caller a copy.  ``known`` (G', r, k), bool or 0/1: the known pairs
    when some are unknown (``c`` and ``c_col`` are then 0 at the others, and ``prob`` /
    ``clse`` were computed over the known pairs): the pointwise term keeps the known ones.
    """
    row_inv, row_mass = _part(v.row_inv, rs, 1), _part(v.row_mass, rs, 1)
    col_inv, col_mass = _part(v.col_inv, cs, 2), _part(v.col_mass, cs, 2)
    y_coef = v.y_coef if v.y_coef is None or v.y_coef.shape[1] == 1 else v.y_coef[:, rs]
    zero = z.new_zeros(())
    ce, pw, db = zero, zero, zero
    # the parts linear in Z: -sum_ik C_ik Z_ik (row_inv_i + col_inv_k + y_coef_i)
    split = c_col is not None and col_inv is not None  # the t2i side has its own targets
    coef = [x for x in (row_inv, None if split else col_inv, y_coef) if x is not None]
    if coef:
        cz = c * z
        row_sums = cz.sum(-1, keepdim=True)
        if row_inv is not None:
            ce = ce - (row_inv * row_sums).sum()
        if col_inv is not None and not split:
            ce = ce - (col_inv * cz.sum(1, keepdim=True)).sum()
    if split:
        ce = ce - (col_inv * (c_col * z).sum(1, keepdim=True)).sum()
    dz = None
    if want_grad:
        if col_part is not None:
            dz = col_part
        elif col_mass is not None:  # the column softmax times its weight, in one buffer
            dz = torch.sub(z, clse).exp_().mul_(col_mass)
        elif row_mass is not None:
            dz = prob * row_mass
        else:
            dz = torch.zeros_like(z)
        if row_mass is not None and col_mass is not None:
            dz.addcmul_(prob, row_mass)
        rowwise = [x for x in (row_inv, y_coef) if x is not None]
        if rowwise:  # (G', n, 1) or (G', 1, 1): no full-size sum of the coefficients
            dz.addcmul_(c, rowwise[0] if len(rowwise) == 1 else rowwise[0] + rowwise[1], value=-1)
        if col_inv is not None:
            dz.addcmul_(c_col if split else c, col_inv, value=-1)
    if v.w_pw is not None:
        # each term softplus(x) - y x = relu(x) - y x + log(1 + e^-|x|) is computed elementwise,
        # so a decided pair gives a small non-negative number, not the rounding of two sums
        if v.y_rows is not None:
            y = c * v.y_rows[:, rs]
        elif y_coef is not None:
            y = c  # 0/1 co-occurrence (ids, or 0/1 labels with "any"): binary targets are C
        else:
            y = c.clamp_max(1) if v.graded else (c > 0).to(z.dtype)
            if want_grad:
                dz.addcmul_(y, v.w_pw, value=-1)
        # with unknown pairs the two parts are added elementwise and masked once
        x, log_part, sig = softplus(z, bias, want_grad, known, summed=known is None)
        if v.y_rows is None and (y_coef is not None or not v.graded):
            # binary y: relu(x) - y x = relu(x (1 - 2y)), exactly, one pass
            hinge = torch.addcmul(x, x, y, value=-2).clamp_min_(0)
        else:
            hinge = x.clamp_min(0).sub_(y * x)
        if known is None:
            per = hinge.sum((1, 2)) + log_part
        else:
            per = keep_known(hinge.add_(log_part), known).sum((1, 2))
        pw = pw + (v.w_pw.flatten() * per).sum()
        if want_grad:
            dz = (
                dz.addcmul_(sig, v.w_pw)
                if dz_out is None
                else torch.addcmul(dz, sig, v.w_pw, out=dz_out)
            )
            if bias is not None:  # dL/db: only when there is a bias
                db = (v.w_pw * (sig.sum((1, 2), keepdim=True) - y.sum((1, 2), keepdim=True))).sum()
    return ce, pw, dz, db


def softplus(
    z: Tensor, bias: Tensor | None, want_grad: bool, known: Tensor | None = None, summed=True
):
    r"""x = z + b, the per-granularity sums of :math:`\log(1 + e^{-|x|})`, and sigmoid(x).

    :math:`\mathrm{softplus}(x) = \max(x, 0) + \log(1 + e^{-|x|})`, with :math:`\log(1+e)`
    computed as :math:`\log u + (e - (u - 1))/u`, :math:`u = 1 + e`: exact to a few ulp, and
    only ``exp`` and ``log`` (``log1p`` and ``softplus`` are scalar loops on some CPUs).
    ``known``: sums and sigmoid over the known pairs only (0 elsewhere).  ``summed=False``:
    :math:`\log(1 + e^{-|x|})` itself, elementwise and not masked, instead of the sums.
    """
    x = z if bias is None else z + bias
    e = x.abs().neg_().exp_()
    u = e + 1
    delta = e.sub_(u - 1).div_(u)
    log_u = u.log_()
    if summed:
        sums = keep_known(log_u, known).sum((1, 2)) + keep_known(delta, known).sum((1, 2))
    else:
        sums = log_u.add_(delta)
    if not want_grad:
        return x, sums, None
    return x, sums, keep_known(torch.sigmoid(x), known)


# ------------------------------------------------------------------------------ smooth KL


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
