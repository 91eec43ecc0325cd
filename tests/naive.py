"""Deliberately naive float64 references of the paper's eq. 1-6 (docs/concepts.rst), written with loops.

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
    """The full total (docs/concepts.rst) from features, composed from the naive terms above."""
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


# ------------------------------------------------------------------ partial annotation
# Unknown pairs are NaN entries of C; NaN label entries are classes a sample's source does not
# annotate; a row that is NaN everywhere (or id -1) is a sample unannotated at that granularity.


def pair_status(a: Tensor, b: Tensor, rule: str) -> float:
    """The weight of one pair of label rows, or NaN when the pair is unknown (loops only)."""
    if a.dim() == 0:  # integer ids, -1 = missing
        return math.nan if a < 0 or b < 0 else float(a == b)
    both = [c for c in range(a.shape[0]) if not (math.isnan(a[c]) or math.isnan(b[c]))]
    if all(math.isnan(x) for x in a.tolist()) or all(math.isnan(x) for x in b.tolist()):
        return math.nan
    x, y = [float(a[c]) for c in both], [float(b[c]) for c in both]
    if rule == "count":
        w = sum(p * q for p, q in zip(x, y, strict=True))
    elif rule == "any":
        w = 1.0 - math.prod(1.0 - p * q for p, q in zip(x, y, strict=True))
    else:
        union = sum(max(p, q) for p, q in zip(x, y, strict=True))
        w = sum(min(p, q) for p, q in zip(x, y, strict=True)) / union if union > 0 else 0.0
    if w > 0:
        return w
    # negative when, for every class, at least one of the two is annotated 0
    negative = all(
        (not math.isnan(a[c]) and a[c] == 0) or (not math.isnan(b[c]) and b[c] == 0)
        for c in range(a.shape[0])
    )
    return 0.0 if negative else math.nan


def partial_cooc(labels: Tensor, rule: str = "any") -> Tensor:
    n = labels.shape[0]
    c = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k in range(n):
            c[i, k] = pair_status(
                labels[i].double() if labels.dim() > 1 else labels[i],
                labels[k].double() if labels.dim() > 1 else labels[k],
                rule,
            )
    return c


def annotated(labels: Tensor | None, targets: Tensor | None) -> list[bool]:
    """Which samples are annotated at one granularity (paired labels, or bank targets' rows)."""
    if targets is not None:
        return [not all(math.isnan(x) for x in row.tolist()) for row in targets]
    if labels.dim() == 1:
        return [int(x) >= 0 for x in labels]
    return [not all(math.isnan(x) for x in row.tolist()) for row in labels.double()]


def partial_soft_clip(z: Tensor, c: Tensor) -> Tensor:
    """Eq. 1-3 over the known pairs of each row and column (NaN entries of c are unknown)."""
    n, k = z.shape

    def direction(zz, cc, lines, width):
        total_loss, anchors = z.new_zeros(()), 0
        for i in range(lines):
            known = [j for j in range(width) if not math.isnan(cc(i, j))]
            total = sum(cc(i, j) for j in known)
            if total > 0:
                anchors += 1
                lse = torch.log(sum(torch.exp(zz(i, j)) for j in known))
                total_loss = total_loss + sum(-cc(i, j) / total * (zz(i, j) - lse) for j in known)
        return total_loss / max(anchors, 1)

    i2t = direction(lambda i, j: z[i, j], lambda i, j: float(c[i, j]), n, k)
    t2i = direction(lambda i, j: z[j, i], lambda i, j: float(c[j, i]), k, n)
    return 0.5 * (i2t + t2i)


def partial_pointwise(z: Tensor, c: Tensor, bias=None, target="binary", norm="pairs") -> Tensor:
    n, k = z.shape
    loss, pairs, images = z.new_zeros(()), 0, 0
    for i in range(n):
        known = [kk for kk in range(k) if not math.isnan(c[i, kk])]
        images += bool(known)
        total = sum(float(c[i, kk]) for kk in known)
        for kk in known:
            pairs += 1
            if target == "binary":
                y = 1.0 if c[i, kk] > 0 else 0.0
            elif target == "graded":
                y = min(float(c[i, kk]), 1.0)
            else:
                y = float(c[i, kk]) / total if total > 0 else 0.0
            x = z[i, kk] + (0.0 if bias is None else bias)
            sig = 1 / (1 + torch.exp(-x))
            loss = loss - (y * torch.log(sig) + (1 - y) * torch.log(1 - sig))
    return loss / max(pairs if norm == "pairs" else images, 1)


def partial_smooth_kl(
    logits: list[Tensor],
    owners: list[Tensor | None],
    groups: Tensor | None,
    annotated_at: list[list[bool]],
) -> Tensor:
    """Each image compared at the granularities where it is annotated (two or more), over the
    samples annotated at every one of them; the mean over the images compared."""
    n = logits[0].shape[0]
    takes_part = [r is None or bool((r > 0).any()) for r in owners]
    loss, compared = logits[0].new_zeros(()), 0
    for i in range(n):
        gs = [g for g in range(len(logits)) if annotated_at[g][i] and takes_part[g]]
        if len(gs) < 2:
            continue
        compared += 1
        support = [all(annotated_at[g][m] for g in gs) for m in range(n)]
        dists = []
        for g in gs:
            z, r = logits[g], owners[g]
            k = z.shape[1]
            r = torch.eye(n, dtype=z.dtype) if r is None else r
            # paired: the softmax over the texts of the support; bank: over every text
            texts = [kk for kk in range(k) if owners[g] is not None or support[kk]]
            lse = torch.log(sum(torch.exp(z[i, kk]) for kk in texts))
            p = {kk: torch.exp(z[i, kk] - lse) for kk in texts}
            r = [
                [r[kk, m] / sum(r[kk]) if sum(r[kk]) > 0 else 0.0 for m in range(n)]
                for kk in range(k)
            ]
            over = [sum(p[kk] * r[kk][m] for kk in texts) if support[m] else 0.0 for m in range(n)]
            s = torch.eye(n, dtype=z.dtype) if groups is None else groups
            s = [
                [s[m, j] / sum(s[m]) if sum(s[m]) > 0 else 0.0 for j in range(s.shape[1])]
                for m in range(n)
            ]
            pooled = [sum(over[m] * s[m][j] for m in range(n)) for j in range(len(s[0]))]
            total = sum(pooled)
            dists.append([q / total if total > 0 else 0.0 * q for q in pooled])
        for q in dists:
            for j in range(len(q)):
                m = sum(d[j] for d in dists) / len(gs)
                if q[j] > 0:
                    loss = loss + q[j] * torch.log(q[j] / m)
    return loss / max(compared, 1)


def partial_groups(labels: Tensor, targets: Tensor | None = None) -> Tensor:
    """S of one granularity with unknowns: known positives only, unannotated samples empty."""
    if targets is not None:
        c = torch.nan_to_num(targets.double(), nan=0.0)
        return c[:, c.sum(0) > 0]
    if labels.dim() == 1:
        ids = sorted({int(x) for x in labels if x >= 0})
        return torch.tensor(
            [[float(int(x) == j) for j in ids] for x in labels], dtype=torch.float64
        )
    x = torch.nan_to_num(labels.double(), nan=0.0)
    return x[:, x.sum(0) > 0]


def partial_mgll(
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
    rules=None,
) -> Tensor:
    """The full total with unknown pairs left out (docs/partial_annotation.rst)."""
    x = image / image.norm(dim=1, keepdim=True)
    zs = [scale * x @ (t / t.norm(dim=1, keepdim=True)).T for t in texts]
    g_count = len(texts)
    rules = rules or ["any"] * g_count
    if labels is not None:
        cs = [partial_cooc(lab, rule) for lab, rule in zip(labels, rules, strict=True)]
        ann = [annotated(lab, None) for lab in labels]
        owners = [None] * g_count
    else:
        cs = [t.double() for t in targets]
        ann = [annotated(None, t) for t in targets]
        owners = [torch.nan_to_num(c, nan=0.0).T for c in cs]
    lam = lam or [1.0] * g_count
    sc = sum(l_g * partial_soft_clip(z, c) for l_g, z, c in zip(lam, zs, cs, strict=True))
    pw = sum(
        l_g * partial_pointwise(z, c, bias, target, norm)
        for l_g, z, c in zip(lam, zs, cs, strict=True)
    )
    groups = None
    if support == "coarse":
        cands = [
            partial_groups(labels[g]) if labels is not None else partial_groups(None, targets[g])
            for g in range(g_count)
        ]
        groups = cands[reference] if reference is not None else min(cands, key=coarseness)
    kl = partial_smooth_kl(zs, owners, groups, ann)
    return weights[0] * sc + weights[1] * pw + weights[2] * kl
