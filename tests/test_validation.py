"""Bad input gets a clear error before any compute (docs/errors.rst).

Every case is run through :class:`mgll.MGLLLoss` and :func:`mgll.mgll_loss`, and the message is
matched: it names the argument, the expectation and what was received.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import mgll
from mgll import functional as MF

N, D = 6, 8
META = torch.device("meta")  # a second device on a CPU-only machine: only metadata is read


def paired(**changes):
    """Valid paired-mode arguments (G=2: ids, multi-hot), with ``changes`` applied."""
    args = dict(
        image_features=torch.randn(N, D),
        text_features=[torch.randn(N, D), torch.randn(N, D)],
        logit_scale=torch.tensor(10.0),
        logit_bias=None,
        labels=[torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([[1, 0, 1]] * 3 + [[0, 1, 0]] * 3)],
        targets=None,
    )
    args.update(changes)
    return args


def bank(**changes):
    """Valid bank-mode arguments (K_0=3, K_1=4), with ``changes`` applied."""
    args = paired(
        text_features=[torch.randn(3, D), torch.randn(4, D)],
        labels=None,
        targets=[torch.rand(N, 3).round(), torch.rand(N, 4)],
    )
    args.update(changes)
    return args


def with_entry(make, key, index, value):
    """``make()`` with ``args[key][index]`` replaced by ``value``."""
    args = make()
    items = list(args[key])
    items[index] = value
    args[key] = items
    return args


def nan_at(x: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


def call(api: str, args: dict, options: dict):
    args = dict(args)
    features = [args.pop(k) for k in ("image_features", "text_features", "logit_scale")]
    if api == "module":
        return mgll.MGLLLoss(**options)(*features, **args)
    return mgll.mgll_loss(*features, **args, **options)


# (id, arguments, options, exception, message pattern)
CASES = [
    # widths, batch sizes, granularity counts
    ("width", paired(text_features=[torch.randn(N, D), torch.randn(N, 5)]), {}, ValueError,
     r"`text_features\[1\]` must have 8 columns to match `image_features` \(N=6, D=8\), got \(6, 5\)"),
    ("n-paired-texts", paired(text_features=[torch.randn(5, D), torch.randn(N, D)]), {}, ValueError,
     r"one text per image: `text_features\[0\]` must have N=6 rows, got \(5, 8\)"),
    ("n-labels", with_entry(paired, "labels", 0, torch.zeros(5, dtype=torch.long)), {}, ValueError,
     r"`labels\[0\]` must have shape \(N,\) or \(N, C_g\) with N=6, got \(5,\)"),
    ("n-targets", with_entry(bank, "targets", 1, torch.rand(5, 4)), {}, ValueError,
     r"`targets\[1\]` must have shape \(N, K_1\) = \(6, 4\) .* got \(5, 4\)"),
    ("k-targets", with_entry(bank, "targets", 0, torch.rand(N, 4)), {}, ValueError,
     r"`targets\[0\]` must have shape \(N, K_0\) = \(6, 3\) .* got \(6, 4\)"),
    ("rank-targets", with_entry(bank, "targets", 0, torch.rand(N)), {}, ValueError,
     r"`targets\[0\]` must have shape \(N, K_0\) = \(6, 3\) .* got \(6,\)"),
    ("g-labels", paired(labels=[torch.zeros(N, dtype=torch.long)]), {}, ValueError,
     r"`labels` must have one entry per granularity: G=2 from `text_features`, got 1"),
    ("g-targets", bank(targets=[torch.rand(N, 3)] * 3), {}, ValueError,
     r"`targets` must have one entry per granularity: G=2 from `text_features`, got 3"),
    ("g-weights", paired(), {"granularity_weights": [1.0, 1.0, 1.0]}, ValueError,
     r"`granularity_weights` must have one weight per granularity: G=2 .* got 3"),
    ("labels-not-sequence", paired(labels=torch.zeros(N, dtype=torch.long)), {}, TypeError,
     r"`labels` must be a sequence of G=2 tensors, got Tensor"),
    ("texts-a-tensor", paired(text_features=torch.randn(N, D)), {}, TypeError,
     r"`text_features` must be a non-empty sequence of G tensors .* got a tensor of shape \(6, 8\)"),
    # labels / targets: which, dtype, rank, sign, finiteness
    ("both", paired(targets=[torch.eye(N)] * 2), {}, ValueError,
     r"pass exactly one of `labels` .* and `targets` .* got both"),
    ("neither", paired(labels=None), {}, ValueError, r"pass exactly one of .* got neither"),
    ("labels-float", with_entry(paired, "labels", 0, torch.zeros(N)), {}, TypeError,
     r"`labels\[0\]` must be integer ids .* got dtype torch.float32 with shape \(6,\); pass float "
     r".* as `targets`"),
    ("labels-float-3d", with_entry(paired, "labels", 1, torch.zeros(N, 2, 2)), {}, TypeError,
     r"`labels\[1\]` must be integer ids .* got dtype torch.float32 with shape \(6, 2, 2\)"),
    ("labels-soft-above-one", with_entry(paired, "labels", 1, torch.full((N, 2), 1.5)), {},
     ValueError, r"`labels\[1\]` multi-hot entries must be label probabilities in \[0, 1\], got "
     r"1.5 at index \(0, 0\)"),
    ("labels-soft-negative", with_entry(paired, "labels", 1, -torch.ones(N, 2)), {}, ValueError,
     r"`labels\[1\]` multi-hot entries must be label probabilities in \[0, 1\], got -1.0"),
    # NaN labels are "not annotated" (docs/partial_annotation.rst); inf stays an error
    ("labels-soft-inf", with_entry(paired, "labels", 1, nan_at(torch.zeros(N, 3), float("inf"))),
     {}, ValueError, r"`labels\[1\]` must be finite or NaN \(NaN = unknown.*got inf"),
    ("overlap-unknown", paired(), {"overlap": "dice"}, ValueError,
     r"`overlap` must be one of \('any', 'count', 'jaccard'\) \(or a sequence of them, one per "
     r"granularity\), got 'dice'"),
    ("overlap-entry", paired(), {"overlap": ["any", "dice"]}, ValueError,
     r"`overlap\[1\]` must be one of \('any', 'count', 'jaccard'\), got 'dice'"),
    ("overlap-type", paired(), {"overlap": 3}, TypeError,
     r"`overlap` must be one of .* or a non-empty sequence of them, one per granularity, got 3"),
    ("overlap-length", paired(), {"overlap": ("any", "count", "jaccard")}, ValueError,
     r"`overlap` must have one rule per granularity: G=2 from `text_features`, got 3"),
    ("labels-rank", with_entry(paired, "labels", 1, torch.zeros(N, 2, 2, dtype=torch.long)), {},
     ValueError, r"`labels\[1\]` must have shape \(N,\) or \(N, C_g\) with N=6, got \(6, 2, 2\)"),
    ("labels-negative", with_entry(paired, "labels", 0, torch.tensor([0, 1, -2, 2, 0, 1])), {},
     ValueError, r"`labels\[0\]` ids must be non-negative, or -1 for a sample without an "
     r"annotation at this granularity, got min -2"),
    ("multi-hot-negative", with_entry(paired, "labels", 1, -torch.ones(N, 2, dtype=torch.long)),
     {}, ValueError, r"`labels\[1\]` multi-hot entries must be non-negative, got min -1"),
    ("multi-hot-counts", with_entry(paired, "labels", 1, 2 * torch.ones(N, 2, dtype=torch.long)),
     {}, ValueError, r"`labels\[1\]` multi-hot entries must be 0 or 1, got max 2"),
    ("targets-negative", with_entry(bank, "targets", 1, -torch.rand(N, 4) - 0.5), {}, ValueError,
     r"`targets\[1\]` must be non-negative, got min -1\.\d+"),
    ("targets-int-negative", with_entry(bank, "targets", 0, -torch.ones(N, 3, dtype=torch.long)),
     {}, ValueError, r"`targets\[0\]` must be non-negative, got min -1"),
    ("targets-inf", with_entry(bank, "targets", 1, nan_at(torch.rand(N, 4), math.inf)), {},
     ValueError, r"`targets\[1\]` must be finite or NaN \(NaN = unknown.*got inf at index \(1, 2\)"),
    ("targets-complex", with_entry(bank, "targets", 0, torch.ones(N, 3, dtype=torch.cfloat)), {},
     TypeError, r"`targets\[0\]` must be real, got torch.complex64"),
    # features: dtype, finiteness, zero norms
    ("image-int", paired(image_features=torch.ones(N, D, dtype=torch.long)), {}, TypeError,
     r"`image_features` must be a floating-point tensor, got torch.int64"),
    ("text-int", paired(text_features=[torch.randn(N, D), torch.ones(N, D, dtype=torch.int32)]),
     {}, TypeError, r"`text_features\[1\]` must be a floating-point tensor, got torch.int32"),
    ("image-not-tensor", paired(image_features=[[0.0] * D] * N), {}, TypeError,
     r"`image_features` must be a torch.Tensor, got list"),
    ("image-rank", paired(image_features=torch.randn(N, 1, D)), {}, ValueError,
     r"`image_features` must be 2-D \(rows, D\), got shape \(6, 1, 8\)"),
    ("dtype-mix", paired(text_features=[torch.randn(N, D).double(), torch.randn(N, D)]), {},
     TypeError, r"`text_features\[0\]` must have the dtype of `image_features` \(torch.float32\)"),
    ("image-nan", paired(image_features=nan_at(torch.randn(N, D))), {}, ValueError,
     r"`image_features` must be finite \(no NaN or inf\), got nan at index \(1, 2\)"),
    ("text-inf", paired(text_features=[torch.randn(N, D), nan_at(torch.randn(N, D), -math.inf)]),
     {}, ValueError, r"`text_features\[1\]` must be finite \(no NaN or inf\), got -inf at"),
    ("image-nan-unnormalized", paired(image_features=nan_at(torch.randn(N, D))),
     {"normalize": False}, ValueError, r"`image_features` must be finite"),
    ("image-zero-row", paired(image_features=torch.randn(N, D).index_fill(0, torch.tensor([3]), 0)),
     {}, ValueError, r"`image_features` row 3 has zero L2 norm .* `normalize=True`"),
    ("text-zero-row-bank", with_entry(bank, "text_features", 1, torch.zeros(4, D)), {},
     ValueError, r"`text_features\[1\]` row 0 has zero L2 norm"),
    ("image-zero-row-half", paired(
        image_features=torch.zeros(N, D, dtype=torch.half),
        text_features=[torch.randn(N, D).half()] * 2), {}, ValueError,
     r"`image_features` row 0 has zero L2 norm"),
    ("image-norm-overflow", paired(image_features=torch.full((N, D), 1e30)), {}, ValueError,
     r"`image_features` row 0 has finite entries but an L2 norm that overflows torch.float32"),
    # logit scale and bias
    ("scale-float", paired(logit_scale=10.0), {}, TypeError,
     r"`logit_scale` must be a scalar tensor, got the Python float 10.0; pass `torch.tensor\(10.0\)`"),
    ("scale-shape", paired(logit_scale=torch.ones(2)), {}, ValueError,
     r"`logit_scale` must be a scalar tensor \(one element\), got shape \(2,\)"),
    ("scale-int", paired(logit_scale=torch.tensor(10)), {}, TypeError,
     r"`logit_scale` must be a floating-point tensor, got torch.int64"),
    ("scale-zero", paired(logit_scale=torch.tensor(0.0)), {}, ValueError,
     r"`logit_scale` must be positive \(already exponentiated, open_clip convention\), got 0.0"),
    ("scale-negative", paired(logit_scale=torch.tensor([-2.0])), {}, ValueError,
     r"`logit_scale` must be positive .* got -2.0"),
    ("scale-nan", paired(logit_scale=torch.tensor(math.nan)), {}, ValueError,
     r"`logit_scale` must be finite, got nan"),
    ("scale-inf", paired(logit_scale=torch.tensor(math.inf)), {}, ValueError,
     r"`logit_scale` must be finite, got inf"),
    ("bias-shape", paired(logit_bias=torch.zeros(1, 2)), {}, ValueError,
     r"`logit_bias` must be a scalar tensor \(one element\), got shape \(1, 2\)"),
    ("bias-nan", paired(logit_bias=torch.tensor(math.nan)), {}, ValueError,
     r"`logit_bias` must be finite, got nan"),
    # empty batches
    ("empty-batch", paired(image_features=torch.randn(0, D)), {}, ValueError,
     r"`image_features` is an empty batch \(N=0\)"),
    ("empty-bank", with_entry(bank, "text_features", 0, torch.randn(0, D)), {}, ValueError,
     r"`text_features\[0\]` is empty \(K_0=0\)"),
    ("no-granularity", paired(text_features=[]), {}, TypeError,
     r"`text_features` must be a non-empty sequence of G tensors"),
    # unknown option values
    ("pointwise-target", paired(), {"pointwise_target": "hard"}, ValueError,
     r"`pointwise_target` must be one of \('binary', 'soft', 'graded'\), got 'hard'"),
    ("pointwise-norm", paired(), {"pointwise_norm": "batch"}, ValueError,
     r"`pointwise_norm` must be one of \('pairs', 'images'\), got 'batch'"),
    ("kl-support", paired(), {"smooth_kl_support": "classes"}, ValueError,
     r"`smooth_kl_support` must be one of \('samples', 'coarse'\), got 'classes'"),
    ("kl-support-type", paired(), {"smooth_kl_support": ["samples"]}, ValueError,
     r"`smooth_kl_support` must be one of .* got \['samples'\]"),
    ("backend", paired(), {"backend": "cuda"}, ValueError,
     r"`backend` must be one of \('auto', 'reference'.*\), got 'cuda'"),
    ("kl-reference", paired(), {"smooth_kl_support": "coarse", "smooth_kl_reference": 2},
     ValueError, r"`smooth_kl_reference` must be a granularity index in \[0, 1\] or None, got 2"),
    ("kl-reference-bool", paired(), {"smooth_kl_reference": True}, ValueError,
     r"`smooth_kl_reference` must be a granularity index .* got True"),
    ("weight-negative", paired(), {"pointwise_weight": -1.0}, ValueError,
     r"`pointwise_weight` must be finite and non-negative, got -1.0"),
    ("weight-nan", paired(), {"soft_clip_weight": math.nan}, ValueError,
     r"`soft_clip_weight` must be finite and non-negative, got nan"),
    ("weight-type", paired(), {"smooth_kl_weight": "1"}, TypeError,
     r"`smooth_kl_weight` must be a real number, got str"),
    ("granularity-weight", paired(), {"granularity_weights": [1.0, math.inf]}, ValueError,
     r"`granularity_weights\[1\]` must be finite and non-negative, got inf"),
    ("validate-type", paired(), {"validate": "no"}, TypeError,
     r"`validate` must be True or False, got 'no'"),
    # devices (the meta device stands in for a GPU: only metadata is read before the error)
    ("device-text", paired(text_features=[torch.randn(N, D), torch.randn(N, D, device=META)]), {},
     ValueError, r"`text_features\[1\]` is on meta but `image_features` is on cpu"),
    ("device-labels", with_entry(paired, "labels", 0, torch.zeros(N, dtype=torch.long, device=META)),
     {}, ValueError, r"`labels\[0\]` is on meta but `image_features` is on cpu"),
    ("device-targets", with_entry(bank, "targets", 1, torch.rand(N, 4, device=META)), {},
     ValueError, r"`targets\[1\]` is on meta but `image_features` is on cpu"),
    ("device-scale", paired(logit_scale=torch.tensor(10.0, device=META)), {}, ValueError,
     r"`logit_scale` is on meta but `image_features` is on cpu"),
    ("device-bias", paired(logit_bias=torch.tensor(-1.0, device=META)), {}, ValueError,
     r"`logit_bias` is on meta but `image_features` is on cpu"),
]  # fmt: skip


@pytest.fixture
def no_compute(monkeypatch):
    """Fail loudly if any loss computation starts: errors must come before it."""

    def forbidden(*args, **kwargs):
        raise RuntimeError("computation started before the input was validated")

    monkeypatch.setattr(MF, "build_batch", forbidden)


@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize(
    ("args", "options", "error", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_is_rejected_before_compute(api, args, options, error, match, no_compute):
    with pytest.raises(error, match=match):
        call(api, args, options)


@pytest.mark.parametrize("make", [paired, bank], ids=["paired", "bank"])
@pytest.mark.parametrize("api", ["module", "functional"])
def test_valid_input_passes(api, make):
    loss = call(api, make(), {})
    assert torch.isfinite(loss)


def test_module_options_are_checked_once(monkeypatch):
    """MGLLLoss checks its options at construction and uses them as they are on every call."""
    loss_fn = mgll.MGLLLoss(pointwise_weight=2, granularity_weights=[1, 0.5], overlap="any")
    assert loss_fn.config.pointwise_weight == 2.0 and loss_fn.backend == "auto"
    assert loss_fn.config.granularity_weights == (1.0, 0.5)

    def checked_again(self):
        raise AssertionError("the options were checked again on a call")

    args = paired()
    expected = MF.mgll_loss(**args, pointwise_weight=2, granularity_weights=[1, 0.5], overlap="any")
    monkeypatch.setattr(MF.LossOptions, "__post_init__", checked_again)
    torch.testing.assert_close(loss_fn(**args), expected)
    with pytest.raises(AssertionError, match="checked again"):
        MF.mgll_loss(**args)  # the function builds its options on every call


@pytest.mark.parametrize("api", ["module", "functional"])
def test_an_unknown_option_is_named(api):
    where = "MGLLLoss.__init__" if api == "module" else "mgll_loss"
    with pytest.raises(
        TypeError, match=rf"^{where}\(\) got an unexpected keyword argument 'alpha'$"
    ):
        call(api, paired(), {"alpha": 1.0})


def test_the_signatures_spell_out_every_option():
    """help(), the API page and IDEs show every option with its default, in both spellings."""
    import inspect
    from dataclasses import fields

    options = {f.name: f.default for f in fields(MF.LossOptions)}
    for function in (mgll.MGLLLoss, mgll.mgll_loss):
        params = inspect.signature(function).parameters
        assert {k: params[k].default for k in options} == options
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in options)


def test_validate_false_skips_only_the_value_checks():
    args = paired(image_features=nan_at(torch.randn(N, D)))
    loss = call("functional", args, {"validate": False})  # the user's opt-out: no check
    assert torch.isnan(loss)
    loss_fn = mgll.MGLLLoss(validate=False)
    assert "validate=False" in repr(loss_fn)
    with pytest.raises(ValueError, match=r"`text_features\[1\]` must have 8 columns"):
        call("module", paired(text_features=[torch.randn(N, D), torch.randn(N, 5)]),
             {"validate": False})  # fmt: skip


# ----------------------------------------------------------------------------- one-term functions

Z = torch.randn(4, 5)
C = torch.rand(4, 5).round()
TERMS = {
    "soft_clip_loss": lambda z, c, **kw: MF.soft_clip_loss(z, c),
    "pointwise_loss": lambda z, c, **kw: MF.pointwise_loss(z, c, **kw),
}

TERM_CASES = [
    ("logits-list", dict(z=Z.tolist(), c=C), TypeError, r"`logits` must be a torch.Tensor, got list"),
    ("logits-rank", dict(z=Z[0], c=C[0]), ValueError, r"`logits` must be 2-D \(N, K\), got shape \(5,\)"),
    ("shape", dict(z=Z, c=C[:, :3]), ValueError,
     r"`targets` must have the shape of `logits` \(4, 5\), got \(4, 3\)"),
    ("logits-int", dict(z=Z.long(), c=C), TypeError, r"`logits` must be floating point, got torch.int64"),
    ("logits-nan", dict(z=nan_at(Z), c=C), ValueError,
     r"`logits` must be finite \(no NaN or inf\), got nan at index \(1, 2\)"),
    ("targets-negative", dict(z=Z, c=-C - 1), ValueError, r"`targets` must be non-negative, got min -2"),
    ("targets-inf", dict(z=Z, c=nan_at(C, math.inf)), ValueError, r"`targets` must be finite"),
    ("targets-device", dict(z=Z, c=C.to(META)), ValueError,
     r"`targets` is on meta but `logits` is on cpu"),
]  # fmt: skip


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize(
    ("inputs", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in TERM_CASES]
)
def test_term_functions_reject_bad_input(term, inputs, error, match):
    with pytest.raises(error, match=match):
        TERMS[term](inputs["z"], inputs["c"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"pointwise_target": "hard"}, ValueError, r"`pointwise_target` must be one of", id="target"),
        pytest.param({"pointwise_norm": "all"}, ValueError, r"`pointwise_norm` must be one of", id="norm"),
        pytest.param({"logit_bias": torch.zeros(2)}, ValueError,
                     r"`logit_bias` must be a scalar tensor \(one element\), got shape \(2,\)", id="bias-shape"),
        pytest.param({"logit_bias": torch.tensor(math.inf)}, ValueError,
                     r"`logit_bias` must be finite, got inf", id="bias-inf"),
        pytest.param({"logit_bias": 1.0}, TypeError, r"`logit_bias` must be a scalar tensor, got the Python float 1.0; pass `torch.tensor\(1.0\)`",
                     id="bias-float"),
    ],
)  # fmt: skip
def test_pointwise_loss_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        MF.pointwise_loss(Z, C, **kwargs)


SQ = torch.randn(4, 4)
KL_CASES = [
    ("logits-tensor", dict(logits=SQ), TypeError,
     r"`logits` must be a non-empty sequence of G \(N, K_g\) tensors, got a tensor of shape \(4, 4\)"),
    ("logits-empty", dict(logits=[]), TypeError, r"`logits` must be a non-empty sequence"),
    ("logits-int", dict(logits=[SQ, SQ.long()]), TypeError,
     r"`logits\[1\]` must be a floating-point tensor, got torch.int64"),
    ("logits-rank", dict(logits=[SQ, SQ[0]]), ValueError,
     r"`logits\[1\]` must be 2-D \(N, K_1\), got shape \(4,\)"),
    ("logits-n", dict(logits=[SQ, SQ[:3]]), ValueError,
     r"`logits\[1\]` must have shape \(N=4, K_1\), got \(3, 4\)"),
    ("logits-square", dict(logits=[SQ, torch.randn(4, 3)]), ValueError,
     r"`logits\[1\]` must be square \(N, N\) when `owners\[1\]` is None \(paired\), got \(4, 3\)"),
    ("logits-nan", dict(logits=[SQ, nan_at(SQ)]), ValueError, r"`logits\[1\]` must be finite"),
    ("owners-count", dict(logits=[SQ, SQ], owners=[None]), ValueError,
     r"`owners` must have G=2 entries, got 1"),
    ("owners-shape", dict(logits=[SQ, torch.randn(4, 3)], owners=[None, torch.rand(4, 3)]),
     ValueError, r"`owners\[1\]` must have shape \(K_1, N\) = \(3, 4\), got \(4, 3\)"),
    ("owners-negative", dict(logits=[SQ, torch.randn(4, 3)], owners=[None, -torch.rand(3, 4)]),
     ValueError, r"`owners\[1\]` must be non-negative"),
    ("groups-shape", dict(logits=[SQ, SQ], groups=torch.rand(3, 2)), ValueError,
     r"`groups` must have shape \(N, J\) = \(4, any\), got \(3, 2\)"),
    ("groups-nan", dict(logits=[SQ, SQ], groups=nan_at(torch.rand(4, 3))), ValueError,
     r"`groups` must be finite"),
    ("groups-device", dict(logits=[SQ, SQ], groups=torch.rand(4, 3, device=META)), ValueError,
     r"`groups` is on meta but `logits\[0\]` is on cpu"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), [pytest.param(*c[1:], id=c[0]) for c in KL_CASES]
)
def test_smooth_kl_loss_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        MF.smooth_kl_loss(**kwargs)


# ----------------------------------------------------------------------------- the rules themselves


def test_no_assert_statements_in_the_package():
    """``assert`` vanishes under ``python -O``: user input is never checked with it."""
    package = Path(mgll.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assert)
    ]
    assert offenders == []


def test_value_checks_synchronise_once(monkeypatch):
    """All value conditions are read back together: one ``Tensor.__bool__`` on valid input."""
    calls = []
    original = torch.Tensor.__bool__

    def counting(self):
        calls.append(tuple(self.shape))
        return original(self)

    args = paired(logit_bias=torch.tensor(-1.0))
    texts = args["text_features"]
    conditions = mgll._validation.batch_conditions(
        args["image_features"], texts, args["logit_scale"], args["logit_bias"], "paired",
        args["labels"], True,
    )  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    mgll._validation.check_values(conditions)
    assert len(calls) == 1


# Mistakes whose first symptom used to point at the wrong argument (docs/errors.rst).
MISLEADING = [
    ("image-transposed", paired(image_features=torch.randn(D, N)), ValueError,
     r"`image_features` must be \(N, D\) with the D=8 columns of `text_features`, got \(8, 6\), "
     r"which looks transposed: pass `image_features.T`$"),
    ("image-transposed-g1", paired(image_features=torch.randn(D, N), text_features=[torch.randn(N, D)],
     labels=[torch.tensor([0, 0, 1, 1, 2, 3])]), ValueError,
     r"`image_features` must be \(N, D\) .* looks transposed: pass `image_features.T` \(or "
     r"`text_features\[0\].T` if that is the transposed one\)"),
    ("labels-positional", paired(logit_bias=paired()["labels"], labels=None), TypeError,
     r"`logit_bias` must be a scalar tensor or None, got a list of 2: did you pass labels "
     r"positionally\? use labels=\[...\]"),
    ("scale-python-int", paired(logit_scale=100), TypeError,
     r"got the Python int 100; pass `torch.tensor\(100.0\)` \(a learned one"),
    ("bias-python-float", paired(logit_bias=-10.0), TypeError,
     r"`logit_bias` must be a scalar tensor, got the Python float -10.0; pass `torch.tensor\(-10.0\)`$"),
]  # fmt: skip


@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize(
    ("args", "error", "match"), [pytest.param(*case[1:], id=case[0]) for case in MISLEADING]
)
def test_errors_name_the_real_culprit(api, args, error, match, no_compute):
    with pytest.raises(error, match=match):
        call(api, args, {})


def test_a_mismatched_text_width_still_blames_the_text():
    # image (N, D) is fine and one text disagrees: the text is named, not the image.
    args = paired(text_features=[torch.randn(N, D), torch.randn(N, N)])
    with pytest.raises(ValueError, match=r"`text_features\[1\]` must have 8 columns"):
        call("module", args, {})


def test_available_backends_lists_only_what_runs(monkeypatch):
    import importlib.util

    from mgll import backends

    assert mgll.available_backends("cpu")[:4] == ("auto", "reference", "fused", "tiled")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a)
    )
    assert "triton" not in mgll.available_backends("cuda")  # not installed: nowhere
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in mgll.available_backends(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in mgll.available_backends("cpu")  # the interpreter, as the tests use it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "triton" in mgll.available_backends("cuda:0") and "triton" in mgll.available_backends()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "triton" not in mgll.available_backends("cuda")
    with pytest.raises(TypeError, match=r"`device` must be a string .* got int"):
        mgll.available_backends(0)
    assert set(mgll.available_backends("cpu")) <= {"auto", *backends.BACKENDS}
