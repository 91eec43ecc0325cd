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
from collections.abc import Iterator, Sequence

from mgll.datasets._csv import Source, Table
from mgll.datasets.chexpert import (  # CHEXPERT_OBSERVATIONS: the examples use it
    CHEXPERT_OBSERVATIONS,  # noqa: F401
    _read_observations,
    with_levels,
)

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
) -> Iterator[dict[str, object]]:
    r"""Annotations from MIMIC-CXR's CheXpert or NegBio label file, per image or per study.

    Without ``metadata_path``: one annotation per study (``"image"`` is ``None``). With it:
    one per image of the metadata file, joined to its study's labels on ``study_id`` (the
    label file is read first, into memory; the metadata file is then parsed lazily), with
    ``"image"`` from ``image_template`` (joined to ``root``) and the metadata columns
    (``dicom_id``, ``ViewPosition``, ...); images of studies without a label row are
    skipped (MIMIC labels only studies whose report has a findings or impression section).
    The label fields are those of :func:`~mgll.datasets.read_chexpert`: ``"finding"``,
    ``"uncertain"``, ``"category"``, ``"description"``, plus ``subject_id`` and
    ``study_id``.

    Args:
        labels_path: ``mimic-cxr-2.0.0-chexpert.csv`` or ``mimic-cxr-2.0.0-negbio.csv``.
        metadata_path: ``mimic-cxr-2.0.0-metadata.csv``, or ``None`` for studies.
        uncertainty: the policy for -1.0 (see :func:`~mgll.datasets.apply_uncertainty`).
        soft_weight: an uncertain observation's weight under U-Soft.
        null_labels: observations meaning "nothing here".
        views: keep only images whose ``ViewPosition`` is listed (e.g. ``["PA", "AP"]``).
        root: the MIMIC-CXR-JPG directory.
        image_template: the image path, formatted with ``group``, ``subject_id``,
            ``study_id`` and ``dicom_id``.

    Returns:
        An iterator of annotation dicts.

    Raises:
        ValueError: a missing column, an unknown value, a repeated ``study_id`` or
            ``dicom_id``, or a ``subject_id`` that differs between the two files (naming the
            file, line and column).

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
        what="MIMIC-CXR mimic-cxr-2.0.0-chexpert.csv/-negbio.csv",
    )
    if metadata_path is None:
        return ({**with_levels(a), "image": None, "study_id": a["image"]} for a in studies)
    required = ["dicom_id", "subject_id", "study_id"] + (["ViewPosition"] if views else [])
    table = Table(metadata_path, required, "MIMIC-CXR mimic-cxr-2.0.0-metadata.csv")
    if views is not None and (isinstance(views, str) or not isinstance(views, Sequence)):
        raise TypeError(f"`views` must be a list of ViewPosition values, got {views!r}")
    return _join(studies, table, views, root, image_template)


def _join(studies, table, views, root, template) -> Iterator[dict[str, object]]:
    by_study = {}
    for a in studies:
        by_study[a.pop("image")] = with_levels(a)
    seen: dict[str, int] = {}
    for line, row in table.rows():
        dicom = row["dicom_id"]
        if not dicom:
            raise table.error(line, "dicom_id", "the image id is blank")
        if dicom in seen:
            raise table.error(line, "dicom_id", f"{dicom!r} repeats line {seen[dicom]}")
        seen[dicom] = line
        study = by_study.get(row["study_id"])
        if study is None or (views is not None and row.get("ViewPosition") not in views):
            continue
        if study["subject_id"] != row["subject_id"]:
            raise table.error(
                line,
                "subject_id",
                f"study {row['study_id']} belongs to subject {study['subject_id']} in the "
                f"label file, not {row['subject_id']}",
            )
        fields = {**row, "group": row["subject_id"][:2]}
        path = template.format(**fields)
        image = os.path.join(root, path) if root is not None else path
        yield {**study, **row, "image": image}
