"""From dataset label files to annotations, and from annotations to DataLoader batches.

The first layer of mgll's data flow: data files → annotations (this package) → texts and
labels (:mod:`mgll.text`) → the loss.  The readers use the stdlib :mod:`csv` module, parse
lazily and decode no image; nothing here imports the loss.  :doc:`/guide_data` shows the
whole path for ChestX-ray14 and CheXpert.

Supported formats (each reader's docstring names its columns and source):

* ChestX-ray14 ``Data_Entry_2017.csv``: :func:`read_chestxray14`;
* CheXpert ``train.csv`` / ``valid.csv``: :func:`read_chexpert`;
* MIMIC-CXR ``mimic-cxr-2.0.0-chexpert.csv`` / ``-negbio.csv``, joined to images through
  ``mimic-cxr-2.0.0-metadata.csv``: :func:`read_mimic_cxr`;
* any "one row per image" table (label columns or a delimited label column, optional text
  columns), e.g. MIDRC-style or MGLL-Fundus-style exports: :func:`read_label_table`.

Several sources become one set with :func:`merge_sources` over a :class:`LabelMap` (the union
classes, NaN for what a source does not annotate), are split by patient
(:func:`split_by_patient`, :func:`split_by_list`) and written for open_clip's trainer
(:func:`write_webdataset`, :func:`write_csv`, :func:`open_clip_config`).
"""

from mgll.datasets.chestxray14 import CHESTXRAY14_FINDINGS, chestxray14_builder, read_chestxray14
from mgll.datasets.chexpert import (
    CHEXPERT_CATEGORIES,
    CHEXPERT_HIERARCHY,
    CHEXPERT_OBSERVATIONS,
    chexpert_builder,
    read_chexpert,
)
from mgll.datasets.collate import MultiGranularCollate
from mgll.datasets.compact import CompactAnnotations
from mgll.datasets.export import open_clip_config, write_csv, write_webdataset
from mgll.datasets.generic import UNCERTAINTY_POLICIES, VIEWS, apply_uncertainty, read_label_table
from mgll.datasets.harmonise import CHEST_X_RAY_LABEL_MAP, LabelMap, SourceLabels
from mgll.datasets.merge import MergedAnnotations, MergeSummary, merge_sources
from mgll.datasets.mimic_cxr import MIMIC_IMAGE_TEMPLATE, read_mimic_cxr
from mgll.datasets.splits import (
    Splits,
    patient_of,
    read_split_list,
    split_by_list,
    split_by_patient,
)

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "CHEST_X_RAY_LABEL_MAP",
    "CHEXPERT_CATEGORIES",
    "CHEXPERT_HIERARCHY",
    "CHEXPERT_OBSERVATIONS",
    "MIMIC_IMAGE_TEMPLATE",
    "UNCERTAINTY_POLICIES",
    "VIEWS",
    "CompactAnnotations",
    "LabelMap",
    "MergeSummary",
    "MergedAnnotations",
    "MultiGranularCollate",
    "SourceLabels",
    "Splits",
    "apply_uncertainty",
    "chestxray14_builder",
    "chexpert_builder",
    "merge_sources",
    "open_clip_config",
    "patient_of",
    "read_chestxray14",
    "read_chexpert",
    "read_label_table",
    "read_mimic_cxr",
    "read_split_list",
    "split_by_list",
    "split_by_patient",
    "write_csv",
    "write_webdataset",
]
