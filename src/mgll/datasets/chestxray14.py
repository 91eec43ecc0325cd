r"""ChestX-ray14 (NIH ChestX-ray8 extended to 14 findings): ``Data_Entry_2017.csv``.

Format (Wang et al., *ChestX-ray8*, CVPR 2017; the NIH Clinical Center's release notes): one
row per image, columns ``Image Index``, ``Finding Labels`` (``|``-separated findings, or
``No Finding``), ``Follow-up #``, ``Patient ID``, ``Patient Age``, ``Patient Gender``,
``View Position``, ``OriginalImage[Width``, ``Height]``, ``OriginalImagePixelSpacing[x``,
``y]`` (the bracketed names are split by the comma inside them, and each line ends with a
comma: an unnamed empty column, ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from mgll.datasets._csv import Annotations, ImagePaths, Source
from mgll.datasets._describe import NO_FINDING, phrase, sentence
from mgll.datasets.generic import patient_column, read_rows
from mgll.text import Granularity, MultiGranularTextBuilder

__all__ = ["CHESTXRAY14_FINDINGS", "chestxray14_builder", "read_chestxray14"]

#: The 14 findings, spelt as in ``Finding Labels``.
CHESTXRAY14_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


def read_chestxray14(
    path: Source,
    *,
    root: str | os.PathLike[str] | None = None,
    null_labels: Sequence[str] = ("No Finding",),
    classes: Sequence[str] | None = CHESTXRAY14_FINDINGS,
    views: Sequence[str] | None = None,
    allow_outside_root: bool = False,
) -> Annotations:
    r"""Annotations from ChestX-ray14's ``Data_Entry_2017.csv``, parsed lazily.

    Each annotation holds ``"image"`` (``Image Index``, joined to ``root``), ``"finding"``
    (the findings of ``Finding Labels``, in file order; ``No Finding`` gives ``[]``, no
    positive, unless ``null_labels=()`` makes it a class), ``"description"`` (a sentence,
    ``"A chest X-ray showing atelectasis and effusion."``), ``"uncertain"`` (always ``[]``:
    the file has no uncertain labels), ``"view"`` (``View Position``: ``"PA"``, ``"AP"``),
    ``"patient_id"`` (``Patient ID``, its digits) and every other column under its own name
    (strings).  A row whose ``Finding Labels`` has ``No Finding`` together with a finding is
    kept with its findings and counted in ``counts["contradictions"]``.

    Args:
        path: the CSV file, or a text stream.
        root: the image directory (e.g. ``.../images``).
        null_labels: labels meaning "no finding".
        classes: the allowed findings (``No Finding`` is always allowed); an unknown one is
            an error naming the line.  ``None`` accepts any.
        views: keep only these views (from :data:`~mgll.datasets.VIEWS`, or ``"frontal"``).
        allow_outside_root: accept image paths that lead outside ``root``.

    Returns:
        An iterator of annotation dicts, one per image, in file order.

    Raises:
        ValueError: a missing column, an unknown finding, a blank or repeated
            ``Image Index``, a row whose fields are shifted by an unquoted comma (naming the
            file, line and column); an unknown view.

    Example:
        >>> import io
        >>> csv_file = io.StringIO(
        ...     "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        ...     "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        ...     "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        ...     "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.168,0.168,\n"
        ... )
        >>> first, second = read_chestxray14(csv_file)
        >>> first["image"], first["finding"], first["description"]
        ('00000001_000.png', ['Cardiomegaly', 'Effusion'], 'A chest X-ray showing cardiomegaly and effusion.')
        >>> second["finding"], second["View Position"]
        ([], 'PA')
    """
    rows = read_rows(
        path,
        image="Image Index",
        labels="Finding Labels",
        label_key="finding",
        separator="|",
        classes=None if classes is None else (*classes, "No Finding"),
        null_labels=null_labels,
        paths=ImagePaths(root, allow_outside_root),
        what="ChestX-ray14 Data_Entry_2017.csv",
        views=views,
        view_of=(_view, ["View Position"]),
        needs=["Patient ID", "View Position"],
        patient_of=patient_column("Patient ID"),
        contradicts=lambda found: "No Finding" in found and len(found) > 1,
        levels=lambda part: {"description": sentence(part["finding"])},
    )
    return rows


def _view(position: str) -> str:
    view = position.upper()
    return view if view in ("PA", "AP") else "OTHER"


def chestxray14_builder(
    levels: Sequence[str] = ("finding", "description"),
    *,
    null_labels: Sequence[str] = ("No Finding",),
) -> MultiGranularTextBuilder:
    r"""A builder for :func:`read_chestxray14` annotations, with the 14 findings declared.

    Granularities: ``"finding"`` (``"a chest X-ray showing {}"`` over
    :data:`CHESTXRAY14_FINDINGS`, lower-case phrases, ``"a chest X-ray with no finding"``
    for an image without a finding) and ``"description"`` (the sentence, verbatim).

    The description is free text: two images are positives there when their sentences are
    equal (the same set of findings), and its label columns are the distinct sentences of
    each batch, so they mean different sentences in different batches (fine for one
    process; under distributed training with gathered labels, leave it out or build it in
    bank mode).  Its "no finding" sentence is a null label: healthy images are not
    positives of each other, as at the finding level.

    Args:
        levels: the granularities to use, in order.
        null_labels: as given to :func:`read_chestxray14`; ``No Finding`` becomes a class
            (the last) when it is not a null label.

    Example:
        >>> builder = chestxray14_builder()
        >>> batch = builder.build([
        ...     {"finding": ["Effusion", "Atelectasis"], "description": "A chest X-ray."},
        ...     {"finding": [], "description": "A chest X-ray with no finding."},
        ... ], label_format="multi_hot")
        >>> batch["finding"].texts
        ('a chest X-ray showing atelectasis and effusion', 'a chest X-ray with no finding')
        >>> batch["finding"].labels.shape  # (N, C_g): the 14 findings
        torch.Size([2, 14])
    """
    findings = CHESTXRAY14_FINDINGS + (() if "No Finding" in null_labels else ("No Finding",))
    table = {
        "finding": _xray_labels("finding", findings),
        "description": description_granularity(),
    }
    return MultiGranularTextBuilder(_levels(levels, table))


def description_granularity() -> Granularity:
    """The verbatim sentence; the "no finding" sentence is a null label (see the presets)."""
    return Granularity("description", null_labels=(NO_FINDING,), missing_text=NO_FINDING)


def _xray_labels(name: str, classes: tuple[str, ...]) -> Granularity:
    """A label granularity of chest X-rays: "a chest X-ray showing a and b", or no finding."""
    return Granularity(
        name,
        "a chest X-ray showing {}",
        {x: phrase(x) for x in classes},
        classes=classes,
        last_joiner=" and ",
        missing_text="a chest X-ray with no finding",
    )


def _levels(levels: Sequence[str], table: dict) -> list[Granularity]:
    if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise TypeError(f"`levels` must be a non-empty sequence of names from {tuple(table)}")
    unknown = [x for x in levels if x not in table]
    if unknown:
        raise ValueError(f"`levels` must name granularities from {tuple(table)}, got {unknown}")
    return [table[x] for x in levels]
