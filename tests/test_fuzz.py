"""Property tests over random shapes, label structures, scales and dtypes (issue: hardening).

For every registered backend: the loss and its gradients are finite, every term is
non-negative, the smooth KL lies in [0, G log G], the result equals ``reference``'s, and no
input tensor is modified in place.  The number of examples comes from the hypothesis profile in
``tests/conftest.py``: ``ci`` by default, ``HYPOTHESIS_PROFILE=long`` for a longer run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mgll
from backends_under_test import CPU_BACKENDS

BACKENDS = CPU_BACKENDS  # triton takes CPU tensors only in its interpreter
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def examples(backend: str) -> settings:
    """The profile's example count; the Triton interpreter on CPU gets a fifth of it."""
    count = settings.default.max_examples
    return settings(max_examples=max(4, count // 5) if backend == "triton" else count)


@dataclass
class Batch:
    """One random batch: leaf tensors, labels or targets, and loss options."""

    image: torch.Tensor
    texts: list[torch.Tensor]
    scale: torch.Tensor
    bias: torch.Tensor | None
    labels: list[torch.Tensor] | None
    targets: list[torch.Tensor] | None
    options: dict = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        extra = [] if self.bias is None else [self.bias]
        return [self.image, *self.texts, self.scale, *extra, *(self.labels or self.targets)]

    def leaves(self) -> list[torch.Tensor]:
        return [self.image, *self.texts, self.scale] + ([] if self.bias is None else [self.bias])

    def fresh(self) -> Batch:
        """A copy with new leaf tensors (no gradients yet), labels and targets cloned."""
        leaf = lambda x: x.detach().clone().requires_grad_(True)  # noqa: E731
        clone = lambda xs: None if xs is None else [x.clone() for x in xs]  # noqa: E731
        return Batch(leaf(self.image), [leaf(t) for t in self.texts], leaf(self.scale),
                     None if self.bias is None else leaf(self.bias), clone(self.labels),
                     clone(self.targets), dict(self.options))  # fmt: skip


@st.composite
def batches(draw, max_n: int = 12):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(2, 8))
    g_count = draw(st.integers(1, 3))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    bank = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def features(rows: int) -> torch.Tensor:
        # a shared direction makes some cosines close to 1, as in a trained model
        common = torch.randn(1, d, generator=gen) * draw(st.sampled_from([0.0, 1.0, 10.0]))
        return (torch.randn(rows, d, generator=gen) + common).to(dtype)

    labels, targets, texts = [], [], []
    for _ in range(g_count):
        if bank:
            k = draw(st.integers(1, 8))
            density = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
            c = (torch.rand(n, k, generator=gen) < density).to(torch.float32)
            kind = draw(st.sampled_from(["binary", "weighted", "bool", "int"]))
            if kind == "weighted":
                c = c * torch.rand(n, k, generator=gen) * 3
            targets.append(c.bool() if kind == "bool" else c.long() if kind == "int" else c)
            texts.append(features(k))
        else:
            if draw(st.booleans()):  # integer class ids
                classes = draw(st.integers(1, n))
                labels.append(torch.randint(0, classes, (n,), generator=gen))
            else:  # multi-hot label sets, possibly empty rows or no class at all
                c = draw(st.integers(0, 4))
                density = draw(st.sampled_from([0.0, 0.3, 0.7]))
                hot = torch.rand(n, c, generator=gen) < density
                if draw(st.booleans()):  # label probabilities (uncertain labels), else 0/1
                    labels.append(hot * torch.rand(n, c, generator=gen))
                else:
                    labels.append(hot.long())
            texts.append(features(n))
    scale = math.exp(draw(st.floats(math.log(0.5), math.log(100.0))))
    bias = draw(st.one_of(st.none(), st.floats(-15.0, 15.0)))
    options = dict(
        pointwise_target=draw(st.sampled_from(["binary", "soft", "graded"])),
        overlap=draw(st.sampled_from(["any", "count", "jaccard"])),
        pointwise_norm=draw(st.sampled_from(["pairs", "images"])),
        smooth_kl_support=draw(st.sampled_from(["samples", "coarse"])),
        normalize=draw(st.booleans()),
    )
    if not options["normalize"]:  # keep raw logits in the range a trained model produces
        scale = min(scale, 10.0) / d
    return Batch(
        image=features(n).requires_grad_(True),
        texts=[t.requires_grad_(True) for t in texts],
        scale=torch.tensor(scale, requires_grad=True),
        bias=None if bias is None else torch.tensor(bias, requires_grad=True),
        labels=None if bank else labels,
        targets=targets if bank else None,
        options=options,
    )


def run(batch: Batch, backend: str):
    terms = mgll.mgll_loss(batch.image, batch.texts, batch.scale, batch.bias, labels=batch.labels,
                           targets=batch.targets, backend=backend, output_dict=True,
                           **batch.options)  # fmt: skip
    sum(terms.values()).backward()
    return {k: v.detach().double() for k, v in terms.items()}, [x.grad for x in batch.leaves()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_nonnegative_and_bounded(backend):
    @examples(backend)
    @given(batches(max_n=32 if backend == "triton" else 12))
    def check(batch):
        terms, grads = run(batch, backend)
        for name, value in terms.items():
            assert torch.isfinite(value), name
            assert value >= 0, f"{name} = {value.item()}"
        g = len(batch.texts)
        eps = torch.finfo(batch.image.dtype).eps
        assert terms["smooth_kl_loss"] <= g * math.log(g) * (1 + max(1e-5, eps)) + 1e-12
        for grad in grads:
            assert grad is not None and torch.isfinite(grad).all()

    check()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_reference(backend):
    @examples(backend)
    @given(batches(max_n=32 if backend == "triton" else 12))
    def check(batch):
        want_terms, want_grads = run(batch.fresh(), "reference")
        got_terms, got_grads = run(batch.fresh(), backend)
        tol = TOLERANCE[batch.image.dtype]
        for name in want_terms:
            torch.testing.assert_close(got_terms[name], want_terms[name], rtol=tol, atol=tol,
                                       msg=name)  # fmt: skip
        grad_atol = tol * (1 + sum(want_terms.values()).abs().item())  # see test_extreme
        for i, (got, want) in enumerate(zip(got_grads, want_grads, strict=True)):
            atol = grad_atol + tol * want.abs().max().item()  # norm-wise, see test_extreme
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=atol,
                                       msg=f"gradient of leaf {i}")  # fmt: skip

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_modified_in_place(backend):
    @examples(backend)
    @given(batches(max_n=32 if backend == "triton" else 12))
    def check(batch):
        before = [x.detach().clone() for x in batch.tensors()]
        versions = [x._version for x in batch.tensors()]
        run(batch, backend)
        for i, (x, old, version) in enumerate(zip(batch.tensors(), before, versions, strict=True)):
            assert x._version == version, f"input {i} was written in place"
            assert torch.equal(x.detach(), old), f"input {i} changed"

    check()
