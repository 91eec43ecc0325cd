"""Tile helpers shared by the Triton kernels of ``backend="triton"`` (see ``_triton_fwd``)."""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (avoids inf - inf)


@triton.jit
def _dot_rows(A, B, offs_a, offs_b, mask_a, mask_b, D, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """<A[offs_a], B[offs_b]> for row-major (*, D) matrices: a (len(a), len(b)) fp32 tile."""
    acc = tl.zeros((offs_a.shape[0], offs_b.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(
            A + offs_a[:, None] * D + offs_d[None, :],
            mask=mask_a[:, None] & mask_d[None, :],
            other=0.0,
        )
        b = tl.load(
            B + offs_b[:, None] * D + offs_d[None, :],
            mask=mask_b[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _targets(
    TGT,
    RULE,
    g,
    offs_r,
    offs_c,
    mask_r,
    mask_c,
    N,
    KMAX,
    NCLS,
    kind,
    TEXT_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """The tile of C^g (paired labels or bank weights) for tile rows ``offs_r``, columns ``offs_c``.

    Tile rows are images and columns texts, or the other way round when ``TEXT_ROWS`` (paired
    C is symmetric; bank C is read transposed).  ``PARTIAL``: some labels are unknown
    (docs/partial_annotation.rst); the tile then holds NaN at its unknown pairs, found from the
    label vectors of its rows and columns (ids: -1; label sets: :func:`_overlap_partial`; bank
    targets: their own NaN).
    """
    if kind == 0:
        a = tl.load(TGT + g * N + offs_r, mask=mask_r, other=-1.0)
        b = tl.load(TGT + g * N + offs_c, mask=mask_c, other=-2.0)
        c = (a[:, None] == b[None, :]).to(tl.float32)
        if PARTIAL:  # the missing id is -1: a pair is known when both ids are annotated
            c = tl.where((a[:, None] >= 0) & (b[None, :] >= 0), c, float("nan"))
    elif kind == 1:
        if PARTIAL:
            c = _overlap_partial(TGT, RULE, g, offs_r, offs_c, mask_r, mask_c, N, NCLS, BLOCK_C)
        else:
            c = _overlap(TGT, RULE, g, offs_r, offs_c, mask_r, mask_c, N, NCLS, BLOCK_C)
    else:
        base = TGT + (g * N).to(tl.int64) * KMAX
        if TEXT_ROWS:
            ptrs = base + offs_c[None, :].to(tl.int64) * KMAX + offs_r[:, None]
        else:
            ptrs = base + offs_r[:, None].to(tl.int64) * KMAX + offs_c[None, :]
        c = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return c


@triton.jit
def _overlap(TGT, RULE, g, offs_r, offs_c, mask_r, mask_c, N, NCLS, BLOCK_C: tl.constexpr):
    """Multi-hot overlap of the label vectors of ``offs_r`` and ``offs_c`` by rule ``RULE[g]``.

    Rules (see :mod:`mgll.targets.overlap`): 0 any of 0/1 sets (``<a, b> > 0``), 1 count
    (``<a, b>``), 2 Jaccard of 0/1 sets (``<a, b> / (|a| + |b| - <a, b>)``), from exact fp32
    products over chunks of classes; 3 any of probabilities (``1 - prod_c (1 - a_c b_c)``) and
    4 fuzzy Jaccard (``sum min / sum max``), elementwise over the classes one at a time.
    """
    rule = tl.load(RULE + g)
    base = TGT + (g * N).to(tl.int64) * NCLS
    inter = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)
    miss = tl.full((offs_r.shape[0], offs_c.shape[0]), 1.0, dtype=tl.float32)
    size_r = tl.zeros((offs_r.shape[0],), dtype=tl.float32)
    size_c = tl.zeros((offs_c.shape[0],), dtype=tl.float32)
    if rule < 3:
        for c0 in range(0, NCLS, BLOCK_C):
            offs_l = c0 + tl.arange(0, BLOCK_C)
            mask_l = offs_l < NCLS
            la = tl.load(
                base + offs_r[:, None] * NCLS + offs_l[None, :],
                mask=mask_r[:, None] & mask_l[None, :],
                other=0.0,
            )
            lb = tl.load(
                base + offs_c[:, None] * NCLS + offs_l[None, :],
                mask=mask_c[:, None] & mask_l[None, :],
                other=0.0,
            )
            inter = tl.dot(la, tl.trans(lb), inter, input_precision="ieee")
            size_r += tl.sum(la, 1)
            size_c += tl.sum(lb, 1)
    else:
        for cls in range(0, NCLS):
            la = tl.load(base + offs_r * NCLS + cls, mask=mask_r, other=0.0)
            lb = tl.load(base + offs_c * NCLS + cls, mask=mask_c, other=0.0)
            miss = miss * (1.0 - la[:, None] * lb[None, :])
            inter += tl.minimum(la[:, None], lb[None, :])
            size_r += la
            size_c += lb
    union = size_r[:, None] + size_c[None, :] - inter
    jaccard = inter / tl.where(union > 0, union, 1.0)
    c = tl.where(rule == 0, (inter > 0).to(tl.float32), jaccard)
    c = tl.where(rule == 1, inter, c)
    c = tl.where(rule == 3, 1.0 - miss, c)
    return c


@triton.jit
def _label_parts(x):
    """Of loaded labels that may be NaN (not annotated) or -1 (no class: padding, masked rows):
    the value with 0 where not annotated, 1 where annotated, 1 where the label could be shared
    (all but an annotated 0), as floats."""
    seen = x >= 0  # False for NaN and for -1
    value = tl.where(seen, x, 0.0)
    shareable = (x > 0) | (x != x)
    return value, seen.to(tl.float32), shareable.to(tl.float32)


@triton.jit
def _overlap_partial(TGT, RULE, g, offs_r, offs_c, mask_r, mask_c, N, NCLS, BLOCK_C: tl.constexpr):
    """:func:`_overlap` of label vectors that may hold NaN, with NaN at the unknown pairs.

    As :func:`mgll.targets.overlap.partial_overlap`: a pair's weight is the rule over the
    classes both annotate (NaN read as 0; Jaccard's union over the classes both annotate), and
    the pair is known when the weight is positive, or when no class can be shared (for each,
    one of the two is an annotated 0) and both rows are annotated somewhere.  Entries -1 are no
    class at all (the padding of granularities with fewer classes).
    """
    rule = tl.load(RULE + g)
    base = TGT + (g * N).to(tl.int64) * NCLS
    inter = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)
    union = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)  # sum max, + inter
    share = tl.zeros((offs_r.shape[0], offs_c.shape[0]), dtype=tl.float32)
    miss = tl.full((offs_r.shape[0], offs_c.shape[0]), 1.0, dtype=tl.float32)
    seen_r = tl.zeros((offs_r.shape[0],), dtype=tl.float32)
    seen_c = tl.zeros((offs_c.shape[0],), dtype=tl.float32)
    if rule < 3:
        for c0 in range(0, NCLS, BLOCK_C):
            offs_l = c0 + tl.arange(0, BLOCK_C)
            mask_l = offs_l < NCLS
            la = tl.load(
                base + offs_r[:, None] * NCLS + offs_l[None, :],
                mask=mask_r[:, None] & mask_l[None, :],
                other=-1.0,
            )
            lb = tl.load(
                base + offs_c[:, None] * NCLS + offs_l[None, :],
                mask=mask_c[:, None] & mask_l[None, :],
                other=-1.0,
            )
            va, sa, ha = _label_parts(la)
            vb, sb, hb = _label_parts(lb)
            inter = tl.dot(va, tl.trans(vb), inter, input_precision="ieee")
            union = tl.dot(va, tl.trans(sb), union, input_precision="ieee")
            union = tl.dot(sa, tl.trans(vb), union, input_precision="ieee")
            share = tl.dot(ha, tl.trans(hb), share, input_precision="ieee")
            seen_r += tl.sum(sa, 1)
            seen_c += tl.sum(sb, 1)
    else:
        for cls in range(0, NCLS):
            la = tl.load(base + offs_r * NCLS + cls, mask=mask_r, other=-1.0)
            lb = tl.load(base + offs_c * NCLS + cls, mask=mask_c, other=-1.0)
            va, sa, ha = _label_parts(la)
            vb, sb, hb = _label_parts(lb)
            miss = miss * (1.0 - va[:, None] * vb[None, :])
            inter += tl.minimum(va[:, None], vb[None, :])
            union += va[:, None] * sb[None, :] + sa[:, None] * vb[None, :]
            share += ha[:, None] * hb[None, :]
            seen_r += sa
            seen_c += sb
    jaccard = inter / tl.where(union > inter, union - inter, 1.0)
    c = tl.where(rule == 0, (inter > 0).to(tl.float32), jaccard)
    c = tl.where(rule == 1, inter, c)
    c = tl.where(rule == 3, 1.0 - miss, c)
    annotated = (seen_r[:, None] > 0) & (seen_c[None, :] > 0)
    known = (c > 0) | ((share == 0) & annotated)
    return tl.where(known, c, float("nan"))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log_mixture(
    X,
    T,
    LSE,
    lse_stride,
    scale,
    offs_i,
    offs_k,
    mask_i,
    mask_k,
    N,
    D,
    G,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """log M_ik = logsumexp_g(Z^g_ik - lse^g_i) - log G for the paired (identity) smooth KL.

    ``T`` is (G, N, D); ``LSE + g * lse_stride`` holds the N row log-sum-exps of granularity g.
    """
    mx = tl.full((offs_i.shape[0], offs_k.shape[0]), NEG, dtype=tl.float32)
    sm = tl.zeros((offs_i.shape[0], offs_k.shape[0]), dtype=tl.float32)
    for g in range(G):
        lse = tl.load(LSE + g * lse_stride + offs_i, mask=mask_i, other=0.0)
        z = scale * _dot_rows(
            X, T + (g * N).to(tl.int64) * D, offs_i, offs_k, mask_i, mask_k, D, BLOCK_D, PREC
        )
        lq = tl.minimum(z - lse[:, None], 0.0)
        mx_new = tl.maximum(mx, lq)
        sm = sm * tl.exp(mx - mx_new) + tl.exp(lq - mx_new)
        mx = mx_new
    return mx + tl.log(sm) - tl.log(G * 1.0)
