"""Valid but extreme input gives a finite loss and finite gradients, on every backend (docs/errors.rst).

Each case runs on every registered backend (the list is read when the tests are collected, so a
new backend is covered as soon as it is registered) and is compared with ``reference``.  Shapes
stay small (N <= 32) so that the Triton kernels can run in the CPU interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mgll
from backends_under_test import CPU_BACKENDS
from mgll.functional import smooth_kl_loss

BACKENDS = CPU_BACKENDS  # triton takes CPU tensors only in its interpreter
N, D = 12, 16
IDS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])


def unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


def near(x, eps=1e-4):
    """Features whose cosine with ``x`` row by row is about 1 - eps**2/2."""
    return F.normalize(x.double() + eps * torch.randn(x.shape, dtype=torch.float64), dim=-1).to(
        x.dtype
    )


# Each case: the inputs of ``mgll_loss`` and its options.
def case_scale_100_near_plus_minus_one():
    x = unit(N, D)
    return dict(image=x, texts=[near(x), near(-x)], scale=100.0, bias=-10.0, labels=[IDS, IDS // 2])


def case_scale_100_bank_near_one():
    x = unit(N, D)
    bank = torch.cat([near(x[:3]), -x[3:5]])  # 5 texts: near +1 with 3 images, -1 with 2
    return dict(image=x, texts=[bank, near(x)], scale=100.0, targets=[torch.rand(N, 5), None])


def case_identical_embeddings():
    x = unit(1, D).expand(N, D).contiguous()
    return dict(image=x, texts=[x.clone(), x.clone()], scale=100.0, labels=[IDS, IDS % 2])


def case_same_label():
    same = torch.zeros(N, dtype=torch.long)
    return dict(image=unit(N, D), texts=[unit(N, D), unit(N, D)], scale=50.0, labels=[same, same])


def case_bank_without_positives():
    zeros = torch.zeros(N, 4)
    return dict(image=unit(N, D), texts=[unit(4, D), unit(6, D)], scale=30.0,
                targets=[zeros, (torch.rand(N, 6) > 0.7).float()])  # fmt: skip


def case_bank_no_positive_anywhere():
    return dict(image=unit(N, D), texts=[unit(3, D), unit(5, D)], scale=30.0,
                targets=[torch.zeros(N, 3), torch.zeros(N, 5)])  # fmt: skip


def case_multi_hot_without_positives():
    empty = torch.zeros(N, 3, dtype=torch.long)
    return dict(image=unit(N, D), texts=[unit(N, D), unit(N, D)], scale=30.0, labels=[IDS, empty])


def case_multi_hot_zero_classes():
    none = torch.zeros(N, 0, dtype=torch.bool)  # C_g = 0: no class at all
    return dict(image=unit(N, D), texts=[unit(N, D), unit(N, D)], scale=30.0, labels=[none, IDS])


def case_one_sample():
    return dict(image=unit(1, D), texts=[unit(1, D), unit(1, D)], scale=100.0,
                labels=[IDS[:1], IDS[:1]])  # fmt: skip


def case_one_sample_bank():
    return dict(image=unit(1, D), texts=[unit(4, D), unit(2, D)], scale=100.0, bias=-5.0,
                targets=[torch.tensor([[0.0, 1.0, 0.0, 2.0]]), torch.zeros(1, 2)])  # fmt: skip


def case_confident_and_right():
    """Every pair decided with a margin of 60+ logits: each pointwise term is below 1e-26.

    Found by tests/test_fuzz.py: a backend that computes softplus(z) and y z from two different
    roundings of z returns about -4e-6 (one ulp of z) instead of a positive number.
    """
    image = torch.tensor([[1.0482, -0.0445]])
    texts = [torch.tensor([[-2.1788, 0.5684]]), torch.tensor([[0.6035, 0.8110]])]
    labels = [torch.zeros(1, 0, dtype=torch.long), torch.tensor([[1, 1, 1]])]
    return dict(image=image, texts=texts, scale=99.8347, bias=8.0, labels=labels)


def case_tiny_and_huge_norms():
    x = unit(N, D) * torch.logspace(-10, 10, N)[:, None]  # normalize=True undoes the scale
    return dict(image=x, texts=[unit(N, D) * 1e-8, unit(N, D) * 1e8], scale=100.0,
                labels=[IDS, IDS % 3])  # fmt: skip


def case_zero_features_unnormalized():
    zeros = torch.zeros(N, D)  # with normalize=False a zero feature is a valid input
    return dict(image=zeros, texts=[unit(N, D), zeros.clone()], scale=100.0,
                labels=[IDS, IDS % 2], options=dict(normalize=False))  # fmt: skip


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}
KL_OPTIONS = {
    "samples": {},
    "coarse": {"smooth_kl_support": "coarse"},
    "soft-images": {"pointwise_target": "soft", "pointwise_norm": "images"},
}


def make_inputs(spec, dtype=None):
    """Leaf tensors (with gradients) and the keyword arguments of ``mgll_loss``."""
    spec = dict(spec)
    dtype = dtype or spec["image"].dtype
    image = spec["image"].to(dtype).requires_grad_(True)
    texts = [t.to(dtype).requires_grad_(True) for t in spec["texts"]]
    scale = torch.tensor(spec["scale"], requires_grad=True)
    bias = spec.get("bias")
    bias = None if bias is None else torch.tensor(bias, requires_grad=True)
    kwargs = dict(spec.get("options", {}))
    if "labels" in spec:
        kwargs["labels"] = spec["labels"]
    else:  # a None target is filled with a random bank co-occurrence of the right shape
        kwargs["targets"] = [
            (torch.rand(image.shape[0], t.shape[0]) > 0.5).float() if c is None else c
            for c, t in zip(spec["targets"], texts, strict=True)
        ]
    leaves = [image, *texts, scale] + ([] if bias is None else [bias])
    return leaves, (image, texts, scale, bias), kwargs


def loss_and_grads(backend, spec, dtype=None, **options):
    leaves, args, kwargs = make_inputs(spec, dtype)
    terms = mgll.mgll_loss(*args, **kwargs, **options, backend=backend, output_dict=True)
    sum(terms.values()).backward()
    return {k: t.detach().float() for k, t in terms.items()}, [x.grad.float() for x in leaves]


def assert_finite_and_nonnegative(terms, grads, g_count, dtype=torch.float32):
    for name, value in terms.items():
        assert torch.isfinite(value), f"{name} = {value}"
        assert value >= 0, f"{name} = {value} < 0"
    bound = g_count * math.log(g_count)  # G log G, up to rounding in the returned dtype
    assert terms["smooth_kl_loss"] <= bound * (1 + max(1e-5, torch.finfo(dtype).eps))
    for i, grad in enumerate(grads):
        assert torch.isfinite(grad).all(), f"gradient of input {i} is not finite"


def assert_matches_reference(backend, got, spec, dtype=None, rtol=1e-4, atol=1e-5, **options):
    """Values and gradients equal ``reference``'s.

    Gradients are compared norm-wise (the tolerance grows with the largest entry, so a row of
    tiny features with a 1e10 gradient does not demand 1e-4 of its smallest entries), and with
    the loss: at scale 100 the gradient of a normalised feature is the projection of a large
    vector orthogonal to that feature, and what the projection cancels (all of it, for
    identical embeddings) leaves rounding noise in proportion to the loss.
    """
    if backend == "reference":
        return
    want = loss_and_grads("reference", spec, dtype, **options)
    for name in got[0]:
        torch.testing.assert_close(got[0][name], want[0][name], rtol=rtol, atol=atol, msg=name)
    grad_atol = atol * (1 + sum(want[0].values()).abs().item())
    for i, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        scale_atol = grad_atol + rtol * w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=rtol, atol=scale_atol, msg=f"gradient of input {i}")


# Every case with the paper's options; the cases where a variant matters with the others too.
VARIANT_CASES = ["scale_100_near_plus_minus_one", "bank_without_positives", "one_sample_bank",
                 "bank_no_positive_anywhere", "multi_hot_without_positives", "multi_hot_zero_classes"]  # fmt: skip
OPTION_CASES = [(c, "samples") for c in CASES] + [
    (c, o) for c in VARIANT_CASES for o in KL_OPTIONS if o != "samples"
]


@pytest.mark.parametrize(
    ("case", "options"), OPTION_CASES, ids=[f"{c}-{o}" for c, o in OPTION_CASES]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_input_is_finite(backend, case, options):
    options = KL_OPTIONS[options]
    torch.manual_seed(1)
    spec = CASES[case]()
    got = loss_and_grads(backend, spec, **options)
    assert_finite_and_nonnegative(*got, g_count=len(spec["texts"]))
    torch.manual_seed(1)
    assert_matches_reference(backend, got, CASES[case](), **options)


HALF_CASES = ["scale_100_near_plus_minus_one", "identical_embeddings", "bank_without_positives",
              "multi_hot_without_positives", "one_sample"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, case, dtype):
    torch.manual_seed(1)
    terms, grads = loss_and_grads(backend, CASES[case](), dtype)
    assert_finite_and_nonnegative(terms, grads, g_count=2, dtype=dtype)
    torch.manual_seed(1)
    assert_matches_reference(backend, (terms, grads), CASES[case](), dtype, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_autocast(backend, dtype):
    """Features produced under autocast (half) by a model in fp32: the loss computes in fp32."""
    torch.manual_seed(2)
    encoder = torch.nn.Linear(D, D)
    raw = torch.randn(N, D)
    scale = torch.tensor(100.0, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        image, text = encoder(raw), encoder(raw + 1e-3 * torch.randn(N, D))
        assert image.dtype == dtype  # the situation under test: half features, fp32 parameters
        loss = mgll.mgll_loss(image, [text, -text], scale, labels=[IDS, IDS % 2], backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in (*encoder.parameters(), scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_features_are_an_error_with_normalize(backend):
    """The zero-norm decision (docs/errors.rst): an error naming the argument and the row."""
    spec = case_same_label()
    spec["texts"][1][4] = 0.0
    _, args, kwargs = make_inputs(spec)
    with pytest.raises(ValueError, match=r"`text_features\[1\]` row 4 has zero L2 norm"):
        mgll.mgll_loss(*args, **kwargs, backend=backend)


@pytest.mark.skipif("tiled" not in BACKENDS, reason="the tiled backend is not registered")
def test_large_batch_tiled(monkeypatch):
    """A batch spread over many tiles (small tiles keep it to seconds on a CPU) at scale 100.

    Each row's and each column's log-sum-exp is accumulated online over 4 x 2 tiles; the result
    must still equal ``reference``'s.
    """
    tiled = pytest.importorskip("mgll.backends.tiled")
    monkeypatch.setattr(tiled, "TILE_ROWS", 256)
    monkeypatch.setattr(tiled, "TILE_COLS", 512)
    n = 1024
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, D, generator=gen), dim=1)
    ids = torch.randint(0, 64, (n,), generator=gen)
    spec = dict(image=x, texts=[near(x), torch.randn(n, D, generator=gen)], scale=100.0,
                bias=-10.0, labels=[ids, ids // 8])  # fmt: skip
    got = loss_and_grads("tiled", spec)
    assert_finite_and_nonnegative(*got, g_count=2)
    assert_matches_reference("tiled", got, spec)


@pytest.mark.parametrize("seed", range(20))
def test_smooth_kl_of_equal_distributions_is_not_negative(seed):
    """Regression: rounding made KL(P || P) about -1e-8 for identical granularities."""
    torch.manual_seed(seed)
    z = (100 * torch.randn(16, 16)).requires_grad_(True)
    loss = smooth_kl_loss([z, z.detach().clone()])
    loss.backward()
    assert loss >= 0
    torch.testing.assert_close(z.grad, torch.zeros_like(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_granularities_give_a_non_negative_smooth_kl(backend):
    torch.manual_seed(4)
    x, t = unit(N, D), unit(N, D)
    terms = mgll.mgll_loss(x, [t, t.clone()], torch.tensor(100.0), labels=[IDS, IDS],
                           backend=backend, output_dict=True)  # fmt: skip
    assert terms["smooth_kl_loss"] >= 0
