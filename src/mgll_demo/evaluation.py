"""Held-out metrics: retrieval mAP, zero-shot macro AUROC and linear-probe macro AUROC."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mgll.zeroshot import multilabel_auroc
from mgll_demo.data import GRANULARITIES, Canvases
from mgll_demo.texts import encode_texts, zero_shot_classifier
from mgll_demo.towers import DualEncoder

METRICS = ("zero_shot_auroc", "linear_probe_auroc", "retrieval_map", "text_retrieval_map")


def mean_average_precision(scores: Tensor, relevant: Tensor) -> float:
    """Mean over queries (rows) of the average precision of ranking the columns by score.

    Queries without a relevant item are skipped.  Shape: scores, relevant (Q, N).
    """
    order = scores.argsort(dim=1, descending=True)
    rel = relevant.gather(1, order).double()
    hits = rel.cumsum(1)
    precision = hits / torch.arange(1, rel.shape[1] + 1, dtype=torch.double)
    n_rel = rel.sum(1)
    ap = (precision * rel).sum(1) / n_rel.clamp_min(1)
    return float(ap[n_rel > 0].mean())


@torch.no_grad()
def embed_images(model: DualEncoder, canvases: Canvases, chunk: int = 1000) -> Tensor:
    model.eval()
    return torch.cat(
        [model.encode_image(canvases.images[s : s + chunk]) for s in range(0, len(canvases), chunk)]
    )


def zero_shot_auroc(
    model: DualEncoder, image_emb: Tensor, truth: Tensor, trained: Sequence[str] = GRANULARITIES
) -> float:
    """Macro AUROC of :class:`mgll.ZeroShotClassifier` worded like the ``trained`` texts."""
    classifier = zero_shot_classifier(lambda texts: encode_texts(model, texts), trained)
    return classifier.evaluate(image_emb, truth)["macro"]


def retrieval_maps(model: DualEncoder, image_emb: Tensor, test: Canvases) -> tuple[float, float]:
    """Image-to-image mAP (relevant: shares a digit) and text-to-image mAP (same digit set)."""
    truth = test.multi_hot.double()
    sim = image_emb @ image_emb.T
    sim.fill_diagonal_(-float("inf"))
    relevant = (truth @ truth.T > 0).fill_diagonal_(False)
    image_map = mean_average_precision(sim, relevant)
    texts = sorted(set(test.texts["digits"]))
    text_emb = encode_texts(model, texts)
    where = {t: k for k, t in enumerate(texts)}
    owner = torch.tensor([where[t] for t in test.texts["digits"]])
    relevant_t = owner.unsqueeze(0) == torch.arange(len(texts)).unsqueeze(1)
    return image_map, mean_average_precision(text_emb @ image_emb.T, relevant_t)


def linear_probe_auroc(
    train_emb: Tensor, train_truth: Tensor, test_emb: Tensor, test_truth: Tensor, steps: int = 50
) -> float:
    """One logistic regression per class on frozen embeddings (L-BFGS, small L2), macro AUROC."""
    torch.manual_seed(0)
    x, y = train_emb.detach().double(), train_truth.double()
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.double, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = test_emb.double() @ w + b
    return float(multilabel_auroc(scores, test_truth).nanmean())


def evaluate(
    model: DualEncoder, test: Canvases, probe: Canvases, trained: Sequence[str] = GRANULARITIES
) -> dict[str, float]:
    """All held-out metrics of a model trained on the ``trained`` granularities."""
    test_emb = embed_images(model, test)
    probe_emb = embed_images(model, probe)
    image_map, text_map = retrieval_maps(model, test_emb, test)
    return {
        "zero_shot_auroc": zero_shot_auroc(model, test_emb, test.multi_hot, trained),
        "linear_probe_auroc": linear_probe_auroc(
            probe_emb, probe.multi_hot, test_emb, test.multi_hot
        ),
        "retrieval_map": image_map,
        "text_retrieval_map": text_map,
    }
