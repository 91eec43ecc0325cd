"""mgll.targets: each constructor against hand-computed matrices and the core's own label rules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mgll import targets
from mgll.functional import soft_clip_loss
from mgll.targets.cooc import CoOccurrence

F64 = torch.float64


def _multi_hot(n: int, c: int, p: float = 0.35) -> torch.Tensor:
    hot = torch.rand(n, c) < p
    hot[0] = False  # a sample without labels
    return hot


# ---------------------------------------------------------------- from_ids


def test_from_ids_hand_computed():
    got = targets.from_ids(torch.tensor([2, 0, 2, 1]))
    want = torch.tensor(
        [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n", [1, 7, 33])
def test_from_ids_equals_core_rule(n):
    ids = torch.randint(0, 4, (n,))
    torch.testing.assert_close(targets.from_ids(ids), CoOccurrence("ids", ids).dense())


def test_from_ids_keys_equal_integer_ids():
    keys = ["DR", "AMD", "DR", ("glaucoma", 1), "AMD"]
    ids = torch.tensor([0, 1, 0, 2, 1])
    torch.testing.assert_close(targets.from_ids(keys), targets.from_ids(ids))


def test_from_ids_bank_columns():
    got = targets.from_ids(["DR", "AMD", "DR"], ["AMD", "DR", "normal"])
    want = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(got, want)
    got = targets.from_ids(torch.tensor([3, 1]), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (
            (torch.tensor([0.0, 1.0]),),
            TypeError,
            r"`ids_a` must hold integer or bool ids, got dtype torch.float32",
        ),
        (
            (torch.zeros(2, 2, dtype=torch.long),),
            ValueError,
            r"`ids_a` must be 1-D \(N,\), got shape \(2, 2\)",
        ),
        (
            ("DR",),
            TypeError,
            r"`ids_a` must be a 1-D integer tensor or a sequence of hashable keys, got str",
        ),
        (([["a"], ["b"]],), TypeError, r"`ids_a\[0\]` must be hashable .* got list"),
        (
            (torch.tensor([0, 1]), ["a", "b"]),
            TypeError,
            r"`ids_b` must be of the same kind as `ids_a`",
        ),
    ],
)
def test_from_ids_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        targets.from_ids(*args)


# ---------------------------------------------------------------- from_multi_hot


A = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("any", [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]),
        ("count", [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]),
        ("jaccard", [[1, 0.5, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]),
    ],
)
def test_from_multi_hot_hand_computed(mode, want):
    torch.testing.assert_close(
        targets.from_multi_hot(A, overlap=mode), torch.tensor(want, dtype=torch.float32)
    )


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.float32])
@pytest.mark.parametrize("n", [1, 9, 40])
def test_from_multi_hot_any_equals_core_rule(n, dtype):
    hot = _multi_hot(n, 5).to(dtype)
    torch.testing.assert_close(
        targets.from_multi_hot(hot, overlap="any"), CoOccurrence("multi_hot", hot).dense()
    )


def test_from_multi_hot_bank_columns_against_loops():
    a, b = _multi_hot(6, 4), _multi_hot(5, 4)
    got = {m: targets.from_multi_hot(a, b, overlap=m) for m in ("any", "count", "jaccard")}
    for i in range(6):
        for k in range(5):
            inter = int((a[i] & b[k]).sum())
            union = int((a[i] | b[k]).sum())
            assert got["any"][i, k] == float(inter > 0)
            assert got["count"][i, k] == inter
            assert got["jaccard"][i, k] == pytest.approx(inter / union if union else 0.0)


@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_from_multi_hot_properties(n, c, seed):
    gen = torch.Generator().manual_seed(seed)
    hot = torch.rand(n, c, generator=gen) < 0.4
    for mode in ("any", "count", "jaccard"):
        m = targets.from_multi_hot(hot, overlap=mode)
        torch.testing.assert_close(m, m.T)  # symmetric when b is omitted
    jac = targets.from_multi_hot(hot, overlap="jaccard")
    assert bool(((jac >= 0) & (jac <= 1)).all())
    has = hot.any(1)
    torch.testing.assert_close(jac.diagonal(), has.float())  # 1 with labels, 0 without


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(a=torch.tensor([[0, 2]])),
            ValueError,
            r"`a` multi-hot entries must be 0 or 1, got 2",
        ),
        (
            dict(a=torch.tensor([1, 0])),
            ValueError,
            r"`a` must be 2-D \(rows, C_g\) multi-hot, got shape \(2,\)",
        ),
        (dict(a=[[1, 0]]), TypeError, r"`a` must be a \(rows, C_g\) multi-hot tensor, got list"),
        (
            dict(a=A, b=torch.ones(2, 4)),
            ValueError,
            r"`b` must have C_g=3 columns to match `a`, got \(2, 4\)",
        ),
        (
            dict(a=A, overlap="overlap"),
            ValueError,
            r"`overlap` must be one of \('any', 'count', 'jaccard'\) .*got 'overlap'",
        ),
        (
            dict(a=A, overlap=["any", "jaccard"]),
            ValueError,
            r"`overlap` must be one of .*one rule.*got \['any', 'jaccard'\]",
        ),
        (
            dict(a=A, overlap="count", mode="any"),
            TypeError,
            r"got both `mode=` \('any'\) and `overlap=` \('count'\); pass only `overlap=`",
        ),
    ],
)
def test_from_multi_hot_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        targets.from_multi_hot(**kwargs)


def test_from_multi_hot_defaults_to_the_loss_overlap_rule():
    import inspect

    from mgll import MGLLLoss

    default = inspect.signature(MGLLLoss).parameters["overlap"].default
    assert inspect.signature(targets.from_multi_hot).parameters["overlap"].default == default
    assert default == "jaccard"
    torch.testing.assert_close(targets.from_multi_hot(A), targets.from_multi_hot(A, A, "jaccard"))


@pytest.mark.parametrize("rule", ["any", "count", "jaccard"])
def test_from_multi_hot_old_mode_keyword_warns_and_gives_the_same(rule):
    b = _multi_hot(5, A.shape[1])
    new = targets.from_multi_hot(A, b, overlap=rule)
    with pytest.warns(DeprecationWarning, match=r"from_multi_hot\(mode=...\)`.*pass `overlap=`"):
        old = targets.from_multi_hot(A, b, mode=rule)
    assert torch.equal(old, new)
    with pytest.warns(DeprecationWarning):  # the same value under both names is not a conflict
        assert torch.equal(targets.from_multi_hot(A, b, overlap=rule, mode=rule), new)


# ---------------------------------------------------------------- hierarchy

# classes: 0 DR, 1 NPDR (child of DR), 2 PDR (child of DR), 3 moderate NPDR (child of NPDR), 4 AMD
ANC = torch.zeros(5, 5, dtype=torch.bool)
ANC[1, 0] = ANC[2, 0] = ANC[3, 1] = ANC[3, 0] = True


def test_expand_ancestors_hand_computed():
    a = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    want = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(targets.expand_ancestors(a, ANC), want)


def test_from_hierarchy_hand_computed():
    a = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])  # mod. NPDR, PDR, AMD
    bank = torch.eye(5)
    got = targets.from_hierarchy(a, bank, ancestors=ANC, ancestor_credit=0.25)
    want = torch.tensor(
        [
            [1, 1, 0.25, 1, 0],  # DR, NPDR: ancestors; PDR: shares DR; itself; AMD: unrelated
            [1, 0.25, 1, 0.25, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(targets.from_hierarchy(a, bank, ancestors=ANC), (want == 1).float())


def test_from_hierarchy_full_credit_is_any_overlap_of_expanded_sets():
    hot = torch.rand(10, 5) < 0.3
    full = targets.from_hierarchy(hot, ancestors=ANC, ancestor_credit=1.0)
    up = targets.expand_ancestors(hot, ANC)
    torch.testing.assert_close(full, targets.from_multi_hot(up, overlap="any"))
    torch.testing.assert_close(full, full.T)  # symmetric when b is omitted


def test_from_hierarchy_is_directional_below_full_credit():
    """A fine label implies its ancestors, not the other way round."""
    a = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])  # a DR-only image, an NPDR image
    got = targets.from_hierarchy(a, ancestors=ANC, ancestor_credit=0.5)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(ancestors=torch.zeros(4, 4)),
            ValueError,
            r"`ancestors` must have shape \(C_g, C_g\) = \(5, 5\) .* got \(4, 4\)",
        ),
        (
            dict(ancestors=[[0]]),
            TypeError,
            r"`ancestors` must be a \(C_g, C_g\) tensor .* got list",
        ),
        (
            dict(ancestors=ANC, ancestor_credit=1.5),
            ValueError,
            r"`ancestor_credit` must be in \[0, 1\], got 1.5",
        ),
        (
            dict(ancestors=ANC, ancestor_credit="half"),
            TypeError,
            r"`ancestor_credit` must be a number, got str",
        ),
    ],
)
def test_from_hierarchy_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        targets.from_hierarchy(torch.zeros(2, 5), **kwargs)


# ---------------------------------------------------------------- normalize / smooth


def test_normalize_hand_computed():
    c = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    rows = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    cols = torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 2 / 3, 0.0]])
    torch.testing.assert_close(targets.normalize(c, dim=1), rows)
    torch.testing.assert_close(targets.normalize(c, dim=0), cols)


def test_normalize_directions_are_what_the_loss_uses():
    """soft_clip_loss = half the CE against W^r (rows) plus half against W^c (columns)."""
    a = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]])
    bank = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    c = targets.from_multi_hot(a, bank).to(F64)  # (6, 4): a bank with an ownerless text
    z = torch.randn(6, 4, dtype=F64)
    wr, wc = targets.normalize(c, dim=1), targets.normalize(c, dim=0)
    i2t = -(wr * z.log_softmax(1)).sum() / (c.sum(1) > 0).sum()
    t2i = -(wc * z.log_softmax(0)).sum() / (c.sum(0) > 0).sum()
    torch.testing.assert_close(soft_clip_loss(z, c), 0.5 * (i2t + t2i))
    torch.testing.assert_close(wc.sum(0), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))
    sym = targets.from_multi_hot(a).to(F64)  # symmetric C: W^c is the transpose of W^r
    torch.testing.assert_close(targets.normalize(sym, 0), targets.normalize(sym, 1).T)


def test_smooth_hand_computed():
    c = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    want = torch.tensor([[0.45 + 0.025, 0.475, 0.025, 0.025], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(targets.smooth(c, 0.1), want)
    cols = targets.smooth(c, 0.5, dim=0)
    torch.testing.assert_close(cols, torch.tensor([[0.75, 0.75, 0, 0], [0.25, 0.25, 0, 0]]))
    torch.testing.assert_close(targets.smooth(c, 0.0), targets.normalize(c, 1))


@pytest.mark.parametrize(
    ("fn", "args", "error", "match"),
    [
        (
            targets.normalize,
            (torch.ones(2, 2), 2),
            ValueError,
            r"`dim` must be 0 \(columns\) or 1 \(rows\).* got 2",
        ),
        (
            targets.normalize,
            (-torch.ones(2, 2), 1),
            ValueError,
            r"`C` must be non-negative, got min -1.0",
        ),
        (targets.normalize, (torch.ones(2), 1), ValueError, r"`C` must be 2-D, got shape \(2,\)"),
        (targets.normalize, (torch.tensor([[float("nan")]]), 1), ValueError, r"`C` contains NaN"),
        (
            targets.smooth,
            (torch.ones(2, 2), 1.0),
            ValueError,
            r"`epsilon` must be in \[0, 1\), got 1.0",
        ),
        (
            targets.smooth,
            (torch.ones(2, 2), None),
            TypeError,
            r"`epsilon` must be a number, got NoneType",
        ),
    ],
)
def test_normalize_smooth_bad_input(fn, args, error, match):
    with pytest.raises(error, match=match):
        fn(*args)


# ---------------------------------------------------------------- similarity_softmax


def test_similarity_softmax_against_loops():
    a = torch.rand(5, 4).round()
    a[2] = 0  # no labels: a zero row
    b = torch.rand(6, 4)
    got = targets.similarity_softmax(a, b, temperature=0.3)
    for i in range(5):
        if a[i].sum() == 0:
            assert bool((got[i] == 0).all())
            continue
        sims = torch.stack(
            [torch.nn.functional.cosine_similarity(a[i], b[k], dim=0) for k in range(6)]
        )
        torch.testing.assert_close(got[i], torch.softmax(sims / 0.3, 0))


def test_similarity_softmax_temperature_limits():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    sharp = targets.similarity_softmax(a, temperature=1e-3)
    torch.testing.assert_close(sharp, torch.eye(3), atol=1e-6, rtol=0)
    flat = targets.similarity_softmax(a, temperature=1e3)
    torch.testing.assert_close(flat, torch.full((3, 3), 1 / 3), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, r"`temperature` must be positive, got 0.0"),
        (dict(temperature="1"), TypeError, r"`temperature` must be a number, got str"),
        (dict(b=torch.ones(2, 5)), ValueError, r"`b` must have shape \(K, C_g=3\), got \(2, 5\)"),
    ],
)
def test_similarity_softmax_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        targets.similarity_softmax(torch.ones(2, 3), **kwargs)
