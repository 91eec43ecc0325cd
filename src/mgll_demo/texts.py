"""The three text granularities of a canvas, built with :mod:`mgll.text`, and zero-shot prompts.

Each canvas becomes one annotation ``{"digits": [3, 7], "summary": "two digits, all odd",
"description": [3, 7]}``; a :class:`mgll.MultiGranularTextBuilder` turns the annotations into
paired texts and the labels :class:`mgll.MGLLLoss` takes.  The ``description`` granularity
words each digit with one of three synonyms, drawn at random per canvas.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import mgll
from mgll_demo.data import DIGIT_WORDS, GRANULARITIES, NUM_CLASSES, Canvases, summary_text

CLASSES = tuple(range(NUM_CLASSES))


def granularities() -> list[mgll.Granularity]:
    """The G = 3 granularities, finest first: digits, summary (coarse), description."""
    synonyms = {c: (w, f"the number {w}", f"a handwritten {w}") for c, w in enumerate(DIGIT_WORDS)}
    return [
        mgll.Granularity("digits", "digits {}", classes=CLASSES, last_joiner=" and "),
        mgll.Granularity("summary"),
        mgll.Granularity(
            "description", "a picture of {}", synonyms, classes=CLASSES, last_joiner=" and "
        ),
    ]


def annotations(canvases: Canvases) -> list[dict]:
    """One structured annotation per canvas."""
    return [
        {"digits": list(s), "summary": summary_text(s), "description": list(s)}
        for s in canvases.label_sets()
    ]


def attach_texts(canvases: Canvases, seed: int) -> None:
    """Fill ``canvases.texts`` and ``canvases.labels`` for every granularity (paired mode).

    ``digits`` and ``description`` get (N, 10) multi-hot labels (two canvases are positives
    when they share a digit); ``summary`` gets (N,) ids (positives when the summaries match).
    """
    builder = mgll.MultiGranularTextBuilder(granularities())
    batch = builder.build(  # the whole set at once, so "auto" is stable: summary ids, bool hots
        annotations(canvases), mode="paired", label_format="auto", rng=random.Random(seed)
    )
    canvases.texts = {name: list(batch[name].texts) for name in GRANULARITIES}
    canvases.labels = {name: batch[name].labels for name in GRANULARITIES}


def zero_shot_classifier(
    encode_fn: Callable[[list[str]], Tensor], trained: Sequence[str] = GRANULARITIES
) -> mgll.ZeroShotClassifier:
    """Class prototypes from the prompts a one-digit canvas is described with in training.

    Zero-shot prompts must use the words the text tower was trained on (docs/demo.rst): for digit c,
    ``"digits c"`` when ``digits`` was trained on, and ``"a picture of <synonym of c>"`` for
    each of its three synonyms when ``description`` was.  The summary granularity names no
    digit and gives no prompt.  Scores are plain cosines (the AUROC is the same under the
    monotone sigmoid of a learned scale and bias).

    Raises:
        ValueError: ``trained`` holds neither ``digits`` nor ``description``.
    """
    return mgll.ZeroShotClassifier.from_prompts(
        encode_fn, CLASSES, granularities=_prompt_granularities(trained)
    )


def class_prompts(trained: Sequence[str] = GRANULARITIES) -> dict[int, list[str]]:
    """The prompts of every class, as the zero-shot classifier uses them."""
    grans = _prompt_granularities(trained)
    return {c: [p for g in grans for p in g.prompts(c)] for c in CLASSES}


def _prompt_granularities(trained: Sequence[str]) -> list[mgll.Granularity]:
    grans = [g for g in granularities() if g.name in trained and g.name != "summary"]
    if not grans:
        raise ValueError(
            f"`trained` must include 'digits' or 'description' to word zero-shot prompts, got {tuple(trained)}"
        )
    return grans


@torch.no_grad()
def encode_texts(model, texts: list[str]) -> Tensor:
    """Encode strings with a model's text tower in eval mode (no gradients)."""
    model.eval()
    return model.encode_text(texts)
