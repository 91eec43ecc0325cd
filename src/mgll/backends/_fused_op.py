r"""The ``fused`` loss as one registered operator, for :func:`torch.compile`.

Under :func:`torch.compile`, :func:`mgll.functional.mgll_loss` sends the ``fused`` backend
(and ``"auto"`` where it would pick ``fused``) through ``torch.ops.mgll.fused_loss_v2``: a
:func:`torch.library.custom_op` whose forward holds everything that reads tensor values (the
value checks and their one host synchronisation, the co-occurrence statistics, the smooth-KL
grouping) and whose backward is a second operator.  Dynamo therefore sees a single op with
symbolic shapes: no graph break, no recompilation for a new batch size under
``dynamic=True``, and the same kernels as eager.

The operator takes the raw features, so the normalisation and the cast to the compute dtype
happen inside it; its backward maps :math:`\partial L/\partial \hat x` back through
:math:`\hat x = x/\max(\|x\|, \epsilon)`.  The logits' gradient :math:`\partial L/\partial Z`
comes out of the forward as one flat buffer (saved for backward, as eager saves it).
"""

import torch
from torch import Tensor

from mgll import _validation as v
from mgll._problem import (
    LossConfig,
    build_batch,
    compute_dtype,
    prepare_features,
    requested_terms,
)
from mgll._validation import NORM_EPS
from mgll.backends import _blockmath as bm
from mgll.backends import fused
from mgll.targets.overlap import rules_for


def _config(weights: list[float], lam: list[float] | None, options: str, ref: int):
    # options: "pointwise_target,pointwise_norm,smooth_kl_support,rule+rule+..." (one per g)
    # weights: alpha_{1,g} for every g, alpha_{2,g} for every g, then alpha_3 (2 G + 1 values)
    g = (len(weights) - 1) // 2
    return LossConfig(
        soft_clip_weight=tuple(weights[:g]),
        pointwise_weight=tuple(weights[g : 2 * g]),
        smooth_kl_weight=weights[2 * g],
        granularity_weights=None if lam is None else tuple(lam),
        pointwise_target=options.split(",")[0],
        pointwise_norm=options.split(",")[1],
        smooth_kl_support=options.split(",")[2],
        smooth_kl_reference=None if ref < 0 else ref,
        overlap=tuple(options.split(",")[3].split("+")),
    )


def _plan(image, texts, scale, bias, values, mode, normalize, config, validate):
    problem = build_batch(
        image, texts, scale, bias, mode, values, config, normalize, validate, bound=True
    )
    return bm.make_plan(problem, config)


def _grad_numel(image: Tensor, texts: list[Tensor], config: LossConfig, need_grad: bool):
    """Elements of the flat dZ buffer: N * sum K_g when any term can have a gradient.

    Sized from the settings alone (the fake operator sees no values): a smooth KL that the
    batch turns off (:func:`~mgll._problem.kl_contributes`) still gets a buffer, left unused.
    """
    if not need_grad or not any(requested_terms(config, len(texts))):
        return 0
    return image.shape[0] * sum(t.shape[0] for t in texts)


@torch.library.custom_op("mgll::fused_loss_v2", mutates_args=())
def fused_loss(
    image: Tensor,
    texts: list[Tensor],
    scale: Tensor,
    bias: Tensor | None,
    values: list[Tensor],
    mode: str,
    weights: list[float],
    lam: list[float] | None,
    options: str,
    reference: int,
    normalize: bool,
    validate: bool,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(soft CLIP, pointwise, smooth KL, flat dZ, dL/db, which terms ran (3,)) of fused."""
    if validate:
        v.check_values(v.batch_conditions(image, texts, scale, bias, mode, values, normalize))
    config = _config(weights, lam, options, reference)
    with torch.autocast(image.device.type, enabled=False):
        plan = _plan(image, texts, scale, bias, values, mode, normalize, config, validate)
        p = plan.problem
        numel = _grad_numel(image, texts, config, need_grad)
        flat = p.image.new_zeros(numel) if numel else p.image.new_empty(0)
        zero = p.scale.new_zeros(())
        if not plan.blocks:
            return zero, zero.clone(), zero.clone(), flat, zero.clone(), p.scale.new_zeros(3)
        want = need_grad and numel > 0
        out = flat if want else None
        vals, (_, db) = fused._run(plan, plan.stats, p.image, p.scale, p.bias, p.texts, want, out)
    dtype = image.dtype
    on = p.scale.new_tensor([plan.ce, plan.pw, plan.kl])
    return vals[0].to(dtype), vals[1].to(dtype), vals[2].to(dtype), flat, db.reshape(()), on


@fused_loss.register_fake
def _(image, texts, scale, bias, values, mode, weights, lam, options, reference, normalize,
      validate, need_grad):  # fmt: skip
    dtype = compute_dtype(image.dtype)
    numel = _grad_numel(image, texts, _config(weights, lam, options, reference), need_grad)
    scalar = image.new_empty((), dtype=image.dtype)
    return (
        scalar,
        scalar.clone(),
        scalar.clone(),
        image.new_empty(numel, dtype=dtype),
        image.new_empty((), dtype=dtype),
        image.new_empty(3, dtype=dtype),
    )


@torch.library.custom_op("mgll::fused_loss_backward_v2", mutates_args=())
def fused_loss_backward(
    image: Tensor,
    texts: list[Tensor],
    scale: Tensor,
    bias: Tensor | None,
    values: list[Tensor],
    flat: Tensor,
    db: Tensor,
    terms_on: Tensor,
    grads: list[Tensor],
    mode: str,
    weights: list[float],
    lam: list[float] | None,
    options: str,
    reference: int,
    normalize: bool,
    validate: bool,
) -> list[Tensor]:
    """Gradients w.r.t. [image, scale, bias (zeros when None), *texts]."""
    config = _config(weights, lam, options, reference)
    on = [bool(x) for x in terms_on.tolist()]
    active = [g for g, o in zip(grads, on, strict=True) if o]
    dtype = compute_dtype(image.dtype)
    with torch.autocast(image.device.type, enabled=False):
        x_hat = prepare_features(image, dtype, normalize)
        t_hat = [prepare_features(t, dtype, normalize) for t in texts]
        s = scale.to(dtype).reshape(())
        if flat.numel() == 0 or not active:
            d_image, d_scale = torch.zeros_like(x_hat), s.new_zeros(())
            d_texts = [torch.zeros_like(t) for t in t_hat]
            d_bias = s.new_zeros(())
        else:
            if all(torch.equal(active[0], g) for g in active[1:]):  # the usual case: no rebuild
                widths = [t.shape[0] for t in texts]
                # the forward's layout: its row block runs (a term is on), its columns if ce is
                layout = bm.make_layout(image.shape[0], widths, row_terms=True, col_terms=on[0])
                views = iter(fused._views(flat, fused.stack_shapes(layout)))
                dz_blocks = [[next(views) for _ in blk.groups] for blk in layout.blocks]
                factor = active[0].to(dtype)
            else:  # different gradients per term: recompute dZ with the weights scaled
                plan = _plan(image, texts, scale, bias, values, mode, normalize, config, validate)
                p, layout = plan.problem, plan.layout
                stats = bm.scaled(plan.stats, tuple(g.to(dtype) for g in grads))
                _, (dz_blocks, db) = fused._run(
                    plan, stats, p.image, p.scale, p.bias, p.texts, True
                )
                factor = s.new_ones(())
            d_image, d_scale, d_texts = fused._feature_grads(layout, x_hat, t_hat, s, dz_blocks)
            d_image, d_scale = d_image * factor, d_scale * factor
            d_texts = [t * factor for t in d_texts]
            d_bias = db * factor
    d_image = _through_normalize(image, x_hat, d_image, normalize)
    d_texts = [
        _through_normalize(t, pt, d, normalize)
        for t, pt, d in zip(texts, t_hat, d_texts, strict=True)
    ]
    out = [d_image, d_scale.reshape(scale.shape).to(scale.dtype)]
    out.append(d_bias.reshape(bias.shape).to(bias.dtype) if bias is not None else d_bias.clone())
    return out + d_texts


@fused_loss_backward.register_fake
def _(image, texts, scale, bias, values, flat, db, terms_on, grads, mode, weights, lam, options,
      reference, normalize, validate):  # fmt: skip
    out = [torch.empty_like(image), torch.empty_like(scale)]
    out.append(torch.empty_like(bias) if bias is not None else db.new_empty(()))
    return out + [torch.empty_like(t) for t in texts]


def _through_normalize(x: Tensor, x_hat: Tensor, d_hat: Tensor, normalize: bool) -> Tensor:
    """dL/dx from dL/dx_hat, x_hat = x / max(||x||, eps) computed in x_hat's dtype."""
    if not normalize:
        return d_hat.to(x.dtype)
    xc = x.to(x_hat.dtype)
    norm = xc.norm(dim=-1, keepdim=True)
    inside = norm > NORM_EPS
    radial = (x_hat * d_hat).sum(-1, keepdim=True)
    dx = torch.where(inside, (d_hat - x_hat * radial) / norm.clamp_min(NORM_EPS), d_hat / NORM_EPS)
    return dx.to(x.dtype)


def _setup_context(ctx, inputs, output):
    image, texts, scale, bias, values, mode, weights, lam, options, ref, normalize, validate, _ = (
        inputs
    )
    _, _, _, flat, db, terms_on = output
    ctx.n_texts, ctx.n_values, ctx.has_bias = len(texts), len(values), bias is not None
    ctx.args = (mode, weights, lam, options, ref, normalize, validate)
    extra = [bias] if bias is not None else []
    ctx.save_for_backward(image, scale, flat, db, terms_on, *texts, *values, *extra)


def _backward(ctx, g_clip, g_pw, g_kl, g_flat, g_db, g_on):
    image, scale, flat, db, terms_on, *rest = ctx.saved_tensors
    texts, rest = rest[: ctx.n_texts], rest[ctx.n_texts :]
    values, rest = rest[: ctx.n_values], rest[ctx.n_values :]
    bias = rest[0] if ctx.has_bias else None
    grads = [g_clip, g_pw, g_kl]
    tensors = (image, list(texts), scale, bias, list(values), flat, db, terms_on)
    out = fused_loss_backward(*tensors, grads, *ctx.args)
    d_image, d_scale, d_bias, *d_texts = out
    d_bias = d_bias if ctx.has_bias else None
    values_grad = [None] * ctx.n_values
    return (d_image, list(d_texts), d_scale, d_bias, values_grad) + (None,) * 8


fused_loss.register_autograd(_backward, setup_context=_setup_context)


def loss_terms(image, texts, scale, bias, values, mode, config: LossConfig, normalize, validate):
    """The three weighted terms through the registered operator (same values as eager)."""
    leaves = [image, scale, *texts] + ([bias] if bias is not None else [])
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    lam = None if config.granularity_weights is None else list(config.granularity_weights)
    ref = -1 if config.smooth_kl_reference is None else config.smooth_kl_reference
    rules = "+".join(rules_for(config.overlap, len(texts)))
    options = (
        f"{config.pointwise_target},{config.pointwise_norm},{config.smooth_kl_support},{rules}"
    )
    g = len(texts)
    weights = [
        *(config.soft_clip_weight_at(i) for i in range(g)),
        *(config.pointwise_weight_at(i) for i in range(g)),
        config.smooth_kl_weight,
    ]
    out = torch.ops.mgll.fused_loss_v2(image, list(texts), scale, bias, values, mode, weights, lam,
                                    options, ref, normalize, validate, need_grad)  # fmt: skip
    return out[0], out[1], out[2]
