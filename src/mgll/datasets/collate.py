"""``MultiGranularCollate``: a DataLoader ``collate_fn`` from a text builder."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from torch.utils.data import default_collate, get_worker_info

from mgll.text import MultiGranularTextBuilder
from mgll.text.batch import TextBatch

__all__ = ["MultiGranularCollate"]


class MultiGranularCollate:
    r"""A DataLoader ``collate_fn``: ``(image, annotation)`` items in, ``(images, TextBatch)`` out.

    torch's default collate turns a batch of annotation dicts into one dict of lists (and
    transposes label lists), which no builder can read; pass this class instead.  The images
    are collated by ``image_collate`` (default :func:`torch.utils.data.default_collate`, which
    stacks tensors of one shape into (N, ...)), the annotations by
    :meth:`MultiGranularTextBuilder.build <mgll.text.MultiGranularTextBuilder.build>`.

    Label shapes stay the same from batch to batch: ``label_format`` is fixed per granularity
    (default ``"multi_hot"`` everywhere, so a batch whose samples happen to carry one label
    each does not switch to ids), and a granularity with declared ``classes`` always has
    C_g = ``len(classes)`` columns in that order.  Declare ``classes`` for every labelled
    granularity when the columns must mean the same class in every batch (distributed
    training gathers labels across ranks); a free-text granularity without ``classes`` has
    one column per distinct text of the batch, which is all a single process needs.  Pass
    ``label_format="soft"`` (float32 in [0, 1]) when annotations carry uncertain weights
    (the U-Soft policy of :mod:`mgll.datasets`).

    The object is picklable, so it works with ``DataLoader(num_workers > 0)``.

    Args:
        builder: the :class:`~mgll.text.MultiGranularTextBuilder` that turns annotations into
            texts and labels.
        mode: ``"paired"`` (one text per image, ``labels``) or ``"bank"`` (``targets``).
        label_format: paired mode: ``"multi_hot"``, ``"soft"``, ``"ids"``, ``"auto"``, or
            ``{granularity name: format}`` (unnamed granularities ``"multi_hot"``).
        image_collate: collates the list of N images; default ``default_collate``.
        seed: when given, each worker draws descriptions with ``random.Random(seed, worker
            id)`` (see ``rng`` of ``build``); default: always the first description.

    Returns:
        ``collate(items)`` returns ``(images, text_batch)``: the collated images (e.g.
        (N, C, H, W)) and a :class:`~mgll.text.TextBatch`.

    Raises:
        TypeError: ``builder`` is not a builder, an item is not an ``(image, annotation)``
            pair, or an annotation is not a mapping.
        ValueError: unknown ``mode`` or ``label_format``; an empty batch.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from mgll.datasets import MultiGranularCollate
        >>> from mgll.text import Granularity, MultiGranularTextBuilder
        >>> builder = MultiGranularTextBuilder([
        ...     Granularity("finding", "a chest X-ray with {}", classes=["Edema", "Effusion"]),
        ... ])
        >>> items = [(torch.zeros(1, 4, 4), {"finding": ["Edema"]}),
        ...          (torch.ones(1, 4, 4), {"finding": ["Edema", "Effusion"]})]
        >>> loader = DataLoader(items, batch_size=2, collate_fn=MultiGranularCollate(builder))
        >>> images, texts = next(iter(loader))
        >>> images.shape, texts["finding"].labels
        (torch.Size([2, 1, 4, 4]), tensor([[1., 0.],
                [1., 1.]]))
        >>> features = texts.encode(lambda strings: torch.randn(len(strings), 8))
        >>> image_features = torch.randn(2, 8, requires_grad=True)
        >>> loss = mgll.MGLLLoss()(image_features, features, torch.tensor(10.0),
        ...                        **texts.loss_kwargs())
        >>> loss.backward()
    """

    def __init__(
        self,
        builder: MultiGranularTextBuilder,
        mode: str = "paired",
        *,
        label_format: str | Mapping[str, str] = "multi_hot",
        image_collate: Callable[[list], object] | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(builder, MultiGranularTextBuilder):
            raise TypeError(
                f"`builder` must be a mgll.text.MultiGranularTextBuilder, got "
                f"{type(builder).__name__}"
            )
        if mode not in ("paired", "bank"):
            raise ValueError(f"`mode` must be 'paired' or 'bank', got {mode!r}")
        if isinstance(label_format, Mapping):
            names = [g.name for g in builder.granularities]
            label_format = {n: "multi_hot" for n in names} | dict(label_format)
        builder._label_formats(label_format)  # validates eagerly, before any batch
        if image_collate is not None and not callable(image_collate):
            raise TypeError(
                f"`image_collate` must be callable or None, got {type(image_collate).__name__}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {type(seed).__name__}")
        self.builder = builder
        self.mode = mode
        self.label_format = label_format
        self.image_collate = image_collate
        self.seed = seed
        self._rng: random.Random | None = None

    def __repr__(self) -> str:
        return (
            f"MultiGranularCollate({self.builder!r}, mode={self.mode!r}, "
            f"label_format={self.label_format!r})"
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"] = None  # each worker process seeds its own
        return state

    def __call__(self, items: Sequence[object]) -> tuple[object, TextBatch]:
        if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
            raise TypeError(
                "`items` must be a sequence of (image, annotation) pairs, got "
                f"{type(items).__name__}"
            )
        if len(items) == 0:
            raise ValueError("`items` is empty (N=0); a batch needs at least one sample")
        images, annotations = [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, Mapping)) or not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(
                    f"`items[{i}]` must be an (image, annotation) pair, got "
                    f"{_describe(item)}; make the dataset's __getitem__ return (image, annotation)"
                )
            if not isinstance(item[1], Mapping):
                raise TypeError(
                    f"`items[{i}][1]` (the annotation) must be a mapping, got "
                    f"{type(item[1]).__name__}"
                )
            images.append(item[0])
            annotations.append(item[1])
        collate = default_collate if self.image_collate is None else self.image_collate
        batch = self.builder.build(
            annotations, self.mode, label_format=self.label_format, rng=self._get_rng()
        )
        return collate(images), batch

    def _get_rng(self) -> random.Random | None:
        if self.seed is None:
            return None
        if self._rng is None:
            info = get_worker_info()
            self._rng = random.Random(f"{self.seed}/{0 if info is None else info.id}")
        return self._rng


def _describe(item: object) -> str:
    if isinstance(item, Sequence) and not isinstance(item, str):
        return f"a {type(item).__name__} of length {len(item)}"
    return type(item).__name__
