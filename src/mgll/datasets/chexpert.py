r"""CheXpert ``train.csv`` / ``valid.csv``: the 14 observations, their hierarchy and presets.

Format (Irvin et al., *CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and
Expert Comparison*, AAAI 2019, arXiv:1901.07031, and the dataset's release): one row per
image, columns ``Path``, ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14
observations of :data:`CHEXPERT_OBSERVATIONS`, each ``1.0`` (positive), ``0.0`` (negative),
``-1.0`` (uncertain) or blank (not mentioned in the report); ``valid.csv`` (radiologist
labels) holds 1.0 and 0.0 only.  MIMIC-CXR's label files use the same 14 observations
(:func:`~mgll.datasets.read_mimic_cxr`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from mgll.datasets._csv import Annotations, ImagePaths, Source
from mgll.datasets._describe import sentence
from mgll.datasets.chestxray14 import _levels, _xray_labels, description_granularity
from mgll.datasets.generic import read_rows
from mgll.text import MultiGranularTextBuilder
from mgll.text.granularity import UNKNOWN_KEY
from mgll.text.hierarchy import LabelHierarchy

__all__ = [
    "CHEXPERT_CATEGORIES",
    "CHEXPERT_HIERARCHY",
    "CHEXPERT_OBSERVATIONS",
    "chexpert_builder",
    "read_chexpert",
]

#: The 14 observation columns, in the order of the CheXpert files.
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The clinical hierarchy of the observations: Lung Opacity is the parent of Lung Lesion,
#: Edema, Consolidation and Atelectasis; Consolidation of Pneumonia; Enlarged
#: Cardiomediastinum of Cardiomegaly; the others (and No Finding) are roots.  This is the
#: label hierarchy of the CheXpert labeler (Irvin et al., 2019), as used for hierarchical
#: training by Pham et al. (*Interpreting chest X-rays via CNNs that exploit hierarchical
#: disease dependencies and uncertainty labels*, Neurocomputing 2021, arXiv:1911.06475).
CHEXPERT_HIERARCHY = LabelHierarchy(
    {
        "Lung Lesion": "Lung Opacity",
        "Edema": "Lung Opacity",
        "Consolidation": "Lung Opacity",
        "Pneumonia": "Consolidation",
        "Atelectasis": "Lung Opacity",
        "Cardiomegaly": "Enlarged Cardiomediastinum",
        "No Finding": None,
        "Pneumothorax": None,
        "Pleural Effusion": None,
        "Pleural Other": None,
        "Fracture": None,
        "Support Devices": None,
    },
    labels=CHEXPERT_OBSERVATIONS,
)

#: The roots of :data:`CHEXPERT_HIERARCHY` except No Finding: the ``"category"`` level.
CHEXPERT_CATEGORIES = tuple(
    x for x in CHEXPERT_OBSERVATIONS if x != "No Finding" and not CHEXPERT_HIERARCHY.ancestors(x)
)


_TOP = {x: (CHEXPERT_HIERARCHY.ancestors(x) or (x,))[-1] for x in CHEXPERT_OBSERVATIONS}
_ORDER = {x: j for j, x in enumerate(CHEXPERT_OBSERVATIONS)}


def read_chexpert(
    path: Source,
    *,
    uncertainty: str = "U-Ignore",
    soft_weight: float = 0.5,
    null_labels: Sequence[str] = ("No Finding",),
    root: str | os.PathLike[str] | None = None,
    views: Sequence[str] | None = None,
    allow_outside_root: bool = False,
) -> Annotations:
    r"""Annotations from CheXpert's ``train.csv`` or ``valid.csv``, parsed lazily.

    Each annotation holds ``"image"`` (``Path``, joined to ``root``), ``"finding"`` (the
    observations resolved by ``uncertainty``, see :func:`~mgll.datasets.apply_uncertainty`:
    a list, or ``{observation: weight}`` under U-Soft), ``"uncertain"`` (the observations
    marked -1.0), ``"category"`` (the roots of :data:`CHEXPERT_HIERARCHY` above the
    findings, with the largest weight under U-Soft), ``"description"`` (a sentence that
    names uncertain observations as "possibly ...", whatever the policy), ``"view"``
    (``"LATERAL"`` for a lateral image, else ``AP/PA``: ``"AP"``, ``"PA"`` or ``"OTHER"``),
    ``"patient_id"`` (the digits of the path's ``patientNNNNN``) and ``Sex``, ``Age``,
    ``Frontal/Lateral``, ``AP/PA`` (strings).  Under U-Ignore the uncertain observations, and
    the categories they could make positive, are listed under ``"unknown"`` (NaN labels in
    the builder).  ``No Finding`` is a null label by default: such an image has no positive
    instead of a class of its own.  Rows that contradict themselves (``No Finding`` 1.0 with
    a positive finding other than Support Devices, or a positive finding whose ancestor in
    :data:`CHEXPERT_HIERARCHY` is 0.0) are kept as read and counted in
    ``counts["contradictions"]``.

    Args:
        path: the CSV file, or a text stream.
        uncertainty: ``"U-Ignore"`` (default), ``"U-Zeros"``, ``"U-Ones"`` or ``"U-Soft"``.
        soft_weight: an uncertain observation's weight under U-Soft.
        null_labels: observations meaning "nothing here".
        root: the directory that holds ``CheXpert-v1.0/`` (the paths' first part); a root
            that is that directory itself (``.../CheXpert-v1.0-small``) works too.
        views: keep only these views (from :data:`~mgll.datasets.VIEWS`, or ``"frontal"``).
        allow_outside_root: accept image paths that lead outside ``root``.

    Returns:
        An iterator of annotation dicts, one per image, in file order.

    Raises:
        ValueError: a missing column, an unknown value (``2.0``), a blank or repeated
            ``Path``, a path without ``patientNNNNN`` or outside ``root`` (naming the file,
            line and column), an unknown policy or view.

    Example:
        >>> import io
        >>> header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
        >>> row = "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
        >>> values = ",,1.0,,,-1.0,,,,0.0,,,,1.0"  # Cardiomegaly, Edema uncertain, Support Devices
        >>> (a,) = read_chexpert(io.StringIO(header + "\n" + row + values + "\n"), uncertainty="U-Soft")
        >>> a["finding"], a["uncertain"]
        ({'Cardiomegaly': 1.0, 'Edema': 0.5, 'Support Devices': 1.0}, ['Edema'])
        >>> a["category"]
        {'Enlarged Cardiomediastinum': 1.0, 'Lung Opacity': 0.5, 'Support Devices': 1.0}
        >>> a["description"]
        'A chest X-ray showing cardiomegaly and support devices; possibly edema.'
    """
    rows = _read_observations(
        path,
        image="Path",
        null_labels=null_labels,
        uncertainty=uncertainty,
        soft_weight=soft_weight,
        paths=ImagePaths(root, allow_outside_root, strip=_RELEASES),
        what="CheXpert train.csv/valid.csv",
        views=views,
        view_of=(_view, ["Frontal/Lateral", "AP/PA"]),
        needs=["Frontal/Lateral", "AP/PA"],
        patient_of=("Path", _patient, False),
        levels=level_fields,
    )
    return rows


_RELEASES = ("CheXpert-v1.0", "CheXpert-v1.0-small")
_PATIENT = re.compile(r"(?:^|/)patient(\d+)(?:/|$)")


def _view(frontal_lateral: str, ap_pa: str) -> str:
    if frontal_lateral.upper() == "LATERAL":
        return "LATERAL"
    view = ap_pa.upper()
    return view if view in ("AP", "PA") else "OTHER"


def _patient(table, line: int, path: str) -> str:
    found = _PATIENT.search(path.replace("\\", "/"))
    if found is None:
        raise table.error(line, "Path", f"no 'patientNNNNN' directory in {path!r}")
    return found.group(1)


def contradicts(values: Mapping[str, int | None]) -> bool:
    """A CheXpert-labeller row that contradicts itself: No Finding with a finding (Support
    Devices aside, as the labeller allows), or a positive finding under a 0.0 ancestor."""
    positive = [x for x, v in values.items() if v == 1 and x != "No Finding"]
    if values.get("No Finding") == 1 and any(x != "Support Devices" for x in positive):
        return True
    return any(
        values.get(a) == 0 for x in positive if x in CHEXPERT_HIERARCHY
        for a in CHEXPERT_HIERARCHY.ancestors(x)
    )  # fmt: skip


#: The only columns whose negatives (0.0) :func:`contradicts` reads: the ancestors.
contradicts.zero_columns = frozenset(
    a
    for x in CHEXPERT_OBSERVATIONS
    if x in CHEXPERT_HIERARCHY
    for a in CHEXPERT_HIERARCHY.ancestors(x)
)


def _read_observations(path: Source, **options: object) -> Annotations:
    """Rows of a CheXpert-labeller table: the 14 observations under ``"finding"``.

    ``options`` go to :func:`~mgll.datasets.generic.read_rows` (``image``, ``what``, the
    uncertainty policy, ...); CheXpert's ``train.csv`` and MIMIC-CXR's label files share this.
    """
    return read_rows(
        path,
        labels=list(CHEXPERT_OBSERVATIONS),
        label_key="finding",
        contradicts=contradicts,
        **options,
    )


def with_levels(annotation: dict[str, object]) -> dict[str, object]:
    """Add ``"category"`` and ``"description"`` from ``"finding"`` and ``"uncertain"``."""
    return {**annotation, **level_fields(annotation)}


def level_fields(annotation: Mapping[str, object]) -> dict[str, object]:
    """``"category"``, ``"description"`` and (under U-Ignore) the categories made unknown,
    from ``"finding"``, ``"uncertain"`` and ``"unknown"``."""
    finding, uncertain = annotation["finding"], annotation["uncertain"]
    soft = type(finding) is dict or (type(finding) is not list and isinstance(finding, Mapping))
    positives = [x for x in finding if x not in uncertain]
    category: dict[str, float] = {}
    top_of = _TOP.get
    if soft:
        for x, w in finding.items():
            top = top_of(x, x)
            category[top] = max(category.get(top, 0.0), w)
    else:
        for x in finding:
            top = top_of(x, x)
            category[top] = max(category.get(top, 0.0), 1.0)
    if len(category) > 1:
        category = dict(sorted(category.items(), key=_rank))
    out = {
        "category": category if soft else list(category),
        "description": sentence(positives, uncertain),
    }
    unknown = annotation.get(UNKNOWN_KEY)
    if (
        unknown
        and (type(unknown) is dict or isinstance(unknown, Mapping))
        and unknown.get("finding")
    ):
        maybe = dict.fromkeys(top_of(x, x) for x in unknown["finding"])
        categories = [x for x in maybe if x not in category and x in CHEXPERT_CATEGORIES]
        out[UNKNOWN_KEY] = {**unknown, "category": categories}
    return out


def _rank(item: tuple[str, float]) -> int:
    return _ORDER.get(item[0], len(_ORDER))


def chexpert_builder(
    levels: Sequence[str] = ("category", "finding", "description"),
    *,
    hierarchy: bool = True,
    null_labels: Sequence[str] = ("No Finding",),
) -> MultiGranularTextBuilder:
    r"""A builder for :func:`read_chexpert` / :func:`~mgll.datasets.read_mimic_cxr` annotations.

    Granularities (choose with ``levels``, in order):

    * ``"category"``: ``"a chest X-ray showing {}"`` over :data:`CHEXPERT_CATEGORIES`
      (and No Finding when it is not a null label);
    * ``"finding"``: the same template over the observations (without ``null_labels``),
      with :data:`CHEXPERT_HIERARCHY` applied when ``hierarchy`` (a Pneumonia image is also
      a positive of Consolidation and Lung Opacity texts);
    * ``"description"``: the sentence, verbatim (free text: see
      :func:`~mgll.datasets.chestxray14_builder`; its "no finding" sentence is a null label).

    An image without a finding reads ``"a chest X-ray with no finding"``.  The files hold
    no location or severity words, so the finding texts have none.  Collate U-Soft
    annotations with ``label_format="soft"``.

    Args:
        levels: the granularities to use, in order.
        hierarchy: expand findings with their ancestors.
        null_labels: the observations left out of the classes (as given to the reader).

    Example:
        >>> builder = chexpert_builder()
        >>> batch = builder.build([
        ...     {"category": ["Lung Opacity"], "finding": ["Pneumonia"], "description": "x"},
        ...     {"category": [], "finding": [], "description": "y"},
        ... ], label_format="multi_hot")
        >>> batch["finding"].texts
        ('a chest X-ray showing pneumonia', 'a chest X-ray with no finding')
        >>> [batch["finding"].classes[c] for c in batch["finding"].labels[0].nonzero()[:, 0]]
        ['Lung Opacity', 'Consolidation', 'Pneumonia']
    """
    findings = tuple(x for x in CHEXPERT_OBSERVATIONS if x not in null_labels)
    categories = tuple(x for x in findings if x == "No Finding" or x in CHEXPERT_CATEGORIES)
    table = {
        "category": _xray_labels("category", categories),
        "finding": _xray_labels("finding", findings),
        "description": description_granularity(),
    }
    grans = _levels(levels, table)
    use = hierarchy and "finding" in levels
    return MultiGranularTextBuilder(grans, {"finding": CHEXPERT_HIERARCHY} if use else None)
