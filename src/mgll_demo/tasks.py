"""The demo's tasks: canvases composed from the digits, their texts attached (plain or merged)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mgll_demo.data import (
    NUM_CLASSES,
    PARITY_ANCESTORS,
    DigitsTask,
    compose,
    load_digits,
    parity_text,
    split_sources,
)
from mgll_demo.texts import attach_texts


def make_task(
    n_train: int = 10000, n_test: int = 1500, n_probe: int = 2000, seed: int = 0
) -> DigitsTask:
    """Load the digits, split the sources, compose the canvases and attach their texts."""
    digits, labels = load_digits()
    train_pool, test_pool = split_sources(labels, seed=seed)
    rng = np.random.default_rng(seed + 1)
    parts = [
        compose(digits, labels, pool, n, rng)
        for pool, n in ((train_pool, n_train), (test_pool, n_test), (train_pool, n_probe))
    ]
    for k, part in enumerate(parts):
        attach_texts(part, seed=seed * 3 + k)
    return DigitsTask(*parts, seed=seed)


def make_merged_task(
    fine_fraction: float,
    n_train: int = 10000,
    n_test: int = 1500,
    n_probe: int = 2000,
    seed: int = 0,
) -> DigitsTask:
    """Merged datasets: a ``fine_fraction`` of the training canvases is annotated finely.

    The other canvases carry only the coarse annotation of the hierarchy digit -> parity
    (``"odd digits"``, ``"even digits"``, ``"odd and even digits"``), as when a dataset that
    grades only "odd or even" is merged with one that names every digit.  Each training canvas
    gets one ``mixed`` text (its fine caption ``"digits 3 and 7"`` when annotated finely, its
    coarse one otherwise) with (N, 12) multi-hot labels over the 10 digits and the two parity
    classes (a fine canvas holds its digits, a coarse one its parities; the ancestors of a
    digit are added by :func:`mgll.targets.from_hierarchy` with :data:`PARITY_ANCESTORS`), and
    ``Canvases.fine`` marks the fine ones (the first ``round(fine_fraction * n_train)`` of a
    seeded permutation).  Test and probe canvases keep every annotation.

    For two granularities, ``fine`` and ``parity``: ``texts["fine"]`` is the fine caption of
    a finely annotated canvas and the empty string for a coarse-only one, whose
    ``labels["fine"]`` row (float, (N, 10)) is NaN everywhere: unannotated at that
    granularity (:func:`fine_labels` writes it as negatives or as the hierarchy's implied
    negatives instead); ``labels["parity"]`` is the (N, 2) parity of every canvas.
    """
    if not 0.0 < fine_fraction <= 1.0:
        raise ValueError(f"`fine_fraction` must be in (0, 1], got {fine_fraction}")
    task = make_task(n_train, n_test, n_probe, seed=seed)
    for part in (task.train, task.test, task.probe):
        parity = part.parity()
        coarse = [parity_text(p) for p in parity]
        part.texts["parity"] = coarse
        part.labels["parity"] = parity
        part.texts["mixed"], part.labels["mixed"] = (
            list(part.texts["digits"]),
            torch.cat([part.multi_hot, torch.zeros_like(parity)], dim=1),
        )
        part.texts["fine"], part.labels["fine"] = list(part.texts["digits"]), part.multi_hot.float()
    train = task.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))
    fine = torch.zeros(len(train), dtype=torch.bool)
    fine[order[: max(1, round(fine_fraction * len(train)))]] = True
    train.fine = fine
    for i in torch.nonzero(~fine).flatten().tolist():
        train.texts["mixed"][i] = train.texts["parity"][i]
        train.texts["fine"][i] = ""
    train.labels["fine"][~fine] = float("nan")
    train.labels["mixed"][~fine] = torch.cat(
        [torch.zeros(int((~fine).sum()), NUM_CLASSES, dtype=torch.bool), train.parity()[~fine]], 1
    )
    return task


UNANNOTATED = ("negative", "unknown", "implied")


def fine_labels(labels: Tensor, parity: Tensor, unannotated: str) -> Tensor:
    """The fine labels of a batch, with the NaN rows of coarse-only canvases written out.

    Args:
        labels: (N, 10) float fine labels; a row NaN everywhere is a coarse-only canvas.
        parity: (N, 2) parity labels (odd, even) of the same canvases.
        unannotated: ``"negative"``: a coarse-only row becomes all 0 (a negative of every
            fine text, what a loss without missing labels must assume); ``"unknown"``: it
            stays NaN (unannotated: the loss leaves its pairs out); ``"implied"``: the digits
            whose parity the coarse label rules out become 0 (known negatives, the hierarchy
            digit -> parity read downwards), the others stay NaN.

    Returns:
        (N, 10) float labels; fully annotated rows are unchanged.

    Example:
        >>> nan = float("nan")
        >>> odd_only = torch.full((1, 10), nan)
        >>> fine_labels(odd_only, torch.tensor([[1.0, 0.0]]), "implied")[0, :4].tolist()
        [0.0, nan, 0.0, nan]
    """
    if unannotated not in UNANNOTATED:
        raise ValueError(
            f"`unannotated` must be one of {UNANNOTATED}, got {unannotated!r}: pick how a "
            "coarse-only canvas's fine labels are written"
        )
    missing = labels.isnan().all(1)
    if unannotated == "unknown" or not missing.any():
        return labels
    out = labels.clone()
    if unannotated == "negative":
        out[missing] = 0.0
        return out
    parents = PARITY_ANCESTORS[:NUM_CLASSES, NUM_CLASSES:]  # (10, 2): digit -> its parity
    ruled_out = (parents @ (parity[missing].float() == 0).float().T).T > 0  # parent is 0
    rows = out[missing]
    rows[ruled_out] = 0.0
    out[missing] = rows
    return out
