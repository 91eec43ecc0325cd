"""Measure the five CPU performance targets of the defaults, as ratios taken in one process.

Targets (forward + backward from features, paired mode, integer class ids, fp32):

1. a term that cannot contribute costs nothing: the default at G = 1 within 1.05x of the same
   call with ``smooth_kl_weight=0``, in time and in peak extra memory (N = 4096, D = 512);
2. the coarse smooth-KL support without N x J matrices: ``tiled`` at N = 16384, D = 128,
   G = 2, default configuration, ids with 8 classes and one distinct id per sample, within
   0.2 GB of extra memory;
3. ``fused`` within 1.3x of the matmul floor at N = 2048, G = 2, D = 512 (default and
   ``"samples"``), within 1.8x at D = 128; ``tiled`` within 1.5x ``fused``;
4. ``torch.compile(loss_fn, dynamic=True)`` not slower than eager, no graph break, no
   recompilation for a new N (first-call cost reported);
5. G = 1 at or below open_clip's ``ClipLoss``, pointwise-only at or below ``SigLipLoss``,
   validation overhead under 2 %.

Timing interleaves the cases of one target round by round (load from other processes hits
them alike) and compares medians; with ``--clock thread`` (the default) it is the CPU time of
this thread with one torch thread, which a busy machine inflates least.  The floor is the
three matrix products per granularity (``X T^T``, ``dZ T``, ``dZ^T X``) in the same process.
Memory is the peak resident set (``VmHWM``) of a fresh subprocess per case minus its resident
set once inputs exist and a small step has loaded every code path.  The load average is
recorded before and after.

Usage::

    python benchmarks/perf_targets.py                  # all five (about 5 min, 1 thread)
    python benchmarks/perf_targets.py --only 3 --rounds 9
    python benchmarks/perf_targets.py --quick          # tiny shapes: a smoke run, no targets
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mgll  # noqa: E402

SCALE = 14.0


def make_inputs(n: int, g: int, d: int, classes=None, bias: bool = False, seed: int = 0):
    """Features requiring grad and ids; ``classes[g]`` is a count, or "distinct" (a permutation)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen).requires_grad_()
    texts = [torch.randn(n, d, generator=gen).requires_grad_() for _ in range(g)]
    classes = classes or [8, max(2, n // 8), max(2, n // 2)][:g]
    labels = [
        torch.randperm(n, generator=gen)
        if c == "distinct"
        else torch.randint(0, min(c, n), (n,), generator=gen)
        for c in classes
    ]
    scale = torch.tensor(SCALE, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True) if bias else None
    return image, texts, scale, b, labels


def _leaves(image, texts, scale, bias):
    return [image, *texts, scale] + ([bias] if bias is not None else [])


def mgll_step(inputs, **kw):
    image, texts, scale, bias, labels = inputs
    loss = mgll.mgll_loss(image, texts, scale, bias, labels=labels, **kw)
    return torch.autograd.grad(loss, _leaves(image, texts, scale, bias))


def floor_step(inputs):
    """The products no implementation avoids: per granularity Z = s X T^T, dZ T and dZ^T X."""
    image, texts, *_ = inputs
    with torch.no_grad():
        x = F.normalize(image, dim=-1)
        for t in texts:
            t = F.normalize(t, dim=-1)
            z = torch.mm(x, t.T).mul_(SCALE)
            torch.mm(z, t), torch.mm(z.T, x)


def _open_clip_losses():
    from providers import _open_clip_loss_module

    module = _open_clip_loss_module()
    return module.ClipLoss(), module.SigLipLoss()


def clip_step(inputs, clip):
    image, texts, scale, _, _ = inputs
    x = F.normalize(image, dim=-1)
    loss = sum(clip(x, F.normalize(t, dim=-1), scale) for t in texts)
    return torch.autograd.grad(loss, [image, *texts, scale])


def siglip_step(inputs, siglip):
    image, texts, scale, bias, _ = inputs
    x = F.normalize(image, dim=-1)
    loss = sum(siglip(x, F.normalize(t, dim=-1), scale, bias) for t in texts)
    return torch.autograd.grad(loss, _leaves(image, texts, scale, bias))


# ------------------------------------------------------------------------------ measuring


def paired(cases: dict, rounds: int, clock) -> dict[str, float]:
    """Median seconds of each case, the cases interleaved round by round after a warm-up."""
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {k: statistics.median(t) for k, t in times.items()}


#: Cases a memory subprocess can run: name -> (inputs kwargs, step kwargs or a provider).
MEMORY_CASES = {
    "g1-default": (dict(g=1), dict(backend="fused")),
    "g1-kl-off": (dict(g=1), dict(backend="fused", smooth_kl_weight=0.0)),
    "tiled-distinct": (dict(g=2, classes=[8, "distinct"]), dict(backend="tiled")),
    "tiled-distinct-samples": (
        dict(g=2, classes=[8, "distinct"]),
        dict(backend="tiled", smooth_kl_support="samples"),
    ),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(case: str, n: int, d: int) -> None:
    make_kw, step_kw = MEMORY_CASES[case]
    mgll_step(make_inputs(64, d=d, seed=1, **make_kw), **step_kw)  # load every code path
    inputs = make_inputs(n, d=d, **make_kw)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    mgll_step(inputs, **step_kw)
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_bytes": _status_kib("VmHWM") * 1024 - before, "seconds": seconds}))


def peak_extra(case: str, n: int, d: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, str(n), str(d)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- targets


def row(target: str, what: str, value: float, limit: float, unit: str = "x") -> dict:
    return {"target": target, "what": what, "value": value, "limit": limit, "unit": unit}


def target1(s: dict, rounds: int, clock) -> list[dict]:
    n, d = s["t1_n"], s["d"]
    inputs = make_inputs(n, 1, d)
    t = paired(
        {
            "default": lambda: mgll_step(inputs, backend="fused"),
            "kl off": lambda: mgll_step(inputs, backend="fused", smooth_kl_weight=0.0),
        },
        rounds,
        clock,
    )
    mem = {c: peak_extra(c, n, d)["extra_bytes"] for c in ("g1-default", "g1-kl-off")}
    return [
        row("1", f"G=1 default / KL off, time (N={n}, D={d})", t["default"] / t["kl off"], 1.05),
        row("1", "G=1 default / KL off, memory", mem["g1-default"] / mem["g1-kl-off"], 1.05),
    ]


def target2(s: dict) -> list[dict]:
    n, d = s["t2_n"], s["t2_d"]
    out = []
    for case, label in (
        ("tiled-distinct", "coarse (default)"),
        ("tiled-distinct-samples", "samples"),
    ):
        run = peak_extra(case, n, d)
        out.append(
            row(
                "2",
                f"tiled extra GB, {label}, ids 8 + distinct (N={n}, D={d}, {run['seconds']:.1f}s)",
                run["extra_bytes"] / 1e9,
                0.2 * s["t2_scale"],
                "GB",
            )
        )
    return out


def target3(s: dict, rounds: int, clock) -> list[dict]:
    n, g = s["t3_n"], 2
    out = []
    for d, limit in ((s["d"], 1.3), (s["t3_d_small"], 1.8)):
        inputs = make_inputs(n, g, d)
        cases = {
            "floor": lambda inputs=inputs: floor_step(inputs),
            "fused": lambda inputs=inputs: mgll_step(inputs, backend="fused"),
            "fused samples": lambda inputs=inputs: mgll_step(
                inputs, backend="fused", smooth_kl_support="samples"
            ),
        }
        if d == s["d"]:
            cases["tiled"] = lambda inputs=inputs: mgll_step(inputs, backend="tiled")
        t = paired(cases, rounds, clock)
        shape = f"N={n}, G={g}, D={d}"
        out.append(row("3", f"fused default / floor ({shape})", t["fused"] / t["floor"], limit))
        out.append(
            row("3", f"fused samples / floor ({shape})", t["fused samples"] / t["floor"], limit)
        )
        if "tiled" in t:
            out.append(row("3", f"tiled / fused, default ({shape})", t["tiled"] / t["fused"], 1.5))
    return out


def target4(s: dict, rounds: int, clock) -> list[dict]:
    import torch._dynamo as dynamo

    n, d = s["t4_n"], s["d"]
    inputs = make_inputs(n, 2, d)

    def loss_fn(image, texts, scale, labels):
        return mgll.mgll_loss(image, texts, scale, labels=labels)

    image, texts, scale, _, labels = inputs
    explain = dynamo.explain(loss_fn)(image, texts, scale, labels)
    dynamo.reset()
    compiled = torch.compile(loss_fn, dynamic=True)
    leaves = [image, *texts, scale]
    start = time.perf_counter()
    torch.autograd.grad(compiled(image, texts, scale, labels), leaves)
    first = time.perf_counter() - start
    t = paired(
        {
            "eager": lambda: torch.autograd.grad(loss_fn(image, texts, scale, labels), leaves),
            "compiled": lambda: torch.autograd.grad(compiled(image, texts, scale, labels), leaves),
        },
        rounds,
        clock,
    )
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    other = make_inputs(n + n // 2 + 3, 2, d)
    im2, tx2, sc2, _, lb2 = other
    torch.autograd.grad(compiled(im2, tx2, sc2, lb2), [im2, *tx2, sc2])
    recompiles = dynamo.utils.counters["stats"]["unique_graphs"] - frames
    return [
        row("4", f"compiled / eager (N={n}, D={d}, G=2)", t["compiled"] / t["eager"], 1.0),
        row("4", "graph breaks under torch.compile", float(explain.graph_break_count), 0.0, "n"),
        row("4", f"new graphs for a new N (N={n + n // 2 + 3})", float(recompiles), 0.0, "n"),
        row("4", "first call (compile + run), seconds", first, float("inf"), "s"),
    ]


def target5(s: dict, rounds: int, clock) -> list[dict]:
    n, d = s["t5_n"], s["d"]
    clip, siglip = _open_clip_losses()
    one = make_inputs(n, 1, d)
    two = make_inputs(n, 2, d, bias=True)
    pointwise_only = dict(soft_clip_weight=0.0, smooth_kl_weight=0.0, pointwise_norm="images")
    t = paired(
        {
            "mgll g1": lambda: mgll_step(one),
            "ClipLoss": lambda: clip_step(one, clip),
            "mgll pointwise": lambda: mgll_step(two, **pointwise_only),
            "SigLipLoss": lambda: siglip_step(two, siglip),
            "validate": lambda: mgll_step(two),
            "no validate": lambda: mgll_step(two, validate=False),
        },
        rounds,
        clock,
    )
    return [
        row(
            "5", f"G=1 mgll / open_clip ClipLoss (N={n}, D={d})", t["mgll g1"] / t["ClipLoss"], 1.0
        ),
        row(
            "5",
            "pointwise-only mgll / open_clip SigLipLoss (G=2)",
            t["mgll pointwise"] / t["SigLipLoss"],
            1.0,
        ),
        row("5", "validate=True / validate=False (G=2)", t["validate"] / t["no validate"], 1.02),
    ]


FULL = dict(d=512, t1_n=4096, t2_n=16384, t2_d=128, t2_scale=1.0, t3_n=2048, t3_d_small=128,
            t4_n=1024, t5_n=2048)  # fmt: skip
QUICK = dict(d=64, t1_n=256, t2_n=512, t2_d=32, t2_scale=1.0, t3_n=256, t3_d_small=32, t4_n=64,
             t5_n=256)  # fmt: skip


def _verdict(r: dict) -> str:
    if r["limit"] == float("inf"):
        return "reported"
    if r["value"] <= r["limit"]:
        return "met"
    over = r["value"] - r["limit"] if r["unit"] in ("n", "GB") else r["value"] / r["limit"] - 1
    return (
        f"missed by {over:.2f} {r['unit']}" if r["unit"] in ("n", "GB") else f"missed by {over:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, choices=[1, 2, 3, 4, 5], action="append")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round, no compile")
    parser.add_argument("--compile", action="store_true", help="with --quick: run target 4 too")
    parser.add_argument("--clock", choices=["thread", "wall"], default="thread")
    parser.add_argument("--out", type=Path, default=Path("bench_out/perf_targets.json"))
    parser.add_argument("--child", nargs=3, metavar=("CASE", "N", "D"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        memory_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    settings = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    only = set(args.only or ([1, 2, 3, 5] + ([4] if args.compile or not args.quick else [])))
    load_before = os.getloadavg()
    rows: list[dict] = []
    if 1 in only:
        rows += target1(settings, rounds, clock)
    if 2 in only:
        rows += target2(settings)
    if 3 in only:
        rows += target3(settings, rounds, clock)
    if 4 in only:
        rows += target4(settings, rounds, clock)
    if 5 in only:
        rows += target5(settings, rounds, clock)
    load_after = os.getloadavg()
    for r in rows:
        r["verdict"] = _verdict(r)
    width = max(len(r["what"]) for r in rows)
    print(f"torch {torch.__version__}, 1 thread, clock={args.clock}, median of {rounds} rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print(f"{'#':<2} {'measure':<{width}} {'value':>9} {'target':>8}  verdict")
    for r in rows:
        limit = "-" if r["limit"] == float("inf") else f"<= {r['limit']:g}"
        print(
            f"{r['target']:<2} {r['what']:<{width}} {r['value']:>9.3f} {limit:>8}  {r['verdict']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "clock": args.clock,
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quick": args.quick,
        "rows": [{**r, "limit": None if r["limit"] == float("inf") else r["limit"]} for r in rows],
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
