r"""The overlap rules: how two multi-hot label vectors become one co-occurrence weight.

One implementation, used by the loss's paired co-occurrence (:mod:`mgll.targets.cooc`, every backend)
and by the public constructor :func:`mgll.targets.from_multi_hot`.

Entries are label *probabilities* :math:`a_c \in [0, 1]` (0/1 for plain label sets; e.g. 0.5
for an uncertain finding).  Read each as the probability that label c is present, labels
independent; for 0/1 entries every rule is the set rule exactly:

* ``"count"``: :math:`\sum_c a_c b_c`, the expected number of shared labels (:math:`|a\cap b|`);
* ``"any"``: :math:`1 - \prod_c (1 - a_c b_c)`, the probability that the two share at least one
  label (:math:`\mathbb 1[a \cap b \ne \emptyset]`);
* ``"jaccard"``: :math:`\sum_c \min(a_c, b_c) / \sum_c \max(a_c, b_c)`, the fuzzy-set Jaccard
  index (:math:`|a\cap b| / |a\cup b|`), 0 when both are empty.

All three are symmetric in (a, b).  0/1 inputs take the exact matrix-product path
(:math:`a b^\top`); probabilities take an elementwise path over chunks of classes.

**Partial annotation** (:func:`partial_overlap`): an entry may be NaN, "not annotated" (a class
its source does not label, an uncertain finding under U-Ignore).  A pair is then *known* when
the rule finds a shared label among the classes both annotate (a positive), or when no label
can be shared because, for every class, at least one of the two is annotated 0 (a negative);
otherwise it is *unknown* and the loss leaves it out; so is every pair of a row that is NaN
everywhere (no annotation at that granularity).  A known pair's weight is the rule over
the classes both annotate.  Without NaN every pair is known and the weight is :func:`overlap`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: The rules, in the order the docs list them.
RULES = ("any", "count", "jaccard")

#: Elements of the (rows, cols, classes) temporaries of the elementwise path.
_CHUNK = 1 << 22


def overlap(a: Tensor, b: Tensor, rule: str, binary: bool) -> Tensor:
    """C[i, k] = rule(a_i, b_k) for label vectors a (r, C) and b (k, C) of one float dtype.

    ``binary`` promises 0/1 entries (then one matrix product serves every rule).
    """
    if rule == "count":
        return a @ b.T
    if binary:
        inter = a @ b.T
        if rule == "any":
            return (inter > 0).to(inter.dtype)
    elif rule == "any":
        return 1 - _pairwise(a, b, lambda x, y: torch.prod(1 - x * y, -1), 1.0)
    else:
        inter = _pairwise(a, b, _sum_min, 0.0)
    # jaccard: sum max = sum a + sum b - sum min, exactly |a| + |b| - |a & b| for 0/1 entries
    union = a.sum(1, keepdim=True) + b.sum(1)[None, :] - inter
    return inter / torch.where(union > 0, union, torch.ones_like(union))


def _pairwise(a: Tensor, b: Tensor, reduce, identity: float) -> Tensor:
    """Combine ``reduce`` over chunks of classes of the (r, k, C) broadcast of a and b."""
    r, k, c = a.shape[0], b.shape[0], a.shape[1]
    out = a.new_full((r, k), identity)
    step = max(1, _CHUNK // max(1, r * k))
    for s in range(0, c, step):
        part = reduce(a[:, None, s : s + step], b[None, :, s : s + step])
        out = out * part if identity == 1.0 else out + part
    return out


def is_binary_dtype(x: Tensor) -> bool:
    """Bool and integer label tensors hold 0/1 entries once validated; floats may hold more."""
    return not (x.is_floating_point() or x.is_complex())


def check_rules(overlap: object) -> str | tuple[str, ...]:
    """``overlap=``: one rule, or a sequence of rules (one per granularity); returns it frozen."""
    if isinstance(overlap, str):
        if overlap not in RULES:
            raise ValueError(
                f"`overlap` must be one of {RULES} (or a sequence of them, one per "
                f"granularity), got {overlap!r}"
            )
        return overlap
    if not isinstance(overlap, Sequence) or len(overlap) == 0:
        raise TypeError(
            f"`overlap` must be one of {RULES} or a non-empty sequence of them, one per "
            f"granularity, got {overlap!r}"
        )
    for g, rule in enumerate(overlap):
        if not isinstance(rule, str) or rule not in RULES:
            raise ValueError(f"`overlap[{g}]` must be one of {RULES}, got {rule!r}")
    return tuple(overlap)


def rules_for(overlap: str | tuple[str, ...], g_count: int) -> list[str]:
    """The rule of each of the G granularities; a sequence must have G entries."""
    if isinstance(overlap, str):
        return [overlap] * g_count
    if len(overlap) != g_count:
        raise ValueError(
            f"`overlap` must have one rule per granularity: G={g_count} from `text_features`, "
            f"got {len(overlap)} ({list(overlap)!r}); pass one string to use it for all"
        )
    return list(overlap)


def partial_side(x: Tensor, left: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One side of :func:`partial_overlap` (``left``: the rows ``a``): (annotated classes,
    ``x`` with 0 at NaN, shareable classes); a caller meeting the same ``b`` for many blocks
    computes it once."""
    seen = ~torch.isnan(x)
    return seen, torch.where(seen, x, 0), _shareable(seen, x, left)


def partial_overlap(
    a: Tensor, b: Tensor, rule: str, binary: bool, b_side=None
) -> tuple[Tensor, Tensor]:
    """The weights and the known pairs (a bool (r, k) mask) of label vectors that may hold NaN.

    The weight of a pair is ``rule`` over the classes that both annotate (0 for an unknown
    pair); ``binary`` promises 0/1/NaN entries.  Shape: a (r, C), b (k, C) of one float dtype.
    ``b_side``: :func:`partial_side` of ``b`` (right), when the caller has it.
    """
    seen_a, a0, share_a = partial_side(a, True)
    seen_b, b0, share_b = partial_side(b, False) if b_side is None else b_side
    if rule == "jaccard":  # the union runs over the classes both annotate
        inter = a0 @ b0.T if binary else _pairwise(a0, b0, _sum_min, 0.0)
        # sum_c seen_a seen_b max(a, b) = a0 . seen_b + seen_a . b0 - inter, in one product
        union = torch.cat([a0, seen_a.to(a.dtype)], 1) @ torch.cat([seen_b.to(b.dtype), b0], 1).T
        weights = inter / torch.where(union > inter, union - inter, torch.ones_like(union))
    else:  # an unannotated class adds nothing to "any" or "count": it reads as absent
        weights = overlap(a0, b0, rule, binary)
    shareable = share_a @ share_b.T
    return weights, (weights > 0) | (shareable == 0)


#: Largest integer up to which every integer is exact in a float dtype (float32: 2**24).
_EXACT = {torch.float32: 2**24, torch.float64: 2**53}


def right_factors(b_side: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor | None, Tensor]:
    """The right factors of :func:`partial_overlap_into`'s products for 0/1 labels ``b``, from
    their :func:`partial_side`: a caller meeting the same ``b`` for many blocks builds them once.

    The known mask's ``[shareable(b), -(C + 3) b]`` (k, 2 C + 2), or None where its integers
    would not all be exact in the dtype (the mask then takes the general path), and the
    Jaccard union's ``[annotated(b), b]`` (k, 2 C).
    """
    seen, b0, share = b_side
    c = b0.shape[1]
    exact = (c + 2) + (c + 3) * c < _EXACT.get(b0.dtype, 0)
    mask = torch.cat([share, b0 * -(c + 3)], 1) if exact else None
    return mask, torch.cat([seen.to(b0.dtype), b0], 1)


def partial_overlap_into(
    a: Tensor,
    b: Tensor,
    rule: str,
    binary: bool,
    *,
    b_side,
    b_factors,
    known: Tensor,
    weights: Tensor | None = None,
) -> None:
    """:func:`partial_overlap` written into ``known`` (0/1 in its float dtype) and, unless
    None, ``weights``: the same values, in fewer passes for 0/1 labels.

    ``b_side``: :func:`partial_side` of ``b``; ``b_factors``: :func:`right_factors` of it
    (0/1 labels only; None otherwise).  For 0/1 labels a pair's rule finds a shared label
    exactly when ``a0 . b0 >= 1``, and shares none that could be shared when
    ``shareable = 0``: the mask is ``shareable - (C + 3) a0 . b0 <= 0``, one product of small
    integers (exact), and the weight of an unknown pair is 0 already.
    """
    if not binary or b_factors is None or b_factors[0] is None:
        w, mask = partial_overlap(a, b, rule, binary, b_side=b_side)
        known.copy_(mask)
        if weights is not None:
            weights.copy_(w)
        return
    seen_a, a0, share_a = partial_side(a, True)
    torch.le(torch.cat([share_a, a0], 1) @ b_factors[0].T, 0, out=known)
    if weights is None:
        return
    b0 = b_side[1]
    if rule == "count":
        torch.mm(a0, b0.T, out=weights)
    elif rule == "any":
        torch.gt(a0 @ b0.T, 0, out=weights)
    else:  # jaccard: |a & b| / |a | b| over the classes both annotate (both 0: weight 0)
        inter = a0 @ b0.T
        union = torch.cat([a0, seen_a.to(a.dtype)], 1) @ b_factors[1].T
        torch.div(inter, union.sub_(inter).clamp_min_(1), out=weights)


def _shareable(seen: Tensor, x: Tensor, left: bool) -> Tensor:
    """The classes a row could share (all but its annotated 0s), as floats, plus two columns
    that make every pair with a row annotated nowhere shareable, hence unknown, never negative.

    The product of a left and a right row is 0 exactly when, for every class, one of the two
    is an annotated 0; the extra columns add ``nowhere(a) + nowhere(b)`` to it.
    """
    nowhere = ~seen.any(1, keepdim=True)
    extra = [nowhere, torch.ones_like(nowhere)] if left else [torch.ones_like(nowhere), nowhere]
    return torch.cat([~(seen & (x == 0)), *extra], 1).to(x.dtype)


def _sum_min(x: Tensor, y: Tensor) -> Tensor:
    return torch.minimum(x, y).sum(-1)
