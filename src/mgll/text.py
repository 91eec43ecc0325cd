r"""Label-to-text builders: structured annotations in, texts and loss inputs out (docs/guide_annotations.rst).

A :class:`Granularity` says how one annotation field becomes text (a template, optional
per-label descriptions); a :class:`MultiGranularTextBuilder` turns a batch of annotations
(``{"disease": ["DR", "DME"], "description": "...", ...}``) into, per granularity, the texts
to encode, their de-duplicated ``unique_texts`` with an ``inverse`` index, and the ``labels``
(paired mode) or ``targets`` (bank mode) that :class:`mgll.MGLLLoss` needs.

Example:
    >>> builder = MultiGranularTextBuilder([
    ...     Granularity("disease", "This is a fundus image of {}."),
    ...     Granularity("explanation"),
    ... ])
    >>> batch = builder.build([
    ...     {"disease": ["DR", "DME"], "explanation": "hard exudates near the macula"},
    ...     {"disease": ["DME", "DR"], "explanation": "microaneurysms"},
    ...     {"disease": "AMD"},
    ... ])
    >>> batch["disease"].texts
    ('This is a fundus image of DME, DR.', 'This is a fundus image of DME, DR.', 'This is a fundus image of AMD.')
    >>> batch["disease"].unique_texts, batch["disease"].inverse
    (('This is a fundus image of DME, DR.', 'This is a fundus image of AMD.'), tensor([0, 0, 1]))
    >>> batch["disease"].labels  # multi-hot over classes ('AMD', 'DME', 'DR')
    tensor([[False,  True,  True],
            [False,  True,  True],
            [ True, False, False]])
    >>> encode = lambda strings: torch.randn(len(strings), 16)  # a toy text encoder
    >>> image = torch.randn(3, 16, requires_grad=True)
    >>> loss = mgll.MGLLLoss()(image, batch.encode(encode), torch.tensor(10.0), **batch.loss_kwargs())
    >>> loss.backward()
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mgll._granularity import Granularity
from mgll._hierarchy import LabelHierarchy
from mgll._textbatch import GranularityTexts, TextBatch, encode_unique, unique_inverse

__all__ = [
    "Granularity",
    "GranularityTexts",
    "LabelHierarchy",
    "MultiGranularTextBuilder",
    "TextBatch",
    "encode_unique",
]

_MODES = ("paired", "bank")
_LABEL_FORMATS = ("auto", "ids", "multi_hot")


class MultiGranularTextBuilder:
    r"""Turn a batch of structured annotations into texts and MGLL loss inputs.

    Per granularity, :meth:`build` returns a :class:`GranularityTexts` with ``texts`` (what to
    encode, K_g strings), ``unique_texts`` and ``inverse`` (``texts[k] ==
    unique_texts[inverse[k]]``, so a text encoder runs once per distinct string) and:

    * ``mode="paired"`` (K_g = N, text k belongs to sample k): ``labels``, (N,) class ids when
      every sample has exactly one label there, else an (N, C_g) bool multi-hot (a sample
      without a label is an all-zero row: no positive);
    * ``mode="bank"`` (one text per class: every class of ``classes`` when declared, else every
      class present in the batch): ``targets``, the (N, K_g) float 0/1 co-occurrence.

    With a ``hierarchy`` a sample's label set is expanded with the ancestors of its labels
    before labels and targets are formed (a "moderate NPDR" image is also a "DR" image: a
    positive of the bank text "DR", and of a paired "severe NPDR" text through "DR"); the
    texts show the annotated labels only.  One :class:`LabelHierarchy` applies to every
    granularity, labels outside it having no ancestors; a mapping ``{name: hierarchy}`` applies
    per granularity and then every label there must be in its hierarchy.

    Args:
        granularities: the G granularities, in the order of the loss's ``text_features``.
        hierarchy: ``None``, one :class:`LabelHierarchy`, or ``{granularity name: hierarchy}``.

    Example:
        >>> hierarchy = LabelHierarchy({"moderate NPDR": "DR", "severe NPDR": "DR"})
        >>> builder = MultiGranularTextBuilder(
        ...     [Granularity("disease", "a fundus image of {}")], hierarchy
        ... )
        >>> batch = builder.build(
        ...     [{"disease": "moderate NPDR"}, {"disease": "DR"}, {"disease": "AMD"}], mode="bank"
        ... )
        >>> batch["disease"].texts
        ('a fundus image of AMD', 'a fundus image of DR', 'a fundus image of moderate NPDR')
        >>> batch["disease"].targets  # the moderate NPDR image is also a positive of "DR"
        tensor([[0., 1., 1.],
                [0., 1., 0.],
                [1., 0., 0.]])
    """

    def __init__(
        self,
        granularities: Sequence[Granularity],
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> None:
        if isinstance(granularities, Granularity) or not isinstance(granularities, Sequence):
            raise TypeError(
                "`granularities` must be a non-empty sequence of Granularity, got "
                f"{type(granularities).__name__}"
            )
        if len(granularities) == 0:
            raise ValueError("`granularities` must hold at least one Granularity, got none")
        for g, gran in enumerate(granularities):
            if not isinstance(gran, Granularity):
                raise TypeError(
                    f"`granularities[{g}]` must be a Granularity, got {type(gran).__name__}"
                )
        names = [gran.name for gran in granularities]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"`granularities` must have distinct names, got repeated {dup}")
        self.granularities = tuple(granularities)
        self._hierarchies = _check_hierarchy(hierarchy, names)

    def __repr__(self) -> str:
        names = ", ".join(repr(g.name) for g in self.granularities)
        return f"MultiGranularTextBuilder([{names}])"

    def build(
        self,
        annotations: Sequence[Mapping[str, object]],
        mode: str = "paired",
        *,
        label_format: str = "auto",
        rng: random.Random | None = None,
    ) -> TextBatch:
        """Texts, unique texts, inverse indices and loss inputs for a batch of N annotations.

        Args:
            annotations: N mappings from field names to labels (see :class:`Granularity`).
            mode: ``"paired"`` (one text per sample, ``labels``) or ``"bank"`` (one text per
                class, ``targets``).
            label_format: paired mode only: ``"auto"`` (ids when every sample has exactly one
                label at the granularity, else multi-hot), ``"ids"`` (an error if a sample
                has zero or several labels) or ``"multi_hot"``.
            rng: picks one of several descriptions per label at random; default the first.

        Returns:
            A :class:`TextBatch`, indexable by granularity name or position.
        """
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if label_format not in _LABEL_FORMATS:
            raise ValueError(
                f"`label_format` must be one of {_LABEL_FORMATS}, got {label_format!r}"
            )
        if isinstance(annotations, (str, Mapping)) or not isinstance(annotations, Sequence):
            raise TypeError(
                "`annotations` must be a sequence of N mappings (one per sample), got "
                f"{type(annotations).__name__}"
            )
        if len(annotations) == 0:
            raise ValueError("`annotations` is empty (N=0); pass at least one sample")
        for i, a in enumerate(annotations):
            if not isinstance(a, Mapping):
                raise TypeError(f"`annotations[{i}]` must be a mapping, got {type(a).__name__}")
        parts = [
            self._one(gran, annotations, mode, label_format, rng) for gran in self.granularities
        ]
        return TextBatch(tuple(parts), mode)

    def _one(self, gran, annotations, mode, label_format, rng) -> GranularityTexts:
        own = [gran.labels_of(a, f"annotations[{i}]") for i, a in enumerate(annotations)]
        sets = [self._expand(gran, labels, i) for i, labels in enumerate(own)]
        if gran.classes is not None:
            classes = gran.classes
        else:
            classes = gran.canonical([x for s in sets for x in s])
        index = {c: j for j, c in enumerate(classes)}
        multi_hot = torch.zeros(len(sets), len(classes), dtype=torch.bool)
        for i, s in enumerate(sets):
            multi_hot[i, [index[x] for x in s]] = True
        labels = targets = None
        if mode == "paired":
            texts = tuple(gran.render(labels, rng) for labels in own)
            labels = _paired_labels(gran.name, multi_hot, label_format)
        else:
            texts = tuple(gran.render((c,), rng) for c in classes)
            targets = multi_hot.to(torch.float32)
        unique, inverse = unique_inverse(texts)
        return GranularityTexts(
            name=gran.name,
            mode=mode,
            texts=texts,
            unique_texts=unique,
            inverse=inverse,
            classes=tuple(classes),
            label_sets=tuple(sets),
            labels=labels,
            targets=targets,
        )

    def _expand(self, gran: Granularity, labels: tuple, i: int) -> tuple:
        strict, hierarchy = self._hierarchies.get(gran.name, (False, None))
        if hierarchy is None or not labels:
            return labels
        try:
            expanded = hierarchy.expand(labels, strict=strict)
        except ValueError as err:
            raise ValueError(f"`annotations[{i}]` at granularity {gran.name!r}: {err}") from None
        if gran.classes is not None:
            missing = [x for x in expanded if x not in gran.classes]
            if missing:
                raise ValueError(
                    f"`annotations[{i}]`: the ancestors {', '.join(map(repr, missing))} of its "
                    f"labels are not in `classes` of granularity {gran.name!r}; declare them"
                )
        return gran.canonical(expanded)

    @classmethod
    def mgll_fundus(
        cls,
        levels: Sequence[str] = ("disease", "description"),
        *,
        separator: str | None = None,
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> MultiGranularTextBuilder:
        """A builder for MGLL-Fundus records ``{"ImageID", "Disease", "Description", "Keyword"}``.

        Granularities (choose with ``levels``, in order): ``"disease"`` (field ``Disease``,
        prompt ``"This is a fundus image of {}"`` as in the authors' code), ``"description"``
        (field ``Description``, verbatim) and ``"keyword"`` (field ``Keyword``, the disease
        prompt).  ``separator`` (e.g. ``","``) splits multi-disease strings into label sets;
        by default a whole string is one label, so samples match when their strings are
        identical, as in the authors' code.
        """
        table = {
            "disease": ("Disease", "This is a fundus image of {}"),
            "description": ("Description", "{}"),
            "keyword": ("Keyword", "This is a fundus image of {}"),
        }
        return cls(_preset("levels", levels, table, separator), hierarchy)

    @classmethod
    def midrc(
        cls,
        levels: Sequence[str] = ("modality", "study_description", "series_description"),
        *,
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> MultiGranularTextBuilder:
        """A builder for MIDRC records ``{"modality", "study_description_0", "series_description"}``.

        Granularities: ``"modality"`` (prompt ``"This is a {} image."``), ``"study_description"``
        (field ``study_description_0``, verbatim) and ``"series_description"`` (verbatim).
        """
        table = {
            "modality": ("modality", "This is a {} image."),
            "study_description": ("study_description_0", "{}"),
            "series_description": ("series_description", "{}"),
        }
        return cls(_preset("levels", levels, table, None), hierarchy)


def _preset(arg, levels, table, separator) -> list[Granularity]:
    if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise TypeError(f"`{arg}` must be a non-empty sequence of names from {tuple(table)}")
    unknown = [x for x in levels if x not in table]
    if unknown:
        raise ValueError(f"`{arg}` must name granularities from {tuple(table)}, got {unknown}")
    return [Granularity(x, table[x][1], key=table[x][0], separator=separator) for x in levels]


def _paired_labels(name: str, multi_hot: Tensor, label_format: str) -> Tensor:
    counts = multi_hot.sum(1)
    single = bool((counts == 1).all())
    if label_format == "ids" and not single:
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(
            f"`label_format='ids'` needs exactly one label per sample at granularity {name!r}, "
            f"but sample {bad} has {int(counts[bad])}; use 'multi_hot' or 'auto'"
        )
    if label_format == "multi_hot" or not single:
        return multi_hot
    return multi_hot.to(torch.long).argmax(1)


def _check_hierarchy(hierarchy: object, names: list[str]) -> dict:
    if hierarchy is None:
        return {}
    if isinstance(hierarchy, LabelHierarchy):
        return {n: (False, hierarchy) for n in names}
    if not isinstance(hierarchy, Mapping):
        raise TypeError(
            "`hierarchy` must be a LabelHierarchy or a mapping {granularity name: "
            f"LabelHierarchy}}, got {type(hierarchy).__name__}"
        )
    unknown = [n for n in hierarchy if n not in names]
    if unknown:
        raise ValueError(f"`hierarchy` names unknown granularities {unknown}; known: {names}")
    for n, h in hierarchy.items():
        if not isinstance(h, LabelHierarchy):
            raise TypeError(f"`hierarchy[{n!r}]` must be a LabelHierarchy, got {type(h).__name__}")
    return {n: (True, h) for n, h in hierarchy.items()}
