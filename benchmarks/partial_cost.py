"""What unknown labels cost: time of the fused loss and memory of the tiled one, with and without NaN.

    python benchmarks/partial_cost.py                    # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/partial_cost.py --no-nan-only   # a baseline

Time: ``backend="fused"``, forward and backward (``torch.autograd.grad`` to the features and the
logit scale), N = 2048, G = 2 (integer ids with 64 classes; (N, 16) float multi-hot labels),
D = 512, float32, median of warm repeats.  "nan" puts NaN in the multi-hot granularity: 20 % of
the entries (classes not annotated) and 10 % of the rows (images unannotated there), and -1 for
10 % of the ids.  Memory: ``backend="tiled"`` at N = 16384, D = 128, G = 2 with the same
unknowns, measured in a fresh process as the growth of the anonymous resident memory during
one forward and backward, after the inputs exist.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def batch(n: int, d: int, nan: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen).requires_grad_()
    texts = [torch.randn(n, d, generator=gen).requires_grad_() for _ in range(2)]
    scale = torch.tensor(14.0, requires_grad=True)
    ids = torch.randint(0, 64, (n,), generator=gen)
    multi = (torch.rand(n, 16, generator=gen) < 0.15).float()
    if nan:
        ids[torch.rand(n, generator=gen) < 0.1] = -1
        multi[torch.rand(n, 16, generator=gen) < 0.2] = float("nan")
        multi[torch.rand(n, generator=gen) < 0.1] = float("nan")
    return image, texts, scale, [ids, multi]


def step(loss_fn, image, texts, scale, labels) -> None:
    loss = loss_fn(image, texts, scale, labels=labels)
    torch.autograd.grad(loss, [image, *texts, scale])


def time_fused(nan: bool, repeats: int) -> dict:
    import mgll

    loss_fn = mgll.MGLLLoss(backend="fused")
    args = batch(2048, 512, nan)
    step(loss_fn, *args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(loss_fn, *args)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def memory_tiled(nan: bool) -> dict:
    """One tiled forward and backward at N = 16384, D = 128 (run in a fresh process).

    The peak of the anonymous resident memory (``RssAnon``, sampled every 0.2 ms by a thread)
    minus its value before the call: file-backed pages (torch's libraries paged in on first use,
    hundreds of MB for a CUDA build) are not the loss's memory.
    """
    import threading

    import mgll

    args = batch(16384, 128, nan)
    loss_fn = mgll.MGLLLoss(backend="tiled")
    step(loss_fn, *batch(64, 128, nan))  # the code paths loaded once, outside the measurement
    peak, running = [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], _anon())
            time.sleep(0.0002)

    before = _anon()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    step(loss_fn, *args)
    elapsed = time.perf_counter() - start
    running[0] = False
    watcher.join()
    return {"extra_gb": (max(peak[0], _anon()) - before) / 1e9, "time_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-nan-only", action="store_true", help="a baseline without unknowns")
    parser.add_argument("--memory-point", choices=["nan", "no-nan"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_point:
        print(json.dumps(memory_tiled(args.memory_point == "nan")))
        return
    out = {"torch": torch.__version__, "threads": args.threads}
    cases = [False] if args.no_nan_only else [False, True]
    for nan in cases:
        key = "nan" if nan else "no-nan"
        out[f"fused_{key}"] = time_fused(nan, args.repeats)
        run = subprocess.run(
            [sys.executable, __file__, "--memory-point", key, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[f"tiled_{key}"] = json.loads(run.stdout)
    if not args.no_nan_only:
        out["fused_nan_over_no_nan"] = (
            out["fused_nan"]["median_s"] / out["fused_no-nan"]["median_s"]
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
