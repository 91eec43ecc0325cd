"""MGLL in open_clip-style training: a tiny randomly initialised open_clip model, G = 2.

Registers a tiny model config (``mgll-tiny-vit``), builds it with ``pretrained=None`` (no
download), wraps it with :class:`mgll.integrations.open_clip.MultiGranularCLIP` so its forward
returns the dict ``MGLLLoss`` takes, and trains with the open_clip idiom
``losses = loss(**model_out, labels=..., output_dict=True)``; ``sum(losses.values())`` is the
loss open_clip's ``train_one_epoch`` would backpropagate.  Run
``python examples/open_clip_train.py [--smoke]`` (needs the ``[examples]`` extra:
``pip install -c constraints.txt -e ".[examples]"`` in a clone).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

import mgll
from mgll.integrations.open_clip import MultiGranularCLIP

TINY = {
    "embed_dim": 32,
    "init_logit_bias": -10.0,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["cat", "dog", "car", "ship"]
KIND = {"cat": "animal", "dog": "animal", "car": "vehicle", "ship": "vehicle"}


def build_model(name: str = "mgll-tiny-vit"):
    import open_clip

    folder = Path(tempfile.mkdtemp())
    (folder / f"{name}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder)
    model = open_clip.create_model(name, pretrained=None)
    return model, open_clip.get_tokenizer(name)


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, assert the loss falls")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    steps = 8 if args.smoke else args.steps
    torch.manual_seed(0)
    model, tokenizer = build_model()
    clip = MultiGranularCLIP(model, tokenizer)
    n = 16
    ids = torch.arange(n) % len(CLASSES)  # a fixed toy batch: images whose pattern is the class
    images = torch.randn(len(CLASSES), 3, 32, 32)[ids] + 0.5 * torch.randn(n, 3, 32, 32)
    texts = [
        [f"a photo of a {CLASSES[i]}" for i in ids.tolist()],  # fine granularity
        [f"a photo of an {KIND[CLASSES[i]]}" for i in ids.tolist()],  # coarse granularity
    ]
    labels = [ids, torch.tensor([CLASSES.index(c) < 2 for c in (CLASSES[i] for i in ids)]).long()]
    loss = mgll.MGLLLoss()
    opt = torch.optim.AdamW(clip.parameters(), lr=5e-4)
    history = []
    for step in range(steps):
        model_out = clip(images, texts)  # {"image_features", "text_features", "logit_scale"}
        losses = loss(**model_out, labels=labels, output_dict=True)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
        parts = ", ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
        print(f"step {step}: loss {history[-1]:.4f} ({parts})")
    if args.smoke:
        if not all(math.isfinite(x) for x in history):
            raise SystemExit("smoke: non-finite loss")
        if not history[-1] < history[0]:
            raise SystemExit(f"smoke: loss did not decrease ({history[0]} -> {history[-1]})")
    return history


if __name__ == "__main__":
    main()
