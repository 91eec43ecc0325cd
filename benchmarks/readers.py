"""Speed and memory of the dataset readers, on synthetic files in the providers' exact formats.

Three measurements, each in a fresh process (so one does not inherit another's memory):

* **speed**: each reader's time per row against the stdlib ``csv.DictReader`` on the same file
  (``--rows`` rows, default 100,000; MIMIC-CXR: the image rows of the metadata file joined to
  the study rows of the label file, against ``DictReader`` over both files), best of
  ``--repeats``; and two references on the same files: ``csv.reader`` (the parse alone) and a
  CheXpert *floor* (the least per-row work of any pure-Python reader, stored as columns: no
  dict per row, nothing decoded), which bound what a reader can reach against ``DictReader``;
* **index memory**: a MIMIC-CXR index of ``--mimic-images`` images (default 377,110, the
  MIMIC-CXR-JPG 2.0.0 release: 227,835 studies, 65,379 patients, all labelled here), built by
  :func:`~mgll.datasets.read_mimic_cxr` over synthetic metadata and CheXpert-labeller files, as
  ``list(...)`` (a list of dicts) and as ``.compact()`` (the columnar store): the anonymous
  resident memory (``RssAnon``) it keeps, after ``gc`` and ``malloc_trim``, and the peak while
  building it (``VmHWM``);
* **worker growth**: a map-style dataset over ``--worker-items`` ChestX-ray14 annotations
  (default 100,000) visited once by a ``DataLoader`` with 2 forked workers; the growth of each
  worker's ``RssAnon`` and of its private memory (``smaps_rollup``'s ``Private_Clean +
  Private_Dirty``) from its first batch to its last: a list of dicts in a forked worker is
  copied page by page as reading the items changes their reference counts, which turns shared
  pages private without changing ``RssAnon``.

Prints a table and writes ``--out`` (default ``bench_out/readers.json``).

Run ``python benchmarks/readers.py [--rows 100000] [--mimic-images 377110] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from operator import itemgetter
from pathlib import Path

from mgll.datasets import CHEXPERT_OBSERVATIONS

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)  # fmt: skip
OBSERVATIONS = CHEXPERT_OBSERVATIONS  # the 14 columns, in the order of the files
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(OBSERVATIONS)
MIMIC_LABEL_HEADER = "subject_id,study_id," + ",".join(sorted(OBSERVATIONS))
MIMIC_META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
# The CheXpert labeller's cells: mostly blank (not mentioned), then negatives, positives, -1.0.
CELLS = ("",) * 14 + ("0.0",) * 3 + ("1.0",) * 2 + ("-1.0",)


def write_chestxray14(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = [NIH_HEADER]
    for i in range(n):
        patient, follow = i // 4 + 1, i % 4
        k = rng.choice((0, 0, 0, 1, 1, 2, 3))
        labels = "|".join(rng.sample(NIH_FINDINGS, k)) if k else "No Finding"
        view = rng.choice(("PA", "PA", "AP"))
        lines.append(
            f"{patient:08d}_{follow:03d}.png,{labels},{follow},{patient},{rng.randint(1, 95)},"
            f"{rng.choice('MF')},{view},{rng.randint(2000, 3000)},{rng.randint(2000, 3000)},"
            f"0.{rng.randint(139, 168)},0.{rng.randint(139, 168)},"
        )
    path.write_text("\n".join(lines) + "\n")


def _values(rng: random.Random) -> list[str]:
    values = [rng.choice(CELLS) for _ in OBSERVATIONS]
    if rng.random() < 0.15:  # No Finding rows: every other cell blank
        values = ["1.0"] + [""] * (len(OBSERVATIONS) - 1)
    return values


def write_chexpert(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = [CHEXPERT_HEADER]
    for i in range(n):
        patient, study, view = i // 3 + 1, i % 3 // 2 + 1, i % 2 + 1
        lateral = view == 2
        kind = "lateral" if lateral else "frontal"
        lines.append(
            f"CheXpert-v1.0/train/patient{patient:05d}/study{study}/view{view}_{kind}.jpg,"
            f"{rng.choice(('Female', 'Male'))},{rng.randint(18, 90)},"
            f"{'Lateral' if lateral else 'Frontal'},{'' if lateral else rng.choice(('AP', 'PA'))},"
            + ",".join(_values(rng))
        )
    path.write_text("\n".join(lines) + "\n")


def write_mimic(folder: Path, images: int, seed: int = 0) -> tuple[Path, Path]:
    """Label and metadata files: ``images`` images, 227,835/377,110 as many studies."""
    rng = random.Random(seed)
    studies = max(1, round(images * 227_835 / 377_110))
    patients = max(1, round(images * 65_379 / 377_110))
    order = sorted(OBSERVATIONS)
    labels, meta = [MIMIC_LABEL_HEADER], [MIMIC_META_HEADER]
    study_ids = rng.sample(range(50_000_000, 60_000_000), studies)
    subjects = [10_000_000 + rng.randrange(patients) * 137 for _ in range(studies)]
    for s in range(studies):
        values = dict(zip(OBSERVATIONS, _values(rng), strict=True))
        labels.append(f"{subjects[s]},{study_ids[s]}," + ",".join(values[x] for x in order))
    for i in range(images):
        s = i if i < studies else rng.randrange(studies)
        dicom = "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))
        view = rng.choice(("PA", "AP", "AP", "LATERAL", "LL", ""))
        meta.append(
            f"{dicom},{subjects[s]},{study_ids[s]},CHEST (PA AND LAT),{view},3056,2544,"
            f"2180{rng.randint(1, 9):02d}{rng.randint(1, 28):02d},{rng.randint(0, 235959)}.{rng.randint(0, 999)},"
            f"CHEST (PA AND LAT),postero-anterior,Erect"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(labels) + "\n")
    (folder / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    return folder / "mimic-cxr-2.0.0-chexpert.csv", folder / "mimic-cxr-2.0.0-metadata.csv"


def _status(key: str, pid: str = "self") -> int:
    """A ``/proc/<pid>/status`` field in bytes (``RssAnon``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _private() -> int:
    """The process's private memory in bytes (``Private_Clean + Private_Dirty`` of
    ``smaps_rollup``): what copy-on-write has copied out of the parent's pages, which
    ``RssAnon`` does not show (a shared page counts as resident in both processes)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _dict_reader_s(*paths: Path) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for _ in csv.DictReader(f):
                pass
    return time.perf_counter() - start


def _csv_reader_s(path: Path) -> float:
    """The parse alone: ``csv.reader``'s lists of fields, no dict."""
    start = time.perf_counter()
    with open(path, newline="", encoding="utf-8-sig") as f:
        for _ in csv.reader(f):
            pass
    return time.perf_counter() - start


def _chexpert_floor_s(path: Path, root: str = "/data") -> float:
    """A lower bound on a pure-Python CheXpert reader: the least each row needs (parse, its line,
    a blank or repeated ``Path``, the view, the label cells' code key and its pattern number,
    the path under ``root``, the patient by folder, the stripped metadata), stored in columns:
    no dict per row, and no pattern decoded.  Not a reader: it checks no value."""
    from mgll.datasets.generic import _CODES

    start = time.perf_counter()
    seen, views, patterns, patients = {}, {}, {}, {}
    get, strip, tables = dict.get, str.strip, [_CODES] * len(OBSERVATIONS)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        at = {name: j for j, name in enumerate(next(reader))}
        label_cells = itemgetter(*(at[x] for x in OBSERVATIONS))
        meta, at_path = [at[x] for x in ("Sex", "Age", "Frontal/Lateral", "AP/PA")], at["Path"]
        meta_cells, view_cells = itemgetter(*meta), itemgetter(*meta[2:])
        columns: list[list] = [[] for _ in range(4 + len(meta))]
        for cells in reader:
            if not any(cells):
                continue
            line, ident = reader.line_num, cells[at_path].strip()
            if not ident or ident in seen:
                raise ValueError(f"line {line}: a blank or repeated Path")
            seen[ident] = line
            view = views.setdefault(view_cells(cells), len(views))
            key = "".join(map(get, tables, label_cells(cells)))
            pattern = patterns.setdefault(key, len(patterns))
            folder = ident[: ident.find("/study")]
            patient = patients.setdefault(folder, folder[-5:])
            for column, value in zip(  # noqa: B905 (as many columns as values)
                columns,
                (view, pattern, f"{root}/{ident}", patient, *map(strip, meta_cells(cells))),
            ):
                column.append(value)
    return time.perf_counter() - start


def _readers(folder: Path):
    from mgll.datasets import read_chestxray14, read_chexpert, read_mimic_cxr

    mimic = (folder / "mimic-cxr-2.0.0-chexpert.csv", folder / "mimic-cxr-2.0.0-metadata.csv")
    return {
        "chestxray14": (lambda: read_chestxray14(folder / "Data_Entry_2017.csv"),
                        [folder / "Data_Entry_2017.csv"]),
        "chexpert": (lambda: read_chexpert(folder / "train.csv"), [folder / "train.csv"]),
        "chexpert U-Soft": (lambda: read_chexpert(folder / "train.csv", uncertainty="U-Soft"),
                            [folder / "train.csv"]),
        "mimic_cxr (join)": (lambda: read_mimic_cxr(*mimic), list(mimic)),
    }  # fmt: skip


def child_speed(folder: Path, repeats: int) -> dict:
    out = {}
    for name, (make, files) in _readers(folder).items():
        reader_s, baseline_s, rows = [], [], 0
        for _ in range(repeats):
            baseline_s.append(_dict_reader_s(*files))
            start = time.perf_counter()
            rows = sum(1 for _ in make())
            reader_s.append(time.perf_counter() - start)
        out[name] = {
            "rows": rows,
            "reader_us_per_row": min(reader_s) / rows * 1e6,
            "dict_reader_us_per_row": min(baseline_s) / rows * 1e6,
            "ratio": min(reader_s) / min(baseline_s),
        }
    # What no pure-Python reader avoids, against the same DictReader: the parse alone, and a
    # CheXpert lower bound without a dict per row (see _chexpert_floor_s).
    references = (
        ("chestxray14", "csv.reader", _csv_reader_s),
        ("chexpert", "csv.reader", _csv_reader_s),
        ("chexpert", "floor", _chexpert_floor_s),
    )
    files = {name: paths for name, (_, paths) in _readers(folder).items()}
    for of, what, fn in references:
        base = out[of]
        us = min(fn(*files[of]) for _ in range(repeats)) / base["rows"] * 1e6
        out[f"{of} {what}"] = {
            "rows": base["rows"],
            "reader_us_per_row": us,
            "dict_reader_us_per_row": base["dict_reader_us_per_row"],
            "ratio": us / base["dict_reader_us_per_row"],
        }
    return out


def child_memory(folder: Path, form: str) -> dict:
    from mgll.datasets import read_mimic_cxr

    files = (folder / "mimic-cxr-2.0.0-chexpert.csv", folder / "mimic-cxr-2.0.0-metadata.csv")
    _trim()
    _reset_peak()
    before, rss, start = _status("RssAnon"), _status("VmRSS"), time.perf_counter()
    reader = read_mimic_cxr(*files)
    if form == "list":
        index = list(reader)
    elif hasattr(reader, "compact"):
        index = reader.compact()
    else:
        return {"status": "skipped", "reason": "this mgll has no Annotations.compact()"}
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - rss
    _trim()
    kept = _status("RssAnon") - before
    n = len(index)
    sample = index[n // 2]
    return {"status": "ok", "images": n, "index_mb": kept / 2**20, "bytes_per_image": kept / n,
            "peak_mb": peak / 2**20, "build_s": seconds, "keys": len(sample)}  # fmt: skip


def child_workers(folder: Path, form: str, items: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from mgll.datasets import read_chestxray14

    reader = read_chestxray14(folder / "workers.csv")
    if form == "list":
        annotations = list(reader)
    elif hasattr(reader, "compact"):
        annotations = reader.compact()
    else:
        return {"status": "skipped", "reason": "this mgll has no Annotations.compact()"}
    _trim()

    class Items(Dataset):
        def __len__(self):
            return len(annotations)

        def __getitem__(self, i):
            a = annotations[i]
            return len(a["image"]) + len(a["finding"])

    def collate(batch):  # runs in the worker: its anonymous memory now
        info = torch.utils.data.get_worker_info()
        return info.id, (_status("RssAnon"), _private()), sum(batch)

    loader = DataLoader(Items(), batch_size=512, num_workers=2, collate_fn=collate,
                        multiprocessing_context="fork")  # fmt: skip
    seen: dict[int, list[int]] = {}
    for worker, rss, _ in loader:
        seen.setdefault(worker, []).append(rss)
    per_worker = len(annotations) / len(seen)
    rss = {w: (v[-1][0] - v[0][0]) / 2**20 for w, v in sorted(seen.items())}
    private = {w: (v[-1][1] - v[0][1]) / 2**20 for w, v in sorted(seen.items())}
    return {"status": "ok", "items": len(annotations), "rss_anon_growth_mib": rss,
            "private_growth_mib": private,
            "private_mib_per_100k_items": max(private.values()) / (per_worker / 1e5)}  # fmt: skip


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"status": "error", "reason": proc.stderr[-2000:]}
    return json.loads(proc.stdout.splitlines()[-1])


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--mimic-images", type=int, default=377_110)
    parser.add_argument("--worker-items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10k rows, 20k images, 1 repeat")
    parser.add_argument("--data", type=Path, default=Path("bench_out/readers_data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/readers.json"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, folder, *rest = args.child
        fn = {"speed": child_speed, "memory": child_memory, "workers": child_workers}[kind]
        result = fn(Path(folder), *(int(x) if x.isdigit() else x for x in rest))
        print(json.dumps(result))
        return result
    if args.quick:
        args.rows, args.mimic_images, args.worker_items, args.repeats = 10_000, 20_000, 20_000, 1
    folder = args.data
    folder.mkdir(parents=True, exist_ok=True)
    load = [_load()]
    write_chestxray14(folder / "Data_Entry_2017.csv", args.rows)
    write_chexpert(folder / "train.csv", args.rows)
    write_chestxray14(folder / "workers.csv", args.worker_items, seed=1)
    speed_mimic = folder / "speed"
    write_mimic(speed_mimic, args.rows)
    for name in ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv"):
        os.replace(speed_mimic / name, folder / name)
    speed = run_child(["speed", str(folder), str(args.repeats)])
    write_mimic(folder / "mimic", args.mimic_images)
    memory = {
        form: run_child(["memory", str(folder / "mimic"), form]) for form in ("list", "compact")
    }
    workers = {form: run_child(["workers", str(folder), form, "0"]) for form in ("list", "compact")}
    load.append(_load())
    result = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
                 "python": platform.python_version(), "cpu": platform.processor(),
                 "cores": os.cpu_count(), "loadavg_start_end": load,
                 "rows": args.rows, "mimic_images": args.mimic_images,
                 "worker_items": args.worker_items},
        "speed": speed, "memory": memory, "workers": workers,
    }  # fmt: skip
    print(f"speed, {args.rows} rows (best of {args.repeats}); load {load[0]} -> {load[-1]}")
    print(f"{'reader':24} {'µs/row':>8} {'DictReader':>11} {'ratio':>6}")
    for name, r in speed.items() if speed.get("status") != "error" else []:
        print(f"{name:24} {r['reader_us_per_row']:8.1f} {r['dict_reader_us_per_row']:11.1f} "
              f"{r['ratio']:6.2f}")  # fmt: skip
    print(f"\nMIMIC-CXR index, {args.mimic_images} images")
    print(f"{'form':8} {'kept MB':>8} {'B/image':>8} {'peak MB':>8} {'build s':>8}")
    for form, r in memory.items():
        if r.get("status") == "ok":
            print(f"{form:8} {r['index_mb']:8.1f} {r['bytes_per_image']:8.0f} "
                  f"{r['peak_mb']:8.1f} {r['build_s']:8.1f}")  # fmt: skip
        else:
            print(f"{form:8} {r.get('status')}: {r.get('reason', '')[-300:]}")
    print(f"\nDataLoader, 2 forked workers, {args.worker_items} items")
    for form, r in workers.items():
        if r.get("status") == "ok":
            rss = ", ".join(f"{v:.1f}" for v in r["rss_anon_growth_mib"].values())
            private = ", ".join(f"{v:.1f}" for v in r["private_growth_mib"].values())
            print(f"{form:8} growth a worker: RssAnon {rss} MiB; private {private} MiB "
                  f"({r['private_mib_per_100k_items']:.1f} MiB per 100k items visited)")  # fmt: skip
        else:
            print(f"{form:8} {r.get('status')}: {r.get('reason', '')[-300:]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
