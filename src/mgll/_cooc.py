"""Co-occurrence matrices C^g kept in the form they arrive in.

A paired batch's C^g is N x N but fully determined by its labels, so it is stored as the labels
and expanded one block at a time; a backend that never holds an N x K matrix (``tiled``) asks for
blocks only.  Bank targets arrive dense and stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mgll._overlap import is_binary_dtype, overlap

_CHUNK = 1024  # rows per block when a statistic needs every entry of C


@dataclass(frozen=True)
class CoOccurrence:
    """One granularity's co-occurrence C (N x K), non-negative.

    kind:
        ``"ids"``: paired, ``C_ik = 1[ids_i == ids_k]`` (``data`` is (N,) integer).
        ``"multi_hot"``: paired, ``C_ik = rule(a_i, a_k)`` (``data`` is (N, C_g): bool or
        integer 0/1, or float label probabilities in [0, 1]); ``rule`` is one of
        :data:`mgll._overlap.RULES` (see :func:`mgll._overlap.overlap`).
        ``"dense"``: bank, ``data`` is C itself (N, K_g).

    ``zero_one``: float multi-hot ``data`` known to hold only 0 and 1 (checked by the caller),
    so the exact matrix-product path serves every rule, as for bool and integer labels.
    """

    kind: str
    data: Tensor
    rule: str = "any"
    zero_one: bool = False

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
        """The dense block ``C[rows, cols]`` in ``dtype`` (default: float32)."""
        dtype = dtype or torch.float32
        if self.kind == "ids":
            return (self.data[rows, None] == self.data[None, cols]).to(dtype)
        if self.kind == "multi_hot":
            a, b = self.data[rows].to(dtype), self.data[cols].to(dtype)
            return overlap(a, b, self.rule, self.zero_one_labels)
        return self.data[rows, cols].to(dtype)

    def dense(self, dtype=None) -> Tensor:
        return self.block(dtype=dtype)

    def line_sums(self, dim: int, dtype=None) -> Tensor:
        """Row sums (``dim=1``, shape (N,)) or column sums (``dim=0``, shape (K,)) of C."""
        dtype = dtype or torch.float32
        if self.kind == "dense":
            return self.data.to(dtype).sum(dim)
        if self.kind == "ids":  # symmetric: both are the size of each sample's class
            _, inverse, counts = torch.unique(self.data, return_inverse=True, return_counts=True)
            return counts[inverse].to(dtype)
        if self.data.shape[1] == 0:  # multi-hot over C_g = 0 classes: no positive anywhere
            return torch.zeros(self.data.shape[0], dtype=dtype, device=self.data.device)
        # multi_hot: symmetric (every rule is).  Samples with the same label vector have the
        # same sum, so count the distinct vectors once: U x U overlaps (U <= N, usually far
        # fewer) in blocks of rows instead of N x N.
        sets, inverse, counts = torch.unique(
            self.data, dim=0, return_inverse=True, return_counts=True
        )
        sets, counts = sets.to(dtype), counts.to(dtype)
        binary = self.zero_one_labels
        sums = torch.cat(
            [
                overlap(sets[s : s + _CHUNK], sets, self.rule, binary) @ counts
                for s in range(0, len(sets), _CHUNK)
            ]
        )
        return sums[inverse]

    def anchor_counts(self) -> tuple[Tensor, Tensor]:
        """Numbers of rows and of columns with at least one positive (|A_r|, |A_c|)."""
        return (self.line_sums(1) > 0).sum(), (self.line_sums(0) > 0).sum()


def sample_groups(cooc: CoOccurrence, dtype=torch.float32) -> Tensor:
    """The N x J grouping S of the samples by this granularity (SPEC 2.3b), rows normalised.

    Groups that hold no sample are dropped; samples without a label have a zero row.
    """
    if cooc.kind == "ids":
        _, inverse = torch.unique(cooc.data, return_inverse=True)
        groups = torch.nn.functional.one_hot(inverse).to(dtype)
    else:  # multi-hot label sets or bank targets: spread evenly over the sample's positives
        groups = cooc.data.to(dtype)
    groups = groups[:, groups.sum(0) > 0]
    return normalize_rows(groups)


def ownership(cooc: CoOccurrence, dtype=torch.float32) -> Tensor | None:
    """R (K x N): which samples each text belongs to, rows normalised; None for paired (R = I)."""
    if cooc.paired:
        return None
    return normalize_rows(cooc.data.to(dtype).T)


def normalize_rows(m: Tensor) -> Tensor:
    sums = m.sum(1, keepdim=True)
    return m / torch.where(sums > 0, sums, torch.ones_like(sums))
