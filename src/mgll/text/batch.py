"""What :meth:`mgll.text.MultiGranularTextBuilder.build` returns, and text de-duplication."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

EncodeFn = Callable[[list[str]], Tensor]


def unique_inverse(texts: Sequence[str]) -> tuple[tuple[str, ...], Tensor]:
    """Distinct strings in first-occurrence order and the index of each text among them."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(t, len(first)) for t in texts]
    return tuple(first), torch.tensor(inverse, dtype=torch.long)


def encode_unique(texts: Sequence[str], encode_fn: EncodeFn) -> Tensor:
    """Encode each distinct string once and gather the embeddings back to ``texts``' order.

    ``encode_fn`` receives the distinct strings (first-occurrence order) as a list and must
    return one row per string; gradients flow back through the gather.

    Args:
        texts: K strings, possibly repeated.
        encode_fn: ``list[str] -> Tensor`` of shape (distinct, D), e.g. a tokenizer followed by
            a text tower.

    Shape:
        - Output: (K, D)

    Raises:
        TypeError: ``texts`` is not a sequence of strings, or ``encode_fn`` does not return a tensor.
        ValueError: ``encode_fn`` returns the wrong number of rows.

    Example:
        >>> calls = []
        >>> def encode(strings):
        ...     calls.append(len(strings))
        ...     return torch.stack([torch.tensor([float(len(s)), 1.0]) for s in strings])
        >>> encode_unique(["a DR image", "AMD", "a DR image"], encode)
        tensor([[10.,  1.],
                [ 3.,  1.],
                [10.,  1.]])
        >>> calls  # one call, two distinct strings
        [2]
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"`texts` must be a sequence of strings, got {type(texts).__name__}")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"`texts[{k}]` must be a string, got {type(t).__name__}")
    if not callable(encode_fn):
        raise TypeError(f"`encode_fn` must be callable, got {type(encode_fn).__name__}")
    unique, inverse = unique_inverse(texts)
    emb = encode_fn(list(unique))
    if not isinstance(emb, Tensor):
        raise TypeError(f"`encode_fn` must return a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2 or emb.shape[0] != len(unique):
        raise ValueError(
            f"`encode_fn` must return ({len(unique)}, D), one row per distinct string, got "
            f"shape {tuple(emb.shape)}"
        )
    return emb[inverse.to(emb.device)]


@dataclass(frozen=True, eq=False)
class GranularityTexts:
    """One granularity of a built batch.

    Attributes:
        name: the granularity's name.
        mode: ``"paired"`` or ``"bank"``.
        texts: the K_g texts to encode (K_g = N paired; one per class in bank mode).
        unique_texts: the distinct texts, first-occurrence order.
        inverse: (K_g,) long, ``texts[k] == unique_texts[inverse[k]]``.
        classes: the C_g classes, indexing the ids / multi-hot columns / bank columns.
        label_sets: each sample's labels (weight > 0) after hierarchy expansion, canonical
            order (``()`` for a sample not annotated here).
        labels: paired mode: (N, C_g) float32 multi-hot (0/1, or weights in [0, 1] with
            ``label_format="soft"``; NaN where a label is unknown, a whole NaN row for a
            sample not annotated here), or (N,) long class ids (-1: not annotated); else None.
        targets: bank mode: (N, K_g) float32 co-occurrence (``targets[:, k]`` is
            ``classes[k]``; a label's weight, 1.0 unless the annotation gave one; NaN:
            unknown); else None.
        conflicts: how many explicit negatives (``{label: 0.0}``, or a coarse granularity's
            negatives) the hierarchy overrode because a descendant is positive.

    Example:
        >>> from mgll.text import Granularity, MultiGranularTextBuilder
        >>> builder = MultiGranularTextBuilder([Granularity("disease", "an image of {}")])
        >>> part = builder.build([{"disease": "DR"}, {"disease": "AMD"}, {"disease": "DR"}])[0]
        >>> part.texts, part.inverse
        (('an image of DR', 'an image of AMD', 'an image of DR'), tensor([0, 1, 0]))
        >>> part.classes, part.labels
        (('AMD', 'DR'), tensor([[0., 1.],
                [1., 0.],
                [0., 1.]]))
    """

    name: str
    mode: str
    texts: tuple[str, ...]
    unique_texts: tuple[str, ...]
    inverse: Tensor
    classes: tuple
    label_sets: tuple[tuple, ...]
    labels: Tensor | None
    targets: Tensor | None
    conflicts: int = 0

    @property
    def loss_input(self) -> Tensor:
        """This granularity's entry for the loss: ``labels`` (paired) or ``targets`` (bank)."""
        return self.labels if self.mode == "paired" else self.targets

    def multi_hot(self) -> Tensor:
        """(N, C_g) bool label sets over ``classes``, in either mode (e.g. for evaluation)."""
        index = {c: j for j, c in enumerate(self.classes)}
        out = torch.zeros(len(self.label_sets), len(self.classes), dtype=torch.bool)
        for i, s in enumerate(self.label_sets):
            out[i, [index[x] for x in s]] = True
        return out

    def encode(self, encode_fn: EncodeFn) -> Tensor:
        """(K_g, D) text features: ``encode_fn`` runs once on ``unique_texts``."""
        return encode_unique(self.texts, encode_fn)

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> GranularityTexts:
        """A copy with ``inverse``, ``labels`` and ``targets`` on ``device`` (dtypes kept)."""
        moved = {
            k: None if v is None else v.to(device=device, non_blocking=non_blocking)
            for k, v in (("labels", self.labels), ("targets", self.targets))
        }
        inverse = self.inverse.to(device=device, non_blocking=non_blocking)
        return replace(self, inverse=inverse, **moved)


class TextBatch(Sequence[GranularityTexts]):
    """The G built granularities, indexable by position or name, in the builder's order.

    ``batch.encode(encode_fn)`` gives the ``text_features`` list and ``batch.loss_kwargs()``
    the ``labels=``/``targets=`` keyword for :class:`mgll.MGLLLoss`.

    Example:
        >>> from mgll.text import Granularity, MultiGranularTextBuilder
        >>> builder = MultiGranularTextBuilder([Granularity("disease"), Granularity("note")])
        >>> batch = builder.build(
        ...     [
        ...         {"disease": "DR", "note": "exudates"},
        ...         {"disease": "AMD", "note": "drusen"},
        ...         {"disease": "DR", "note": "drusen"},
        ...     ],
        ...     mode="bank",
        ... )
        >>> batch
        TextBatch(mode='bank', disease: 2 texts, note: 2 texts)
        >>> features = batch.encode(lambda strings: torch.randn(len(strings), 8))  # (K_g, D)
        >>> image = torch.randn(3, 8, requires_grad=True)  # (N, D)
        >>> loss = mgll.MGLLLoss()(image, features, torch.tensor(10.0), **batch.loss_kwargs())
        >>> loss.backward()
    """

    def __init__(self, parts: tuple[GranularityTexts, ...], mode: str) -> None:
        self._parts = parts
        self.mode = mode

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, key):  # int, slice or granularity name
        if isinstance(key, str):
            for part in self._parts:
                if part.name == key:
                    return part
            raise KeyError(f"no granularity named {key!r}; known: {self.names}")
        return self._parts[key]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p.name}: {len(p.texts)} texts" for p in self._parts)
        return f"TextBatch(mode={self.mode!r}, {sizes})"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._parts]

    @property
    def conflicts(self) -> dict[str, int]:
        """``{granularity name: conflicts}``: explicit negatives the hierarchy overrode."""
        return {p.name: p.conflicts for p in self._parts}

    @property
    def unique_texts(self) -> tuple[str, ...]:
        """Every distinct string across all granularities (what :meth:`encode` encodes)."""
        return unique_inverse([t for p in self._parts for t in p.unique_texts])[0]

    def loss_kwargs(self) -> dict[str, list[Tensor]]:
        """``{"labels": [...]}`` (paired) or ``{"targets": [...]}`` (bank), one per granularity."""
        key = "labels" if self.mode == "paired" else "targets"
        return {key: [p.loss_input for p in self._parts]}

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> TextBatch:
        """A new batch with its tensors (labels, targets, inverse indices) on ``device``.

        open_clip's train loop calls ``texts.to(device=device, non_blocking=True)`` on what
        the loader yields; dtypes are kept.

        Example:
            >>> from mgll.text import Granularity, MultiGranularTextBuilder
            >>> batch = MultiGranularTextBuilder([Granularity("dx")]).build([{"dx": "DR"}])
            >>> batch.to("cpu")["dx"].labels.device
            device(type='cpu')
        """
        return TextBatch(tuple(p.to(device, non_blocking) for p in self._parts), self.mode)

    def encode(self, encode_fn: EncodeFn) -> list[Tensor]:
        """The G text feature tensors, with one ``encode_fn`` call over every distinct string.

        Shape:
            - Output[g]: (K_g, D)
        """
        flat = [t for p in self._parts for t in p.texts]
        emb = encode_unique(flat, encode_fn)
        return list(torch.split(emb, [len(p.texts) for p in self._parts]))
