"""The autograd Function of ``backend="triton"``: kernel launches and the O(N + K) bookkeeping.

Imports no triton itself: the kernel modules come with the plan built by
:mod:`mgll.backends.triton_kernels`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from mgll._terms import safe_divide
from mgll.backends import first_order_only


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stack_texts(texts: tuple[Tensor, ...], kmax: int, dtype: torch.dtype) -> Tensor:
    if all(t.shape[0] == kmax for t in texts):
        return torch.stack([t.detach() for t in texts]).to(dtype).contiguous()
    out = texts[0].new_zeros(len(texts), kmax, texts[0].shape[1], dtype=dtype)
    for g, t in enumerate(texts):
        out[g, : t.shape[0]] = t.detach()
    return out


class TritonMGLL(torch.autograd.Function):
    """Weighted (soft CLIP, pointwise, paired smooth KL) from features, analytic gradients."""

    @staticmethod
    def forward(ctx, plan, image: Tensor, scale: Tensor, bias: Tensor | None, *texts: Tensor):
        with _on_device(image.device):  # triton launches on the current CUDA device
            return TritonMGLL._forward(ctx, plan, image, scale, bias, *texts)

    @staticmethod
    @first_order_only("triton")
    def backward(ctx, g_clip: Tensor, g_pw: Tensor, g_kl: Tensor):
        with _on_device(ctx.saved_tensors[0].device):
            return TritonMGLL._backward(ctx, g_clip, g_pw, g_kl)

    @staticmethod
    def _forward(ctx, plan, image: Tensor, scale: Tensor, bias: Tensor | None, *texts: Tensor):
        fwd = plan.fwd
        n, d, g, kmax = plan.n, image.shape[1], len(texts), max(plan.ks)
        dev = image.device
        x = image.detach().to(plan.dtype).contiguous()
        t = _stack_texts(texts, kmax, plan.dtype)
        s = scale.detach().float().reshape(1)
        b = bias.detach().float().reshape(1) if bias is not None else torch.zeros_like(s)
        blk = plan.blocks
        ks = torch.tensor(plan.ks, device=dev, dtype=torch.int32)
        common = dict(BLOCK_C=plan.block_c, PREC=plan.prec, PARTIAL=plan.partial, **blk)
        r_lo, r_hi = plan.rows
        lo = torch.full((g,), r_lo, device=dev, dtype=torch.int32)
        hi = torch.full((g,), r_hi, device=dev, dtype=torch.int32)
        stats_r = torch.zeros(g, int(fwd.N_STATS), n, device=dev)
        row_blocks = _cdiv(r_hi - r_lo, blk["BLOCK_M"])  # 0: no owned row, nothing to launch
        if row_blocks:
            fwd.stats_kernel[(row_blocks, g)](
                x, t, plan.targets, plan.rules, stats_r, s, b, ks, lo, hi, n, kmax, d, plan.n_classes,
                plan.kind, int(plan.graded), TEXT_ROWS=False, **common,
            )  # fmt: skip
        stats_c = torch.zeros(g, int(fwd.N_STATS), kmax, device=dev)
        width = max(c[1] - c[0] for c in plan.cols)
        if plan.has_ce and width:
            c_lo = torch.tensor([c[0] for c in plan.cols], device=dev, dtype=torch.int32)
            c_hi = torch.tensor([c[1] for c in plan.cols], device=dev, dtype=torch.int32)
            fwd.stats_kernel[(_cdiv(width, blk["BLOCK_M"]), g)](
                x, t, plan.targets_c, plan.rules, stats_c, s, b, ks, c_lo, c_hi, n, kmax, d, plan.n_classes, plan.kind,
                int(plan.graded), TEXT_ROWS=True, **common,
            )  # fmt: skip
        kl = torch.zeros(g, n, device=dev)
        if plan.has_kl and row_blocks:
            lse = stats_r[:, int(fwd.ST_LSE)].contiguous()
            fwd.kl_kernel[(row_blocks,)](
                x, t, lse, kl, s, lo, hi, n, d, G=g, GP=_pow2(g), PREC=plan.prec, **blk,
            )  # fmt: skip
        n_rows, n_cols = _anchor_counts(plan, stats_r, stats_c, fwd)
        a1, a2, a3 = plan.weights
        soft_clip = s.new_zeros(())
        if plan.has_ce:
            row = _ce_lines(stats_r, fwd).sum(1) / n_rows.clamp_min(1)
            col = _ce_lines(stats_c, fwd).sum(1) / n_cols.clamp_min(1)
            soft_clip = a1 * (plan.lam_ce * 0.5 * (row + col)).sum()
        pointwise = s.new_zeros(())
        if plan.has_pw:
            sp = stats_r[:, int(fwd.ST_SP)]
            if plan.soft_y:
                c, cz = stats_r[:, int(fwd.ST_C)], stats_r[:, int(fwd.ST_CZ)]
                yz = safe_divide(cz + b * c, c)
            else:
                yz = stats_r[:, int(fwd.ST_YZ)] + b * stats_r[:, int(fwd.ST_Y)]
            pointwise = a2 * (plan.lam_pw * (sp - yz).sum(1) / plan.norms).sum()
        smooth_kl = a3 * kl.sum() / n if plan.has_kl else s.new_zeros(())
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.dtypes = (image.dtype, *(t.dtype for t in texts))
        ctx.save_for_backward(x, t, s, b, stats_r, stats_c, kl, n_rows, n_cols)
        return soft_clip, pointwise, smooth_kl

    @staticmethod
    def _backward(ctx, g_clip: Tensor, g_pw: Tensor, g_kl: Tensor):
        plan = ctx.plan
        fwd, bwd = plan.fwd, plan.bwd
        x, t, s, b, stats_r, stats_c, kl, n_rows, n_cols = ctx.saved_tensors
        n, d = x.shape
        g, kmax = t.shape[0], t.shape[1]
        dev = x.device
        a1, a2, a3 = plan.weights
        r_lo, r_hi = plan.rows
        owned_r = _owned(n, [plan.rows] * g, dev)
        rowf = torch.zeros(g, int(bwd.N_ROW_FIELDS), n, device=dev)
        c_r = stats_r[:, int(fwd.ST_C)]
        rowf[:, int(bwd.RF_LSE)] = stats_r[:, int(fwd.ST_LSE)]
        rowf[:, int(bwd.RF_INV)] = safe_divide(torch.ones_like(c_r), c_r)
        colf = torch.zeros(g, int(bwd.N_COL_FIELDS), kmax, device=dev)
        if plan.has_ce:
            coef = (a1 * 0.5 * plan.lam_ce * _grad(g_clip, s)).unsqueeze(1)
            rowf[:, int(bwd.RF_CE)] = coef / n_rows.clamp_min(1).unsqueeze(1) * (c_r > 0)
            c_c = stats_c[:, int(fwd.ST_C)]
            colf[:, int(bwd.CF_LSE)] = stats_c[:, int(fwd.ST_LSE)]
            colf[:, int(bwd.CF_CE)] = coef / n_cols.clamp_min(1).unsqueeze(1) * (c_c > 0)
            colf[:, int(bwd.CF_INV)] = safe_divide(torch.ones_like(c_c), c_c)
        if plan.has_pw:
            coef = a2 * plan.lam_pw * _grad(g_pw, s) / plan.norms
            rowf[:, int(bwd.RF_PW)] = coef.unsqueeze(1) * owned_r
        if plan.has_kl:
            rowf[:, int(bwd.RF_KL)] = a3 * _grad(g_kl, s) / n * owned_r
            rowf[:, int(bwd.RF_KLV)] = kl
        ks = torch.tensor(plan.ks, device=dev, dtype=torch.int32)
        c_lo, c_hi = min(c[0] for c in plan.cols), max(c[1] for c in plan.cols)
        flags = dict(kind=plan.kind, has_kl=int(plan.has_kl), BLOCK_C=plan.block_c, PREC=plan.prec)
        flags["PARTIAL"] = plan.partial
        flags.update(plan.blocks)
        y_code = 1 if plan.soft_y else 2 if plan.graded else 0
        args = (r_lo, r_hi, c_lo, c_hi, n, kmax, d, plan.n_classes, g, y_code)
        need = ctx.needs_input_grad
        d_image = d_scale = d_bias = None
        if need[1] or need[2] or need[3]:
            dx = torch.zeros(n, d, device=dev)
            red = torch.zeros(2, n, device=dev)
            bwd.dx_kernel[(_cdiv(n, plan.blocks["BLOCK_M"]),)](
                x, t, plan.targets, plan.targets_c, plan.rules, rowf, colf, dx, red, s, b, ks, *args,
                write_dx=int(need[1]), **flags,
            )  # fmt: skip
            d_image = (s * dx).to(ctx.dtypes[0]) if need[1] else None
            d_scale = (red[0].sum() / s).reshape(()) if need[2] else None
            d_bias = red[1].sum().reshape(()) if need[3] and ctx.has_bias else None
        d_texts = [None] * g
        if any(need[4:]):
            dt = torch.zeros(g, kmax, d, device=dev)
            bwd.dt_kernel[(_cdiv(kmax, plan.blocks["BLOCK_N"]),)](
                x, t, plan.targets, plan.targets_c, plan.rules, rowf, colf, dt, s, b, ks, *args,
                **flags,
            )  # fmt: skip
            d_texts = [
                (s * dt[i, : plan.ks[i]]).to(ctx.dtypes[1 + i]) if need[4 + i] else None
                for i in range(g)
            ]
        return None, d_image, d_scale, d_bias, *d_texts


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grad(grad: Tensor | None, like: Tensor) -> Tensor:
    return like.new_zeros(()) if grad is None else grad.float().reshape(())


def _owned(n: int, spans, device) -> Tensor:
    idx = torch.arange(n, device=device)
    return torch.stack([((idx >= lo) & (idx < hi)).float() for lo, hi in spans])


def _ce_lines(stats: Tensor, fwd) -> Tensor:
    """Per line -sum_k W_k log softmax_k = lse - sum C z / sum C, 0 for lines without positives."""
    c, cz = stats[:, int(fwd.ST_C)], stats[:, int(fwd.ST_CZ)]
    return torch.where(c > 0, stats[:, int(fwd.ST_LSE)] - safe_divide(cz, c), torch.zeros_like(c))


def _anchor_counts(plan, stats_r: Tensor, stats_c: Tensor, fwd) -> tuple[Tensor, Tensor]:
    """|A_r| and |A_c| per granularity over the *whole* batch (global normalisers)."""
    if not plan.has_ce:  # only the soft CLIP term uses them
        zeros = stats_r.new_zeros(stats_r.shape[0])
        return zeros, zeros
    if plan.is_full:
        n_rows = (stats_r[:, int(fwd.ST_C)] > 0).sum(1)
        n_cols = (stats_c[:, int(fwd.ST_C)] > 0).sum(1)
        return n_rows, n_cols
    counts = [c.anchor_counts() for c in plan.cooc]
    dev = stats_r.device
    return (
        torch.stack([r for r, _ in counts]).to(dev),
        torch.stack([c for _, c in counts]).to(dev),
    )


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
