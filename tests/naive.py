"""Deliberately naive float64 references of SPEC section 2, written with loops.

Slow and obvious on purpose: every index of every formula is spelled out so a reader can check
it against the paper.  Used only by the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def soft_clip(z: Tensor, c: Tensor) -> Tensor:
    n, k = z.shape
    i2t, rows = z.new_zeros(()), 0
    for i in range(n):
        total = sum(c[i, kk] for kk in range(k))
        if total > 0:
            rows += 1
            lse = torch.log(sum(torch.exp(z[i, kk]) for kk in range(k)))
            i2t = i2t + sum(-c[i, kk] / total * (z[i, kk] - lse) for kk in range(k))
    t2i, cols = z.new_zeros(()), 0
    for kk in range(k):
        total = sum(c[i, kk] for i in range(n))
        if total > 0:
            cols += 1
            lse = torch.log(sum(torch.exp(z[i, kk]) for i in range(n)))
            t2i = t2i + sum(-c[i, kk] / total * (z[i, kk] - lse) for i in range(n))
    return 0.5 * (i2t / max(rows, 1) + t2i / max(cols, 1))


def pointwise(z: Tensor, c: Tensor, bias=None, target="binary", norm="pairs") -> Tensor:
    n, k = z.shape
    loss = z.new_zeros(())
    for i in range(n):
        total = sum(c[i, kk] for kk in range(k))
        for kk in range(k):
            if target == "binary":
                y = 1.0 if c[i, kk] > 0 else 0.0
            elif target == "graded":
                y = min(float(c[i, kk]), 1.0)
            else:
                y = c[i, kk] / total if total > 0 else 0.0
            x = z[i, kk] + (0.0 if bias is None else bias)
            sig = 1 / (1 + torch.exp(-x))
            loss = loss - (y * torch.log(sig) + (1 - y) * torch.log(1 - sig))
    return loss / (n * k if norm == "pairs" else n)


def smooth_kl(logits: list[Tensor], owners: list[Tensor | None], groups: Tensor | None) -> Tensor:
    """(1/N) sum_i sum_g KL(Q^g_i || mean_g Q^g_i), Q^g_i = renormalised softmax(Z^g_i) R^g S."""
    n = logits[0].shape[0]
    g_count = len(logits)
    if g_count < 2:
        return logits[0].new_zeros(())
    loss = logits[0].new_zeros(())
    for i in range(n):
        dists = []
        for z, r in zip(logits, owners, strict=True):
            k = z.shape[1]
            lse = torch.log(sum(torch.exp(z[i, kk]) for kk in range(k)))
            p = [torch.exp(z[i, kk] - lse) for kk in range(k)]
            r = torch.eye(n, dtype=z.dtype) if r is None else r
            r = [
                [r[kk, m] / sum(r[kk]) if sum(r[kk]) > 0 else 0.0 for m in range(n)]
                for kk in range(k)
            ]
            over_samples = [sum(p[kk] * r[kk][m] for kk in range(k)) for m in range(n)]
            s = torch.eye(n, dtype=z.dtype) if groups is None else groups
            s = [
                [s[m, j] / sum(s[m]) if sum(s[m]) > 0 else 0.0 for j in range(s.shape[1])]
                for m in range(n)
            ]
            pooled = [sum(over_samples[m] * s[m][j] for m in range(n)) for j in range(len(s[0]))]
            total = sum(pooled)
            dists.append([q / total for q in pooled])
        for q in dists:
            for j in range(len(q)):
                m = sum(d[j] for d in dists) / g_count
                if q[j] > 0:
                    loss = loss + q[j] * torch.log(q[j] / m)
    return loss / n


def cooc_from_labels(labels: Tensor) -> Tensor:
    n = labels.shape[0]
    c = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k in range(n):
            if labels.dim() == 1:
                c[i, k] = float(labels[i] == labels[k])
            else:
                c[i, k] = float(any(labels[i, j] and labels[k, j] for j in range(labels.shape[1])))
    return c


def groups_from_labels(labels: Tensor) -> Tensor:
    """S for the coarse support of a paired granularity: one column per group present."""
    if labels.dim() == 1:
        ids = sorted(set(labels.tolist()))
        return torch.tensor(
            [[float(x == j) for j in ids] for x in labels.tolist()], dtype=torch.float64
        )
    present = [j for j in range(labels.shape[1]) if labels[:, j].any()]
    return labels[:, present].to(torch.float64)


def mgll(
    image,
    texts,
    scale,
    bias=None,
    labels=None,
    targets=None,
    weights=(1.0, 1.0, 1.0),
    lam=None,
    target="binary",
    norm="pairs",
    support="samples",
    reference=None,
) -> Tensor:
    """The full SPEC 2.4 total from features, composed from the naive terms above."""
    x = image / image.norm(dim=1, keepdim=True)
    zs = [scale * x @ (t / t.norm(dim=1, keepdim=True)).T for t in texts]
    cs = (
        [cooc_from_labels(lab) for lab in labels]
        if labels is not None
        else [t.double() for t in targets]
    )
    lam = lam or [1.0] * len(texts)
    sc = sum(l_g * soft_clip(z, c) for l_g, z, c in zip(lam, zs, cs, strict=True))
    pw = sum(
        l_g * pointwise(z, c, bias, target, norm) for l_g, z, c in zip(lam, zs, cs, strict=True)
    )
    owners = [None] * len(texts) if labels is not None else [c.T for c in cs]
    groups = None
    if support == "coarse":
        if labels is not None:
            candidates = [groups_from_labels(lab) for lab in labels]
        else:
            candidates = [c[:, c.sum(0) > 0] for c in cs]
        groups = candidates[reference] if reference is not None else min(candidates, key=coarseness)
    kl = smooth_kl(zs, owners, groups)
    return weights[0] * sc + weights[1] * pw + weights[2] * kl


def coarseness(s: Tensor) -> tuple[int, int]:
    """Distinct groups of labelled samples (equal normalised rows of S), then columns J."""
    sets = {tuple((row / row.sum()).tolist()) for row in s if row.sum() > 0}
    return len(sets), s.shape[1]


def clip(z: Tensor) -> Tensor:
    """Standard CLIP: mean cross-entropy of the diagonal, both directions."""
    n = z.shape[0]
    i2t = (
        sum(-(z[i, i] - torch.log(sum(torch.exp(z[i, k]) for k in range(n)))) for i in range(n)) / n
    )
    t2i = (
        sum(-(z[i, i] - torch.log(sum(torch.exp(z[k, i]) for k in range(n)))) for i in range(n)) / n
    )
    return 0.5 * (i2t + t2i)


def log_g(g: int) -> float:
    return g * math.log(g)
