"""What every backend receives: the validated batch in one structure, and the loss settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mgll._terms import normalise_lines, scale_free
from mgll._validation import NORM_EPS
from mgll.targets.cooc import (
    CoOccurrence,
    GroupMap,
    count_labels,
    dense_ranks,
    map_takes_part,
    map_width,
    normalize_rows,
    ownership,
    sample_groups,
)
from mgll.targets.overlap import rules_for


@dataclass(frozen=True)
class LossConfig:
    """Term weights (alpha_1..3), granularity weights (lambda_g) and term options.

    ``soft_clip_weight`` and ``pointwise_weight`` are one float for every granularity, or a
    tuple of one float per granularity (alpha_{1,g}, alpha_{2,g}).
    """

    soft_clip_weight: float | tuple[float, ...] = 1.0
    pointwise_weight: float | tuple[float, ...] = 1.0
    smooth_kl_weight: float = 1.0
    granularity_weights: tuple[float, ...] | None = None
    pointwise_target: str = "binary"
    pointwise_norm: str = "pairs"
    smooth_kl_support: str = "coarse"
    smooth_kl_reference: int | None = None
    overlap: str | tuple[str, ...] = "jaccard"

    def lam(self, g: int) -> float:
        return 1.0 if self.granularity_weights is None else float(self.granularity_weights[g])

    def soft_clip_weight_at(self, g: int) -> float:
        """alpha_1 at granularity g."""
        return _weight_at(self.soft_clip_weight, g)

    def pointwise_weight_at(self, g: int) -> float:
        """alpha_2 at granularity g."""
        return _weight_at(self.pointwise_weight, g)

    def term_factors(self, term: str, num_granularities: int) -> tuple[float, list[float]]:
        """``(outer, inner)`` with term weight = ``outer * sum_g inner[g] * L^g``.

        One weight for every granularity (a float, or a tuple of equal values) stays outside
        the sum, ``inner[g] = lambda_g``, as the loss is written; per-granularity weights move
        inside, ``inner[g] = alpha_g lambda_g`` and ``outer = 1``.  ``term``: ``"soft_clip"``
        or ``"pointwise"``.
        """
        weight = getattr(self, f"{term}_weight")
        lams = [self.lam(g) for g in range(num_granularities)]
        if not isinstance(weight, tuple):
            return float(weight), lams
        if len(set(weight)) <= 1:
            return (float(weight[0]) if weight else 1.0), lams
        return 1.0, [float(a) * lam for a, lam in zip(weight, lams, strict=True)]


def _weight_at(weight: float | tuple[float, ...], g: int) -> float:
    return float(weight[g]) if isinstance(weight, tuple) else float(weight)


def _weight_on(weight: float | tuple[float, ...]) -> bool:
    """A term runs when any of its weights is non-zero."""
    return any(w != 0 for w in weight) if isinstance(weight, tuple) else weight != 0


class LossTerms(NamedTuple):
    """The three weighted terms; their sum is the loss."""

    soft_clip_loss: Tensor
    pointwise_loss: Tensor
    smooth_kl_loss: Tensor


@dataclass
class Problem:
    """A batch ready for a backend.

    ``image`` (N, D) and ``texts[g]`` (K_g, D) are normalised (unless the user opted out) and in
    the compute dtype; ``cooc[g]`` is C^g (N x K_g); ``kl_maps[g]`` is T^g = R^g S (K_g x J), a
    dense tensor or a :class:`~mgll.targets.cooc.GroupMap` of group ids, or None for the identity.
    Bank (dense) targets arrive row-normalised, as W^r, with their
    column-normalised W^c in ``col_weights[g]`` (None for paired labels): both are divisions of
    the targets, so no backend takes the reciprocal of a possibly subnormal sum (docs/errors.rst,
    target-scale invariance).  A backend computes the row terms of image rows ``rows`` and the
    column terms of text columns ``cols[g]`` only, each divided by the *global* normaliser, so
    that processes owning disjoint rows and columns add up to the loss of the whole batch.

    Which terms run, and the pointwise divisors, are decided once, here, when the batch is built
    (:func:`build_problem`); every backend reads them and derives none:
    ``soft_clip_on`` and ``pointwise_on`` (a weight of theirs is not 0), ``smooth_kl_on`` (its
    weight is not 0 and the term can be non-zero, :func:`kl_contributes`), and ``pointwise_norms[g]``,
    the pointwise term's divisor at granularity g (:func:`pointwise_norm`; None when it is off,
    or its weight at g is 0).
    ``kl_taking[g]``: whether T^g has a positive entry (:func:`maps_taking_part`, read once).
    ``logit_bound``: an upper bound on every logit (:func:`logit_bound`), read with the labels'
    flags when the batch is built for a backend that shifts by it (``"fused"``), else None.
    To change the rows and columns a backend computes, use :func:`dataclasses.replace`.
    """

    image: Tensor
    texts: list[Tensor]
    scale: Tensor
    bias: Tensor | None
    cooc: list[CoOccurrence]
    kl_maps: list[Tensor | GroupMap | None]
    soft_clip_on: bool
    pointwise_on: bool
    smooth_kl_on: bool
    pointwise_norms: list[int | Tensor | None]
    rows: slice = field(default_factory=lambda: slice(None))
    cols: list[slice] = field(default_factory=list)
    col_weights: list[Tensor | None] = field(default_factory=list)
    partial: Partial | None = None
    kl_taking: list[bool] = field(default_factory=list)
    logit_bound: float | None = None

    def __post_init__(self) -> None:
        if not self.cols:
            self.cols = [slice(None)] * len(self.texts)
        if not self.col_weights:
            self.col_weights = [None] * len(self.texts)
        if not self.kl_taking:
            self.kl_taking = maps_taking_part(self.kl_maps)

    def column_block(self, g: int, cols: slice, dtype=None) -> Tensor:
        """The targets of granularity g's text columns ``cols`` for the t2i direction (N x k)."""
        weights = self.col_weights[g]
        if weights is None:
            return self.cooc[g].block(slice(None), cols, dtype)
        return weights[:, cols].to(dtype or torch.float32)

    @property
    def num_images(self) -> int:
        return self.image.shape[0]

    @property
    def num_granularities(self) -> int:
        return len(self.texts)

    @property
    def is_full(self) -> bool:
        """True when this process owns every row and column (no distributed local loss)."""
        return self.rows == slice(None) and all(c == slice(None) for c in self.cols)


@dataclass
class Partial:
    """What the smooth KL needs when some labels are unknown (docs/partial_annotation.rst).

    ``annotated`` (G, N) bool: image n is compared at granularity g (annotated there, and g has
    a distribution); ``owners[g]`` R^g (K_g x N) or None (paired); ``groups`` S or None; the
    term is divided by ``compared``, the number of images compared at two granularities or more.
    """

    annotated: Tensor
    owners: list[Tensor | None]
    groups: Tensor | GroupMap | None
    compared: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs, the input's dtype when it is float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def prepare_features(x: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    """Features in the compute dtype, L2-normalised per row unless the user opted out.

    ``x / max(||x||, NORM_EPS)``, as :func:`torch.nn.functional.normalize`; the compiled
    operator's backward differentiates this same map (``NORM_EPS`` is also what the value
    checks call a zero norm).
    """
    x = x.to(dtype)
    return F.normalize(x, dim=-1, eps=NORM_EPS) if normalize else x


def build_batch(
    image_features: Tensor,
    text_features: Sequence[Tensor],
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    mode: str,
    values: Sequence[Tensor],
    config: LossConfig,
    normalize: bool,
    check: bool,
    *,
    bound: bool = False,
) -> Problem:
    """The :class:`Problem` of a checked batch: the one builder of the eager and compiled paths.

    ``mode`` ``"paired"``: ``values`` are labels, combined by ``config.overlap``; ``"bank"``:
    they are the targets C^g.  ``check`` (``validate``): find out whether float labels are 0/1
    (:func:`cooccurrence_from_labels`).  ``bound``: read :attr:`Problem.logit_bound` too, in
    the same host sync as the labels' flags.
    """
    rules = rules_for(config.overlap, len(values))
    paired = mode == "paired"
    code = logit_bound(image_features, text_features, logit_scale, normalize) if bound else None
    flags = label_flags(values, rules, check and paired, count=paired, also=code)
    cooc = [
        cooccurrence_from_labels(x, rule, partial=u, zero_one=z)
        if paired
        else CoOccurrence("dense", x, partial=u)
        for x, rule, u, z in zip(values, rules, flags.unknown, flags.zero_one, strict=True)
    ]
    for c, found in zip(cooc, flags.stats, strict=True):
        c.stats.update(found)
    return build_problem(
        image_features, text_features, logit_scale, logit_bias, cooc, config, normalize,
        logit_bound=None if code is None else flags.also / _BOUND_STEPS,
    )  # fmt: skip


#: :func:`logit_bound` is read as an integer number of steps of 1 / _BOUND_STEPS.
_BOUND_STEPS = 2**20


def logit_bound(
    image: Tensor, texts: Sequence[Tensor], scale: Tensor, normalize: bool
) -> Tensor | None:
    r"""An upper bound :math:`b \ge |s\, \hat x_i \cdot \hat t_k|` on every logit (Cauchy-Schwarz),
    as an int64 number of steps of :math:`2^{-20}`, rounded up; None for an empty batch.

    Normalised features have norms of at most 1, so :math:`b = |s|` (times a rounding margin);
    otherwise :math:`b = |s| \max_i \lVert x_i \rVert \max_{g,k} \lVert t^g_k \rVert`.
    Counted in steps of :math:`2^{-20}` (an exact scaling) and rounded up, it stays a bound and
    is read with the integer flags; a bound beyond :math:`2^{20}` (or a NaN) is read as
    :math:`2^{20}`, far too large to be used as a shift anyway.
    """
    if image.shape[0] == 0 or not any(t.shape[0] for t in texts):
        return None
    dtype = compute_dtype(image.dtype)
    b = scale.detach().to(dtype).abs().reshape(())
    if not normalize:
        widest = torch.stack(
            [t.detach().to(dtype).norm(dim=-1).amax() for t in texts if t.shape[0]]
        )
        b = b * image.detach().to(dtype).norm(dim=-1).amax() * widest.amax()
    b = torch.nan_to_num(b * (1 + 1e-5), nan=math.inf).clamp(max=_BOUND_STEPS)
    return torch.ceil(b * _BOUND_STEPS).to(torch.int64)


class BatchFlags(NamedTuple):
    """What :func:`label_flags` reads of a batch in one host sync."""

    unknown: list[bool]
    zero_one: list[bool]
    stats: list[dict]
    also: int | None


def label_flags(
    values: Sequence[Tensor],
    rules: Sequence[str],
    check: bool,
    count: bool = False,
    also: Tensor | None = None,
) -> BatchFlags:
    """Whether each granularity's labels or targets hold an unknown (:func:`has_unknowns`),
    whether its float multi-hot labels are 0/1 (read only with ``check``, see
    :func:`cooccurrence_from_labels`) and, with ``count`` (paired labels), the statistics of
    :func:`~mgll.targets.cooc.count_labels`: everything of the batch read in one host sync,
    with ``also``, one more int64 scalar, read in the same sync.
    """
    pending: list[Tensor] = []

    def defer(flag: Tensor | bool) -> int | bool:
        if isinstance(flag, bool):
            return flag
        pending.append(flag.to(torch.int64))
        return len(pending) - 1

    unknown = [defer(unknown_flag(x)) for x in values]
    zero_one = [
        defer(zero_one_flag(x, rule) if check else False)
        for x, rule in zip(values, rules, strict=True)
    ]
    counted = [count_labels(x) if count else None for x in values]
    places = []
    for found in counted:
        places.append(len(pending))
        pending += found[0] if found is not None else []
    extra = defer(also) if also is not None else None
    read = torch.stack(pending).tolist() if pending else []
    flag = lambda f: f if isinstance(f, bool) else bool(read[f])  # noqa: E731
    stats = [
        {} if found is None else found[1](read[at : at + len(found[0])])
        for found, at in zip(counted, places, strict=True)
    ]
    return BatchFlags(
        [flag(f) for f in unknown],
        [flag(f) for f in zero_one],
        stats,
        None if extra is None else read[extra],
    )


def cooccurrence_from_labels(
    labels: Tensor,
    rule: str = "any",
    check: bool = False,
    *,
    partial: bool | None = None,
    zero_one: bool | None = None,
) -> CoOccurrence:
    """Paired mode: (N,) integer ids (equal ids, whatever ``rule``), or (N, C_g) multi-hot
    label vectors combined by the overlap ``rule`` (see :mod:`mgll.targets.overlap`).

    ``check``: find out whether float labels are 0/1 (one host synchronisation) so that they
    take the matrix-product path; otherwise they take the elementwise one (the same values).
    ``partial`` and ``zero_one``: those flags when already read (:func:`label_flags`).
    """
    if partial is None:
        partial = has_unknowns(labels)
    if labels.dim() == 1:
        return CoOccurrence("ids", labels, partial=partial)
    if zero_one is None:
        flag = zero_one_flag(labels, rule) if check else False
        zero_one = flag if isinstance(flag, bool) else bool(flag)
    return CoOccurrence("multi_hot", labels, rule, zero_one, partial)


def zero_one_flag(labels: Tensor, rule: str) -> Tensor | bool:
    """Whether float multi-hot labels hold only 0, 1 (and NaN): a 0-dim tensor, or False where
    it does not matter (ids, bool or integer labels, the ``"count"`` rule)."""
    if labels.dim() != 2 or not labels.is_floating_point() or rule == "count":
        return False  # count is one matrix product on any entries
    return ((labels == 0) | (labels == 1) | torch.isnan(labels)).all()


def pointwise_norm(cooc: CoOccurrence, norm: str, dtype=None) -> int | Tensor:
    """The pointwise term's divisor: N*K_g (``"pairs"``) or N (``"images"``), counting only the
    known pairs, and the images with one, when some pairs are unknown (never 0).

    ``dtype``: the compute dtype (paired labels count their known pairs in it)."""
    n, k = cooc.shape
    if not cooc.partial:
        return n * k if norm == "pairs" else n
    counts = cooc.known_counts(1, dtype)
    return (counts.sum() if norm == "pairs" else (counts > 0).sum()).clamp_min(1)


def has_unknowns(values: Tensor) -> bool:
    """Whether labels or targets hold an unknown: NaN, or the missing id -1 (a host sync)."""
    flag = unknown_flag(values)
    return flag if isinstance(flag, bool) else bool(flag)


def unknown_flag(values: Tensor) -> Tensor | bool:
    """:func:`has_unknowns` as a 0-dim bool tensor, not yet read (False: none can be there)."""
    if values.is_floating_point():
        return torch.isnan(values).any()
    if values.dim() == 1:
        return (values == -1).any()
    return False


def partial_kl(
    cooc: Sequence[CoOccurrence],
    config: LossConfig,
    dtype,
    *,
    owners: list[Tensor | None] | None = None,
    groups: Tensor | GroupMap | str | None = "find",
) -> Partial:
    """The smooth KL's pieces when some labels are unknown: R^g and S apart, and who is compared.

    ``owners`` and ``groups``: R^g and S when already built (:func:`build_problem` builds them
    once for this and :func:`smooth_kl_maps`).
    """
    if owners is None:
        owners = [ownership(c, dtype) for c in cooc]
    if isinstance(groups, str):
        groups = (
            None
            if config.smooth_kl_support == "samples"
            else reference_groups(cooc, config.smooth_kl_reference, dtype)
        )
    annotated = torch.stack(
        [
            c.annotated() if r is None else c.annotated() & (r > 0).any()
            for c, r in zip(cooc, owners, strict=True)
        ]
    )
    return Partial(annotated, owners, groups, (annotated.sum(0) >= 2).sum())


def smooth_kl_maps(
    cooc: Sequence[CoOccurrence],
    config: LossConfig,
    dtype: torch.dtype = torch.float32,
    *,
    owners: list[Tensor | None] | None = None,
    groups: Tensor | GroupMap | str | None = "find",
) -> list[Tensor | GroupMap | None]:
    """T^g = R^g S for every granularity (see docs/smooth_kl.rst); ``owners``, ``groups``: R^g
    and S when already built."""
    if owners is None:
        owners = [ownership(c, dtype) for c in cooc]
    if config.smooth_kl_support == "samples":
        return owners
    if isinstance(groups, str):
        groups = reference_groups(cooc, config.smooth_kl_reference, dtype)
    return [groups if r is None else _compose(r, groups) for r in owners]


def _compose(owners: Tensor, groups: Tensor | GroupMap) -> Tensor:
    """R S (K x J) for a bank granularity's ownership R (K x N)."""
    return groups.pool(owners) if isinstance(groups, GroupMap) else owners @ groups


def reference_groups(
    cooc: Sequence[CoOccurrence], reference: int | None, dtype: torch.dtype = torch.float32
) -> Tensor | GroupMap:
    """S for the coarse support: the given granularity's, or the coarsest one in the batch.

    Coarsest: the fewest distinct groups of samples, where samples with equal rows of S (the
    same id, the same label set) form one group.  Counting label *sets* rather than labels keeps
    a multi-hot granularity with few labels but many combinations (digits present) from
    outranking a true coarse partition (their count and parity).  Ties: fewer columns J, then
    the first such granularity.  Each count sorts once (O(N log N)); ids never become a matrix.
    """
    if reference is not None:
        return sample_groups(cooc[reference], dtype)
    # ids and 0/1 label sets: each key counted on the device, and all of them read in one host
    # sync; S is then built for the coarsest granularity only
    keys: dict[int, tuple] = {}
    pending: list[Tensor] = []
    deferred: dict[int, str] = {}  # granularity -> "ids" (found: ranks) or "sets" (used columns)
    found: dict[int, Tensor | GroupMap] = {}
    for g, c in enumerate(cooc):
        if c.kind == "ids" and not c.partial and "ranks" in c.stats:  # read with the flags
            found[g], size = c.stats["ranks"]
            keys[g] = (size, size)
        elif c.kind == "multi_hot" and not c.partial and "groups" in c.stats:
            found[g], keys[g] = c.stats["used"], c.stats["groups"]
            deferred[g] = "counted"
        elif c.kind == "ids" and not c.partial:
            inverse, size = dense_ranks(c.data)
            found[g], keys[g], deferred[g] = inverse, (len(pending), len(pending)), "ids"
            pending.append(size)
        elif c.kind == "multi_hot" and not c.partial and c.zero_one_labels and c.data.numel():
            # 0/1 rows: equal rows of S are equal label vectors; the all-zero one (no label),
            # if any, sorts first among the distinct vectors
            sets = c.distinct_sets()[0]
            used = c.data.to(dtype).sum(0) > 0
            found[g], keys[g], deferred[g] = used, (len(pending), len(pending) + 1), "sets"
            pending += [sets.shape[0] - (sets[0] == 0).all().long(), used.sum()]
        else:
            found[g] = sample_groups(c, dtype)
            keys[g] = (_distinct_groups(found[g]), found[g].shape[1])
    read = torch.stack(pending).tolist() if pending else []
    for g, how in deferred.items():
        if how != "counted":
            keys[g] = tuple(read[i] for i in keys[g])
    if not keys:
        return None
    best = min(keys, key=lambda g: (keys[g], g))  # ties: fewer columns, then the first
    groups = found[best]
    if cooc[best].kind == "ids" and not cooc[best].partial:
        return GroupMap(groups, keys[best][0])
    if deferred.get(best) in ("sets", "counted"):  # the used columns, in their order
        columns = torch.argsort((~groups).to(torch.uint8), stable=True)[: keys[best][1]]
        return normalize_rows(cooc[best].data.to(dtype).index_select(1, columns))
    return groups


def _distinct_groups(groups: Tensor | GroupMap) -> int:
    """Distinct non-zero rows of S (samples without a label form no group)."""
    if isinstance(groups, GroupMap):  # one row per id: the distinct rows are the distinct ids
        return groups.num_groups if groups.index.numel() else 0
    if groups.numel() == 0:
        return 0
    # S >= 0: a zero row is a sample without a label.  One zero row is added, so that the
    # distinct rows always include it, instead of selecting the labelled rows (a second sync).
    padded = torch.cat([groups, groups.new_zeros(1, groups.shape[1])])
    return torch.unique(padded, dim=0).shape[0] - 1


def requested_terms(config: LossConfig, num_granularities: int) -> tuple[bool, bool, bool]:
    """Which of (soft CLIP, pointwise, smooth KL) the settings ask for, from them and G alone.

    A term whose weights are all 0 is off; the smooth KL also needs two granularities.  This reads no
    tensor, so it holds under tracing too (the compiled operator sizes its buffers by it);
    :func:`build_problem` then turns the smooth KL off as well where it cannot contribute.
    """
    return (
        _weight_on(config.soft_clip_weight),
        _weight_on(config.pointwise_weight),
        config.smooth_kl_weight != 0 and num_granularities > 1,
    )


def kl_contributes(maps, taking: Sequence[bool] | None = None) -> bool:
    """Whether the smooth KL over these maps can be non-zero (its value and gradient).

    It needs two granularities with a distribution, and a support of more than one group: over
    J = 1 every Q^g is the single point 1, so the term and its gradient vanish identically.
    ``taking``: :func:`maps_taking_part` of the maps, when already read.
    """
    taking = maps_taking_part(maps) if taking is None else taking
    part = [t for t, on in zip(maps, taking, strict=True) if on]
    if len(part) < 2:
        return False
    return any(t is None or map_width(t) > 1 for t in part)


def maps_taking_part(maps) -> list[bool]:
    """:func:`~mgll.targets.cooc.map_takes_part` of every map, read in one host sync."""
    dense = [i for i, t in enumerate(maps) if isinstance(t, Tensor)]
    taking = [map_takes_part(t) if i not in dense else False for i, t in enumerate(maps)]
    if dense:
        flags = torch.stack([(maps[i] > 0).any() for i in dense]).tolist()
        for i, flag in zip(dense, flags, strict=True):
            taking[i] = bool(flag)
    return taking


def build_problem(
    image_features: Tensor,
    text_features: Sequence[Tensor],
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    cooc: Sequence[CoOccurrence],
    config: LossConfig,
    normalize: bool,
    *,
    logit_bound: float | None = None,
) -> Problem:
    dtype = compute_dtype(image_features.dtype)
    # Everything is prepared in the compute dtype: autocast must not turn R^g S into bf16.
    with torch.autocast(image_features.device.type, enabled=False):
        # the "graded" pointwise target min(C, 1) reads the targets' own scale: used as given
        free = config.pointwise_target != "graded"
        cooc = scale_free_targets(cooc, dtype) if free else list(cooc)
        ce_on, pw_on, kl_on = requested_terms(config, len(cooc))
        kl_maps, partial, taking = [None] * len(cooc), None, [True] * len(cooc)
        if kl_on:  # R^g and S built once for the maps and the unknowns' pieces
            owners = [ownership(c, dtype) for c in cooc]
            groups = (
                None
                if config.smooth_kl_support == "samples"
                else reference_groups(cooc, config.smooth_kl_reference, dtype)
            )
            kl_maps = smooth_kl_maps(cooc, config, dtype, owners=owners, groups=groups)
            if any(c.partial for c in cooc):
                partial = partial_kl(cooc, config, dtype, owners=owners, groups=groups)
            taking = maps_taking_part(kl_maps)
        w_rows = [  # W^r for bank targets
            CoOccurrence("dense", normalise_lines(c.data, 1, unknown=c.partial), partial=c.partial)
            if c.kind == "dense" and free
            else c
            for c in cooc
        ]
        norms = [  # none where the term is off at g (its weight there is 0)
            pointwise_norm(c, config.pointwise_norm, dtype)
            if pw_on and config.pointwise_weight_at(g) != 0
            else None
            for g, c in enumerate(w_rows)
        ]
        return Problem(
            image=prepare_features(image_features, dtype, normalize),
            texts=[prepare_features(t, dtype, normalize) for t in text_features],
            scale=logit_scale.to(dtype).reshape(()),
            bias=None if logit_bias is None else logit_bias.to(dtype).reshape(()),
            cooc=w_rows,
            kl_maps=kl_maps,
            soft_clip_on=ce_on,
            pointwise_on=pw_on,
            smooth_kl_on=kl_on and kl_contributes(kl_maps, taking),
            kl_taking=taking,
            pointwise_norms=norms,
            # W^c: weights only (the support and the anchors are read from W^r)
            col_weights=[
                normalise_lines(c.data, 0, keep_support=False, unknown=c.partial)
                if c.kind == "dense" and free
                else None
                for c in cooc
            ],
            partial=partial,
            logit_bound=logit_bound,
        )


def scale_free_targets(cooc: Sequence[CoOccurrence], dtype: torch.dtype) -> list[CoOccurrence]:
    """Bank targets in ``dtype`` at a moderate scale (:func:`mgll._terms.scale_free`).

    Every term normalises the targets, so this changes no loss; it keeps their sums in the float
    range for any scale (1e-45 to 3e38).  The smooth-KL maps are built from these; the backends
    then receive W^r and W^c, both divisions (:func:`mgll._terms.normalise_lines`).
    """
    return [
        CoOccurrence("dense", scale_free(c.data.to(dtype)), partial=c.partial)
        if c.kind == "dense"
        else c
        for c in cooc
    ]
