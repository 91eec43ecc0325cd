r"""Patient-level splits (no patient in two splits) and the providers' official split lists.

A patient's images must stay in one split: the same chest in train and test inflates every
metric.  The patient id comes from ``"patient_id"`` when a reader or the merge gives it, else
from ChestX-ray14's ``Patient ID``, MIMIC-CXR's ``subject_id`` or the ``patientNNNNN``
directory of a CheXpert path; merged annotations carry source-qualified ids
(``"chexpert:1"``), so two providers' patient 1 are different patients.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence

from mgll.datasets._csv import Table

__all__ = ["Splits", "patient_of", "read_split_list", "split_by_list", "split_by_patient"]

_PATIENT_DIR = re.compile(r"(?:^|[/\\])patient(\d+)(?:[/\\]|$)")


def patient_of(annotation: Mapping[str, object]) -> str | None:
    r"""The patient id of an annotation, or ``None`` when it has none.

    Looked up in ``"patient_id"``, ``"Patient ID"`` (ChestX-ray14), ``"subject_id"``
    (MIMIC-CXR), then the ``patientNNNNN`` directory of ``"image"`` or ``"Path"`` (CheXpert).
    Digit strings lose their leading zeros (``"00001"`` and ``"1"`` are one patient).

    Example:
        >>> patient_of({"image": "CheXpert-v1.0/train/patient00042/study1/view1_frontal.jpg"})
        '42'
        >>> patient_of({"Patient ID": "7"}), patient_of({"image": "x.png"})
        ('7', None)
    """
    for key in ("patient_id", "Patient ID", "subject_id"):
        value = annotation.get(key)
        if value is not None and str(value).strip():
            return _normal(str(value).strip())
    for key in ("image", "Path"):
        value = annotation.get(key)
        if isinstance(value, str):
            found = _PATIENT_DIR.search(value)
            if found:
                return _normal(found.group(1))
    return None


def _normal(value: str) -> str:
    return str(int(value)) if value.isascii() and value.isdigit() else value


class Splits(dict):
    r"""``{split name: [annotations]}``, with what each split holds.

    Attributes:
        classes: the classes counted (``()`` when no granularity was counted).
        counts: ``{split: {class: images with that class positive}}``.
        patients: ``{split: number of patients}``.

    Example:
        >>> rows = [{"image": f"{i}.png", "patient_id": str(i // 2), "finding": []} for i in range(8)]
        >>> splits = split_by_patient(rows, {"train": 0.5, "test": 0.5}, seed=0)
        >>> {name: len(part) for name, part in splits.items()}, splits.patients
        ({'train': 4, 'test': 4}, {'train': 2, 'test': 2})
    """

    def __init__(self, parts: dict[str, list], granularity: str | None, patients: dict) -> None:
        super().__init__(parts)
        self.granularity = granularity
        self.patients = patients
        seen: dict[str, dict[str, int]] = {name: {} for name in parts}
        for name, items in parts.items():
            for a in items:
                for x in _positives(a, granularity):
                    seen[name][x] = seen[name].get(x, 0) + 1
        self.classes = tuple(sorted({x for c in seen.values() for x in c}))
        self.counts = {name: {x: seen[name].get(x, 0) for x in self.classes} for name in parts}

    def __str__(self) -> str:
        names = list(self)
        rows = [["", *names], ["images", *[str(len(self[n])) for n in names]]]
        rows.append(["patients", *[str(self.patients[n]) for n in names]])
        rows += [[x, *[str(self.counts[n][x]) for n in names]] for x in self.classes]
        return table(rows)


def table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def _positives(annotation: Mapping[str, object], granularity: str | None) -> list:
    if granularity is None:
        return []
    value = annotation.get(granularity)
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [x for x, w in value.items() if w > 0]
    return [value] if isinstance(value, (str, int)) else list(value)


def _patient_key(i: int, a: object) -> str:
    if not isinstance(a, Mapping):
        raise TypeError(f"`annotations[{i}]` must be an annotation dict, got {type(a).__name__}")
    pid = patient_of(a)
    if pid is None:
        raise ValueError(
            f"`annotations[{i}]` (image {a.get('image')!r}) has no patient id: no "
            "'patient_id', 'Patient ID' or 'subject_id' field and no 'patientNNNNN' in its path; "
            "add a 'patient_id' field"
        )
    source = a.get("source")
    return pid if source is None or pid.startswith(f"{source}:") else f"{source}:{pid}"


def split_by_patient(
    annotations: Iterable[Mapping[str, object]],
    fractions: Mapping[str, float] | None = None,
    *,
    seed: int = 0,
    stratify: str | None = "finding",
) -> Splits:
    r"""Split by patient, deterministically for a seed, stratified over the labels.

    Every image of a patient goes to one split.  Patients are assigned one at a time, those
    with the rarest positive class first, each to the split that still needs most of that class
    (then most images), as in the iterative stratification of Sechidis et al. (*On the
    stratification of multi-label data*, ECML PKDD 2011) with the patient as the unit; patients
    without a positive go where most images are still needed.  Exact proportions are not always
    possible (a patient is indivisible): the achieved counts are in the result.

    Args:
        annotations: annotation dicts (a reader's output, or merged ones).
        fractions: ``{split name: fraction}``, positive, summing to 1; default
            ``{"train": 0.8, "val": 0.1, "test": 0.1}``.
        seed: the same seed and input give the same splits.
        stratify: the granularity whose positives are balanced (and counted), or ``None``.

    Returns:
        :class:`Splits`: ``{split: [annotations]}`` (input order kept), with ``counts`` per
        class and ``patients`` per split.

    Raises:
        ValueError: bad fractions, an annotation without a patient id.

    Example:
        >>> items = [{"patient_id": str(p), "finding": ["Edema"] if p % 2 else []}
        ...          for p in range(10) for _ in range(2)]
        >>> parts = split_by_patient(items, {"train": 0.6, "test": 0.4}, seed=1)
        >>> {name: len(part) for name, part in parts.items()}, parts.counts
        ({'train': 12, 'test': 8}, {'train': {'Edema': 6}, 'test': {'Edema': 4}})
        >>> print(parts)
                  train  test
        images       12     8
        patients      6     4
        Edema         6     4
    """
    fractions = _fractions(fractions)
    annotations = list(annotations)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(annotations):
        groups.setdefault(_patient_key(i, a), []).append(i)
    patients = list(groups)
    random.Random(seed).shuffle(patients)
    counts = {p: _class_counts(annotations, groups[p], stratify) for p in patients}
    total: dict[str, int] = {}
    for c in counts.values():
        for x, n in c.items():
            total[x] = total.get(x, 0) + n
    names = list(fractions)
    need = {s: {x: fractions[s] * n for x, n in total.items()} for s in names}
    room = {s: fractions[s] * len(annotations) for s in names}

    def rarest(p: str) -> tuple:
        return min(((total[x], x) for x in counts[p]), default=(float("inf"), ""))

    chosen: dict[str, str] = {}
    for p in sorted(patients, key=rarest):  # a stable sort: ties keep the seeded order
        x = rarest(p)[1]
        if x:
            s = max(names, key=lambda s: (need[s][x], room[s]))
        else:
            s = max(names, key=lambda s: room[s])
        chosen[p] = s
        room[s] -= len(groups[p])
        for y, n in counts[p].items():
            need[s][y] -= n
    parts: dict[str, list] = {s: [] for s in names}
    where = {i: chosen[p] for p, idx in groups.items() for i in idx}
    for i, a in enumerate(annotations):
        parts[where[i]].append(a)
    held = {s: sum(1 for p in patients if chosen[p] == s) for s in names}
    return Splits(parts, stratify, held)


def _class_counts(annotations: list, idx: list[int], granularity: str | None) -> dict:
    out: dict[str, int] = {}
    for i in idx:
        for x in _positives(annotations[i], granularity):
            out[x] = out.get(x, 0) + 1
    return out


def _fractions(fractions: Mapping[str, float] | None) -> dict[str, float]:
    if fractions is None:
        return {"train": 0.8, "val": 0.1, "test": 0.1}
    if not isinstance(fractions, Mapping) or not fractions:
        raise TypeError(
            f"`fractions` must be a mapping {{split name: fraction}}, got {fractions!r}"
        )
    bad = {
        k: v
        for k, v in fractions.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
    }
    if bad or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(
            f"`fractions` must be positive numbers summing to 1, got {dict(fractions)} "
            f"(sum {sum(v for v in fractions.values() if isinstance(v, (int, float)))})"
        )
    return dict(fractions)


def read_split_list(path: str | os.PathLike[str], column: str = "Path") -> list[str]:
    r"""The images of an official split file: a list (one name a line) or a CSV's ``column``.

    ChestX-ray14 ships ``train_val_list.txt`` and ``test_list.txt`` (one ``Image Index`` a
    line); CheXpert's validation set is ``valid.csv`` (its ``Path`` column).

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "test_list.txt"
        >>> _ = f.write_text("00000003_000.png\n00000003_001.png\n")
        >>> read_split_list(f)
        ['00000003_000.png', '00000003_001.png']
    """
    if str(path).lower().endswith((".csv", ".tsv")):
        table = Table(path, [column], "split list")
        return [row[column] for _, row in table.rows()]
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def split_by_list(
    annotations: Iterable[Mapping[str, object]],
    lists: Mapping[str, Sequence[str]],
    *,
    rest: str | None = None,
) -> Splits:
    r"""Assign images to the splits whose list names them (the providers' official splits).

    An image is matched when its path ends with a listed entry, on a ``/`` boundary
    (``images/00000001_000.png`` matches ``00000001_000.png``; a CheXpert
    ``.../CheXpert-v1.0/valid/patient64541/...`` path matches the ``valid.csv`` entry).

    Args:
        annotations: annotation dicts with ``"image"``.
        lists: ``{split name: [entries]}`` (e.g. from :func:`read_split_list`).
        rest: the split for images no list names (e.g. ``"train"`` to keep CheXpert's
            ``train.csv`` images or another source's); default: such an image is an error.

    Returns:
        :class:`Splits` (counted over ``"finding"``).

    Raises:
        ValueError: an entry in two lists, an unlisted image without ``rest``, or a patient
            whose images fall in two splits.

    Example:
        >>> items = [{"image": "images/00000001_000.png", "Patient ID": "1"},
        ...          {"image": "images/00000002_000.png", "Patient ID": "2"}]
        >>> parts = split_by_list(items, {"test": ["00000002_000.png"]}, rest="train_val")
        >>> [a["image"] for a in parts["test"]], parts.patients
        (['images/00000002_000.png'], {'test': 1, 'train_val': 1})
    """
    if not isinstance(lists, Mapping) or not lists:
        raise TypeError(f"`lists` must be a mapping {{split name: [entries]}}, got {lists!r}")
    where: dict[str, str] = {}
    for name, entries in lists.items():
        if isinstance(entries, str):
            raise TypeError(f"`lists[{name!r}]` must be a list of entries, got a string")
        for e in entries:
            e = e.replace("\\", "/").strip("/")
            if e in where and where[e] != name:
                raise ValueError(f"{e!r} is listed in both {where[e]!r} and {name!r}")
            where[e] = name
    depth = max((e.count("/") + 1 for e in where), default=1)
    parts: dict[str, list] = {name: [] for name in lists}
    if rest is not None:
        parts.setdefault(rest, [])
    owner: dict[str, str] = {}
    for i, a in enumerate(annotations):
        split = _listed(str(a.get("image", "")), where, depth)
        if split is None:
            if rest is None:
                raise ValueError(
                    f"`annotations[{i}]` (image {a.get('image')!r}) is in none of the lists "
                    f"{list(lists)}; pass `rest=` to name the split of unlisted images"
                )
            split = rest
        pid = _patient_key(i, a) if patient_of(a) is not None else None
        if pid is not None and owner.setdefault(pid, split) != split:
            raise ValueError(
                f"patient {pid} has images in both {owner[pid]!r} and {split!r} (image "
                f"{a.get('image')!r}); the lists are not patient-disjoint"
            )
        parts[split].append(a)
    held = {s: len({p for p, t in owner.items() if t == s}) for s in parts}
    return Splits(parts, "finding", held)


def _listed(image: str, where: dict[str, str], depth: int) -> str | None:
    parts = image.replace("\\", "/").split("/")
    for k in range(1, min(depth, len(parts)) + 1):
        split = where.get("/".join(parts[-k:]))
        if split is not None:
            return split
    return None
