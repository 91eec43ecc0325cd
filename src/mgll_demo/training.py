"""The compared losses and the training loop (same towers, data, steps, optimiser and seed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

import mgll
from mgll.text import encode_unique
from mgll_demo.data import GRANULARITIES, PARITY_ANCESTORS, DigitsTask
from mgll_demo.tasks import fine_labels
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
        overlap: how two multi-hot label sets become a co-occurrence weight (``"any"``,
            ``"count"``, ``"jaccard"``), one rule or one per granularity; ``None``: the loss's
            own paired rule.
        subset: merged-datasets task: ``"all"`` canvases, or only the ``"fine"`` ones.
        fine_share: merged-datasets task, ``subset="all"``: the share of each batch drawn from
            the finely annotated canvases (at least their share of the training set).
        unannotated: merged-datasets task, ``fine`` granularity: how the fine labels of a
            coarse-only canvas are written (:func:`mgll_demo.tasks.fine_labels`:
            ``"negative"``, ``"unknown"`` or ``"implied"``).
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
    overlap: str | tuple[str, ...] | None = None
    subset: str = "all"
    fine_share: float = 0.25
    unannotated: str = "negative"

    def build_loss(self) -> Callable[..., dict[str, Tensor]]:
        if self.kind == "clip":

            def loss(image, texts, scale, bias, labels):
                total = sum(clip_loss(image, t, scale) for t in texts)
                return {"clip_loss": total}

            return loss
        kwargs = dict(self.loss_kwargs)
        if self.overlap is not None:
            kwargs["overlap"] = self.overlap
        if self.preset == "reference_compatible":
            module = mgll.MGLLLoss.reference_compatible(**kwargs)
        elif self.preset == "paper":
            module = mgll.MGLLLoss.paper(**kwargs)
        else:
            module = mgll.MGLLLoss(**kwargs)

        def loss(image, texts, scale, bias, labels):
            if isinstance(labels, dict):
                return module(image, texts, scale, bias, **labels, output_dict=True)
            return module(image, texts, scale, bias, labels=labels, output_dict=True)

        return loss


NO_KL = {"smooth_kl_weight": 0.0}
JACCARD = "jaccard"
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
        description="MGLLLoss() defaults on the three granularities: Jaccard overlap, all three "
        "terms, smooth KL pooled by the coarsest granularity (here: summary)",
    ),
    Method(
        "mgll_jx",
        "mgll",
        ("digits", "digits_exact"),
        NO_KL,
        overlap=JACCARD,
        description="MGLL, the digits text twice: Jaccard positives and same-set ids, no smooth KL",
    ),
)
PAPER_KL = {"smooth_kl_support": "samples"}  # the paper's sample-level smooth KL (eq. 5-6)
ABLATION = (
    Method(
        "mgll_any",
        "mgll",
        G3,
        description="MGLL G=3, the earlier defaults: any-overlap positives, coarse smooth KL",
    ),
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
        "mgll_no_summary",
        "mgll",
        ("digits", "description"),
        overlap=JACCARD,
        description="MGLLLoss() defaults on digits + description: no summary granularity",
    ),
    Method(
        "mgll_summary_pw0",
        "mgll",
        G3,
        {"pointwise_weight": (1.0, 0.0, 1.0)},
        overlap=JACCARD,
        description="MGLLLoss() defaults without the summary granularity's pointwise term",
    ),
    Method(
        "mgll_summary_w01",
        "mgll",
        G3,
        {"granularity_weights": (1.0, 0.1, 1.0)},
        overlap=JACCARD,
        description="MGLLLoss() defaults with the summary granularity's weight 0.1",
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


FAIR = (
    Method(
        "mgll_g1_jaccard",
        "mgll",
        G1,
        overlap=JACCARD,
        description="MGLL, digits text only, Jaccard-weighted positives",
    ),
    Method(
        "mgll_g1_count",
        "mgll",
        G1,
        overlap="count",
        description="MGLL, digits text only, positives weighted by the number of shared digits",
    ),
    Method(
        "mgll_g1_exact",
        "mgll",
        G1,
        fine_labels="exact",
        description="MGLL, digits text only, positives show the same digit set (ids)",
    ),
    Method(
        "mgll_g2_jaccard_no_kl",
        "mgll",
        G2,
        NO_KL,
        overlap=JACCARD,
        description="MGLL, digits (Jaccard) + summary, no smooth KL",
    ),
    Method(
        "mgll_g3_jaccard_no_kl",
        "mgll",
        G3,
        NO_KL,
        overlap=JACCARD,
        description="MGLL G=3, Jaccard positives, no smooth KL",
    ),
    Method(
        "mgll_g3_jaccard_w",
        "mgll",
        G3,
        {**NO_KL, "granularity_weights": (1.0, 0.25, 1.0)},
        overlap=JACCARD,
        description="MGLL G=3, Jaccard, no smooth KL, summary weight 0.25",
    ),
    Method(
        "mgll_jx_no_pointwise",
        "mgll",
        ("digits", "digits_exact"),
        {**NO_KL, "pointwise_weight": 0.0},
        overlap=JACCARD,
        description="MGLL, digits twice (Jaccard + same-set ids), soft CLIP only",
    ),
    Method(
        "mgll_jx_no_soft_clip",
        "mgll",
        ("digits", "digits_exact"),
        {**NO_KL, "soft_clip_weight": 0.0},
        overlap=JACCARD,
        description="MGLL, digits twice (Jaccard + same-set ids), pointwise only",
    ),
    Method(
        "mgll_jx_kl_coarse",
        "mgll",
        ("digits", "digits_exact"),
        overlap=JACCARD,
        description="MGLL, digits twice (Jaccard + same-set ids), coarse-partition smooth KL",
    ),
    Method(
        "mgll_jx_kl_samples",
        "mgll",
        ("digits", "digits_exact"),
        {"smooth_kl_support": "samples"},
        overlap=JACCARD,
        description="MGLL, digits twice (Jaccard + same-set ids), the paper's sample-level "
        "smooth KL",
    ),
    Method(
        "mgll_g3_jaccard_kl",
        "mgll",
        G3,
        overlap=JACCARD,
        description="MGLL G=3, Jaccard positives, coarse-partition smooth KL",
    ),
    Method(
        "mgll_no_pointwise",
        "mgll",
        G3,
        {"pointwise_weight": 0.0},
        description="MGLLLoss(pointwise_weight=0) on the three granularities",
    ),
    Method(
        "mgll_g1_jaccard_no_pointwise",
        "mgll",
        G1,
        {"pointwise_weight": 0.0},
        overlap=JACCARD,
        description="MGLL, digits text only, Jaccard positives, soft CLIP only",
    ),
    Method(
        "mgll_g3_jaccard_kl_samples",
        "mgll",
        G3,
        {"smooth_kl_support": "samples"},
        overlap=JACCARD,
        description="MGLL G=3, Jaccard positives, the paper's sample-level smooth KL",
    ),
    Method(
        "mgll_paper",
        "mgll",
        G3,
        preset="paper",
        description="MGLLLoss.paper(): the paper's equations as written",
    ),
)
MERGED = (
    Method(
        "clip_mixed",
        "clip",
        ("mixed",),
        description="CLIP on the mixed captions (fine where annotated, coarse otherwise)",
    ),
    Method(
        "mgll_mixed",
        "mgll",
        ("mixed",),
        description="MGLL on the mixed captions, "
        "from_hierarchy targets (a fine canvas is a positive of its parity's text)",
    ),
    Method(
        "mgll_mixed_jaccard",
        "mgll",
        ("mixed",),
        overlap=JACCARD,
        description="MGLL on the mixed captions, Jaccard overlap of the label sets with their "
        "ancestors (graded hierarchy targets)",
    ),
    Method(
        "clip_fine_only",
        "clip",
        G1,
        subset="fine",
        description="CLIP on the finely annotated canvases only",
    ),
    Method(
        "mgll_fine_only",
        "mgll",
        G1,
        subset="fine",
        description="MGLL on the finely annotated canvases only (digits, any-overlap "
        "positives, the rule from_hierarchy applies between fine texts)",
    ),
)


FP = ("fine", "parity")  # merged task: fine captions where annotated, parity everywhere
COARSE_NO_POINTWISE = {"pointwise_weight": (1.0, 0.0)}
COARSE_TENTH = {"granularity_weights": (1.0, 0.1)}
PARTIAL = (
    Method(
        "mgll_dropped",
        "mgll",
        FP,
        subset="fine",
        description="MGLLLoss(), fine + parity captions, coarse-only canvases dropped",
    ),
    Method(
        "mgll_negative",
        "mgll",
        FP,
        unannotated="negative",
        description="MGLLLoss(), fine + parity, coarse-only canvases kept with fine labels all 0 "
        "(a negative of every fine text) and an empty fine caption",
    ),
    Method(
        "mgll_masked",
        "mgll",
        FP,
        unannotated="unknown",
        description="MGLLLoss(), fine + parity, coarse-only canvases' fine rows NaN (unannotated)",
    ),
    Method(
        "mgll_masked_implied",
        "mgll",
        FP,
        unannotated="implied",
        description="as mgll_masked, with the digits their parity rules out annotated 0",
    ),
    Method(
        "mgll_dropped_pw0",
        "mgll",
        FP,
        COARSE_NO_POINTWISE,
        subset="fine",
        description="as mgll_dropped, without the parity granularity's pointwise term",
    ),
    Method(
        "mgll_masked_pw0",
        "mgll",
        FP,
        COARSE_NO_POINTWISE,
        unannotated="unknown",
        description="as mgll_masked, without the parity granularity's pointwise term",
    ),
    Method(
        "mgll_masked_implied_pw0",
        "mgll",
        FP,
        COARSE_NO_POINTWISE,
        unannotated="implied",
        description="as mgll_masked_implied, without the parity granularity's pointwise term",
    ),
    Method(
        "mgll_dropped_w01",
        "mgll",
        FP,
        COARSE_TENTH,
        subset="fine",
        description="as mgll_dropped, the parity granularity weighted 0.1",
    ),
    Method(
        "mgll_masked_w01",
        "mgll",
        FP,
        COARSE_TENTH,
        unannotated="unknown",
        description="as mgll_masked, the parity granularity weighted 0.1",
    ),
)
# The paired differences between the ways of keeping the coarse-only canvases (method, base).
PARTIAL_CONTRASTS = (
    ("mgll_negative", "mgll_dropped"),
    ("mgll_masked", "mgll_dropped"),
    ("mgll_masked_implied", "mgll_dropped"),
    ("mgll_masked", "mgll_negative"),
    ("mgll_masked_implied", "mgll_negative"),
    ("mgll_masked_implied", "mgll_masked"),
    ("mgll_dropped_pw0", "mgll_dropped"),
    ("mgll_masked_pw0", "mgll_masked"),
    ("mgll_masked_implied_pw0", "mgll_masked_implied"),
    ("mgll_dropped_w01", "mgll_dropped"),
    ("mgll_masked_w01", "mgll_masked"),
    ("mgll_masked_w01", "mgll_dropped_w01"),
    ("mgll_masked_pw0", "mgll_dropped_pw0"),
    ("mgll_dropped", "clip_fine_only"),
)


def _pin_any(methods: tuple[Method, ...]) -> tuple[Method, ...]:
    """These variants were measured with the any-overlap rule: keep it whatever the default."""
    return tuple(
        replace(m, overlap="any") if m.kind == "mgll" and m.overlap is None else m for m in methods
    )


ABLATION, EXTRA, MERGED = _pin_any(ABLATION), _pin_any(EXTRA), _pin_any(MERGED)


@dataclass
class TrainResult:
    model: DualEncoder
    losses: list[float]
    terms: dict[str, list[float]]
    curve_steps: list[int]
    curve_metric: list[float]
    seconds: float


def show_progress(progress: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw the progress bar: asked for, and its stream is a terminal.

    The bar goes to ``stream`` (default: standard error, as tqdm's); into a file or a pipe
    its frames would make one very long line, so it is left out there.
    """
    stream = sys.stderr if stream is None else stream
    return progress and bool(getattr(stream, "isatty", lambda: False)())


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
    pools = _pools(task, method)
    used = torch.cat(pools)
    vocab = Vocabulary(
        task.train.texts[_text_key(g)][i] for g in method.granularities for i in used.tolist()
    )
    model = DualEncoder(vocab, bias_init=method.bias_init)
    loss_fn = method.build_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    shares = _shares(pools, method, batch_size)
    samplers = [_Cycle(pool, gen) for pool in pools]
    losses, terms, curve_steps, curve_metric = [], {}, [], []
    start = time.perf_counter()
    show = show_progress(progress)
    bar = tqdm(range(steps), desc=method.name, disable=not show, leave=False, file=sys.stderr)
    for step in bar:
        idx = torch.cat([s.take(n) for s, n in zip(samplers, shares, strict=True)])
        model.train()
        image = model.encode_image(task.train.images[idx])
        texts = [
            _encode_batch(model, task.train.texts[_text_key(g)], idx) for g in method.granularities
        ]
        labels = batch_labels(method, task.train, idx)
        parts = loss_fn(image, texts, model.scale(), model.logit_bias, labels)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        for k, val in parts.items():
            terms.setdefault(k, []).append(val.item())
        if show:
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
    if granularity == "digits_exact" or (
        fine_labels == "exact" and granularity in ("digits", "description")
    ):
        return canvases.set_ids()
    return canvases.labels[granularity]


def _text_key(granularity: str) -> str:
    """``digits_exact`` is the digits text with "same digit set" ids as its labels."""
    return "digits" if granularity == "digits_exact" else granularity


def batch_labels(method: Method, canvases, idx: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
    """The paired labels of a batch, or ``{"targets": [...]}`` for the merged-datasets task.

    ``mixed`` (merged-datasets task) gets :func:`mgll.targets.from_hierarchy` targets (a fine
    text names digits, a coarse one a parity; a fine image is a positive of its parity's text,
    not the other way round), or with ``overlap="jaccard"`` the Jaccard overlap of the label
    sets with their ancestors added (graded: {3, 7} and "odd digits" share 1 of 3 labels).
    Overlap rules are the loss's own (``MGLLLoss(overlap=...)``).  ``fine`` (merged task) gets
    its coarse-only rows written as ``method.unannotated`` says.
    """
    grans = method.granularities
    labels = [_labels(canvases, g, method.fine_labels)[idx] for g in grans]
    if "fine" in grans:
        at = grans.index("fine")
        parity = canvases.labels["parity"][idx]
        labels[at] = fine_labels(labels[at], parity, method.unannotated)
    if "mixed" not in grans:
        return labels
    targets = []
    for g, lab in zip(grans, labels, strict=True):
        if g == "mixed" and method.overlap == JACCARD:
            up = mgll.targets.expand_ancestors(lab, PARITY_ANCESTORS)
            targets.append(mgll.targets.from_multi_hot(up, overlap="jaccard"))
        elif g == "mixed":
            targets.append(mgll.targets.from_hierarchy(lab, ancestors=PARITY_ANCESTORS))
        elif lab.dim() == 1:
            targets.append(mgll.targets.from_ids(lab))
        else:
            targets.append(mgll.targets.from_multi_hot(lab, overlap="any"))
    return {"targets": targets}


def _pools(task: DigitsTask, method: Method) -> list[Tensor]:
    """The training canvases a method draws from: all of them, or (merged task) by subset."""
    fine = task.train.fine
    if fine is None or bool(fine.all()):
        return [torch.arange(len(task.train))]
    if method.subset == "fine":
        return [torch.nonzero(fine).flatten()]
    return [torch.nonzero(fine).flatten(), torch.nonzero(~fine).flatten()]


def _shares(pools: list[Tensor], method: Method, batch_size: int) -> list[int]:
    if len(pools) == 1:
        return [batch_size]
    natural = len(pools[0]) / (len(pools[0]) + len(pools[1]))
    n_fine = min(batch_size - 1, max(1, round(max(method.fine_share, natural) * batch_size)))
    return [n_fine, batch_size - n_fine]


class _Cycle:
    """Epochs of a pool in a fresh random order each time (the seeded generator is shared)."""

    def __init__(self, pool: Tensor, gen: torch.Generator) -> None:
        self.pool, self.gen = pool, gen
        self.order, self.cursor = pool[torch.randperm(len(pool), generator=gen)], 0

    def take(self, n: int) -> Tensor:
        if self.cursor + n > len(self.order):
            self.order = self.pool[torch.randperm(len(self.pool), generator=self.gen)]
            self.cursor = 0
        out = self.order[self.cursor : self.cursor + n]
        self.cursor += n
        return out


def _encode_batch(model: DualEncoder, texts: list[str], idx: Tensor) -> Tensor:
    """Encode each distinct string of the batch once and gather back."""
    return encode_unique([texts[i] for i in idx.tolist()], model.encode_text)
