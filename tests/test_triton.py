"""The ``triton`` backend against ``reference``: values and gradients.

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``), which is slow: shapes stay small, with tiles of 16 so every case still
crosses several row, column and D tiles (partial last tiles included).  On CUDA the same cases
run compiled, plus the half-precision cases marked ``cuda``.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason='backend="triton" needs triton: pip install "triton>=3.0"')

import triton
import triton.language as tl

import naive
from mgll._problem import LossConfig, build_problem, cooccurrence_from_labels
from mgll.backends import reference, triton_kernels
from mgll.functional import mgll_loss
from mgll.targets.cooc import CoOccurrence

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


@triton.jit
def _probe(out, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for _ in range(0, n, BLOCK):
        acc += 1.0
    tl.store(out + tl.arange(0, BLOCK), acc)


def _interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter fails on loops with runtime bounds (under numpy 2); 3.8 runs."""
    out = torch.zeros(16)
    try:
        _probe[(1,)](out, 20, BLOCK=16)
    except Exception:
        return False
    return bool(out[0] == 2)


if not CUDA and not _interpreter_runs_loops():
    pytest.skip(
        f"the Triton {triton.__version__} interpreter cannot run loops with runtime bounds here; "
        "use triton>=3.8 for the CPU tests",
        allow_module_level=True,
    )

F32 = dict(rtol=1e-5, atol=2e-6)
HALF = dict(rtol=2e-2, atol=2e-3)
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 tensor-core path)")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """16 x 16 tiles and D chunks of 16 in the interpreter: several tiles on small inputs."""
    monkeypatch.setitem(triton_kernels.INTERPRETER_BLOCKS, "BLOCK_M", 16)
    monkeypatch.setitem(triton_kernels.INTERPRETER_BLOCKS, "BLOCK_N", 16)
    monkeypatch.setitem(triton_kernels.INTERPRETER_BLOCKS, "BLOCK_D", 16)


# ---------------------------------------------------------------------------- builders


def _cooc(mode: str, n: int, ks: list[int], gen: torch.Generator) -> list[CoOccurrence]:
    out = []
    for g, k in enumerate(ks):
        if mode == "ids":
            out.append(CoOccurrence("ids", torch.randint(0, 2 + 2 * g, (n,), generator=gen)))
        elif mode == "multi_hot":
            hot = torch.rand(n, 3 + 9 * g, generator=gen) < 0.3  # g = 2: 21 classes, 2 chunks
            hot[0] = False  # a sample without labels: an empty row and column
            out.append(CoOccurrence("multi_hot", hot))
        elif mode == "mixed":  # paired, ids at one granularity and label sets at the other
            kind = "ids" if g % 2 == 0 else "multi_hot"
            data = torch.randint(0, 3, (n,), generator=gen)
            out.append(CoOccurrence(kind, data if kind == "ids" else torch.rand(n, 4) < 0.4))
        else:
            c = (torch.rand(n, k, generator=gen) < 0.4).float() * torch.rand(n, k, generator=gen)
            c[0] = 0  # an image with no positive
            c[:, -1] = 0  # a text with no positive
            out.append(CoOccurrence("dense", c * 2))
    return [CoOccurrence(c.kind, c.data.to(DEVICE)) for c in out]


def _case(mode="ids", n=24, ks=None, g=2, d=20, scale=8.0, bias=True, seed=0, dtype=None):
    ks = list(ks) if ks is not None else [n] * g
    if mode != "bank":
        ks = [n] * len(ks)
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    image = torch.randn(n, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    texts = [torch.randn(k, d, generator=gen).to(DEVICE, dtype).requires_grad_() for k in ks]
    s = torch.tensor(scale, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.tensor(-1.5, device=DEVICE, dtype=dtype, requires_grad=True) if bias else None
    return image, texts, s, b, _cooc(mode, n, ks, gen)


def _compare(case, config=None, rows=None, cols=None, tol=F32, operand_dtype=None):
    """Weighted terms and all gradients of ``triton`` equal ``reference`` on one Problem."""
    image, texts, s, b, cooc = case
    config = config or LossConfig()
    leaves = [image, *texts, s] + ([b] if b is not None else [])
    results = []
    for backend in (reference, triton_kernels):
        problem = build_problem(image, texts, s, b, cooc, config, normalize=True)
        if rows is not None:
            problem.rows = rows
        if cols is not None:
            problem.cols = cols
        if backend is triton_kernels and operand_dtype is not None:
            problem.image = problem.image.to(operand_dtype)
            problem.texts = [t.to(operand_dtype) for t in problem.texts]
        terms = torch.stack([t.float() for t in backend.compute(problem, config)])
        grads = torch.autograd.grad(terms.sum(), leaves, allow_unused=True)
        results.append((terms.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, **tol)
    for i, (x, y) in enumerate(zip(got_grads, want_grads, strict=True)):
        if y is None:
            assert x is None or not x.abs().any(), f"leaf {i}: unexpected gradient"
        elif operand_dtype is not None:  # rounded features: compare whole gradients
            err = (x.float() - y.float()).norm() / y.float().norm()
            assert err < tol["rtol"], f"gradient of leaf {i}: relative error {err:.2e}"
        else:
            assert x is not None, f"leaf {i}: missing gradient"
            torch.testing.assert_close(x.float(), y.float(), **tol, msg=f"gradient of leaf {i}")
    return got


# ---------------------------------------------------------------------------- equality


@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("mode", ["ids", "multi_hot", "bank"])
def test_matches_reference(mode, g):
    _compare(_case(mode, ks=[24, 17, 9][:g], g=g))


def test_mixed_ids_and_label_sets():
    _compare(_case("mixed", g=2))


@pytest.mark.parametrize("target,norm,bias", [("soft", "pairs", True), ("binary", "images", False)])
def test_pointwise_options(target, norm, bias):
    config = LossConfig(pointwise_target=target, pointwise_norm=norm)
    _compare(_case("multi_hot", n=16, d=12, bias=bias), config)


def test_graded_pointwise_target_on_bank_weights():
    """``pointwise_target="graded"``: Y = min(C, 1) on weights in [0, 2]."""
    _compare(_case("bank", ks=[24, 17], bias=True), LossConfig(pointwise_target="graded"))


@pytest.mark.parametrize("soft", [False, True], ids=["sets", "probabilities"])
@pytest.mark.parametrize("rule", ["any", "count", "jaccard"])
def test_overlap_rules_over_several_class_chunks(rule, soft):
    """Every overlap rule over 21 and 30 classes (two BLOCK_C chunks), 0/1 sets and
    probabilities, with the graded pointwise target."""
    image, texts, s, b, _ = _case("multi_hot", n=20, g=2)
    gen = torch.Generator().manual_seed(3)
    cooc = []
    for classes in (21, 30):
        hot = torch.rand(20, classes, generator=gen) < 0.2
        hot[0] = False
        data = hot * torch.rand(20, classes, generator=gen) if soft else hot
        cooc.append(CoOccurrence("multi_hot", data.to(DEVICE), rule))
    _compare((image, texts, s, b, cooc), LossConfig(pointwise_target="graded"))


@pytest.mark.parametrize("mode,g", [("ids", 2), ("multi_hot", 3), ("bank", 2)])
def test_coarse_support(mode, g):
    config = LossConfig(smooth_kl_support="coarse")
    _compare(_case(mode, ks=[24, 17, 11][:g], g=g), config)


def test_coarse_reference_override():
    config = LossConfig(smooth_kl_support="coarse", smooth_kl_reference=2)
    _compare(_case("ids", n=16, g=3, d=12), config)


@pytest.mark.parametrize(
    "weights,lam",
    [((1.0, 0.0, 0.0), None), ((0.0, 0.0, 2.0), None), ((0.5, 2.0, 1.5), (1.0, 0.0, 3.0))],
)
def test_term_and_granularity_weights(weights, lam):
    config = LossConfig(*weights, granularity_weights=lam)
    _compare(_case("ids", n=16, g=3, d=12, bias=False), config)


@pytest.mark.parametrize(
    "mode,rows,cols",
    [
        ("ids", slice(5, 22), [slice(0, 13), slice(19, 36)]),
        ("multi_hot", slice(0, 16), [slice(16, 36), slice(16, 36)]),
        ("bank", slice(20, 24), [slice(3, 17), slice(0, 0)]),
        ("ids", slice(5, 5), [slice(0, 36), slice(7, 9)]),
    ],
)
def test_partial_rows_and_columns(mode, rows, cols):
    """Distributed local loss: only some rows / columns, global normalisers."""
    _compare(_case(mode, n=36, ks=[36, 17], g=2, d=12), rows=rows, cols=cols)


def test_granularity_without_any_positive():
    image, texts, s, b, cooc = _case("bank", n=16, ks=[16, 12], g=2, d=12)
    cooc[1] = CoOccurrence("dense", torch.zeros_like(cooc[1].data))
    _compare((image, texts, s, b, cooc))


@pytest.mark.parametrize("mode", ["ids", "bank"])
def test_extreme_scale_is_finite(mode):
    got = _compare(
        _case(mode, n=16, ks=[16, 10], d=12, scale=100.0), tol=dict(rtol=2e-5, atol=2e-5)
    )
    assert torch.isfinite(got).all()


def test_identical_embeddings_are_finite():
    image, texts, s, b, cooc = _case("ids", n=16, g=3, d=12, scale=100.0)
    with torch.no_grad():
        image.copy_(image[:1].expand_as(image))
        for t in texts:
            t.copy_(image)
    _compare((image, texts, s, b, cooc), tol=dict(rtol=2e-5, atol=2e-5))


def test_public_api_and_module_agree():
    image, texts, s, b, cooc = _case("ids", n=16, g=2, d=12)
    labels = [c.data for c in cooc]
    got = mgll_loss(image, texts, s, b, labels=labels, backend="triton")
    want = mgll_loss(image, texts, s, b, labels=labels, backend="reference")
    torch.testing.assert_close(got, want, **F32)


@settings(max_examples=25 if CUDA else 6)  # few in the (slow) interpreter
@given(
    mode=st.sampled_from(["ids", "multi_hot", "bank"]),
    n=st.integers(1, 34),
    ks=st.lists(st.integers(1, 34), min_size=1, max_size=3),
    d=st.integers(1, 20),
    support=st.sampled_from(["samples", "coarse"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(mode, n, ks, d, support, seed):
    config = LossConfig(smooth_kl_support=support)
    _compare(_case(mode, n=n, ks=ks, d=d, seed=seed), config)


# ---------------------------------------------------------------------------- unknown labels
# NaN labels (per image and class), whole NaN rows, the id -1 and NaN bank targets are unknown
# (docs/partial_annotation.rst): the kernels leave those pairs out, tile by tile.

NAN = math.nan


def _partial_labels(n, classes, gen, soft=False, whole_rows=2):
    """0/1 labels (or probabilities) with NaN classes and ``whole_rows`` rows NaN everywhere."""
    x = (torch.rand(n, classes, generator=gen) < 0.4).float()
    if soft:
        x = x * torch.tensor([0.5, 1.0, 0.25])[torch.randint(0, 3, (n, classes), generator=gen)]
    x[torch.rand(n, classes, generator=gen) < 0.25] = NAN
    x[torch.randperm(n, generator=gen)[:whole_rows]] = NAN
    return x


def _partial_ids(n, gen, classes=3, missing=3):
    ids = torch.randint(0, classes, (n,), generator=gen)
    ids[torch.randperm(n, generator=gen)[:missing]] = -1
    return ids


def _partial_case(mode="multi_hot", n=20, g=2, d=12, seed=0, rules=("any", "count", "jaccard")):
    """A feature case with unknown labels at every granularity (bank: NaN targets)."""
    image, texts, s, b, _ = _case("bank" if mode == "bank" else "ids", n=n, ks=[n, 13, 9][:g], g=g,
                                  d=d, seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(100 + seed)
    cooc = []
    for i, t in enumerate(texts):
        if mode == "ids" or (mode == "mixed" and i % 2 == 0):
            cooc.append(cooccurrence_from_labels(_partial_ids(n, gen)))
        elif mode in ("multi_hot", "soft", "mixed"):
            labels = _partial_labels(n, 3 + 9 * i, gen, soft=mode == "soft")  # up to 2 chunks
            cooc.append(cooccurrence_from_labels(labels, rules[i % len(rules)], check=True))
        else:
            k = t.shape[0]
            c = (torch.rand(n, k, generator=gen) < 0.4).float() * torch.rand(n, k, generator=gen)
            c[torch.rand(n, k, generator=gen) < 0.25] = NAN
            c[1] = NAN  # an image unannotated at this granularity
            cooc.append(CoOccurrence("dense", c, partial=True))
    cooc = [CoOccurrence(c.kind, c.data.to(DEVICE), c.rule, c.zero_one, c.partial) for c in cooc]
    assert all(c.partial for c in cooc)
    return image, texts, s, b, cooc


@pytest.mark.parametrize("support", ["samples", "coarse"])
@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("mode", ["ids", "multi_hot", "soft", "mixed", "bank"])
def test_unknown_labels_match_reference(mode, g, support):
    _compare(_partial_case(mode, g=g), LossConfig(smooth_kl_support=support))


@pytest.mark.parametrize("option", ["soft", "graded", "images"])
@pytest.mark.parametrize("mode", ["soft", "bank"])
def test_unknown_labels_pointwise_options(mode, option):
    config = (
        LossConfig(pointwise_norm="images")
        if option == "images"
        else LossConfig(pointwise_target=option)
    )
    _compare(_partial_case(mode, g=2), config)


@pytest.mark.parametrize(
    "mode,rows,cols",
    [
        ("multi_hot", slice(5, 22), [slice(0, 13), slice(19, 30)]),
        ("ids", slice(0, 16), [slice(16, 30), slice(16, 30)]),
        ("bank", slice(20, 30), [slice(3, 13), slice(0, 0)]),
    ],
)
def test_unknown_labels_partial_rows_and_columns(mode, rows, cols):
    """Distributed local loss with unknowns: global anchor counts and known-pair norms."""
    case = _partial_case(mode, n=30, g=2)
    _compare(case, rows=rows, cols=cols)


def test_unknown_labels_against_the_naive_masked_reference():
    """The public loss (float64 inputs, computed in float32) against the float64 loops."""
    n = 9
    gen = torch.Generator().manual_seed(4)
    labels = [_partial_ids(n, gen), _partial_labels(n, 4, gen), _partial_labels(n, 3, gen, True)]
    rules = ["any", "jaccard", "any"]
    image = torch.randn(n, 6, generator=gen, dtype=torch.float64).requires_grad_()
    texts = [torch.randn(n, 6, generator=gen, dtype=torch.float64).requires_grad_() for _ in labels]
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    leaves = [image, *texts, scale, bias]
    for support in ("samples", "coarse"):
        got = mgll_loss(image, texts, scale, bias, labels=labels, backend="triton", overlap=rules,
                        smooth_kl_support=support)  # fmt: skip
        want = naive.partial_mgll(image, texts, scale, bias, labels=labels, rules=rules,
                                  support=support)  # fmt: skip
        torch.testing.assert_close(got, want, **F32)
        got_g = torch.autograd.grad(got, leaves)
        want_g = torch.autograd.grad(want, leaves)
        for x, y in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(x, y, **F32)


def test_unknown_bank_targets_against_the_naive_masked_reference():
    n, ks = 8, [5, 7]
    gen = torch.Generator().manual_seed(5)
    bank = []
    for k in ks:
        c = (torch.rand(n, k, generator=gen) < 0.5).double() * torch.rand(n, k, generator=gen)
        c[torch.rand(n, k, generator=gen) < 0.25] = NAN
        c[2] = NAN
        bank.append(c)
    image = torch.randn(n, 6, generator=gen, dtype=torch.float64).requires_grad_()
    texts = [torch.randn(k, 6, generator=gen, dtype=torch.float64).requires_grad_() for k in ks]
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    leaves = [image, *texts, scale]
    got = mgll_loss(
        image, texts, scale, targets=bank, backend="triton", smooth_kl_support="samples"
    )
    want = naive.partial_mgll(image, texts, scale, targets=bank, support="samples")
    torch.testing.assert_close(got, want, **F32)
    for x, y in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True
    ):
        torch.testing.assert_close(x, y, **F32)


def test_all_unknown_granularity_is_a_differentiable_zero():
    """A granularity where every pair is unknown: zero terms, zero gradient to its texts."""
    image, texts, s, b, cooc = _partial_case("ids", n=18, g=2)
    unknown = torch.full((18, 5), NAN, device=DEVICE)
    cooc[0] = cooccurrence_from_labels(unknown, "any", check=True)
    config = LossConfig()
    got = _compare((image, texts, s, b, cooc), config)
    assert torch.isfinite(got).all()
    alone = _compare((image, texts[1:], s, b, cooc[1:]), config)
    torch.testing.assert_close(got[:2], alone[:2], **F32)  # soft CLIP, pointwise
    assert got[2] == 0  # nobody is compared at two granularities
    problem = build_problem(image, texts, s, b, cooc, config, normalize=True)
    terms = triton_kernels.compute(problem, config)
    grads = torch.autograd.grad(sum(terms), [image, texts[0]])
    assert torch.isfinite(grads[0]).all() and (grads[1] == 0).all()


@pytest.mark.parametrize("term", [0, 1])
@pytest.mark.parametrize("mode", ["multi_hot", "ids"])
def test_adding_an_unannotated_image_changes_nothing(mode, term):
    """An image with no annotation at g leaves the g-terms (soft CLIP, pointwise) unchanged."""
    n = 20
    image, (text,), s, b, _ = _case("ids", n=n, g=1, d=12, seed=3)
    gen = torch.Generator().manual_seed(7)
    labels = _partial_labels(n, 4, gen) if mode == "multi_hot" else _partial_ids(n, gen)
    missing = torch.full((1, 4), NAN) if mode == "multi_hot" else torch.tensor([-1])
    extra = torch.randn(2, 12, generator=gen, device=DEVICE)
    config = LossConfig()

    def terms(image, text, labels):
        cooc = [cooccurrence_from_labels(labels.to(DEVICE), "any", check=True)]
        problem = build_problem(image, [text], s, b, cooc, config, normalize=True)
        return triton_kernels.compute(problem, config)[term]

    before = terms(image, text, labels)
    after = terms(
        torch.cat([image, extra[:1]]), torch.cat([text, extra[1:]]), torch.cat([labels, missing])
    )
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)


def test_partial_kernels_without_unknowns_equal_the_plain_ones():
    """The PARTIAL kernels on labels that hold no unknown give the plain kernels' numbers."""
    image, texts, s, b, cooc = _case("multi_hot", n=20, g=2)
    config = LossConfig(smooth_kl_support="coarse")
    flagged = [CoOccurrence(c.kind, c.data.float(), c.rule, True, True) for c in cooc]
    results = []
    for co in (cooc, flagged):
        problem = build_problem(image, texts, s, b, co, config, normalize=True)
        terms = torch.stack(list(triton_kernels.compute(problem, config)))
        results.append((terms, torch.autograd.grad(terms.sum(), [image, *texts, s, b])))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, **F32)
    for x, y in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(x, y, **F32)


# ---------------------------------------------------------------------------- errors


def test_strided_rows_are_rejected():
    image, texts, s, b, cooc = _case("ids", n=20, g=1)
    problem = build_problem(image, texts, s, b, cooc, LossConfig(), normalize=True)
    problem.rows = slice(0, 20, 2)
    with pytest.raises(ValueError, match=r"`problem.rows` to be a contiguous slice"):
        triton_kernels.compute(problem, LossConfig())


@pytest.mark.skipif(CUDA, reason="checks the CPU error; CUDA runs the kernels")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_is_interpreted", lambda kernel: False)
    image, texts, s, _, cooc = _case("ids", n=20, g=1)
    with pytest.raises(ValueError, match=r'runs on CUDA tensors, got features on cpu.*"fused"'):
        mgll_loss(image, texts, s, labels=[cooc[0].data], backend="triton")


def test_missing_triton_names_the_extra(monkeypatch):
    """Without triton the kernels cannot load; the error says how to install them."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.delitem(sys.modules, "mgll.backends._triton_fwd")
    image, texts, s, _, cooc = _case("ids", n=16, g=1, d=12)
    with pytest.raises(ImportError, match=r'the \[triton\] extra\): pip install "triton>=3\.0"'):
        mgll_loss(image, texts, s, labels=[cooc[0].data], backend="triton")


# ---------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize("mode", ["ids", "multi_hot", "bank"])
def test_bf16_inputs_match_reference(mode):
    """Half inputs through the public path (the core upcasts them to fp32 first)."""
    _compare(_case(mode, n=200, ks=[200, 70, 33], g=3, d=64, dtype=torch.bfloat16), tol=HALF)


@cuda_only
@pytest.mark.parametrize("mode", ["ids", "bank"])
def test_bf16_tensor_core_operands_match_reference(mode):
    """Features handed to the kernels in bf16 (tensor-core dots, fp32 statistics).

    The reference sees the unrounded fp32 features, so gradients are compared as a whole
    (relative norm of the difference under 2e-2).
    """
    case = _case(mode, n=256, ks=[256, 90, 40], g=3, d=96)
    _compare(case, tol=HALF, operand_dtype=torch.bfloat16)


@cuda_only
def test_fp32_larger_shapes_match_reference():
    _compare(_case("multi_hot", n=300, g=3, d=200, scale=30.0), tol=dict(rtol=1e-5, atol=1e-5))
