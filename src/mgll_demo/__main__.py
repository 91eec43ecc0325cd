"""``mgll-demo``: CLIP vs MGLL on multi-label handwritten digits, on the CPU, in minutes.

Run ``mgll-demo --help`` for the options; the docs page "The digits demo" explains the task,
the towers and the measured results.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

QUICK = {"steps": 30, "batch_size": 64, "n_train": 1200, "n_test": 300, "n_probe": 400}
FULL = {"steps": 300, "batch_size": 128, "n_train": 10000, "n_test": 1500, "n_probe": 2000}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mgll-demo",
        description="Train the same small towers on multi-label MNIST canvases with the standard "
        "CLIP loss and with MGLLLoss, and compare them on a held-out split.",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run for CI (well under a minute)")
    p.add_argument("--ablation", action="store_true", help="also run every ablation variant")
    p.add_argument(
        "--merged",
        action="store_true",
        help="the merged-datasets sweep: part of the training canvases annotated only coarsely "
        "(parity), fine fractions --fractions, CLIP and MGLL on the mixed captions and on the "
        "fine subset alone",
    )
    p.add_argument(
        "--fractions",
        default="0.05,0.2,1.0",
        help="--merged: comma-separated fine fractions (default 0.05,0.2,1.0)",
    )
    p.add_argument(
        "--probe",
        choices=("ridge", "logistic"),
        default="ridge",
        help="linear-probe solver (default ridge: closed form; logistic: L-BFGS, slower)",
    )
    p.add_argument("--methods", help="comma-separated method names to run (default: by mode)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds: seed, seed+1, ...")
    p.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {FULL['batch_size']})")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (left out anyway when standard error is not a terminal)",
    )
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier results.json files")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def select_methods(args: argparse.Namespace):
    from mgll_demo.training import ABLATION, COMPARISON, EXTRA, FAIR, MERGED, PARTIAL

    known = {m.name: m for m in (*COMPARISON, *ABLATION, *FAIR, *EXTRA, *MERGED, *PARTIAL)}
    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(known)}")
        return [known[n] for n in names]
    if getattr(args, "merged", False):
        return list(MERGED) + list(PARTIAL)
    return list(COMPARISON) + (list(ABLATION) + list(FAIR) if args.ablation else [])


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    import torch

    from mgll_demo.tasks import make_merged_task, make_task

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["steps"] = args.steps or sizes["steps"]
    sizes["batch_size"] = args.batch_size or sizes["batch_size"]
    methods = select_methods(args)
    out = Path(args.out)
    seeds = list(range(args.seed, args.seed + args.seeds))
    config = {
        **sizes,
        "lr": args.lr,
        "seeds": seeds,
        "methods": [m.name for m in methods],
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "probe": args.probe,
    }
    fractions = [float(f) for f in args.fractions.split(",")] if args.merged else [None]
    config["fractions"] = fractions if args.merged else None
    print(
        f"mgll-demo: {len(methods)} method(s) x {len(seeds)} seed(s), {sizes['steps']} steps "
        f"of {sizes['batch_size']}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    runs = []
    for seed in seeds:
        for frac in fractions:
            n = (sizes["n_train"], sizes["n_test"], sizes["n_probe"])
            task = make_task(*n, seed=seed) if frac is None else make_merged_task(frac, *n, seed)
            for method in methods:
                if frac == 1.0 and method.subset == "fine":
                    continue  # the fine subset is the whole set: same as the mixed runs
                runs.append(_run_one(args, sizes, task, method, seed, frac, out, config, runs))
    return config, runs


# The third-party packages of the ``[demo]`` extra (pyproject.toml), by import name.
DEMO_EXTRA = ("mlxtend", "matplotlib", "tqdm")


def require_demo_extra() -> None:
    """Exit with one line naming the ``[demo]`` extra when any of its packages is missing."""
    import importlib.util

    missing = [name for name in DEMO_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"mgll-demo needs the [demo] extra (missing: {', '.join(missing)}); install it with "
            'pip install -e ".[demo]" in a clone of mgll, or pip install "<path to the mgll '
            'wheel>[demo]"'
        )


def _run_one(args, sizes, task, method, seed, frac, out, config, runs) -> dict:
    from mgll_demo import report
    from mgll_demo.evaluation import embed_images, evaluate, zero_shot_auroc
    from mgll_demo.training import train

    def curve(model, task=task, trained=method.granularities):
        emb = embed_images(model, task.test)
        return zero_shot_auroc(model, emb, task.test.multi_hot, trained)

    result = train(
        method,
        task,
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        lr=args.lr,
        seed=seed,
        eval_every=max(1, sizes["steps"] // 5),
        evaluate_fn=curve,
        progress=not args.no_progress,
    )
    metrics = evaluate(
        result.model, task.test, task.probe, method.granularities, task.train, args.probe
    )
    name = method.name if frac is None else f"{method.name} f={frac:g}"
    run = {
        "method": name,
        "seed": seed,
        "fraction": frac,
        "baseline": "clip" if frac is None else f"clip_mixed f={frac:g}",
        "description": method.description,
        "metrics": metrics,
        "train_seconds": result.seconds,
        "losses": result.losses,
        "terms": result.terms,
        "curve_steps": result.curve_steps,
        "curve_zero_shot": result.curve_metric,
        "logit_scale": result.model.scale().item(),
    }
    out.mkdir(parents=True, exist_ok=True)  # keep what is done if a later run fails
    (out / "runs_partial.json").write_text(json.dumps({"config": config, "runs": [*runs, run]}))
    shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    line = f"seed {seed}  {name:<17} ({result.seconds:.0f} s)  {shown}"
    print(textwrap.fill(line, report.WIDTH, subsequent_indent="    "), flush=True)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mgll-demo`` / ``python -m mgll_demo``."""
    args = parse_args(argv)
    require_demo_extra()
    from mgll_demo import report
    from mgll_demo.training import PARTIAL_CONTRASTS

    start = time.perf_counter()
    if args.merge:
        loaded = [json.loads(Path(p).read_text()) for p in args.merge]
        config = {**loaded[0]["config"], "merged": list(args.merge)}
        runs = [r for data in loaded for r in data["runs"]]
    else:
        config, runs = run(args)
    summary = report.summarise(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paired = report.paired_differences(runs)
    text = report.table(summary)
    diffs = report.table(paired, seconds=False)
    (out / "table.txt").write_text(text + "\n\npaired differences:\n" + diffs + "\n")
    rst = report.table(summary, fmt="rst") + "\n\n" + report.table(paired, fmt="rst")
    between = report.contrasts(runs, PARTIAL_CONTRASTS)
    if between:  # merged task: the ways of keeping the coarse-only canvases, seed by seed
        extra = report.table(between, seconds=False)
        (out / "table.txt").write_text(f"{text}\n\npaired differences:\n{diffs}\n\n{extra}\n")
        rst += "\n\n" + report.table(between, fmt="rst")
    (out / "table.rst").write_text(rst + "\n")
    report.save_json(out / "results.json", config, runs, summary)
    report.save_png(out / "results.png", runs, summary)
    print("\nheld-out metrics (mean ± std over seeds):\n" + text)
    if paired:
        print("\ndifference to the baseline (CLIP) of the same seed (mean ± std, wins):\n" + diffs)
    if between:
        print("\npaired differences between methods, same seed (mean ± std, wins):\n" + extra)
    print(
        f"\nsaved {out / 'results.json'}, {out / 'results.png'}, {out / 'table.txt'} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
