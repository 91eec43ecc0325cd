"""Guarantees of the "Errors and guarantees" page that need more than a message check.

Target-scale invariance, second-order behaviour, the loss dtype under autocast and with half
inputs (a GradScaler step), stable label ids, and the judgement calls on odd input, each on
every backend that runs here (``triton`` under ``TRITON_INTERPRET=1``) and ``auto``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mgll
from backends_under_test import CPU_BACKENDS
from mgll.functional import pointwise_loss, soft_clip_loss

BACKENDS = [*CPU_BACKENDS, "auto"]
ANALYTIC = [b for b in BACKENDS if b != "reference"]  # first-order only
N, K, D = 10, 7, 12


def _bank(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    texts = [torch.randn(k, D, generator=gen, dtype=torch.float64).to(dtype) for k in (K, 5)]
    soft = 0.25 + 0.75 * torch.rand(N, K, generator=gen, dtype=torch.float64)
    soft = soft * (torch.rand(N, K, generator=gen) < 0.6)
    soft[:, 0] = 0.5  # every image has a positive
    binary = (torch.rand(N, 5, generator=gen) < 0.5).to(torch.float64)
    binary[0] = 1
    return image, texts, [soft.to(dtype), binary.to(dtype)]


def _loss_and_grads(backend, image, texts, targets, scale=10.0, bias=-2.0, **options):
    image = image.clone().requires_grad_()
    texts = [t.clone().requires_grad_() for t in texts]
    s = torch.tensor(scale, dtype=image.dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=image.dtype, requires_grad=True)
    loss_fn = mgll.MGLLLoss(backend=backend, **options)
    terms = loss_fn(image, texts, s, b, targets=targets, output_dict=True)
    loss = sum(terms.values())
    grads = torch.autograd.grad(loss, [image, *texts, s, b])
    return torch.stack([t.detach() for t in terms.values()]), grads


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for i, (x, y) in enumerate(zip(got[1], want[1], strict=True)):
        assert torch.isfinite(x).all(), f"gradient {i} is not finite"
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, i=i: f"grad {i}: {m}")


# ------------------------------------------------------------ 1. target-scale invariance

# (which target matrix, scale factor): soft targets stay normal numbers after scaling; the
# binary ones go down to the smallest subnormal (1e-45 rounds to 2**-149) and up to 3e38.
SCALINGS = [("soft", 1e-30), ("soft", 2.0**-120), ("soft", 1e30), ("soft", 1e38),
            ("binary", 1e-45), ("binary", 1e-44), ("binary", 1e-40), ("binary", 3e38)]  # fmt: skip


@pytest.mark.parametrize("support", ["samples", "coarse"])
@pytest.mark.parametrize(("which", "factor"), SCALINGS, ids=[f"{w}-{f:g}" for w, f in SCALINGS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_are_scale_free(backend, which, factor, support):
    image, texts, targets = _bank()
    g = 0 if which == "soft" else 1
    scaled = list(targets)
    scaled[g] = targets[g] * factor
    assert torch.isfinite(scaled[g]).all() and bool((scaled[g] > 0).sum() == (targets[g] > 0).sum())
    options = dict(smooth_kl_support=support, pointwise_target="soft")
    want = _loss_and_grads("reference", image, texts, targets, **options)
    _assert_same(_loss_and_grads(backend, image, texts, scaled, **options), want)


@pytest.mark.parametrize("line", ["row", "column", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_line_sums_match_float64(backend, line):
    """Soft targets built as exp(log_prob) in float32: a row (or column) of exp(-100) = 3.8e-44.

    Its sum is subnormal, so ``1 / sum`` overflows float32; the loss must still equal the
    float64 value on the same (float32) targets.
    """
    image, texts, targets = _bank()
    tiny = torch.tensor(math.exp(-100), dtype=torch.float32)
    assert 0 < tiny < torch.finfo(torch.float32).tiny  # subnormal
    c = targets[0].clone()
    if line in ("row", "both"):
        c[3] = tiny
    if line in ("column", "both"):
        c[:, 2] = tiny * (c[:, 2] > 0)
    targets = [c, targets[1]]
    options = dict(smooth_kl_support="samples", pointwise_target="soft")
    got = _loss_and_grads(backend, image, texts, targets, **options)
    want = _loss_and_grads(
        "reference", image.double(), [t.double() for t in texts], [t.double() for t in targets],
        **options,
    )  # fmt: skip
    want = (want[0].float(), [x.float() for x in want[1]])
    _assert_same(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [1e-45, 1e-40, 3e38])
def test_one_term_functions_are_scale_free(factor):
    logits = torch.randn(6, 6, dtype=torch.float32, requires_grad=True)
    c = (torch.rand(6, 6) < 0.5).float()
    c[:, 0] = 1
    for fn in (soft_clip_loss, lambda z, t: pointwise_loss(z, t, pointwise_target="soft")):
        want = fn(logits, c)
        got = fn(logits, c * factor)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        g_want, g_got = (torch.autograd.grad(v, logits)[0] for v in (want, got))
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ 2. second-order gradients


def _paired(normalize=True):
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    texts = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    ids = torch.tensor([0, 0, 1, 2, 2, 1])
    return image, texts, [ids, ids % 2]


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_supports_double_backward(normalize):
    image, texts, labels = _paired()
    texts = [t.requires_grad_() for t in texts]
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)

    def loss(x, t0, t1, s):
        return mgll.mgll_loss(x, [t0, t1], s, labels=labels, normalize=normalize,
                              backend="reference")  # fmt: skip

    assert torch.autograd.gradgradcheck(loss, (image, *texts, scale))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", ANALYTIC)
def test_analytic_backends_refuse_double_backward(backend, normalize):
    """Never a silently wrong second-order gradient: a clear error pointing to reference."""
    image, texts, labels = _paired()
    scale = torch.tensor(5.0, dtype=torch.float64)
    loss = mgll.mgll_loss(image, texts, scale, labels=labels, normalize=normalize, backend=backend)
    expected = "fused" if backend == "auto" else backend  # auto picks fused for this batch
    match = rf'backend="{expected}" .* cannot differentiate them again .*backend="reference"'
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(loss, image, create_graph=True)
    # first-order gradients are unaffected
    (grad,) = torch.autograd.grad(
        mgll.mgll_loss(image, texts, scale, labels=labels, normalize=normalize, backend=backend),
        image,
    )
    ref = mgll.mgll_loss(image, texts, scale, labels=labels, normalize=normalize)
    tol = dict(rtol=1e-5, atol=1e-7) if backend == "triton" else dict(rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, image)[0], **tol)  # triton: fp32


# ------------------------------------------------------------ 4. loss dtype, GradScaler


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_give_a_float32_loss(backend, dtype):
    image, texts, targets = _bank()
    terms = mgll.MGLLLoss(backend=backend)(
        image.to(dtype), [t.to(dtype) for t in texts], torch.tensor(10.0), targets=targets,
        output_dict=True,
    )  # fmt: skip
    assert {t.dtype for t in terms.values()} == {torch.float32}
    full = mgll.MGLLLoss(backend="reference")(
        image.to(dtype).float(), [t.to(dtype).float() for t in texts], torch.tensor(10.0),
        targets=targets, output_dict=True,
    )  # fmt: skip
    for key, value in full.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_grad_scaler_step_under_fp16_autocast_is_taken(backend):
    """A float16 loss times the scaler's initial 65536 overflowed: the first step was skipped."""
    torch.manual_seed(1)
    n, d = 32, 32
    towers = torch.nn.ModuleList([torch.nn.Linear(d, d), torch.nn.Linear(d, d)])
    opt = torch.optim.SGD(towers.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, t = torch.randn(n, d), torch.randn(n, d)
    ids = torch.arange(n) % 8
    with torch.autocast("cpu", dtype=torch.float16):
        image, text = towers[0](x), towers[1](t)
        assert image.dtype == torch.float16
        loss = mgll.MGLLLoss(backend=backend)(image, [text, text], torch.tensor(10.0),
                                              labels=[ids, ids % 2])  # fmt: skip
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 65536.0, "the first step was skipped (non-finite gradients)"


# ------------------------------------------------------------ 5. stable label ids


def test_stable_ids_are_equal_for_equal_strings_only():
    from mgll.targets import stable_ids

    labels = ["DR", "AMD", "DR", "glaucoma", "", "dr", "Ünïcode"]
    ids = stable_ids(labels)
    assert ids.dtype == torch.int64 and ids.shape == (7,) and bool((ids >= 0).all())
    same = ids[:, None] == ids[None, :]
    assert torch.equal(same, torch.tensor([[a == b for b in labels] for a in labels]))
    assert stable_ids([]).shape == (0,)


def test_stable_ids_do_not_depend_on_the_process():
    """Python's hash() changes with PYTHONHASHSEED; the ids must not (they cross ranks)."""
    from mgll.targets import stable_ids

    code = "import json, mgll; print(json.dumps(mgll.targets.stable_ids(['DR', 'AMD']).tolist()))"
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120, check=True)  # fmt: skip
        outs.add(tuple(json.loads(run.stdout)))
    assert outs == {tuple(stable_ids(["DR", "AMD"]).tolist())}


def test_per_batch_numbering_is_the_silent_bug_stable_ids_avoid():
    """Two "ranks" numbering their own labels give colliding ids in the gathered batch."""
    from mgll.targets import stable_ids

    names = [["DR", "AMD", "DR"], ["AMD", "glaucoma", "AMD"]]
    per_batch = torch.cat([torch.unique(torch.tensor([hash(x) for x in b]),
                                        return_inverse=True)[1] for b in names])  # fmt: skip
    stable = torch.cat([stable_ids(b) for b in names])
    flat = [x for b in names for x in b]
    truth = torch.tensor([[a == b for b in flat] for a in flat])
    assert torch.equal(stable[:, None] == stable[None, :], truth)
    assert not torch.equal(per_batch[:, None] == per_batch[None, :], truth)


@pytest.mark.parametrize("bad", ["DR", ["DR", 3], None])
def test_stable_ids_reject_non_strings(bad):
    from mgll.targets import stable_ids

    with pytest.raises(TypeError, match=r"`labels(\[1\])?` must be"):
        stable_ids(bad)


# ------------------------------------------------------------ 6. judgement calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_weights_zero_is_a_differentiable_zero(backend):
    image, texts, labels = _paired()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss_fn = mgll.MGLLLoss(backend=backend, soft_clip_weight=0, pointwise_weight=0,
                            smooth_kl_weight=0)  # fmt: skip
    terms = loss_fn(image, texts, scale, labels=labels, output_dict=True)
    for name, value in terms.items():
        assert value.grad_fn is not None and float(value.detach()) == 0.0, name
    loss = sum(terms.values())
    loss.backward()
    assert torch.equal(image.grad, torch.zeros_like(image)) and float(scale.grad) == 0.0


@pytest.mark.parametrize("bias", [1e37, -1e37, 1e6 + 1e3, torch.finfo(torch.float32).max])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_logit_bias_is_rejected(backend, bias):
    image, texts, labels = _paired()
    args = (image.float(), [t.float() for t in texts], torch.tensor(5.0), torch.tensor(bias))
    with pytest.raises(ValueError, match=r"`logit_bias` must lie in \[-1e\+06, 1e\+06\]"):
        mgll.MGLLLoss(backend=backend)(*args, labels=labels)
    with pytest.raises(ValueError, match=r"`logit_bias` must lie in"):
        pointwise_loss(torch.randn(3, 3), torch.eye(3), torch.tensor(bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_accepted_bias_is_finite(backend):
    image, texts, labels = _paired()
    loss = mgll.MGLLLoss(backend=backend)(image.float(), [t.float() for t in texts],
                                          torch.tensor(5.0), torch.tensor(-1e6), labels=labels)  # fmt: skip
    assert torch.isfinite(loss)


@pytest.mark.parametrize("value", ["false", None, 0, 1, 1.0])
def test_normalize_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"`normalize` must be True or False, got"):
        mgll.MGLLLoss(normalize=value)
    image, texts, labels = _paired()
    with pytest.raises(TypeError, match=r"`normalize` must be True or False, got"):
        mgll.mgll_loss(image, texts, torch.tensor(5.0, dtype=image.dtype), labels=labels,
                       normalize=value)  # fmt: skip


def test_meta_tensors_are_a_clear_error():
    meta = dict(device="meta")
    with pytest.raises(ValueError, match=r"`image_features` is a meta tensor"):
        mgll.MGLLLoss()(torch.randn(4, 3, **meta), [torch.randn(4, 3, **meta)],
                        torch.tensor(5.0, **meta), labels=[torch.arange(4, **meta)])  # fmt: skip


def test_zero_shot_rejects_non_finite_prototypes_and_features():
    from mgll.evaluation import ZeroShotClassifier

    with pytest.raises(ValueError, match=r"`prototypes` must be finite"):
        ZeroShotClassifier(torch.tensor([[math.inf, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"`prototypes` must be finite"):
        ZeroShotClassifier(torch.tensor([[math.nan, 0.0], [0.0, 1.0]]))
    clf = ZeroShotClassifier(torch.eye(2))
    with pytest.raises(ValueError, match=r"`image_features` must be finite .* row 1"):
        clf(torch.tensor([[1.0, 0.0], [math.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"`image_features` must be finite"):
        clf.logits(torch.tensor([[math.inf, 0.0]]))


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (b"{not json", ValueError, r"'.*bad\.json' is not valid JSON: .* line 1, column 2"),
        (b'{"\xe9": "a"}', ValueError, r"'.*bad\.json' is not UTF-8 text"),
        (b'{"parents": [["a", "b"]]}', TypeError, r"in '.*bad\.json': `data\['parents'\]` must"),
        (b'{"a": ["b"]}', TypeError, r"in '.*bad\.json': `parents` must map each child to one"),
        (b'{"a": "b", "b": "a"}', ValueError, r"in '.*bad\.json': "),
    ],
)
def test_hierarchy_json_errors_name_the_file(tmp_path, content, error, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        mgll.LabelHierarchy.from_json(path)


def test_reference_float64_pointwise_gradient_is_exact():
    """Above torch's softplus threshold (20) its gradient was 1 instead of sigmoid(x)."""
    z = torch.tensor([[25.0, -30.0, 0.0, 40.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(pointwise_loss(z, y, pointwise_norm="images"), z)
    torch.testing.assert_close(grad, torch.sigmoid(z.detach()) - y, rtol=1e-15, atol=0)
    image, texts, labels = _paired()
    scale, bias = torch.tensor(100.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)
    options = dict(soft_clip_weight=0.0, smooth_kl_weight=0.0)
    grads = [
        torch.autograd.grad(mgll.MGLLLoss(backend=b, **options)(
            image, texts, scale, bias, labels=labels), image)[0]
        for b in ("reference", "fused")
    ]  # fmt: skip
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-15)


def test_bank_targets_reach_the_backends_normalised_per_row_and_column():
    """The backends read W^r and W^c (both divisions), never 1 / (a subnormal sum)."""
    from mgll._problem import LossConfig, build_problem
    from mgll.targets.cooc import CoOccurrence

    c = torch.tensor([[1e-44, 3e-44, 0.0], [0.0, 2.0, 2.0]])
    p = build_problem(torch.randn(2, 3), [torch.randn(3, 3)], torch.tensor(1.0), None,
                      [CoOccurrence("dense", c)], LossConfig(), True)  # fmt: skip
    w_r, w_c = p.cooc[0].data, p.col_weights[0]
    torch.testing.assert_close(w_r.sum(1), torch.ones(2))
    torch.testing.assert_close(w_r[0, :2], torch.tensor([0.25, 0.75]), rtol=0.05, atol=0)
    assert torch.equal(w_r > 0, c > 0)  # the support (binary targets, anchors) is kept
    torch.testing.assert_close(w_c.sum(0), torch.ones(3))
