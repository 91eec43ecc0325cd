"""Held-out metrics of the demo, computed with :mod:`mgll.evaluation`.

Every compared loss is scored on metrics that none of them trains on directly, plus two
columns that are one loss's own training target, labelled as such:

* zero-shot macro AUROC with class prompts (:class:`mgll.ZeroShotClassifier`, prompts worded
  as in training) and with caption-marginal scoring (a model's probability over the bank of
  distinct training captions, summed over the captions that name the digit);
* a linear probe on frozen image features, standardised, L2 strength by 5-fold
  cross-validation, fitted on 1 %, 10 % and 100 % of the probe canvases (closed-form ridge by
  default, ``--probe logistic`` for the L-BFGS logistic regression: many runs, small CPUs);
* image-to-image nDCG with Jaccard gains and text-to-image superset mAP (the canvas holds
  every digit the caption names);
* own-target columns: text-to-image exact-set mAP (the canvas shows exactly the caption's
  digits: CLIP's target) and image-to-image shares-a-digit mAP (MGLL's any-overlap target).

On the merged-datasets task (:func:`mgll_demo.tasks.make_merged_task`) the coarse zero-shot
metrics score the two parity classes ("holds an odd digit", "holds an even digit") with the
prompts ``"odd digits"`` / ``"even digits"`` and the bank of coarse captions; a model whose
text tower never saw a parity word gets NaN there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import mgll
from mgll import evaluation as ev
from mgll_demo.data import GRANULARITIES, PARITY_WORDS, Canvases
from mgll_demo.texts import encode_texts, zero_shot_classifier
from mgll_demo.towers import DualEncoder

PROBE_FRACTIONS = (0.01, 0.1, 1.0)
PROBE_SOLVER = "ridge"
METRICS = (
    "zero_shot_prompts",
    "zero_shot_marginal",
    "probe_1",
    "probe_10",
    "probe_100",
    "ndcg_jaccard",
    "superset_map",
    "exact_map",
    "shares_map",
)
COARSE_METRICS = ("coarse_zero_shot_prompts", "coarse_zero_shot_marginal")
# The metrics that are a macro AUROC (chance 0.5); nDCG's and mAP's chance depends on the labels.
AUROC_METRICS = frozenset(
    {"zero_shot_prompts", "zero_shot_marginal", "probe_1", "probe_10", "probe_100", *COARSE_METRICS}
)
LABELS = {
    "zero_shot_prompts": "zero-shot, class prompts",
    "zero_shot_marginal": "zero-shot, caption-marginal",
    "probe_1": "probe 1%",
    "probe_10": "probe 10%",
    "probe_100": "probe 100%",
    "ndcg_jaccard": "nDCG (Jaccard gains)",
    "superset_map": "superset mAP",
    "exact_map": "exact-set mAP (CLIP's own target)",
    "shares_map": "shares-a-digit mAP (MGLL any-overlap target)",
    "coarse_zero_shot_prompts": "coarse zero-shot, prompts",
    "coarse_zero_shot_marginal": "coarse zero-shot, caption-marginal",
}


@torch.no_grad()
def embed_images(model: DualEncoder, canvases: Canvases, chunk: int = 1000) -> Tensor:
    model.eval()
    return torch.cat(
        [model.encode_image(canvases.images[s : s + chunk]) for s in range(0, len(canvases), chunk)]
    )


def prompt_granularities(trained: Sequence[str]) -> tuple[str, ...]:
    """The demo granularities whose wording a model's text tower saw (``mixed`` -> digits)."""
    alias = {"digits_exact": "digits", "mixed": "digits", "fine": "digits"}
    return tuple(dict.fromkeys(alias.get(g, g) for g in trained))


def zero_shot_auroc(
    model: DualEncoder, image_emb: Tensor, truth: Tensor, trained: Sequence[str] = GRANULARITIES
) -> float:
    """Macro AUROC of :class:`mgll.ZeroShotClassifier` worded like the ``trained`` texts."""
    grans = prompt_granularities(trained)
    classifier = zero_shot_classifier(lambda texts: encode_texts(model, texts), grans)
    return classifier.evaluate(image_emb, truth)["macro"]


def caption_bank(train: Canvases, granularity: str) -> tuple[list[str], Tensor]:
    """The distinct training captions of a granularity and the digits each names, (K, 10).

    Which digits a caption names is read off the canvases it describes (every canvas with
    that caption holds the same digit set); for ``mixed`` and ``fine`` only the captions of
    the finely annotated canvases count.
    """
    key = "digits" if granularity in ("digits_exact", "mixed", "fine") else granularity
    texts = train.texts["mixed" if granularity == "mixed" else key]
    keep = range(len(train))
    if granularity in ("mixed", "fine") and train.fine is not None:
        keep = torch.nonzero(train.fine).flatten().tolist()
    names: dict[str, Tensor] = {}
    for i in keep:
        names.setdefault(texts[i], train.multi_hot[i])
    bank = sorted(names)
    return bank, torch.stack([names[t] for t in bank]).long()


def marginal_auroc(
    model: DualEncoder, image_emb: Tensor, truth: Tensor, bank: list[str], names: Tensor
) -> float:
    """Macro AUROC of :func:`mgll.evaluation.caption_marginal_scores` over a caption bank."""
    scores = ev.caption_marginal_scores(
        image_emb, encode_texts(model, bank), names, model.scale().detach()
    )
    return ev.macro_auroc(scores, truth)


def retrieval(model: DualEncoder, image_emb: Tensor, test: Canvases) -> dict[str, float]:
    """nDCG (Jaccard gains) and shares-a-digit mAP image-to-image; superset and exact-set mAP
    text-to-image, the queries being the distinct digit captions of the test canvases."""
    truth = test.multi_hot.long()
    sim = image_emb.double() @ image_emb.double().T
    self_ = torch.eye(len(test), dtype=torch.bool)
    bank: dict[str, Tensor] = {}
    for text, row in zip(test.texts["digits"], truth, strict=True):
        bank.setdefault(text, row)
    queries = sorted(bank)
    q_labels = torch.stack([bank[q] for q in queries])
    text_sim = encode_texts(model, queries).double() @ image_emb.double().T
    return {
        "ndcg_jaccard": ev.ndcg(sim, ev.relevance(truth, truth, "jaccard"), exclude=self_),
        "superset_map": ev.mean_average_precision(
            text_sim, ev.relevance(q_labels, truth, "superset")
        ),
        "exact_map": ev.mean_average_precision(text_sim, ev.relevance(q_labels, truth, "exact")),
        "shares_map": ev.mean_average_precision(
            sim, ev.relevance(truth, truth, "any"), exclude=self_
        ),
    }


def probe_aurocs(
    probe_emb: Tensor,
    probe_truth: Tensor,
    test_emb: Tensor,
    test_truth: Tensor,
    seed: int = 0,
    solver: str | None = None,
) -> dict[str, float]:
    """:func:`mgll.evaluation.linear_probe_auroc` on 1 %, 10 % and 100 % of the probe set."""
    return {
        f"probe_{round(100 * f)}": ev.linear_probe_auroc(
            probe_emb,
            probe_truth,
            test_emb,
            test_truth,
            fraction=f,
            seed=seed,
            solver=solver or PROBE_SOLVER,
        )
        for f in PROBE_FRACTIONS
    }


def evaluate(
    model: DualEncoder,
    test: Canvases,
    probe: Canvases,
    trained: Sequence[str] = GRANULARITIES,
    train: Canvases | None = None,
    probe_solver: str | None = None,
) -> dict[str, float]:
    """All held-out metrics of a model trained on the ``trained`` granularities.

    ``train`` (the training canvases) supplies the caption bank of caption-marginal scoring;
    without it the bank is the test canvases' own captions (text only either way).
    """
    test_emb = embed_images(model, test)
    probe_emb = embed_images(model, probe)
    fine = next(g for g in trained if g != "summary" and g != "parity")
    bank, names = caption_bank(train if train is not None else test, fine)
    out = {
        "zero_shot_prompts": zero_shot_auroc(model, test_emb, test.multi_hot, trained),
        "zero_shot_marginal": marginal_auroc(model, test_emb, test.multi_hot, bank, names),
        **probe_aurocs(probe_emb, probe.multi_hot, test_emb, test.multi_hot, solver=probe_solver),
        **retrieval(model, test_emb, test),
    }
    if "parity" in test.texts:
        out.update(coarse_zero_shot(model, test_emb, test, trained))
    return out


def coarse_zero_shot(
    model: DualEncoder, test_emb: Tensor, test: Canvases, trained: Sequence[str]
) -> dict[str, float]:
    """Parity zero-shot (both protocols); NaN when the model never saw a parity word."""
    seen = getattr(model.vocab, "index", {})
    if not any(g in ("mixed", "parity") for g in trained) or any(
        w not in seen for w in PARITY_WORDS
    ):
        return dict.fromkeys(COARSE_METRICS, float("nan"))
    truth = test.parity()
    encode = lambda texts: encode_texts(model, texts)  # noqa: E731
    prompts = {w: [f"{w} digits"] for w in PARITY_WORDS}
    classifier = mgll.ZeroShotClassifier.from_prompts(encode, prompts)
    bank = ["odd digits", "even digits", "odd and even digits"]
    names = torch.tensor([[1, 0], [0, 1], [1, 1]])
    return {
        "coarse_zero_shot_prompts": classifier.evaluate(test_emb, truth)["macro"],
        "coarse_zero_shot_marginal": marginal_auroc(model, test_emb, truth, bank, names),
    }
