"""Speed and memory of merging sources and splitting by patient, on a synthetic set.

Builds N annotations in the readers' output format (40 % ChestX-ray14-like, 40 % CheXpert-like
with uncertain findings, 20 % MIMIC-CXR-like; about 3 images a patient), then times
``merge_sources`` (with U-Ignore re-applied), ``MergedAnnotations.labels("finding")`` and
``split_by_patient`` (stratified on the findings), and reports the merged set's memory
(tracemalloc: the Python objects the merge allocates and keeps, the inputs excluded).

Run ``python benchmarks/merge.py [--n 100000] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc

from mgll.datasets import (
    CHESTXRAY14_FINDINGS,
    CHEXPERT_CATEGORIES,
    CHEXPERT_OBSERVATIONS,
    merge_sources,
    split_by_patient,
)

FINDINGS = [x for x in CHEXPERT_OBSERVATIONS if x != "No Finding"]


def synthetic(n: int, seed: int) -> dict[str, list[dict]]:
    """``{source: annotations}`` shaped like the three readers' outputs."""
    rng = random.Random(seed)
    cut = (int(0.4 * n), int(0.8 * n))
    out: dict[str, list[dict]] = {"chestxray14": [], "chexpert": [], "mimic_cxr": []}
    for i in range(n):
        patient = i // 3
        if i < cut[0]:
            found = rng.sample(CHESTXRAY14_FINDINGS, rng.choice((0, 0, 1, 1, 2, 3)))
            out["chestxray14"].append(
                {"image": f"images/{patient:08d}_{i % 3:03d}.png", "finding": found,
                 "uncertain": [], "description": "A chest X-ray.", "Patient ID": str(patient),
                 "View Position": "PA"}
            )  # fmt: skip
            continue
        picks = rng.sample(FINDINGS, rng.choice((0, 1, 2, 3)))
        doubt = picks[:1] if rng.random() < 0.3 else []
        a = {"finding": [x for x in picks if x not in doubt], "uncertain": doubt,
             "category": rng.sample(CHEXPERT_CATEGORIES, min(len(picks), 2)),
             "description": "A chest X-ray."}  # fmt: skip
        if i < cut[1]:
            a["image"] = f"CheXpert-v1.0/train/patient{patient:05d}/study1/view{i % 3}_frontal.jpg"
            out["chexpert"].append(a)
        else:
            a |= {"image": f"files/p10/p{patient}/s{i}/{i}.jpg", "subject_id": str(patient)}
            out["mimic_cxr"].append(a)
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = synthetic(args.n, args.seed)
    merged, t_merge = timed(lambda: merge_sources(sources, uncertainty="U-Ignore"))
    del merged
    tracemalloc.start()  # a second merge, traced (tracemalloc slows it, so it is not timed)
    merged = merge_sources(sources, uncertainty="U-Ignore")
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    labels, t_labels = timed(lambda: merged.labels("finding"))
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    parts, t_split = timed(lambda: split_by_patient(merged, fractions, seed=args.seed))
    result = {
        "n": len(merged),
        "patients": sum(parts.patients.values()),
        "merge_s": round(t_merge, 3),
        "merge_us_per_row": round(1e6 * t_merge / len(merged), 2),
        "merged_mb": round(kept / 2**20, 1),
        "merged_bytes_per_row": round(kept / len(merged)),
        "merge_peak_mb": round(peak / 2**20, 1),
        "labels_s": round(t_labels, 3),
        "labels_shape": list(labels.shape),
        "split_s": round(t_split, 3),
        "split_images": {k: len(v) for k, v in parts.items()},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
