"""The ``fused`` and ``tiled`` backends against ``reference``: values and gradients.

Every case builds one :class:`~mgll._problem.Problem` (or calls :func:`mgll.mgll_loss`) and
runs it through ``reference`` and the backend under test.  The tiled backend runs with tiny
tiles so that every case crosses several row and column tiles.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgll
from mgll._cooc import CoOccurrence
from mgll._problem import LossConfig, Problem, build_problem
from mgll.backends import choose_backend, fused, logits_bytes, reference, tiled

BACKENDS = {"fused": fused, "tiled": tiled}
F32 = dict(rtol=1e-5, atol=2e-6)
HALF = dict(rtol=2e-2, atol=2e-3)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of 3 x 4 (tiled) and chunks of a few rows (fused): many blocks on small inputs."""
    monkeypatch.setattr(tiled, "TILE_ROWS", 3)
    monkeypatch.setattr(tiled, "TILE_COLS", 4)
    monkeypatch.setattr(fused, "CHUNK", 40)


# ---------------------------------------------------------------------------- builders


def _cooc(mode: str, n: int, ks: list[int], gen: torch.Generator) -> list[CoOccurrence]:
    out = []
    for g, k in enumerate(ks):
        if mode == "ids":
            out.append(CoOccurrence("ids", torch.randint(0, 2 + 2 * g, (n,), generator=gen)))
        elif mode == "multi_hot":
            hot = (torch.rand(n, 3 + g, generator=gen) < 0.35).float()
            hot[0] = 0  # a sample without labels: an empty row and column
            out.append(CoOccurrence("multi_hot", hot))
        else:
            c = (
                (torch.rand(n, k, generator=gen) < 0.4).float()
                * torch.rand(n, k, generator=gen)
                * 2
            )
            c[0] = 0  # an image with no positive
            c[:, -1] = 0  # a text with no positive
            out.append(CoOccurrence("dense", c))
    return out


def _inputs(n, ks, d=6, dtype=torch.float32, bias=True, seed=0, scale=8.0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    texts = [torch.randn(k, d, generator=gen).to(dtype).requires_grad_() for k in ks]
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    b = torch.tensor(-1.5, dtype=dtype, requires_grad=True) if bias else None
    return image, texts, s, b, gen


def _leaves(image, texts, s, b):
    return [image, *texts, s] + ([b] if b is not None else [])


def _run(backend, problem_fn, config, leaves, weights=(1.0, 1.0, 1.0)):
    """Weighted terms and the gradients of their weighted sum w.r.t. every input."""
    terms = backend.compute(problem_fn(), config)
    total = sum(w * t for w, t in zip(weights, terms, strict=True))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return torch.stack([t.detach() for t in terms]), grads


def _compare(name, problem_fn, config, leaves, tol=F32, weights=(1.0, 1.0, 1.0)):
    ref_terms, ref_grads = _run(reference, problem_fn, config, leaves, weights)
    terms, grads = _run(BACKENDS[name], problem_fn, config, leaves, weights)
    torch.testing.assert_close(terms, ref_terms, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **tol)


def _case(mode, g, backend, config, n=11, bias=True, seed=0, weights=(1.0, 1.0, 1.0)):
    ks = [n] * g if mode != "bank" else [5, 9, 3][:g]  # bank: uneven K_g
    image, texts, s, b, gen = _inputs(n, ks, bias=bias, seed=seed)
    cooc = _cooc(mode, n, ks, gen)

    def problem():
        return build_problem(image, texts, s, b, cooc, config, normalize=True)

    _compare(backend, problem, config, _leaves(image, texts, s, b), weights=weights)


# ------------------------------------------------------------------------- equal to reference


@pytest.mark.parametrize("support", ["samples", "coarse"])
@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("mode", ["ids", "multi_hot", "bank"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_equals_reference(backend, mode, g, support):
    _case(mode, g, backend, LossConfig(smooth_kl_support=support))


@pytest.mark.parametrize("norm", ["pairs", "images"])
@pytest.mark.parametrize("target", ["binary", "soft", "graded"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_pointwise_options_and_bias(backend, bias, target, norm):
    config = LossConfig(
        pointwise_target=target, pointwise_norm=norm, granularity_weights=(1.0, 0.3)
    )
    _case("multi_hot", 2, backend, config, bias=bias)


@pytest.mark.parametrize(
    "weights",
    [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 0.0, 2.0), (0.5, 0.0, 0.0)],
    ids=["no-clip", "no-pointwise", "no-kl", "kl-only", "clip-only"],
)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_zero_term_weights(backend, weights):
    config = LossConfig(*weights)
    _case("ids", 2, backend, config)


@pytest.mark.parametrize("mode", ["ids", "bank"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_terms_with_different_output_gradients(backend, mode):
    """Backward through a weighted sum of the terms (not their plain sum) is exact too."""
    _case(mode, 3, backend, LossConfig(smooth_kl_support="coarse"), weights=(0.3, 2.0, -1.0))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_no_positives_anywhere(backend):
    n = 7
    image, texts, s, b, _ = _inputs(n, [n, 4])
    cooc = [CoOccurrence("multi_hot", torch.zeros(n, 3)), CoOccurrence("dense", torch.zeros(n, 4))]
    config = LossConfig()

    def problem():
        return build_problem(image, texts, s, b, cooc, config, normalize=True)

    _compare(backend, problem, config, _leaves(image, texts, s, b))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_extreme_logits_stay_finite(backend):
    """Scale 100 with identical embeddings: probabilities underflow, nothing is NaN."""
    n = 9
    image, texts, s, b, gen = _inputs(n, [n, n], scale=100.0)
    with torch.no_grad():
        image[1:4] = image[0]
        texts[0][:3] = image[0]
    cooc = _cooc("ids", n, [n, n], gen)
    for support in ("samples", "coarse"):
        config = LossConfig(smooth_kl_support=support)

        def problem(config=config):
            return build_problem(image, texts, s, b, cooc, config, normalize=True)

        _compare(
            backend, problem, config, _leaves(image, texts, s, b), tol=dict(rtol=1e-4, atol=1e-5)
        )


# ------------------------------------------------------------------ partial rows and columns


def _partial(mode, rows, cols):
    n, g = 10, 2
    ks = [n, n] if mode != "bank" else [6, 3]
    image, texts, s, b, gen = _inputs(n, ks, seed=3)
    cooc = _cooc(mode, n, ks, gen)
    config = LossConfig(smooth_kl_support="coarse" if mode == "bank" else "samples")
    full = build_problem(image, texts, s, b, cooc, config, normalize=True)
    col_slices = [cols(k) for k in ks][:g]

    def problem():
        p = build_problem(image, texts, s, b, cooc, config, normalize=True)
        return Problem(p.image, p.texts, p.scale, p.bias, p.cooc, p.kl_maps, rows, col_slices)

    assert not Problem(
        full.image, full.texts, full.scale, full.bias, full.cooc, full.kl_maps, rows, col_slices
    ).is_full
    return problem, config, _leaves(image, texts, s, b)


@pytest.mark.parametrize(
    "rows, cols",
    [
        (slice(2, 7), lambda k: slice(1, k - 1)),
        (slice(0, 4), lambda k: slice(None)),
        (slice(None), lambda k: slice(k // 2, None)),
        (slice(5, 5), lambda k: slice(0, 2)),  # no rows at all
        (slice(1, 9, 3), lambda k: slice(0, k, 2)),  # strided
    ],
    ids=["middle", "rows-only", "cols-only", "empty-rows", "strided"],
)
@pytest.mark.parametrize("mode", ["ids", "multi_hot", "bank"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_partial_rows_and_columns(backend, mode, rows, cols):
    problem, config, leaves = _partial(mode, rows, cols)
    _compare(backend, problem, config, leaves)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_disjoint_parts_add_up_to_the_whole(backend):
    """Two processes owning disjoint rows and columns sum to the full loss (local loss)."""
    n = 10
    image, texts, s, b, gen = _inputs(n, [n, n], seed=5)
    cooc = _cooc("ids", n, [n, n], gen)
    config = LossConfig()
    p = build_problem(image, texts, s, b, cooc, config, normalize=True)
    whole = torch.stack(list(BACKENDS[backend].compute(p, config)))
    parts = sum(
        torch.stack(
            list(
                BACKENDS[backend].compute(
                    Problem(p.image, p.texts, p.scale, p.bias, p.cooc, p.kl_maps, sl, [sl, sl]),
                    config,
                )
            )
        )
        for sl in (slice(0, 4), slice(4, None))
    )
    torch.testing.assert_close(parts, whole, **F32)


# ---------------------------------------------------------------- public API, dtypes, autocast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_half_inputs(backend, dtype):
    n = 12
    image, texts, s, _, gen = _inputs(n, [n, n], d=16, dtype=dtype)
    labels = [torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen)]
    results = {}
    for name in ("reference", backend):
        loss = mgll.mgll_loss(image, texts, s, labels=labels, backend=name)
        assert loss.dtype == dtype
        results[name] = (loss, torch.autograd.grad(loss, [image, *texts, s]))
    torch.testing.assert_close(results[backend][0].float(), results["reference"][0].float(), **HALF)
    for got, want in zip(results[backend][1], results["reference"][1], strict=True):
        torch.testing.assert_close(got.float(), want.float(), **HALF)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_autocast_and_module(backend):
    n = 10
    image, texts, s, b, gen = _inputs(n, [4, 7], d=16)
    targets = [c.data for c in _cooc("bank", n, [4, 7], gen)]
    loss_fn = mgll.MGLLLoss(backend=backend)
    eager = mgll.MGLLLoss(backend="reference")(image, texts, s, b, targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = loss_fn(image, texts, s, b, targets=targets)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, eager, **F32)
    torch.testing.assert_close(
        torch.autograd.grad(cast, image), torch.autograd.grad(eager, image), **F32
    )


def _has_compiler() -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
        return "no C/C++ compiler on PATH for the inductor CPU backend"
    return None


@pytest.mark.skipif(_has_compiler() is not None, reason=str(_has_compiler()))
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_torch_compile_equals_eager_fused():
    n = 8
    image, texts, s, _, gen = _inputs(n, [n, n], d=16)
    labels = [torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen)]
    loss_fn = mgll.MGLLLoss(backend="fused")
    eager = loss_fn(image, texts, s, labels=labels)
    compiled = torch.compile(loss_fn)(image, texts, s, labels=labels)
    torch.testing.assert_close(compiled, eager, **F32)
    torch.testing.assert_close(
        torch.autograd.grad(compiled, [image, *texts, s]),
        torch.autograd.grad(eager, [image, *texts, s]),
        **F32,
    )


# -------------------------------------------------------------------------- random shapes


@given(
    n=st.integers(1, 13),
    g=st.integers(1, 3),
    mode=st.sampled_from(["ids", "multi_hot", "bank"]),
    support=st.sampled_from(["samples", "coarse"]),
    ks=st.lists(st.integers(1, 9), min_size=3, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, g, mode, support, ks, bias, seed):
    ks = [n] * g if mode != "bank" else ks[:g]
    image, texts, s, b, gen = _inputs(n, ks, d=4, bias=bias, seed=seed)
    cooc = _cooc(mode, n, ks, gen)
    config = LossConfig(smooth_kl_support=support)

    def problem():
        return build_problem(image, texts, s, b, cooc, config, normalize=True)

    for backend in BACKENDS:
        _compare(backend, problem, config, _leaves(image, texts, s, b))


# --------------------------------------------------------------------------- auto, budget


def test_auto_picks_fused_then_tiled_beyond_the_budget():
    n = 64
    image, texts, s, b, gen = _inputs(n, [n, n])
    p = build_problem(image, texts, s, b, _cooc("ids", n, [n, n], gen), LossConfig(), True)
    assert logits_bytes(p) == 2 * 4 * 2 * n * n
    assert choose_backend(p) == "fused"  # CPU: no triton
    try:
        mgll.set_memory_budget(logits_bytes(p) - 1)
        assert choose_backend(p) == "tiled"
        mgll.set_memory_budget(logits_bytes(p))
        assert choose_backend(p) == "fused"
    finally:
        mgll.set_memory_budget(None)
    assert mgll.get_memory_budget() == mgll.backends.DEFAULT_MEMORY_BUDGET


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, "positive, got 0"),
        (1.5, TypeError, "integer number of bytes or None, got float"),
        (True, TypeError, "got bool"),
    ],
)
def test_memory_budget_rejects_bad_values(value, error, match):
    with pytest.raises(error, match=match):
        mgll.set_memory_budget(value)


# ------------------------------------------------------------------ the benchmark's baseline


def test_naive_benchmark_baseline_equals_reference():
    """``benchmarks/naive.py`` (the authors'-style composition) computes the same loss."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "naive.py"
    spec = importlib.util.spec_from_file_location("bench_naive", path)
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    n = 12
    image, texts, s, _, gen = _inputs(n, [n, n], d=8)
    labels = [torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen)]
    ours = mgll.mgll_loss(
        image, texts, s, labels=labels, smooth_kl_support="samples", backend="reference"
    )
    theirs = naive.naive_mgll_loss(image, texts, s, labels)  # the paper's sample-level KL
    torch.testing.assert_close(theirs, ours, **F32)
    leaves = [image, *texts, s]
    torch.testing.assert_close(
        torch.autograd.grad(theirs, leaves), torch.autograd.grad(ours, leaves), **F32
    )


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("n, classes", [(1, 3), (17, 2), (40, 6)])
def test_multi_hot_line_sums_equal_the_dense_sums(n, classes, dtype):
    """``line_sums`` counts distinct label sets once; it must equal the dense row/column sums."""
    hot = (torch.rand(n, classes) < 0.3).to(dtype)
    cooc = CoOccurrence("multi_hot", hot)
    dense = cooc.dense(torch.float64)
    torch.testing.assert_close(cooc.line_sums(1, torch.float64), dense.sum(1), rtol=0, atol=0)
    torch.testing.assert_close(cooc.line_sums(0, torch.float64), dense.sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backward_twice_with_retain_graph(backend):
    n = 6
    image, texts, s, b, gen = _inputs(n, [n, n])
    labels = [torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen)]
    loss = mgll.mgll_loss(image, texts, s, b, labels=labels, backend=backend)
    first = torch.autograd.grad(loss, [image, s], retain_graph=True)
    second = torch.autograd.grad(loss, [image, s])
    torch.testing.assert_close(second, first, rtol=0, atol=0)
