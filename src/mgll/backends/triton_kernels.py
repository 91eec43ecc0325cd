r"""``backend="triton"``: fused Triton kernels for the heavy N x K_g parts (docs/backends.rst).

Tiled like flash-attention / Inf-CL: logits :math:`Z^g = s\,X T^{g\top}` are recomputed tile by
tile from the features and never stored.  Forward: one program per image row block (and one
per text column block for the t2i direction) keeps an online log-sum-exp and target-weighted
sums, writing a few numbers per row -- the losses are assembled from these O(N + K_g) buffers.
The paired smooth KL (identity maps) is a second row pass in log space.  Backward recomputes
the tiles, forms :math:`\partial L/\partial Z` and accumulates dX by image row blocks and dT by
text column blocks (two kernels, no atomics), plus d(scale) and d(bias).  Extra memory is
O(G (N + K_max) + N D + G K_max D): the stacked text features and the fp32 gradient buffers.

The smooth KL with non-identity maps (bank mode, or ``smooth_kl_support="coarse"``) needs
:math:`\operatorname{softmax}(Z^g) T^g` with a K_g x J map; it is computed with plain torch ops
(:func:`mgll._terms.smooth_kl_rows`, checkpointed in row chunks so only one chunk's logits are
held at a time).  Everything else runs in the kernels.

Unknown labels (docs/partial_annotation.rst: NaN labels, the id -1, NaN bank targets) run in
the same kernels compiled with ``PARTIAL``: each tile finds its unknown pairs from the label
vectors of its rows and columns (``_triton_tiles._targets``) and leaves them out of both
softmaxes, the target sums and the pointwise sum, and out of dZ; the pointwise ``"pairs"`` norm
counts the known pairs.  The smooth KL of such a batch is the torch one above, over the
compared images and supports (:func:`mgll._terms.partial_smooth_kl_rows`).  Without unknowns
the kernels are compiled without ``PARTIAL``, exactly as before.

Precision: fp32 features use exact fp32 dot products (``input_precision="ieee"``), or TF32
tensor cores when the user allowed them for fp32 matmuls
(``torch.set_float32_matmul_precision("high")`` or ``"medium"``); half
features handed over as half (bf16/fp16) feed the tensor cores directly, with fp32
accumulation and every statistic in fp32.  fp64 features are computed in fp32.  On the CPU the
kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` before triton is
imported), which is what the tests do; it is slow and meant for small shapes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mgll._problem import LossConfig, LossTerms, Problem
from mgll._terms import partial_smooth_kl_rows, smooth_kl_rows
from mgll.backends._triton_autograd import TritonMGLL
from mgll.targets.cooc import CoOccurrence

INSTALL_HINT = (
    'backend="triton" needs the optional dependency triton (the [triton] extra): '
    'pip install "triton>=3.0"'
)

#: Launch settings on CUDA and in the interpreter (tests may shrink the interpreter's tiles).
#: On sm_90 (ptxas, bf16) these compile without register spills except 160 B in the dX kernel;
#: 4 warps or D chunks of 64 spill 0.5-3 KB per thread.  Not yet tuned on a GPU.
CUDA_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32, "num_warps": 1, "num_stages": 1}
BLOCK_C = 16  # label-class chunk of the multi-hot overlap products
KL_CHUNK = 1024  # rows per checkpointed chunk of the torch smooth KL (non-identity maps)

_KIND_IDS, _KIND_MULTI_HOT, _KIND_DENSE = 0, 1, 2


def compute(problem: Problem, config: LossConfig) -> LossTerms:
    """The three weighted MGLL terms of ``problem`` with the Triton kernels.

    Args:
        problem: the validated batch; row terms for ``problem.rows``, column terms for
            ``problem.cols[g]``, each over the global normalisers.
        config: term weights and options.

    Returns:
        :class:`~mgll._problem.LossTerms`, differentiable w.r.t. the features, the logit scale
        and the bias.

    Raises:
        ImportError: triton is not installed.
        ValueError: the features are on a device the kernels cannot run on, or
            ``problem.rows`` / ``problem.cols`` is a slice with a step.
    """
    fwd, bwd = _kernels()
    interpreted = _is_interpreted(fwd.stats_kernel)
    device = problem.image.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreted):
        raise ValueError(
            f'backend="triton" runs on CUDA tensors, got features on {device}; use '
            'backend="fused" or "tiled" there (tests run the kernels on the CPU with '
            "TRITON_INTERPRET=1 set before triton is imported)"
        )
    plan = _Plan.build(problem, config, fwd, bwd, interpreted)
    soft_clip, pointwise, smooth_kl = TritonMGLL.apply(
        plan, problem.image, problem.scale, problem.bias, *problem.texts
    )
    if plan.torch_kl:
        smooth_kl = smooth_kl + config.smooth_kl_weight * _torch_smooth_kl(problem, plan)
    dtype = problem.scale.dtype
    return LossTerms(soft_clip.to(dtype), pointwise.to(dtype), smooth_kl.to(dtype))


def _kernels():
    try:
        return (
            importlib.import_module("mgll.backends._triton_fwd"),
            importlib.import_module("mgll.backends._triton_bwd"),
        )
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "triton":
            raise ImportError(INSTALL_HINT) from exc
        raise


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _span(s: slice, n: int, name: str) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f'backend="triton" needs `{name}` to be a contiguous slice, got {s}')
    return start, max(start, stop)


@dataclass
class _Plan:
    """Everything about a batch the kernels need besides the differentiable tensors."""

    n: int
    ks: list[int]
    kind: int
    targets: Tensor
    targets_c: Tensor  # the t2i side's targets: W^c for bank targets, else ``targets``
    rules: Tensor
    n_classes: int
    rows: tuple[int, int]
    cols: list[tuple[int, int]]
    weights: tuple[float, float, float]
    lam_ce: Tensor  # per g: lambda_g, or alpha_{1,g} lambda_g (see weights)
    lam_pw: Tensor
    norms: Tensor
    has_ce: bool
    has_pw: bool
    has_kl: bool
    torch_kl: bool
    partial: bool  # some labels are unknown: the kernels' PARTIAL variant
    soft_y: bool
    graded: bool
    dtype: torch.dtype
    prec: str
    blocks: dict
    block_c: int
    cooc: list[CoOccurrence]
    is_full: bool
    fwd: ModuleType
    bwd: ModuleType

    @staticmethod
    def build(problem: Problem, config: LossConfig, fwd, bwd, interpreted: bool) -> _Plan:
        n, g = problem.num_images, problem.num_granularities
        device = problem.image.device
        kind, targets, n_classes = _stack_targets(problem)
        rules = torch.tensor([_rule_code(c) for c in problem.cooc], dtype=torch.int32)
        feature_dtype = problem.image.dtype
        half = feature_dtype in (torch.float16, torch.bfloat16) and not interpreted
        ks = [t.shape[0] for t in problem.texts]
        kl_on = problem.smooth_kl_on
        identity = all(m is None for m in problem.kl_maps)
        partial = any(c.partial for c in problem.cooc)
        # alpha outside the sum over g, or alpha_g lambda_g inside (LossConfig.term_factors)
        a_ce, lam_ce = config.term_factors("soft_clip", g)
        a_pw, lam_pw = config.term_factors("pointwise", g)
        # the pointwise divisors (known pairs, a tensor, when labels are unknown): no host sync
        norms = torch.stack(
            [
                torch.as_tensor(1.0 if m is None else m, dtype=torch.float32, device=device)
                for m in problem.pointwise_norms
            ]
        )
        return _Plan(
            n=n,
            ks=ks,
            kind=kind,
            targets=targets,
            targets_c=_stack_col_weights(problem, targets) if kind == _KIND_DENSE else targets,
            rules=rules.to(device),
            n_classes=n_classes,
            rows=_span(problem.rows, n, "problem.rows"),
            cols=[
                _span(c, k, f"problem.cols[{i}]")
                for i, (c, k) in enumerate(zip(problem.cols, ks, strict=True))
            ],
            weights=(a_ce, a_pw, config.smooth_kl_weight),
            lam_ce=torch.tensor(lam_ce, device=device),
            lam_pw=torch.tensor(lam_pw, device=device),
            norms=norms,
            has_ce=problem.soft_clip_on,
            has_pw=problem.pointwise_on,
            has_kl=kl_on and identity and not partial,
            torch_kl=kl_on and (not identity or partial),
            partial=partial,
            soft_y=config.pointwise_target == "soft",
            graded=config.pointwise_target == "graded",
            dtype=feature_dtype if half else torch.float32,
            prec=_fp32_dot_precision(),
            blocks=INTERPRETER_BLOCKS if interpreted else CUDA_BLOCKS,
            block_c=BLOCK_C,
            cooc=list(problem.cooc),
            is_full=problem.is_full,
            fwd=fwd,
            bwd=bwd,
        )


def _fp32_dot_precision() -> str:
    """Exact fp32 dots unless the user allowed TF32 (``torch.set_float32_matmul_precision``)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _stack_targets(problem: Problem) -> tuple[int, Tensor, int]:
    """C^g of every granularity in one tensor, in the form the kernels rebuild tiles from."""
    cooc = problem.cooc
    device = problem.image.device
    kinds = {c.kind for c in cooc}
    if kinds == {"ids"}:
        ids = [_compact_ids(c) for c in cooc]
        # compact ids 0..U-1 as floats: exact below 2**24, one kernel for every target kind
        return _KIND_IDS, torch.stack(ids).to(device=device, dtype=torch.float32), 0
    if kinds <= {"ids", "multi_hot"}:  # paired; ids become one-hot label sets
        sets = [_one_hot(c) if c.kind == "ids" else c.data for c in cooc]
        width = max(s.shape[1] for s in sets)
        out = torch.zeros(len(sets), problem.num_images, width, device=device)
        for g, s in enumerate(sets):
            out[g, :, : s.shape[1]] = s.to(device=device, dtype=torch.float32)
            if cooc[g].partial:  # padded with "no class": 0 is an annotated negative there
                out[g, :, s.shape[1] :] = -1.0
        return _KIND_MULTI_HOT, out, width
    kmax = max(t.shape[0] for t in problem.texts)
    out = torch.zeros(len(cooc), problem.num_images, kmax, device=device)
    for g, c in enumerate(cooc):
        out[g, :, : c.shape[1]] = c.data.to(device=device, dtype=torch.float32)
    return _KIND_DENSE, out, 0


def _compact_ids(cooc: CoOccurrence) -> Tensor:
    """Ids as their ranks 0..U-1; with unknowns the missing id stays -1."""
    ranks = torch.unique(cooc.data, return_inverse=True)[1]
    return torch.where(cooc.data >= 0, ranks, -1) if cooc.partial else ranks


def _one_hot(cooc: CoOccurrence) -> Tensor:
    """Ids as one-hot label sets; with unknowns the missing id -1 is a row annotated nowhere."""
    sets = torch.nn.functional.one_hot(torch.unique(cooc.data, return_inverse=True)[1])
    if not cooc.partial:
        return sets
    return torch.where(cooc.data[:, None] >= 0, sets.float(), torch.nan)


def _stack_col_weights(problem: Problem, targets: Tensor) -> Tensor:
    """W^c (bank targets normalised per column) of every granularity, laid out as the targets.

    A problem built without column weights reads its targets on both sides.
    """
    if any(w is None for w in problem.col_weights):
        return targets
    kmax = max(t.shape[0] for t in problem.texts)
    device = problem.image.device
    out = torch.zeros(len(problem.cooc), problem.num_images, kmax, device=device)
    for g, w in enumerate(problem.col_weights):
        out[g, :, : w.shape[1]] = w.to(device=device, dtype=torch.float32)
    return out


def _rule_code(cooc: CoOccurrence) -> int:
    """The kernels' code of a paired granularity's overlap rule (``_triton_tiles._overlap``).

    0/1 labels (bool, integer, floats known to be 0/1; ids become one-hot sets) take the
    exact-product rules 0-2; other float labels may be probabilities and take the elementwise
    rules for "any" and "jaccard" (the same numbers on 0/1 entries).
    """
    if cooc.kind != "multi_hot":
        return 0
    if cooc.rule == "count":
        return 1
    binary = cooc.zero_one_labels
    if cooc.rule == "any":
        return 0 if binary else 3
    return 2 if binary else 4


def _torch_smooth_kl(problem: Problem, plan: _Plan) -> Tensor:
    """Smooth KL for non-identity maps, or with unknown labels, with torch ops, in checkpointed
    row chunks (see module)."""
    lo, hi = plan.rows
    part = problem.partial

    def chunk(rows: slice, image: Tensor, scale: Tensor, *texts: Tensor) -> Tensor:
        logits = [scale * image @ t.T for t in texts]
        if part is None:
            return smooth_kl_rows(logits, problem.kl_maps, problem.kl_taking)
        return partial_smooth_kl_rows(logits, part.owners, part.groups, part.annotated, rows)

    total = problem.scale.new_zeros(())
    for start in range(lo, hi, KL_CHUNK):
        rows = slice(start, min(hi, start + KL_CHUNK))
        args = (problem.image[rows], problem.scale, *problem.texts)
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            total = total + checkpoint(chunk, rows, *args, use_reentrant=False)
        else:
            total = total + chunk(rows, *args)
    return total / (plan.n if part is None else part.compared.clamp_min(1))
