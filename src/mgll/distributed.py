r"""MGLL on ``torch.distributed``: the global batch, local loss and the gradient convention.

Every rank passes its own batch to :class:`mgll.MGLLLoss`; the loss gathers the image features,
every granularity's text features (paired mode) and the labels (paired) or target rows (bank)
of every rank, builds the targets on the *global* batch and computes the loss of the
concatenated batch (rank 0's samples first).  The text bank of bank mode is shared by all ranks
and is not gathered.  Per-rank batch sizes may differ: the sizes are gathered first and every
tensor is padded, gathered and unpadded.  A rank may even hold no sample (N_r = 0, e.g. the
last batch of an epoch split over more ranks than it has samples): it contributes no rows, its
features' gradient is empty, and the global loss is that of the other ranks' samples.  Only an
empty *global* batch is an error, raised on every rank alike.

Gradient convention.  DDP *averages* parameter gradients over the W ranks.  Write L for the
loss of the concatenated batch, :math:`x_r` for rank r's own features, and :math:`L_r` for the
part of L owned by rank r (its image rows and its text columns, each divided by the *global*
normalisers, so that :math:`\sum_r L_r = L`):

==========  ================  ================  ======================  =======================
local_loss  gather_with_grad  rank r returns    logits on rank r        gradient reaching x_r
==========  ================  ================  ======================  =======================
False       False             L                 all N x K_g             W dL/dx_r (own, x W)
False       True              L                 all N x K_g             W dL/dx_r (sum of W)
True        True              W L_r             N_r x K_g + K_g,r x N   W dL/dx_r (sum of W)
True        False             ValueError        n/a                     n/a
==========  ================  ================  ======================  =======================

So on every rank the features receive W times their single-process gradient and the logit
scale and bias (replicated parameters) receive gradients whose mean over ranks is the
single-process one; after DDP's averaging every parameter gradient equals that of one process
on the concatenated batch.  The mean over ranks of the returned loss (and of each
``output_dict`` term) is the single-process value; :func:`global_loss` computes it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mgll.targets.overlap import RULES as _RULES

__all__ = ["global_loss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_LABEL_DTYPES = _INT_DTYPES + _FLOAT_DTYPES


@dataclass(frozen=True)
class DistributedOptions:
    """The validated distributed settings of a loss (open_clip's names; their defaults are
    those of :class:`mgll.functional.LossOptions`)."""

    gather_with_grad: bool
    local_loss: bool
    rank: int | None
    world_size: int | None
    group: Any


@dataclass
class GlobalBatch:
    """What the loss computes on: the global batch and the rows/columns this rank owns.

    ``loss_factor`` multiplies the computed terms (W in local-loss mode, see the module doc).
    """

    image: Tensor
    texts: list[Tensor]
    values: list[Tensor]
    rows: slice = field(default_factory=lambda: slice(None))
    cols: list[slice] | None = None
    loss_factor: int = 1


def check_options(
    gather_with_grad: object,
    local_loss: object,
    rank: object,
    world_size: object,
    group: object,
) -> DistributedOptions:
    """Type and consistency checks that need no process group (run eagerly, at construction)."""
    for name, value in (("gather_with_grad", gather_with_grad), ("local_loss", local_loss)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
    for name, value, low in (("rank", rank, 0), ("world_size", world_size, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int or None, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"`{name}` must be >= {low}, got {value}")
    if rank is not None and world_size is not None and rank >= world_size:
        raise ValueError(f"`rank` must be < `world_size` ({world_size}), got {rank}")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"`group` must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    if local_loss and not gather_with_grad:
        raise ValueError(
            "`local_loss=True` needs `gather_with_grad=True`: each rank computes only its own rows "
            "and columns, so the gradient that the other ranks' rows send to this rank's features "
            "must come back through the gather; got gather_with_grad=False"
        )
    return DistributedOptions(gather_with_grad, local_loss, rank, world_size, group)


def resolve_group(options: DistributedOptions) -> tuple[Any, int, int] | None:
    """``(group, rank, W)`` to gather over, or None when nothing is gathered.

    Nothing is gathered with ``world_size=1``, with no initialised process group (unless a
    larger ``world_size`` or a ``group`` was asked for explicitly: an error), or with a group of
    size 1.  An explicit ``rank`` / ``world_size`` must agree with the group.
    """
    if options.world_size == 1:
        return None
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        for name in ("world_size", "rank", "group"):
            value = getattr(options, name)
            if value is not None and not (name == "rank" and value == 0):
                raise ValueError(
                    f"`{name}={value!r}` asks for a distributed loss but torch.distributed is not "
                    "initialised: call torch.distributed.init_process_group(...) on every rank "
                    f"first, or leave `{name}` unset to compute the loss of this process alone"
                )
        return None
    group = options.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0 or world < 1:
        raise ValueError("this process is not a member of `group`; pass a group it belongs to")
    for name, value, actual in (
        ("world_size", options.world_size, world),
        ("rank", options.rank, rank),
    ):
        if value is not None and value != actual:
            raise ValueError(
                f"`{name}={value}` does not match the process group, whose {name} is {actual}; "
                f"leave `{name}` unset to take it from the group"
            )
    return None if world == 1 else (group, rank, world)


def gather_batch(
    image: Tensor,
    texts: Sequence[Tensor],
    mode: str,
    values: Sequence[Tensor],
    options: DistributedOptions,
    rules: Sequence[str] | None = None,
) -> GlobalBatch:
    """The global batch behind this rank's (validated) batch, and what this rank owns.

    Args:
        image: this rank's image features.
        texts: this rank's text features per granularity (paired) or the shared bank (bank).
        mode: ``"paired"`` or ``"bank"``.
        values: labels (paired) or targets (bank) per granularity.
        options: from :func:`check_options`.
        rules: the overlap rule of each granularity (paired mode), checked across ranks.

    Shape:
        - image: (N_r, D) on rank r; the result's image: (N, D), N = sum of the N_r
        - texts[g]: (N_r, D) paired, (K_g, D) bank
        - values[g]: (N_r,) or (N_r, C_g) labels, (N_r, K_g) targets

    Raises:
        ValueError: on every rank alike when the ranks disagree on G, D, the mode, the dtype,
            the label widths, K_g, the overlap rules or the distributed options (never a hang).
    """
    resolved = resolve_group(options)
    if resolved is None:
        return GlobalBatch(image, list(texts), list(values))
    group, rank, world = resolved
    sizes = _agree(image, texts, mode, values, options, group, world)
    if sum(sizes) == 0:
        raise ValueError(
            f"every rank passed an empty batch (N=0 on all {world} ranks); MGLL needs at least "
            "one image in the global batch"
        )
    start = sum(sizes[:rank])
    n_local, g_count = image.shape[0], len(texts)
    if mode == "paired":
        width = image.shape[1]
        feats = _gather_features(torch.cat([image, *texts], dim=1), sizes, group, rank, options)
        image = feats[:, :width]
        texts = [feats[:, (g + 1) * width : (g + 2) * width].contiguous() for g in range(g_count)]
        dtypes = _agree_labels(values, rules, image.device, group, world)
        values = _gather_labels(values, sizes, group, rank, dtypes)
        cols = [slice(start, start + n_local)] * g_count
    else:
        image = _gather_features(image, sizes, group, rank, options)
        dtypes = _agree_labels(values, None, image.device, group, world)
        values = [
            _gather_rows(t.to(d), sizes, group, rank) for t, d in zip(values, dtypes, strict=True)
        ]
        cols = [bank_columns(t.shape[0], rank, world) for t in texts]
    if not options.local_loss:
        return GlobalBatch(image, list(texts), values)
    return GlobalBatch(image, list(texts), values, slice(start, start + n_local), cols, world)


def bank_columns(k: int, rank: int, world: int) -> slice:
    r"""The bank texts rank ``rank`` owns in local-loss mode: a balanced contiguous block.

    Rank r owns texts :math:`\lfloor rK/W\rfloor` to :math:`\lfloor (r+1)K/W\rfloor - 1`
    (possibly none when K < W).
    """
    return slice(rank * k // world, (rank + 1) * k // world)


def global_loss(loss: Tensor | Mapping[str, Tensor], group: Any = None):
    """The single-process value of a distributed MGLL loss: the mean over ranks, detached.

    In every mode the mean over ranks of what :class:`mgll.MGLLLoss` returns equals the loss of
    one process on the concatenated batch (with ``local_loss=False`` every rank already holds
    it).  Call it on every rank (it is a collective), e.g. for logging.

    Args:
        loss: a scalar loss, or the ``output_dict=True`` dict of terms.
        group: the process group the loss used (default: the default group).

    Returns:
        A detached scalar, or a dict with the same keys.

    Example:
        >>> terms = {"soft_clip_loss": torch.tensor(2.5), "pointwise_loss": torch.tensor(0.5)}
        >>> global_loss(terms)["soft_clip_loss"]  # no process group: the value itself
        tensor(2.5000)
    """
    if isinstance(loss, Mapping):
        keys = list(loss)
        stacked = torch.stack([loss[k].detach().reshape(()) for k in keys])
    else:
        keys, stacked = None, loss.detach().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        stacked = stacked.clone()
        dist.all_reduce(stacked, group=group)
        stacked = stacked / dist.get_world_size(group)
    if keys is None:
        return stacked.reshape(())
    return dict(zip(keys, stacked.unbind(), strict=True))


# --- consistency checks: every rank sees every rank's metadata and raises alike ---------------


def _agree(image, texts, mode, values, options, group, world) -> list[int]:
    """Gather the batch sizes and metadata; raise the same ValueError on every rank on mismatch."""
    dtype = _FLOAT_DTYPES.index(image.dtype) if image.dtype in _FLOAT_DTYPES else -1
    header = [image.shape[0], image.shape[1], len(texts), mode == "bank", dtype]
    header += [options.local_loss, options.gather_with_grad]
    table = _all_gather_ints(header, image.device, group, world)
    names = ("batch size", "D", "G", "bank mode", "dtype", "local_loss", "gather_with_grad")
    for column, name in list(enumerate(names))[1:]:
        _same(table[:, column], _describe(name))
    per_g = []
    for t, x in zip(texts, values, strict=True):
        per_g += [t.shape[0], x.dim(), x.shape[1] if x.dim() == 2 else 0]
    table_g = _all_gather_ints(per_g, image.device, group, world).reshape(world, len(texts), 3)
    for g in range(len(texts)):
        if mode == "bank":
            _same(
                table_g[:, g, 0],
                f"the text bank `text_features[{g}]` (K_{g} texts, shared by all ranks, not gathered)",
            )
        else:
            _same(table_g[:, g, 1], f"`labels[{g}]`: (N,) ids (1) or (N, C_{g}) multi-hot (2)")
            _same(table_g[:, g, 2], f"`labels[{g}]`: the number of classes C_{g}")
    return table[:, 0].tolist()


def _agree_labels(labels, rules, device, group, world) -> list[torch.dtype]:
    """Check the overlap rules across ranks; the common dtype per granularity of the labels
    (paired) or targets (bank, ``rules=None``).

    The same 0/1 labels may come as bool on one rank and float on another (a different
    collate): they are gathered in one promoted dtype, the same on every rank, instead of
    collectives of different sizes (which abort gloo).
    """
    codes = []
    for g, x in enumerate(labels):
        rule = -1 if rules is None else _RULES.index(rules[g])
        codes += [_LABEL_DTYPES.index(x.dtype) if x.dtype in _LABEL_DTYPES else -1, rule]
    table = _all_gather_ints(codes, device, group, world).reshape(world, len(labels), 2)
    name = "targets" if rules is None else "labels"
    for g in range(len(labels)):
        _same(table[:, g, 1], f"the overlap rule of `labels[{g}]` (`overlap=`)", _RULES)
        _same(table[:, g, 0].clamp_max(0), f"`{name}[{g}]`: a dtype mgll can gather (0)")
    return [
        functools.reduce(torch.promote_types, (_LABEL_DTYPES[int(c)] for c in table[:, g, 0]))
        for g in range(len(labels))
    ]


def _describe(name: str) -> str:
    return {
        "D": "the feature width D",
        "G": "the number of granularities G (`text_features`)",
        "bank mode": "the mode: every rank passes `labels` (0, paired) or every rank `targets` (1, bank)",
        "dtype": f"the feature dtype (index into {[str(d) for d in _FLOAT_DTYPES]})",
    }.get(name, f"`{name}`")


def _same(column: Tensor, what: str, names: Sequence[str] | None = None) -> None:
    values = column.tolist()
    if len(set(values)) > 1:
        by_value = {v: [r for r, x in enumerate(values) if x == v] for v in dict.fromkeys(values)}
        shown = (lambda v: repr(names[v])) if names else str
        got = "; ".join(f"{shown(v)} on ranks {ranks}" for v, ranks in by_value.items())
        raise ValueError(f"every rank must agree on {what}, got {got}")


def _all_gather_ints(values: list[int], device, group, world) -> Tensor:
    local = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu()


# --- gathering ---------------------------------------------------------------------------------


def _gather_features(x: Tensor, sizes, group, rank, options) -> Tensor:
    """Gather rows of features; the local block keeps its autograd graph (see module doc)."""
    if options.gather_with_grad:
        return _unpad(_AllGatherRows.apply(_pad(x, max(sizes)), group), sizes)
    world = len(sizes)
    # Every rank computes the same full loss, so the own rows' gradient is exact but DDP divides
    # it by W: multiply it by W here (value unchanged: x + (W-1)(x - x) = x).
    local = x + (world - 1) * (x - x.detach()) if x.requires_grad else x
    gathered = _unpad(_gather_padded(_pad(x.detach(), max(sizes)), group, world), sizes)
    start = sum(sizes[:rank])
    return torch.cat([gathered[:start], local, gathered[start + sizes[rank] :]])


def _gather_labels(labels: Sequence[Tensor], sizes, group, rank, dtypes) -> list[Tensor]:
    """Paired labels of every granularity in their common dtypes (from :func:`_agree_labels`):
    integer and bool labels in one int64 gather, float label probabilities (multi-hot) in one
    float64 gather (exact), so every rank takes part in the same collectives."""
    out: list[Tensor | None] = [None] * len(labels)
    for floating, dtype in ((False, torch.int64), (True, torch.float64)):
        which = [g for g, d in enumerate(dtypes) if d.is_floating_point == floating]
        if not which:
            continue
        columns = [
            (labels[g][:, None] if labels[g].dim() == 1 else labels[g]).to(dtype) for g in which
        ]
        gathered = _gather_rows(torch.cat(columns, dim=1), sizes, group, rank)
        start = 0
        for g, c in zip(which, columns, strict=True):
            block = gathered[:, start : start + c.shape[1]]
            start += c.shape[1]
            out[g] = (block[:, 0] if labels[g].dim() == 1 else block).to(dtypes[g])
    return out


def _gather_rows(x: Tensor, sizes, group, rank) -> Tensor:
    """Gather rows without gradient (labels, targets); bool travels as uint8."""
    send = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()
    gathered = _unpad(_gather_padded(_pad(send, max(sizes)), group, len(sizes)), sizes)
    return gathered.to(x.dtype)


def _pad(x: Tensor, rows: int) -> Tensor:
    x = x.contiguous()
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _unpad(x: Tensor, sizes: Sequence[int]) -> Tensor:
    rows = max(sizes)
    if all(n == rows for n in sizes):
        return x
    return torch.cat([x[r * rows : r * rows + n] for r, n in enumerate(sizes)])


def _gather_padded(x: Tensor, group, world: int) -> Tensor:
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _ALL_GATHER(out, x, group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 with gradient: the backward sums the gradients of every rank.

    Forward: (n, ...) on each rank -> (W n, ...), rank-major.  Backward: this rank's block of
    the sum over ranks of the incoming gradients (a reduce-scatter; an all-reduce on the CPU).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather_padded(x, group, dist.get_world_size(group))

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        rows = grad.shape[0] // world
        if grad.device.type == "cpu":  # gloo: an all-reduce works on every torch version
            total = grad.clone()
            dist.all_reduce(total, group=group)
            return total[rank * rows : (rank + 1) * rows], None
        out = grad.new_empty((rows, *grad.shape[1:]))
        _REDUCE_SCATTER(out, grad, group=group)
        return out, None


# all_gather_single / reduce_scatter_single supersede the *_tensor names in recent torch.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None
)
