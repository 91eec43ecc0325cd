"""Triton kernels of ``backend="triton"`` (imported only by :mod:`mgll.backends.triton_kernels`).

Layout shared by every kernel.  ``X`` is the (N, D) image features, ``T`` the (G, K_max, D) text
features of all granularities stacked (bank granularities with fewer texts are zero-padded and
masked by ``KS[g] = K_g``).  Logits are never stored: every kernel recomputes its
(BLOCK_M x BLOCK_N) tiles ``Z = s * X_i T_k^T`` with fp32 accumulation, looping over D in
chunks of BLOCK_D.  The co-occurrence C^g is rebuilt per tile from what the batch carries
(``kind``, a runtime flag so one compiled kernel serves all three):

* 0: paired integer ids, ``TGT`` (G, N) float holding compact ids 0..U-1,
  ``C_ik = ids_i == ids_k``;
* 1: paired multi-hot label vectors, ``TGT`` (G, N, C_max) float, ``C_ik = rule(a_i, a_k)``
  with the overlap rule ``RULE[g]`` (see ``_triton_tiles._overlap``);
* 2: bank targets, ``TGT`` (G, N, K_max) float, loaded as is.

Forward: :func:`stats_kernel` keeps online log-sum-exp and target-weighted sums per row (image
rows against texts) or per column (texts against images, ``TEXT_ROWS``); :func:`kl_kernel`
computes the paired smooth KL in log space from the row log-sum-exps.  Backward:
:func:`dx_kernel` (one program per image row block) and :func:`dt_kernel` (one program per text
column block) recompute the tiles, form dL/dZ and accumulate dX and dT without atomics; the
row-block kernel also writes per-row partial sums for d(scale) and d(bias).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgll.backends._triton_tiles import NEG, _dot_rows, _log_mixture, _softplus, _targets

#: Fields of the per-line statistics written by ``stats_kernel`` (dim 1 of its output).
ST_LSE, ST_C, ST_CZ, ST_SP, ST_YZ, ST_Y = (tl.constexpr(i) for i in range(6))
N_STATS = tl.constexpr(6)


@triton.jit(do_not_specialize=["N", "KMAX", "D", "NCLS", "kind", "graded"])
def stats_kernel(
    X,
    T,
    TGT,
    RULE,
    OUT,
    SCALE,
    BIAS,
    KS,
    LO,
    HI,
    N,
    KMAX,
    D,
    NCLS,
    kind,
    graded,
    TEXT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """Per-line statistics of granularity ``g = program_id(1)`` for lines ``LO[g]..HI[g]``.

    Lines are image rows against all K_g texts, or (``TEXT_ROWS``) text columns against all N
    images.  Writes ``OUT[g, :, line]``: log-sum-exp, sum C, sum C z, and for image rows
    sum softplus(z + b), sum Y z and sum Y with Y = 1[C>0] (``graded``: min(C, 1)).
    ``PARTIAL``: every sum, the log-sum-exp included, runs over the known pairs only (the tile's
    NaN targets are unknown pairs); a line without one has log-sum-exp about -1e30.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    k_g = tl.load(KS + g)
    lo = tl.load(LO + g)
    hi = tl.load(HI + g)
    scale = tl.load(SCALE)
    bias = tl.load(BIAS)
    T_g = T + g.to(tl.int64) * KMAX * D
    if TEXT_ROWS:
        A, B, n_other = T_g, X, N
    else:
        A, B, n_other = X, T_g, k_g
    start = lo + pid * BLOCK_M
    offs_a = start + tl.arange(0, BLOCK_M)
    mask_a = offs_a < hi
    end = tl.where(start < hi, n_other, 0)

    m = tl.full((BLOCK_M,), NEG, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_cz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_sp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_yz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b0 in range(0, end, BLOCK_N):
        offs_b = b0 + tl.arange(0, BLOCK_N)
        mask_b = offs_b < n_other
        z = scale * _dot_rows(A, B, offs_a, offs_b, mask_a, mask_b, D, BLOCK_D, PREC)
        c = _targets(
            TGT,
            RULE,
            g,
            offs_a,
            offs_b,
            mask_a,
            mask_b,
            N,
            KMAX,
            NCLS,
            kind,
            TEXT_ROWS,
            BLOCK_C,
            PARTIAL,
        )
        keep = mask_b[None, :]
        if PARTIAL:  # unknown pairs (NaN targets) leave every sum and the softmax
            keep = keep & (c == c)
        z_lse = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_lse, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z_lse - m_new[:, None]), 1)
        m = m_new
        c = tl.where(keep, c, 0.0)
        s_c += tl.sum(c, 1)
        s_cz += tl.sum(c * z, 1)
        if not TEXT_ROWS:
            sp = _softplus(z + bias)
            s_sp += tl.sum(tl.where(keep, sp, 0.0), 1)
            y = tl.where(graded != 0, tl.minimum(c, 1.0), (c > 0).to(tl.float32))
            s_yz += tl.sum(y * z, 1)
            s_y += tl.sum(y, 1)
    n_lines = KMAX if TEXT_ROWS else N
    out = OUT + g * N_STATS * n_lines + offs_a
    tl.store(out + ST_LSE * n_lines, m + tl.log(tl.maximum(l, 1e-30)), mask=mask_a)
    tl.store(out + ST_C * n_lines, s_c, mask=mask_a)
    tl.store(out + ST_CZ * n_lines, s_cz, mask=mask_a)
    if not TEXT_ROWS:
        tl.store(out + ST_SP * n_lines, s_sp, mask=mask_a)
        tl.store(out + ST_YZ * n_lines, s_yz, mask=mask_a)
        tl.store(out + ST_Y * n_lines, s_y, mask=mask_a)


@triton.jit(do_not_specialize=["N", "D", "G"])
def kl_kernel(
    X,
    T,
    LSE,
    OUT,
    SCALE,
    LO,
    HI,
    N,
    D,
    G,
    GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """``OUT[g, i] = KL(P^g_i || M_i)`` for paired granularities (K_g = N), rows ``LO..HI``.

    ``LSE`` is (G, N): the row log-sum-exps from ``stats_kernel``.  All in log space: for a
    fixed (i, k) the G log-probabilities are ``Z^g_ik - lse^g_i``.
    """
    lo = tl.load(LO)
    hi = tl.load(HI)
    scale = tl.load(SCALE)
    start = lo + tl.program_id(0) * BLOCK_M
    offs_i = start + tl.arange(0, BLOCK_M)
    mask_i = offs_i < hi
    end = tl.where(start < hi, N, 0)
    offs_g = tl.arange(0, GP)
    acc = tl.zeros((BLOCK_M, GP), dtype=tl.float32)
    for k0 in range(0, end, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < N
        lm = _log_mixture(
            X, T, LSE, N, scale, offs_i, offs_k, mask_i, mask_k, N, D, G, BLOCK_D, PREC
        )
        for g in range(G):
            lse = tl.load(LSE + g * N + offs_i, mask=mask_i, other=0.0)
            z = scale * _dot_rows(
                X, T + (g * N).to(tl.int64) * D, offs_i, offs_k, mask_i, mask_k, D, BLOCK_D, PREC
            )
            lq = tl.minimum(z - lse[:, None], 0.0)
            term = tl.where(mask_k[None, :], tl.exp(lq) * (lq - lm), 0.0)
            acc += tl.where(offs_g[None, :] == g, tl.sum(term, 1)[:, None], 0.0)
    ptrs = OUT + offs_g[None, :] * N + offs_i[:, None]
    tl.store(ptrs, acc, mask=mask_i[:, None] & (offs_g[None, :] < G))
