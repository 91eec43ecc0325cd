"""The builder: a batch of structured annotations in, per granularity the texts and loss inputs out."""

from __future__ import annotations

import math
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
        self._order = _coarse_first(self.granularities)

    def __repr__(self) -> str:
        names = ", ".join(repr(g.name) for g in self.granularities)
        return f"MultiGranularTextBuilder([{names}])"

    def build(
        self,
        annotations: Sequence[Mapping[str, object]],
        mode: str = "paired",
        *,
        label_format: str | Mapping[str, str] = "multi_hot",
        rng: random.Random | None = None,
    ) -> TextBatch:
        """Texts, unique texts, inverse indices and loss inputs for a batch of N annotations.

        Args:
            annotations: N mappings from field names to labels (see :class:`Granularity`).
            mode: ``"paired"`` (one text per sample, ``labels``) or ``"bank"`` (one text per
                class, ``targets``).
            label_format: paired mode only, one value or ``{granularity name: value}``
                (unnamed granularities ``"multi_hot"``): ``"multi_hot"`` (the default:
                (N, C_g) float32 0/1, NaN where a label is unknown), ``"soft"`` (float32 in
                [0, 1] and NaN, for weighted labels), ``"ids"`` ((N,) long, -1 for a sample
                not annotated here; an error if a sample has zero or several labels or
                unknown classes) or ``"auto"`` (opt-in: ids when every annotated sample has
                exactly one label, else bool multi-hot, float32 when a weight is in (0, 1) or
                a label is unknown; the shape and dtype then depend on the batch, so ranks
                may disagree under DDP and ``torch.compile`` recompiles).
            rng: picks one of several descriptions per label at random; default the first.

        Returns:
            A :class:`TextBatch`, indexable by granularity name or position.

        Raises:
            TypeError: ``annotations`` is not a sequence of mappings (a dict of lists, as
                torch's default collate makes, gets a hint to
                :class:`mgll.datasets.MultiGranularCollate`).
            ValueError: a ``required`` granularity's field is absent from an annotation
                (from the whole batch: a misspelt ``key``, the message lists the fields
                present), unknown labels, or labels that do not fit ``label_format``.
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
        done: dict[str, tuple] = {}
        for gran in self._order:
            coarse = done.get(gran.coarse) if gran.coarse is not None else None
            done[gran.name] = self._values(gran, annotations, coarse)
        parts = [
            _part(gran, mode, formats[gran.name], rng, *done[gran.name])
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
            formats = {n: label_format.get(n, "multi_hot") for n in names}
        else:
            formats = {n: label_format for n in names}
        for n, f in formats.items():
            if f not in _LABEL_FORMATS:
                raise ValueError(
                    f"`label_format` must be one of {_LABEL_FORMATS} (or a mapping "
                    f"{{granularity name: format}}), got {f!r} for granularity {n!r}"
                )
        return formats

    def _values(self, gran: Granularity, annotations: Sequence[Mapping], coarse) -> tuple:
        """``(own, classes, values, conflicts)``: each sample's own labels (None: not
        annotated), and the (N, C_g) float32 values (weight, 0 or NaN) after the coarse
        granularity and the hierarchy have filled in what they imply."""
        own = [gran.values_of(a, f"annotations[{i}]") for i, a in enumerate(annotations)]
        strict, hierarchy = self._hierarchies.get(gran.name, (False, None))
        mentioned = [self._mentioned(gran, v, i, strict, hierarchy) for i, v in enumerate(own)]
        if gran.classes is not None:
            classes = gran.classes
        else:
            classes = gran.canonical([x for s in mentioned for x in s])
        index = {c: j for j, c in enumerate(classes)}
        values = torch.zeros(len(own), len(classes), dtype=torch.float32)
        for i, v in enumerate(own):
            if v is None:
                values[i] = math.nan
            elif v:
                values[i, [index[x] for x in v]] = torch.tensor(list(v.values()))
        firm = torch.zeros_like(values, dtype=torch.bool)  # explicit negatives
        for i, v in enumerate(own):
            if v:
                firm[i, [index[x] for x, w in v.items() if w == 0]] = True
        if coarse is not None:
            _fill_from_coarse(values, firm, index, coarse[1], coarse[2])
        conflicts = 0
        if hierarchy is not None:
            values, conflicts = close_under(hierarchy.matrix(classes), values, firm)
        return own, tuple(classes), values, conflicts

    def _mentioned(self, gran, values, i, strict, hierarchy) -> tuple:
        """The labels a sample names (any value), with the ancestors of its positives."""
        if not values:
            return ()
        if hierarchy is None:
            return tuple(values)
        try:
            expanded = hierarchy.expand(tuple(values), strict=strict)
        except ValueError as err:
            raise ValueError(f"`annotations[{i}]` at granularity {gran.name!r}: {err}") from None
        if gran.classes is not None:
            implied = hierarchy.expand([x for x, w in values.items() if w > 0], strict=False)
            missing = [x for x in implied if x not in gran.classes]
            if missing:
                raise ValueError(
                    f"`annotations[{i}]`: the ancestors {', '.join(map(repr, missing))} of its "
                    f"labels are not in `classes` of granularity {gran.name!r}; declare them"
                )
            return tuple(x for x in expanded if x in gran.classes)
        return expanded

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


def _part(gran, mode, label_format, rng, own, classes, values, conflicts) -> GranularityTexts:
    labels = targets = None
    if mode == "paired":
        texts = tuple(
            gran.unannotated_text
            if v is None
            else gran.render(tuple(x for x, w in v.items() if w > 0), rng)
            for v in own
        )
        labels = _paired_labels(gran.name, values, label_format)
    else:
        texts = tuple(gran.render((c,), rng) for c in classes)
        targets = values
    unique, inverse = unique_inverse(texts)
    label_sets = tuple(tuple(classes[j] for j in row.nonzero()[:, 0]) for row in values > 0)
    return GranularityTexts(
        name=gran.name,
        mode=mode,
        texts=texts,
        unique_texts=unique,
        inverse=inverse,
        classes=classes,
        label_sets=label_sets,
        labels=labels,
        targets=targets,
        conflicts=conflicts,
    )


def close_under(ancestors: Tensor, values: Tensor, firm: Tensor) -> tuple[Tensor, int]:
    """Apply a hierarchy to (N, C_g) values (weight, 0 or NaN): returns them and the conflicts.

    ``ancestors[c, p]`` says that class p is an ancestor of class c (transitively);
    ``firm`` marks explicit negatives.  A positive child makes its ancestors positive (with the
    largest weight of their descendants), an unknown child makes an unmarked 0 ancestor
    unknown, and an explicit negative makes its unknown descendants negative.  An explicit
    negative turned positive by a child is a conflict: the hierarchy wins and it is counted.
    """
    out, firm = values.clone(), firm.clone()
    weight, unknown = torch.nan_to_num(values, nan=0.0), torch.isnan(values)
    conflicts = 0
    for p in range(values.shape[1]):
        below = ancestors[:, p]
        if not bool(below.any()):
            continue
        top = weight[:, below].amax(1)
        up = top > 0
        conflicts += int((up & firm[:, p]).sum())
        out[:, p] = torch.where(up, torch.maximum(weight[:, p], top), out[:, p])
        firm[:, p] &= ~up
        maybe = ~up & unknown[:, below].any(1) & (values[:, p] == 0) & ~firm[:, p]
        out[maybe, p] = math.nan
    negative = (out == 0) & firm
    for c in range(values.shape[1]):
        above = ancestors[c]
        if bool(above.any()):
            out[negative[:, above].any(1) & torch.isnan(out[:, c]), c] = 0.0
    return out, conflicts


def _fill_from_coarse(values, firm, index, coarse_classes, coarse_values) -> None:
    """Where a class of the coarse granularity is unknown here, take its coarse value (a
    coarse 0 is a known negative: the coarse granularity annotates all its classes)."""
    for j, c in enumerate(coarse_classes):
        if c in index:
            k = index[c]
            take = torch.isnan(values[:, k]) & ~torch.isnan(coarse_values[:, j])
            values[take, k] = coarse_values[take, j]
            firm[take, k] |= coarse_values[take, j] == 0


def _paired_labels(name: str, values: Tensor, label_format: str) -> Tensor:
    """(N,) ids (-1: not annotated), (N, C_g) float32 multi-hot or soft labels (NaN: unknown),
    or for ``"auto"`` whichever fits the batch."""
    unknown = torch.isnan(values)
    fractional = (values > 0) & (values < 1)
    if label_format == "soft" or (label_format == "auto" and bool(fractional.any())):
        return values
    if bool(fractional.any()):
        i, c = (int(v) for v in fractional.nonzero()[0])
        raise ValueError(
            f"`label_format={label_format!r}` needs 0/1 labels at granularity {name!r}, but "
            f"sample {i} has weight {float(values[i, c])} at class {c}; use 'soft' for "
            "labels with probabilities in [0, 1] (uncertain labels)"
        )
    if label_format == "multi_hot":
        return values
    unannotated = unknown.all(1) if values.shape[1] else torch.ones(len(values), dtype=torch.bool)
    counts = (values > 0).sum(1)
    fits = unannotated | ((counts == 1) & ~unknown.any(1))
    if label_format == "ids" and not bool(fits.all()):
        bad = int((~fits).nonzero()[0, 0])
        what = "unknown classes" if bool(unknown[bad].any()) else f"{int(counts[bad])} labels"
        raise ValueError(
            f"`label_format='ids'` needs exactly one label per annotated sample at granularity "
            f"{name!r}, but sample {bad} has {what}; use 'multi_hot'"
        )
    if label_format == "auto" and not bool(fits.all()):
        return values if bool(unknown.any()) else values > 0
    ids = torch.full((len(values),), -1, dtype=torch.long)
    if values.shape[1]:
        ids[~unannotated] = (values[~unannotated] > 0).to(torch.long).argmax(1)
    return ids


def _check_field_present(gran: Granularity, annotations: Sequence[Mapping]) -> None:
    """A required field must be in every annotation; absent from all of them, it is most
    likely a misspelt ``key``."""
    if not gran.required:
        return
    missing = [i for i, a in enumerate(annotations) if a.get(gran.source) is None]
    if not missing:
        return
    if len(missing) < len(annotations):
        raise ValueError(
            f"granularity {gran.name!r} is required, but `annotations[{missing[0]}]` has no "
            f"field {gran.source!r} ({len(missing)} of N={len(annotations)} samples lack it); "
            "write [] for a sample annotated with no label, or declare the granularity "
            "`required=False` to treat a missing field as not annotated"
        )
    present = sorted({str(k) for a in annotations for k in a})
    raise ValueError(
        f"granularity {gran.name!r} reads the field {gran.source!r}, which no annotation of "
        f"this batch has (N={len(annotations)}); fields present: {present}. Fix the "
        "granularity's `key=` (or name), or write the field with [] for samples without a "
        "label there"
    )


def _coarse_first(granularities: tuple[Granularity, ...]) -> list[Granularity]:
    """The granularities in an order where each comes after its ``coarse`` one."""
    by_name = {g.name: g for g in granularities}
    order: list[Granularity] = []
    for g in granularities:
        chain = [g]
        while chain[-1].coarse is not None and chain[-1] not in order:
            name = chain[-1].coarse
            if name not in by_name:
                raise ValueError(
                    f"granularity {chain[-1].name!r} has `coarse={name!r}`, which is not a "
                    f"granularity of this builder; known: {list(by_name)}"
                )
            if by_name[name] in chain:
                loop = " -> ".join(repr(x.name) for x in [*chain, by_name[name]])
                raise ValueError(f"`coarse` granularities form a cycle: {loop}")
            chain.append(by_name[name])
        order.extend(x for x in reversed(chain) if x not in order)
    return order


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
