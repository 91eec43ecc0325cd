"""Host synchronisations per call: counted on CPU, bounded per case (docs/errors.rst).

On a GPU every operation that reads a tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``), or whose output size depends on the data (``torch.unique``, ``nonzero``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``), waits for the device.
The counter below sees each of them on CPU, where they cost nothing, around one forward and
backward; the bounds are what the code does today, so that a new sync fails a test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mgll
from mgll._problem import cooccurrence_from_labels, label_flags, reference_groups
from mgll.targets.cooc import GroupMap, count_labels, sample_groups

#: aten operators that wait for the device: a host read, or an output sized by the data.
_SYNC_OPS = {
    "aten._local_scalar_dense.default",  # .item(), bool(t), float(t), int(t), __index__
    "aten.equal.default",
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
}


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _SYNC_OPS:
            self.seen.append(name)
        elif name.startswith("aten.index.Tensor") and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            self.seen.append("boolean-mask indexing")
        elif name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None:
            self.seen.append(name)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    """What the dispatcher does not see: ``Tensor.tolist`` reads the data directly."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.seen.append("tolist")
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> list[str]:
    seen: list[str] = []
    with _FunctionCounter(seen), _DispatchCounter(seen):
        fn()
    return seen


def test_counter_sees_every_kind_of_sync():
    x = torch.randn(6)
    cases = [
        lambda: bool((x > 0).any()),
        lambda: float(x.sum()),
        lambda: int(x.argmax()),
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: x[x > 0],
        lambda: torch.unique(x),
        lambda: torch.unique(x[None], dim=0),
        lambda: x.nonzero(),
        lambda: x.masked_select(x > 0),
        lambda: x.repeat_interleave(torch.ones(6, dtype=torch.int64)),
        lambda: range(10)[torch.tensor(3)],
    ]
    for case in cases:
        assert len(count_syncs(case)) == 1
    assert count_syncs(lambda: (x * 2).sum() + x[2:4].exp().sum()) == []


N, D = 8, 6


def _labels(kind: str):
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    if kind == "ids":
        return {"labels": [ids, ids % 2]}
    if kind == "ids_unknown":
        return {"labels": [torch.tensor([0, -1, 1, 2, 2, -1, 3, 1]), ids % 2]}
    if kind == "multi_hot":  # declared classes: (N, C_g) 0/1 integers
        multi = (torch.rand(N, 5, generator=gen) < 0.4).to(torch.int64)
        return {"labels": [multi, ids % 3]}
    if kind == "multi_hot_float":
        multi = (torch.rand(N, 5, generator=gen) < 0.4).to(torch.float32)
        return {"labels": [multi, ids % 3]}
    if kind == "multi_hot_nan":
        multi = (torch.rand(N, 5, generator=gen) < 0.4).to(torch.float32)
        multi[1, 2] = multi[4] = math.nan
        return {"labels": [multi, ids % 3]}
    if kind == "bank":
        c0 = (torch.rand(N, 5, generator=gen) < 0.4).float()
        c0[:, 0] = 1.0
        c1 = torch.rand(N, 3, generator=gen)
        return {"targets": [c0, c1]}
    if kind == "bank_nan":
        c0 = (torch.rand(N, 5, generator=gen) < 0.4).float()
        c0[:, 0] = 1.0
        c0[2, 3] = math.nan
        c1 = torch.rand(N, 3, generator=gen)
        return {"targets": [c0, c1]}
    raise AssertionError(kind)


def _widths(kind: str) -> list[int]:
    return [5, 3] if kind.startswith("bank") else [N, N]


def run_case(kind: str, backend: str, validate: bool) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(N, D, generator=gen, requires_grad=True)
    texts = [torch.randn(k, D, generator=gen, requires_grad=True) for k in _widths(kind)]
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = mgll.MGLLLoss(backend=backend, validate=validate)
    inputs = _labels(kind)

    def step():
        loss_fn(image, texts, scale, **inputs).backward()

    return count_syncs(step)


KINDS = (
    "ids",
    "ids_unknown",
    "multi_hot",
    "multi_hot_float",
    "multi_hot_nan",
    "bank",
    "bank_nan",
)
BACKENDS = ("reference", "fused", "tiled")

#: The most host synchronisations of one forward + backward with ``validate=False``, per
#: kind of labels, on every CPU backend (before these bounds, 8 to 23 per call; ``fused``
#: reads its log-sum-exp shift, a bound on the logits, with the labels' flags).
#: Paired labels with declared classes (ids, 0/1 multi-hot) need one: every flag and count of
#: the batch is read at once.  Float labels and bank targets still count their distinct label
#: sets one granularity at a time.
BOUNDS = {
    "ids": 1,
    "ids_unknown": 2,
    "multi_hot": 1,
    "multi_hot_float": 4,
    "multi_hot_nan": 4,
    "bank": 6,
    "bank_nan": 6,
}
#: ``validate=True`` reads every value check in one more sync.
VALIDATE = 1


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_host_syncs_are_bounded(kind, backend, validate):
    seen = run_case(kind, backend, validate)
    assert len(seen) <= BOUNDS[kind] + VALIDATE * validate, seen


def test_paired_declared_classes_need_one_sync():
    """The target: ids and 0/1 multi-hot labels, ``validate=False``: one read of the batch."""
    for kind in ("ids", "multi_hot"):
        for backend in BACKENDS:
            assert len(run_case(kind, backend, False)) == 1


if __name__ == "__main__":  # the table in the report: python tests/test_host_syncs.py
    for kind in KINDS:
        for validate in (False, True):
            counts = [len(run_case(kind, b, validate)) for b in BACKENDS]
            print(f"{kind:16} validate={validate!s:5} " + " ".join(f"{c:3}" for c in counts))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8])
@pytest.mark.parametrize("shape", [(1, 1), (9, 3), (40, 7), (33, 62)])
def test_counted_label_sets_are_torch_unique(shape, dtype):
    """The sets counted by sorting integer codes are exactly ``torch.unique(dim=0)``'s."""
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    labels = (torch.rand(*shape, generator=gen) < 0.3).to(dtype)
    labels[0] = 0  # a sample without a label
    pending, stats = count_labels(labels)
    found = stats(torch.stack(pending).tolist())
    sets, inverse, counts = torch.unique(labels, dim=0, return_inverse=True, return_counts=True)
    for got, want in zip(found["sets"], (sets, inverse, counts), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert found["groups"] == (len(sets) - 1, int((labels.to(torch.int64).sum(0) > 0).sum()))


def test_labels_that_are_not_0_1_are_counted_as_before():
    assert count_labels(torch.tensor([[0, 2], [1, 0]]))[1]([2, 1, 2, 0]) == {}
    assert count_labels(torch.rand(4, 3)) is None
    assert count_labels(torch.zeros(4, 63, dtype=torch.bool)) is None


@pytest.mark.parametrize("seed", range(4))
def test_coarsest_groups_match_per_granularity_count(seed):
    """The coarsest S, counted in one read, is the one each granularity's own count picks."""
    gen = torch.Generator().manual_seed(seed)
    labels = [
        torch.randint(0, 3 + seed, (12,), generator=gen),
        (torch.rand(12, 4, generator=gen) < 0.4).to(torch.int64),
        (torch.rand(12, 2, generator=gen) < 0.5).to(torch.bool),
    ]
    rules = ["any"] * len(labels)
    unknown, _, stats, _ = label_flags(labels, rules, check=False, count=True)
    cooc = [cooccurrence_from_labels(x, partial=u) for x, u in zip(labels, unknown, strict=True)]
    plain = [cooccurrence_from_labels(x) for x in labels]
    for c, found in zip(cooc, stats, strict=True):
        c.stats.update(found)

    def key(g):  # each granularity's S and its own count of distinct non-zero rows
        s = sample_groups(plain[g])
        if isinstance(s, GroupMap):
            return (s.num_groups, s.num_groups, g)
        return (len(torch.unique(s[s.sum(1) > 0], dim=0)), s.shape[1], g)

    want = min(range(len(plain)), key=key)
    got, expected = reference_groups(cooc, None), sample_groups(plain[want])
    if isinstance(expected, GroupMap):
        assert isinstance(got, GroupMap) and got.num_groups == expected.num_groups
        assert torch.equal(got.index, expected.index)
    else:
        assert torch.equal(got, expected)
