r"""A generic reader for "one row per image" label tables, and the uncertainty policies.

The provider-specific readers (:func:`~mgll.datasets.read_chestxray14`,
:func:`~mgll.datasets.read_chexpert`, :func:`~mgll.datasets.read_mimic_cxr`) are built on
:func:`read_label_table`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

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
    view_of: tuple[Callable[..., str], Sequence[str]] | None = None
    patient_of: tuple[str, Callable[[Table, int, str], str], bool] | None = None
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
    view_of: tuple[Callable[..., str], Sequence[str]] | None = None,
    needs: Sequence[str] = (),
    patient_of: tuple[str, Callable[[Table, int, str], str], bool] | None = None,
    contradicts: Callable[[object], bool] | None = None,
    levels: Callable[[dict], dict] | None = None,
    with_layout: bool = False,
) -> Annotations:
    """:func:`read_label_table` with the providers' hooks: a view per row (``view_of``:
    ``(function of the cells, its columns)``, computed once per distinct cells), a patient
    id per row (``patient_of``: ``(column, function(table, line, cell), whether a cell's id
    may be remembered)``), from the columns ``needs``, a check that counts contradictory
    rows (``contradicts``; its ``zero_columns`` attribute, where it has one, names the only
    columns whose negatives it reads, the others' negatives reading as blanks), and ``levels``:
    the fields derived from the label fields (``{label_key, "uncertain"[, "unknown"]}`` ->
    new or replaced fields, added last; computed once per distinct label cells); the header
    is checked now, rows read lazily.  ``with_layout``: yield ``(annotation, layout)``, the
    layout an object that rows share only when their label fields are the same."""
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
    return Annotations(lambda counts: _annotations(table, spec, counts, with_layout))


_CACHE_LIMIT = 1 << 17  # distinct label cells (and views, patients) remembered a file


def _getter(positions: Sequence[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """``cells -> tuple(cells[j] for j in positions)``, in C."""
    if len(positions) > 1:
        return itemgetter(*positions)
    if positions:
        j = positions[0]
        return lambda cells: (cells[j],)
    return lambda cells: ()


#: The label cells' one-character codes (positive, uncertain, negative, not mentioned): a
#: row's codes, joined, key the cache of label fields; any other spelling of a value (or a
#: bad one) takes :func:`_value`.
_CODES = {"1.0": "1", "1": "1", "-1.0": "u", "-1": "u", "0.0": "0", "0": "0", "": "_"}
_CODE_VALUES = {"1": 1, "u": -1, "0": 0, "_": None}


def _code_tables(spec: _Spec) -> list[dict[str, str]]:
    """Per label column, cell -> code.  A negative and a blank decide the same labels, so they
    share a code (fewer distinct keys), except in the columns ``spec.contradicts`` reads
    zeros of (its ``zero_columns``; all columns when it does not say)."""
    zeros = getattr(spec.contradicts, "zero_columns", None) if spec.contradicts else ()
    tables = []
    for c in spec.label_columns:
        table = dict(_CODES)
        if zeros is not None and c not in zeros:
            table["0.0"] = table["0"] = "_"
        tables.append(table)
    return tables


class _Shape:
    """The key order of the annotations whose label fields have the same keys.

    ``template`` holds every key in the order the annotation has them (the image, the label
    fields, the texts and metadata, view, patient id, the derived fields: later writers
    replacing earlier values in place, as assigning them one after the other would); its
    ``fixed`` keys take their values from the label fields, ``cells`` from the row's cells,
    and ``image``, ``view``, ``patient`` say whether the row's own values are the last
    writers of those keys.
    """

    __slots__ = ("cells", "fixed", "image", "patient", "template", "view")

    def __init__(self, part: dict, derived: dict, middle: list, spec: _Spec) -> None:
        writer: dict[str, tuple] = {"image": ("image",)}
        for k in part:
            writer[k] = ("fixed",)
        for k, j in middle:
            writer[k] = ("cell", j)
        if spec.view_of is not None:
            writer["view"] = ("view",)
        if spec.patient_of is not None:
            writer["patient_id"] = ("patient",)
        for k in derived:
            writer[k] = ("fixed",)
        self.template = dict.fromkeys(writer)
        self.fixed = [k for k, w in writer.items() if w[0] == "fixed"]
        cells = [(k, w[1]) for k, w in writer.items() if w[0] == "cell"]
        self.cells = ([k for k, _ in cells], _getter([j for _, j in cells]))
        self.image = writer["image"] == ("image",)
        self.view = writer.get("view") == ("view",)
        self.patient = writer.get("patient_id") == ("patient",)


class _Layout:
    """How the annotations of one label pattern are built from a row: a copy of
    ``template`` (:class:`_Shape`'s, with the label fields set) with the row's own values
    set, and fresh lists (``lists``) and dicts (``copies``) made from frozen values, so that
    no two annotations share one.

    Every value a layout keeps is a string, a number, a tuple of them or a dict of them,
    which the garbage collector stops tracking: thousands of cached layouts then add only
    themselves (no containers) to a collection's work.
    """

    __slots__ = ("cells", "copies", "image", "lists", "patient", "template", "view")

    def __init__(self, part: dict, derived: dict, shape: _Shape) -> None:
        fields = {**part, **derived}
        template = shape.template.copy()
        lists, copies = [], []
        for k in shape.fixed:
            v = fields[k]
            if type(v) is list:
                lists.append((k, tuple(v)))
                v = None  # a fresh list per row
            elif type(v) is dict:
                copies.append((k, *_copier(v)))
                v = None  # a fresh dict per row
            template[k] = v
        self.template = template
        self.lists = tuple(lists)  # (key, items) pairs
        self.copies = tuple(copies)
        self.cells, self.image = shape.cells, shape.image
        self.view, self.patient = shape.view, shape.patient


def _copier(value: object) -> tuple[Callable, object]:
    """``(make, frozen)``: ``make(frozen)`` is a copy of ``value`` (a list, or a dict whose
    lists and dicts are copied too), so that no two annotations share a list or dict."""
    if type(value) is list:
        return list, tuple(value)
    inner = [type(b) for b in value.values()]
    if inner and all(t is list for t in inner):
        return _lists_dict, tuple((k, tuple(v)) for k, v in value.items())
    if not any(t in (list, dict) for t in inner):
        return dict.copy, dict(value)
    return _one_level, value


def _lists_dict(frozen: tuple) -> dict:
    return {k: [*items] for k, items in frozen}


def _one_level(value: dict) -> dict:
    return {a: b.copy() if type(b) in (list, dict) else b for a, b in value.items()}


def _annotations(table: Table, spec: _Spec, counts: dict, with_layout: bool = False) -> Iterator:
    # One pass over the raw csv fields, stripping only those an annotation uses: the label
    # cells key a cache of everything they decide (a layout), the view cells one of views.
    index = table.index
    seen: dict[str, int] = {}
    layouts: dict[object, tuple[_Layout, bool]] = {}  # label cells' key -> layout
    build = _Layouts(table, spec, [(k, index[c]) for k, c in spec.text_map.items()]
                     + [(c, index[c]) for c in spec.meta])  # fmt: skip
    label_cells = _getter([index[c] for c in spec.label_columns])
    at_label = index[spec.label_columns[0]] if spec.one_column else None
    tables = None if spec.one_column else _code_tables(spec)
    get, strip = dict.get, str.strip
    image, join = spec.image, spec.paths.join
    joined = spec.paths.root is not None
    at_image = index[image]
    has_view, has_patient = spec.view_of is not None, spec.patient_of is not None
    if has_view:
        view_of, view_columns = spec.view_of
        at_view = [index[c] for c in view_columns]
        # one column: its cell (a str) keys the views; several: the tuple of their cells
        view_cells = itemgetter(*at_view) if at_view else (lambda cells: ())
        one_view, views_seen = len(at_view) == 1, {}
    if has_patient:
        patient_column, patient_of, remember = spec.patient_of
        at_patient, patients = index[patient_column], {}
    chosen = spec.views
    width, filled, irregular = len(table.header), table.filled, table.irregular
    with table.reading() as reader:
        for cells in reader:
            if not any(cells):
                continue  # a blank line (e.g. at the end of the file)
            line = reader.line_num
            if len(cells) != width or (filled is not None and any(filled(cells))):
                cells = irregular(cells, line)
                if cells is None:
                    continue
            ident = cells[at_image].strip()
            if not ident and not any(map(strip, cells)):
                continue  # blank but for spaces
            counts["rows"] += 1
            if not ident:
                raise table.error(line, image, "the id is blank")
            if ident in seen:
                raise table.error(
                    line, image, f"{ident!r} repeats line {seen[ident]}; each row needs its own id"
                )
            seen[ident] = line
            view = None
            if has_view:
                raw = view_cells(cells)
                view = views_seen.get(raw)
                if view is None:
                    view = view_of(raw.strip()) if one_view else view_of(*map(strip, raw))
                    if len(views_seen) < _CACHE_LIMIT:
                        views_seen[raw] = view
            if chosen is not None and view not in chosen:
                counts["skipped_view"] += 1
                continue
            if tables is None:
                key = cells[at_label].strip()
            else:
                try:
                    key = "".join(map(get, tables, label_cells(cells)))
                except TypeError:  # spaces, another spelling of a value, or a bad one
                    key = _slow_key(table, line, spec, tables, label_cells(cells))
            hit = layouts.get(key)
            if hit is None:
                hit = build(line, key)
                if len(layouts) < _CACHE_LIMIT:
                    layouts[key] = hit
            layout, contradiction = hit
            if contradiction:
                counts["contradictions"] += 1
            out = layout.template.copy()
            path = join(ident, table, line, image) if joined else ident
            if layout.image:
                out["image"] = path
            keys, values = layout.cells
            out.update(zip(keys, map(strip, values(cells))))  # noqa: B905 (same length)
            if layout.view:
                out["view"] = view
            if has_patient:
                raw = cells[at_patient]
                pid = patients.get(raw)
                if pid is None:
                    pid = patient_of(table, line, raw.strip())
                    if remember and len(patients) < _CACHE_LIMIT:
                        patients[raw] = pid
                if layout.patient:
                    out["patient_id"] = pid
            for k, items in layout.lists:
                out[k] = [*items]  # a display, not list(): this runs per row and is faster
            for k, make, frozen in layout.copies:
                out[k] = make(frozen)
            counts["kept"] += 1
            yield (out, layout) if with_layout else out


def _slow_key(table: Table, line: int, spec: _Spec, tables: list, found: tuple) -> str:
    """The key of label cells outside :data:`_CODES` (``"1.00"``), or the error of a bad one."""
    codes = {1: "1", -1: "u", 0: "0", None: "_"}
    key = []
    for c, table_j, cell in zip(spec.label_columns, tables, found, strict=True):
        cell = cell.strip()
        code = table_j.get(cell) or codes[_value(table, line, c, cell)]
        key.append(table_j["0"] if code == "0" else code)
    return "".join(key)


class _Layouts:
    """``(layout, contradiction)`` of a row's label key: the contradiction from the key
    itself, the layout shared by every key that decides the same labels (a negative in a
    column that ``contradicts`` reads zeros of keys apart, but decides the same labels as
    a blank)."""

    def __init__(self, table: Table, spec: _Spec, middle: list) -> None:
        self.table, self.spec, self.middle = table, spec, middle
        self.shapes: dict[tuple, _Shape] = {}
        self.layouts: dict[str, _Layout] = {}

    def __call__(self, line: int, key: str) -> tuple[_Layout, bool]:
        spec, table = self.spec, self.table
        if spec.one_column:
            row = {spec.label_columns[0]: key}
            part, derived, evidence = _label_part(table, line, row, spec)
            return self._layout(part, derived), _contradicts(spec, evidence)
        values = dict(zip(spec.label_columns, map(_CODE_VALUES.__getitem__, key)))  # noqa: B905
        contradiction = _contradicts(spec, values)
        folded = key.replace("0", "_")
        layout = self.layouts.get(folded)
        if layout is None:
            if folded != key:
                values = dict(zip(spec.label_columns, map(_CODE_VALUES.__getitem__, folded)))  # noqa: B905
            part, derived, _ = _label_part(table, line, values, spec)
            layout = self._layout(part, derived)
            if len(self.layouts) < _CACHE_LIMIT:
                self.layouts[folded] = layout
        return layout, contradiction

    def _layout(self, part: dict, derived: dict) -> _Layout:
        names = (tuple(part), tuple(derived))
        shape = self.shapes.get(names)
        if shape is None:
            shape = self.shapes[names] = _Shape(part, derived, self.middle, self.spec)
        return _Layout(part, derived, shape)


def _contradicts(spec: _Spec, evidence: object) -> bool:
    return spec.contradicts is not None and bool(spec.contradicts(evidence))


def _label_part(table: Table, line: int, row: dict, spec: _Spec) -> tuple:
    """``(labels, uncertain[, unknown])``, the fields ``spec.levels`` derives from them, and
    what ``spec.contradicts`` reads: all that one row's label cells decide (``row``: the
    label column's cell, or the per-class columns' values, 1, 0, -1 or ``None``)."""
    if spec.one_column:
        column = spec.label_columns[0]
        found = _split(table, line, column, row[column], spec.separator, spec.allowed)
        labels, uncertain = [x for x in found if x not in spec.null], []
        evidence: object = found
    else:
        labels, uncertain = _resolve(row, spec.policy, spec.soft_weight, spec.null)
        evidence = row
    part: dict[str, object] = {spec.label_key: labels, "uncertain": uncertain}
    if uncertain and spec.policy == "U-Ignore":
        part[UNKNOWN_KEY] = {spec.label_key: list(uncertain)}
    derived = spec.levels(part) if spec.levels is not None else {}
    return part, derived, evidence


def integer_id(table: Table, line: int, column: str, value: str) -> str:
    """An integer id as its digits: ``"10000032"``, and ``"10000032.0"`` (a spreadsheet or
    pandas export of an integer column) normalised to it; anything else is an error."""
    digits, dot, zeros = value.partition(".")
    if digits.isdigit() and digits.isascii() and (not dot or (zeros and set(zeros) == {"0"})):
        return digits
    raise table.error(line, column, f"expected an integer id, got {value!r}")


def patient_column(column: str) -> tuple[str, Callable[[Table, int, str], str], bool]:
    """A ``patient_of`` hook: the integer id of ``column``."""
    return column, lambda table, line, cell: integer_id(table, line, column, cell), True


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
