"""The reference backend and the functional API against the naive float64 references."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mgll
import naive
from mgll import MGLLLoss
from mgll.functional import mgll_loss, pointwise_loss, smooth_kl_loss, soft_clip_loss

F64 = torch.float64
TOL = dict(rtol=1e-6, atol=1e-9)


def _features(n: int, ks: list[int], d: int = 6, dtype=F64):
    image = torch.randn(n, d, dtype=dtype, requires_grad=True)
    texts = [torch.randn(k, d, dtype=dtype, requires_grad=True) for k in ks]
    return image, texts


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _labels(kind: str, n: int, g: int) -> list[torch.Tensor]:
    out = []
    for i in range(g):
        if kind == "ids":
            out.append(torch.randint(0, 3 + i, (n,)))
        else:  # multi-hot with some empty rows
            hot = torch.rand(n, 4 + i) < 0.35
            hot[0] = False
            out.append(hot)
    return out


def _bank_targets(n: int, ks: list[int]) -> list[torch.Tensor]:
    out = []
    for k in ks:
        t = (torch.rand(n, k) < 0.4).to(F64) * torch.rand(n, k, dtype=F64) * 2
        t[0] = 0  # an image with no positive
        t[:, -1] = 0  # a text with no positive
        out.append(t)
    return out


# -- each term ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 5), (6, 4), (3, 7)])
def test_soft_clip_matches_naive(shape):
    z = (torch.randn(*shape, dtype=F64) * 3).requires_grad_()
    c = (torch.rand(*shape, dtype=F64) < 0.4).to(F64) * torch.rand(*shape, dtype=F64)
    c[0] = 0
    c[:, 0] = 0
    ours, ref = soft_clip_loss(z, c), naive.soft_clip(z, c)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(_grads(ours, z), _grads(ref, z), **TOL)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [("target", "pointwise_target", "soft"), ("norm", "pointwise_norm", "images")],
)
def test_pointwise_old_keywords_warn_and_give_the_same(old, new, value):
    z = (torch.randn(4, 6, dtype=F64) * 3).requires_grad_()
    c = (torch.rand(4, 6, dtype=F64) < 0.5).to(F64)
    want = pointwise_loss(z, c, **{new: value})
    assert want != pointwise_loss(z, c)  # the option changes the loss: the test can fail
    with pytest.warns(DeprecationWarning, match=rf"pointwise_loss\({old}=...\)`.*pass `{new}=`"):
        got = pointwise_loss(z, c, **{old: value})
    assert torch.equal(got, want)
    assert torch.equal(_grads(got, z)[0], _grads(want, z)[0])
    default = {"target": "binary", "norm": "pairs"}[old]
    with pytest.raises(TypeError, match=rf"got both `{old}=`.*pass only `{new}=`"):
        pointwise_loss(z, c, **{old: default, new: value})


@pytest.mark.parametrize("target", ["binary", "soft", "graded"])
@pytest.mark.parametrize("norm", ["pairs", "images"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pointwise_matches_naive(target, norm, with_bias):
    z = (torch.randn(4, 6, dtype=F64) * 3).requires_grad_()
    c = (torch.rand(4, 6, dtype=F64) < 0.5).to(F64) * 2
    c[:2] *= torch.rand(2, 6, dtype=F64)  # weights below 1 too (graded targets)
    bias = torch.tensor(-1.5, dtype=F64, requires_grad=True) if with_bias else None
    ours = pointwise_loss(z, c, bias, pointwise_target=target, pointwise_norm=norm)
    ref = naive.pointwise(z, c, bias, target, norm)
    torch.testing.assert_close(ours, ref, **TOL)
    inputs = [z] + ([bias] if with_bias else [])
    torch.testing.assert_close(_grads(ours, inputs), _grads(ref, inputs), **TOL)


@pytest.mark.parametrize("g", [2, 3])
@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_smooth_kl_matches_naive(g, owned, grouped):
    n = 5
    ks = [n] * g if not owned else [4, 6, 3][:g]
    zs = [(torch.randn(n, k, dtype=F64) * 4).requires_grad_() for k in ks]
    owners = [(torch.rand(k, n, dtype=F64) < 0.4).to(F64) for k in ks] if owned else None
    groups = (torch.rand(n, 3, dtype=F64) < 0.5).to(F64) if grouped else None
    ours = smooth_kl_loss(zs, owners, groups)
    ref = naive.smooth_kl(zs, owners or [None] * g, groups)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(_grads(ours, zs), _grads(ref, zs), **TOL)


# -- the whole loss -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ids", "multi_hot"])
@pytest.mark.parametrize("g", [1, 2, 3])
@pytest.mark.parametrize("support", ["samples", "coarse"])
def test_paired_loss_matches_naive(kind, g, support):
    n = 6
    image, texts = _features(n, [n] * g)
    scale = torch.tensor(4.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-0.7, dtype=F64, requires_grad=True)
    labels = _labels(kind, n, g)
    lam = [1.0, 0.5, 2.0][:g]
    ours = mgll_loss(
        image,
        texts,
        scale,
        bias,
        labels=labels,
        granularity_weights=lam,
        smooth_kl_support=support,
        overlap="any",  # the naive reference builds C with the any-overlap rule
        backend="reference",
    )
    ref = naive.mgll(image, texts, scale, bias, labels=labels, lam=lam, support=support)
    torch.testing.assert_close(ours, ref, **TOL)
    inputs = [image, *texts, scale, bias]
    torch.testing.assert_close(_grads(ours, inputs), _grads(ref, inputs), **TOL)


@pytest.mark.parametrize("ks", [[4], [4, 7], [3, 5, 2]])
@pytest.mark.parametrize("support", ["samples", "coarse"])
def test_bank_loss_matches_naive(ks, support):
    n = 5
    image, texts = _features(n, ks)
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    targets = _bank_targets(n, ks)
    ours = mgll_loss(
        image,
        texts,
        scale,
        targets=targets,
        pointwise_norm="images",
        pointwise_target="soft",
        smooth_kl_support=support,
        backend="reference",
    )
    ref = naive.mgll(
        image, texts, scale, targets=targets, target="soft", norm="images", support=support
    )
    torch.testing.assert_close(ours, ref, **TOL)
    inputs = [image, *texts, scale]
    torch.testing.assert_close(_grads(ours, inputs), _grads(ref, inputs), **TOL)


def test_coarse_reference_override_matches_naive():
    n = 6
    image, texts = _features(n, [n, n])
    scale = torch.tensor(5.0, dtype=F64)
    labels = [torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])]
    for r in (0, 1):
        ours = mgll_loss(
            image,
            texts,
            scale,
            labels=labels,
            smooth_kl_support="coarse",
            smooth_kl_reference=r,
            output_dict=True,
        )["smooth_kl_loss"]
        ref = naive.mgll(
            image, texts, scale, labels=labels, weights=(0, 0, 1), support="coarse", reference=r
        )
        torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("dense_groups", [0, 64])
def test_coarse_group_ids_match_naive(monkeypatch, dense_groups):
    """Ids pooled by segment sums (0) or by a small one-hot (64) equal the naive one-hot S."""
    from mgll.targets.cooc import GroupMap

    monkeypatch.setattr(GroupMap, "DENSE_GROUPS", dense_groups)
    n = 7
    image, texts = _features(n, [n, n, n])
    scale = torch.tensor(5.0, dtype=F64, requires_grad=True)
    labels = [
        torch.randperm(n),
        torch.tensor([0, 0, 1, 1, 2, 2, 2]),
        torch.tensor([3, 1, 3, 1, 5, 5, 1]),
    ]
    for r in (None, 0, 2):
        ours = mgll_loss(image, texts, scale, labels=labels, smooth_kl_reference=r)
        ref = naive.mgll(image, texts, scale, labels=labels, support="coarse", reference=r)
        torch.testing.assert_close(ours, ref, **TOL)
        inputs = [image, *texts, scale]
        torch.testing.assert_close(_grads(ours, inputs), _grads(ref, inputs), **TOL)


def test_gradcheck():
    n = 4
    image, texts = _features(n, [n, n], d=3)
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    labels = [torch.tensor([0, 0, 1, 2]), torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])]

    def f(x, t0, t1, s):
        return mgll_loss(x, [t0, t1], s, labels=labels, backend="reference")

    assert torch.autograd.gradcheck(f, (image, *texts, scale))


# -- reductions and properties --------------------------------------------------------------


def test_identity_targets_give_clip():
    n = 6
    z = (torch.randn(n, n, dtype=F64) * 3).requires_grad_()
    ours = soft_clip_loss(z, torch.eye(n, dtype=F64))
    torch.testing.assert_close(ours, naive.clip(z), **TOL)
    ce = 0.5 * (F.cross_entropy(z, torch.arange(n)) + F.cross_entropy(z.T, torch.arange(n)))
    torch.testing.assert_close(ours, ce, **TOL)


def test_equals_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    n, d = 8, 16
    image, (text,) = _features(n, [n], d)
    scale = torch.tensor(7.0, dtype=F64, requires_grad=True)
    ours = mgll_loss(
        image, [text], scale, labels=[torch.arange(n)], pointwise_weight=0.0, smooth_kl_weight=0.0
    )
    theirs = open_clip_loss.ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    torch.testing.assert_close(ours, theirs, **TOL)
    inputs = [image, text, scale]
    torch.testing.assert_close(_grads(ours, inputs), _grads(theirs, inputs), **TOL)


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 7),
    g=st.integers(1, 3),
    support=st.sampled_from(["samples", "coarse"]),
)
def test_permuting_the_batch_leaves_the_loss_unchanged(seed, n, g, support):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 5, dtype=F64, generator=gen)
    texts = [torch.randn(n, 5, dtype=F64, generator=gen) for _ in range(g)]
    labels = [torch.randint(0, 3, (n,), generator=gen) for _ in range(g)]
    scale = torch.tensor(6.0, dtype=F64)
    perm = torch.randperm(n, generator=gen)
    kwargs = dict(smooth_kl_support=support)
    base = mgll_loss(image, texts, scale, labels=labels, **kwargs)
    permuted = mgll_loss(
        image[perm], [t[perm] for t in texts], scale, labels=[lab[perm] for lab in labels], **kwargs
    )
    torch.testing.assert_close(base, permuted, rtol=1e-9, atol=1e-12)


@given(
    seed=st.integers(0, 2**16),
    g=st.integers(2, 3),
    scale=st.floats(0.1, 100.0),
    support=st.sampled_from(["samples", "coarse"]),
)
def test_smooth_kl_is_bounded(seed, g, scale, support):
    gen = torch.Generator().manual_seed(seed)
    n = 6
    image = torch.randn(n, 4, generator=gen)
    texts = [torch.randn(n, 4, generator=gen) for _ in range(g)]
    labels = [torch.randint(0, 3, (n,), generator=gen) for _ in range(g)]
    kl = mgll_loss(
        image,
        texts,
        torch.tensor(scale),
        labels=labels,
        smooth_kl_support=support,
        output_dict=True,
    )["smooth_kl_loss"]
    assert 0 <= kl.item() <= naive.log_g(g) + 1e-6


@pytest.mark.parametrize("support", ["samples", "coarse"])
def test_smooth_kl_vanishes_when_granularities_agree(support):
    image, (text,) = _features(6, [6])
    labels = [torch.tensor([0, 0, 1, 1, 2, 2])] * 3
    kl = mgll_loss(
        image,
        [text] * 3,
        torch.tensor(9.0, dtype=F64),
        labels=labels,
        smooth_kl_support=support,
        output_dict=True,
    )["smooth_kl_loss"]
    torch.testing.assert_close(kl, torch.zeros((), dtype=F64), rtol=0, atol=1e-12)


def test_coarse_with_identity_groups_is_the_sample_form():
    zs = [torch.randn(5, 5, dtype=F64) * 3 for _ in range(3)]
    torch.testing.assert_close(
        smooth_kl_loss(zs, groups=torch.eye(5, dtype=F64)), smooth_kl_loss(zs), **TOL
    )


def test_coarse_is_invariant_to_relabelling_groups():
    image, texts = _features(6, [6, 6])
    fine = torch.tensor([0, 1, 2, 3, 4, 5])
    coarse = torch.tensor([0, 0, 1, 1, 2, 2])
    relabelled = torch.tensor([7, 7, 3, 3, 5, 5])
    kw = dict(smooth_kl_support="coarse", output_dict=True)
    a = mgll_loss(image, texts, torch.tensor(4.0, dtype=F64), labels=[fine, coarse], **kw)
    b = mgll_loss(image, texts, torch.tensor(4.0, dtype=F64), labels=[fine, relabelled], **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- the authors' configuration -------------------------------------------------------------


def _authors_formula(image, texts, scale, keys):
    """docs/differences.rst: per granularity 1/4 [CE(Z, W) + CE(Z^T, W)] + BCE(Z, W) over N^2 pairs."""
    x = F.normalize(image, dim=-1)
    total = 0
    for t, key in zip(texts, keys, strict=True):
        z = scale * x @ F.normalize(t, dim=-1).T
        same = torch.tensor([[float(a == b) for b in key] for a in key], dtype=z.dtype)
        w = same / same.sum(1, keepdim=True)
        ce = 0.25 * (F.cross_entropy(z, w) + F.cross_entropy(z.T, w))
        total = total + ce + F.binary_cross_entropy_with_logits(z, w)
    return total


def test_reference_compatible_equals_the_authors_formula():
    n = 8
    image, texts = _features(n, [n, n], d=10)
    scale = torch.tensor(12.0, dtype=F64, requires_grad=True)
    keys = [
        ["dr", "dr", "dme", "normal", "dr", "dme", "amd", "amd"],
        ["mild", "severe", "mild", "none", "mild", "mild", "wet", "dry"],
    ]
    ids = [torch.tensor([sorted(set(k)).index(s) for s in k]) for k in keys]
    ours = MGLLLoss.reference_compatible()(image, texts, scale, labels=ids)
    theirs = _authors_formula(image, texts, scale, keys)
    torch.testing.assert_close(ours, theirs, **TOL)
    inputs = [image, *texts, scale]
    torch.testing.assert_close(_grads(ours, inputs), _grads(theirs, inputs), **TOL)


# -- module, dict, dtypes, compile, imports --------------------------------------------------


def test_module_equals_functional_and_dict_sums_to_loss():
    image, texts = _features(6, [6, 6])
    labels = _labels("ids", 6, 2)
    scale = torch.tensor(5.0, dtype=F64)
    settings = dict(
        soft_clip_weight=0.3,
        pointwise_weight=2.0,
        smooth_kl_weight=0.7,
        granularity_weights=[1.0, 0.5],
        pointwise_target="soft",
        pointwise_norm="images",
    )
    module = MGLLLoss(**settings)
    terms = module(image, texts, scale, labels=labels, output_dict=True)
    assert list(terms) == ["soft_clip_loss", "pointwise_loss", "smooth_kl_loss"]
    total = mgll_loss(image, texts, scale, labels=labels, **settings)
    torch.testing.assert_close(sum(terms.values()), total, rtol=1e-12, atol=0)
    assert "pointwise_norm='images'" in repr(module)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_and_return_float32(dtype):
    """Like open_clip's losses: a half loss would round, and overflow under a GradScaler."""
    image, texts = _features(8, [8, 8], d=16, dtype=torch.float32)
    labels = _labels("ids", 8, 2)
    scale = torch.tensor(10.0)
    full = mgll_loss(image, texts, scale, labels=labels)
    half = mgll_loss(
        image.detach().to(dtype), [t.detach().to(dtype) for t in texts], scale, labels=labels
    )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full.detach(), rtol=2e-2, atol=1e-2)


def test_autocast_keeps_the_loss_in_float32():
    image, texts = _features(8, [8, 8], d=16, dtype=torch.float32)
    labels = _labels("ids", 8, 2)
    scale = torch.tensor(10.0)
    eager = mgll_loss(image, texts, scale, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = mgll_loss(image, texts, scale, labels=labels)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, eager, rtol=1e-6, atol=1e-6)


# Dynamo itself touches ``.grad`` of non-leaf tensors while tracing (a torch-internal warning).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_torch_compile_equals_eager():
    image, texts = _features(8, [8, 8], d=16, dtype=torch.float32)
    labels = _labels("ids", 8, 2)
    scale = torch.tensor(10.0)
    loss_fn = MGLLLoss(backend="reference")
    eager = loss_fn(image, texts, scale, labels=labels)
    compiled = torch.compile(loss_fn)(image, texts, scale, labels=labels)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        _grads(compiled, [image]), _grads(eager, [image]), rtol=1e-5, atol=1e-6
    )


def test_import_is_light():
    code = (
        "import sys, mgll; heavy = {'triton', 'open_clip', 'transformers', 'matplotlib'} & set(sys.modules);"
        "print(sorted(heavy)); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_import():
    for name in mgll.__all__:
        assert getattr(mgll, name) is not None, name
    assert "reference" in mgll.available_backends()


def test_coarse_default_reference_is_the_coarsest_partition():
    # Multi-hot "digits present" has 4 labels but 5 distinct label sets; the parity ids have 2
    # groups. The default pools by parity, the granularity with the fewest distinct groups.
    digits = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    )
    parity = torch.tensor([0, 1, 0, 1, 0, 0])
    image, texts = _features(6, [6, 6])
    scale = torch.tensor(4.0, dtype=F64)
    kw = dict(smooth_kl_support="coarse", output_dict=True)
    default = mgll_loss(image, texts, scale, labels=[digits, parity], **kw)["smooth_kl_loss"]
    by_parity = mgll_loss(image, texts, scale, labels=[digits, parity], smooth_kl_reference=1, **kw)
    by_digits = mgll_loss(image, texts, scale, labels=[digits, parity], smooth_kl_reference=0, **kw)
    torch.testing.assert_close(default, by_parity["smooth_kl_loss"], rtol=0, atol=0)
    assert not torch.allclose(default, by_digits["smooth_kl_loss"])


def test_autocast_keeps_bank_smooth_kl_maps_in_float32():
    image, texts = _features(6, [4, 5], d=8, dtype=torch.float32)
    targets = [t.float() for t in _bank_targets(6, [4, 5])]
    eager = mgll_loss(image, texts, torch.tensor(10.0), targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = mgll_loss(image, texts, torch.tensor(10.0), targets=targets)
    torch.testing.assert_close(cast, eager, rtol=1e-6, atol=1e-6)
