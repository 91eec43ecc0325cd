"""Log-log plots of time and memory against N, one line per provider (matplotlib, lazily)."""

from __future__ import annotations

from pathlib import Path


def plot_all(out: Path, meta: dict, records: list[dict]) -> list[str]:
    """Write ``time_vs_n_<dtype>.png`` and ``memory_vs_n_<dtype>.png``; return the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = meta["settings"]
    label = f"{meta['device_name']} · torch {meta['torch']} · {meta['date_utc']}\n{meta['command']}"
    written = []
    for dtype in s["dtypes"]:
        for quantity, key, unit, scale in (
            ("time", "time_s", "ms", 1e3),
            ("memory", "mem_bytes", "MiB", 2.0**-20),
        ):
            fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
            drawn = False
            for ax, mode in zip(axes, ("fwd+bwd", "fwd"), strict=True):
                for p in dict.fromkeys(r["provider"] for r in records):
                    pts = sorted(
                        (r["n"], r[key] * scale)
                        for r in records
                        if r["provider"] == p
                        and r["mode"] == mode
                        and r["dtype"] == dtype
                        and r["sweep"] == "N"
                        and r["g"] == s["g0"]
                        and r["d"] == s["d0"]
                        and r["status"] == "ok"
                        and r.get(key)
                    )
                    if not pts:
                        continue
                    xs, ys = zip(*pts, strict=True)
                    style = "--" if p in ("floor", "open_clip") else "-"
                    ax.plot(xs, ys, style, marker="o" if len(xs) > 1 else "s", label=p)
                    drawn = True
                ax.set_xscale("log", base=2)
                ax.set_xticks(s["n"], [str(n) for n in s["n"]])
                ax.set_yscale("log")
                ax.set_xlabel("N (batch size)")
                ax.set_title(f"{mode}, G={s['g0']}, D={s['d0']}, {dtype}")
                ax.grid(True, which="both", alpha=0.3)
            if not drawn:
                plt.close(fig)
                continue
            axes[0].set_ylabel(
                f"{quantity} ({unit})" + (" beyond inputs" if key == "mem_bytes" else "")
            )
            axes[0].legend(fontsize=8)
            fig.suptitle(label, fontsize=8)
            fig.tight_layout()
            name = f"{quantity}_vs_n_{dtype}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written
