"""The builder: a batch of structured annotations in, per granularity the texts and loss inputs out."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mgll.text.batch import GranularityTexts, TextBatch, unique_inverse
from mgll.text.granularity import Granularity
from mgll.text.hierarchy import LabelHierarchy

_MODES = ("paired", "bank")
_LABEL_FORMATS = ("auto", "ids", "multi_hot", "soft")


class MultiGranularTextBuilder:
    r"""Turn a batch of structured annotations into texts and MGLL loss inputs.

    Per granularity, :meth:`build` returns a :class:`GranularityTexts` with ``texts`` (what to
    encode, K_g strings), ``unique_texts`` and ``inverse`` (``texts[k] ==
    unique_texts[inverse[k]]``, so a text encoder runs once per distinct string) and:

    * ``mode="paired"`` (K_g = N, text k belongs to sample k): ``labels``, (N,) class ids when
      every sample has exactly one label there, else an (N, C_g) bool multi-hot (a sample
      without a label is an all-zero row: no positive), or float32 label probabilities in
      [0, 1] when annotations give ``{label: weight}`` (see ``label_format``);
    * ``mode="bank"`` (one text per class: every class of ``classes`` when declared, else every
      class present in the batch): ``targets``, the (N, K_g) float co-occurrence (0/1, or a
      label's weight).

    With a ``hierarchy`` a sample's label set is expanded with the ancestors of its labels
    before labels and targets are formed (a "moderate NPDR" image is also a "DR" image: a
    positive of the bank text "DR", and of a paired "severe NPDR" text through "DR"); the
    texts show the annotated labels only.  An ancestor takes the largest weight of its
    descendants (an uncertain "Edema" at 0.5 makes "Lung Opacity" at least 0.5).  One :class:`LabelHierarchy` applies to every
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
            label_format: paired mode only, one value or ``{granularity name: value}``
                (unnamed granularities ``"auto"``): ``"auto"`` (ids when every sample has
                exactly one label at the granularity, else bool multi-hot, float32 soft labels
                when a weight is in (0, 1)), ``"ids"`` (an error if a sample has zero or
                several labels), ``"multi_hot"`` (bool) or ``"soft"`` (float32 in [0, 1],
                always).  Fix it (as :class:`mgll.datasets.MultiGranularCollate` does) when
                label shapes must not change from batch to batch.
            rng: picks one of several descriptions per label at random; default the first.

        Returns:
            A :class:`TextBatch`, indexable by granularity name or position.

        Raises:
            TypeError: ``annotations`` is not a sequence of mappings (a dict of lists, as
                torch's default collate makes, gets a hint to
                :class:`mgll.datasets.MultiGranularCollate`).
            ValueError: a granularity's field is absent from every annotation of the batch
                (a misspelt ``key``; the message lists the fields present), unknown labels,
                or labels that do not fit ``label_format``.
        """
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        formats = self._label_formats(label_format)
        if isinstance(annotations, Mapping):
            raise TypeError(
                "`annotations` must be a sequence of N mappings (one per sample), got "
                f"{type(annotations).__name__} with keys {sorted(map(str, annotations))[:8]}: "
                "this is what torch's default DataLoader collate makes of a batch of "
                "annotation dicts (one list per field). Pass "
                "`collate_fn=mgll.datasets.MultiGranularCollate(builder)` to the DataLoader, "
                "or collate the annotations as a list"
            )
        if isinstance(annotations, str) or not isinstance(annotations, Sequence):
            raise TypeError(
                "`annotations` must be a sequence of N mappings (one per sample), got "
                f"{type(annotations).__name__}"
            )
        if len(annotations) == 0:
            raise ValueError("`annotations` is empty (N=0); pass at least one sample")
        for i, a in enumerate(annotations):
            if not isinstance(a, Mapping):
                raise TypeError(f"`annotations[{i}]` must be a mapping, got {type(a).__name__}")
        for gran in self.granularities:
            _check_field_present(gran, annotations)
        parts = [
            self._one(gran, annotations, mode, formats[gran.name], rng)
            for gran in self.granularities
        ]
        return TextBatch(tuple(parts), mode)

    def _label_formats(self, label_format: str | Mapping[str, str]) -> dict[str, str]:
        names = [g.name for g in self.granularities]
        if isinstance(label_format, Mapping):
            unknown = [n for n in label_format if n not in names]
            if unknown:
                raise ValueError(
                    f"`label_format` names unknown granularities {unknown}; known: {names}"
                )
            formats = {n: label_format.get(n, "auto") for n in names}
        else:
            formats = {n: label_format for n in names}
        for n, f in formats.items():
            if f not in _LABEL_FORMATS:
                raise ValueError(
                    f"`label_format` must be one of {_LABEL_FORMATS} (or a mapping "
                    f"{{granularity name: format}}), got {f!r} for granularity {n!r}"
                )
        return formats

    def _one(self, gran, annotations, mode, label_format, rng) -> GranularityTexts:
        own = [gran.weights_of(a, f"annotations[{i}]") for i, a in enumerate(annotations)]
        sets = [self._expand(gran, weights, i) for i, weights in enumerate(own)]
        if gran.classes is not None:
            classes = gran.classes
        else:
            classes = gran.canonical([x for s in sets for x in s])
        index = {c: j for j, c in enumerate(classes)}
        weights = torch.zeros(len(sets), len(classes), dtype=torch.float32)
        for i, s in enumerate(sets):
            weights[i, [index[x] for x in s]] = torch.tensor(list(s.values()))
        labels = targets = None
        if mode == "paired":
            texts = tuple(gran.render(tuple(labels), rng) for labels in own)
            labels = _paired_labels(gran.name, weights, label_format)
        else:
            texts = tuple(gran.render((c,), rng) for c in classes)
            targets = weights
        unique, inverse = unique_inverse(texts)
        return GranularityTexts(
            name=gran.name,
            mode=mode,
            texts=texts,
            unique_texts=unique,
            inverse=inverse,
            classes=tuple(classes),
            label_sets=tuple(tuple(x) for x in sets),
            labels=labels,
            targets=targets,
        )

    def _expand(self, gran: Granularity, weights: dict, i: int) -> dict:
        """Add the ancestors of a sample's labels; an ancestor's weight is the largest weight
        of its descendants (an uncertain Edema makes Lung Opacity at least as likely)."""
        strict, hierarchy = self._hierarchies.get(gran.name, (False, None))
        if hierarchy is None or not weights:
            return weights
        try:
            expanded = hierarchy.expand(tuple(weights), strict=strict)
        except ValueError as err:
            raise ValueError(f"`annotations[{i}]` at granularity {gran.name!r}: {err}") from None
        if gran.classes is not None:
            missing = [x for x in expanded if x not in gran.classes]
            if missing:
                raise ValueError(
                    f"`annotations[{i}]`: the ancestors {', '.join(map(repr, missing))} of its "
                    f"labels are not in `classes` of granularity {gran.name!r}; declare them"
                )
        out = dict(weights)
        for x, w in weights.items():
            for a in hierarchy.ancestors(x) if x in hierarchy else ():
                out[a] = max(out.get(a, 0.0), w)
        return {x: out[x] for x in gran.canonical(expanded)}

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


def _paired_labels(name: str, weights: Tensor, label_format: str) -> Tensor:
    """(N,) ids, (N, C_g) bool multi-hot or (N, C_g) float32 soft labels from the weights."""
    fractional = (weights > 0) & (weights < 1)
    if label_format == "soft" or (label_format == "auto" and bool(fractional.any())):
        return weights
    if bool(fractional.any()):
        i, c = (int(v) for v in fractional.nonzero()[0])
        raise ValueError(
            f"`label_format={label_format!r}` needs 0/1 labels at granularity {name!r}, but "
            f"sample {i} has weight {float(weights[i, c])} at class {c}; use 'soft' for "
            "labels with probabilities in [0, 1] (uncertain labels)"
        )
    multi_hot = weights > 0
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


def _check_field_present(gran: Granularity, annotations: Sequence[Mapping]) -> None:
    """A field absent from every annotation is a misspelt ``key``, not a batch of negatives."""
    if any(gran.source in a for a in annotations):
        return
    present = sorted({str(k) for a in annotations for k in a})
    raise ValueError(
        f"granularity {gran.name!r} reads the field {gran.source!r}, which no annotation of "
        f"this batch has (N={len(annotations)}); fields present: {present}. Fix the "
        "granularity's `key=` (or name), or write the field with None or [] for samples "
        "without a label there"
    )


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
