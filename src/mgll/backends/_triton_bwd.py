"""Backward kernels of ``backend="triton"``: recompute tiles, accumulate dX and dT.

See :mod:`mgll.backends._triton_fwd` for the data layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgll.backends._triton_tiles import _dot_rows, _log_mixture, _sigmoid, _targets

#: Fields of the per-row backward coefficients (dim 1 of ``ROWF``).
RF_LSE, RF_CE, RF_INV, RF_PW, RF_KL, RF_KLV = (tl.constexpr(i) for i in range(6))
N_ROW_FIELDS = tl.constexpr(6)
#: Fields of the per-column backward coefficients (dim 1 of ``COLF``).
CF_LSE, CF_CE, CF_INV = (tl.constexpr(i) for i in range(3))
N_COL_FIELDS = tl.constexpr(3)
#: Integer arguments compiled as plain runtime values (one kernel for every batch and option).
_DYNAMIC_ARGS = ["row_lo", "row_hi", "col_lo", "col_hi", "N", "KMAX", "D", "NCLS", "G"]
_DYNAMIC_ARGS += ["soft_y", "kind", "has_kl"]


@triton.jit
def _dz_tile(
    X,
    T_g,
    TGT,
    TGT_C,
    RULE,
    ROWF,
    COLF,
    g,
    scale,
    bias,
    lm,
    offs_i,
    offs_k,
    mask_i,
    mask_k,
    N,
    KMAX,
    D,
    NCLS,
    soft_y,
    kind,
    has_kl,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    r"""dL/dZ^g on an (image rows x text columns) tile, with its row sums for d(scale) and d(bias).

    .. math::
        dZ = a_i (P - C/c_i) + a'_k (P' - C/c'_k) + w_i (\sigma(Z + b) - Y)
             + v_i P (\log P - \log M - \mathrm{KL}_i)

    with every coefficient (``ROWF``, ``COLF``) zero outside the lines this process owns.
    ``PARTIAL``: dZ is 0 at the unknown pairs (NaN targets), and both softmaxes are those of the
    known pairs (the saved log-sum-exps are theirs).
    Returns dZ (masked), ``sum_k dZ_ik Z_ik`` (d(scale) is its total over s) and
    ``sum_k dL_pointwise/dZ_ik`` (d(bias) is its total).
    """
    z = scale * _dot_rows(X, T_g, offs_i, offs_k, mask_i, mask_k, D, BLOCK_D, PREC)
    c = _targets(
        TGT, RULE, g, offs_i, offs_k, mask_i, mask_k, N, KMAX, NCLS, kind, False, BLOCK_C, PARTIAL
    )
    c_c = c  # the t2i side: bank targets normalised per column (W^c), else C itself
    if kind == 2:
        c_c = _targets(
            TGT_C,
            RULE,
            g,
            offs_i,
            offs_k,
            mask_i,
            mask_k,
            N,
            KMAX,
            NCLS,
            kind,
            False,
            BLOCK_C,
            PARTIAL,
        )
    valid = mask_i[:, None] & mask_k[None, :]
    if PARTIAL:  # unknown pairs: out of dZ (below), weight 0 in the target sums
        valid = valid & (c == c)
        c = tl.where(valid, c, 0.0)
        c_c = tl.where(valid, c_c, 0.0)
    rowf = ROWF + g * N_ROW_FIELDS * N + offs_i
    lse_r = tl.load(rowf + RF_LSE * N, mask=mask_i, other=0.0)
    inv_r = tl.load(rowf + RF_INV * N, mask=mask_i, other=0.0)
    lq = tl.minimum(z - lse_r[:, None], 0.0)  # <= 0 for owned rows; clamps the others
    p = tl.exp(lq)
    # soft CLIP in both directions and pointwise; coefficients are zero when a term is off
    ce_r = tl.load(rowf + RF_CE * N, mask=mask_i, other=0.0)
    colf = COLF + g * N_COL_FIELDS * KMAX + offs_k
    lse_c = tl.load(colf + CF_LSE * KMAX, mask=mask_k, other=0.0)
    ce_c = tl.load(colf + CF_CE * KMAX, mask=mask_k, other=0.0)
    inv_c = tl.load(colf + CF_INV * KMAX, mask=mask_k, other=0.0)
    p_c = tl.exp(tl.minimum(z - lse_c[None, :], 0.0))
    dz = ce_r[:, None] * (p - c * inv_r[:, None]) + ce_c[None, :] * (p_c - c_c * inv_c[None, :])
    w_pw = tl.load(rowf + RF_PW * N, mask=mask_i, other=0.0)
    # soft_y: 0 binary 1[C > 0], 1 soft (C normalised per row), 2 graded min(C, 1)
    y = tl.where(c > 0, 1.0, 0.0)
    y = tl.where(soft_y == 1, c * inv_r[:, None], tl.where(soft_y == 2, tl.minimum(c, 1.0), y))
    gpw = tl.where(valid, w_pw[:, None] * (_sigmoid(z + bias) - y), 0.0)
    d_bias = tl.sum(gpw, 1)
    dz += gpw
    if has_kl != 0:
        w_kl = tl.load(rowf + RF_KL * N, mask=mask_i, other=0.0)
        kl = tl.load(rowf + RF_KLV * N, mask=mask_i, other=0.0)
        dz += w_kl[:, None] * p * (lq - lm - kl[:, None])
    dz = tl.where(valid, dz, 0.0)
    return dz, tl.sum(dz * z, 1), d_bias


@triton.jit
def _accumulate(
    OUT, B, w, offs_o, offs_b, mask_o, mask_b, D, BLOCK_D: tl.constexpr, PREC: tl.constexpr
):
    """``OUT[offs_o, :] += w @ B[offs_b, :]`` for the fp32 (*, D) buffer OUT this program owns."""
    w = w.to(B.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        b = tl.load(
            B + offs_b[:, None] * D + offs_d[None, :],
            mask=mask_b[:, None] & mask_d[None, :],
            other=0.0,
        )
        ptrs = OUT + offs_o[:, None] * D + offs_d[None, :]
        mask = mask_o[:, None] & mask_d[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        acc = tl.dot(w, b, acc, input_precision=PREC)
        tl.store(ptrs, acc, mask=mask)
    tl.debug_barrier()  # the next tile reads what this one wrote, possibly from another thread


@triton.jit(do_not_specialize=[*_DYNAMIC_ARGS, "write_dx"])
def dx_kernel(
    X,
    T,
    TGT,
    TGT_C,
    RULE,
    ROWF,
    COLF,
    DX,
    RED,
    SCALE,
    BIAS,
    KS,
    row_lo,
    row_hi,
    col_lo,
    col_hi,
    N,
    KMAX,
    D,
    NCLS,
    G,
    soft_y,
    write_dx,
    kind,
    has_kl,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """One image row block: ``DX[i] += sum_g sum_k dZ^g_ik T^g_k`` (without the factor s).

    Also writes per-row partial sums ``RED[0, i] = sum dZ * Z`` (d(scale) = total / s) and
    ``RED[1, i] = sum dZ_pointwise`` (for d(bias)).  A block holding no owned row only visits
    the owned text columns ``col_lo..col_hi`` (union over granularities).
    """
    pid = tl.program_id(0)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    offs_i = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_i = offs_i < N
    owned = (pid * BLOCK_M < row_hi) & (pid * BLOCK_M + BLOCK_M > row_lo)
    k_lo = tl.where(owned, 0, col_lo)
    k_hi = tl.where(owned, KMAX, col_hi)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        lm = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if has_kl != 0:
            lm = _log_mixture(
                X,
                T,
                ROWF + RF_LSE * N,
                N_ROW_FIELDS * N,
                scale,
                offs_i,
                offs_k,
                mask_i,
                offs_k < N,
                N,
                D,
                G,
                BLOCK_D,
                PREC,
            )
        for g in range(G):
            k_g = tl.load(KS + g)
            if k0 < k_g:
                mask_k = (offs_k < k_hi) & (offs_k < k_g)
                T_g = T + (g * KMAX).to(tl.int64) * D
                dz, d_scale_g, d_bias_g = _dz_tile(
                    X,
                    T_g,
                    TGT,
                    TGT_C,
                    RULE,
                    ROWF,
                    COLF,
                    g,
                    scale,
                    bias,
                    lm,
                    offs_i,
                    offs_k,
                    mask_i,
                    mask_k,
                    N,
                    KMAX,
                    D,
                    NCLS,
                    soft_y,
                    kind,
                    has_kl,
                    BLOCK_D,
                    BLOCK_C,
                    PREC,
                    PARTIAL,
                )
                d_scale += d_scale_g
                d_bias += d_bias_g
                if write_dx != 0:
                    _accumulate(DX, T_g, dz, offs_i, offs_k, mask_i, mask_k, D, BLOCK_D, PREC)
    tl.store(RED + offs_i, d_scale, mask=mask_i)
    tl.store(RED + N + offs_i, d_bias, mask=mask_i)


@triton.jit(do_not_specialize=_DYNAMIC_ARGS)
def dt_kernel(
    X,
    T,
    TGT,
    TGT_C,
    RULE,
    ROWF,
    COLF,
    DT,
    SCALE,
    BIAS,
    KS,
    row_lo,
    row_hi,
    col_lo,
    col_hi,
    N,
    KMAX,
    D,
    NCLS,
    G,
    soft_y,
    kind,
    has_kl,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """One text column block: ``DT[g, k] += sum_i dZ^g_ik X_i`` (without the factor s).

    A block holding no owned column only visits the owned image rows ``row_lo..row_hi``.
    """
    pid = tl.program_id(0)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    offs_k = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    owned = (pid * BLOCK_N < col_hi) & (pid * BLOCK_N + BLOCK_N > col_lo)
    i_lo = tl.where(owned, 0, row_lo)
    i_hi = tl.where(owned, N, row_hi)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)
        mask_i = offs_i < i_hi
        lm = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if has_kl != 0:
            lm = _log_mixture(
                X,
                T,
                ROWF + RF_LSE * N,
                N_ROW_FIELDS * N,
                scale,
                offs_i,
                offs_k,
                mask_i,
                offs_k < N,
                N,
                D,
                G,
                BLOCK_D,
                PREC,
            )
        for g in range(G):
            k_g = tl.load(KS + g)
            if pid * BLOCK_N < k_g:
                mask_k = offs_k < k_g
                T_g = T + (g * KMAX).to(tl.int64) * D
                dz, _, _ = _dz_tile(
                    X,
                    T_g,
                    TGT,
                    TGT_C,
                    RULE,
                    ROWF,
                    COLF,
                    g,
                    scale,
                    bias,
                    lm,
                    offs_i,
                    offs_k,
                    mask_i,
                    mask_k,
                    N,
                    KMAX,
                    D,
                    NCLS,
                    soft_y,
                    kind,
                    has_kl,
                    BLOCK_D,
                    BLOCK_C,
                    PREC,
                    PARTIAL,
                )
                _accumulate(
                    DT + (g * KMAX).to(tl.int64) * D,
                    X,
                    tl.trans(dz),
                    offs_k,
                    offs_i,
                    mask_k,
                    mask_i,
                    D,
                    BLOCK_D,
                    PREC,
                )
