"""Measure one benchmark point: time and peak memory of a provider's forward and step.

CPU: a fresh worker process per point (``python measure.py '<json spec>'`` prints one JSON
line).  Memory is the growth of the resident set during one call, read from the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set
just before the call, after the inputs exist ("extra memory").  The memory budget is enforced
with ``RLIMIT_AS``: the address space may grow by at most ``budget_bytes`` beyond its size after
the inputs are built and the thread pools started; an allocation past it fails and the point is
recorded as ``oom``.  Time: a warm ``perf_counter`` loop, in repeats of about 20 ms.

CUDA: points run in the calling process; memory is ``torch.cuda.max_memory_allocated`` minus
the memory allocated before the call; time is ``triton.testing.do_bench`` (CUDA events, L2
flushed between calls), or a CUDA-event loop when triton is missing.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import resource
import statistics
import sys
import time

import providers
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")


def is_oom(err: BaseException) -> bool:
    """True for out-of-memory errors of the CPU allocator, CUDA and the memory limit."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return any(k in text for k in ("out of memory", "can't allocate memory", "bad_alloc"))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _malloc_release() -> None:
    """Make glibc hand freed blocks back to the OS, so the RSS reflects live memory only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks always mmap'd
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(fn, device: str) -> int:
    """Bytes used by one call of ``fn`` beyond what was allocated (GPU) or resident (CPU)."""
    gc.collect()
    if device == "cpu":
        _malloc_release()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    if not _reset_hwm():
        raise RuntimeError("/proc/self/clear_refs not writable: cannot reset the peak RSS")
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - base)


def timed_call(fn) -> float:
    """Seconds taken by one call of ``fn`` (synchronised)."""
    start = time.perf_counter()
    fn()
    _cuda_sync()
    return time.perf_counter() - start


def measure_time(fn, device: str, min_time: float, warm: float) -> dict:
    """Median, quartiles and range of the seconds per call over 3 to 50 timed repeats.

    ``warm`` is the duration of an earlier, warm call.  CPU: each repeat runs ``fn`` enough
    times to last about 20 ms (or ``min_time / 3``), and the repeats fill ``min_time`` seconds,
    at least 3 of them (a plain ``perf_counter`` loop: ``torch.utils.benchmark``'s block sizing gave a single block
    for calls of 10-100 ms, hence no spread).
    """
    if device == "cuda":
        return _time_cuda(fn, min_time, warm)
    number = max(1, math.ceil(min(0.02, min_time / 3) / max(warm, 1e-7)))
    repeats = int(min(50, max(3, min_time / (max(warm, 1e-7) * number))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return _summary(times, number, "perf_counter loop")


def _time_cuda(fn, min_time: float, warm: float) -> dict:
    """``do_bench`` for calls that fit ~3 times in ``min_time``, else a CUDA-event loop.

    (``do_bench`` sizes its repeats from ``rep`` milliseconds: a slow call would be timed once.)
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and 3 * warm <= min_time:
        q = do_bench(fn, warmup=25, rep=int(min_time * 1000), quantiles=[0.5, 0.25, 0.75, 0.0, 1.0])
        med, p25, p75, lo, hi = (x / 1000 for x in q)
        return {
            "time_s": med,
            "time_p25_s": p25,
            "time_p75_s": p75,
            "time_min_s": lo,
            "time_max_s": hi,
            "repeats": max(1, int(min_time / max(warm, 1e-7))),  # do_bench's own estimate
            "number": 1,
            "timer": "triton.testing.do_bench",
        }
    times, end = [], time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 100):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return _summary(times, 1, method="cuda events")


def _summary(times: list[float], number: int, method: str) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {
        "time_s": statistics.median(times),
        "time_p25_s": q[0],
        "time_p75_s": q[2],
        "time_min_s": min(times),
        "time_max_s": max(times),
        "repeats": len(times),
        "number": number,
        "timer": method,
    }


def run_point(spec: dict) -> list[dict]:
    """One record per mode for ``spec`` (provider, n, g, d, dtype, device and limits)."""
    device, name = spec["device"], spec["provider"]
    base = {k: spec[k] for k in ("provider", "sweep", "n", "g", "d", "dtype", "device")}
    if spec.get("mem_only"):
        base["mem_only"] = True
    records = []
    try:
        inp = providers.make_inputs(spec["n"], spec["g"], spec["d"], DTYPES[spec["dtype"]], device)
        _start_pools(device, compiled=name.endswith("+compile"))
        if device == "cpu" and spec.get("budget_bytes"):
            limit = _status_kb("VmSize") + int(spec["budget_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        forward, step = providers.build(name, inp)
    except providers.Skip as err:
        return [{**base, "mode": m, "status": "skipped", "reason": str(err)} for m in MODES]
    for mode, fn in zip(MODES, (forward, step), strict=True):
        rec = {**base, "mode": mode}
        try:
            if name.endswith("+compile"):
                rec["compile_s"] = timed_call(fn)  # compile first: its memory is not the loss's
            start = time.perf_counter()
            rec["mem_bytes"] = measure_memory(fn, device)  # eager: also the warm-up
            warm = time.perf_counter() - start
            if spec.get("mem_only"):  # too slow to repeat: the memory call's time, once
                rec.update(_summary([warm], 1, "single call (memory run, not repeated)"))
            else:
                warm = timed_call(fn) if warm < 1.0 else warm  # the first call ran cold
                rec.update(measure_time(fn, device, spec["min_time"], warm))
            rec["status"] = "ok"
        except Exception as err:  # record and go on: one provider must not end the sweep
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            rec["status"] = "oom" if is_oom(err) else "error"
            if name.endswith("+compile") and rec["status"] == "error":
                rec["status"] = "skipped"
                first = f"torch.compile failed: {type(err).__name__}: {first}"
            rec["reason"] = first or type(err).__name__
            rec.pop("mem_bytes", None)
        if rec["status"] != "ok" and device == "cuda":  # the traceback is gone: free its blocks
            gc.collect()
            torch.cuda.empty_cache()
        records.append(rec)
    return records


def _start_pools(device: str, compiled: bool) -> None:
    """Run a tiny op (and a tiny compile) first, so thread pools and imports count as baseline."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    (x @ x).sum().backward()
    if compiled:
        torch.compile(lambda a: (a * 2).sum())(torch.randn(8, device=device))
    _cuda_sync()


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    print(json.dumps(run_point(spec)), flush=True)


if __name__ == "__main__":
    main()
