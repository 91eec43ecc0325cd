"""Merging sources: the label map, NaN for what a source does not annotate, splits, exports."""

from __future__ import annotations

import csv
import json
import math
import tarfile
from pathlib import Path

import pytest

from mgll.datasets import (
    CHEST_X_RAY_LABEL_MAP,
    LabelMap,
    SourceLabels,
    merge_sources,
    open_clip_config,
    patient_of,
    read_chestxray14,
    read_chexpert,
    read_mimic_cxr,
    read_split_list,
    split_by_list,
    split_by_patient,
    write_csv,
    write_webdataset,
)
from mgll.text import Granularity

FIXTURES = Path(__file__).parent / "fixtures" / "merge"


def readers(uncertainty="U-Ignore"):
    return {
        "chestxray14": read_chestxray14(FIXTURES / "Data_Entry_2017.csv", root="images"),
        "chexpert": read_chexpert(FIXTURES / "train.csv", uncertainty=uncertainty),
        "mimic_cxr": read_mimic_cxr(
            FIXTURES / "mimic-cxr-2.0.0-chexpert.csv",
            FIXTURES / "mimic-cxr-2.0.0-metadata.csv",
            uncertainty=uncertainty,
        ),
    }


def merged(policy="U-Ignore"):
    return merge_sources(readers(), uncertainty=policy)


def test_union_classes_map_effusion_and_keep_the_rest_apart():
    finding = CHEST_X_RAY_LABEL_MAP.classes("finding")
    assert len(finding) == 20  # 13 CheXpert findings + 7 ChestX-ray14 ones without counterpart
    assert "Effusion" not in finding and finding.count("Pleural Effusion") == 1
    assert finding[13:] == (
        "Infiltration",
        "Mass",
        "Nodule",
        "Emphysema",
        "Fibrosis",
        "Pleural Thickening",
        "Hernia",
    )
    assert CHEST_X_RAY_LABEL_MAP.granularities == ("category", "finding")
    assert CHEST_X_RAY_LABEL_MAP["chestxray14"].union("category") == ()


def test_merge_renames_tags_and_marks_unannotated_classes_nan():
    m = merged()
    assert len(m) == 6 + 4 + 4
    sources = [a["source"] for a in m]
    assert sources == ["chestxray14"] * 6 + ["chexpert"] * 4 + ["mimic_cxr"] * 4
    finding, classes = m.labels("finding"), m.classes["finding"]
    col = {c: j for j, c in enumerate(classes)}
    # ChestX-ray14 row 3: Effusion|Mass -> Pleural Effusion, Mass; CheXpert-only classes NaN
    assert m[3]["finding"] == ["Pleural Effusion", "Mass"]
    assert finding[3, col["Pleural Effusion"]] == 1 and finding[3, col["Mass"]] == 1
    assert math.isnan(finding[3, col["Fracture"]]) and finding[3, col["Hernia"]] == 0
    # a CheXpert row: the ChestX-ray14-only classes are unknown, the others known
    assert math.isnan(finding[9, col["Hernia"]]) and finding[9, col["Fracture"]] == 0
    assert finding[9, col["Pneumonia"]] == 1
    # ChestX-ray14 does not annotate the category granularity: a NaN row, the field None
    category = m.labels("category")
    # the CheXpert / MIMIC rows are annotated there (an uncertain finding under U-Ignore leaves
    # its category unknown, so single entries may be NaN, never a whole row)
    assert bool(category[:6].isnan().all()) and not bool(category[6:].isnan().all(1).any())
    assert m[0]["category"] is None and m[6]["category"] == ["Support Devices"]
    assert m[2]["finding"] == [] and int(finding[2].isnan().sum()) == 6


@pytest.mark.parametrize(
    "policy, edema",
    [("U-Ignore", math.nan), ("U-Zeros", 0.0), ("U-Ones", 1.0), ("U-Soft", 0.5), (None, math.nan)],
)
def test_uncertain_kept_apart_until_the_policy(policy, edema):
    m = merged(policy)
    col = m.classes["finding"].index("Edema")
    value = float(m.labels("finding")[7, col])  # CheXpert patient 2: Edema -1.0
    assert (math.isnan(value) and math.isnan(edema)) or value == edema
    assert m[7]["uncertain"] == {"finding": ["Edema", "Pleural Effusion"]}
    absent = m[7]["unknown"]["finding"]
    # unknown only under U-Ignore, the readers' default when the merge applies no policy
    assert ("Edema" in absent) == (policy in ("U-Ignore", None))


def test_summary_counts_what_each_source_contributed():
    summary = merged().summary()
    assert summary["chestxray14"]["images"] == 6 and summary["chestxray14"]["patients"] == 4
    assert summary["chestxray14"]["granularities"] == {"finding": 14}
    assert summary["chexpert"]["granularities"] == {"category": 7, "finding": 13}
    assert summary["chexpert"]["uncertain"] == 4 and summary["mimic_cxr"]["patients"] == 2
    lines = str(summary).splitlines()
    assert lines[0].split() == [
        "source",
        "images",
        "patients",
        "category",
        "(7)",
        "finding",
        "(20)",
    ]
    assert lines[1].split() == ["chestxray14", "6", "4", "-", "14"]


def test_own_map_with_a_coarse_only_source():
    label_map = LabelMap(
        {
            "fine": SourceLabels({"disease": ["DR", "AMD"], "group": ["retina"]}),
            "coarse": SourceLabels({"group": ["retina", "lens"]}),
        }
    )
    m = merge_sources(
        {
            "fine": [{"image": "a.png", "disease": ["DR"], "group": ["retina"], "patient_id": 1}],
            "coarse": [{"image": "b.png", "group": ["lens"], "patient_id": 1}],
        },
        label_map,
    )
    assert m.classes == {"disease": ("DR", "AMD"), "group": ("retina", "lens")}
    disease, group = m.labels("disease"), m.labels("group")
    assert disease[0].tolist() == [1.0, 0.0] and bool(disease[1].isnan().all())
    assert group[0, 0] == 1 and math.isnan(group[0, 1]) and group[1].tolist() == [0.0, 1.0]
    assert [a["patient_id"] for a in m] == ["fine:1", "coarse:1"]  # two different patients


def test_merge_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"names \['midrc'\], which `label_map` does not know"):
        merge_sources({"midrc": []})
    with pytest.raises(ValueError, match=r"item 0, granularity 'finding': labels \['Fracture'\]"):
        merge_sources({"chestxray14": [{"image": "a.png", "finding": ["Fracture"]}]})
    with pytest.raises(TypeError, match="must be an iterable of annotation dicts"):
        merge_sources({"chexpert": 3})
    with pytest.raises(TypeError, match="must be a non-empty mapping"):
        merge_sources([])
    with pytest.raises(ValueError, match=r"`uncertainty` must be one of"):
        merge_sources({"chexpert": []}, uncertainty="U-Maybe")
    with pytest.raises(ValueError, match=r"`rename\['finding'\]` renames \['X'\]"):
        SourceLabels({"finding": ["A"]}, rename={"finding": {"X": "Y"}})
    with pytest.raises(ValueError, match="`granularity` must be one of"):
        merged().labels("findings")
    with pytest.raises(KeyError, match="with_source"):
        CHEST_X_RAY_LABEL_MAP["midrc"]


def test_patient_ids_from_every_provider():
    m = merged()
    assert [a["patient_id"] for a in m][:6] == ["chestxray14:" + p for p in "112334"]
    assert [a["patient_id"] for a in m][6:10] == [
        "chexpert:1",
        "chexpert:2",
        "chexpert:2",
        "chexpert:3",
    ]
    assert m[10]["patient_id"] == "mimic_cxr:10000032"
    assert patient_of({"image": "x/patient00042/study1/a.jpg"}) == "42"
    assert patient_of({"subject_id": "10000032", "image": "x/patient7/a.jpg"}) == "10000032"


def test_split_by_patient_keeps_patients_whole_and_is_deterministic():
    items = [
        {"patient_id": f"s:{p}", "finding": ["A"] if p < 4 else (["B"] if p < 12 else [])}
        for p in range(20)
        for _ in range(1 + p % 3)
    ]
    parts = split_by_patient(items, {"train": 0.5, "test": 0.5}, seed=3)
    again = split_by_patient(items, {"train": 0.5, "test": 0.5}, seed=3)
    assert {k: v for k, v in parts.items()} == {k: v for k, v in again.items()}
    owners = {}
    for name, part in parts.items():
        for a in part:
            assert owners.setdefault(a["patient_id"], name) == name
    assert sum(len(p) for p in parts.values()) == len(items)
    # A: 4 patients, 1+2+3+1 = 7 images; the rarest class is split first, patients whole
    total_a = sum(1 for a in items if a["finding"] == ["A"])
    assert parts.counts["train"]["A"] + parts.counts["test"]["A"] == total_a == 7
    assert abs(parts.counts["train"]["A"] - parts.counts["test"]["A"]) <= 3
    assert parts.patients["train"] + parts.patients["test"] == 20


def test_split_by_patient_across_merged_sources():
    parts = split_by_patient(merged(), {"train": 0.5, "test": 0.5}, seed=0)
    owner = {}
    for name, part in parts.items():
        for a in part:
            assert owner.setdefault(a["patient_id"], name) == name
    assert len(owner) == 4 + 3 + 2  # chestxray14:1 and chexpert:1 are different patients


def test_split_by_patient_errors():
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_patient([{"patient_id": "1"}], {"train": 0.5, "test": 0.6})
    with pytest.raises(ValueError, match=r"`annotations\[0\]` \(image 'a.png'\) has no patient id"):
        split_by_patient([{"image": "a.png"}])


def test_official_lists():
    cxr = list(read_chestxray14(FIXTURES / "Data_Entry_2017.csv", root="images"))
    lists = {
        "train_val": read_split_list(FIXTURES / "train_val_list.txt"),
        "test": read_split_list(FIXTURES / "test_list.txt"),
    }
    parts = split_by_list(cxr, lists)
    assert [a["image"] for a in parts["test"]] == [
        "images/00000003_000.png",
        "images/00000003_001.png",
    ]
    assert len(parts["train_val"]) == 4 and parts.patients == {"train_val": 3, "test": 1}
    valid = read_split_list(FIXTURES / "valid.csv")
    both = list(read_chexpert(FIXTURES / "train.csv", root="data")) + list(
        read_chexpert(FIXTURES / "valid.csv", root="data")
    )
    parts = split_by_list(both, {"valid": valid}, rest="train")
    assert [patient_of(a) for a in parts["valid"]] == ["64541"] and len(parts["train"]) == 4
    with pytest.raises(ValueError, match="in none of the lists"):
        split_by_list(cxr, {"test": lists["test"]})
    with pytest.raises(ValueError, match="listed in both 'a' and 'b'"):
        split_by_list(cxr, {"a": ["x.png"], "b": ["x.png"]})
    with pytest.raises(ValueError, match="patient 1 has images in both 'a' and 'b'"):
        split_by_list(cxr, {"a": ["00000001_000.png"], "b": ["00000001_001.png"]}, rest="c")


def test_write_csv_round_trips_through_the_launcher_reader(tmp_path):
    from mgll.integrations.image_table import ImageTableDataset

    m = merge_sources({"chestxray14": readers()["chestxray14"]})
    path = write_csv(m, tmp_path / "t.tsv", ["finding"], unknown="negative")
    with path.open() as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["filepath", "finding"]
    assert rows[3] == ["images/00000002_000.png", "|"]  # annotated, no finding
    assert rows[4] == ["images/00000003_000.png", "Pleural Effusion|Mass"]
    table = ImageTableDataset(path)
    gran = Granularity("finding", separator="|", classes=m.classes["finding"])
    assert gran.labels_of(table.annotations[3]) == ("Pleural Effusion", "Mass")
    assert gran.labels_of(table.annotations[2]) == ()
    with pytest.raises(ValueError, match=r"has 6 unknown class\(es\) at 'finding'"):
        write_csv(m, tmp_path / "t.csv", ["finding"])
    soft = merge_sources({"chexpert": readers()["chexpert"]}, uncertainty="U-Soft")
    with pytest.raises(ValueError, match="weights below 1 at 'finding'"):
        write_csv(soft, tmp_path / "t.csv", ["finding"], unknown="negative")


def test_write_webdataset_keeps_unknowns(tmp_path):
    from PIL import Image

    m = merged()
    for a in m:
        file = tmp_path / "img" / f"{abs(hash(a['image'])) % 10**8}.png"
        file.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(file)
        a["image"] = str(file)
    pattern = write_webdataset(m, tmp_path / "shards", ["category", "finding"], shards=2)
    assert pattern.endswith("train-{0..1}.tar")
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text()) == {
        "train-0.tar": 7,
        "train-1.tar": 7,
    }
    with tarfile.open(tmp_path / "shards" / "train-1.tar") as tar:
        sample = json.load(tar.extractfile("00000003.json"))  # ChestX-ray14 row 3
    assert sample["finding"] == ["Pleural Effusion", "Mass"] and sample["category"] is None
    assert len(sample["unknown"]["finding"]) == 6 and sample["source"] == "chestxray14"
    with pytest.raises(ValueError, match=r"`shards` must be an int in \[1, N=14\]"):
        write_webdataset(m, tmp_path / "s", ["finding"], shards=15)
    with pytest.raises(ValueError, match="is not a file"):
        write_webdataset([{"image": "nope.png"}], tmp_path / "s", ["finding"])


def test_open_clip_config_declares_the_union_classes():
    cfg = open_clip_config(merged().classes, ["category", "finding"], loss={"smooth_kl_weight": 0})
    grans = [Granularity(**g) for g in cfg["granularities"]]
    assert [g.name for g in grans] == ["category", "finding"]
    assert len(grans[1].classes) == 20 and cfg["loss"] == {"smooth_kl_weight": 0}
    with pytest.raises(ValueError, match=r"names \['description'\], not in `classes`"):
        open_clip_config(merged().classes, ["description"])
