"""Turn benchmark records into ``results.json``, ``results.csv`` and ``results.md``.

Also derives the scaling exponents (least-squares slopes on log-log axes), the largest N each
provider ran within the memory budget, and the headline ratios against the naive composition
and the matmul floor.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = [
    "provider",
    "sweep",
    "n",
    "g",
    "d",
    "dtype",
    "device",
    "mode",
    "status",
    "time_s",
    "time_p25_s",
    "time_p75_s",
    "time_min_s",
    "time_max_s",
    "repeats",
    "number",
    "mem_bytes",
    "compile_s",
    "timer",
    "reason",
    "loadavg",
]


def ok(records: list[dict], **match) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def providers_in(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["provider"] for r in records))


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than 2 distinct x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def fits(records: list[dict], meta: dict) -> list[dict]:
    """Exponents of time and memory against N, G and D per provider, mode and dtype."""
    s = meta["settings"]
    out = []
    for dtype in s["dtypes"]:
        for p in providers_in(records):
            for mode in ("fwd", "fwd+bwd"):
                row = {"provider": p, "dtype": dtype, "mode": mode}
                for var, fixed in (
                    ("n", dict(g=s["g0"], d=s["d0"])),
                    ("g", dict(n=s["mid_n"], d=s["d0"])),
                    ("d", dict(n=s["mid_n"], g=s["g0"])),
                ):
                    pts = ok(records, provider=p, dtype=dtype, mode=mode, **fixed)
                    if var == "n":  # the smallest N is mostly fixed overhead: fit from the 2nd on
                        ns = sorted({r["n"] for r in pts})
                        pts = [r for r in pts if len(ns) < 3 or r["n"] >= ns[1]]
                    xs = [r[var] for r in pts]
                    timed = [r for r in pts if not r.get("mem_only")]  # single cold calls out
                    row[f"time_vs_{var}"] = slope(
                        [r[var] for r in timed], [r["time_s"] for r in timed]
                    )
                    row[f"mem_vs_{var}"] = slope(xs, [r["mem_bytes"] for r in pts])
                    row[f"{var}_range"] = [min(xs), max(xs)] if xs else None
                out.append(row)
    return out


def budget(records: list[dict], meta: dict, budget_gb: float | None) -> list[dict]:
    """Largest N that ran (fwd+bwd) per provider, the first that did not, and an estimate."""
    s = meta["settings"]
    out = []
    for dtype in s["dtypes"]:
        for p in providers_in(records):
            rs = [
                r
                for r in records
                if r["provider"] == p
                and r["dtype"] == dtype
                and r["mode"] == "fwd+bwd"
                and r["g"] == s["g0"]
                and r["d"] == s["d0"]
                and r["sweep"] == "N"
            ]
            good = [r for r in rs if r["status"] == "ok"]
            oom = [r for r in rs if r["status"] == "oom"]
            row = {
                "provider": p,
                "dtype": dtype,
                "largest_ok_n": max((r["n"] for r in good), default=None),
                "first_oom_n": min((r["n"] for r in oom), default=None),
                "mem_at_largest": max(good, key=lambda r: r["n"])["mem_bytes"] if good else None,
            }
            k = slope([r["n"] for r in good], [r["mem_bytes"] for r in good])
            if budget_gb and good and k and k > 0 and row["first_oom_n"] is None:
                last = max(good, key=lambda r: r["n"])
                est = int(last["n"] * (budget_gb * 1e9 / last["mem_bytes"]) ** (1 / k))
                row["extrapolated_n"] = est if est <= 4 * last["n"] else f"> {4 * last['n']}"
            out.append(row)
    return out


def headline(records: list[dict], meta: dict) -> list[dict]:
    """Every provider against naive and floor at the N sweep (fwd+bwd): time and memory ratios."""
    s = meta["settings"]
    out = []
    for dtype in s["dtypes"]:
        for n in s["n"]:
            base = {
                r["provider"]: r
                for r in ok(
                    records, n=n, g=s["g0"], d=s["d0"], dtype=dtype, mode="fwd+bwd", sweep="N"
                )
            }
            for p, r in base.items():
                row = {
                    "provider": p,
                    "dtype": dtype,
                    "n": n,
                    "time_s": r["time_s"],
                    "mem_bytes": r["mem_bytes"],
                }
                for ref in ("naive", "floor"):
                    if ref in base:
                        row[f"time_vs_{ref}"] = r["time_s"] / base[ref]["time_s"]
                        row[f"mem_vs_{ref}"] = r["mem_bytes"] / max(base[ref]["mem_bytes"], 1)
                out.append(row)
    return out


def write_records(out: Path, meta: dict, records: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))


def write_all(out: Path, meta: dict, records: list[dict], budget_gb: float | None) -> dict:
    summary = {
        "fits": fits(records, meta),
        "budget": budget(records, meta, budget_gb),
        "ratios": headline(records, meta),
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "records": records, **summary}, indent=1)
    )
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    (out / "results.md").write_text(markdown(meta, records, summary))
    return summary


# ------------------------------------------------------------------------------- markdown


def _ms(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return {"oom": "OOM", "skipped": "–", "error": "error"}[r["status"]]
    if r.get("mem_only"):
        return f"{_num(r['time_s'] * 1e3)} (1 call)"
    return f"{_num(r['time_s'] * 1e3)} ±{_num((r['time_p75_s'] - r['time_p25_s']) * 1e3)}"


def _num(x: float) -> str:
    """Three significant digits without exponents: 4541 -> '4541', 0.01234 -> '0.0123'."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mib(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return {"oom": "OOM", "skipped": "–", "error": "error"}[r["status"]]
    return f"{r['mem_bytes'] / 2**20:.4g}"


def _extra(x) -> str:
    """An extrapolated N: '~6701', or the cap when the fit would reach past 4x the data."""
    return "" if x is None else x if isinstance(x, str) else f"~{x}"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def _grid(records, var, values, fixed, cell, title) -> list[str]:
    lines = [
        f"**{title}**",
        "",
        "| provider | " + " | ".join(f"{var.upper()}={v}" for v in values) + " |",
        "|---" * (len(values) + 1) + "|",
    ]
    for p in providers_in(records):
        row = []
        for v in values:
            match = [
                r
                for r in records
                if r["provider"] == p and r[var] == v and all(r[k] == x for k, x in fixed.items())
            ]
            row.append(cell(match[0] if match else None))
        if any(row):
            lines.append(f"| {p} | " + " | ".join(row) + " |")
    return [*lines, ""] if len(lines) > 4 else []


def _shared_warning(meta: dict) -> list[str]:
    loads = [x[0] for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x]
    if meta["device"] != "cpu" or not loads or max(loads) <= meta["cpu_count"]:
        return []
    return [
        f"* **shared machine**: load average up to {max(loads):.1f} on {meta['cpu_count']} "
        "cores while measuring; absolute times are inflated and noisy, ratios within one "
        "run less so"
    ]


def markdown(meta: dict, records: list[dict], summary: dict) -> str:
    s = meta["settings"]
    timers = ", ".join(sorted({r["timer"] for r in records if r.get("timer")})) or "none"
    load = f"load average {meta.get('loadavg_start')} at start, {meta.get('loadavg_end')} at end"
    lines = [
        f"# MGLL benchmark — {meta['device_name']}",
        "",
        f"* machine: {meta['cpu']} ({meta['cpu_count']} cores, {meta['torch_threads']} torch "
        f"threads); device: {meta['device']} ({meta['device_name']}); {load}",
        f"* {meta['date_utc']}; torch {meta['torch']}; mgll {meta['mgll']} "
        f"(commit {meta.get('git_commit')}); backends {', '.join(meta['mgll_backends'])}",
        f"* command: `{meta['command']}`; wall {meta.get('wall_s')} s",
        f"* time: median ± interquartile range in ms ({timers}); "
        f"memory: {s['memory']}, MiB; budget: {s['budget_gb']} GB ({s['budget_enforcement']})",
        *_shared_warning(meta),
        "* paired inputs, logit scale 14, class ids per granularity 8, N/8, N/2; "
        "`–` skipped (reason in results.json), OOM out of memory",
        "",
    ]
    for dtype in s["dtypes"]:
        for mode in ("fwd+bwd", "fwd"):
            fixed_n = dict(g=s["g0"], d=s["d0"], dtype=dtype, mode=mode, sweep="N")
            lines += _grid(
                records,
                "n",
                s["n"],
                fixed_n,
                _ms,
                f"{mode} time (ms) vs N — G={s['g0']}, D={s['d0']}, {dtype}",
            )
            lines += _grid(
                records,
                "n",
                s["n"],
                fixed_n,
                _mib,
                f"{mode} extra memory (MiB) vs N — G={s['g0']}, D={s['d0']}, {dtype}",
            )
        fixed = dict(dtype=dtype, mode="fwd+bwd")
        lines += _grid(
            records,
            "g",
            s["g"],
            dict(fixed, n=s["mid_n"], d=s["d0"]),
            _ms,
            f"fwd+bwd time (ms) vs G — N={s['mid_n']}, D={s['d0']}, {dtype}",
        )
        lines += _grid(
            records,
            "d",
            s["d"],
            dict(fixed, n=s["mid_n"], g=s["g0"]),
            _ms,
            f"fwd+bwd time (ms) vs D — N={s['mid_n']}, G={s['g0']}, {dtype}",
        )
    lines += [
        "**Ratios, fwd+bwd (time and memory ÷ naive, ÷ floor)**",
        "",
        "| provider | dtype | N | ms | MiB | time ÷ naive | time ÷ floor | mem ÷ naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["ratios"]:
        lines.append(
            f"| {r['provider']} | {r['dtype']} | {r['n']} | {_num(r['time_s'] * 1e3)} | "
            f"{r['mem_bytes'] / 2**20:.4g} | {_f(r.get('time_vs_naive'))} | "
            f"{_f(r.get('time_vs_floor'))} | {_f(r.get('mem_vs_naive'))} |"
        )
    lines += [
        "",
        f"**Largest N within the budget (fwd+bwd, G={s['g0']}, D={s['d0']})**",
        "",
        "| provider | dtype | largest N run | first N out of memory | MiB at largest | "
        "extrapolated N (memory fit) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["budget"]:
        lines.append(
            f"| {r['provider']} | {r['dtype']} | {_f(r['largest_ok_n'], '{}')} | "
            f"{_f(r['first_oom_n'], '{}')} | {_f(r['mem_at_largest'] and r['mem_at_largest'] / 2**20, '{:.4g}')} | "
            f"{_extra(r.get('extrapolated_n'))} |"
        )
    lines += [
        "",
        "**Scaling exponents (log-log slopes; N fitted from the second N on)**",
        "",
        "| provider | dtype | mode | time~N | mem~N | time~G | mem~G | time~D | mem~D |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["fits"]:
        vals = [_f(r[f"{q}_vs_{v}"]) for v in ("n", "g", "d") for q in ("time", "mem")]
        if any(vals):
            lines.append(
                f"| {r['provider']} | {r['dtype']} | {r['mode']} | " + " | ".join(vals) + " |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- docs (rst)


def to_rst(md: str, images: list[str], title: str) -> str:
    """The markdown report as reStructuredText (list-tables), followed by the plots."""
    out = [title, "-" * len(title), ""]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# "):
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out += [".. list-table::", "   :header-rows: 1", ""]
            for row in rows:
                out.append("   * - " + _rst_inline(row[0] or " "))
                out += [f"     - {_rst_inline(c) or ' '}" for c in row[1:]]
            out.append("")
            continue
        if line.startswith("**") and line.endswith("**"):
            out += [f".. rubric:: {line.strip('*')}", ""]
        elif line.startswith("* "):
            out.append("* " + _rst_inline(line[2:]))
        elif line.strip():
            out.append(_rst_inline(line))
        else:
            out.append("")
        i += 1
    for img in images:
        out += [f".. image:: {img}", "   :width: 100%", ""]
    return "\n".join(out) + "\n"


def _rst_inline(text: str) -> str:
    parts = text.split("`")
    return "".join(
        f"``{p}``" if k % 2 else p.replace("**", "\0").replace("*", r"\*").replace("\0", "**")
        for k, p in enumerate(parts)
    )


def rewrite(out: Path) -> None:
    """Recompute the summaries, CSV and tables of a finished run from its ``results.json``."""
    data = json.loads((out / "results.json").read_text())
    write_all(out, data["meta"], data["records"], data["meta"]["settings"]["budget_gb"])


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Print a results directory as an rst section.")
    p.add_argument("results", type=Path, help="directory holding results.md and the PNGs")
    p.add_argument("--title", required=True)
    p.add_argument("--images", default="", help="prefix of the image paths in the rst")
    p.add_argument("--rewrite", action="store_true", help="first redo results.md/csv from json")
    a = p.parse_args()
    if a.rewrite:
        rewrite(a.results)
    pngs = sorted(x.name for x in a.results.glob("*.png"))
    print(to_rst((a.results / "results.md").read_text(), [a.images + x for x in pngs], a.title))
