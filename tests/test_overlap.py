"""Overlap rules of paired multi-hot labels (``overlap=``), 0/1 and label probabilities.

The rules against float64 loops; the loss with each rule against the naive float64 terms
(values and gradients) on every backend; paired ``overlap=rule`` against dense
``targets=from_multi_hot(..., overlap=rule)`` with K = N; 0/1 inputs against the set rules exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgll
import naive
from backends_under_test import CPU_BACKENDS
from mgll import targets
from mgll._problem import cooccurrence_from_labels
from mgll.targets.cooc import CoOccurrence

F64 = torch.float64
RULES = ("any", "count", "jaccard")
TIGHT = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=2e-6)


# every backend crosses several blocks on small inputs (the fixture is in conftest.py)
pytestmark = pytest.mark.usefixtures("small_tiles")


def naive_rule(a: torch.Tensor, b: torch.Tensor, rule: str) -> torch.Tensor:
    """C[i, k] with loops: probability of a shared label, expected count, fuzzy Jaccard."""
    a, b = a.to(F64), b.to(F64)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=F64)
    for i in range(a.shape[0]):
        for k in range(b.shape[0]):
            pairs = list(zip(a[i].tolist(), b[k].tolist(), strict=True))
            if rule == "any":
                miss = 1.0
                for x, y in pairs:
                    miss *= 1.0 - x * y
                out[i, k] = 1.0 - miss
            elif rule == "count":
                out[i, k] = sum(x * y for x, y in pairs)
            else:
                top = sum(max(x, y) for x, y in pairs)
                out[i, k] = sum(min(x, y) for x, y in pairs) / top if top > 0 else 0.0
    return out


def labels(n: int, c: int, kind: str, seed: int = 0) -> torch.Tensor:
    """0/1 label sets (bool, long or float) or label probabilities (``soft``, with 0.5s)."""
    gen = torch.Generator().manual_seed(seed)
    hot = torch.rand(n, c, generator=gen) < 0.4
    hot[0] = False  # a sample without labels
    if kind == "soft":
        values = torch.tensor([0.5, 1.0, 0.25, 0.9])[torch.randint(0, 4, (n, c), generator=gen)]
        return torch.where(hot, values, torch.zeros(()))
    return hot.to({"bool": torch.bool, "long": torch.long, "float": torch.float32}[kind])


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("kind", ["bool", "long", "float", "soft"])
@pytest.mark.parametrize("rule", RULES)
def test_rules_against_loops(rule, kind):
    a, b = labels(9, 4, kind), labels(6, 4, kind, seed=1)
    torch.testing.assert_close(
        targets.from_multi_hot(a, b, overlap=rule).double(), naive_rule(a, b, rule), **F32
    )
    cooc = CoOccurrence("multi_hot", a.double() if kind == "soft" else a, rule)
    want = naive_rule(a, a, rule)
    torch.testing.assert_close(cooc.dense(F64), want, **TIGHT)
    torch.testing.assert_close(cooc.block(slice(2, 7), slice(1, 5), F64), want[2:7, 1:5], **TIGHT)
    for dim in (0, 1):  # symmetric: row sums equal column sums
        torch.testing.assert_close(cooc.line_sums(dim, F64), want.sum(dim), **TIGHT)
    rows, cols = cooc.anchor_counts()
    assert int(rows) == int(cols) == int((want.sum(1) > 0).sum())


@pytest.mark.parametrize("rule", RULES)
def test_binary_labels_give_the_set_rules_exactly(rule):
    """0/1 entries: every dtype gives bit for bit |a & b| > 0, |a & b| and |a & b| / |a | b|."""
    hot = labels(30, 5, "bool")
    inter = hot.float() @ hot.float().T
    union = hot.sum(1, keepdim=True) + hot.sum(1)[None, :] - inter
    want = {
        "any": (inter > 0).float(),
        "count": inter,
        "jaccard": inter / torch.where(union > 0, union, torch.ones_like(union)),
    }[rule]
    for dtype in (torch.bool, torch.long, torch.float32):
        x = hot.to(dtype)
        assert torch.equal(CoOccurrence("multi_hot", x, rule).dense(), want)
        assert torch.equal(targets.from_multi_hot(x, overlap=rule), want)
    assert CoOccurrence("multi_hot", hot, rule).binary == (rule == "any")
    assert not CoOccurrence("multi_hot", hot.float(), "any").binary  # floats may be soft


def test_soft_rules_hand_computed():
    u = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 0.0]])
    got = {rule: targets.from_multi_hot(u, overlap=rule) for rule in RULES}
    torch.testing.assert_close(got["any"][1], torch.tensor([0.5, 0.25, 0.25, 0.0]))
    torch.testing.assert_close(got["count"][2], torch.tensor([0.5, 0.25, 1.25, 0.0]))
    torch.testing.assert_close(got["jaccard"][1], torch.tensor([0.5, 1.0, 0.5 / 1.5, 0.0]))
    torch.testing.assert_close(got["jaccard"].diagonal(), torch.tensor([1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            1.5,
            r"`a` multi-hot entries must be 0/1, label probabilities in \[0, 1\] or NaN .*got 1.5",
        ),
        (-0.5, r"`a` multi-hot entries must be 0/1, label probabilities in \[0, 1\] .*got -0.5"),
        (float("inf"), r"`a` multi-hot entries must be 0/1, label probabilities .* got inf"),
    ],
)
def test_from_multi_hot_rejects_values_outside_the_unit_interval(value, match):
    a = torch.zeros(3, 2)
    a[1, 1] = value
    with pytest.raises(ValueError, match=match):
        targets.from_multi_hot(a)


# ---------------------------------------------------------------------- the loss, every backend


def _features(n: int, g: int, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 6, generator=gen, dtype=dtype).requires_grad_()
    texts = [torch.randn(n, 6, generator=gen, dtype=dtype).requires_grad_() for _ in range(g)]
    scale = torch.tensor(6.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=dtype, requires_grad=True)
    return image, texts, scale, bias


def _tol(backend: str) -> dict:
    return F32 if backend == "triton" else TIGHT  # triton computes in fp32


N_NAIVE = 9


@functools.cache
def _naive_terms(rule: str, kind: str, target: str) -> dict[str, list[torch.Tensor]]:
    """The naive float64 soft-CLIP and pointwise terms and their gradients (computed once)."""
    image, texts, scale, bias = _features(N_NAIVE, 2)
    labs = _naive_labels(kind)
    leaves = [image, *texts, scale, bias]
    x = image / image.norm(dim=1, keepdim=True)
    zs = [scale * x @ (t / t.norm(dim=1, keepdim=True)).T for t in texts]
    cs = [naive_rule(labs[0], labs[0], rule), naive.cooc_from_labels(labs[1])]
    values = {
        "soft_clip_loss": sum(naive.soft_clip(z, c) for z, c in zip(zs, cs, strict=True)),
        "pointwise_loss": sum(
            naive.pointwise(z, c, bias, target) for z, c in zip(zs, cs, strict=True)
        ),
    }
    return {k: [v.detach(), *(g.detach() for g in _grads(v, leaves))] for k, v in values.items()}


def _naive_labels(kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [labels(N_NAIVE, 4, kind), torch.randint(0, 3, (N_NAIVE,), generator=gen)]


@pytest.mark.parametrize("target", ["binary", "soft", "graded"])
@pytest.mark.parametrize("kind", ["bool", "soft"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_equals_naive_float64(backend, rule, kind, target):
    """Soft CLIP and pointwise, values and every gradient, against the naive terms on the
    rule's C (a multi-hot granularity with the rule, and one of ids)."""
    image, texts, scale, bias = _features(N_NAIVE, 2)
    leaves = [image, *texts, scale, bias]
    out = mgll.mgll_loss(
        image, texts, scale, bias, labels=_naive_labels(kind), overlap=rule,
        pointwise_target=target, backend=backend, output_dict=True,
    )  # fmt: skip
    for name, (value, *grads) in _naive_terms(rule, kind, target).items():
        torch.testing.assert_close(out[name].double(), value, **_tol(backend))
        for got, want in zip(_grads(out[name], leaves), grads, strict=True):
            torch.testing.assert_close(got.double(), want, **_tol(backend))


def _grads(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``value``, zeros for the leaves it does not depend on."""
    if not value.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    got = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves, strict=True)]


@pytest.mark.parametrize("target", ["binary", "soft", "graded"])
@pytest.mark.parametrize("kind", ["bool", "soft"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paired_rule_equals_dense_targets(backend, rule, kind, target):
    """``labels=`` with ``overlap=rule`` equals ``targets=from_multi_hot(labels, overlap=rule)``
    with K = N on the soft-CLIP and pointwise terms: values and gradients."""
    n = 14
    image, texts, scale, bias = _features(n, 2, seed=3, dtype=torch.float32)
    labs = [labels(n, 5, kind, seed=4), labels(n, 3, "long", seed=5)]
    dense = [
        targets.from_multi_hot(labs[0], overlap=rule),
        targets.from_multi_hot(labs[1], overlap="any"),
    ]
    options = dict(pointwise_target=target, smooth_kl_weight=0.0, backend=backend)
    leaves = [image, *texts, scale, bias]
    paired = mgll.mgll_loss(
        image, texts, scale, bias, labels=labs, overlap=[rule, "any"], output_dict=True,
        **options,
    )  # fmt: skip
    bank = mgll.mgll_loss(image, texts, scale, bias, targets=dense, output_dict=True, **options)
    for name in ("soft_clip_loss", "pointwise_loss"):
        torch.testing.assert_close(paired[name], bank[name], **F32)
        torch.testing.assert_close(_grads(paired[name], leaves), _grads(bank[name], leaves), **F32)


@pytest.mark.parametrize("validate", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_zero_one_labels_equal_bool_labels(backend, rule, validate):
    """0/1 floats give the loss of bool labels: recognised as 0/1 with ``validate=True`` (the
    matrix-product path), through the elementwise (probability) path without the check."""
    n = 12
    image, texts, scale, bias = _features(n, 2, seed=6, dtype=torch.float32)
    hot = labels(n, 4, "bool", seed=7)
    ids = torch.randint(0, 3, (n,))
    options = dict(overlap=rule, smooth_kl_support="coarse", backend=backend, validate=validate)
    a = mgll.mgll_loss(image, texts, scale, bias, labels=[hot, ids], **options)
    b = mgll.mgll_loss(image, texts, scale, bias, labels=[hot.float(), ids], **options)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", RULES)
def test_float_labels_are_recognised_as_zero_one_only_when_checked(rule):
    hot = labels(10, 3, "float")
    soft = labels(10, 3, "soft")
    assert cooccurrence_from_labels(hot, rule, check=True).zero_one == (rule != "count")
    assert not cooccurrence_from_labels(hot, rule, check=False).zero_one
    assert not cooccurrence_from_labels(soft, rule, check=True).zero_one
    assert cooccurrence_from_labels(hot.bool(), rule).zero_one_labels


def test_ids_mean_equal_ids_whatever_the_rule():
    image, texts, scale, _ = _features(10, 2)
    ids = [torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,))]
    base = mgll.mgll_loss(image, texts, scale, labels=ids)
    for rule in ("count", "jaccard"):
        assert torch.equal(mgll.mgll_loss(image, texts, scale, labels=ids, overlap=rule), base)


def test_default_rule_is_jaccard_and_one_string_means_every_granularity():
    image, texts, scale, _ = _features(10, 2)
    labs = [labels(10, 3, "bool"), labels(10, 4, "soft", seed=2)]
    base = mgll.mgll_loss(image, texts, scale, labels=labs)
    assert torch.equal(mgll.mgll_loss(image, texts, scale, labels=labs, overlap="jaccard"), base)
    both = mgll.mgll_loss(image, texts, scale, labels=labs, overlap="any")
    seq = mgll.mgll_loss(image, texts, scale, labels=labs, overlap=("any", "any"))
    assert torch.equal(both, seq)
    assert not torch.equal(both, base)


def test_module_shows_and_uses_the_rule():
    loss_fn = mgll.MGLLLoss(overlap=["jaccard", "count"])
    assert "overlap=('jaccard', 'count')" in repr(loss_fn)
    assert "overlap='jaccard'" in repr(mgll.MGLLLoss())
    image, texts, scale, _ = _features(8, 2)
    labs = [labels(8, 3, "soft"), labels(8, 3, "bool", seed=1)]
    want = mgll.mgll_loss(image, texts, scale, labels=labs, overlap=("jaccard", "count"))
    assert torch.equal(loss_fn(image, texts, scale, labels=labs), want)


def test_module_rejects_a_bad_rule_at_construction():
    with pytest.raises(ValueError, match=r"`overlap` must be one of \('any', 'count', 'jaccard'\)"):
        mgll.MGLLLoss(overlap="cosine")


@pytest.mark.parametrize("rule", RULES)
def test_tiled_asks_for_blocks_only(monkeypatch, rule):
    """The tiled backend never expands paired labels to N x N, whatever the rule."""
    n = 20
    seen = []
    block = CoOccurrence.block

    def spy(self, rows=slice(None), cols=slice(None), dtype=None):
        out = block(self, rows, cols, dtype)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(CoOccurrence, "block", spy)
    image, texts, scale, _ = _features(n, 2)
    labs = [labels(n, 4, "soft"), labels(n, 4, "bool")]
    loss = mgll.mgll_loss(image, texts, scale, labels=labs, overlap=rule, backend="tiled")
    loss.backward()
    assert seen and max(r for r, _ in seen) <= 3 and max(k for _, k in seen) <= 4


# ------------------------------------------------------------------------ "same caption" ids


def test_label_set_ids_partition_by_exact_set():
    hot = labels(40, 6, "bool", seed=8)
    ids = targets.label_set_ids(hot)
    same = (hot[:, None, :] == hot[None, :, :]).all(-1)
    assert torch.equal(ids[:, None] == ids[None, :], same)
    assert torch.equal(CoOccurrence("ids", ids).dense(), same.float())
    _, inverse = torch.unique(hot, dim=0, return_inverse=True)  # the one-process recipe
    assert torch.equal(inverse[:, None] == inverse[None, :], same)


def test_label_set_ids_do_not_depend_on_the_batch():
    """Row-wise ids: each rank's part of a batch gets the ids of the whole batch (distributed)."""
    hot = labels(12, 63, "long", seed=9)
    whole = targets.label_set_ids(hot)
    parts = torch.cat([targets.label_set_ids(hot[:5]), targets.label_set_ids(hot[5:])])
    assert torch.equal(parts, whole)
    assert int(whole.min()) >= 0


@pytest.mark.parametrize(
    ("a", "error", "match"),
    [
        (torch.zeros(2, 64), ValueError, r"`a` must have at most 63 classes .* got C_g=64"),
        (torch.full((2, 3), 0.5), ValueError, r"`a` multi-hot entries must be 0 or 1, got 0.5"),
        (torch.zeros(3), ValueError, r"`a` must be 2-D \(rows, C_g\) multi-hot"),
        ([[0, 1]], TypeError, r"`a` must be a \(rows, C_g\) multi-hot tensor, got list"),
    ],
)
def test_label_set_ids_bad_input(a, error, match):
    with pytest.raises(error, match=match):
        targets.label_set_ids(a)


@given(st.integers(1, 10), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_rule_properties(n, c, seed):
    """Symmetric; any and jaccard in [0, 1]; max_c a_c b_c <= any <= count; J(a, a) = 1."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, c, generator=gen) < 0.5) * torch.rand(n, c, generator=gen).double()
    got = {rule: targets.from_multi_hot(a, overlap=rule) for rule in RULES}
    for rule, m in got.items():
        torch.testing.assert_close(m, m.T, msg=rule)
        assert bool((m >= 0).all()), rule
    assert bool((got["any"] <= 1).all() & (got["jaccard"] <= 1 + 1e-12).all())
    best = (a[:, None, :] * a[None, :, :]).amax(-1) if c else torch.zeros(n, n, dtype=F64)
    assert bool((best <= got["any"] + 1e-12).all() & (got["any"] <= got["count"] + 1e-12).all())
    torch.testing.assert_close(got["jaccard"].diagonal(), (a.sum(1) > 0).double())
