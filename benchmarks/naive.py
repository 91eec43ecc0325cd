"""The naive composition of torch ops: MGLL computed the way the authors' code computes it.

The authors' ``MultiGranularModule`` (docs/differences.rst) builds, per granularity, a dense N x N
equal-label target with numpy, normalises it per row, and composes ``log_softmax``,
elementwise products, ``binary_cross_entropy_with_logits`` and ``kl_div`` on full N x N
tensors, letting autograd keep every intermediate.  :func:`naive_mgll_loss` does exactly that
for the *paper's* loss with mgll's default settings (alpha = (1, 1, 1), binary pointwise target
averaged over the N^2 pairs, the sample-level smooth KL over softmax probabilities, as the
authors' later ``kl_loss_2`` does), so its value and gradients equal ``mgll.mgll_loss`` on
paired integer ids (``tests/test_backends.py`` checks it) and timing it against an mgll
backend compares two implementations of the same numbers.

About a dozen N x N temporaries per granularity stay alive until backward: the dense target,
its row normalisation, two log-softmaxes and their products with the targets, the BCE's
intermediates, the softmax probabilities, their mean and its log, and the KL's elementwise
terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_mgll_loss(
    image: Tensor, texts: list[Tensor], scale: Tensor, labels: list[Tensor]
) -> Tensor:
    """MGLL (soft CLIP + pointwise + smooth KL) on paired integer ids, plain autograd.

    Args:
        image: (N, D) image features (normalised here).
        texts: G tensors (N, D), text k belonging to sample k (paired mode).
        scale: the logit scale, already exponentiated.
        labels: G tensors (N,) of integer class ids.

    Returns:
        The scalar loss.
    """
    image = image / image.norm(dim=-1, keepdim=True)
    total, probs = 0.0, []
    for text, y in zip(texts, labels, strict=True):
        text = text / text.norm(dim=-1, keepdim=True)
        logits = scale * image @ text.t()
        cooc = (y.view(-1, 1) == y.view(1, -1)).float()  # the dense N x N co-occurrence
        row_target = cooc / cooc.sum(dim=1, keepdim=True)
        col_target = cooc.t() / cooc.t().sum(dim=1, keepdim=True)
        log_p = F.log_softmax(logits, dim=-1)
        ce_i = torch.sum(-row_target * log_p, dim=-1).mean()
        ce_t = torch.sum(-col_target * F.log_softmax(logits.t(), dim=-1), dim=-1).mean()
        bce = F.binary_cross_entropy_with_logits(logits, cooc)
        total = total + 0.5 * (ce_i + ce_t) + bce
        probs.append(log_p.exp())
    if len(probs) > 1:
        mean = sum(probs) / len(probs)
        log_mean = mean.log()
        total = total + sum(F.kl_div(log_mean, p, reduction="batchmean") for p in probs)
    return total
