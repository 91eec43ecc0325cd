"""Partial annotation: a label nobody annotated is unknown, never a negative (docs/partial_annotation.rst).

NaN in paired float labels is "not annotated" for that image and class; a row NaN everywhere,
or the id -1, is "no annotation at that granularity"; NaN in bank targets is an unknown pair.
Every backend against a naive float64 masked reference (values and gradients), invariances that
need no reference, inputs without NaN unchanged, and the errors that remain errors.
"""

from __future__ import annotations

import math

import pytest
import torch

import mgll
import naive
from backends_under_test import CPU_BACKENDS
from mgll import targets

F64 = torch.float64
NAN = math.nan
RULES = ("any", "count", "jaccard")


# every backend crosses several blocks on small inputs (the fixture is in conftest.py)
pytestmark = pytest.mark.usefixtures("small_tiles")


def partial_labels(n: int, c: int, seed: int, whole_rows: int = 2, soft: bool = False):
    """0/1 labels (or probabilities) with NaN classes and ``whole_rows`` unannotated rows."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, generator=gen) < 0.45).to(F64)
    if soft:
        x = x * torch.tensor([0.5, 1.0, 0.25])[torch.randint(0, 3, (n, c), generator=gen)].to(F64)
    x[torch.rand(n, c, generator=gen) < 0.25] = NAN
    x[torch.randperm(n, generator=gen)[:whole_rows]] = NAN
    return x


def partial_ids(n: int, seed: int, classes: int = 3, missing: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, classes, (n,), generator=gen)
    ids[torch.randperm(n, generator=gen)[:missing]] = -1
    return ids


def features(n: int, ks, d: int = 6, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
    texts = [torch.randn(k, d, generator=gen, dtype=dtype).requires_grad_() for k in ks]
    scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    return image, texts, scale


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_against_naive(backend, leaves, kwargs, naive_kwargs, dtype=F64):
    image, texts, scale = leaves
    loss = mgll.MGLLLoss(backend=backend, **kwargs)(image, texts, scale, **naive_kwargs["call"])
    want = naive.partial_mgll(image, texts, scale, **naive_kwargs["naive"])
    # the Triton kernels compute in float32 whatever the input
    exact = dtype == F64 and backend != "triton"
    tol = dict(rtol=1e-9, atol=1e-10) if exact else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), want.double(), **tol)
    for got, ref in zip(
        grads(loss, [image, *texts, scale]), grads(want, [image, *texts, scale]), strict=True
    ):
        got = torch.zeros_like(ref) if got is None else got
        torch.testing.assert_close(got.double(), ref.double(), **tol)


# ------------------------------------------------------------------ the pair rule


@pytest.mark.parametrize("soft", [False, True], ids=["0/1", "probabilities"])
@pytest.mark.parametrize("rule", RULES)
def test_pair_status_against_loops(rule, soft):
    a = partial_labels(9, 4, seed=1, soft=soft)
    got = targets.from_multi_hot(a, overlap=rule).double()
    torch.testing.assert_close(got, naive.partial_cooc(a, rule), equal_nan=True)


def test_pair_status_by_hand():
    a = torch.tensor([[1.0, 0, NAN], [0, 0, 0], [NAN, NAN, NAN], [0, 1, 0], [1, NAN, NAN]])
    c = targets.from_multi_hot(a, overlap="any")
    # [1,0,?] vs [0,1,0]: class 2 is 0 in the second, class 0 in it too, class 1 in the first
    assert c[0, 3] == 0
    # [0,1,0] vs [1,?,?]: class 1 is positive in one, unannotated in the other: unknown
    assert math.isnan(c[3, 4])
    # a row with no annotation is unknown to everyone, itself included
    assert torch.isnan(c[2]).all() and torch.isnan(c[:, 2]).all()
    # an annotated "normal" row (all 0) is a known negative of every annotated row
    assert c[1, 0] == 0 and c[1, 3] == 0 and c[1, 1] == 0
    # jaccard over the classes both annotate: [1,0,?] vs [1,?,?] share their one class
    assert targets.from_multi_hot(a, overlap="jaccard")[0, 4] == 1


@pytest.mark.parametrize(
    ("soft", "zero_one"), [(False, True), (False, False), (True, False)],
    ids=["0/1", "0/1-general", "probabilities"],
)  # fmt: skip
@pytest.mark.parametrize("rule", RULES)
def test_known_pairs_in_one_product_equal_the_rule(rule, soft, zero_one, monkeypatch):
    """partial_overlap_into (the fused blocks, the line sums) against partial_overlap: the
    one-product mask of 0/1 labels, the general path, and the fallback for wide labels."""
    from mgll.targets import overlap as ov

    a, b = partial_labels(9, 4, seed=2, soft=soft), partial_labels(11, 4, seed=3, soft=soft)
    want_w, want_k = ov.partial_overlap(a, b, rule, zero_one)
    for exact in (True, False):
        if not exact:  # integers past the dtype's exact range: the general path
            monkeypatch.setattr(ov, "_EXACT", {})
        side = ov.partial_side(b, left=False)
        known, weights = torch.empty(9, 11, dtype=F64), torch.empty(9, 11, dtype=F64)
        factors = ov.right_factors(side) if zero_one else None
        assert zero_one is False or (factors[0] is None) == (not exact)
        ov.partial_overlap_into(
            a, b, rule, zero_one, b_side=side, b_factors=factors, known=known, weights=weights
        )
        torch.testing.assert_close(known, want_k.to(F64), rtol=0, atol=0)
        torch.testing.assert_close(weights, want_w, rtol=1e-12, atol=0)
        only = torch.empty(9, 11, dtype=F64)  # the mask alone (the column pass)
        ov.partial_overlap_into(a, b, rule, zero_one, b_side=side, b_factors=factors, known=only)
        torch.testing.assert_close(only, known, rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_line_sums_and_known_counts_of_partial_labels(rule):
    """One pass over the distinct label sets gives both the row sums and the known pairs."""
    from mgll.targets.cooc import CoOccurrence

    a = partial_labels(13, 4, seed=5)
    a[4] = a[7]  # a repeated label set
    c = naive.partial_cooc(a, rule)
    for dtype in (torch.float32, F64):
        cooc = CoOccurrence("multi_hot", a, rule, zero_one=True, partial=True)
        counts = cooc.known_counts(1, dtype)
        assert counts.dtype == torch.int64
        assert torch.equal(counts, (~torch.isnan(c)).sum(1))
        torch.testing.assert_close(cooc.line_sums(1, dtype).double(), c.nansum(1), **_TOL[dtype])


def test_known_counts_beyond_the_dtypes_exact_integers():
    """Past the compute dtype's exact integers (float32: N >= 2**24) the known pairs are
    counted in float64, the multiplicities of the label sets included (float16 here: 2**11)."""
    from mgll.targets.cooc import CoOccurrence

    a = torch.zeros(2050, 3)
    a[:, 0], a[:2049, 2] = 1.0, math.nan  # 2049 identical rows, then one other
    cooc = CoOccurrence("multi_hot", a, "any", zero_one=True, partial=True)
    counts = cooc.known_counts(1, torch.float16)
    want = (~torch.isnan(naive.partial_cooc(a.double(), "any"))).sum(1)
    assert torch.equal(counts, want) and int(counts[0]) == 2050


_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)}


def test_ids_with_unknowns_group_without_a_dense_matrix():
    """The missing id -1 is a zero row of S, kept as group ids (both the one-hot's products
    and the segment sums for many groups)."""
    from mgll.targets.cooc import CoOccurrence, GroupMap, sample_groups

    ids = torch.tensor([5, -1, 5, 9, 0, -1, 2])
    groups = sample_groups(CoOccurrence("ids", ids, partial=True))
    assert isinstance(groups, GroupMap) and groups.shape == (7, 4)
    values = torch.tensor([0, 2, 5, 9])
    dense = (ids[:, None] == values[None, :]).float()
    big = GroupMap(groups.index, groups.num_groups, groups.ungrouped)
    big.DENSE_GROUPS = 0  # the segment path
    p, g = torch.rand(3, 7), torch.rand(3, 4)
    for m in (groups, big):
        torch.testing.assert_close(m.pool(p), p @ dense)
        torch.testing.assert_close(m.spread(g), g @ dense.T)
        torch.testing.assert_close(m.rows(slice(1, 5)).pool(p[:, 1:5]), p[:, 1:5] @ dense[1:5])
    assert big._dense is None
    torch.testing.assert_close(groups.dense(), dense)


@pytest.mark.parametrize("dense_groups", [32, 0], ids=["one-hot", "segments"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_missing_ids_as_the_coarse_support_equal_naive(backend, dense_groups, monkeypatch):
    """Ids with -1 as the smooth KL's coarse support (a GroupMap with rows in no group), over
    several chunks, both ways of applying it."""
    from mgll.targets.cooc import GroupMap

    monkeypatch.setattr(GroupMap, "DENSE_GROUPS", dense_groups)
    n = 9
    labels = [partial_ids(n, seed=4, classes=3, missing=3), partial_labels(n, 5, seed=6)]
    rules = ["any", "jaccard"]
    leaves = features(n, [n, n])
    kwargs = dict(overlap=rules, smooth_kl_support="coarse", smooth_kl_reference=0)
    naive_kwargs = {
        "call": {"labels": labels},
        "naive": {"labels": labels, "rules": rules, "support": "coarse", "reference": 0},
    }
    check_against_naive(backend, leaves, kwargs, naive_kwargs)


def test_ids_with_missing_marker():
    c = targets.from_ids(torch.tensor([0, -1, 0, 1]))
    assert torch.isnan(c[1]).all() and torch.isnan(c[:, 1]).all()
    assert c[0, 2] == 1 and c[0, 3] == 0


# ------------------------------------------------------------------ against the naive reference


def _paired_case(kind: str, g_count: int, n: int = 7):
    labels, rules = [], []
    for g in range(g_count):
        if kind == "ids" or (kind == "mixed" and g == 0):
            labels.append(partial_ids(n, seed=g))
            rules.append("any")
        else:
            labels.append(partial_labels(n, 3, seed=10 + g, soft=kind == "soft"))
            rules.append(RULES[g % 3])
    return labels, rules


@pytest.mark.parametrize("support", ["samples", "coarse"])
@pytest.mark.parametrize("g_count", [1, 2, 3])
@pytest.mark.parametrize("kind", ["ids", "multi_hot", "soft", "mixed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paired_equals_naive(backend, kind, g_count, support):
    n = 7
    labels, rules = _paired_case(kind, g_count, n)
    leaves = features(n, [n] * g_count)
    kwargs = dict(overlap=rules, smooth_kl_support=support)
    check_against_naive(
        backend,
        leaves,
        kwargs,
        {
            "call": {"labels": labels},
            "naive": {"labels": labels, "rules": rules, "support": support},
        },
    )


@pytest.mark.parametrize("support", ["samples", "coarse"])
@pytest.mark.parametrize("g_count", [1, 2, 3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bank_equals_naive(backend, g_count, support):
    n, ks = 7, [5, 4, 6][:g_count]
    gen = torch.Generator().manual_seed(3)
    bank = []
    for k in ks:
        c = (torch.rand(n, k, generator=gen) < 0.4).to(F64) * torch.rand(
            n, k, generator=gen, dtype=F64
        )
        c[torch.rand(n, k, generator=gen) < 0.25] = NAN
        c[1] = NAN  # an image unannotated at this granularity
        bank.append(c)
    leaves = features(n, ks)
    check_against_naive(
        backend,
        leaves,
        dict(smooth_kl_support=support),
        {"call": {"targets": bank}, "naive": {"targets": bank, "support": support}},
    )


@pytest.mark.parametrize("case", ["paired", "bank"])
def test_fused_without_a_fixed_shift_equals_naive(monkeypatch, case):
    """Logits too large for a fixed log-sum-exp shift: fused masks the unknown ones instead."""
    from mgll.backends import _blockmath

    monkeypatch.setattr(_blockmath, "_SHIFT_LIMIT", {})
    n = 7
    if case == "paired":
        labels, rules = _paired_case("mixed", 2, n)
        leaves = features(n, [n, n])
        naive_kwargs = {
            "call": {"labels": labels},
            "naive": {"labels": labels, "rules": rules, "support": "samples"},
        }
        kwargs = dict(overlap=rules, smooth_kl_support="samples")
    else:
        gen = torch.Generator().manual_seed(4)
        bank = [torch.rand(n, k, generator=gen, dtype=F64) for k in (5, 6)]
        for c in bank:
            c[torch.rand(c.shape, generator=gen) < 0.3] = NAN
            c[2] = NAN
        leaves = features(n, [5, 6])
        naive_kwargs = {"call": {"targets": bank}, "naive": {"targets": bank, "support": "samples"}}
        kwargs = dict(smooth_kl_support="samples")
    check_against_naive("fused", leaves, kwargs, naive_kwargs)


@pytest.mark.parametrize("option", ["soft", "graded", "images", "bias"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pointwise_options_equal_naive(backend, option):
    n = 7
    labels, rules = _paired_case("soft", 2, n)
    leaves = features(n, [n, n])
    kwargs = dict(overlap=rules, smooth_kl_weight=0.0, soft_clip_weight=0.0)
    naive_kw = dict(labels=labels, rules=rules, weights=(0.0, 1.0, 0.0))
    call = {"labels": labels}
    if option in ("soft", "graded"):
        kwargs["pointwise_target"] = naive_kw["target"] = option
    elif option == "images":
        kwargs["pointwise_norm"] = naive_kw["norm"] = "images"
    else:
        bias = torch.tensor(-1.5, dtype=F64, requires_grad=True)
        call["logit_bias"] = naive_kw["bias"] = bias
    check_against_naive(backend, leaves, kwargs, {"call": call, "naive": naive_kw})


# ------------------------------------------------------------------ invariances, no reference


@pytest.mark.parametrize("term", ["soft_clip_loss", "pointwise_loss"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adding_an_unannotated_image_changes_nothing(backend, term):
    """An image with no annotation at g leaves the g-terms of the others unchanged."""
    n = 6
    labels = partial_labels(n, 3, seed=5, whole_rows=0)
    image, (text,), scale = features(n, [n])
    loss_fn = mgll.MGLLLoss(backend=backend)
    before = loss_fn(image, [text], scale, labels=[labels], output_dict=True)[term]
    extra_image, (extra_text,), _ = features(1, [1], seed=9)
    after = loss_fn(
        torch.cat([image, extra_image]),
        [torch.cat([text, extra_text])],
        scale,
        labels=[torch.cat([labels, torch.full((1, 3), NAN, dtype=F64)])],
        output_dict=True,
    )[term]
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unannotated_text_gets_zero_gradient(backend):
    n = 6
    labels = partial_labels(n, 3, seed=6, whole_rows=0)
    labels[2] = NAN
    image, texts, scale = features(n, [n, n])
    ids = torch.tensor([0, 1, 0, 2, 1, 2])
    loss = mgll.MGLLLoss(backend=backend)(image, texts, scale, labels=[labels, ids])
    loss.backward()
    assert (texts[0].grad[2] == 0).all()
    assert (texts[0].grad.abs().sum(1) > 0).sum() == n - 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_unknown_granularity_is_a_differentiable_zero(backend):
    n = 5
    image, texts, scale = features(n, [n, n])
    unknown = torch.full((n, 3), NAN, dtype=F64)
    ids = torch.tensor([0, 1, 0, 2, 1])
    out = mgll.MGLLLoss(backend=backend)(
        image, texts, scale, labels=[unknown, ids], output_dict=True
    )
    alone = mgll.MGLLLoss(backend=backend)(image, texts[1:], scale, labels=[ids], output_dict=True)
    for key in ("soft_clip_loss", "pointwise_loss"):
        torch.testing.assert_close(out[key], alone[key])
    assert out["smooth_kl_loss"] == 0
    sum(out.values()).backward()
    assert (texts[0].grad == 0).all() and torch.isfinite(image.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paired_nan_labels_equal_bank_targets(backend):
    """Paired NaN labels and the bank targets from_multi_hot makes of them: the same loss."""
    n = 7
    labels = partial_labels(n, 4, seed=8)
    image, texts, scale = features(n, [n])
    loss_fn = mgll.MGLLLoss(backend=backend, overlap="jaccard")
    paired = loss_fn(image, texts, scale, labels=[labels])
    bank = loss_fn(image, texts, scale, targets=[targets.from_multi_hot(labels, overlap="jaccard")])
    torch.testing.assert_close(paired, bank)


# ------------------------------------------------------------------ nothing changes without NaN


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_unknowns_nothing_changes(backend):
    """0/1 float labels and ids without -1 go through the same path as before: naive.mgll."""
    n = 7
    gen = torch.Generator().manual_seed(2)
    multi = (torch.rand(n, 3, generator=gen) < 0.5).to(F64)
    ids = torch.tensor([0, 0, 1, 2, 1, 0, 2])
    image, texts, scale = features(n, [n, n])
    loss = mgll.MGLLLoss(backend=backend, overlap="any", smooth_kl_support="samples")(
        image, texts, scale, labels=[ids, multi]
    )
    want = naive.mgll(image, texts, scale, labels=[ids, multi])
    tol = dict(rtol=1e-5, atol=2e-6) if backend == "triton" else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(loss.double(), want, **tol)


@pytest.mark.parametrize("partial", [False, True])
def test_auto_picks_triton_for_unknowns_too(monkeypatch, partial):
    """On CUDA with Triton, "auto" picks "triton", for a batch with unknown labels too."""
    from types import SimpleNamespace

    import mgll.backends as backends
    from mgll.targets.cooc import CoOccurrence

    monkeypatch.setattr(backends, "_logit_count", lambda problem: 0)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    cooc = CoOccurrence("ids", torch.tensor([0, -1, 1]), partial=partial)
    image = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    problem = SimpleNamespace(image=image, cooc=[cooc])
    assert backends.choose_backend(problem) == "triton"
