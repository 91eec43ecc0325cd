"""The 10-line quickstart: ``MGLLLoss`` in a plain PyTorch loop on raw tensors.

Two granularities in paired mode (one text per sample and granularity): a fine class id and a
coarse one (its parity).  Samples with the same id are positives of each other, so the loss
needs no co-occurrence matrix from you.  Run ``python examples/plain_loop.py [--smoke]``.
"""

from __future__ import annotations

import argparse
import math

import torch

import mgll


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, assert the loss falls")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    steps = 20 if args.smoke else args.steps
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (64,))  # a fine class per sample
    images = torch.nn.functional.one_hot(ids, 6).float() @ torch.randn(6, 128) + torch.randn(
        64, 128
    )

    # --- the quickstart ------------------------------------------------------------------
    image_encoder = torch.nn.Linear(128, 32)  # (N, 128) -> (N, D=32)
    text_encoder = torch.nn.Embedding(8, 32)  # a toy text tower: one token per text
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    # soft CLIP + pointwise + smooth KL with the library defaults (Jaccard overlap, coarse smooth
    # KL); mgll.MGLLLoss.paper() is the paper's exact setting
    loss_fn = mgll.MGLLLoss()
    params = [*image_encoder.parameters(), *text_encoder.parameters(), logit_scale]
    opt = torch.optim.Adam(params, lr=1e-2)
    labels = [ids, ids % 2]  # G=2 granularities: (N,) ids each
    losses = []
    for _ in range(steps):
        texts = [text_encoder(ids), text_encoder(6 + ids % 2)]  # G tensors of (N, D)
        loss = loss_fn(image_encoder(images), texts, logit_scale.exp(), labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # -------------------------------------------------------------------------------------

    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
    if args.smoke:
        if not all(math.isfinite(x) for x in losses):
            raise SystemExit("smoke: non-finite loss")
        if not losses[-1] < losses[0]:
            raise SystemExit(f"smoke: loss did not decrease ({losses[0]} -> {losses[-1]})")
    return losses


if __name__ == "__main__":
    main()
