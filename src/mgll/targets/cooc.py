"""Co-occurrence matrices C^g kept in the form they arrive in.

A paired batch's C^g is N x N but fully determined by its labels, so it is stored as the labels
and expanded one block at a time; a backend that never holds an N x K matrix (``tiled``) asks for
blocks only.  Bank targets arrive dense and stay dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mgll.targets.overlap import (
    is_binary_dtype,
    overlap,
    partial_overlap,
    partial_overlap_into,
    partial_side,
    right_factors,
)

_ELEMENTS = 1 << 18  # entries of C per block when a statistic needs every entry
_EXACT_COUNTS = {torch.float32: 2**24, torch.float64: 2**53}  # counts exact below these


@dataclass(frozen=True)
class CoOccurrence:
    """One granularity's co-occurrence C (N x K), non-negative.

    kind:
        ``"ids"``: paired, ``C_ik = 1[ids_i == ids_k]`` (``data`` is (N,) integer).
        ``"multi_hot"``: paired, ``C_ik = rule(a_i, a_k)`` (``data`` is (N, C_g): bool or
        integer 0/1, or float label probabilities in [0, 1]); ``rule`` is one of
        :data:`mgll.targets.overlap.RULES` (see :func:`mgll.targets.overlap.overlap`).
        ``"dense"``: bank, ``data`` is C itself (N, K_g).

    ``zero_one``: float multi-hot ``data`` known to hold only 0 and 1 (checked by the caller),
    so the exact matrix-product path serves every rule, as for bool and integer labels.

    ``partial``: the data holds unknowns (docs/partial_annotation.rst): NaN label entries, the
    id -1, NaN bank targets.  Blocks then hold NaN at the unknown pairs, and every statistic
    reads the known pairs only; without it nothing changes (the same code path, bit for bit).
    """

    kind: str
    data: Tensor
    rule: str = "any"
    zero_one: bool = False
    partial: bool = False
    #: Statistics of ``data`` computed once per call (a paired C is symmetric: its row and
    #: column sums are one vector, and the distinct label sets are found once).
    #: Filled by :func:`count_labels` when the batch is built, or on first use.
    stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.data.shape[0]
        return (n, n) if self.kind != "dense" else tuple(self.data.shape)

    @property
    def paired(self) -> bool:
        return self.kind != "dense"

    @property
    def binary(self) -> bool:
        """True when every entry of C is 0 or 1 by construction (so 1[C > 0] is C itself)."""
        if self.kind == "ids":
            return True
        return self.kind == "multi_hot" and self.rule == "any" and self.zero_one_labels

    @property
    def zero_one_labels(self) -> bool:
        """Multi-hot labels whose entries are 0/1: bool or integer, or floats known to be."""
        return self.zero_one or is_binary_dtype(self.data)

    def block(self, rows: slice = slice(None), cols: slice = slice(None), dtype=None) -> Tensor:
        """The dense block ``C[rows, cols]`` in ``dtype`` (default: float32); NaN: unknown."""
        dtype = dtype or torch.float32
        if self.kind == "ids":
            a, b = self.data[rows, None], self.data[None, cols]
            c = (a == b).to(dtype)
            return torch.where((a >= 0) & (b >= 0), c, torch.nan) if self.partial else c
        if self.kind == "multi_hot":
            a, b = self.data[rows].to(dtype), self.data[cols].to(dtype)
            if self.partial:
                weights, known = partial_overlap(a, b, self.rule, self.zero_one_labels)
                return torch.where(known, weights, torch.nan)
            return overlap(a, b, self.rule, self.zero_one_labels)
        return self.data[rows, cols].to(dtype)

    def annotated(self) -> Tensor:
        """(N,) bool: the images annotated at this granularity (all, without unknowns)."""
        if not self.partial:
            return torch.ones(self.data.shape[0], dtype=torch.bool, device=self.data.device)
        if self.kind == "ids":
            return self.data >= 0
        return ~torch.isnan(self.data).all(1)

    def known_counts(self, dim: int, dtype=None) -> Tensor:
        """Known pairs of each row (``dim=1``) or column (``dim=0``) of C (int64).

        ``dtype``: the compute dtype; paired multi-hot labels find their known pairs in it, in
        the same pass as :meth:`line_sums` in that dtype (then read from it)."""
        n = self.shape[dim]
        if not self.partial:
            return torch.full((self.shape[1 - dim],), n, dtype=torch.int64, device=self.data.device)
        if self.kind == "dense":
            return (~torch.isnan(self.data)).sum(dim)
        if self.kind == "ids":  # symmetric: every annotated pair is known
            ann = self.annotated()
            return torch.where(ann, ann.sum(), 0)
        return self._partial_sums(dtype or torch.float32)[1]

    def dense(self, dtype=None) -> Tensor:
        return self.block(dtype=dtype)

    def line_sums(self, dim: int, dtype=None) -> Tensor:
        """Row sums (``dim=1``, shape (N,)) or column sums (``dim=0``, shape (K,)) of C."""
        dtype = dtype or torch.float32
        if self.kind == "dense":
            return self.data.to(dtype).nansum(dim) if self.partial else self.data.to(dtype).sum(dim)
        # paired: C is symmetric (every rule is), so the row and column sums are one vector
        key = ("line_sums", dtype)
        if key not in self.stats:
            self.stats[key] = self._paired_line_sums(dtype)
        return self.stats[key]

    def _paired_line_sums(self, dtype) -> Tensor:
        if self.kind == "ids":  # the size of each sample's class, counted in the sorted ids
            ordered = self.data.sort().values  # sorting needs no host synchronisation
            counts = torch.searchsorted(ordered, self.data, right=True) - torch.searchsorted(
                ordered, self.data
            )
            sums = counts.to(dtype)
            return torch.where(self.data >= 0, sums, 0) if self.partial else sums
        if self.data.shape[1] == 0:  # multi-hot over C_g = 0 classes: no positive anywhere
            return torch.zeros(self.data.shape[0], dtype=dtype, device=self.data.device)
        if self.partial:
            return self._partial_sums(dtype)[0]
        return self._over_sets(dtype)[0]

    def _partial_sums(self, dtype) -> tuple[Tensor, Tensor]:
        """Row sums of C and known pairs per row (int64), paired multi-hot with unknowns: one
        pass over the distinct label sets, once per call and dtype."""
        key = ("partial_sums", dtype)
        if key not in self.stats:
            self.stats[key] = self._over_sets(dtype)
        return self.stats[key]

    def distinct_sets(self) -> tuple[Tensor, Tensor, Tensor]:
        """The distinct label vectors of multi-hot ``data`` (NaN as -1), the index of each
        sample's, and how many samples have each: one ``torch.unique``, once per call."""
        if "sets" not in self.stats:
            x = self.data
            if self.partial:  # torch.unique keeps every NaN apart: mark them with -1 instead
                x = torch.where(torch.isnan(x), -1.0, x)
            self.stats["sets"] = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
        return self.stats["sets"]

    def _over_sets(self, dtype) -> tuple[Tensor, Tensor | None]:
        """Row sums of C and, with unknowns, of its known pairs (int64; else None), for paired
        multi-hot labels.

        Samples with the same label vector have the same sums, so the distinct vectors are
        counted once: U x U blocks (U <= N, usually far fewer), a bounded number of elements
        at a time, instead of N x N.  NaN entries (not annotated) are one value for this.
        The known pairs are counted in ``dtype`` when its integers are exact up to N (float32:
        N < 2**24), else in float64.
        """
        sets, inverse, counts = self.distinct_sets()
        sets = sets.to(dtype)
        if self.partial:
            sets = torch.where(sets < 0, torch.nan, sets)
        exact = self.data.shape[0] < _EXACT_COUNTS.get(dtype, 0)
        counts, counts64 = counts.to(dtype), None if exact else counts.double()
        binary = self.zero_one_labels
        side = partial_side(sets, left=False) if self.partial else None
        factors = right_factors(side) if self.partial and binary else None
        step = max(1, _ELEMENTS // max(1, len(sets)))
        sums, known_sums = [], []
        for s in range(0, len(sets), step):
            a = sets[s : s + step]
            if not self.partial:
                sums.append(overlap(a, sets, self.rule, binary) @ counts)
                continue
            weights = a.new_empty(a.shape[0], sets.shape[0])
            known = torch.empty_like(weights)
            partial_overlap_into(
                a, sets, self.rule, binary, b_side=side, b_factors=factors, known=known,
                weights=weights,
            )  # fmt: skip
            sums.append(weights @ counts)
            known_sums.append(known @ counts if exact else known.double() @ counts64)
        if not self.partial:
            return torch.cat(sums)[inverse], None
        known_counts = torch.cat(known_sums).round_().to(torch.int64)
        return torch.cat(sums)[inverse], known_counts[inverse]

    def anchor_counts(self) -> tuple[Tensor, Tensor]:
        """Numbers of rows and of columns with at least one positive (|A_r|, |A_c|)."""
        rows = (self.line_sums(1) > 0).sum()
        return rows, rows if self.paired else (self.line_sums(0) > 0).sum()


class GroupMap:
    """A grouping T (K x J) with at most one 1 per row, stored as group ids (never dense).

    ``index[k]`` is the group of row k, or -1 for a row in no group (a zero row of T: a sample
    whose id is unknown).  Applying it is a segment sum over the columns of a (..., K) tensor,
    and its transpose a gather, so a sample-level grouping costs O(K) memory however many
    groups it has; with at most ``DENSE_GROUPS`` groups a (K, J) one-hot is cheaper to
    multiply with and is used instead (K * J small).
    """

    DENSE_GROUPS = 32

    def __init__(self, index: Tensor, num_groups: int, ungrouped: bool = False) -> None:
        self.index = index
        self.num_groups = int(num_groups)
        #: some rows may be in no group (index -1): they go to an extra column J, dropped
        self.ungrouped = ungrouped
        self._dense: Tensor | None = None
        self._cols: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.shape[0], self.num_groups)

    def rows(self, sl: slice) -> GroupMap:
        """The rows ``sl`` of T (the same J columns)."""
        return GroupMap(self.index[sl], self.num_groups, self.ungrouped)

    def _columns(self) -> Tensor:
        """``index`` with a row in no group sent to the extra column J."""
        if not self.ungrouped:
            return self.index
        if self._cols is None:
            self._cols = torch.where(self.index >= 0, self.index, self.num_groups)
        return self._cols

    def dense(self, dtype=torch.float32) -> Tensor:
        """T itself, (K, J), for small J or for tests."""
        if self._dense is None or self._dense.dtype != dtype:
            k, j = self.shape
            out = torch.zeros(k, j + self.ungrouped, dtype=dtype, device=self.index.device)
            out[torch.arange(k, device=self.index.device), self._columns()] = 1
            self._dense = out[:, :j]
        return self._dense

    def pool(self, p: Tensor) -> Tensor:
        """``p @ T``: (..., K) -> (..., J), sums over the members of each group."""
        if self.num_groups <= self.DENSE_GROUPS:
            return p @ self.dense(p.dtype)
        out = p.new_zeros(*p.shape[:-1], self.num_groups + self.ungrouped)
        out = out.index_add(-1, self._columns(), p)
        return out[..., : self.num_groups] if self.ungrouped else out

    def spread(self, g: Tensor) -> Tensor:
        """``g @ T.T``: (..., J) -> (..., K), each row k takes its group's value (0: none)."""
        if self.num_groups <= self.DENSE_GROUPS:
            return g @ self.dense(g.dtype).T
        if self.ungrouped:
            g = torch.cat([g, g.new_zeros(*g.shape[:-1], 1)], -1)
        return g.index_select(-1, self._columns())

    def any_positive(self) -> bool:
        return self.index.numel() > 0 and self.num_groups > 0


#: Widest multi-hot labels counted as one integer code per row (bits of an int64).
_CODE_BITS = 62


def count_labels(labels: Tensor) -> tuple[list[Tensor], Callable[[list[int]], dict]] | None:
    """The statistics of paired labels that need a host read, prepared on the device.

    Returns the 0-dim int64 tensors to read (the caller reads those of the whole batch in one
    host sync) and a function from their values to the :attr:`CoOccurrence.stats` they give,
    or None where the labels are counted on first use instead (float labels, which may hold
    unknowns, and more than 62 classes).  Integer ids: their ranks (``"ranks"``, the groups of
    S).  Bool or integer 0/1 multi-hot: each row as one integer code whose order is the
    rows' lexicographic one, so that sorting the codes gives exactly ``torch.unique(labels,
    dim=0)`` (``"sets"``), and the key of :func:`mgll._problem.reference_groups`.  Entries that
    are not 0/1 (``validate=False``) give nothing: counted on first use, as before.
    """
    if labels.is_floating_point() or labels.numel() == 0:
        return None
    if labels.dim() == 1:
        inverse, size = dense_ranks(labels)
        return [size], lambda read: {"ranks": (inverse, read[0])}
    n, width = labels.shape
    if width > _CODE_BITS:
        return None
    x = labels.to(torch.int64)
    valid = ((x == 0) | (x == 1)).all().to(torch.int64)
    bits = 2 ** torch.arange(width - 1, -1, -1, device=x.device, dtype=torch.int64)
    codes = (x * bits).sum(1)  # column 0 most significant: code order = lexicographic order
    ranks, size = dense_ranks(codes)
    first = torch.full((n,), n, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, ranks, torch.arange(n, device=x.device), "amin")
    used = x.sum(0) > 0
    empty = (codes == 0).any().to(torch.int64)  # a sample without a label: S's zero row

    def stats(read: list[int]) -> dict:
        u, no_label, columns, ok = read
        if not ok:
            return {}
        counts = torch.zeros(u, dtype=torch.int64, device=x.device)
        counts = counts.scatter_add_(0, ranks, torch.ones_like(ranks))
        return {
            "sets": (labels.index_select(0, first[:u]), ranks, counts),
            "groups": (u - no_label, columns),
            "used": used,
        }

    return [size, empty, used.sum(), valid], stats


def dense_ranks(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(ids, return_inverse=True)``'s inverse (each id's rank among the distinct
    ids, 0..U-1) and U as a 0-dim tensor, for (N,) ids: by sorting, without a host sync."""
    ordered, order = ids.sort()
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    ranks = new.cumsum(0) - 1
    return torch.empty_like(ranks).scatter_(0, order, ranks), new.sum()


def apply_map(p: Tensor, t: Tensor | GroupMap | None) -> Tensor:
    """``p @ t`` for a smooth-KL map: dense, grouped by ids, or None (the identity)."""
    if t is None:
        return p
    return t.pool(p) if isinstance(t, GroupMap) else p @ t


def apply_map_transposed(g: Tensor, t: Tensor | GroupMap | None) -> Tensor:
    """``g @ t.T``: the gradient of :func:`apply_map` w.r.t. its input."""
    if t is None:
        return g
    return t.spread(g) if isinstance(t, GroupMap) else g @ t.T


def map_rows(t: Tensor | GroupMap | None, sl: slice) -> Tensor | GroupMap | None:
    """Rows ``sl`` of a smooth-KL map."""
    if t is None:
        return None
    return t.rows(sl) if isinstance(t, GroupMap) else t[sl]


def map_takes_part(t: Tensor | GroupMap | None) -> bool:
    """Whether the map has a positive entry (otherwise its granularity has no distribution)."""
    if t is None:
        return True
    return t.any_positive() if isinstance(t, GroupMap) else bool((t > 0).any())


def map_width(t: Tensor | GroupMap | None) -> int | None:
    """J, the number of columns of the map; None for the identity."""
    return None if t is None else int(t.shape[1])


def sample_groups(cooc: CoOccurrence, dtype=torch.float32) -> Tensor | GroupMap:
    """The N x J grouping S of the samples by this granularity, rows normalised.

    Integer ids give a :class:`GroupMap` (one group per distinct id, found by sorting: O(N log
    N), never an N x J matrix).  Multi-hot label sets and bank targets spread each sample's
    mass evenly over its positives (N x C_g, the labels' own size).  Groups that hold no sample
    are dropped; samples without a label have a zero row.
    """
    if cooc.kind == "ids" and not cooc.partial:
        inverse, size = dense_ranks(cooc.data)
        return GroupMap(inverse, int(size))
    if cooc.kind == "ids":  # the missing id -1 belongs to no group (a zero row)
        known = cooc.data >= 0
        inverse, size = dense_ranks(torch.where(known, cooc.data, -1))
        # -1, when present, is the smallest id: rank 0; the known ids follow it
        missing = (~known).any().to(inverse.dtype)
        size, missing = torch.stack([size, missing]).tolist()  # one host sync, as for ids
        return GroupMap(torch.where(known, inverse - missing, -1), size - missing, True)
    groups = cooc.data.to(dtype).nan_to_num(0.0) if cooc.partial else cooc.data.to(dtype)
    groups = groups[:, groups.sum(0) > 0]
    return normalize_rows(groups)


def ownership(cooc: CoOccurrence, dtype=torch.float32) -> Tensor | None:
    """R (K x N): which samples each text belongs to, rows normalised; None for paired (R = I)."""
    if cooc.paired:
        return None
    data = cooc.data.to(dtype)
    return normalize_rows((data.nan_to_num(0.0) if cooc.partial else data).T)


def normalize_rows(m: Tensor) -> Tensor:
    sums = m.sum(1, keepdim=True)
    return m / torch.where(sums > 0, sums, torch.ones_like(sums))
