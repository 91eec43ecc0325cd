"""Distributed MGLL training with torchrun: DDP on any number of processes, CPU (gloo) or GPU (NCCL).

Run (two CPU processes; add ``--local-loss`` for open_clip-style local loss)::

    torchrun --nproc_per_node 2 examples/distributed_torchrun.py --check

Each step draws a global batch of ``--batch-size`` synthetic multi-label samples and gives each
rank its share (the shares differ when the batch does not divide evenly).  ``MGLLLoss`` gathers
the features and labels of every rank, so the loss is that of the global batch.  With
``--check``, rank 0 recomputes the first step in a single process on the concatenated batch and
compares every parameter gradient with the one DDP produced; the script fails if they differ.
"""

from __future__ import annotations

import argparse
import copy
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mgll
from mgll.distributed import global_loss

FINDINGS, INPUT, WIDTH = 4, 16, 8  # findings per image (multi-label), input and embedding sizes


class Towers(nn.Module):
    """A tiny CLIP: image and text towers, a learnable logit scale and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(INPUT, 32), nn.ReLU(), nn.Linear(32, WIDTH))
        self.text = nn.Sequential(nn.Linear(FINDINGS + 1, 32), nn.ReLU(), nn.Linear(32, WIDTH))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, images, texts):
        return (
            self.image(images),
            [self.text(t) for t in texts],
            self.logit_scale.exp(),
            self.logit_bias,
        )


def global_batch(step: int, size: int, prototypes: torch.Tensor):
    """Images that mix the prototypes of their findings; G = 2 paired texts and labels.

    Granularity 1 ("how many findings": an integer id), granularity 2 ("which findings": the
    multi-hot set).  A text's input is its granularity's label, one-hot or multi-hot.
    """
    gen = torch.Generator().manual_seed(step)
    findings = torch.rand(size, FINDINGS, generator=gen) < 0.35  # (N, C_2) multi-hot
    images = findings.float() @ prototypes + 0.3 * torch.randn(size, INPUT, generator=gen)
    count = findings.sum(1)  # (N,) ids
    count_text = nn.functional.one_hot(count, FINDINGS + 1).float()
    findings_text = torch.cat([findings.float(), torch.zeros(size, 1)], dim=1)
    return images, [count_text, findings_text], [count, findings]


def shard(tensors, rank: int, world: int):
    """This rank's rows of each tensor (the last ranks get one row fewer when N % W != 0)."""
    return [t.tensor_split(world)[rank] for t in tensors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=63, help="global batch size N")
    parser.add_argument("--local-loss", action="store_true", help="O(N_r x N) work per rank")
    parser.add_argument("--gather-with-grad", action="store_true", help="implied by --local-loss")
    parser.add_argument("--backend", default="auto", choices=mgll.available_backends())
    parser.add_argument("--check", action="store_true", help="compare step 0 with one process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model and prototypes on every rank
    prototypes = torch.randn(FINDINGS, INPUT)
    model = Towers().to(device)
    single = copy.deepcopy(model) if args.check and rank == 0 else None
    ddp = DistributedDataParallel(model)
    # local_loss needs the gathered features to carry their gradients (see docs/distributed.rst)
    loss_fn = mgll.MGLLLoss(
        backend=args.backend,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad or args.local_loss,
    )
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    if rank == 0:
        print(f"{world} ranks, global batch {args.batch_size}, {loss_fn}")

    for step in range(args.steps):
        images, texts, labels = global_batch(step, args.batch_size, prototypes)
        local_images, *local_texts = (t.to(device) for t in shard([images, *texts], rank, world))
        local_labels = [t.to(device) for t in shard(labels, rank, world)]
        image, text, scale, bias = ddp(local_images, local_texts)
        loss = loss_fn(image, text, scale, bias, labels=local_labels)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        if step == 0 and single is not None:
            check_against_single_process(single, ddp.module, images, texts, labels, device)
        optimizer.step()
        value = global_loss(loss)  # the loss of the global batch (mean over ranks; a collective)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {value.item():.4f}  logit scale {scale.item():.2f}")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def check_against_single_process(single, trained, images, texts, labels, device) -> None:
    """One process on the concatenated batch must give DDP's averaged gradients."""
    image, text, scale, bias = single(images.to(device), [t.to(device) for t in texts])
    loss = mgll.MGLLLoss(world_size=1)(  # world_size=1: this process alone, nothing gathered
        image, text, scale, bias, labels=[t.to(device) for t in labels]
    )
    loss.backward()
    worst = 0.0
    for (name, p), q in zip(single.named_parameters(), trained.parameters(), strict=True):
        error = ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, error)
        if error > 1e-4:  # float32: summation order differs between the two computations
            raise SystemExit(f"gradient of {name} differs from one process: relative {error:.2e}")
    print(
        f"check: DDP gradients equal one process on the global batch (max rel. error {worst:.1e})"
    )


if __name__ == "__main__":
    main()
