r"""MIMIC-CXR label files: ``mimic-cxr-2.0.0-chexpert.csv`` / ``-negbio.csv`` and the metadata.

Format (Johnson et al., *MIMIC-CXR-JPG, a large publicly available database of labeled chest
radiographs*, arXiv:1901.07042, and the MIMIC-CXR-JPG 2.0.0 release on PhysioNet): the label
files hold one row per **study**, columns ``subject_id``, ``study_id`` and the 14 CheXpert
observations (1.0, 0.0, -1.0 or blank, as in CheXpert); ``mimic-cxr-2.0.0-metadata.csv``
holds one row per image, ``dicom_id``, ``subject_id``, ``study_id``, ``ViewPosition`` and
further DICOM fields; the JPEG of an image is
``files/p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.jpg``.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator, Sequence

from mgll.datasets._csv import Annotations, ImagePaths, Source, Table
from mgll.datasets.chexpert import (  # CHEXPERT_OBSERVATIONS: the examples use it
    CHEXPERT_OBSERVATIONS,  # noqa: F401
    _read_observations,
    level_fields,
)
from mgll.datasets.generic import _copier, check_views, integer_id, patient_column

__all__ = ["MIMIC_IMAGE_TEMPLATE", "read_mimic_cxr"]

#: Where MIMIC-CXR-JPG keeps an image, relative to its root (``group``: the first two digits
#: of ``subject_id``).
MIMIC_IMAGE_TEMPLATE = "files/p{group}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def read_mimic_cxr(
    labels_path: Source,
    metadata_path: Source | None = None,
    *,
    uncertainty: str = "U-Ignore",
    soft_weight: float = 0.5,
    null_labels: Sequence[str] = ("No Finding",),
    views: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    image_template: str = MIMIC_IMAGE_TEMPLATE,
    allow_outside_root: bool = False,
) -> Annotations:
    r"""Annotations from MIMIC-CXR's CheXpert or NegBio label file, per image or per study.

    Without ``metadata_path``: one annotation per study (``"image"`` is ``None``). With it:
    one per image of the metadata file, joined to its study's labels on ``study_id`` (the
    label file is read first, into memory; the metadata file is then parsed lazily), with
    ``"image"`` from ``image_template`` (joined to ``root``) and the metadata columns
    (``dicom_id``, ``ViewPosition``, ...) and ``"view"`` (``ViewPosition`` in the readers'
    vocabulary: ``"PA"``, ``"AP"``, ``"LATERAL"`` for LATERAL and LL, else ``"OTHER"``).
    Images of studies without a label row are skipped (MIMIC labels only studies whose
    report has a findings or impression section) and counted, as are labelled studies
    without an image: ``counts["unmatched_images"]`` and ``counts["unmatched_studies"]``
    once the iterator is exhausted; a join that matches nothing is an error.  The label
    fields are those of :func:`~mgll.datasets.read_chexpert`: ``"finding"``,
    ``"uncertain"``, ``"category"``, ``"description"``, plus ``subject_id``, ``study_id``
    and ``"patient_id"`` (the ``subject_id``).  Ids written as ``10000032.0`` (a
    spreadsheet export) are read as ``10000032``; other non-integer ids are errors.

    Args:
        labels_path: ``mimic-cxr-2.0.0-chexpert.csv`` or ``mimic-cxr-2.0.0-negbio.csv``.
        metadata_path: ``mimic-cxr-2.0.0-metadata.csv``, or ``None`` for studies.
        uncertainty: the policy for -1.0 (see :func:`~mgll.datasets.apply_uncertainty`).
        soft_weight: an uncertain observation's weight under U-Soft.
        null_labels: observations meaning "nothing here".
        views: keep only these views (from :data:`~mgll.datasets.VIEWS`, or
            ``"frontal"``); needs ``metadata_path``.
        root: the MIMIC-CXR-JPG directory.
        image_template: the image path, formatted with ``group``, ``subject_id``,
            ``study_id`` and ``dicom_id``.
        allow_outside_root: accept image paths that lead outside ``root``.

    Returns:
        An iterator of annotation dicts.

    Raises:
        ValueError: a missing column, an unknown value, a repeated ``study_id`` or
            ``dicom_id``, a non-integer id, or a ``subject_id`` that differs between the two
            files (naming the file, line and column); a join that matches no image.

    Example:
        >>> import io
        >>> labels = io.StringIO(
        ...     "subject_id,study_id," + ",".join(sorted(CHEXPERT_OBSERVATIONS)) + "\n"
        ...     "10000032,50414267,,,,,,,,,1.0,,,,,\n"
        ...     "10000032,53189527,,1.0,,-1.0,,,,,,,,,,\n"
        ... )
        >>> metadata = io.StringIO(
        ...     "dicom_id,subject_id,study_id,ViewPosition\n"
        ...     "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,PA\n"
        ...     "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,PA\n"
        ... )
        >>> first, second = read_mimic_cxr(labels, metadata)
        >>> first["image"], first["finding"]
        ('files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg', [])
        >>> second["finding"], second["uncertain"]
        (['Cardiomegaly'], ['Edema'])
    """
    studies = _read_observations(
        labels_path,
        image="study_id",
        null_labels=null_labels,
        uncertainty=uncertainty,
        soft_weight=soft_weight,
        metadata=["subject_id"],
        paths=ImagePaths(None),
        what="MIMIC-CXR mimic-cxr-2.0.0-chexpert.csv/-negbio.csv",
        patient_of=patient_column("subject_id"),
        levels=level_fields,
        with_layout=metadata_path is not None,
    )
    chosen = check_views(views)
    if metadata_path is None:
        if chosen is not None:
            raise ValueError("`views` needs `metadata_path`: the label file has no view column")
        return studies.map(_study).map(lambda a: {**a, "image": None})
    required = ["dicom_id", "subject_id", "study_id"] + (["ViewPosition"] if chosen else [])
    table = Table(metadata_path, required, "MIMIC-CXR mimic-cxr-2.0.0-metadata.csv")
    paths = ImagePaths(root, allow_outside_root)
    out = Annotations(lambda counts: _join(studies, table, chosen, paths, image_template, counts))
    return out


def _study(a: dict) -> dict:
    """A study's annotation keyed by its normalised ids (``subject_id`` is the patient)."""
    return {**a, "study_id": _digits(a.pop("image")), "subject_id": a["patient_id"]}


def _digits(value: str) -> str:
    """A study id as its digits (``"50414267.0"`` -> ``"50414267"``)."""
    head, dot, tail = value.partition(".")
    if head.isdigit() and head.isascii() and (not dot or (tail and set(tail) == {"0"})):
        return head
    raise ValueError(f"MIMIC-CXR label file: `study_id` {value!r} is not an integer id")


_IDS = ("image", "subject_id", "patient_id", "study_id")
_TEMPLATE_FIELDS = frozenset(("group", "subject_id", "study_id", "dicom_id"))


def _join(studies, table, views, paths, template, counts) -> Iterator[dict[str, object]]:
    # The studies in few objects: {study id: (subject, code)} and one field dict per distinct
    # study annotation (ids left out), so a 227,835-study label file stays small in memory.
    by_study: dict[int, tuple[str, int]] = {}
    codes: dict[object, int] = {}  # a study's layout (its label fields) -> code
    kinds: list[dict] = []
    subjects: dict[str, str] = {}
    for a, layout in studies:
        number = int(_digits(a["image"]))
        code = codes.get(layout)
        if code is None:
            code = codes[layout] = len(kinds)
            kinds.append({k: (None if k in _IDS else v) for k, v in _study(a).items()})
        subject = subjects.setdefault(a["patient_id"], a["patient_id"])
        by_study[number] = (subject, code)
    del codes, subjects
    counts.update(studies.counts, unmatched_images=0, unmatched_studies=0)
    counts["rows"] = counts["kept"] = 0
    names = [h for h in table.header if h]
    index = table.index
    at_names = [index[h] for h in names]
    prefix = at_names == list(range(len(names)))  # then zip(names, ...) stops at the names
    at_dicom, at_study, at_subject = index["dicom_id"], index["study_id"], index["subject_id"]
    at_view = index.get("ViewPosition")
    short = _TEMPLATE_FIELDS.issuperset(_field_names(template)) and "group" not in index
    layouts: dict[int, tuple] = {}
    views_seen: dict[str, str] = {}
    matched: set[int] = set()
    seen: dict[str, int] = {}
    strip, joined = str.strip, paths.root is not None
    width, filled, irregular = len(table.header), table.filled, table.irregular
    with table.reading() as reader:
        for cells in reader:
            if not any(cells):
                continue
            line = reader.line_num
            if len(cells) != width or (filled is not None and any(filled(cells))):
                cells = irregular(cells, line)
                if cells is None:
                    continue
            row = [*map(strip, cells if prefix else map(cells.__getitem__, at_names))]
            if not any(row):
                continue  # blank but for spaces
            counts["rows"] += 1
            dicom = cells[at_dicom].strip()
            if not dicom:
                raise table.error(line, "dicom_id", "the image id is blank")
            if dicom in seen:
                raise table.error(line, "dicom_id", f"{dicom!r} repeats line {seen[dicom]}")
            seen[dicom] = line
            study_id = cells[at_study].strip()
            if not (study_id.isdigit() and study_id.isascii()):
                study_id = integer_id(table, line, "study_id", study_id)
            subject_id = cells[at_subject].strip()
            if not (subject_id.isdigit() and subject_id.isascii()):
                subject_id = integer_id(table, line, "subject_id", subject_id)
            number = int(study_id)
            study = by_study.get(number)
            if study is None:
                counts["unmatched_images"] += 1
                continue
            matched.add(number)
            position = "" if at_view is None else cells[at_view]
            view = views_seen.get(position)
            if view is None:
                view = views_seen.setdefault(position, _view(position))
            if views is not None and view not in views:
                counts["skipped_view"] += 1
                continue
            subject, code = study
            if subject != subject_id:
                raise table.error(
                    line,
                    "subject_id",
                    f"study {study_id} belongs to subject {subject} in the label file, not "
                    f"{subject_id}",
                )
            if short:
                fields = {"group": subject_id[:2], "subject_id": subject_id,
                          "study_id": study_id, "dicom_id": dicom}  # fmt: skip
            else:
                fields = dict(zip(names, row))  # noqa: B905 (row: at least the names)
                fields["study_id"], fields["subject_id"] = study_id, subject_id
                fields["group"] = subject_id[:2]
            image = template.format_map(fields)
            if joined:
                image = paths.join(image, table, line, "dicom_id")
            layout = layouts.get(code)
            if layout is None:
                layout = layouts[code] = _image_layout(kinds[code], names)
            out, lists, copies = layout
            out = out.copy()
            out["patient_id"] = subject
            out.update(zip(names, row))  # noqa: B905 (row: at least the names)
            out["study_id"], out["subject_id"] = study_id, subject_id
            out["image"], out["view"] = image, view
            for k, items in lists:
                out[k] = [*items]
            for k, make, frozen in copies:
                out[k] = make(frozen)
            counts["kept"] += 1
            yield out
    counts["unmatched_studies"] = len(by_study) - len(matched)
    if not matched:
        raise ValueError(
            f"{table.name}: none of its {counts['rows']} images belongs to one of the "
            f"{len(by_study)} labelled studies (joined on study_id); are the label and "
            "metadata files from the same MIMIC-CXR-JPG release?"
        )


def _field_names(template: str) -> set[str]:
    """The names a format string reads (``{dicom_id}`` -> ``dicom_id``)."""
    out = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            out.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return out


def _image_layout(kind: dict, names: list[str]) -> tuple:
    """An image's annotation before its own values: the study's fields in the order the
    image annotation has them, and the fresh copies of its lists and dicts to make."""
    out = dict(kind)
    out["subject_id"] = out["patient_id"] = out["study_id"] = None
    out.update(dict.fromkeys(names))
    out["image"] = out["view"] = None
    own = {"patient_id", "image", "view", *names}
    lists = [k for k, v in out.items() if type(v) is list and k not in own]
    copies = [(k, *_copier(v)) for k, v in out.items() if type(v) is dict and k not in own]
    return out, tuple((k, tuple(out[k])) for k in lists), copies


def _view(position: str) -> str:
    position = position.strip().upper()
    if position in ("PA", "AP"):
        return position
    return "LATERAL" if position in ("LATERAL", "LL") else "OTHER"
