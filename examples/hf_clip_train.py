"""MGLL with Hugging Face transformers: a ``CLIPModel`` from a tiny ``CLIPConfig``, G = 2.

Random initialisation, no download: the texts are tokenised by a toy word-level tokenizer
written here (bos, words, eos, padding), the features come from ``get_image_features`` /
``get_text_features`` through :func:`mgll.integrations.hf.model_output`, and ``MGLLLoss``
trains the model for a few steps.  Run ``python examples/hf_clip_train.py [--smoke]``
(needs the ``[examples]`` extra: ``pip install -c constraints.txt -e ".[examples]"`` in a clone).
"""

from __future__ import annotations

import argparse
import math

import torch

import mgll
from mgll.integrations.hf import model_output

BOS, PAD, EOS, CONTEXT = 0, 1, 2, 12
CLASSES = ["cat", "dog", "car", "ship"]
KIND = {"cat": "animal", "dog": "animal", "car": "vehicle", "ship": "vehicle"}


class WordTokenizer:
    """A toy tokenizer: one id per word, ``[BOS] words [EOS] [PAD]...``, with a mask."""

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 3 for i, w in enumerate(words)}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [[BOS, *(self.ids[w] for w in t.split())][: CONTEXT - 1] for t in texts]
        rows = [[*row, EOS] for row in rows]
        ids = torch.full((len(rows), CONTEXT), PAD)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


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


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, assert the loss falls")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    steps = 8 if args.smoke else args.steps
    torch.manual_seed(0)
    n = 16
    ids = torch.arange(n) % len(CLASSES)
    fine = [f"a photo of a {CLASSES[i]}" for i in ids.tolist()]
    coarse = [f"a photo of an {KIND[CLASSES[i]]}" for i in ids.tolist()]
    tokenizer = WordTokenizer(fine + coarse)
    model = build_model(vocab_size=len(tokenizer.ids) + 3)
    pixel_values = torch.randn(len(CLASSES), 3, 32, 32)[ids] + 0.5 * torch.randn(n, 3, 32, 32)
    tokens = [tokenizer(fine), tokenizer(coarse)]  # G = 2 granularities, paired
    labels = [ids, (ids >= 2).long()]  # fine class ids; coarse: animal 0 / vehicle 1
    loss_fn = mgll.MGLLLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    history = []
    for step in range(steps):
        out = model_output(model, pixel_values, tokens)
        losses = loss_fn(**out, labels=labels, output_dict=True)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        print(f"step {step}: loss {history[-1]:.4f}")
    if args.smoke:
        if not all(math.isfinite(x) for x in history):
            raise SystemExit("smoke: non-finite loss")
        if not history[-1] < history[0]:
            raise SystemExit(f"smoke: loss did not decrease ({history[0]} -> {history[-1]})")
    return history


if __name__ == "__main__":
    main()
