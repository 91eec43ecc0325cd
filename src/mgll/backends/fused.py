r"""``backend="fused"``: one autograd Function with analytic gradients, row-chunked.

Forward computes the logits of all granularities with one batched product per stack of
granularities (paired mode: a (G, N, N) stack), then walks over them in chunks of rows.  Each
chunk yields its share of the three terms *and* its gradient :math:`\partial L/\partial Z`
(:mod:`mgll.backends._blockmath`), which overwrites the logits in place; column statistics
(the column log-sum-exp of the t2i direction) come from one extra pass before that.  The only
full-size buffer is therefore the logits, which become their own gradient, and backward is
just the two products :math:`\partial L/\partial X = s\,\partial Z\,T` and
:math:`\partial L/\partial T = s\,\partial Z^\top X`.

Backward is exact for any output gradients: when the three terms receive the same gradient
(the loss is their sum, the usual case) it reuses the stored :math:`\partial Z`; otherwise it
recomputes :math:`\partial Z` with each term's weight multiplied by its own gradient.

Extra memory: one :math:`N \times K_g` buffer per granularity (two blocks of rows and columns
when the problem owns only part of them) plus chunk temporaries of about ``CHUNK`` elements.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mgll._problem import LossConfig, LossTerms, Problem
from mgll.backends import _blockmath as bm
from mgll.backends import first_order_only

#: Elements per chunk of rows (all stacks together): about half a MB of float32 per temporary.
CHUNK = 1 << 17


def compute(problem: Problem, config: LossConfig) -> LossTerms:
    plan = bm.make_plan(problem, config)
    zero = problem.scale.new_zeros(())
    if not plan.blocks:
        return LossTerms(zero, zero, zero)
    bias = problem.bias
    out = _FusedLoss.apply(plan, problem.image, problem.scale, bias, *problem.texts)
    return LossTerms(*out)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: bm.Plan, image: Tensor, scale: Tensor, bias: Tensor | None, *texts):
        want_grad = any(ctx.needs_input_grad[1:])
        values, grads = _run(plan, plan.stats, image, scale, bias, texts, want_grad)
        ctx.plan = plan
        if want_grad:  # saved tensors are freed right after backward (unless retain_graph)
            dz_blocks, ctx.db = grads
            ctx.save_for_backward(image, scale, *texts, *(dz for dzs in dz_blocks for dz in dzs))
        return values[0], values[1], values[2]

    @staticmethod
    @first_order_only("fused")
    @once_differentiable
    def backward(ctx, g_clip: Tensor, g_pw: Tensor, g_kl: Tensor):
        plan: bm.Plan = ctx.plan
        image, scale, *rest = ctx.saved_tensors
        g_all = plan.problem.num_granularities
        texts, flat = rest[:g_all], iter(rest[g_all:])
        stored = [[next(flat) for _ in blk.groups] for blk in plan.blocks]
        outputs = (g_clip, g_pw, g_kl)
        active = [g for g, on in zip(outputs, (plan.ce, plan.pw, plan.kl), strict=True) if on]
        with torch.autocast(image.device.type, enabled=False):
            # the same tensor (a summed loss) needs no host read to be found equal
            if all(g is active[0] or torch.equal(active[0], g) for g in active[1:]):
                dz_blocks, db = stored, ctx.db
                factor = active[0]
            else:  # different gradients per term: recompute dZ with the weights scaled
                stats = bm.scaled(plan.stats, outputs)
                bias = plan.problem.bias
                _, (dz_blocks, db) = _run(plan, stats, image, scale, bias, texts, True)
                factor = scale.new_ones(())
            d_image, d_scale, d_texts = _feature_grads(plan.layout, image, texts, scale, dz_blocks)
        d_bias = None if plan.problem.bias is None else db * factor
        return None, d_image * factor, d_scale * factor, d_bias, *(t * factor for t in d_texts)


def _feature_grads(layout: bm.Layout, image: Tensor, texts, scale: Tensor, dz_blocks):
    """dX = s dZ T, dT = s dZ^T X and ds = sum dZ * Z / s = sum (dZ T) * X, block by block."""
    d_image = torch.zeros_like(image)
    d_texts = [torch.zeros_like(t) for t in texts]
    d_scale = scale.new_zeros(())
    for blk, dzs in zip(layout.blocks, dz_blocks, strict=True):
        x = image[blk.rows]
        for gs, dz in zip(blk.groups, dzs, strict=True):
            t = torch.stack([texts[g][blk.cols[g]] for g in gs])
            dx = torch.bmm(dz, t).sum(0)
            d_scale = d_scale + (dx * x).sum()
            d_image[blk.rows] += dx.mul_(scale)
            dt = torch.bmm(dz.transpose(1, 2), x.expand(len(gs), *x.shape)).mul_(scale)
            for j, g in enumerate(gs):
                d_texts[g][blk.cols[g]] += dt[j]
    return d_image, d_scale, d_texts


def _run(plan: bm.Plan, st: bm.Stats, image, scale, bias, texts, want_grad: bool, out=None):
    """The three weighted terms; with ``want_grad`` also dZ per block (in the logits' memory).

    ``out``, when given, is a flat buffer that the logits (then dZ) of every stack fill in
    order (blocks, then stacks): see :func:`stack_shapes`.
    """
    values = [scale.new_zeros(()) for _ in range(3)]
    db = scale.new_zeros(())
    dz_blocks = []
    buffers = iter(_views(out, stack_shapes(plan.layout))) if out is not None else None
    for blk in plan.blocks:
        zs, block_db = _block(
            plan,
            st,
            blk,
            image=image,
            scale=scale,
            bias=bias,
            texts=texts,
            want_grad=want_grad,
            values=values,
            buffers=buffers,
        )
        dz_blocks.append(zs)
        db = db + block_db
    return values, (dz_blocks, db)


def stack_shapes(layout: bm.Layout) -> list[tuple[int, int, int]]:
    """(G', rows, columns) of every stack of logits, blocks in order."""
    shapes = []
    for blk in layout.blocks:
        rows = len(range(layout.num_images)[blk.rows])
        for gs in blk.groups:
            shapes.append((len(gs), rows, len(range(layout.widths[gs[0]])[blk.cols[gs[0]]])))
    return shapes


def _views(flat: Tensor, shapes) -> list[Tensor]:
    out, start = [], 0
    for shape in shapes:
        size = shape[0] * shape[1] * shape[2]
        out.append(flat[start : start + size].view(shape))
        start += size
    return out


def _block(
    plan: bm.Plan,
    st: bm.Stats,
    blk: bm.Block,
    *,
    image: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    texts,
    want_grad: bool,
    values: list[Tensor],
    buffers=None,
):
    """One block's logits, its share of the terms (added to ``values``) and, with
    ``want_grad``, dZ written over the logits; returns them and the block's dL/db.

    Keyword-only after the block: a swapped pair of tensors would give a wrong gradient."""
    p = plan.problem
    n_all, dtype = p.num_images, image.dtype
    x = image[blk.rows]
    xs = x * scale  # the scale folded into the features: no pass over the logits
    views = [bm.group_view(plan, st, blk, gs, dtype) for gs in blk.groups]
    zs = []
    for gs in blk.groups:
        t = torch.stack([texts[g][blk.cols[g]] for g in gs])
        a, b = xs.expand(len(gs), *xs.shape), t.transpose(1, 2)
        zs.append(torch.bmm(a, b) if buffers is None else torch.bmm(a, b, out=next(buffers)))
    # with unknown pairs and a fixed shift, exp(Z - b) of the raw logits times the known mask
    # (exp of a normal number: fast); without a shift the unknown logits are masked in place
    shifts = [bm.usable_shift(p.logit_bound, dtype)] * len(blk.groups)
    clses = [
        _column_lse(v, z, values, sh, _known_rows(plan, v, blk))
        for v, z, sh in zip(views, zs, shifts, strict=True)
    ]
    # with a fixed shift b, one exp E = e^(Z - b) gives the row softmax (E / row sum) and the
    # column softmax (E / column sum): col_factors = column weight * e^(b - column lse)
    col_factors = [
        None if sh is None or v.col_mass is None else v.col_mass * torch.exp(sh - clse)
        for v, sh, clse in zip(views, shifts, clses, strict=True)
    ]
    step = max(1, CHUNK // max(1, sum(z.shape[0] * z.shape[2] for z in zs)))
    db = scale.new_zeros(())
    need_prob = blk.do_rows and (plan.ce or plan.kl)
    need_c = plan.ce or (plan.pw and blk.do_rows) or any(v.partial for v in views)
    partial_kl = plan.kl and blk.do_rows and p.partial is not None
    for a in range(0, x.shape[0], step):
        rs = slice(a, a + step)
        rows = bm.sub(blk.rows, n_all, rs)
        parts, exps = [], {}
        for v, z, clse, shift, factor in zip(views, zs, clses, shifts, col_factors, strict=True):
            chunk = z[:, rs]
            c = None
            if need_c and not (v.partial and shift is not None):
                c = bm.targets(p, v, rows, blk.cols, dtype)
            c_col = bm.col_targets(p, v, rows, blk.cols, dtype) if need_c else None
            known = None
            if v.partial and shift is not None:  # unknown pairs: out of every softmax and sum
                c, known = bm.partial_targets(p, v, rows, blk.cols, dtype)
                c_col = None if c_col is None else c_col.nan_to_num(0.0)
            elif v.partial:  # no shift: the unknown logits masked (done already with a t2i side)
                c, c_col, known = bm.known_targets(c, c_col)
                chunk.masked_fill_(~known, torch.finfo(dtype).min)
            col_part = None
            if shift is not None and v.partial and (need_prob or want_grad):
                e = torch.sub(chunk, shift).exp_()
                if partial_kl:  # the partial KL reads e^(Z - b) as well, times its own support
                    exps.update(zip(v.gs, e, strict=True))
                    e = e * known
                else:
                    e.mul_(known)
                prob, rlse = _shared_softmax(e, shift) if need_prob else (None, None)
                col_part = e.mul_(factor) if want_grad and factor is not None else None
            elif factor is not None and (need_prob or want_grad):
                e = torch.sub(chunk, shift).exp_()
                prob, rlse = _shared_softmax(e, shift) if need_prob else (None, None)
                col_part = e.mul_(factor) if want_grad else None
            else:
                prob, rlse = bm.row_softmax(chunk, shift) if need_prob else (None, None)
            # dZ may overwrite the chunk's logits at once unless the paired KL still reads them
            # (and the partial KL, after every stack)
            out = chunk if want_grad and not (partial_kl or (plan.kl and st.kl_identity)) else None
            ce, pw, dz, dbias = bm.tile_terms(
                chunk,
                c,
                v,
                rs=rs,
                cs=slice(None),
                bias=bias,
                prob=prob,
                clse=clse,
                want_grad=want_grad,
                c_col=c_col,
                col_part=col_part,
                dz_out=out,
                known=known,
            )
            if v.row_mass is not None:
                ce = ce + (v.row_mass[:, rs] * rlse).sum()
            values[0] += ce
            values[1] += pw
            db = db + dbias
            parts.append((dz, prob, rlse))
        if partial_kl:
            kl_shifts = {g: sh for gs, sh in zip(blk.groups, shifts, strict=True) for g in gs}
            masked = any(v.partial and sh is None for v, sh in zip(views, shifts, strict=True))
            logits = None if masked else zs  # masked logits: recomputed from the features
            kl = (xs[rs], texts, logits, kl_shifts, None if masked else exps)
            _partial_kl(plan, st, blk, kl, rs, rows, parts, want_grad, values)
        elif plan.kl and blk.do_rows:
            _smooth_kl(plan, st, blk, zs, rs, parts, want_grad, values)
        if want_grad:
            for z, (dz, _, _) in zip(zs, parts, strict=True):
                target = z[:, rs]
                if dz.data_ptr() != target.data_ptr():
                    target.copy_(dz)
    return zs, db


def _shared_softmax(e: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    """Row softmax and row log-sum-exp from E = exp(Z - shift) (E is left unchanged).

    A row whose E is all 0 (only unknown pairs) gets a zero softmax and the log-sum-exp
    ``shift``: it is no anchor, its weights are 0."""
    total = e.sum(-1, keepdim=True)
    total = torch.where(total > 0, total, 1.0)
    return e * total.reciprocal(), total.log().add_(shift)


def _column_lse(v: bm.GroupView, z: Tensor, values, shift=None, known=None) -> Tensor | None:
    """Column log-sum-exp of a stack (one pass over the logits) and its share of the t2i term.

    ``shift``: a bound on every logit (see :func:`~mgll.backends._blockmath.usable_shift`) used
    instead of the column maximum, which then needs no pass of its own.  ``known(rows)``: the
    known pairs (0/1) of a slice of the stack's rows, when some pairs are unknown: with a shift
    the exponentials are multiplied by them (a column without a known pair gets the
    log-sum-exp ``shift``, its weight is 0); without, their logits are set to the most
    negative float in place (the row direction reads them so, too).
    """
    if v.col_mass is None:
        return None
    step = max(1, CHUNK // max(1, z.shape[0] * z.shape[2]))
    if known is not None and shift is None:  # masked in place, once for both directions
        for a in range(0, z.shape[1], step):
            rs = slice(a, a + step)
            z[:, rs].masked_fill_(known(rs) == 0, torch.finfo(z.dtype).min)
        known = None
    if shift is not None:
        top = z.new_full((z.shape[0], 1, z.shape[2]), shift)
    else:
        top = z.amax(1, keepdim=True)
    total = torch.zeros_like(top)
    for a in range(0, z.shape[1], step):
        e = torch.sub(z[:, a : a + step], top).exp_()
        total += (e if known is None else e.mul_(known(slice(a, a + step)))).sum(1, keepdim=True)
    if known is not None:
        total = torch.where(total > 0, total, 1.0)
    clse = top + total.log_()
    values[0] += (v.col_mass * clse).sum()
    return clse


def _smooth_kl(plan, st: bm.Stats, blk, zs, rs, parts, want_grad, values):
    """The smooth-KL share of a chunk of full rows (all granularities at once)."""
    p = plan.problem
    if st.kl_identity:  # paired samples: one stack holding every granularity
        dz, prob, rlse = parts[0]
        value, grad = bm.kl_identity(zs[0][:, rs], rlse, prob, want_grad)
        values[2] += value * st.w_kl
        if want_grad:
            dz.addcmul_(grad, st.w_kl)
        return
    probs, where = [None] * p.num_granularities, {}
    for gs, (_, prob, _) in zip(blk.groups, parts, strict=True):
        for j, g in enumerate(gs):
            probs[g] = prob[j]
            where[g] = j
    value, _, gu, dot = bm.kl_general_rows(probs, p.kl_maps, st.kl_part)
    values[2] += value * st.w_kl
    if not want_grad:
        return
    taking = [g for g in range(p.num_granularities) if st.kl_part[g]]
    dz_of = {g: parts[i][0] for i, gs in enumerate(blk.groups) for g in gs}
    for j, g in enumerate(taking):
        bm.kl_general_grad(probs[g], p.kl_maps[g], gu[j], dot[j], st.w_kl, dz_of[g][where[g]])


def _known_rows(plan: bm.Plan, v: bm.GroupView, blk: bm.Block):
    """``known(rs)``: the known pairs of rows ``rs`` of the block's stack (None: all known)."""
    if not v.partial:
        return None
    p = plan.problem

    def known(rs: slice) -> Tensor:
        return bm.known_mask(p, v, bm.sub(blk.rows, p.num_images, rs), blk.cols, p.image.dtype)

    return known


def _partial_kl(plan, st: bm.Stats, blk, kl, rs, rows, parts, want_grad, values):
    """The smooth-KL share of a chunk of full rows ``rs`` when some labels are unknown.

    ``kl``: (the rows' scaled features, the texts, the block's stacks of logits or None, the
    logit bound of each granularity, the exponentials e^(Z - b) of the chunk that the row
    pass kept, by granularity).  The chunk's logits are read in the stacks (a row block
    holds every column); None when some were masked in place (a stack without a fixed
    shift): they are then recomputed from the features.
    """
    xs, texts, zs, shifts, exps = kl
    g_all = plan.problem.num_granularities
    if zs is None:
        logits, shift_of, exp_of = [xs @ t.T for t in texts], None, None
    else:
        logits, shift_of = [None] * g_all, [shifts[g] for g in range(g_all)]
        exp_of = [exps.get(g) for g in range(g_all)]
        for gs, z in zip(blk.groups, zs, strict=True):
            for j, g in enumerate(gs):
                logits[g] = z[j, rs]
    outs = [None] * g_all  # the gradient is added to dZ in place, times the weight
    for gs, (dz, _, _) in zip(blk.groups, parts, strict=True):
        for j, g in enumerate(gs):
            outs[g] = None if dz is None else dz[j]
    value, _ = bm.partial_kl_strip(
        plan.problem, logits, rows, want_grad, shift_of, exp_of, weight=st.w_kl, outs=outs
    )
    values[2] += value * st.w_kl
