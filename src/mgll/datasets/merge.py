r"""Merging the annotations of several readers into one set over the union vocabulary.

Each merged annotation holds ``"image"``, ``"source"`` (the source's name), ``"patient_id"``
(source-qualified, ``"chexpert:1"``; ``None`` when the reader gives none), one field per
labelled granularity of the :class:`~mgll.datasets.LabelMap` (the positives in union names: a
list, or ``{class: weight}`` when a weight is below 1; ``None`` where the source does not
annotate that granularity), one field per text granularity, ``"unknown"``
(``{granularity: [classes]}``: the union classes the source does not annotate, and what the
reader marked unknown) and ``"uncertain"`` (``{granularity: [classes]}``: the uncertain
labels, kept apart from the unannotated ones until a policy is applied), and the reader's other
fields.  :meth:`MergedAnnotations.labels` gives the float labels: weight, 0, or NaN (unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from mgll.datasets.compact import CompactAnnotations
from mgll.datasets.generic import check_policy
from mgll.datasets.harmonise import CHEST_X_RAY_LABEL_MAP, LabelMap, SourceLabels
from mgll.datasets.splits import patient_of, table

__all__ = ["MergeSummary", "MergedAnnotations", "merge_sources"]

_OWN = ("image", "source", "patient_id", "unknown", "uncertain")


class MergeSummary(dict):
    """``{source: {"images", "patients", "granularities": {g: classes annotated}, "texts",
    "uncertain"}}``; ``print`` shows it as a table.

    Example:
        >>> merged = merge_sources({"chestxray14": [{"image": "a.png", "finding": ["Effusion"],
        ...                                          "uncertain": [], "Patient ID": "7"}]})
        >>> merged.summary()["chestxray14"]["images"]
        1
    """

    def __init__(self, rows: Mapping[str, dict], union: Mapping[str, int]) -> None:
        super().__init__(rows)
        self.union = dict(union)

    def __str__(self) -> str:
        grans = list(self.union)
        head = ["source", "images", "patients", *[f"{g} ({n})" for g, n in self.union.items()]]
        lines = [head]
        for name, row in self.items():
            cells = [str(row["granularities"].get(g, "-")) for g in grans]
            lines.append([name, str(row["images"]), str(row["patients"]), *cells])
        return table(lines)


class MergedAnnotations(Sequence):
    """The merged annotations (a sequence of dicts), their union classes and a summary.

    Attributes:
        annotations: the merged annotation dicts, source after source, in reader order (a
            list, or a :class:`~mgll.datasets.CompactAnnotations` after :meth:`compact`).
        label_map: the :class:`~mgll.datasets.LabelMap` used.
        classes: ``{granularity: union classes}`` for every labelled granularity.
        texts: the text granularities.

    Example:
        >>> merged = merge_sources({"chestxray14": [{"image": "a.png", "finding": ["Effusion"],
        ...                                          "uncertain": [], "Patient ID": "7"}]})
        >>> len(merged), merged.classes["finding"][0], merged[0]["finding"]
        (1, 'Enlarged Cardiomediastinum', ['Pleural Effusion'])
    """

    def __init__(self, annotations: Sequence[dict], label_map: LabelMap) -> None:
        self.annotations = annotations
        self.label_map = label_map
        self.classes = {g: label_map.classes(g) for g in label_map.granularities}
        self.texts = label_map.text_granularities

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, i):
        return self.annotations[i]

    def __repr__(self) -> str:
        grans = ", ".join(f"{g}: C_g={len(c)}" for g, c in self.classes.items())
        return f"MergedAnnotations(N={len(self)}, {grans}, texts={list(self.texts)})"

    def compact(self) -> MergedAnnotations:
        """The same merged annotations held as columns (a
        :class:`~mgll.datasets.CompactAnnotations`): the map-style form for ``DataLoader``
        workers, tens of bytes an image instead of a dict's 1–2 KB.  Its items are fresh
        dicts, so changing one leaves the store as it was."""
        return MergedAnnotations(CompactAnnotations(self.annotations), self.label_map)

    def labels(self, granularity: str) -> torch.Tensor:
        r"""The (N, C_g) float32 labels: the weight (1 positive), 0 (negative), NaN (unknown).

        A row is NaN everywhere for an image whose source does not annotate ``granularity``.
        """
        if granularity not in self.classes:
            raise ValueError(
                f"`granularity` must be one of {list(self.classes)}, got {granularity!r}"
            )
        index = {c: j for j, c in enumerate(self.classes[granularity])}
        nan, width = float("nan"), len(index)
        rows = []  # Python lists, then one tensor: per-element tensor writes are ~50x slower
        for a in self.annotations:
            value = a.get(granularity)
            if value is None:
                rows.append([nan] * width)
                continue
            row = [0.0] * width
            weights = value if isinstance(value, Mapping) else dict.fromkeys(value, 1.0)
            for x, w in weights.items():
                row[index[x]] = w
            for x in a["unknown"].get(granularity, ()):
                row[index[x]] = nan
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), width)

    def summary(self) -> MergeSummary:
        """What each source contributed: images, patients, classes annotated per granularity."""
        rows: dict[str, dict] = {}
        patients: dict[str, set] = {}
        for a in self.annotations:
            name = a["source"]
            if name not in rows:
                labels = self.label_map[name]
                rows[name] = {
                    "images": 0,
                    "granularities": {g: len(labels.union(g)) for g in labels.classes},
                    "texts": list(labels.texts),
                    "uncertain": 0,
                }
                patients[name] = set()
            rows[name]["images"] += 1
            rows[name]["uncertain"] += sum(len(v) for v in a["uncertain"].values())
            if a["patient_id"] is not None:
                patients[name].add(a["patient_id"])
        for name, row in rows.items():
            row["patients"] = len(patients[name])
        return MergeSummary(rows, {g: len(c) for g, c in self.classes.items()})


def merge_sources(
    sources: Mapping[str, Iterable[Mapping[str, object]]],
    label_map: LabelMap = CHEST_X_RAY_LABEL_MAP,
    *,
    uncertainty: str | None = None,
    soft_weight: float = 0.5,
) -> MergedAnnotations:
    r"""Merge the annotations of several readers into one set over the union classes.

    Args:
        sources: ``{source name: annotations}``, e.g. ``{"chexpert": read_chexpert(...)}``;
            every name must be a source of ``label_map``.
        label_map: the sources' classes and their union names; default
            :data:`CHEST_X_RAY_LABEL_MAP` (ChestX-ray14, CheXpert, MIMIC-CXR).
        uncertainty: ``None`` keeps the uncertain labels as the readers resolved them; a
            policy of :data:`~mgll.datasets.UNCERTAINTY_POLICIES` re-applies it to the
            ``"uncertain"`` lists: U-Ignore makes them unknown (NaN), U-Zeros negatives,
            U-Ones positives, U-Soft positives of weight ``soft_weight``.
        soft_weight: the weight of an uncertain label under U-Soft.

    Returns:
        A :class:`MergedAnnotations`.

    Raises:
        TypeError: ``sources`` is not a mapping of iterables, or an annotation is not a mapping.
        ValueError: a source missing from ``label_map``, a label that its source does not
            annotate (naming the source, the annotation and the label), an unknown policy.

    Example:
        >>> merged = merge_sources({
        ...     "chestxray14": [{"image": "a.png", "finding": ["Effusion"], "uncertain": [],
        ...                      "Patient ID": "7"}],
        ...     "chexpert": [{"image": "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg",
        ...                   "finding": ["Cardiomegaly"], "category": ["Enlarged Cardiomediastinum"],
        ...                   "uncertain": ["Edema"]}],
        ... }, uncertainty="U-Ignore")
        >>> a, b = merged
        >>> a["source"], a["patient_id"], a["finding"], a["category"]
        ('chestxray14', 'chestxray14:7', ['Pleural Effusion'], None)
        >>> b["patient_id"], b["unknown"]["finding"]
        ('chexpert:1', ('Infiltration', 'Mass', 'Nodule', 'Emphysema', 'Fibrosis', 'Pleural Thickening', 'Hernia', 'Edema'))
        >>> merged.labels("finding").shape  # (N, C_g): the 20 union findings
        torch.Size([2, 20])
        >>> print(merged.summary())
        source       images  patients  category (7)  finding (20)
        chestxray14       1         1             -            14
        chexpert          1         1             7            13
    """
    if not isinstance(sources, Mapping) or not sources:
        raise TypeError(
            f"`sources` must be a non-empty mapping {{source name: annotations}}, got "
            f"{type(sources).__name__}"
        )
    if not isinstance(label_map, LabelMap):
        raise TypeError(f"`label_map` must be a LabelMap, got {type(label_map).__name__}")
    unknown = [name for name in sources if name not in label_map.sources]
    if unknown:
        raise ValueError(
            f"`sources` names {unknown}, which `label_map` does not know (its sources: "
            f"{list(label_map.sources)}); add them with label_map.with_source(name, SourceLabels(...))"
        )
    policy = None if uncertainty is None else check_policy(uncertainty, soft_weight)
    out: list[dict] = []
    for name, items in sources.items():
        if isinstance(items, (str, Mapping)) or not isinstance(items, Iterable):
            raise TypeError(
                f"`sources[{name!r}]` must be an iterable of annotation dicts (a reader's "
                f"output), got {type(items).__name__}"
            )
        merger = _SourceMerger(name, label_map, policy, soft_weight)
        out.extend(merger(i, a) for i, a in enumerate(items))
    return MergedAnnotations(out, label_map)


class _SourceMerger:
    """Turns one source's annotations into merged ones (the per-source work done once)."""

    def __init__(self, name: str, label_map: LabelMap, policy: str | None, soft: float) -> None:
        self.name, self.labels, self.policy, self.soft = name, label_map[name], policy, soft
        labels: SourceLabels = self.labels
        self.grans = label_map.granularities
        self.texts = label_map.text_granularities
        self.rename = {
            g: dict(zip(labels.classes[g], labels.union(g), strict=True)) for g in labels.classes
        }
        self.absent = {  # union classes this source never annotates: one shared tuple each
            g: tuple(x for x in label_map.classes(g) if x not in labels.union(g))
            for g in labels.classes
        }
        self.uncertain_g = labels.uncertain_granularity
        self.own = {*self.grans, *self.texts, *_OWN}

    def __call__(self, i: int, a: Mapping[str, object]) -> dict:
        if not isinstance(a, Mapping):
            raise TypeError(
                f"`sources[{self.name!r}]` item {i} must be an annotation dict, got "
                f"{type(a).__name__}"
            )
        out: dict[str, object] = {"image": a.get("image"), "source": self.name}
        pid = patient_of(a)
        out["patient_id"] = None if pid is None else f"{self.name}:{pid}"
        read_unknown = a.get("unknown") if isinstance(a.get("unknown"), Mapping) else {}
        unknown, uncertain = {}, {}
        for g in self.grans:
            if g not in self.rename or a.get(g) is None:
                out[g] = None
                continue
            weights = self._weights(i, g, a[g])
            extra = self._names(i, g, read_unknown.get(g) or ())
            doubt = self._names(i, g, a.get("uncertain") or ()) if g == self.uncertain_g else []
            if self.policy is not None and doubt:
                weights, extra = self._apply(weights, extra, doubt)
            out[g] = _field(weights)
            unknown[g] = self.absent[g] + tuple(x for x in extra if x not in weights)
            if doubt:
                uncertain[g] = doubt
        for g in self.texts:
            out[g] = a.get(g) if g in self.labels.texts else None
        out["unknown"], out["uncertain"] = unknown, uncertain
        out.update((k, v) for k, v in a.items() if k not in self.own)
        return out

    def _names(self, i: int, g: str, labels: Iterable[object]) -> list[str]:
        rename = self.rename[g]
        bad = [x for x in labels if x not in rename]
        if bad:
            raise ValueError(
                f"`sources[{self.name!r}]` item {i}, granularity {g!r}: labels {bad} are not "
                f"classes that {self.name!r} annotates there ({list(rename)}); fix the label "
                f"map's `classes` for this source"
            )
        return [rename[x] for x in labels]

    def _weights(self, i: int, g: str, value: object) -> dict[str, float]:
        if isinstance(value, Mapping):
            names = self._names(i, g, value)
            return {n: float(w) for n, w in zip(names, value.values(), strict=True) if w > 0}
        if isinstance(value, str) or not isinstance(value, Iterable):
            value = [value]
        return dict.fromkeys(self._names(i, g, value), 1.0)

    def _apply(self, weights: dict, extra: list, doubt: list[str]) -> tuple[dict, list]:
        """Re-apply the policy to the uncertain labels."""
        weights = {x: w for x, w in weights.items() if x not in doubt}
        extra = [x for x in extra if x not in doubt]
        if self.policy == "U-Ignore":
            extra += doubt
        elif self.policy in ("U-Ones", "U-Soft"):
            w = 1.0 if self.policy == "U-Ones" else self.soft
            weights.update(dict.fromkeys(doubt, w))
        return weights, extra


def _field(weights: dict[str, float]) -> list[str] | dict[str, float]:
    """A label list, or ``{class: weight}`` when a weight is below 1."""
    if all(w == 1.0 for w in weights.values()):
        return list(weights)
    return dict(weights)
