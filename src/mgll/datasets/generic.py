r"""A generic reader for "one row per image" label tables, and the uncertainty policies.

The provider-specific readers (:func:`~mgll.datasets.read_chestxray14`,
:func:`~mgll.datasets.read_chexpert`, :func:`~mgll.datasets.read_mimic_cxr`) are built on
:func:`read_label_table`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from mgll.datasets._csv import Annotations, ImagePaths, Source, Table
from mgll.text.granularity import UNKNOWN_KEY

__all__ = ["UNCERTAINTY_POLICIES", "VIEWS", "apply_uncertainty", "read_label_table"]

#: The uncertainty policies of Irvin et al. (2019, CheXpert, section "Uncertainty approaches")
#: plus U-Soft; see :func:`apply_uncertainty`.
UNCERTAINTY_POLICIES = ("U-Ignore", "U-Zeros", "U-Ones", "U-Soft")

#: The view vocabulary of every reader's ``views=`` (and of ``annotation["view"]``):
#: posterior-anterior, anterior-posterior, lateral, and any other projection;
#: ``"frontal"`` in ``views=`` stands for PA and AP.
VIEWS = ("PA", "AP", "LATERAL", "OTHER")


def check_views(views: object) -> frozenset | None:
    """The canonical views of a reader's ``views=`` argument (``None``: every view)."""
    if views is None:
        return None
    if isinstance(views, str) or not isinstance(views, (Sequence, set, frozenset)):
        raise TypeError(f"`views` must be a list of views from {VIEWS}, got {views!r}")
    out = set()
    for v in views:
        key = v.upper() if isinstance(v, str) else v
        if key == "FRONTAL":
            out.update(("PA", "AP"))
        elif key in VIEWS:
            out.add(key)
        else:
            raise ValueError(
                f"`views` holds the unknown view {v!r}; expected views from {VIEWS} or "
                "'frontal' (PA and AP), the same names for every reader"
            )
    return frozenset(out)


_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": None}


def apply_uncertainty(
    values: Mapping[str, int | None],
    policy: str = "U-Ignore",
    soft_weight: float = 0.5,
    null_labels: Sequence[str] = (),
) -> tuple[list[str] | dict[str, float], list[str]]:
    r"""A sample's label field and uncertain labels from per-observation values.

    ``values`` maps each observation to 1 (positive), 0 (negative), -1 (uncertain) or
    ``None`` (not mentioned).  Negatives and unmentioned observations are absent (weight 0).
    An uncertain observation is, under

    * ``"U-Ignore"``: absent from the labels and listed in the returned ``uncertain`` list,
      which a loss can use to mask the pair (the labels alone equal U-Zeros);
    * ``"U-Zeros"``: absent (a negative);
    * ``"U-Ones"``: a positive;
    * ``"U-Soft"``: a positive with weight ``soft_weight`` (the label field becomes
      ``{label: weight}``; build it with ``label_format="soft"``).

    Observations in ``null_labels`` ("No Finding") are never labels: such an image has no
    positive at the granularity instead of a class of its own.

    Args:
        values: ``{observation: 1, 0, -1 or None}``, in the order labels should appear.
        policy: one of :data:`UNCERTAINTY_POLICIES` (case-insensitive, ``"U-"`` optional).
        soft_weight: the weight of an uncertain label under U-Soft, in (0, 1).
        null_labels: observations that mean "nothing here".

    Returns:
        ``(labels, uncertain)``: a list of labels (a ``{label: weight}`` mapping under
        U-Soft) and the uncertain observations (outside ``null_labels``).

    Raises:
        ValueError: an unknown policy or a ``soft_weight`` outside (0, 1).

    Example:
        >>> values = {"No Finding": None, "Edema": -1, "Cardiomegaly": 1, "Fracture": 0}
        >>> apply_uncertainty(values, "U-Ignore")
        (['Cardiomegaly'], ['Edema'])
        >>> apply_uncertainty(values, "U-Ones")
        (['Edema', 'Cardiomegaly'], ['Edema'])
        >>> apply_uncertainty(values, "U-Soft", soft_weight=0.3)
        ({'Edema': 0.3, 'Cardiomegaly': 1.0}, ['Edema'])
        >>> apply_uncertainty({"No Finding": 1, "Edema": 0}, null_labels=["No Finding"])
        ([], [])
    """
    return _resolve(values, check_policy(policy, soft_weight), soft_weight, null_labels)


def _resolve(values, policy, soft_weight, null_labels) -> tuple:
    """:func:`apply_uncertainty` for an already checked policy (once per row)."""
    kept = {k: v for k, v in values.items() if k not in null_labels}
    uncertain = [k for k, v in kept.items() if v == -1]
    if policy == "U-Soft":
        soft = {k: 1.0 if v == 1 else soft_weight for k, v in kept.items() if v in (1, -1)}
        return soft, uncertain
    positive = (1, -1) if policy == "U-Ones" else (1,)
    return [k for k, v in kept.items() if v in positive], uncertain


def check_policy(policy: object, soft_weight: object) -> str:
    """The canonical policy name; errors for unknown names and bad weights."""
    names = {p.lower(): p for p in UNCERTAINTY_POLICIES} | {
        p[2:].lower(): p for p in UNCERTAINTY_POLICIES
    }
    if not isinstance(policy, str) or policy.lower() not in names:
        raise ValueError(f"`uncertainty` must be one of {UNCERTAINTY_POLICIES}, got {policy!r}")
    if (
        isinstance(soft_weight, bool)
        or not isinstance(soft_weight, (int, float))
        or not 0 < soft_weight < 1
    ):
        raise ValueError(
            f"`soft_weight` must be a number in (0, 1) (the weight of an uncertain label under "
            f"U-Soft), got {soft_weight!r}"
        )
    return names[policy.lower()]


@dataclass(frozen=True)
class _Spec:
    """How the rows of one table become annotations (one object, not a dozen positionals)."""

    image: str
    label_columns: list[str]
    one_column: bool
    label_key: str
    separator: str | None
    allowed: frozenset | None
    null: frozenset
    policy: str
    soft_weight: float
    text_map: dict[str, str]
    meta: list[str]
    paths: ImagePaths
    views: frozenset | None = None
    view_of: Callable[[dict[str, str]], str] | None = None
    patient_of: Callable[[dict[str, str]], str] | None = None
    contradicts: Callable[[dict], bool] | None = None
    levels: Callable[[dict], dict] | None = None


def read_label_table(
    path: Source,
    *,
    image: str,
    labels: str | Sequence[str],
    label_key: str | None = None,
    separator: str | None = None,
    classes: Sequence[str] | None = None,
    null_labels: Sequence[str] = (),
    uncertainty: str = "U-Ignore",
    soft_weight: float = 0.5,
    texts: Sequence[str] | Mapping[str, str] = (),
    metadata: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    what: str = "label table",
) -> Annotations:
    r"""Annotations from a CSV file with one row per image, parsed lazily.

    The labels come either from **one label column** (``labels="Finding Labels"``, a cell
    holding one label, or several split on ``separator``; a blank cell means no label) or
    from **one column per class** (``labels=["Edema", "Cardiomegaly", ...]``, each cell
    ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain or blank for not mentioned, as in
    the CheXpert files; ``1``/``0``/``-1`` are accepted too), resolved by ``uncertainty``
    (:func:`apply_uncertainty`).

    Each annotation is a dict with ``"image"`` (the image column's value, joined to ``root``
    when given), ``label_key`` (the labels: a list, or ``{label: weight}`` under U-Soft),
    ``"uncertain"`` (the uncertain labels, ``[]`` for a label column), one key per text
    column and per metadata column (the values as strings, by column name unless ``texts``
    maps annotation keys to columns).  Under U-Ignore an image with uncertain labels also
    has ``"unknown": {label_key: [...]}``, which the builder turns into NaN (unknown)
    labels.  The header is checked when the function is called; rows are parsed as the
    iterator is consumed (``list(...)`` for a map-style dataset).

    Args:
        path: the CSV file, or a text stream (read once).
        image: the column with the image path or id (unique per row).
        labels: the label column, or the per-class columns.
        label_key: the annotation key of the labels; default ``labels`` when it is one
            column name, else ``"labels"``.
        separator: splits a label column (``"|"`` for ChestX-ray14); default: one label.
        classes: the allowed labels of a label column (besides ``null_labels``); an unknown
            label is an error naming the line.  Default: any label.
        null_labels: labels that mean "nothing here" ("No Finding", "Normal"): dropped, so
            the image has no positive at that granularity instead of a class of its own.
        uncertainty: a policy of :data:`UNCERTAINTY_POLICIES` for per-class columns.
        soft_weight: the weight of an uncertain label under U-Soft.
        texts: free-text columns to keep (a list of columns, or ``{key: column}``).
        metadata: further columns to keep; default every column not used otherwise.
        root: a directory prepended to the image paths.  A path that leaves it (``..``, an
            absolute path) is an error naming the line: a label file must not point the
            loader anywhere else.
        allow_outside_root: accept such paths (absolute ones are then kept as they are).
        what: the kind of file, for error messages.

    Returns:
        An iterator of annotation dicts, one per row, in file order; its ``counts`` (see
        :class:`Annotations`) say how many rows were read, kept and skipped.

    Raises:
        ValueError: (naming the file, line and column) a missing column, an unknown value
            (``2.0``) or label, a blank or repeated image id, an image path outside
            ``root``, bytes that are not UTF-8.

    Example:
        >>> import io
        >>> table = io.StringIO(
        ...     "ImageID,Disease,Description\n"
        ...     'a.jpg,"DR, DME",hard exudates near the macula\n'
        ...     "b.jpg,Normal,a healthy fundus\n"
        ... )
        >>> for annotation in read_label_table(
        ...     table, image="ImageID", labels="Disease", separator=",",
        ...     null_labels=["Normal"], texts=["Description"],
        ... ):
        ...     print(annotation)
        {'image': 'a.jpg', 'Disease': ['DR', 'DME'], 'uncertain': [], 'Description': 'hard exudates near the macula'}
        {'image': 'b.jpg', 'Disease': [], 'uncertain': [], 'Description': 'a healthy fundus'}
    """
    return read_rows(
        path, image=image, labels=labels, label_key=label_key, separator=separator,
        classes=classes, null_labels=null_labels, uncertainty=uncertainty,
        soft_weight=soft_weight, texts=texts, metadata=metadata,
        paths=ImagePaths(root, allow_outside_root), what=what,
    )  # fmt: skip


def read_rows(
    path: Source,
    *,
    image: str,
    labels: str | Sequence[str],
    paths: ImagePaths,
    what: str,
    label_key: str | None = None,
    separator: str | None = None,
    classes: Sequence[str] | None = None,
    null_labels: Sequence[str] = (),
    uncertainty: str = "U-Ignore",
    soft_weight: float = 0.5,
    texts: Sequence[str] | Mapping[str, str] = (),
    metadata: Sequence[str] | None = None,
    views: Sequence[str] | None = None,
    view_of: Callable[[dict[str, str]], str] | None = None,
    needs: Sequence[str] = (),
    patient_of: Callable | None = None,
    contradicts: Callable[[object], bool] | None = None,
    levels: Callable[[dict], dict] | None = None,
) -> Annotations:
    """:func:`read_label_table` with the providers' hooks: a view and a patient id per row
    (from the columns ``needs``), a check that counts contradictory rows, and ``levels``:
    the fields derived from the label fields (``{label_key, "uncertain"[, "unknown"]}`` ->
    new or replaced fields, added last; computed once per distinct label cells); the header
    is checked now, rows read lazily."""
    policy = check_policy(uncertainty, soft_weight)
    one_column = isinstance(labels, str)
    label_columns = [labels] if one_column else _names("labels", labels)
    if label_key is None:
        label_key = labels if one_column else "labels"
    text_map = dict(texts) if isinstance(texts, Mapping) else {c: c for c in _names("texts", texts)}
    null = frozenset(_names("null_labels", null_labels))
    allowed = None if classes is None else frozenset(_names("classes", classes)) | null
    used = {image, *label_columns, *text_map.values()}
    required = [image, *label_columns, *text_map.values(), *(metadata or ())]
    chosen = check_views(views)
    table = Table(path, [*required, *needs], what)
    meta = [c for c in table.header if c and c not in used] if metadata is None else metadata
    spec = _Spec(
        image=image,
        label_columns=label_columns,
        one_column=one_column,
        label_key=label_key,
        separator=separator,
        allowed=allowed,
        null=null,
        policy=policy,
        soft_weight=soft_weight,
        text_map=text_map,
        meta=list(meta),
        paths=paths,
        views=chosen,
        view_of=view_of,
        patient_of=patient_of,
        contradicts=contradicts,
        levels=levels,
    )
    return Annotations(lambda counts: _annotations(table, spec, counts))


_CACHE_LIMIT = 1 << 17  # distinct label cells remembered while reading a file


def _annotations(table: Table, spec: _Spec, counts: dict) -> Iterator[dict[str, object]]:
    seen: dict[str, int] = {}
    cache: dict[object, tuple[dict, dict, bool]] = {}
    columns = spec.label_columns
    column = columns[0] if spec.one_column else None
    image, join = spec.image, spec.paths.join
    texts, meta = list(spec.text_map.items()), spec.meta
    for line, row in table.rows():
        counts["rows"] += 1
        ident = row[image]
        if not ident:
            raise table.error(line, image, "the id is blank")
        if ident in seen:
            raise table.error(
                line, image, f"{ident!r} repeats line {seen[ident]}; each row needs its own id"
            )
        seen[ident] = line
        view = spec.view_of(row) if spec.view_of is not None else None
        if spec.views is not None and view not in spec.views:
            counts["skipped_view"] += 1
            continue
        key = row[column] if spec.one_column else tuple([row[c] for c in columns])
        hit = cache.get(key)
        if hit is None:
            hit = _label_part(table, line, row, spec)
            if len(cache) < _CACHE_LIMIT:
                cache[key] = hit
        part, derived, contradiction = hit
        if contradiction:
            counts["contradictions"] += 1
        out: dict[str, object] = {"image": join(ident, table, line, image)}
        out.update(_fresh(part))
        for k, c in texts:
            out[k] = row[c]
        for c in meta:
            out[c] = row[c]
        if spec.view_of is not None:
            out["view"] = view
        if spec.patient_of is not None:
            out["patient_id"] = spec.patient_of(table, line, row)
        if derived:
            out.update(_fresh(derived))
        counts["kept"] += 1
        yield out


def _label_part(table: Table, line: int, row: dict[str, str], spec: _Spec) -> tuple:
    """``(labels, uncertain[, unknown])``, the fields ``spec.levels`` derives from them, and
    whether the row contradicts itself: all that one row's label cells decide."""
    if spec.one_column:
        column = spec.label_columns[0]
        found = _split(table, line, column, row[column], spec.separator, spec.allowed)
        labels, uncertain = [x for x in found if x not in spec.null], []
        evidence: object = found
    else:
        values = {c: _value(table, line, c, row[c]) for c in spec.label_columns}
        labels, uncertain = _resolve(values, spec.policy, spec.soft_weight, spec.null)
        evidence = values
    contradiction = spec.contradicts is not None and bool(spec.contradicts(evidence))
    part: dict[str, object] = {spec.label_key: labels, "uncertain": uncertain}
    if uncertain and spec.policy == "U-Ignore":
        part[UNKNOWN_KEY] = {spec.label_key: list(uncertain)}
    derived = spec.levels(part) if spec.levels is not None else {}
    return part, derived, contradiction


def _fresh(fields: dict[str, object]) -> dict[str, object]:
    """A copy of cached fields whose lists and dicts (one level inside too) are new objects,
    so that no two annotations share them."""
    out = {}
    for k, v in fields.items():
        kind = type(v)
        if kind is list:
            v = v.copy()
        elif kind is dict:
            v = {a: b.copy() if type(b) in (list, dict) else b for a, b in v.items()}
        out[k] = v
    return out


def integer_id(table: Table, line: int, column: str, value: str) -> str:
    """An integer id as its digits: ``"10000032"``, and ``"10000032.0"`` (a spreadsheet or
    pandas export of an integer column) normalised to it; anything else is an error."""
    digits, dot, zeros = value.partition(".")
    if digits.isdigit() and digits.isascii() and (not dot or (zeros and set(zeros) == {"0"})):
        return digits
    raise table.error(line, column, f"expected an integer id, got {value!r}")


def patient_column(column: str) -> Callable[[Table, int, dict], str]:
    """A ``patient_of`` hook: the integer id of ``column``."""
    return lambda table, line, row: integer_id(table, line, column, row[column])


def _split(table, line, column, cell, separator, allowed) -> list[str]:
    parts = [cell] if separator is None else cell.split(separator)
    found = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if allowed is not None:
        unknown = [x for x in found if x not in allowed]
        if unknown:
            raise table.error(
                line, column, f"unknown label(s) {unknown}; expected labels from {sorted(allowed)}"
            )
    return found


def _value(table, line, column, cell) -> int | None:
    if cell in _VALUES:
        return _VALUES[cell]
    try:
        number = float(cell)
    except ValueError:
        number = None
    if number in (1.0, 0.0, -1.0):
        return int(number)
    raise table.error(
        line,
        column,
        f"unknown value {cell!r}; expected 1.0 (positive), 0.0 (negative), -1.0 "
        "(uncertain) or blank (not mentioned)",
    )


def _names(arg: str, names: object) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (Sequence, frozenset, set)):
        raise TypeError(f"`{arg}` must be a list of strings, got {type(names).__name__}")
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"`{arg}` must be a list of strings, got {names!r}")
    return names
