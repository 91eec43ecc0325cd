"""``backend="reference"``: plain differentiable torch ops, the readable ground truth.

Materialises the N x K_g logits of every granularity and lets autograd differentiate the terms
of :mod:`mgll._terms`.  Every other backend is tested against this one.  Unknown pairs
(docs/partial_annotation.rst) are NaN in the target blocks and left out of every term.
"""

from __future__ import annotations

from torch import Tensor

from mgll._problem import LossConfig, LossTerms, Problem
from mgll._terms import (
    known_part,
    partial_smooth_kl_rows,
    pointwise_rows,
    pointwise_targets,
    smooth_kl_rows,
    soft_ce_rows,
)


def compute(problem: Problem, config: LossConfig) -> LossTerms:
    n = problem.num_images
    zero = problem.scale.new_zeros(())
    soft_clip, pointwise, row_logits = zero, zero, []
    # alpha_g lambda_g inside the sum over g, or alpha outside it (one weight for every g)
    a_ce, lam_ce = config.term_factors("soft_clip", problem.num_granularities)
    a_pw, lam_pw = config.term_factors("pointwise", problem.num_granularities)
    for g, (text, cooc, cols, norm) in enumerate(
        zip(problem.texts, problem.cooc, problem.cols, problem.pointwise_norms, strict=True)
    ):
        rows_z = problem.scale * problem.image[problem.rows] @ text.T  # (n_local, K_g)
        rows_c, rows_known = _known(cooc.block(problem.rows, slice(None), rows_z.dtype), cooc)
        row_logits.append(rows_z)
        if problem.soft_clip_on and config.soft_clip_weight_at(g) != 0:
            # (k_local, N): columns as rows; the same logits when this process owns everything
            cols_z = rows_z.T if problem.is_full else problem.scale * text[cols] @ problem.image.T
            cols_c, cols_known = _known(problem.column_block(g, cols, rows_z.dtype).T, cooc)
            n_rows, n_cols = cooc.anchor_counts()
            i2t = soft_ce_rows(rows_z, rows_c, rows_known) / n_rows.clamp_min(1)
            t2i = soft_ce_rows(cols_z, cols_c, cols_known) / n_cols.clamp_min(1)
            soft_clip = soft_clip + lam_ce[g] * 0.5 * (i2t + t2i)
        if problem.pointwise_on and config.pointwise_weight_at(g) != 0:
            pointwise = (
                pointwise
                + lam_pw[g] * _pointwise(rows_z, rows_c, rows_known, problem, config) / norm
            )
    smooth_kl = zero
    if problem.smooth_kl_on:
        part = problem.partial
        if part is None:
            smooth_kl = smooth_kl_rows(row_logits, problem.kl_maps, problem.kl_taking) / n
        else:
            kl = partial_smooth_kl_rows(
                row_logits, part.owners, part.groups, part.annotated, problem.rows
            )
            smooth_kl = kl / part.compared.clamp_min(1)
    return LossTerms(
        a_ce * soft_clip,
        a_pw * pointwise,
        config.smooth_kl_weight * smooth_kl,
    )


def _known(block: Tensor, cooc) -> tuple[Tensor, Tensor | None]:
    """The block's weights and known mask (None without unknowns: every pair is known)."""
    return known_part(block) if cooc.partial else (block, None)


def _pointwise(
    logits: Tensor, cooc: Tensor, known: Tensor | None, problem: Problem, config: LossConfig
) -> Tensor:
    if problem.bias is not None:
        logits = logits + problem.bias
    return pointwise_rows(logits, pointwise_targets(cooc, config.pointwise_target), known)
