"""Per-granularity term weights: ``soft_clip_weight`` and ``pointwise_weight`` as one per g.

The loss with weights alpha_{1,g}, alpha_{2,g} is sum_g (alpha_{1,g} lambda_g L^g_sCLIP +
alpha_{2,g} lambda_g L^g_P) + alpha_3 L_sKL (docs/concepts.rst).  Every backend against that
sum composed from the naive float64 terms (values and gradients), paired and bank, with and
without unknown labels; one float equal to it repeated; a 0 that removes exactly one
granularity's term; bad values that raise naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch

import mgll
import naive
from backends_under_test import CPU_BACKENDS

F64 = torch.float64
NAN = math.nan


# every backend crosses several blocks on small inputs (the fixture is in conftest.py)
pytestmark = pytest.mark.usefixtures("small_tiles")


def _features(n, ks, d=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
    texts = [torch.randn(k, d, generator=gen, dtype=dtype).requires_grad_() for k in ks]
    scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=dtype, requires_grad=True)
    return image, texts, scale, bias


def _case(kind: str, g_count: int, n: int = 7, unknown: bool = False, seed: int = 1):
    """``(call, naive)`` supervision: paired multi-hot labels or bank targets, NaN if unknown."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "paired":
        values = []
        for c in (4, 3, 2)[:g_count]:
            x = (torch.rand(n, c, generator=gen) < 0.45).to(F64)
            if unknown:
                x[torch.rand(n, c, generator=gen) < 0.25] = NAN
                x[int(torch.randint(0, n, (1,), generator=gen))] = NAN  # a whole row
            values.append(x)
        return {"labels": values}, {"labels": values, "rules": ["jaccard"] * g_count}
    values = []
    for k in (5, 4, 6)[:g_count]:
        c = (torch.rand(n, k, generator=gen) < 0.5).to(F64) * torch.rand(n, k, generator=gen)
        c = c.to(F64)
        if unknown:
            c[torch.rand(n, k, generator=gen) < 0.25] = NAN
            c[1] = NAN
        values.append(c)
    return {"targets": values}, {"targets": values}


def _naive(image, texts, scale, bias, sup, a1, a2, a3=1.0, lam=None):
    """sum_g a1[g] lam_g sCLIP^g + a2[g] lam_g P^g + a3 sKL, from the naive terms."""
    lam = lam or [1.0] * len(texts)
    common = dict(support="samples", **sup)
    ce = naive.partial_mgll(
        image, texts, scale, bias, weights=(1.0, 0.0, 0.0),
        lam=[a * w for a, w in zip(a1, lam, strict=True)], **common,
    )  # fmt: skip
    pw = naive.partial_mgll(
        image, texts, scale, bias, weights=(0.0, 1.0, 0.0),
        lam=[a * w for a, w in zip(a2, lam, strict=True)], **common,
    )  # fmt: skip
    kl = naive.partial_mgll(image, texts, scale, bias, weights=(0.0, 0.0, a3), **common)
    return ce + pw + kl


def _check(got, want, leaves, exact):
    tol = dict(rtol=1e-9, atol=1e-10) if exact else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.double(), want.double(), **tol)
    g_got = torch.autograd.grad(got, leaves, allow_unused=True)
    g_want = torch.autograd.grad(want, leaves, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a.double(), b.double(), **tol)


WEIGHTS = {
    "coarse-pw-off": ((1.0, 1.0), (1.0, 0.0)),
    "mixed": ((0.3, 2.0), (0.5, 1.5)),
    "clip-off-at-0": ((0.0, 1.0), (2.0, 0.25)),
}


@pytest.mark.parametrize("unknown", [False, True], ids=["annotated", "nan"])
@pytest.mark.parametrize("kind", ["paired", "bank"])
@pytest.mark.parametrize("weights", list(WEIGHTS), ids=str)
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "auto"])
def test_per_granularity_weights_equal_the_naive_sum(backend, weights, kind, unknown):
    a1, a2 = WEIGHTS[weights]
    n = 7
    call, sup = _case(kind, 2, n, unknown)
    image, texts, scale, bias = _features(n, [n, n] if kind == "paired" else [5, 4])
    lam = [1.0, 0.5]
    loss_fn = mgll.MGLLLoss(
        backend=backend, soft_clip_weight=a1, pointwise_weight=a2, smooth_kl_weight=0.7,
        smooth_kl_support="samples", overlap="jaccard", granularity_weights=lam,
    )  # fmt: skip
    got = loss_fn(image, texts, scale, bias, **call)
    want = _naive(image, texts, scale, bias, sup, a1, a2, 0.7, lam)
    _check(got, want, [image, *texts, scale, bias], exact=backend != "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_three_granularities(backend):
    n = 6
    call, sup = _case("paired", 3, n, unknown=True, seed=4)
    image, texts, scale, bias = _features(n, [n] * 3, seed=2)
    a1, a2 = (1.0, 0.0, 0.5), (0.2, 1.0, 0.0)
    got = mgll.mgll_loss(
        image, texts, scale, bias, backend=backend, soft_clip_weight=a1, pointwise_weight=a2,
        smooth_kl_support="samples", overlap="jaccard", **call,
    )  # fmt: skip
    want = _naive(image, texts, scale, bias, sup, a1, a2)
    _check(got, want, [image, *texts, scale, bias], exact=backend != "triton")


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("kind", ["paired", "bank"])
def test_compiled_operator_takes_per_granularity_weights(kind):
    """Under torch.compile the fused loss is one registered op; it gets the weights per g."""
    torch._dynamo.reset()
    n = 6
    call, sup = _case(kind, 2, n, unknown=True, seed=5)
    image, texts, scale, bias = _features(n, [n, n] if kind == "paired" else [5, 4], seed=3)
    a1, a2 = (0.5, 1.0), (1.0, 0.0)
    compiled = torch.compile(mgll.mgll_loss, backend="eager", fullgraph=True)
    got = compiled(
        image, texts, scale, bias, backend="fused", soft_clip_weight=a1, pointwise_weight=a2,
        smooth_kl_support="samples", overlap="jaccard", **call,
    )  # fmt: skip
    want = _naive(image, texts, scale, bias, sup, a1, a2)
    _check(got, want, [image, *texts, scale, bias], exact=True)


def test_one_float_is_that_float_repeated_bit_for_bit_on_reference():
    n = 7
    call, _ = _case("paired", 2, n, unknown=True)
    leaves = _features(n, [n, n])
    one = mgll.MGLLLoss(backend="reference", soft_clip_weight=0.7, pointwise_weight=1.3)
    repeated = mgll.MGLLLoss(
        backend="reference", soft_clip_weight=(0.7, 0.7), pointwise_weight=[1.3, 1.3]
    )
    a = one(*leaves, **call, output_dict=True)
    b = repeated(*leaves, **call, output_dict=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(
        torch.autograd.grad(sum(a.values()), leaves[0]),
        torch.autograd.grad(sum(b.values()), leaves[0]),
        strict=True,
    ):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_zero_weight_removes_exactly_that_granularitys_term(backend):
    n = 7
    call, _ = _case("paired", 2, n, unknown=True, seed=2)
    leaves = _features(n, [n, n])
    full = mgll.MGLLLoss(backend=backend)(*leaves, **call, output_dict=True)
    dropped = mgll.MGLLLoss(backend=backend, pointwise_weight=(1.0, 0.0))(
        *leaves, **call, output_dict=True
    )
    # only granularity 0 (its own labels and texts) in the pointwise term
    fine = mgll.MGLLLoss(backend=backend, soft_clip_weight=0.0, smooth_kl_weight=0.0)(
        leaves[0], leaves[1][:1], leaves[2], leaves[3], labels=call["labels"][:1],
        output_dict=True,
    )  # fmt: skip
    torch.testing.assert_close(dropped["soft_clip_loss"], full["soft_clip_loss"], rtol=0, atol=0)
    torch.testing.assert_close(dropped["smooth_kl_loss"], full["smooth_kl_loss"], rtol=0, atol=0)
    torch.testing.assert_close(dropped["pointwise_loss"], fine["pointwise_loss"])
    assert fine["pointwise_loss"] < full["pointwise_loss"]


def test_zero_everywhere_turns_the_term_off():
    n = 5
    call, _ = _case("paired", 2, n)
    leaves = _features(n, [n, n])
    out = mgll.mgll_loss(*leaves, **call, pointwise_weight=(0.0, 0.0), output_dict=True)
    assert out["pointwise_loss"] == 0 and out["soft_clip_loss"] > 0


def test_the_option_keeps_a_tuple_and_a_float():
    assert mgll.MGLLLoss(pointwise_weight=[1, 0]).config.pointwise_weight == (1.0, 0.0)
    assert mgll.MGLLLoss(pointwise_weight=torch.tensor([1.0, 0.5])).config.pointwise_weight == (
        1.0,
        0.5,
    )
    assert mgll.MGLLLoss(soft_clip_weight=2).config.soft_clip_weight == 2.0


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"pointwise_weight": (1.0, -0.5)}, ValueError,
         r"`pointwise_weight\[1\]` must be finite and non-negative, got -0.5"),
        ({"soft_clip_weight": (1.0, math.inf)}, ValueError,
         r"`soft_clip_weight\[1\]` must be finite and non-negative, got inf"),
        ({"soft_clip_weight": (math.nan,)}, ValueError,
         r"`soft_clip_weight\[0\]` must be finite and non-negative, got nan"),
        ({"pointwise_weight": (1.0, "0")}, TypeError,
         r"`pointwise_weight\[1\]` must be a real number, got str"),
        ({"pointwise_weight": ()}, ValueError,
         r"`pointwise_weight` must be one number or one number per granularity"),
        ({"soft_clip_weight": "1"}, TypeError,
         r"`soft_clip_weight` must be a real number or a sequence of one per granularity"),
        ({"pointwise_weight": None}, TypeError, r"`pointwise_weight` must be a real number"),
    ],
)  # fmt: skip
def test_bad_weights_raise_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        mgll.MGLLLoss(**options)
    with pytest.raises(error, match=match):
        mgll.mgll_loss(torch.randn(2, 3), [torch.randn(2, 3)], torch.tensor(1.0), **options)


@pytest.mark.parametrize("backend", ["reference", "fused", "auto"])
@pytest.mark.parametrize("name", ["soft_clip_weight", "pointwise_weight"])
def test_wrong_length_raises_at_the_call(name, backend):
    n = 4
    call, _ = _case("paired", 2, n)
    leaves = _features(n, [n, n])
    loss_fn = mgll.MGLLLoss(backend=backend, **{name: (1.0, 0.5, 0.0)})
    match = rf"`{name}` must have one weight per granularity: G=2 from `text_features`, got 3"
    with pytest.raises(ValueError, match=match):
        loss_fn(*leaves, **call)
