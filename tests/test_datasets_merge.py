"""Merging sources: the label map, NaN for what a source does not annotate, splits, exports."""

from __future__ import annotations

import csv
import json
import math
import re
import tarfile
from pathlib import Path

import pytest

from mgll.datasets import (
    CHEST_X_RAY_LABEL_MAP,
    CompactAnnotations,
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


# A coarse-only source in a generic "one row per image" layout: only the CheXpert-style
# categories are annotated, so every finding of its images is unknown (a NaN row).
COARSE_CSV = (
    "image,category,patient\n"
    "coarse/0.png,Lung Opacity,c1\n"
    "coarse/1.png,Pleural Effusion|Lung Opacity,c2\n"
    "coarse/2.png,,c3\n"
    "coarse/3.png,Fracture,c4\n"
)
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Runs the launcher under torchrun and records, on every rank, what reached the loss.
RECORDING_LAUNCHER = """
import json, math, os, sys
import torch
from mgll.integrations import open_clip as flat
from mgll.integrations import open_clip_train

calls, forward = [], flat.FlatMGLLLoss.forward

def recording(self, *args, **kwargs):
    labels = [kwargs[k] for k in sorted(kwargs) if k.startswith("labels_")]
    out = forward(self, *args, **kwargs)
    total = out["loss"] if isinstance(out, dict) and "loss" in out else (
        sum(out.values()) if isinstance(out, dict) else out)
    calls.append({
        "loss": float(total),
        "n": int(labels[0].shape[0]),
        "nan_rows": [int(x.isnan().all(1).sum()) for x in labels],
        "nan_entries": [int(x.isnan().sum()) for x in labels],
    })
    return out

flat.FlatMGLLLoss.forward = recording
try:
    open_clip_train.main(sys.argv[1:])
finally:
    with open(f"rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(calls, f)
"""


def _coarse_source(tmp_path):
    from mgll.datasets import read_label_table

    (tmp_path / "coarse.csv").write_text(COARSE_CSV)
    annotations = read_label_table(
        tmp_path / "coarse.csv", image="image", labels="category", label_key="category",
        separator="|", metadata=["patient"],
    )  # fmt: skip
    label_map = CHEST_X_RAY_LABEL_MAP.with_source(
        "coarse", SourceLabels({"category": ["Lung Opacity", "Pleural Effusion", "Fracture"]})
    )
    return [{**a, "patient_id": a["patient"]} for a in annotations], label_map


def _launcher_args(argv):
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    args.distributed, args.world_size, args.rank, args.local_rank = False, 1, 0, 0
    return args


def test_merged_recipe_trains_under_the_open_clip_launcher_with_2_processes(tmp_path):
    """The data guide's recipe end to end: provider files -> readers -> merge_sources ->
    split_by_patient -> write_webdataset -> the open_clip launcher under torchrun (2 gloo
    processes, a tiny offline model).  The unannotated labels stay unknown on the way: the
    shards' .json keep them, the launcher's loader yields NaN where merged.labels() has NaN,
    and on both ranks NaN rows reach the loss, which stays finite."""
    import gc
    import os
    import subprocess
    import sys
    import warnings

    import numpy as np
    import torch
    from PIL import Image

    pytest.importorskip("open_clip_train.main")
    pytest.importorskip("webdataset")
    from mgll.integrations import open_clip_train

    coarse, label_map = _coarse_source(tmp_path)
    m = merge_sources({**readers(), "coarse": coarse}, label_map, uncertainty="U-Ignore")
    assert len(m) == 18 and m.summary()["coarse"]["granularities"] == {"category": 3}
    parts = split_by_patient(m, {"train": 0.7, "val": 0.3}, seed=0)
    train_ids = {a["patient_id"] for a in parts["train"]}
    assert not train_ids & {a["patient_id"] for a in parts["val"]}
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for k, a in enumerate(m):  # tiny stand-in images, one file per annotation
        a["image"] = str(tmp_path / "img" / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(a["image"])
    grans = ["category", "finding"]
    train = write_webdataset(parts["train"], tmp_path / "shards", grans, shards=2)
    val = write_webdataset(parts["val"], tmp_path / "shards", grans, prefix="val")
    config = open_clip_config(m.classes, grans, loss={"smooth_kl_weight": 0.5})
    (tmp_path / "mgll.json").write_text(json.dumps(config))
    (tmp_path / "mgll-tiny-vit.json").write_text(json.dumps(TINY_MODEL))

    # The launcher's own webdataset loader gives the merged labels, NaN where they are unknown.
    n_val = len(parts["val"])
    argv = ["--train-data", train, "--val-data", val, "--dataset-type", "webdataset",
            "--model", "mgll-tiny-vit", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3",
            "--warmup", "0", "--workers", "0", "--device", "cpu", "--seed", "0",
            "--precision", "fp32", "--log-every-n-steps", "1", "--name", "run",
            "--mgll-model-config", str(tmp_path / "mgll-tiny-vit.json"),
            "--mgll-config", str(tmp_path / "mgll.json")]  # fmt: skip
    rest, cfg = open_clip_train.parse_mgll_args([*argv, "--batch-size", "64"])
    hooks = open_clip_train._Hooks(cfg)
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32))  # noqa: E731
    info = hooks.wds_data(_launcher_args(rest), to_tensor, is_train=False)
    with warnings.catch_warnings():  # webdataset leaves the shard's file to the collector
        warnings.simplefilter("ignore", ResourceWarning)
        ((images, texts),) = list(info.dataloader)
        del info
        gc.collect()
    assert images.shape == (n_val, 32, 32, 3)
    val_merged = type(m)(list(parts["val"]), label_map)
    for g, name in enumerate(grans):
        got, want = texts[g].labels, val_merged.labels(name)
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.nan_to_num(-1), want.nan_to_num(-1)), name
        assert bool(want.isnan().any()), name  # the check has unknowns to carry

    # And trains under torchrun with 2 processes.
    (tmp_path / "launch.py").write_text(RECORDING_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(tmp_path / "launch.py")]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, *argv], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = tmp_path / "logs" / "run"
    assert (run / "checkpoints" / "epoch_2.pt").is_file()
    log = (run / "out.log").read_text()
    assert "total 2." in log  # open_clip: "Process (global: 0, local 0), total 2."
    steps = re.findall(r"Train Epoch: (\d+) .* Loss: (\S+) \(", log)
    assert {int(e) for e, _ in steps} == {0, 1} and all(math.isfinite(float(v)) for _, v in steps)
    for rank in (0, 1):  # every step of both epochs, on both ranks (log: one line a step)
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(calls) == len(steps), (calls, steps)
        assert all(math.isfinite(c["loss"]) and c["n"] == 2 for c in calls), calls
        assert sum(c["nan_entries"][1] for c in calls) > 0, calls  # unknown findings
    both = [c for r in (0, 1) for c in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert sum(c["nan_rows"][0] for c in both) > 0  # ChestX-ray14: no category at all
    assert sum(c["nan_rows"][1] for c in both) > 0  # the coarse-only source: no finding


def test_compact_equals_the_list_of_every_reader():
    import pickle

    for policy in ("U-Ignore", "U-Soft"):
        for name, reader in readers(policy).items():
            want = list(readers(policy)[name])
            store = reader.compact()
            assert len(store) == len(want) and store == want and list(store) == want, name
            assert [list(a) for a in store] == [list(a) for a in want]  # keys in order
            assert pickle.loads(pickle.dumps(store)) == want
            a = store[0]
            a["uncertain"].append("changed")
            assert store[0] == want[0]  # a fresh dict and fresh lists each time
    many = [{"image": f"{i}.png", "finding": [str(i % 7)] * (i % 3), "w": {"a": i / 7}}
            for i in range(5000)]  # fmt: skip
    assert CompactAnnotations(many) == many


def test_compact_keeps_values_that_cannot_be_pickled():
    class Local:  # a class defined in a function: its instances cannot be pickled
        __hash__ = None

        def __eq__(self, other):
            return isinstance(other, Local)

    rows = [{"image": f"{i}.png", "extra": Local()} for i in range(3)]
    assert CompactAnnotations(rows) == rows


def test_merged_compact_equals_the_list():
    import torch

    for policy in ("U-Ignore", "U-Soft"):
        merged = merge_sources(readers(policy), uncertainty=policy)
        store = merged.compact()
        assert isinstance(store.annotations, CompactAnnotations)
        assert len(store) == len(merged) and list(store) == list(merged)
        assert [list(a) for a in store] == [list(a) for a in merged]  # keys in order
        assert store.classes == merged.classes and store.texts == merged.texts
        assert dict(store.summary()) == dict(merged.summary())
        for g in merged.classes:
            got, want = store.labels(g), merged.labels(g)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(
                got.nan_to_num(-1), want.nan_to_num(-1)
            )
        store[0]["unknown"].clear()  # a fresh dict each time
        assert store[0] == merged[0]
