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

#: Elements per chunk of a stack of logits (a few hundred KB: the chunk stays in cache).
CHUNK = 1 << 16


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
        if want_grad:
            ctx.save_for_backward(image, scale, *texts)
            ctx.grads = grads
        return values[0], values[1], values[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_clip: Tensor, g_pw: Tensor, g_kl: Tensor):
        image, scale, *texts = ctx.saved_tensors
        plan: bm.Plan = ctx.plan
        active = [
            g for g, on in zip((g_clip, g_pw, g_kl), (plan.ce, plan.pw, plan.kl), strict=True) if on
        ]
        with torch.autocast(image.device.type, enabled=False):
            if all(torch.equal(active[0], g) for g in active[1:]):
                dz_blocks, ds, db = ctx.grads
                factor = active[0] if active else scale.new_zeros(())
            else:  # different gradients per term: recompute dZ with the weights scaled
                stats = bm.scaled(plan.stats, (g_clip, g_pw, g_kl))
                bias = plan.problem.bias
                _, (dz_blocks, ds, db) = _run(plan, stats, image, scale, bias, texts, True)
                factor = scale.new_ones(())
            d_image, d_texts = _feature_grads(plan, image, texts, scale * factor, dz_blocks)
        ctx.grads = None
        d_bias = None if plan.problem.bias is None else db * factor
        return None, d_image, ds * factor, d_bias, *d_texts


def _feature_grads(plan: bm.Plan, image: Tensor, texts, factor: Tensor, dz_blocks):
    """dX = s dZ T and dT = s dZ^T X, block by block and stack by stack."""
    d_image = torch.zeros_like(image)
    d_texts = [torch.zeros_like(t) for t in texts]
    for blk, dzs in zip(plan.blocks, dz_blocks, strict=True):
        x = image[blk.rows]
        for gs, dz in zip(blk.groups, dzs, strict=True):
            t = torch.stack([texts[g][blk.cols[g]] for g in gs])
            d_image[blk.rows] += torch.matmul(dz, t).sum(0).mul_(factor)
            dt = torch.matmul(dz.transpose(1, 2), x).mul_(factor)
            for j, g in enumerate(gs):
                d_texts[g][blk.cols[g]] += dt[j]
    return d_image, d_texts


def _run(plan: bm.Plan, st: bm.Stats, image, scale, bias, texts, want_grad: bool):
    """The three weighted terms; with ``want_grad`` also dZ per block (in the logits' memory)."""
    values = [scale.new_zeros(()) for _ in range(3)]
    ds, db = scale.new_zeros(()), scale.new_zeros(())
    dz_blocks = []
    for blk in plan.blocks:
        zs = _block(plan, st, blk, image, scale, bias, texts, want_grad, values)
        dz_blocks.append([z for z, _ in zs])
        ds = ds + sum(d for _, (d, _) in zs)
        db = db + sum(b for _, (_, b) in zs)
    return values, (dz_blocks, ds, db)


def _block(plan, st: bm.Stats, blk: bm.Block, image, scale, bias, texts, want_grad, values):
    p = plan.problem
    n_all, dtype = p.num_images, image.dtype
    x = image[blk.rows]
    n = x.shape[0]
    zs = []
    for gs in blk.groups:
        t = torch.stack([texts[g][blk.cols[g]] for g in gs])
        zs.append(torch.matmul(x, t.transpose(1, 2)).mul_(scale))
    cols = [
        _column_side(plan, st, blk, gs, z, values) for gs, z in zip(blk.groups, zs, strict=True)
    ]
    width = sum(z.shape[0] * z.shape[2] for z in zs)
    step = max(1, bm_chunk(width))
    acc = [[scale.new_zeros(()), scale.new_zeros(())] for _ in zs]
    for a in range(0, n, step):
        rows = bm.sub(blk.rows, n_all, slice(a, a + step))
        parts = []
        for gs, z, col in zip(blk.groups, zs, cols, strict=True):
            chunk = z[:, a : a + step]
            parts.append(
                _chunk(plan, st, blk, gs, chunk, rows, col, bias, dtype, want_grad, values)
            )
        if plan.kl and blk.do_rows:
            _smooth_kl(plan, st, blk, zs, a, step, parts, want_grad, values)
        if want_grad:
            for j, (z, (dz, dbias, _, _)) in enumerate(zip(zs, parts, strict=True)):
                chunk = z[:, a : a + step]
                acc[j][0] = acc[j][0] + (dz * chunk).sum() / scale
                acc[j][1] = acc[j][1] + dbias
                chunk.copy_(dz)
    return [(z, tuple(a)) for z, a in zip(zs, acc, strict=True)]


def bm_chunk(width: int) -> int:
    return CHUNK // max(width, 1)


def _column_side(plan, st: bm.Stats, blk: bm.Block, gs, z: Tensor, values):
    """Column log-sum-exp of a stack (one pass over the logits) and its share of the t2i term."""
    if not (plan.ce and blk.do_cols):
        return None
    cols = blk.cols[gs[0]]
    top = z.amax(1, keepdim=True)
    total = torch.zeros_like(top)
    step = max(1, bm_chunk(z.shape[0] * z.shape[2]))
    for a in range(0, z.shape[1], step):
        total += torch.sub(z[:, a : a + step], top).exp_().sum(1, keepdim=True)
    clse = top + total.log()
    w_col = bm.scalars(st.w_col, gs)
    inv = bm.stacked(st.col_inv, gs, cols, 2) * w_col
    mass = bm.stacked(st.col_mass, gs, cols, 2) * w_col
    values[0] += (mass * clse).sum()
    return clse, inv, mass


def _chunk(plan, st: bm.Stats, blk, gs, z, rows, col, bias, dtype, want_grad, values):
    """One chunk of rows of one stack: its share of the terms and its dZ."""
    p = plan.problem
    need_c = plan.ce or (plan.pw and blk.do_rows)
    c = bm.targets(p, gs, rows, blk.cols, dtype) if need_c else None
    dz = torch.zeros_like(z) if want_grad else None
    prob = rlse = None
    if plan.ce:
        coef = 0
        if blk.do_rows:
            coef = bm.stacked(st.row_inv, gs, rows, 1) * bm.scalars(st.w_row, gs)
        if col is not None:
            coef = coef + col[1]
        cw = c * coef
        values[0] -= (cw * z).sum()
        if want_grad:
            dz.sub_(cw)
    if blk.do_rows and (plan.ce or plan.kl):
        prob, rlse = bm.row_softmax(z)
        if plan.ce:
            mass = bm.stacked(st.row_mass, gs, rows, 1) * bm.scalars(st.w_row, gs)
            values[0] += (mass * rlse).sum()
            if want_grad:
                dz.addcmul_(prob, mass)
    if col is not None and want_grad:
        dz.addcmul_(torch.sub(z, col[0]).exp_(), col[2])
    dbias = z.new_zeros(())
    if plan.pw and blk.do_rows:
        y = c * bm.stacked(st.row_inv, gs, rows, 1) if st.soft_target else (c > 0).to(dtype)
        w = bm.scalars(st.w_pw, gs)
        sums, grad = bm.pointwise(z, y, bias, want_grad)
        values[1] += (sums * w.flatten()).sum()
        if want_grad:
            grad.mul_(w)
            dbias = grad.sum()
            dz.add_(grad)
    return dz, dbias, prob, rlse


def _smooth_kl(plan, st: bm.Stats, blk, zs, a, step, parts, want_grad, values):
    """The smooth-KL share of a chunk of full rows (all granularities at once)."""
    p = plan.problem
    if st.kl_identity:  # paired samples: one stack holding every granularity
        (dz, _, prob, rlse), z = parts[0], zs[0][:, a : a + step]
        sums, grad = bm.kl_identity(z, prob, rlse, want_grad)
        values[2] += sums.sum() * st.w_kl
        if want_grad:
            dz.add_(grad.mul_(st.w_kl))
        return
    probs, where = [None] * p.num_granularities, {}
    for gs, (_, _, prob, _) in zip(blk.groups, parts, strict=True):
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
        grad = bm.kl_general_grad(probs[g], p.kl_maps[g], gu[j], dot[j])
        dz_of[g][where[g]].add_(grad.mul_(st.w_kl))
