"""The benchmark suite runs and writes well-formed results (no timing assertions)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STATUSES = {"ok", "oom", "skipped", "error"}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = _run(str(BENCH / "bench.py"), "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_quick_json_is_complete(quick):
    data = json.loads((quick / "results.json").read_text())
    meta = data["meta"]
    for key in (
        "cpu",
        "cpu_count",
        "device",
        "device_name",
        "torch",
        "mgll",
        "date_utc",
        "command",
        "settings",
    ):
        assert meta[key] not in (None, ""), key
    records = data["records"]
    sys.path.insert(0, str(BENCH))
    import providers

    expected = {p for p in providers.provider_names("cpu", include_compile=False)}
    assert {r["provider"] for r in records} == expected
    assert {r["mode"] for r in records} == {"fwd", "fwd+bwd"}
    assert {r["status"] for r in records} <= STATUSES
    assert {r["sweep"] for r in records} == {"N", "G", "D"}
    ok = [r for r in records if r["status"] == "ok"]
    # the first points run before the sweep's time budget can end: every runnable provider
    # has its smallest point
    first = {r["provider"] for r in ok if r["n"] == 64 and r["sweep"] == "N"}
    assert first >= {"naive", "mgll-reference", "floor"}
    for r in ok:
        assert (
            r["time_min_s"] <= r["time_p25_s"] <= r["time_s"] <= r["time_p75_s"] <= r["time_max_s"]
        )
        assert r["time_s"] > 0 and r["mem_bytes"] >= 0 and r["repeats"] >= 3
    for r in records:
        if r["status"] != "ok":
            assert r["reason"], r
    for fit in data["fits"]:
        for k, v in fit.items():
            if k.startswith(("time_vs", "mem_vs")) and v is not None:
                assert math.isfinite(v)


def test_quick_csv_md_png(quick):
    data = json.loads((quick / "results.json").read_text())
    with open(quick / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"])
    assert rows[0]["provider"] == data["records"][0]["provider"]
    md = (quick / "results.md").read_text()
    assert md.startswith("# MGLL benchmark")
    assert "| provider | N=64 | N=128 |" in md and "Scaling exponents" in md
    pngs = sorted(quick.glob("*.png"))
    assert {p.name for p in pngs} == {"time_vs_n_fp32.png", "memory_vs_n_fp32.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_enforces_memory_budget():
    """A fresh worker per point; past the RLIMIT_AS budget the point is recorded as oom."""
    spec = dict(
        provider="naive",
        sweep="N",
        n=2048,
        g=2,
        d=32,
        dtype="fp32",
        device="cpu",
        min_time=0.0,
        threads=1,
        budget_bytes=8 * 2**20,
    )
    proc = _run(str(BENCH / "measure.py"), json.dumps(spec), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["mode"] for r in records] == ["fwd", "fwd+bwd"]
    assert all(r["status"] == "oom" for r in records), records


def test_slope_recovers_exponent():
    sys.path.insert(0, str(BENCH))
    import report

    xs = [512, 1024, 2048, 4096]
    assert report.slope(xs, [3e-9 * x**2 for x in xs]) == pytest.approx(2.0)
    assert report.slope([512], [1.0]) is None


def test_precheck_skips_after_oom_and_slow_points():
    sys.path.insert(0, str(BENCH))
    import time

    import bench

    args = bench.parse_args(["--quick", "--max-call-s", "1", "--max-mem-call-s", "10"])
    done = [
        dict(provider="naive", g=2, d=32, dtype="fp32", n=64, mode="fwd+bwd", status="oom"),
        dict(
            provider="floor", g=2, d=32, dtype="fp32", n=64, mode="fwd+bwd", status="ok", time_s=0.5
        ),
    ]
    now = time.perf_counter()

    def spec(provider, n):
        return dict(provider=provider, g=2, d=32, dtype="fp32", n=n, device="cpu")

    assert "out of memory already at N=64" in bench.precheck(spec("naive", 128), done, args, now)
    s = spec("floor", 128)  # predicted 2 s: too slow to time, run once for memory
    assert bench.precheck(s, done, args, now) is None and s["mem_only"]
    assert "predicted 32 s" in bench.precheck(spec("floor", 512), done, args, now)
    assert "time budget" in bench.precheck(spec("floor", 64), [], args, now - 1e6)
    assert "needs CUDA" in bench.precheck(spec("mgll-triton", 64), [], args, now)


def test_perf_targets_quick(tmp_path):
    """The performance-target script runs end to end on tiny shapes and writes its table."""
    out = tmp_path / "perf.json"
    proc = _run(str(BENCH / "perf_targets.py"), "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {r["target"] for r in data["rows"]} == {"1", "2", "3", "5"}
    assert len(data["load_average_before"]) == 3
    for r in data["rows"]:
        assert math.isfinite(r["value"]) and r["value"] >= 0, r
        assert r["verdict"] == "met" or r["verdict"].startswith(("missed", "reported")), r
    assert "verdict" in proc.stdout and "load average" in proc.stdout


def test_readers_quick(tmp_path):
    """The reader benchmark runs end to end on small files: every reader and reference row, the
    index memory and the worker growth, for both forms."""
    out = tmp_path / "readers.json"
    proc = _run(str(BENCH / "readers.py"), "--quick", "--data", str(tmp_path / "data"),
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {"chestxray14", "chexpert", "chexpert U-Soft", "mimic_cxr (join)",
             "chestxray14 csv.reader", "chexpert csv.reader", "chexpert floor"}  # fmt: skip
    assert set(data["speed"]) == names
    for name, r in data["speed"].items():
        assert r["rows"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0, (name, r)
    for part in ("memory", "workers"):
        assert {r["status"] for r in data[part].values()} == {"ok"}, data[part]
    assert data["memory"]["compact"]["images"] == data["memory"]["list"]["images"] == 20_000
    assert "chexpert floor" in proc.stdout
