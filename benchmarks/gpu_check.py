"""One-call GPU check of ``backend="triton"``: its tests on CUDA, then the issue's timing target.

    python benchmarks/gpu_check.py                 # on a CUDA machine (about 5 min)
    python benchmarks/gpu_check.py --cpu-dry-run   # the same steps at tiny shapes, interpreted
    python benchmarks/gpu_check.py --compile-only  # compile every kernel for sm_90, no GPU needed

Steps (each recorded in ``gpu_check.json`` under ``--out``, default ``$OUT`` or ``bench_out/``):

1. ``pytest tests/test_triton.py`` for real on CUDA, the bf16 cases included.
2. One forward+backward from features at N=16384, G=3, D=768, bf16 inputs, paired integer ids
   (8, N/8, N/2 classes), all three terms: ``reference``, ``triton`` through the public API (the
   core upcasts half inputs to fp32, so the kernels use exact fp32 dots), ``triton-bf16``
   (the kernels given the normalised features in bf16: tensor-core dots, fp32 statistics --
   what the public path does once the core keeps half features for this backend),
   ``triton-tf32`` (the public path with ``torch.set_float32_matmul_precision("high")``), and
   ``fused`` / ``tiled`` when present.  Median of ``--iters`` timed calls after one warm-up
   (which compiles), peak extra memory, and each provider's loss and gradients against
   ``reference`` (relative norm of the difference).
3. The ``triton-bf16`` timing for a few other tile configurations (``SWEEP``), each only
   while the run is within ``--time-budget-s`` (``--no-sweep`` skips it).

Installs nothing; mgll is taken from ``./src``.
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

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()
SWEEP = [  # alternatives to triton_kernels.CUDA_BLOCKS (64, 64, 32, 8 warps, 2 stages)
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes, interpreter")
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 and exit")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench_out"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-k", default=None, help="pytest -k expression for step 1")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    parser.add_argument("--time-budget-s", type=float, default=420.0)
    parser.add_argument(
        "--providers", default="reference,triton,triton-tf32,triton-bf16,fused,tiled"
    )
    args = parser.parse_args()
    dry = args.cpu_dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
    sys.path.insert(0, str(ROOT / "src"))
    if args.compile_only:
        compile_for_cuda()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(dry)}
    if not args.skip_tests:
        k = args.tests_k or ("matches_reference and ids or extreme" if dry else None)
        report["tests"] = run_tests(k)
    report["benchmark"] = benchmark(dry, args.iters, args.providers.split(","))
    if not args.no_sweep:
        report["sweep"] = sweep(dry, args.iters, START + args.time_budget_s)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["benchmark"]["summary"], indent=2))
    print(f"written: {path}")
    if report.get("tests", {}).get("returncode", 0) != 0:
        sys.exit(1)


def environment(dry: bool) -> dict:
    import torch
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "dry_run": dry}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = torch.cuda.get_device_capability()
    elif not dry:
        sys.exit("no CUDA device: run with --cpu-dry-run")
    return env


def run_tests(k: str | None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_triton.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    if k:
        cmd += ["-k", k]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-4000:]
    print(tail)
    return {
        "cmd": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "tail": tail,
    }


def make_inputs(n: int, g: int, d: int, dtype, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    texts = [torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(g)]
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    classes = [8, max(2, n // 8), max(2, n // 2)][:g]
    labels = [torch.randint(0, c, (n,), generator=gen).to(device) for c in classes]
    return image, texts, scale, labels


def provider(name: str, inputs):
    """A function running one forward+backward; returns (loss, gradients)."""
    import torch

    import mgll
    from mgll._problem import LossConfig, build_problem
    from mgll.backends import triton_kernels
    from mgll.targets.cooc import CoOccurrence

    image, texts, scale, labels = inputs
    leaves = [image, *texts, scale]

    def public():
        loss = mgll.functional.mgll_loss(
            image, texts, scale, labels=labels, smooth_kl_support="samples", backend=name
        )
        return loss.detach(), torch.autograd.grad(loss, leaves)

    def bf16_operands():
        config = LossConfig()
        cooc = [CoOccurrence("ids", y) for y in labels]
        problem = build_problem(image, texts, scale, None, cooc, config, normalize=True)
        half = torch.bfloat16 if problem.image.is_cuda else problem.image.dtype
        problem.image = problem.image.to(half)
        problem.texts = [t.to(half) for t in problem.texts]
        loss = sum(triton_kernels.compute(problem, config))
        return loss.detach(), torch.autograd.grad(loss, leaves)

    def tf32():
        torch.set_float32_matmul_precision("high")
        try:
            return public()
        finally:
            torch.set_float32_matmul_precision("highest")

    if name == "triton-bf16":
        return bf16_operands
    if name == "triton-tf32":
        name = "triton"
        return tf32
    if name not in mgll.available_backends():
        return None
    return public


def time_one(fn, iters: int, cuda: bool) -> dict:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()  # warm-up: compiles the kernels
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    times = []
    for _ in range(iters):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    stats = {"median_ms": statistics.median(times), "min_ms": min(times), "warmup_s": warm}
    stats["peak_extra_gib"] = peak
    return stats, result


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def benchmark(dry: bool, iters: int, names: list[str], blocks: dict | None = None) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry
    n, g, d = (64, 3, 32) if dry else (16384, 3, 768)
    dtype = torch.bfloat16 if cuda else torch.float32  # no bf16 arithmetic in the interpreter
    inputs = make_inputs(n, g, d, dtype, "cuda" if cuda else "cpu")
    if blocks is not None:
        from mgll.backends import triton_kernels

        triton_kernels.CUDA_BLOCKS.update(blocks)
    rows, results = {}, {}
    for name in names:
        fn = provider(name, inputs)
        if fn is None:
            rows[name] = {"skipped": "not in mgll.available_backends()"}
            continue
        try:
            rows[name], results[name] = time_one(fn, iters, cuda)
        except torch.cuda.OutOfMemoryError as exc:
            rows[name] = {"oom": str(exc).split("\n")[0]}
        print(name, rows[name], flush=True)
    if "reference" in results:
        want_loss, want_grads = results["reference"]
        for name, (loss, grads) in results.items():
            rows[name]["loss"] = float(loss)
            rows[name]["loss_rel_err"] = rel(loss, want_loss)
            rows[name]["grad_rel_err"] = max(
                rel(a, b) for a, b in zip(grads, want_grads, strict=True)
            )
    summary = {"shape": {"N": n, "G": g, "D": d, "dtype": str(dtype)}}
    ref = rows.get("reference", {}).get("median_ms")
    for name, row in rows.items():
        if ref and "median_ms" in row:
            summary[f"speedup_vs_reference[{name}]"] = ref / row["median_ms"]
    summary["device"] = torch.cuda.get_device_name() if cuda else "cpu (interpreter dry run)"
    return {"rows": rows, "summary": summary}


def sweep(dry: bool, iters: int, deadline: float) -> list:
    out = []
    for blocks in SWEEP:
        if time.perf_counter() > deadline:
            out.append({"blocks": blocks, "skipped": "time budget"})
            continue
        res = benchmark(dry, iters, ["triton-bf16"], blocks)
        out.append({"blocks": blocks, **res["rows"]["triton-bf16"]})
        print(out[-1], flush=True)
    return out


def compile_for_cuda(capability: int = 90) -> None:
    """Compile every kernel specialisation the backend launches for sm_<capability>, CPU only."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mgll.backends import _triton_bwd as bwd
    from mgll.backends import _triton_fwd as fwd
    from mgll.backends.triton_kernels import BLOCK_C, CUDA_BLOCKS

    ints = {"N", "KMAX", "D", "NCLS", "G", "row_lo", "row_hi", "col_lo", "col_hi"}
    ints |= {"soft_y", "write_dx", "kind", "has_kl"}
    blocks = {k: v for k, v in CUDA_BLOCKS.items() if k.startswith("BLOCK")}
    opts = {"num_warps": CUDA_BLOCKS["num_warps"], "num_stages": CUDA_BLOCKS["num_stages"]}
    jobs = [(fwd.stats_kernel, {"TEXT_ROWS": r}) for r in (False, True)]
    jobs += [(fwd.kl_kernel, {"GP": gp}) for gp in (2, 4)]
    jobs += [(bwd.dx_kernel, {}), (bwd.dt_kernel, {})]
    for feat, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee")):
        for kernel, extra in jobs:
            consts = {"BLOCK_C": BLOCK_C, "PREC": prec, **blocks, **extra}
            consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
            sig = {}
            for name in kernel.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in ints:
                    sig[name] = "i32"
                elif name in ("KS", "LO", "HI"):
                    sig[name] = "*i32"
                elif name in ("X", "T"):
                    sig[name] = "*" + feat
                else:
                    sig[name] = "*fp32"
            start = time.perf_counter()
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)
            print(f"sm_{capability} {feat} {prec} {kernel.__name__} {extra}: "
                  f"{time.perf_counter() - start:.1f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
