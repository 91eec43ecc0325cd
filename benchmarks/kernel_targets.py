"""Measure the performance targets of the kernels issue on this machine (CPU).

Targets (one forward+backward from features, paired mode, integer ids, fp32):

1. speed, N = K = 2048, G = 2, D = 512: ``fused`` at least 3x faster than the naive composition
   (``benchmarks/naive.py``) and within 1.75x of the matmul floor (per granularity the logits
   ``X T^T`` and the two gradient products ``dZ T`` and ``dZ^T X``);
2. memory, N = 4096, G = 2, D = 512: ``fused``'s peak extra memory at most 0.3x the naive one's;
3. memory, N = 16384, G = 2, D = 128: ``tiled`` completes with under 1.5 GB of extra memory.

Timing interleaves the providers round by round (so load from other processes hits all of
them alike) and reports the minimum and the median of the rounds.  Memory is the peak resident
set size (Linux ``VmHWM``, reset just before the step) of a fresh subprocess per provider,
minus the resident set once the inputs exist and a small warm-up step has loaded every code
path.  ``--threads 1`` times with one intra-op thread (less exposed to other processes'
load than two threads that must meet at every op).

Usage::

    python benchmarks/kernel_targets.py                 # all three, JSON to bench_out/
    python benchmarks/kernel_targets.py --only speed --rounds 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mgll  # noqa: E402
from naive import naive_mgll_loss  # noqa: E402

SCALE = 14.0  # CLIP's learned temperature settles near 1/0.07


def make_inputs(n: int, g: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen).requires_grad_()
    texts = [torch.randn(n, d, generator=gen).requires_grad_() for _ in range(g)]
    classes = [8, max(2, n // 8), max(2, n // 2)][:g]  # coarse to fine
    labels = [torch.randint(0, c, (n,), generator=gen) for c in classes]
    scale = torch.tensor(SCALE, requires_grad=True)
    return image, texts, scale, labels


def step(provider: str, image, texts, scale, labels) -> None:
    """One forward+backward to the image features, the text features and the logit scale."""
    leaves = [image, *texts, scale]
    if provider == "floor":
        with torch.no_grad():
            x = image / image.norm(dim=-1, keepdim=True)
            for t in texts:
                t = t / t.norm(dim=-1, keepdim=True)
                z = torch.mm(x, t.T).mul_(SCALE)
                torch.mm(z, t), torch.mm(z.T, x)
        return
    if provider == "naive":
        loss = naive_mgll_loss(image, texts, scale, labels)
    else:
        loss = mgll.mgll_loss(  # sample-level smooth KL, as the naive composition computes
            image, texts, scale, labels=labels, smooth_kl_support="samples", backend=provider
        )
    torch.autograd.grad(loss, leaves)


def time_providers(providers, n, g, d, rounds):
    inputs = make_inputs(n, g, d)
    for p in providers:  # warm-up
        step(p, *inputs)
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            start = time.perf_counter()
            step(p, *inputs)
            times[p].append(time.perf_counter() - start)
    return {
        p: {"min_s": min(t), "median_s": statistics.median(t), "all_s": t} for p, t in times.items()
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_child(provider: str, n: int, g: int, d: int) -> None:
    """Run in a fresh process: print the extra peak RSS (bytes) and the time of one step.

    The baseline is the resident set once the inputs exist and a small step has loaded every
    code path; the peak is the kernel's high-water mark (``VmHWM``), reset to the current RSS
    just before the step by writing 5 to ``/proc/self/clear_refs``.
    """
    step(provider, *make_inputs(64, g, d, seed=1))  # load every code path first
    inputs = make_inputs(n, g, d)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    step(provider, *inputs)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"extra_bytes": peak - before, "seconds": seconds}))


def peak_rss(provider: str, n: int, g: int, d: int) -> dict:
    cmd = [sys.executable, __file__, "--child", provider, str(n), str(g), str(d)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(__import__("os").getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["speed", "memory", "tiled"], action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_out/kernel_targets.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--child", nargs=4, metavar=("PROVIDER", "N", "G", "D"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        provider, *sizes = args.child
        peak_rss_child(provider, *map(int, sizes))
        return
    only = set(args.only or ["speed", "memory", "tiled"])
    result = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if "speed" in only:
        t = time_providers(["naive", "fused", "floor"], 2048, 2, 512, args.rounds)
        fused, naive, floor = (t[p]["min_s"] for p in ("fused", "naive", "floor"))
        result["speed"] = {
            "shape": "N=K=2048 paired, G=2, D=512, fp32, forward+backward",
            "times": t,
            "naive_over_fused": naive / fused,
            "fused_over_floor": fused / floor,
            "target_met": naive / fused >= 3 and fused / floor <= 1.75,
        }
        print(
            f"speed: naive {naive:.3f}s fused {fused:.3f}s floor {floor:.3f}s (min of {args.rounds})"
        )
        print(
            f"  naive/fused = {naive / fused:.2f} (>= 3), fused/floor = {fused / floor:.2f} (<= 1.75)"
        )
    if "memory" in only:
        mem = {p: peak_rss(p, 4096, 2, 512) for p in ("naive", "fused")}
        ratio = mem["fused"]["extra_bytes"] / mem["naive"]["extra_bytes"]
        result["memory"] = {
            "shape": "N=K=4096 paired, G=2, D=512, fp32, forward+backward",
            "peak_extra": mem,
            "fused_over_naive": ratio,
            "target_met": ratio <= 0.3,
        }
        mib = {p: m["extra_bytes"] / 2**20 for p, m in mem.items()}
        print(
            f"memory: naive {mib['naive']:.0f} MiB, fused {mib['fused']:.0f} MiB, ratio {ratio:.3f} (<= 0.3)"
        )
    if "tiled" in only:
        run = peak_rss("tiled", 16384, 2, 128)
        result["tiled"] = {
            "shape": "N=K=16384 paired, G=2, D=128, fp32, forward+backward",
            **run,
            "target_met": run["extra_bytes"] < 1.5e9,
        }
        print(f"tiled: {run['extra_bytes'] / 1e9:.3f} GB extra (< 1.5 GB), {run['seconds']:.1f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
