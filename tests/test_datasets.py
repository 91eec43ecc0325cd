"""Readers of the providers' label files, on fixtures with the providers' exact headers."""

from __future__ import annotations

import csv
import io
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import mgll
from mgll.datasets import (
    CHEXPERT_CATEGORIES,
    CHEXPERT_HIERARCHY,
    CHEXPERT_OBSERVATIONS,
    MultiGranularCollate,
    apply_uncertainty,
    chestxray14_builder,
    chexpert_builder,
    read_chestxray14,
    read_chexpert,
    read_label_table,
    read_mimic_cxr,
)
from mgll.targets import from_multi_hot
from mgll.text import Granularity, MultiGranularTextBuilder

# ChestX-ray14 Data_Entry_2017.csv: the header as published, with its trailing comma.
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    '"00000002_000.png",No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,',
    "00000003_000.png,Hernia|Pleural_Thickening|Hernia,0,3,81,F,AP,2582,2991,0.143,0.143,",
]
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS)
CHEXPERT_ROWS = [
    # No Finding 1.0, Pneumonia uncertain, Support Devices 1.0 (as in the first row of train.csv)
    "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
    "1.0,,,,,,,,,0.0,,,,1.0",
    # Cardiomegaly 1.0, Edema -1.0, Pleural Effusion -1.0, a quoted path, lateral (AP/PA blank)
    '"CheXpert-v1.0/train/patient00002/study2/view2_lateral.jpg",Female,87,Lateral,,'
    ",,1.0,,,-1.0,,,,,-1.0,,,",
    # Pneumonia 1.0 (implies Consolidation and Lung Opacity), Fracture 0.0
    "CheXpert-v1.0/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,PA,"
    "0.0,,,,,,,1.0,,,,,0.0,",
]


def write(tmp_path, name, header, rows, *, bom=False, newline="\n"):
    text = newline.join([header, *rows]) + newline
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize(("bom", "newline"), [(False, "\n"), (True, "\r\n")])
def test_chestxray14_reads_the_published_format(tmp_path, bom, newline):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS, bom=bom, newline=newline)
    annotations = list(read_chestxray14(path, root="images"))
    assert [a["image"] for a in annotations] == [
        "images/00000001_000.png",
        "images/00000001_001.png",
        "images/00000002_000.png",
        "images/00000003_000.png",
    ]
    assert [a["finding"] for a in annotations] == [
        ["Cardiomegaly"],
        ["Cardiomegaly", "Emphysema"],
        [],  # No Finding: no positive, not a class
        ["Hernia", "Pleural_Thickening"],
    ]
    first = annotations[0]
    assert first["Patient Age"] == "58" and first["View Position"] == "PA"
    assert first["OriginalImage[Width"] == "2682" and first["Height]"] == "2749"
    assert first["OriginalImagePixelSpacing[x"] == "0.143" and first["y]"] == "0.143"
    assert first["uncertain"] == [] and "" not in first
    assert annotations[2]["description"] == "A chest X-ray with no finding."
    assert annotations[3]["description"] == "A chest X-ray showing hernia and pleural thickening."


def test_chestxray14_no_finding_as_a_class_when_not_null(tmp_path):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS)
    annotations = list(read_chestxray14(path, null_labels=()))
    assert annotations[2]["finding"] == ["No Finding"]
    batch = chestxray14_builder(null_labels=()).build(annotations, label_format="multi_hot")
    assert batch["finding"].classes[-1] == "No Finding"
    assert batch["finding"].labels[:, -1].tolist() == [False, False, True, False]


def test_chestxray14_through_builder_and_collate(tmp_path):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS)
    items = [(torch.zeros(3), a) for a in read_chestxray14(path)]
    _, batch = MultiGranularCollate(chestxray14_builder())(items)
    finding = batch["finding"]
    assert finding.labels.shape == (4, 14) and finding.labels.dtype == torch.float32
    assert finding.labels[2].sum() == 0  # No Finding: a pure negative
    assert finding.texts[2] == "a chest X-ray with no finding"
    features = batch.encode(lambda s: torch.randn(len(s), 8))
    image = torch.randn(4, 8, requires_grad=True)
    mgll.MGLLLoss()(image, features, torch.tensor(10.0), **batch.loss_kwargs()).backward()
    assert torch.isfinite(image.grad).all()


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([*NIH_ROWS[:1], "00000001_000.png,Edema,0,1,58,M,PA,1,1,1,1,"], r"line 3, column 'Image Index': '00000001_000.png' repeats line 2"),
        (["00000001_000.png,Cardiomegaly|Pneumonnia,0,1,58,M,PA,1,1,1,1,"], r"line 2, column 'Finding Labels': unknown label\(s\) \['Pneumonnia'\]"),
        ([",Edema,0,1,58,M,PA,1,1,1,1,"], r"line 2, column 'Image Index': the id is blank"),
        (["00000001_000.png,Edema,0,1"], r"line 2 has 4 fields .* truncated"),
        (["00000001_000.png,Edema,0,1,58,M,PA,1,1,1,1,,oops"], r"line 2 has 13 fields .* extra value"),
    ],
)  # fmt: skip
def test_chestxray14_bad_rows_name_file_line_and_column(tmp_path, rows, match):
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, rows)
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: " + match):
        list(read_chestxray14(path))


def test_missing_column_is_reported_when_called(tmp_path):
    path = write(
        tmp_path, "Data_Entry_2017.csv", NIH_HEADER.replace("Finding Labels", "Labels"), []
    )
    with pytest.raises(
        ValueError, match=r"Data_Entry_2017\.csv: the header lacks .*'Finding Labels'.*present"
    ):
        read_chestxray14(path)  # no iteration needed
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: the file is empty"):
        read_chexpert(empty)


EXPECTED_FINDING = {
    "U-Ignore": [["Support Devices"], ["Cardiomegaly"], ["Pneumonia"]],
    "U-Zeros": [["Support Devices"], ["Cardiomegaly"], ["Pneumonia"]],
    "U-Ones": [
        ["Pneumonia", "Support Devices"],
        ["Cardiomegaly", "Edema", "Pleural Effusion"],
        ["Pneumonia"],
    ],
    "U-Soft": [
        {"Pneumonia": 0.25, "Support Devices": 1.0},
        {"Cardiomegaly": 1.0, "Edema": 0.25, "Pleural Effusion": 0.25},
        {"Pneumonia": 1.0},
    ],
}


def chexpert_rows():
    rows = list(CHEXPERT_ROWS)
    rows[0] = rows[0].replace("1.0,,,,,,,,,0.0", "1.0,,,,,,,-1.0,,0.0")  # Pneumonia uncertain
    return rows


@pytest.mark.parametrize("policy", list(EXPECTED_FINDING))
def test_chexpert_uncertainty_policies(tmp_path, policy):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows(), bom=True, newline="\r\n")
    annotations = list(read_chexpert(path, uncertainty=policy, soft_weight=0.25))
    assert [a["finding"] for a in annotations] == EXPECTED_FINDING[policy]
    assert [a["uncertain"] for a in annotations] == [
        ["Pneumonia"],
        ["Edema", "Pleural Effusion"],
        [],
    ]
    assert annotations[1]["image"] == "CheXpert-v1.0/train/patient00002/study2/view2_lateral.jpg"
    assert annotations[1]["AP/PA"] == "" and annotations[1]["Frontal/Lateral"] == "Lateral"
    assert annotations[1]["description"] == (
        "A chest X-ray showing cardiomegaly; possibly edema and pleural effusion."
    )


def test_chexpert_categories_follow_the_hierarchy(tmp_path):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows())
    soft = list(read_chexpert(path, uncertainty="U-Soft"))
    assert soft[1]["category"] == {
        "Enlarged Cardiomediastinum": 1.0,
        "Lung Opacity": 0.5,
        "Pleural Effusion": 0.5,
    }
    assert list(read_chexpert(path))[2]["category"] == ["Lung Opacity"]
    assert CHEXPERT_HIERARCHY.ancestors("Pneumonia") == ("Consolidation", "Lung Opacity")
    assert CHEXPERT_HIERARCHY.ancestors("Cardiomegaly") == ("Enlarged Cardiomediastinum",)
    assert set(CHEXPERT_CATEGORIES) == {
        "Enlarged Cardiomediastinum",
        "Lung Opacity",
        "Pneumothorax",
        "Pleural Effusion",
        "Pleural Other",
        "Fracture",
        "Support Devices",
    }


@pytest.mark.parametrize(
    ("policy", "label_format", "expected"),
    [
        ("U-Zeros", "multi_hot", [0.0, 0.0, 0.0]),
        ("U-Ones", "multi_hot", [1.0, 1.0, 1.0]),
        ("U-Soft", "soft", [0.25, 0.25, 0.25]),
    ],
)
def test_chexpert_labels_reach_the_collate(tmp_path, policy, label_format, expected):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows())
    items = [(torch.zeros(2), a) for a in read_chexpert(path, uncertainty=policy, soft_weight=0.25)]
    collate = MultiGranularCollate(chexpert_builder(), label_format=label_format)
    _, batch = collate(items)
    finding = batch["finding"]
    assert finding.labels.shape == (3, 13)
    column = {c: j for j, c in enumerate(finding.classes)}
    row0 = finding.labels[0].float()
    # sample 0: Pneumonia uncertain, so Consolidation and Lung Opacity at the same weight
    assert [float(row0[column[c]]) for c in ("Pneumonia", "Consolidation", "Lung Opacity")] == (
        expected
    )
    assert float(row0[column["Support Devices"]]) == 1.0
    assert batch["category"].labels.shape == (3, 7)
    assert batch["description"].texts[2] == "A chest X-ray showing pneumonia."


def _loss_or_skip(loss_fn, image, features, batch):
    try:
        return loss_fn(image, features, torch.tensor(10.0), **batch.loss_kwargs())
    except (TypeError, ValueError) as err:
        if "dtype" in str(err):
            pytest.skip(f"this build's loss does not take float labels yet: {err}")
        raise


@pytest.mark.parametrize("backend", ["reference", "fused", "tiled"])
@pytest.mark.parametrize("overlap", [None, "count", "jaccard"])
def test_soft_labels_of_zero_one_equal_bool_labels_in_the_loss(tmp_path, backend, overlap):
    """0/1 soft labels train exactly like bool multi-hot (active once the loss takes them)."""
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows())
    items = [(torch.zeros(2), a) for a in read_chexpert(path, uncertainty="U-Ones")]
    _, hard = MultiGranularCollate(chexpert_builder())(items)
    _, soft = MultiGranularCollate(chexpert_builder(), label_format="soft")(items)
    for h, s in zip(hard, soft, strict=True):
        assert s.labels.dtype == torch.float32 and torch.equal(s.labels, h.labels.float())
    features = hard.encode(lambda s: torch.randn(len(s), 8, dtype=torch.float64))
    image = torch.randn(3, 8, dtype=torch.float64)
    try:
        loss_fn = mgll.MGLLLoss(
            backend=backend, **({} if overlap is None else {"overlap": overlap})
        )
    except TypeError as err:
        pytest.skip(f"this build's MGLLLoss has no overlap rules yet: {err}")
    want = loss_fn(image, features, torch.tensor(10.0), **hard.loss_kwargs())
    got = _loss_or_skip(loss_fn, image, features, soft)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fused", "tiled"])
def test_u_soft_labels_reach_every_backend(tmp_path, backend):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows())
    items = [(torch.zeros(2), a) for a in read_chexpert(path, uncertainty="U-Soft")]
    _, batch = MultiGranularCollate(chexpert_builder(), label_format="soft")(items)
    assert 0.5 in batch["finding"].labels  # a fractional label is there
    features = batch.encode(lambda s: torch.randn(len(s), 8, dtype=torch.float64))
    image = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    want = _loss_or_skip(mgll.MGLLLoss(backend="reference"), image, features, batch)
    got = _loss_or_skip(mgll.MGLLLoss(backend=backend), image, features, batch)
    torch.testing.assert_close(got, want)
    (grad_want,) = torch.autograd.grad(want, image)
    (grad_got,) = torch.autograd.grad(got, image)
    torch.testing.assert_close(grad_got, grad_want)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (",,,,,,,2.0,,,,,,", r"line 2, column 'Pneumonia': unknown value '2.0'"),
        (",,,,,,,yes,,,,,,", r"line 2, column 'Pneumonia': unknown value 'yes'"),
    ],
)
def test_chexpert_unknown_values(tmp_path, row, match):
    rows = ["CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP," + row]
    path = write(tmp_path, "valid.csv", CHEXPERT_HEADER, rows)
    with pytest.raises(ValueError, match=r"valid\.csv: " + match + r".*-1\.0 \(uncertain\)"):
        list(read_chexpert(path))


def test_chexpert_accepts_integer_coding_and_duplicates_fail(tmp_path):
    rows = [CHEXPERT_ROWS[2].replace(",1.0,", ",1,"), CHEXPERT_ROWS[2]]
    path = write(tmp_path, "valid.csv", CHEXPERT_HEADER, rows)
    with pytest.raises(ValueError, match=r"line 3, column 'Path': .* repeats line 2"):
        list(read_chexpert(path))
    assert next(read_chexpert(path))["finding"] == ["Pneumonia"]


def test_chexpert_bad_policy():
    with pytest.raises(ValueError, match=r"`uncertainty` must be one of .*U-Soft.*got 'U-Half'"):
        read_chexpert(io.StringIO(CHEXPERT_HEADER), uncertainty="U-Half")
    with pytest.raises(ValueError, match=r"`soft_weight` must be a number in \(0, 1\)"):
        apply_uncertainty({}, "soft", soft_weight=1.5)


MIMIC_LABELS = "subject_id,study_id," + ",".join(sorted(CHEXPERT_OBSERVATIONS))
MIMIC_META = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
# sorted: Atelectasis, Cardiomegaly, Consolidation, Edema, Enlarged Cardiomediastinum, Fracture,
# Lung Lesion, Lung Opacity, No Finding, Pleural Effusion, Pleural Other, Pneumonia,
# Pneumothorax, Support Devices
MIMIC_LABEL_ROWS = [
    "10000032,50414267,,,,,,,,,1.0,,,,,",
    "10000032,53189527,,1.0,,-1.0,,,,,,,,,,",
]
MIMIC_META_ROWS = [
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,"
    "2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,"
    "3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),PA,3056,"
    "2544,21800626,165500.312,CHEST (PA AND LAT),postero-anterior,Erect",
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000032,56699142,CHEST (PORTABLE AP),AP,3056,"
    "2544,21800723,80556.875,CHEST (PORTABLE AP),antero-posterior,",
]


def test_mimic_studies_and_images(tmp_path):
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS, MIMIC_LABEL_ROWS)
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, MIMIC_META_ROWS)
    studies = list(read_mimic_cxr(labels, uncertainty="U-Ones"))
    assert [(s["study_id"], s["image"], s["finding"]) for s in studies] == [
        ("50414267", None, []),
        ("53189527", None, ["Cardiomegaly", "Edema"]),
    ]
    images = list(read_mimic_cxr(labels, meta, root="/data/mimic-cxr-jpg"))
    assert len(images) == 3  # study 56699142 has no label row: skipped
    assert images[2]["image"] == (
        "/data/mimic-cxr-jpg/files/p10/p10000032/s53189527/"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"
    )
    assert images[2]["finding"] == ["Cardiomegaly"] and images[2]["uncertain"] == ["Edema"]
    assert images[1]["ViewPosition"] == "LATERAL" and images[1]["study_id"] == "50414267"
    frontal = list(read_mimic_cxr(labels, meta, views=["PA", "AP"]))
    assert [a["dicom_id"][:8] for a in frontal] == ["02aa804e", "2a2277a9"]


def test_mimic_bad_files(tmp_path):
    labels = write(tmp_path, "mimic-cxr-2.0.0-negbio.csv", MIMIC_LABELS, MIMIC_LABEL_ROWS * 2)
    with pytest.raises(
        ValueError, match=r"negbio\.csv: line 4, column 'study_id': '50414267' repeats line 2"
    ):
        list(read_mimic_cxr(labels))
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS, MIMIC_LABEL_ROWS)
    wrong = [MIMIC_META_ROWS[0].replace(",10000032,", ",10000033,")]
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, wrong)
    with pytest.raises(
        ValueError,
        match=r"metadata\.csv: line 2, column 'subject_id': study 50414267 belongs to subject 10000032",
    ):
        list(read_mimic_cxr(labels, meta))
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, MIMIC_META_ROWS[:1] * 2)
    with pytest.raises(ValueError, match=r"line 3, column 'dicom_id': .* repeats line 2"):
        list(read_mimic_cxr(labels, meta))
    meta = write(tmp_path, "meta.csv", "dicom_id,study_id", [])
    with pytest.raises(ValueError, match=r"meta\.csv: the header lacks .*'subject_id'"):
        read_mimic_cxr(labels, meta)


def test_generic_reader_for_fundus_and_midrc_style_exports():
    fundus = io.StringIO(
        "ImageID,Disease,Description,Keyword\r\n"
        '1.jpg,"DR,DME","moderate NPDR, hard exudates",exudates\r\n'
        "2.jpg,Normal,a healthy fundus,\r\n"
    )
    rows = list(read_label_table(
        fundus, image="ImageID", labels="Disease", separator=",", null_labels=["Normal"],
        texts=["Description", "Keyword"],
    ))  # fmt: skip
    assert rows[0]["Disease"] == ["DR", "DME"] and rows[1]["Disease"] == []
    assert rows[0]["Description"] == "moderate NPDR, hard exudates"
    batch = MultiGranularTextBuilder.mgll_fundus(("disease", "description")).build(rows)
    assert batch["disease"].texts[1] == ""  # the builder's missing_text
    midrc = io.StringIO(
        "image_path,modality,study_description_0,series_description,covid19_positive\n"
        "a.dcm,CR,XR CHEST AP PORTABLE,AP,1\n"
        "b.dcm,DX,XR CHEST PA AND LATERAL,PA,0\n"
    )
    rows = list(read_label_table(
        midrc, image="image_path", labels=["covid19_positive"], label_key="covid",
        texts=["modality", "study_description_0", "series_description"],
    ))  # fmt: skip
    assert [r["covid"] for r in rows] == [["covid19_positive"], []]
    batch = MultiGranularTextBuilder.midrc().build(rows)
    assert batch["modality"].texts == ("This is a CR image.", "This is a DX image.")


def test_generic_reader_streams_lazily():
    rows = read_label_table(io.StringIO("img,y\na,1\nb,2.0\n"), image="img", labels=["y"])
    assert next(rows)["labels"] == ["y"]  # the bad second row is not parsed yet
    with pytest.raises(ValueError, match=r"line 3, column 'y': unknown value '2.0'"):
        next(rows)


def test_a_required_field_absent_from_the_whole_batch_is_an_error():
    builder = MultiGranularTextBuilder([Granularity("finding", key="findings", required=True)])
    with pytest.raises(
        ValueError,
        match=r"granularity 'finding' reads the field 'findings', which no annotation .* fields present: \['finding', 'image'\]",
    ):
        builder.build([{"image": "a", "finding": ["Edema"]}, {"image": "b", "finding": []}])
    optional = MultiGranularTextBuilder([Granularity("finding", key="findings")])
    batch = optional.build([{"findings": ["Edema"]}, {}])  # not required: not annotated
    assert batch["finding"].texts == ("Edema", "")
    assert batch["finding"].labels[1].isnan().all()


def test_soft_weights_expand_to_ancestors_with_the_largest_weight():
    builder = MultiGranularTextBuilder(
        [Granularity("finding", classes=CHEXPERT_OBSERVATIONS[1:])],
        {"finding": CHEXPERT_HIERARCHY},
    )
    batch = builder.build([{"finding": {"Pneumonia": 0.5, "Edema": 1.0}}], label_format="soft")
    labels = dict(zip(batch["finding"].classes, batch["finding"].labels[0].tolist(), strict=True))
    assert labels["Pneumonia"] == labels["Consolidation"] == 0.5
    assert labels["Lung Opacity"] == 1.0 and labels["Edema"] == 1.0
    assert sum(labels.values()) == 3.0
    with pytest.raises(ValueError, match=r"maps label 'Edema' to weight 1.5"):
        builder.build([{"finding": {"Edema": 1.5}}])
    with pytest.raises(ValueError, match=r"label_format='ids'.* use 'soft'"):
        builder.build([{"finding": {"Edema": 0.5}}], label_format="ids")


LABELS = st.sampled_from(["DR", "DME", "AMD", "glaucoma", "No Finding"])
TEXT = st.text(st.sampled_from('ab ,"\n\u00e9'), max_size=12)


@given(
    st.lists(st.tuples(st.lists(LABELS, max_size=3), TEXT), min_size=1, max_size=6),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)
def test_generic_reader_round_trips_whatever_csv_writes(rows, newline, bom):
    """Quoted commas, quotes and line breaks inside fields survive; labels keep file order."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(["image", "labels", "note"])
    for i, (labels, note) in enumerate(rows):
        writer.writerow([f"{i}.png", "|".join(labels), note])
    text = ("\ufeff" if bom else "") + out.getvalue()
    path = io.StringIO(text, newline="")  # a decoded stream keeps the BOM: the reader drops it
    got = list(read_label_table(
        path, image="image", labels="labels", separator="|", null_labels=["No Finding"],
        texts={"note": "note"},
    ))  # fmt: skip
    assert [a["image"] for a in got] == [f"{i}.png" for i in range(len(rows))]
    for a, (labels, note) in zip(got, rows, strict=True):
        assert a["labels"] == [x for x in dict.fromkeys(labels) if x != "No Finding"]
        assert a["note"] == note.strip()


def test_chexpert_soft_labels_through_dataloader_workers(tmp_path):
    path = write(tmp_path, "train.csv", CHEXPERT_HEADER, chexpert_rows())
    items = [(torch.zeros(2), a) for a in read_chexpert(path, uncertainty="U-Soft")]
    collate = MultiGranularCollate(chexpert_builder(), label_format="soft")
    loader = DataLoader(items, batch_size=3, num_workers=2, collate_fn=collate)
    (_, batch) = next(iter(loader))
    assert torch.equal(batch["finding"].labels, collate(items)[1]["finding"].labels)
    assert sorted(set(batch["finding"].labels.flatten().tolist())) == [0.0, 0.5, 1.0]


def test_datasets_import_nothing_from_the_loss_layers():
    """Data files -> annotations -> texts and labels -> loss: the data layer never imports the loss."""
    import ast
    from pathlib import Path

    forbidden = (
        "mgll.loss",
        "mgll.functional",
        "mgll.backends",
        "mgll.targets",
        "mgll._terms",
        "mgll.targets.cooc",
        "mgll._problem",
        "mgll.evaluation.zeroshot",
        "mgll.distributed",
    )
    folder = Path(mgll.datasets.__file__).parent
    for source in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{source.name} imports {bad}"


# ---------------------------------------------------------------- views, patients, defects


def test_views_and_patient_ids_on_every_reader(tmp_path):
    nih = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS)
    assert [(a["view"], a["patient_id"]) for a in read_chestxray14(nih)] == [
        ("PA", "1"),
        ("PA", "1"),
        ("PA", "2"),
        ("AP", "3"),
    ]
    assert [a["image"] for a in read_chestxray14(nih, views=["AP"])] == ["00000003_000.png"]
    chex = write(tmp_path, "train.csv", CHEXPERT_HEADER, CHEXPERT_ROWS)
    assert [(a["view"], a["patient_id"]) for a in read_chexpert(chex)] == [
        ("AP", "00001"),
        ("LATERAL", "00002"),
        ("PA", "00003"),
    ]
    frontal = read_chexpert(chex, views=["frontal"])
    assert [a["patient_id"] for a in frontal] == ["00001", "00003"]
    assert frontal.counts["skipped_view"] == 1
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS, MIMIC_LABEL_ROWS)
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, MIMIC_META_ROWS)
    images = list(read_mimic_cxr(labels, meta, views=["lateral"]))
    assert [(a["view"], a["patient_id"]) for a in images] == [("LATERAL", "10000032")]
    for call in (
        lambda: read_chestxray14(nih, views=["Frontal/PA"]),
        lambda: read_chexpert(chex, views=["side"]),
        lambda: read_mimic_cxr(labels, meta, views=["LL"]),
    ):
        with pytest.raises(ValueError, match=r"`views` holds the unknown view .* expected views"):
            call()
    with pytest.raises(ValueError, match=r"`views` needs `metadata_path`"):
        read_mimic_cxr(labels, views=["PA"])


def test_chestxray14_unquoted_comma_in_finding_labels_names_the_line(tmp_path):
    shifted = "00000004_000.png,Effusion,Mass,0,4,60,F,PA,2048,2500,0.168,0.168,"
    path = write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, [NIH_ROWS[0], shifted])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: line 3 .* unnamed column 12"):
        list(read_chestxray14(path))


def test_non_utf8_bytes_name_file_and_line_and_long_fields_read(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"img,report\na.png,fine\nb.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"table\.csv: line 3 is not UTF-8 text"):
        list(read_label_table(path, image="img", labels="report"))
    report = "x" * (200 * 1024)  # over the csv module's 128 KiB default field limit
    path.write_text(f"img,report\na.png,{report}\n", encoding="utf-8")
    (row,) = read_label_table(path, image="img", labels=[], texts=["report"])
    assert row["report"] == report


def test_mimic_join_counts_and_an_empty_join_is_an_error(tmp_path):
    rows = [*MIMIC_LABEL_ROWS, "10000033,59999999,,,,,,,,,1.0,,,,,"]  # a study without image
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS, rows)
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, MIMIC_META_ROWS)
    joined = read_mimic_cxr(labels, meta)
    assert len(list(joined)) == 3
    assert joined.counts["unmatched_images"] == 1 and joined.counts["unmatched_studies"] == 1
    none = write(tmp_path, "meta-none.csv", MIMIC_META, MIMIC_META_ROWS[3:])
    with pytest.raises(ValueError, match=r"meta-none\.csv: none of its 1 images belongs to one"):
        list(read_mimic_cxr(labels, none))


def test_mimic_float_formatted_ids_are_normalised_or_rejected(tmp_path):
    rows = [r.replace("10000032,5", "10000032.0,5", 1) for r in MIMIC_LABEL_ROWS]
    labels = write(tmp_path, "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABELS, rows)
    meta_rows = [
        r.replace(",10000032,50414267,", ",10000032.0,50414267.0,") for r in MIMIC_META_ROWS
    ]
    meta = write(tmp_path, "mimic-cxr-2.0.0-metadata.csv", MIMIC_META, meta_rows)
    images = list(read_mimic_cxr(labels, meta))
    assert images[0]["image"].startswith("files/p10/p10000032/s50414267/")
    assert images[0]["study_id"] == "50414267" and images[0]["patient_id"] == "10000032"
    bad = write(tmp_path, "bad.csv", MIMIC_LABELS, ["1e7,50414267,,,,,,,,,1.0,,,,,"])
    with pytest.raises(ValueError, match=r"line 2, column 'subject_id': expected an integer id"):
        list(read_mimic_cxr(bad))


def test_chexpert_root_inside_the_release_folder_is_not_doubled(tmp_path):
    chex = write(tmp_path, "train.csv", CHEXPERT_HEADER, CHEXPERT_ROWS)
    inside = [a["image"] for a in read_chexpert(chex, root="/data/CheXpert-v1.0")]
    above = [a["image"] for a in read_chexpert(chex, root="/data")]
    assert inside == above
    assert inside[0] == "/data/CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"


@pytest.mark.parametrize("image", ["../../outside/x.png", "/etc/x.png", "a/../../x.png"])
def test_image_paths_stay_inside_root(tmp_path, image):
    path = write(tmp_path, "t.csv", "img,y", ["ok.png,1", f"{image},1"])
    with pytest.raises(ValueError, match=r"t\.csv: line 3, column 'img': the image path .*root"):
        list(read_label_table(path, image="img", labels="y", root="images"))
    kept = list(
        read_label_table(path, image="img", labels="y", root="images", allow_outside_root=True)
    )
    assert len(kept) == 2
    assert [a["image"] for a in read_label_table(path, image="img", labels="y")][1] == image


def test_contradictory_rows_are_counted(tmp_path):
    nih_rows = [*NIH_ROWS, "00000005_000.png,No Finding|Mass,0,5,60,F,PA,2048,2500,0.168,0.168,"]
    nih = read_chestxray14(write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, nih_rows))
    assert list(nih)[-1]["finding"] == ["Mass"] and nih.counts["contradictions"] == 1
    rows = [
        *CHEXPERT_ROWS,  # the first: No Finding with Support Devices only, allowed
        # No Finding 1.0 with Edema 1.0; then Pneumonia 1.0 under Lung Opacity 0.0
        "CheXpert-v1.0/train/patient00004/study1/view1_frontal.jpg,Male,41,Frontal,PA,"
        "1.0,,,,,1.0,,,,,,,,",
        "CheXpert-v1.0/train/patient00005/study1/view1_frontal.jpg,Male,41,Frontal,PA,"
        ",,,0.0,,,,1.0,,,,,,",
    ]
    chex = read_chexpert(write(tmp_path, "train.csv", CHEXPERT_HEADER, rows))
    assert len(list(chex)) == 5 and chex.counts["contradictions"] == 2
    assert chex.counts["rows"] == chex.counts["kept"] == 5


def test_u_ignore_masks_uncertain_findings_in_the_builder(tmp_path):
    nan = float("nan")
    chex = write(tmp_path, "train.csv", CHEXPERT_HEADER, CHEXPERT_ROWS)
    annotations = list(read_chexpert(chex))  # U-Ignore
    assert annotations[1]["unknown"] == {
        "finding": ["Edema", "Pleural Effusion"],
        "category": ["Lung Opacity", "Pleural Effusion"],
    }
    _, batch = MultiGranularCollate(chexpert_builder())([(torch.zeros(1), a) for a in annotations])
    finding = dict(zip(batch["finding"].classes, batch["finding"].labels[1].tolist(), strict=True))
    assert finding["Cardiomegaly"] == 1 and finding["Enlarged Cardiomediastinum"] == 1
    for x in ("Edema", "Pleural Effusion", "Lung Opacity"):  # Lung Opacity: up from Edema
        assert finding[x] != finding[x], x  # NaN
    assert finding["Fracture"] == 0 and finding["Pneumonia"] == 0
    category = dict(
        zip(batch["category"].classes, batch["category"].labels[1].tolist(), strict=True)
    )
    assert category["Enlarged Cardiomediastinum"] == 1 and category["Fracture"] == 0
    assert category["Lung Opacity"] != category["Lung Opacity"]
    assert not batch["finding"].labels[[0, 2]].isnan().any()  # no uncertain finding there
    ones = list(read_chexpert(chex, uncertainty="U-Ones"))
    assert "unknown" not in ones[1]  # the other policies resolve uncertainty themselves
    torch.testing.assert_close(
        torch.tensor([finding["Edema"]]), torch.tensor([nan]), equal_nan=True
    )


def test_no_finding_descriptions_are_not_positives_of_each_other(tmp_path):
    nih = list(read_chestxray14(write(tmp_path, "Data_Entry_2017.csv", NIH_HEADER, NIH_ROWS * 1)))
    healthy = [nih[2], {**nih[2], "image": "other.png"}, nih[0]]
    description = chestxray14_builder().build(healthy)["description"]
    assert description.texts[:2] == ("A chest X-ray with no finding.",) * 2
    assert description.labels[:2].sum() == 0  # annotated, no positive: a pure negative
    assert description.labels[2].sum() == 1
    pairs = from_multi_hot(description.labels)  # the loss's pair rule ("any" overlap)
    assert pairs[0, 1] == 0 and pairs[1, 0] == 0 and pairs[2, 2] == 1
    assert not description.labels.isnan().any()  # a known negative pair, not an unknown one
    for preset in (chexpert_builder(["description"]), chestxray14_builder(["description"])):
        labels = preset.build(healthy, label_format="multi_hot")["description"].labels
        assert from_multi_hot(labels)[0, 1] == 0


# ------------------------------------------------- the cached label decoder against the rules

SPELLINGS = {  # every spelling of a value, the usual ones first, with what it means
    "": None, "1.0": 1, "0.0": 0, "-1.0": -1, "1": 1, "0": 0, "-1": -1,
    " 1.0": 1, "0.0 ": 0, "1.00": 1, "-0.0": 0, "1e0": 1, "-1.000": -1,
}  # fmt: skip


def _reference_chexpert(cells, policy):
    """An annotation's label fields from its 14 cells, by the documented rules alone."""
    from mgll.datasets.chexpert import contradicts, level_fields

    values = {x: SPELLINGS[c] for x, c in zip(CHEXPERT_OBSERVATIONS, cells, strict=True)}
    finding, uncertain = apply_uncertainty(values, policy, 0.5, ["No Finding"])
    part = {"finding": finding, "uncertain": uncertain}
    if uncertain and policy == "U-Ignore":
        part["unknown"] = {"finding": list(uncertain)}
    return {**part, **level_fields(part)}, contradicts(values)


@pytest.mark.parametrize("policy", ["U-Ignore", "U-Soft", "U-Ones"])
def test_chexpert_cached_decoder_equals_the_rules_on_every_spelling(tmp_path, policy):
    import random

    rng = random.Random(0)
    spellings = list(SPELLINGS)
    rows, cells_of = [], []
    for i in range(3000):  # each spelling in each column, then random rows (repeats included)
        if i < 14 * len(spellings):
            cells = [""] * 14
            cells[i % 14] = spellings[i // 14]
        else:
            cells = [rng.choice(spellings[:7] * 6 + spellings[7:]) for _ in range(14)]
        if i % 5 == 0 and i >= 14 * len(spellings):
            cells[3] = rng.choice(("0.0", "0"))  # Lung Opacity negative: contradictions
        cells_of.append(cells)
        rows.append(f"CheXpert-v1.0/train/patient{i:05d}/study1/view1_frontal.jpg,Male,40,"
                    "Frontal,AP," + ",".join(cells))  # fmt: skip
    reader = read_chexpert(write(tmp_path, "train.csv", CHEXPERT_HEADER, rows), uncertainty=policy)
    got = list(reader)
    contradictions = 0
    for a, cells in zip(got, cells_of, strict=True):
        want, contradiction = _reference_chexpert(cells, policy)
        assert {k: a[k] for k in want} == want, cells
        assert [k for k in a if k in want or k == "view"] == [
            k for k in ("finding", "uncertain", "unknown", "view", "category", "description")
            if k in want or k == "view"
        ]  # fmt: skip
        contradictions += contradiction
    assert reader.counts["contradictions"] == contradictions > 0
    got[0]["uncertain"].append("changed")  # the cached fields are never shared
    assert all(a["uncertain"] is not got[0]["uncertain"] for a in got[1:])
    assert all(a["category"] is not got[0]["category"] for a in got[1:])


@pytest.mark.parametrize("bad", ["2.0", "yes", "1.0.0", "nan", "+"])
@pytest.mark.parametrize("column", [0, 7, 13])
def test_chexpert_cached_decoder_rejects_bad_values_by_column(tmp_path, bad, column):
    cells = ["1.0", "", "0.0", "-1.0"] * 3 + ["1", ""]
    good = "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Male,40,Frontal,AP,"
    cells[column] = bad
    rows = [good + ",".join(["1.0", "", "0.0", "-1.0"] * 3 + ["1", ""]),
            good.replace("00001", "00002") + ",".join(cells)]  # fmt: skip
    name = CHEXPERT_OBSERVATIONS[column]
    with pytest.raises(
        ValueError, match=rf"line 3, column '{name}': unknown value '{re.escape(bad)}'"
    ):
        list(read_chexpert(write(tmp_path, "train.csv", CHEXPERT_HEADER, rows)))
