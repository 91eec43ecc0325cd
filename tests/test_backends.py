"""The ``fused`` and ``tiled`` backends against ``reference``: values and gradients.

Every case builds one :class:`~mgll._problem.Problem` (or calls :func:`mgll.mgll_loss`) and
runs it through ``reference`` and the backend under test.  The tiled backend runs with tiny
tiles so that every case crosses several row and column tiles.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgll
from mgll._problem import _BOUND_STEPS, LossConfig, logit_bound
from mgll._problem import build_problem as _build_problem
from mgll.backends import _blockmath, choose_backend, fused, logits_bytes, reference, tiled
from mgll.targets.cooc import CoOccurrence, GroupMap, sample_groups

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


def build_problem(image, texts, s, b, cooc, config, normalize):
    """As the batch is built for ``"fused"``: with its logit bound read (the fixed shift)."""
    code = logit_bound(image, texts, s, normalize)
    bound = None if code is None else code.item() / _BOUND_STEPS
    return _build_problem(image, texts, s, b, cooc, config, normalize, logit_bound=bound)


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
        return replace(p, rows=rows, cols=col_slices)

    assert not replace(full, rows=rows, cols=col_slices).is_full
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
                    replace(p, rows=sl, cols=[sl, sl]),
                    config,
                )
            )
        )
        for sl in (slice(0, 4), slice(4, None))
    )
    torch.testing.assert_close(parts, whole, **F32)


# ------------------------------------------------------- coarse support from group ids


def _fine_and_coarse_ids(n: int, gen: torch.Generator) -> list[CoOccurrence]:
    """A granularity with a distinct id per sample (captions) and one with three classes."""
    return [
        CoOccurrence("ids", torch.randperm(n, generator=gen) * 7 - 3),
        CoOccurrence("ids", torch.randint(0, 3, (n,), generator=gen)),
    ]


@pytest.mark.parametrize("dense_groups", [0, 64])
@pytest.mark.parametrize("reference_g", [None, 0, 1])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_coarse_group_ids_equal_reference(monkeypatch, backend, reference_g, dense_groups):
    """Segment sums (``DENSE_GROUPS = 0``) and the small one-hot give the reference's loss."""
    monkeypatch.setattr(GroupMap, "DENSE_GROUPS", dense_groups)
    n = 11
    image, texts, s, b, gen = _inputs(n, [n, n], seed=7)
    cooc = _fine_and_coarse_ids(n, gen)
    config = LossConfig(smooth_kl_reference=reference_g)

    def problem():
        return build_problem(image, texts, s, b, cooc, config, normalize=True)

    assert isinstance(problem().kl_maps[0], GroupMap)
    _compare(backend, problem, config, _leaves(image, texts, s, b))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_coarse_group_ids_on_partial_rows(monkeypatch, backend):
    monkeypatch.setattr(GroupMap, "DENSE_GROUPS", 0)
    n = 10
    image, texts, s, b, gen = _inputs(n, [n, n], seed=8)
    cooc = _fine_and_coarse_ids(n, gen)
    config = LossConfig(smooth_kl_reference=0)

    def problem():
        p = build_problem(image, texts, s, b, cooc, config, normalize=True)
        return replace(p, rows=slice(2, 8), cols=[slice(1, 9)] * 2)

    _compare(backend, problem, config, _leaves(image, texts, s, b))


def test_group_ids_are_never_expanded():
    """Distinct ids per sample: S is the ids' ranks, O(N), with the dense one-hot's products."""
    ids = torch.tensor([5, -2, 5, 9, 0, -2])
    groups = sample_groups(CoOccurrence("ids", ids))
    assert isinstance(groups, GroupMap) and groups.shape == (6, 4)
    assert groups._dense is None
    dense = torch.nn.functional.one_hot(torch.unique(ids, return_inverse=True)[1]).float()
    p = torch.rand(3, 6)
    g = torch.rand(3, 4)
    big = GroupMap(groups.index, groups.num_groups)
    big.DENSE_GROUPS = 0  # the segment path
    for m in (groups, big):
        torch.testing.assert_close(m.pool(p), p @ dense)
        torch.testing.assert_close(m.spread(g), g @ dense.T)
    assert big._dense is None
    torch.testing.assert_close(big.rows(slice(1, 4)).pool(p[:, 1:4]), p[:, 1:4] @ dense[1:4])


def test_a_term_that_cannot_contribute_is_not_prepared(monkeypatch):
    """G = 1, weight 0, or a single group: no grouping is built and no backend runs the KL."""
    import mgll._problem as problem_module

    def fail(*args, **kwargs):
        raise AssertionError("the smooth-KL support was prepared for a term that is 0")

    image, texts, s, b, gen = _inputs(8, [8, 8])
    ids = CoOccurrence("ids", torch.randint(0, 3, (8,), generator=gen))
    with monkeypatch.context() as m:
        m.setattr(problem_module, "sample_groups", fail)
        build_problem(image, texts[:1], s, b, [ids], LossConfig(), normalize=True)
        build_problem(
            image, texts, s, b, [ids, ids], LossConfig(smooth_kl_weight=0), normalize=True
        )
    one = CoOccurrence("ids", torch.zeros(8, dtype=torch.long))
    p = build_problem(image, texts, s, b, [ids, one], LossConfig(), normalize=True)
    assert p.kl_maps[0].shape == (8, 1)  # the coarsest has one group: Q^g = 1 for every g
    assert not p.smooth_kl_on
    assert not _blockmath.make_plan(p, LossConfig()).kl
    assert reference.compute(p, LossConfig()).smooth_kl_loss == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backends_read_the_terms_and_divisors_of_the_problem(backend):
    """Which terms run and the pointwise divisors are the Problem's: no backend derives them."""
    n = 8
    image, texts, s, b, gen = _inputs(n, [n, n], seed=4)
    config = LossConfig()
    p = build_problem(image, texts, s, b, _cooc("ids", n, [n, n], gen), config, normalize=True)
    assert p.soft_clip_on and p.pointwise_on and p.smooth_kl_on
    assert p.pointwise_norms == [n * n, n * n]
    full = torch.stack(list(BACKENDS[backend].compute(p, config))).detach()
    assert (full != 0).all()
    for g, flag in enumerate(("soft_clip_on", "pointwise_on", "smooth_kl_on")):
        terms = torch.stack(list(BACKENDS[backend].compute(replace(p, **{flag: False}), config)))
        assert terms[g] == 0
        torch.testing.assert_close(terms[torch.arange(3) != g].detach(), full[torch.arange(3) != g])
    halved = replace(p, pointwise_norms=[2 * n * n, 2 * n * n])
    pointwise = BACKENDS[backend].compute(halved, config).pointwise_loss
    torch.testing.assert_close(pointwise.detach(), full[1] / 2)


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
        assert loss.dtype == torch.float32  # the compute dtype, as open_clip's losses
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


def _compiled_case(case: str, n: int, seed: int = 0):
    ks = [n, n] if case != "bank" else [5, 3]
    image, texts, s, b, gen = _inputs(n, ks, d=8, seed=seed)
    if case == "multi_hot":
        values = {"labels": [c.data.bool() for c in _cooc("multi_hot", n, ks, gen)]}
    elif case == "bank":
        values = {"targets": [c.data for c in _cooc("bank", n, ks, gen)]}
    else:
        values = {"labels": [c.data for c in _cooc("ids", n, ks, gen)]}
    kw = dict(normalize=case != "no-normalize", smooth_kl_support="coarse")
    if case == "samples":
        kw["smooth_kl_support"] = "samples"
    return (image, texts, s, b), values, kw


@pytest.mark.parametrize("case", ["ids", "multi_hot", "bank", "samples", "no-normalize"])
def test_fused_compiles_to_one_graph_without_recompiling(case):
    """Under torch.compile the fused loss is one registered op: fullgraph works, a new N reuses
    the graph (dynamic=True), and values and gradients equal the eager reference, also with
    different gradients per term (the recompute path of backward)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def terms(image, texts, s, b, **kw):
        return mgll.mgll_loss(image, texts, s, b, output_dict=True, **kw)

    compiled = torch.compile(terms, backend=counter, fullgraph=True, dynamic=True)
    for n, weights in ((9, (1.0, 1.0, 1.0)), (13, (0.3, 2.0, -1.0))):
        (image, texts, s, b), values, kw = _compiled_case(case, n, seed=n)
        leaves = [image, *texts, s, b]
        got = compiled(image, texts, s, b, backend="fused", **values, **kw)
        want = terms(image, texts, s, b, backend="reference", **values, **kw)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **F32)
        total = [sum(w * d[k] for w, k in zip(weights, want, strict=True)) for d in (got, want)]
        grads = [torch.autograd.grad(t, leaves) for t in total]
        for a, c in zip(*grads, strict=True):
            torch.testing.assert_close(a, c, **F32)
    assert counter.frame_count == 1


@pytest.mark.parametrize("case", ["float-multi-hot", "nan-targets"])
def test_compiled_fused_builds_the_batch_as_eager(monkeypatch, case):
    """The registered operator builds the same Problem as eager: float 0/1 labels are found 0/1
    (under ``validate``), NaN targets are unknown pairs; so values and gradients agree."""
    n = 8
    ks = [n, n] if case != "nan-targets" else [5, 3]
    image, texts, s, b, gen = _inputs(n, ks, d=8, seed=2)
    if case == "float-multi-hot":
        values = {"labels": [(torch.rand(n, 3 + g, generator=gen) < 0.4).float() for g in (0, 1)]}
        kw = {"overlap": "any"}
    else:
        targets = [c.data for c in _cooc("bank", n, ks, gen)]
        targets[0][2, 1] = targets[1][4, 0] = float("nan")
        values, kw = {"targets": targets}, {}
    built = []
    make_plan = _blockmath.make_plan

    def spy(problem, config):
        built.append([(c.kind, c.partial, c.zero_one, c.binary) for c in problem.cooc])
        return make_plan(problem, config)

    monkeypatch.setattr(_blockmath, "make_plan", spy)
    torch._dynamo.reset()
    compiled = torch.compile(mgll.mgll_loss, backend="eager", fullgraph=True)
    got = compiled(image, texts, s, b, backend="fused", **values, **kw)
    want = mgll.mgll_loss(image, texts, s, b, backend="fused", **values, **kw)
    assert len(built) == 2 and built[0] == built[1]
    ref = mgll.mgll_loss(image, texts, s, b, backend="reference", **values, **kw)
    torch.testing.assert_close(got, want, **F32)
    torch.testing.assert_close(got, ref, **F32)
    leaves = [image, *texts, s, b]
    for a, c in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves), strict=True
    ):
        torch.testing.assert_close(a, c, **F32)


def test_compiled_fused_checks_values_like_eager():
    torch._dynamo.reset()
    (image, texts, s, b), values, _ = _compiled_case("ids", 6)
    compiled = torch.compile(mgll.mgll_loss, backend="eager", fullgraph=True)
    with torch.no_grad():
        image[2, 0] = float("nan")
    with pytest.raises(ValueError, match="image_features"):
        compiled(image, texts, s, b, **values)


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


# ------------------------------------------------------------------------ the logit bound


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_logit_bound_bounds_every_logit(seed, dtype, normalize):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(-0.3 if seed == 3 else 10.0**seed, dtype=dtype)
    image = torch.randn(5, 4, generator=gen, dtype=dtype) * (1 + seed)
    texts = [torch.randn(k, 4, generator=gen, dtype=dtype) for k in (3, 0, 6)]
    texts[2][4] *= 10  # the longest text and image, aligned: a logit at the Cauchy-Schwarz bound
    image[1] = texts[2][4] * (2 + seed)
    prep = (lambda x: torch.nn.functional.normalize(x, dim=-1)) if normalize else (lambda x: x)
    logits = [(scale * prep(image) @ prep(t).T).abs().max() for t in texts if t.shape[0]]
    top = float(torch.stack(logits).max())
    bound = logit_bound(image, texts, scale, normalize).item() / _BOUND_STEPS
    assert top <= bound <= top * (1 + 2e-5) + 2.0**-20


def test_logit_bound_of_an_empty_batch_or_a_nan_is_never_a_shift():
    image, texts, s = torch.randn(3, 4), [torch.randn(2, 4)], torch.tensor(5.0)
    assert logit_bound(image[:0], texts, s, True) is None
    assert logit_bound(image, [texts[0][:0]], s, True) is None
    code = logit_bound(image, texts, torch.tensor(float("nan")), True)
    assert code.item() == _BOUND_STEPS**2  # 2^20, far beyond any usable shift
    assert _blockmath.usable_shift(code.item() / _BOUND_STEPS, torch.float32) is None
    assert _blockmath.usable_shift(5.0, torch.float32) == 5.0
    assert _blockmath.usable_shift(41.0, torch.float32) is None
    assert _blockmath.usable_shift(5.0, torch.float16) is None


@pytest.mark.parametrize("backend", ["fused", "auto", "reference", "tiled"])
def test_the_batch_is_built_with_its_logit_bound_for_fused_only(monkeypatch, backend):
    """``"fused"`` (and ``"auto"`` where it picks fused) gets the bound read with the flags."""
    seen = []
    for module in (fused, reference, tiled):
        compute = module.compute
        monkeypatch.setattr(
            module, "compute", lambda p, c, f=compute: seen.append(p.logit_bound) or f(p, c)
        )
    image, texts, s, _, _ = _inputs(6, [6, 6], scale=8.0)
    mgll.mgll_loss(image, texts, s, labels=[torch.arange(6) % 3] * 2, backend=backend)
    if backend in ("fused", "auto"):
        assert seen == [pytest.approx(8.0, rel=2e-5)]
    else:
        assert seen == [None]


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
