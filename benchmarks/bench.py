"""Benchmark MGLL against the naive composition, open_clip's ClipLoss and the matmul floor.

Run from the repository root::

    python benchmarks/bench.py --quick                 # CI: tiny sweep, in-process, ~30 s
    python benchmarks/bench.py                         # the CPU sweep (fresh process per point)
    python benchmarks/bench.py --preset gpu            # the GPU sweep (or benchmarks/gpu_sweep.sh)

Every point is one provider at one (N, G, D, dtype); each records the forward alone and one
forward+backward (time and peak extra memory).  Results go to ``--out`` (default ``bench_out/``):
``results.json`` (every record, the machine, versions, settings, fits), ``results.csv``,
``results.md`` (tables) and PNG plots.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

# fmt: off
PRESETS = {
    # n: the N sweep (at g0, d0); g / d: the G and D sweeps at mid_n
    "quick": dict(n=[64, 128], g=[1, 2], d=[16, 32], g0=2, d0=32, mid_n=64, dtypes=["fp32"],
                  compile_n=[], min_time=0.005, max_call_s=10.0, time_budget_s=40.0,
                  budget_gb=None, in_process=True, threads=1),
    "cpu": dict(n=[512, 1024, 2048, 4096, 8192, 16384], g=[1, 2, 3], d=[256, 512, 768], g0=2,
                d0=512, mid_n=1024, dtypes=["fp32"], compile_n=[1024], min_time=0.5,
                max_call_s=6.0, max_mem_call_s=40.0, time_budget_s=780.0, budget_gb=4.0,
                in_process=False, threads=1),
    "gpu": dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536], g=[1, 2, 3], d=[256, 512, 768],
                g0=2, d0=512, mid_n=16384, dtypes=["fp32", "bf16"], compile_n=[16384],
                min_time=0.1, max_call_s=5.0, time_budget_s=420.0, budget_gb=None,
                in_process=True, threads=None),
}
#: ``--dry-run``: the GPU preset's plan, shrunk 32x in N and run on the CPU in-process.
DRY_RUN = dict(n=[32, 64, 128, 256], mid_n=128, d=[16, 32, 48], d0=32, compile_n=[64],
               dtypes=["fp32", "bf16"], min_time=0.01, max_call_s=5.0, time_budget_s=240.0,
               threads=1)
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu, or gpu on CUDA")
    p.add_argument("--quick", action="store_true", help="the tiny CI sweep (= --preset quick)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the GPU preset's plan shrunk, on the CPU (checks the GPU path)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--n", type=int, nargs="+", help="N values of the N sweep")
    p.add_argument("--g", type=int, nargs="+", help="G values of the G sweep")
    p.add_argument("--d", type=int, nargs="+", help="D values of the D sweep")
    p.add_argument("--g0", type=int, help="G of the N and D sweeps")
    p.add_argument("--d0", type=int, help="D of the N and G sweeps")
    p.add_argument("--mid-n", type=int, help="N of the G and D sweeps")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--providers", nargs="+", help="keep providers whose name contains one of these")
    p.add_argument("--compile-n", type=int, nargs="*", help="N values that also run +compile")
    p.add_argument("--min-time", type=float, help="seconds of timed calls per mode and point")
    p.add_argument(
        "--max-call-s",
        type=float,
        help="skip a point whose call is predicted (from the previous N) to take longer",
    )
    p.add_argument(
        "--max-mem-call-s",
        type=float,
        help="up to this predicted time, a point too slow to time runs once for its memory "
        "(default 4 x --max-call-s)",
    )
    p.add_argument("--time-budget-s", type=float, help="skip the remaining points after this")
    p.add_argument(
        "--budget-gb",
        type=float,
        help="CPU memory budget per point, enforced with RLIMIT_AS (subprocess mode)",
    )
    p.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run points in this process (default on CUDA; CPU default: a worker each)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (CPU presets: 1, since a shared machine's OpenMP threads spin-wait "
        "on each other; GPU: torch's default)",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run and args.device != "cpu":
        p.error("--dry-run runs on the CPU; leave --device out")
    preset = "quick" if args.quick else args.preset
    if preset is None:
        preset = "gpu" if args.device == "cuda" or args.dry_run else "cpu"
    args.preset = preset
    settings = dict(PRESETS[preset])
    if args.dry_run:
        settings.update(DRY_RUN)
    for key, value in settings.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.max_mem_call_s is None:
        args.max_mem_call_s = 4 * args.max_call_s
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """Every point, in run order: per dtype the N, G and D sweeps (eager), then compiled points."""
    import providers

    names = providers.provider_names(args.device, include_compile=bool(args.compile_n))
    if args.providers:
        names = [n for n in names if any(k in n for k in args.providers)]
    eager = [n for n in names if not n.endswith("+compile")]
    # compiled points last (compiling is slow), the default backend's first
    compiled = sorted((n for n in names if n.endswith("+compile")), key=lambda n: "fused" not in n)
    points = []
    for dtype in args.dtypes:
        shapes = [("N", n, args.g0, args.d0) for n in args.n]
        shapes += [("G", args.mid_n, g, args.d0) for g in args.g if g != args.g0]
        shapes += [("D", args.mid_n, args.g0, d) for d in args.d if d != args.d0]
        for sweep, n, g, d in shapes:
            points += [dict(provider=p, sweep=sweep, n=n, g=g, d=d, dtype=dtype) for p in eager]
    for dtype in args.dtypes:
        for n in args.compile_n:
            points += [
                dict(provider=p, sweep="N", n=n, g=args.g0, d=args.d0, dtype=dtype)
                for p in compiled
            ]
    common = dict(
        device=args.device,
        min_time=args.min_time,
        threads=args.threads,
        budget_bytes=(
            int(args.budget_gb * 1e9) if args.budget_gb and not args.in_process else None
        ),
    )
    return [{**common, **pt} for pt in points]


def precheck(spec: dict, done: list[dict], args, started: float) -> str | None:
    """Why ``spec`` is skipped before it runs (time budget, predicted too slow, OOM before)."""
    import providers

    static = providers.skip_reason(spec["provider"], spec["device"])
    if static:
        return static
    if time.perf_counter() - started > args.time_budget_s:
        return f"sweep time budget of {args.time_budget_s:.0f} s spent"
    same = [
        r
        for r in done
        if all(r[k] == spec[k] for k in ("provider", "g", "d", "dtype"))
        and r["mode"] == "fwd+bwd"
        and r["n"] < spec["n"]
    ]
    if any(r["status"] == "oom" for r in same):
        n = min(r["n"] for r in same if r["status"] == "oom")
        return f"out of memory already at N={n}"
    ok = [r for r in same if r["status"] == "ok"]
    if ok:
        last = max(ok, key=lambda r: r["n"])
        predicted = last["time_s"] * (spec["n"] / last["n"]) ** 2
        if predicted > args.max_mem_call_s:
            return (
                f"predicted {predicted:.0f} s per call (N^2 from N={last['n']}) > "
                f"--max-mem-call-s {args.max_mem_call_s:g}"
            )
        spec["mem_only"] = predicted > args.max_call_s
    return None


def run_spec(spec: dict, args) -> list[dict]:
    if args.in_process:
        import measure

        return measure.run_point(spec)
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    status = "oom" if proc.returncode in (-9, 137) or "memory" in tail.lower() else "error"
    return [
        {
            **_key(spec),
            "mode": m,
            "status": status,
            "reason": f"worker exited with {proc.returncode}: {tail}",
        }
        for m in ("fwd", "fwd+bwd")
    ]


def _key(spec: dict) -> dict:
    return {k: spec[k] for k in ("provider", "sweep", "n", "g", "d", "dtype", "device")}


def machine_info(args) -> dict:
    import torch

    import mgll

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mgll": mgll.__version__,
        "mgll_backends": list(mgll.available_backends()),
        "git_commit": _git_commit(),
        "device": args.device,
        "device_name": cpu,
        "loadavg_start": _loadavg(),
    }
    if args.device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    settings = {
        k: getattr(args, k)
        for k in (
            "preset",
            "dry_run",
            "n",
            "g",
            "d",
            "g0",
            "d0",
            "mid_n",
            "dtypes",
            "compile_n",
            "min_time",
            "max_call_s",
            "max_mem_call_s",
            "time_budget_s",
            "budget_gb",
            "in_process",
        )
    }
    settings["memory"] = (
        "torch.cuda.max_memory_allocated minus memory allocated before the call"
        if args.device == "cuda"
        else "peak RSS (VmHWM, reset per call) minus RSS before the call, after the inputs exist"
    )
    settings["budget_enforcement"] = (
        "RLIMIT_AS = address space after inputs + budget, per worker process"
        if args.device == "cpu" and not args.in_process and args.budget_gb
        else "none"
    )
    return {**info, "settings": settings}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_process and args.device == "cuda":
        import torch._dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(args)
    specs = plan(args)
    print(
        f"[bench] {len(specs)} points -> {args.out}  ({meta['device_name']}, torch "
        f"{meta['torch']}, preset {args.preset}{', dry run' if args.dry_run else ''})",
        file=sys.stderr,
    )
    records: list[dict] = []
    started = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        reason = precheck(spec, records, args, started)
        if reason:
            new = [
                {**_key(spec), "mode": m, "status": "skipped", "reason": reason}
                for m in ("fwd", "fwd+bwd")
            ]
        else:
            new = run_spec(spec, args)
        for r in new:
            r["loadavg"] = _loadavg()
        records += new
        step = new[-1]
        shown = (
            f"{step['time_s'] * 1e3:9.1f} ms {step['mem_bytes'] / 2**20:8.1f} MiB"
            if step["status"] == "ok"
            else f"{step['status']}: {step.get('reason', '')}"
        )
        print(
            f"[bench] {i:3d}/{len(specs)} {spec['provider']:24s} {spec['sweep']} "
            f"N={spec['n']:<6d} G={spec['g']} D={spec['d']:<4d} {spec['dtype']}  fwd+bwd {shown}",
            file=sys.stderr,
            flush=True,
        )
        report.write_records(args.out, meta, records)  # partial results survive a crash
    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    summary = report.write_all(args.out, meta, records, budget_gb=args.budget_gb)
    if not args.no_plots:
        import plot

        summary["plots"] = plot.plot_all(args.out, meta, records)
    print(f"[bench] done in {meta['wall_s']} s: {args.out}/results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
