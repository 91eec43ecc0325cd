r"""``backend="tiled"``: never holds an N x K matrix; logits are recomputed tile by tile.

Forward walks over (row tile, column tile) pairs of every stack of granularities, computing
each tile :math:`Z = s\,X_I T_J^\top` from the features and keeping only per-row and
per-column statistics: online log-sum-exp (running maximum and rescaled sum, as in
flash-attention and Inf-CL), the target-weighted sums :math:`\sum C Z` of the soft-CLIP term,
and the pointwise sums.  Targets come block by block from :meth:`CoOccurrence.block`, so
paired labels are never expanded to N x N.  Once a row tile's log-sum-exp is complete, a second
pass over its column tiles computes the smooth KL (paired: in log space from the G tiles of the
same samples; pooled supports: accumulating :math:`u^g = P^g T^g` per row tile).

Backward recomputes every tile, forms its :math:`\partial L/\partial Z` from the saved
statistics (:mod:`mgll.backends._blockmath`) and accumulates
:math:`\partial X_I \mathrel{+}= s\,\partial Z\,T_J` and
:math:`\partial T_J \mathrel{+}= s\,\partial Z^\top X_I` at once.

Extra memory: :math:`O((N + \sum_g K_g)\,G)` statistics and a few tiles of ``TILE`` elements
(plus one (rows of a tile) x J buffer for pooled smooth-KL supports of J groups).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mgll._problem import LossConfig, LossTerms, Problem
from mgll.backends import _blockmath as bm
from mgll.backends import first_order_only
from mgll.targets.cooc import apply_map, map_rows

#: Image rows per tile and text columns per tile (a few MB of float32 per temporary).
TILE_ROWS = 256
TILE_COLS = 2048


def compute(problem: Problem, config: LossConfig) -> LossTerms:
    plan = bm.make_plan(problem, config)
    zero = problem.scale.new_zeros(())
    if not plan.blocks:
        return LossTerms(zero, zero, zero)
    out = _TiledLoss.apply(plan, problem.image, problem.scale, problem.bias, *problem.texts)
    return LossTerms(*out)


class _TiledLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: bm.Plan, image: Tensor, scale: Tensor, bias: Tensor | None, *texts):
        values, saved = _forward(plan, image, scale, bias, texts)
        ctx.plan, ctx.saved = plan, saved
        ctx.save_for_backward(image, scale, *texts)
        return values[0], values[1], values[2]

    @staticmethod
    @first_order_only("tiled")
    @once_differentiable
    def backward(ctx, g_clip: Tensor, g_pw: Tensor, g_kl: Tensor):
        image, scale, *texts = ctx.saved_tensors
        plan: bm.Plan = ctx.plan
        stats = bm.scaled(plan.stats, (g_clip, g_pw, g_kl))
        with torch.autocast(image.device.type, enabled=False):
            grads = _backward(plan, stats, ctx.saved, image, scale, plan.problem.bias, texts)
        d_image, ds, db, d_texts = grads
        d_bias = None if plan.problem.bias is None else db
        return None, d_image, ds, d_bias, *d_texts


class _Tiles:
    """The tiles of one block: row tiles of the block's images, column tiles per stack."""

    def __init__(self, plan: bm.Plan, blk: bm.Block, image: Tensor, scale: Tensor, texts):
        p = plan.problem
        self.plan, self.blk, self.scale = plan, blk, scale
        self.x = image[blk.rows]
        self.xs = self.x * scale  # the scale folded into the features
        self.n_all = p.num_images
        self.stacks = [torch.stack([texts[g][blk.cols[g]] for g in gs]) for gs in blk.groups]
        self.texts = texts

    def row_tiles(self):
        n = self.x.shape[0]
        for a in range(0, n, TILE_ROWS):
            yield (
                a,
                slice(a, a + TILE_ROWS),
                bm.sub(self.blk.rows, self.n_all, slice(a, a + TILE_ROWS)),
            )

    def col_tiles(self, j: int):
        """Column tiles of stack j: (local slice, global column slice per granularity)."""
        gs, k = self.blk.groups[j], self.stacks[j].shape[1]
        p = self.plan.problem
        for b in range(0, k, TILE_COLS):
            local = slice(b, b + TILE_COLS)
            cols = list(self.blk.cols)
            for g in gs:
                cols[g] = bm.sub(self.blk.cols[g], p.texts[g].shape[0], local)
            yield local, cols

    def logits(self, rows: slice, j: int, local: slice) -> Tensor:
        return torch.matmul(self.xs[rows], self.stacks[j][:, local].transpose(1, 2))


def _forward(plan: bm.Plan, image, scale, bias, texts):
    st, p = plan.stats, plan.problem
    values = [scale.new_zeros(()) for _ in range(3)]
    saved = []
    for blk in plan.blocks:
        tiles = _Tiles(plan, blk, image, scale, texts)
        views = [bm.group_view(plan, st, blk, gs, image.dtype) for gs in blk.groups]
        n = tiles.x.shape[0]
        rlse = [z.new_zeros(len(gs), n, 1) for gs, z in zip(blk.groups, tiles.stacks, strict=True)]
        col_top = [
            z.new_full((len(gs), 1, z.shape[1]), -torch.inf)
            for gs, z in zip(blk.groups, tiles.stacks, strict=True)
        ]
        col_sum = [torch.zeros_like(t) for t in col_top]
        kl_rows = image.new_zeros(p.num_granularities, n, 1)
        for _, rsl, rows in tiles.row_tiles():
            for j, v in enumerate(views):
                r = tiles.x[rsl].shape[0]
                top = image.new_full((len(v.gs), r, 1), -torch.inf)
                total = image.new_zeros(len(v.gs), r, 1)
                for local, cols in tiles.col_tiles(j):
                    z, c, c_col, known = _tile(plan, blk, v, tiles, rsl, rows, j, local, cols)
                    ce, pw, _, _ = bm.tile_terms(
                        z,
                        c,
                        v,
                        rs=rsl,
                        cs=local,
                        bias=bias,
                        prob=None,
                        clse=None,
                        want_grad=False,
                        c_col=c_col,
                        known=known,
                    )
                    values[0] += ce
                    values[1] += pw
                    if blk.do_rows:
                        top, total = _online(z, top, total, -1)
                    if v.col_mass is not None:
                        col_top[j][..., local], col_sum[j][..., local] = _online(
                            z, col_top[j][..., local], col_sum[j][..., local], 1
                        )
                if blk.do_rows:
                    rlse[j][:, rsl] = top + total.log()
                    if v.row_mass is not None:
                        values[0] += (v.row_mass[:, rsl] * rlse[j][:, rsl]).sum()
            if plan.kl and blk.do_rows and p.partial is not None:
                values[2] += st.w_kl * sum(v for v, _, _ in _partial_kl(plan, tiles, rsl, False))
            elif plan.kl and blk.do_rows:
                values[2] += st.w_kl * _kl_forward(plan, st, tiles, rsl, rlse, kl_rows)
        clse = []
        for j, v in enumerate(views):
            clse.append(col_top[j] + col_sum[j].log())
            if v.col_mass is not None:
                values[0] += (v.col_mass * clse[j]).sum()
        saved.append((rlse, clse, kl_rows))
    return values, saved


def _online(z: Tensor, top: Tensor, total: Tensor, dim: int):
    """Running maximum and rescaled sum of exp along ``dim`` (online log-sum-exp)."""
    new_top = torch.maximum(top, z.amax(dim, keepdim=True))
    safe = torch.where(new_top == -torch.inf, torch.zeros_like(new_top), new_top)
    total = total * torch.exp(top - safe) + torch.sub(z, safe).exp_().sum(dim, keepdim=True)
    return new_top, total


def _target(plan, blk, v: bm.GroupView, rows, cols, dtype):
    need = plan.ce or (plan.pw and blk.do_rows) or v.partial
    return bm.targets(plan.problem, v, rows, cols, dtype) if need else None


def _tile(plan, blk, v: bm.GroupView, tiles: _Tiles, rsl, rows, j, local, cols):
    """A tile's logits and targets; with unknown pairs, their logits masked and known mask."""
    z = tiles.logits(rsl, j, local)
    c = _target(plan, blk, v, rows, cols, z.dtype)
    c_col = _col_target(plan, blk, v, rows, cols, z.dtype)
    if not v.partial:
        return z, c, c_col, None
    c, c_col, known = bm.known_targets(c, c_col)
    return bm.mask_logits(z, known), c, c_col, known


def _partial_kl(plan, tiles: _Tiles, rsl, want_grad: bool):
    """The smooth KL of a row tile with unknown labels, by strips of full rows.

    A strip holds few enough rows that its G rows of logits fit in about one tile; yields
    (value, strip slice, gradients w.r.t. each granularity's logits of the strip).
    """
    p = plan.problem
    x = tiles.x[rsl]
    width = sum(t.shape[0] for t in p.texts)
    step = max(1, (TILE_ROWS * TILE_COLS) // max(1, width))
    start = range(tiles.x.shape[0])[rsl].start
    for a in range(0, x.shape[0], step):
        strip = slice(start + a, start + a + step)
        logits = [tiles.xs[strip] @ t.T for t in tiles.texts]
        rows = bm.sub(tiles.blk.rows, tiles.n_all, strip)
        value, grads = bm.partial_kl_strip(p, logits, rows, want_grad)
        yield value, strip, grads


def _col_target(plan, blk, v: bm.GroupView, rows, cols, dtype):
    return bm.col_targets(plan.problem, v, rows, cols, dtype) if plan.ce else None


def _kl_forward(plan, st: bm.Stats, tiles: _Tiles, rsl, rlse, kl_rows) -> Tensor:
    """Smooth-KL sum of one row tile (second pass over its columns)."""
    if st.kl_identity:  # paired samples: one stack, all G granularities on the same samples
        for local, _ in tiles.col_tiles(0):
            z = tiles.logits(rsl, 0, local)
            a = bm.kl_identity_terms(z, rlse[0][:, rsl])[0]
            kl_rows[:, rsl] += a.sum(-1, keepdim=True)
        return kl_rows[:, rsl].sum(0).clamp_min(0).sum()  # each row's KL >= 0, up to rounding
    return _pooled(plan, st, tiles, rsl, rlse)[0]


def _pooled(plan, st: bm.Stats, tiles: _Tiles, rsl, rlse):
    """u^g = P^g T^g for one row tile, accumulated over column tiles, then the pooled KL."""
    p = plan.problem
    us: dict[int, Tensor] = {}
    for j, gs in enumerate(tiles.blk.groups):
        for local, cols in tiles.col_tiles(j):
            prob = torch.sub(tiles.logits(rsl, j, local), rlse[j][:, rsl]).exp_()
            for i, g in enumerate(gs):
                if not st.kl_part[g]:
                    continue
                part = apply_map(prob[i], map_rows(p.kl_maps[g], cols[g]))
                us[g] = part if g not in us else us[g] + part
    taking = sorted(us)
    value, _, gu, dot = bm.kl_from_u([us[g] for g in taking])
    return value, {g: (gu[i], dot[i]) for i, g in enumerate(taking)}


def _backward(plan: bm.Plan, st: bm.Stats, saved, image, scale, bias, texts):
    d_image = torch.zeros_like(image)
    d_texts = [torch.zeros_like(t) for t in texts]
    ds, db = scale.new_zeros(()), scale.new_zeros(())
    for blk, (rlse, clse, kl_rows) in zip(plan.blocks, saved, strict=True):
        tiles = _Tiles(plan, blk, image, scale, texts)
        views = [bm.group_view(plan, st, blk, gs, image.dtype) for gs in blk.groups]
        d_x = d_image[blk.rows]
        for _, rsl, rows in tiles.row_tiles():
            pooled = None
            if plan.kl and blk.do_rows and plan.problem.partial is not None:
                for _, strip, grads in _partial_kl(plan, tiles, rsl, True):
                    x = tiles.x[strip]
                    for g, dz in enumerate(grads):
                        dz = dz * st.w_kl
                        dx = dz @ texts[g]
                        ds = ds + (dx * x).sum()
                        d_x[strip] += dx.mul_(scale)
                        d_texts[g] += (dz.T @ x).mul_(scale)
            elif plan.kl and blk.do_rows and not st.kl_identity:
                pooled = _pooled(plan, st, tiles, rsl, rlse)[1]
            x = tiles.x[rsl]
            for j, v in enumerate(views):
                for local, cols in tiles.col_tiles(j):
                    z = tiles.logits(rsl, j, local)
                    lse = (rlse[j][:, rsl], clse[j][..., local])
                    dz, dbias = _tile_grad(
                        plan,
                        st,
                        blk,
                        v,
                        z,
                        rsl=rsl,
                        local=local,
                        rows=rows,
                        cols=cols,
                        bias=bias,
                        lse=lse,
                        kl_rows=kl_rows[:, rsl],
                        pooled=pooled,
                    )
                    db = db + dbias
                    dx = torch.matmul(dz, tiles.stacks[j][:, local]).sum(0)
                    ds = ds + (dx * x).sum()
                    d_x[rsl] += dx.mul_(scale)
                    dt = torch.matmul(dz.transpose(1, 2), x).mul_(scale)
                    for i, g in enumerate(v.gs):
                        d_texts[g][cols[g]] += dt[i]
    return d_image, ds, db, d_texts


def _tile_grad(
    plan: bm.Plan,
    st: bm.Stats,
    blk: bm.Block,
    v: bm.GroupView,
    z: Tensor,
    *,
    rsl: slice,
    local: slice,
    rows: slice,
    cols: list[slice],
    bias: Tensor | None,
    lse: tuple[Tensor, Tensor],
    kl_rows: Tensor,
    pooled,
):
    """dL/dZ of one tile from the saved statistics, and its share of dL/db.

    ``rsl``/``local``: the tile's rows and columns inside the block; ``rows``/``cols``: the same
    as global slices; ``lse``: (row, column) log-sum-exps.  Keyword-only: the slices and the
    tensors have the same types, and a swapped pair would give a wrong gradient silently."""
    p = plan.problem
    c = _target(plan, blk, v, rows, cols, z.dtype)
    c_col = _col_target(plan, blk, v, rows, cols, z.dtype)
    known = None
    if v.partial:
        c, c_col, known = bm.known_targets(c, c_col)
        z = bm.mask_logits(z, known)
    prob = None
    if blk.do_rows and (plan.ce or plan.kl):
        prob = torch.sub(z, lse[0]).exp_()
    _, _, dz, dbias = bm.tile_terms(
        z,
        c,
        v,
        rs=rsl,
        cs=local,
        bias=bias,
        prob=prob,
        clse=lse[1],
        want_grad=True,
        c_col=c_col,
        known=known,
    )
    if plan.kl and blk.do_rows and p.partial is None:
        if st.kl_identity:
            a, q = bm.kl_identity_terms(z, lse[0])
            dz.addcmul_(a.addcmul_(q, kl_rows, value=-1), st.w_kl)
        else:
            for i, g in enumerate(v.gs):
                if g in pooled:
                    t = map_rows(p.kl_maps[g], cols[g])
                    bm.kl_general_grad(prob[i], t, *pooled[g], st.w_kl, dz[i])
    return dz, dbias
