"""Tables, JSON and the PNG of a demo run."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path

from mgll_demo.evaluation import AUROC_METRICS, COARSE_METRICS, METRICS
from mgll_demo.evaluation import LABELS as _SHORT


def _metrics_of(runs: Sequence[dict]) -> list[str]:
    """The metrics every run has, in table order (coarse zero-shot only on the merged task)."""
    return [m for m in (*METRICS, *COARSE_METRICS) if all(m in r["metrics"] for r in runs)]


def metric_names(runs_or_summary) -> list[str]:
    """The metrics present, in the order the evaluation reported them (not ``train_seconds``)."""
    if isinstance(runs_or_summary, dict):
        keys = (k for stats in runs_or_summary.values() for k in stats)
    else:
        keys = (k for r in runs_or_summary for k in r["metrics"])
    return [k for k in dict.fromkeys(keys) if k != "train_seconds"]


def label(metric: str) -> str:
    return _SHORT.get(metric, metric.replace("_", " "))


def summarise(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric: mean, sample standard deviation (0 for one seed), n.

    NaN values (a metric a model cannot be scored on) are left out; n counts the rest.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    names = metric_names(runs)
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        out[name] = {}
        for metric in (*names, "train_seconds"):
            if metric == "train_seconds":
                values = [r[metric] for r in mine]
            else:
                values = [r["metrics"][metric] for r in mine if metric in r["metrics"]]
            values = [v for v in values if not math.isnan(v)]
            if not values:
                out[name][metric] = {"mean": math.nan, "std": math.nan, "n": 0}
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[name][metric] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return out


def paired_differences(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric, the per-seed difference to its baseline run of the same seed.

    A run's baseline is ``run["baseline"]`` (default ``"clip"``).  Returns mean and sample
    standard deviation of the differences, n, ``wins``: the seeds where the method is
    higher, and ``per_seed``: each difference, in the order of the runs.  Methods without a
    baseline run of the same seed are left out.
    """
    by_key = {(r["method"], r["seed"]): r for r in runs}
    metrics = _metrics_of(runs)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        pairs = [(r, by_key.get((r.get("baseline", "clip"), r["seed"]))) for r in mine]
        pairs = [(r, b) for r, b in pairs if b is not None and b is not r]
        if not pairs:
            continue
        out[name] = {}
        for metric in metrics:
            diffs = [r["metrics"][metric] - b["metrics"][metric] for r, b in pairs]
            diffs = [d for d in diffs if not math.isnan(d)]
            if not diffs:
                continue
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            wins = sum(d > 0 for d in diffs)
            out[name][metric] = {
                "mean": statistics.fmean(diffs),
                "std": std,
                "n": len(diffs),
                "wins": wins,
                "per_seed": diffs,
            }
    return out


def contrasts(
    runs: Sequence[dict], pairs: Sequence[tuple[str, str]]
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`paired_differences` of method against base, per ``(method, base)`` pair.

    Names are matched within each merged-task fraction (``"mgll_masked f=0.5"`` against
    ``"mgll_negative f=0.5"``); the keys read ``"method - base f=0.5"``.  Pairs with no run
    of both on a common seed are left out.
    """
    out = {}
    for method, base in pairs:
        for frac in dict.fromkeys(r.get("fraction") for r in runs):
            tail = "" if frac is None else f" f={frac:g}"
            mine = [dict(r, baseline=base + tail) for r in runs if r["method"] == method + tail]
            diff = paired_differences(mine + [r for r in runs if r["method"] == base + tail])
            if method + tail in diff:
                out[f"{method} - {base}{tail}"] = diff[method + tail]
    return out


WIDTH = 100
"""The most characters a line of a plain-text :func:`table` takes."""


def table(
    summary: dict, fmt: str = "text", seconds: bool = True, metrics: Sequence[str] | None = None
) -> str:
    """A plain-text (or reStructuredText list-table) table of the summary.

    With a :func:`paired_differences` dict, cells are signed differences and their wins.  The
    plain-text table fits :data:`WIDTH` columns: headers wrap over several lines, and when the
    metrics still do not fit they go into several blocks, each starting with the method names.
    """
    first = next(iter(summary.values()), {})
    metrics = [m for m in (metrics or metric_names(summary)) if m in first]
    seconds = seconds and "train_seconds" in first
    header = ["method", *(label(m) for m in metrics)] + (["train s"] if seconds else [])
    rows = []
    for name, stats in summary.items():
        cells = [name]
        for metric in metrics:
            s = stats.get(metric)
            cells.append(_cell(s))
        if seconds:
            cells.append(f"{stats['train_seconds']['mean']:.0f}")
        rows.append(cells)
    if fmt == "rst":
        lines = [".. list-table::", "   :header-rows: 1", ""]
        for row in [header, *rows]:
            lines.append("   * - " + row[0])
            lines.extend(f"     - {c}" for c in row[1:])
        return "\n".join(lines)
    return _text_table(header, rows)


def _text_table(header: list[str], rows: list[list[str]], width: int = WIDTH) -> str:
    """Columns at least as wide as their cells (headers wrap), in blocks of ``width`` chars."""
    cells = [max((len(r[i]) for r in rows), default=0) for i in range(len(header))]
    widths = [max(w, min(len(h), 8), _longest_word(h)) for w, h in zip(cells, header, strict=True)]
    widths[0] = max(len(header[0]), cells[0])
    heads = [
        textwrap.wrap(h, w, break_long_words=False, break_on_hyphens=False) or [""]
        for h, w in zip(header, widths, strict=True)
    ]
    blocks, current, used = [], [], widths[0]
    for i in range(1, len(header)):  # greedy: as many columns per block as fit
        if current and used + 2 + widths[i] > width:
            blocks.append(current)
            current, used = [], widths[0]
        current.append(i)
        used += 2 + widths[i]
    blocks.append(current)
    out = []
    for cols in blocks:
        cols = [0, *cols]
        depth = max(len(heads[i]) for i in cols)
        padded = [[""] * (depth - len(heads[i])) + heads[i] for i in cols]  # bottom-aligned
        lines = [[h[k] for h in padded] for k in range(depth)]
        lines.append(["-" * widths[i] for i in cols])
        lines.extend([r[i] for i in cols] for r in rows)
        text = (
            "  ".join(c.ljust(widths[i]) for c, i in zip(ln, cols, strict=True)).rstrip()
            for ln in lines
        )
        out.append("\n".join(text))
    return "\n\n".join(out)


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def _cell(s: dict | None) -> str:
    if s is None or s["n"] == 0:
        return "n/a"
    if "wins" in s:
        text = f"{s['mean']:+.4f}" + (f" ± {s['std']:.4f}" if s["n"] > 1 else "")
        return text + f" ({s['wins']}/{s['n']})"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["n"] > 1 else "")


def save_json(path: Path, config: dict, runs: Sequence[dict], summary: dict) -> None:
    data = {"config": config, "summary": summary, "paired": paired_differences(runs)}
    path.write_text(json.dumps({**data, "runs": list(runs)}, indent=1))


def save_png(path: Path, runs: Sequence[dict], summary: dict) -> None:
    """Write :func:`figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(runs, summary)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(runs: Sequence[dict], summary: dict):
    """Training loss, held-out zero-shot AUROC during training, and the final metrics.

    Every panel has a y-axis label; the losses are the raw values on one shared axis (each
    method's own objective, so compare their shapes, not their heights); the curves are the
    class-prompt zero-shot AUROC (the bars also show the caption-marginal one); the bars start
    at 0, with a dashed line at 0.5 on the AUROC metrics; error bars and "mean ± std" appear
    only when a method has several seeds.  With up to :data:`EXPLAINED` methods, the legend
    gives each one's ``description`` (from the runs) after its name.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    metrics = metric_names(summary)
    seeds = sorted({r["seed"] for r in runs})
    several = max((s["n"] for st in summary.values() for s in st.values()), default=1) > 1
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11})
    wide = max(1.3, 0.28 * len(metrics))  # the bar panel grows with the number of metrics
    fig, axes = plt.subplots(
        1, 3, figsize=(12 + 3.8 * wide, 5.8), gridspec_kw={"width_ratios": [1, 1, wide]}
    )
    for r in runs:
        losses = r["losses"]
        smooth = _moving_average(losses, max(1, len(losses) // 30))
        steps = range(1, len(smooth) + 1)
        axes[0].plot(steps, smooth, color=colors[r["method"]], lw=1.5, alpha=0.9)
        if r.get("curve_steps"):
            axes[1].plot(
                r["curve_steps"], r["curve_zero_shot"], "o-", color=colors[r["method"]], ms=4
            )
    axes[0].set(
        title="training loss (each method's own objective)",
        xlabel="step",
        ylabel="loss (nats, moving average)",
    )
    axes[1].axhline(0.5, color="0.5", ls="--", lw=1)
    axes[1].text(
        0.01,
        0.5,
        "chance",
        color="0.4",
        ha="left",
        va="bottom",
        transform=axes[1].get_yaxis_transform(),
    )
    axes[1].set(
        title='held-out zero-shot AUROC during training\n(class prompts, e.g. "digits 3")',
        xlabel="step",
        ylabel="zero-shot macro AUROC, class prompts",
    )
    lo = min([0.5, *(min(r["curve_zero_shot"]) for r in runs if r.get("curve_zero_shot"))])
    axes[1].set_ylim(max(0.0, math.floor(lo * 10) / 10 - 0.02), 1.0)

    ax = axes[2]
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(metrics))]
        means = [summary[m].get(k, {"mean": math.nan})["mean"] for k in metrics]
        stds = [summary[m].get(k, {"std": 0.0})["std"] for k in metrics]
        bars = ax.bar(
            xs,
            means,
            width * 0.95,
            color=colors[m],
            yerr=stds if several else None,
            capsize=3 if several else 0,
        )
        crowded = len(methods) * len(metrics) > 12
        ax.bar_label(
            bars,
            fmt="%.2f",
            fontsize=7 if crowded else 9,
            rotation=90 if crowded else 0,
            padding=6 if several else 2,
        )
    chance = [i for i, k in enumerate(metrics) if k in AUROC_METRICS]
    for i in chance:  # AUROC's chance level; nDCG's and mAP's depend on the labels
        ax.plot([i - 0.45, i + 0.45], [0.5, 0.5], color="0.15", ls="--", lw=1.2, zorder=3)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([_tick(label(k)) for k in metrics], fontsize=9 if len(metrics) > 5 else 11)
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("held-out score (higher is better)")
    dashed = "; dashed: AUROC chance" if chance else ""
    if several:
        n = max(s["n"] for st in summary.values() for s in st.values())
        ax.set_title(f"held-out metrics: mean ± std over {n} seeds{dashed}")
    else:
        ax.set_title(f"held-out metrics, one run (seed {seeds[0]}{dashed})")
    handles = [plt.Line2D([], [], color=colors[m], lw=6) for m in methods]
    described = {r["method"]: r["description"] for r in runs if r.get("description")}
    if len(methods) <= EXPLAINED and described:  # say what each name means, one per line
        names = [f"{m}: {described[m]}" if m in described else m for m in methods]
        ncol = 1
    else:  # too many to explain: the names, and the descriptions in results.json
        names, ncol = methods, min(len(methods), 5)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=11, frameon=False)
    rows = math.ceil(len(methods) / ncol)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * rows, 1, 1))
    return fig


EXPLAINED = 6
"""Up to this many methods, the figure's legend explains each name with its description."""


def _tick(text: str) -> str:
    """A bar label on about two lines (``"new metric"`` -> ``"new\\nmetric"``)."""
    return textwrap.fill(text, width=max(6, math.ceil(len(text) / 2)), break_long_words=False)


def _moving_average(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out
