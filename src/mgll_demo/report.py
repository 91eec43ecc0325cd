"""Tables, JSON and the PNG of a demo run."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from mgll_demo.evaluation import COARSE_METRICS, METRICS
from mgll_demo.evaluation import LABELS as _SHORT


def _metrics_of(runs: Sequence[dict]) -> list[str]:
    """The metrics every run has, in table order (coarse zero-shot only on the merged task)."""
    return [m for m in (*METRICS, *COARSE_METRICS) if all(m in r["metrics"] for r in runs)]


def summarise(runs: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric: mean, sample standard deviation (0 for one seed), n.

    NaN values (a metric a model cannot be scored on) are left out; n counts the rest.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    metrics = _metrics_of(runs)
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        out[name] = {}
        for metric in (*metrics, "train_seconds"):
            values = [
                r["metrics"][metric] if metric != "train_seconds" else r[metric] for r in mine
            ]
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
    standard deviation of the differences, n, and ``wins``: the seeds where the method is
    higher.  Methods without a baseline run of the same seed are left out.
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
            }
    return out


def table(
    summary: dict, fmt: str = "text", seconds: bool = True, metrics: Sequence[str] | None = None
) -> str:
    """A plain-text (or reStructuredText list-table) table of the summary.

    With a :func:`paired_differences` dict, cells are signed differences and their wins.
    """
    first = next(iter(summary.values()), {})
    metrics = [m for m in (metrics or (*METRICS, *COARSE_METRICS)) if m in first]
    seconds = seconds and "train_seconds" in first
    header = ["method", *(_SHORT[m] for m in metrics)] + (["train s"] if seconds else [])
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
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


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
    """Training loss, held-out zero-shot AUROC during training, and the final metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    methods = list(summary)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for r in runs:
        label = r["method"] if r["seed"] == runs[0]["seed"] else None
        losses = r["losses"]
        smooth = _moving_average(losses, max(1, len(losses) // 30))
        axes[0].plot([x / losses[0] for x in smooth], color=colors[r["method"]], label=label, lw=1)
        axes[1].plot(
            r["curve_steps"],
            r["curve_zero_shot"],
            "o-",
            color=colors[r["method"]],
            label=label,
            ms=3,
        )
    axes[0].set(title="training loss / initial loss", xlabel="step", yscale="log")
    axes[1].set(title="held-out zero-shot macro AUROC", xlabel="step")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        means = [summary[m][k]["mean"] for k in METRICS]
        stds = [summary[m][k]["std"] for k in METRICS]
        xs = [i + j * width for i in range(len(METRICS))]
        axes[2].bar(xs, means, width, yerr=stds, color=colors[m], label=m)
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(len(METRICS))])
    axes[2].set_xticklabels([_SHORT[k] for k in METRICS], fontsize=8)
    lows = [summary[m][k]["mean"] - summary[m][k]["std"] for m in methods for k in METRICS]
    axes[2].set_ylim(max(0.0, math.floor(min(lows) * 20) / 20 - 0.05), 1.0)
    axes[2].set_title("held-out metrics (mean ± std over seeds)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out
