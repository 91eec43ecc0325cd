"""The compared losses and the training loop (same towers, data, steps, optimiser and seed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import mgll
from mgll.text import encode_unique
from mgll_demo.data import GRANULARITIES, DigitsTask
from mgll_demo.towers import DualEncoder, Vocabulary


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """The standard CLIP loss (open_clip ``ClipLoss`` on one process), written out.

    Text i is the only positive of image i and vice versa; every other text in the batch is a
    negative, even when it is the same string (a false negative CLIP cannot know about).

    .. math:: L = \\tfrac12\\big[CE(Z, I) + CE(Z^\\top, I)\\big], \\quad Z = s\\,X T^\\top
    """
    logits = logit_scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@dataclass(frozen=True)
class Method:
    """One training objective of the comparison.

    Attributes:
        name: short name used in tables and JSON.
        kind: ``"clip"`` (sum over the granularities of :func:`clip_loss`) or ``"mgll"``.
        granularities: which of ``digits``, ``summary``, ``description`` are trained on.
        loss_kwargs: keyword arguments of :class:`mgll.MGLLLoss` (``"mgll"`` only).
        preset: ``"reference_compatible"`` builds :meth:`mgll.MGLLLoss.reference_compatible`.
        fine_labels: labels of ``digits`` and ``description``: ``"overlap"`` (the (N, 10)
            multi-hot: positives share a digit) or ``"exact"`` (ids of the digit set:
            positives show the same set, as identical strings in the authors' code).
        bias_init: initial logit bias b of the pointwise term (0: the prior log-odds of the
            dense overlap positives; SigLIP's -10 assumes one positive per row).
        description: one line for the docs.
    """

    name: str
    kind: str
    granularities: tuple[str, ...] = GRANULARITIES
    loss_kwargs: dict = field(default_factory=dict)
    preset: str | None = None
    description: str = ""
    fine_labels: str = "overlap"
    bias_init: float = 0.0

    def build_loss(self) -> Callable[..., dict[str, Tensor]]:
        if self.kind == "clip":

            def loss(image, texts, scale, bias, labels):
                total = sum(clip_loss(image, t, scale) for t in texts)
                return {"clip_loss": total}

            return loss
        if self.preset == "reference_compatible":
            module = mgll.MGLLLoss.reference_compatible(**self.loss_kwargs)
        else:
            module = mgll.MGLLLoss(**self.loss_kwargs)

        def loss(image, texts, scale, bias, labels):
            return module(image, texts, scale, bias, labels=labels, output_dict=True)

        return loss


G3 = GRANULARITIES
G2 = ("digits", "summary")
G1 = ("digits",)
COMPARISON = (
    Method(
        "clip", "clip", description="standard CLIP loss per granularity, identity targets, summed"
    ),
    Method(
        "mgll",
        "mgll",
        description="MGLLLoss() defaults: all three terms, smooth KL pooled by the coarsest "
        "granularity (here: summary)",
    ),
)
PAPER_KL = {"smooth_kl_support": "samples"}  # the paper's sample-level smooth KL (eq. 5-6)
ABLATION = (
    Method(
        "mgll_samples",
        "mgll",
        G3,
        PAPER_KL,
        description="MGLL G=3 with the paper's sample-level smooth KL",
    ),
    Method(
        "no_soft_clip",
        "mgll",
        G3,
        {"soft_clip_weight": 0.0, **PAPER_KL},
        description="MGLL G=3 (sample-level smooth KL) without the soft CLIP term",
    ),
    Method(
        "no_pointwise",
        "mgll",
        G3,
        {"pointwise_weight": 0.0, **PAPER_KL},
        description="MGLL G=3 (sample-level smooth KL) without the pointwise term",
    ),
    Method(
        "no_smooth_kl",
        "mgll",
        G3,
        {"smooth_kl_weight": 0.0},
        description="MGLL G=3 without the smooth KL",
    ),
    Method(
        "mgll_coarse",
        "mgll",
        G3,
        {"smooth_kl_support": "coarse", "smooth_kl_reference": 0},
        description="MGLL G=3, smooth KL pooled by the digit classes (smooth_kl_reference=0)",
    ),
    Method("mgll_g1", "mgll", G1, description="MGLL, digits text only (no smooth KL possible)"),
    Method(
        "mgll_g2",
        "mgll",
        G2,
        PAPER_KL,
        description="MGLL, digits + summary, sample-level smooth KL",
    ),
    Method(
        "mgll_g2_coarse",
        "mgll",
        G2,
        {"smooth_kl_support": "coarse", "smooth_kl_reference": 0},
        description="MGLL, digits + summary, smooth KL pooled by the digit classes",
    ),
    Method(
        "reference_compat",
        "mgll",
        G3,
        preset="reference_compatible",
        description="MGLLLoss.reference_compatible(): the authors' code's formula",
    ),
    Method(
        "mgll_bias_m10",
        "mgll",
        G3,
        PAPER_KL,
        bias_init=-10.0,
        description="MGLL G=3 (sample-level smooth KL) with SigLIP's initial logit bias -10",
    ),
)
EXTRA = (
    Method(
        "mgll_coarse_summary",
        "mgll",
        G3,
        {"smooth_kl_support": "coarse", "smooth_kl_reference": 1},
        description="MGLL G=3, smooth KL pooled by the summary groups (smooth_kl_reference=1)",
    ),
    Method(
        "mgll_g2_coarse_summary",
        "mgll",
        G2,
        {"smooth_kl_support": "coarse", "smooth_kl_reference": 1},
        description="MGLL, digits + summary, smooth KL pooled by the summary groups",
    ),
    Method(
        "mgll_g2_desc",
        "mgll",
        ("digits", "description"),
        PAPER_KL,
        description="MGLL, digits + description (two views of the digit set), sample-level smooth KL",
    ),
    Method(
        "mgll_g2_desc_no_kl",
        "mgll",
        ("digits", "description"),
        {"smooth_kl_weight": 0.0},
        description="MGLL, digits + description, no smooth KL",
    ),
    Method(
        "mgll_g2_desc_coarse",
        "mgll",
        ("digits", "description"),
        {"smooth_kl_support": "coarse"},
        description="MGLL, digits + description, coarse-partition smooth KL",
    ),
    Method(
        "mgll_g2_no_kl",
        "mgll",
        G2,
        {"smooth_kl_weight": 0.0},
        description="MGLL, digits + summary, no smooth KL",
    ),
    Method("clip_g1", "clip", G1, description="standard CLIP on the digits text only"),
    Method(
        "mgll_exact",
        "mgll",
        G3,
        PAPER_KL,
        fine_labels="exact",
        description="MGLL G=3 (sample-level smooth KL), positives show the same digit set (ids) "
        "instead of sharing a digit",
    ),
)


@dataclass
class TrainResult:
    model: DualEncoder
    losses: list[float]
    terms: dict[str, list[float]]
    curve_steps: list[int]
    curve_metric: list[float]
    seconds: float


def train(
    method: Method,
    task: DigitsTask,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int = 0,
    evaluate_fn: Callable[[DualEncoder], float] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train fresh towers with ``method``; the seed fixes the init and the batch order."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vocab = Vocabulary(t for texts in task.train.texts.values() for t in texts)
    model = DualEncoder(vocab, bias_init=method.bias_init)
    loss_fn = method.build_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(task.train), generator=gen)
    losses, terms, curve_steps, curve_metric = [], {}, [], []
    start, cursor = time.perf_counter(), 0
    bar = tqdm(range(steps), desc=method.name, disable=not progress, leave=False)
    for step in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(task.train), generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        model.train()
        image = model.encode_image(task.train.images[idx])
        texts = [_encode_batch(model, task.train.texts[g], idx) for g in method.granularities]
        labels = [_labels(task.train, g, method.fine_labels)[idx] for g in method.granularities]
        parts = loss_fn(image, texts, model.scale(), model.logit_bias, labels)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        for k, val in parts.items():
            terms.setdefault(k, []).append(val.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (
            evaluate_fn is not None
            and eval_every
            and ((step + 1) % eval_every == 0 or step + 1 == steps)
        ):
            curve_steps.append(step + 1)
            curve_metric.append(evaluate_fn(model))
    return TrainResult(model, losses, terms, curve_steps, curve_metric, time.perf_counter() - start)


def _labels(canvases, granularity: str, fine_labels: str) -> Tensor:
    if fine_labels == "exact" and granularity != "summary":
        return canvases.set_ids()
    return canvases.labels[granularity]


def _encode_batch(model: DualEncoder, texts: list[str], idx: Tensor) -> Tensor:
    """Encode each distinct string of the batch once and gather back."""
    return encode_unique([texts[i] for i in idx.tolist()], model.encode_text)
