"""ZeroShotClassifier prototypes and scores, and the torch AUROC against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mgll import Granularity, ZeroShotClassifier
from mgll.evaluation import multilabel_auroc

F64 = torch.float64


def table_encoder(dim: int = 6):
    """A toy text tower: a fixed random row per string, recording its calls."""
    table: dict[str, torch.Tensor] = {}
    calls: list[list[str]] = []

    def encode(strings):
        calls.append(list(strings))
        for s in strings:
            table.setdefault(s, torch.randn(dim, dtype=F64) * (1 + len(table)))
        return torch.stack([table[s] for s in strings])

    return encode, table, calls


# ---------------------------------------------------------------- AUROC


def _pairwise_auroc(s: torch.Tensor, y: torch.Tensor) -> float:
    """Naive: the fraction of (positive, negative) pairs ranked correctly, ties one half."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed():
    # no ties: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs correct
    got = multilabel_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert got.item() == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    got = multilabel_auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1]))
    assert got.item() == pytest.approx(0.875)
    # all tied: 0.5; perfectly reversed: 0
    scores = torch.tensor([[0.3, 0.9], [0.3, 0.1], [0.3, 0.5]])
    truth = torch.tensor([[1, 0], [0, 1], [1, 0]])
    assert multilabel_auroc(scores, truth).tolist() == pytest.approx([0.5, 0.0])


def test_auroc_single_valued_class_is_nan_and_skipped_by_evaluate():
    scores = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.3, 0.6], [0.5, 0.8, 0.1]])
    truth = torch.tensor(
        [[1, 0, 1], [0, 0, 1], [1, 0, 1]]
    )  # class 1: no positive, class 2: no negative
    got = multilabel_auroc(scores, truth)
    assert got[0].item() == 1.0 and math.isnan(got[1].item()) and math.isnan(got[2].item())


@given(st.integers(2, 30), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_auroc_against_pairwise_counting(m, c, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.rand(m, c, generator=gen) * 4).round() / 4  # many ties
    truth = torch.rand(m, c, generator=gen) < 0.5
    got = multilabel_auroc(scores, truth)
    for j in range(c):
        y = truth[:, j]
        if y.all() or not y.any():
            assert math.isnan(got[j].item())
        else:
            assert got[j].item() == pytest.approx(_pairwise_auroc(scores[:, j], y.long()))


def test_auroc_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    scores = (torch.rand(200, 5) * 10).round()
    truth = torch.rand(200, 5) < torch.linspace(0.1, 0.6, 5)
    got = multilabel_auroc(scores, truth)
    for j in range(5):
        want = metrics.roc_auc_score(truth[:, j].numpy(), scores[:, j].numpy())
        assert got[j].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "truth", "error", "match"),
    [
        ([0.1], torch.tensor([1]), TypeError, r"`scores` must be a torch.Tensor, got list"),
        (
            torch.rand(3, 2),
            torch.ones(3),
            ValueError,
            r"one shape, \(M, C\) or \(M,\) .* got \(3, 2\) and \(3,\)",
        ),
        (
            torch.tensor([0.1, float("nan")]),
            torch.tensor([0, 1]),
            ValueError,
            r"`scores` must be finite \(no NaN or infinite values\)",
        ),
        (
            torch.rand(2),
            torch.tensor([0, 2]),
            ValueError,
            r"`targets` must be 0/1, got values \[0.0, 2.0\]",
        ),
    ],
)
def test_auroc_bad_input(scores, truth, error, match):
    with pytest.raises(error, match=match):
        multilabel_auroc(scores, truth)


# ---------------------------------------------------------------- prototypes and scores


def test_prototypes_are_renormalised_means_of_normalised_prompts():
    encode, table, calls = table_encoder()
    dx = Granularity("dx", "fundus with {}", {"DR": ["microaneurysms", "haemorrhages"]})
    clf = ZeroShotClassifier.from_prompts(
        encode, ["DR", "AMD"], templates=["a photo of {}", "{}"], granularities=[dx]
    )
    prompts = {
        "DR": ["a photo of DR", "DR", "fundus with microaneurysms", "fundus with haemorrhages"],
        "AMD": ["a photo of AMD", "AMD", "fundus with AMD"],
    }
    assert len(calls) == 1 and sorted(calls[0]) == sorted(p for ps in prompts.values() for p in ps)
    for j, c in enumerate(["DR", "AMD"]):
        mean = torch.stack([F.normalize(table[p], dim=0) for p in prompts[c]]).mean(0)
        torch.testing.assert_close(clf.prototypes[j], F.normalize(mean, dim=0).float())
    assert clf.classes == ("DR", "AMD")


def test_explicit_prompt_mapping_and_shared_prompts_encoded_once():
    encode, table, calls = table_encoder()
    clf = ZeroShotClassifier.from_prompts(
        encode, {"odd": ["digits 1", "digits 3"], "three": ["digits 3"]}
    )
    assert calls == [["digits 1", "digits 3"]]
    torch.testing.assert_close(clf.prototypes[1], F.normalize(table["digits 3"], dim=0).float())


def test_sigmoid_and_softmax_scores():
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    images = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    cos = F.normalize(images, dim=1) @ F.normalize(protos, dim=1).T
    sig = ZeroShotClassifier(
        protos, ["a", "b", "c"], logit_scale=torch.tensor(10.0), logit_bias=-5.0
    )
    torch.testing.assert_close(sig(images), torch.sigmoid(10 * cos - 5))
    soft = ZeroShotClassifier(protos, logit_scale=10.0, activation="softmax")
    torch.testing.assert_close(soft(images), torch.softmax(10 * cos, dim=1))
    torch.testing.assert_close(soft(images).sum(1), torch.ones(2))
    assert soft.classes == (0, 1, 2)
    assert "activation='softmax'" in repr(soft)


def test_evaluate_recovers_separable_classes():
    protos = torch.eye(4, 8)
    truth = torch.rand(64, 4) < 0.4
    truth[:, 3] = False  # a class without positives: NaN, excluded from the macro
    images = truth.float() @ protos + 0.05 * torch.randn(64, 8)
    images[:, 5] += 1.0  # images without any label still have a direction
    clf = ZeroShotClassifier(protos, ["a", "b", "c", "d"], logit_scale=20.0, logit_bias=-10.0)
    out = clf.evaluate(images, truth)
    assert out["per_class"][:3].tolist() == [1.0, 1.0, 1.0]
    assert math.isnan(out["per_class"][3].item())
    assert out["macro"] == 1.0 and out["classes"] == ("a", "b", "c", "d")


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            (torch.ones(2, 3, dtype=torch.long),),
            {},
            TypeError,
            r"`prototypes` must be a floating-point \(C, D\) tensor, got torch.int64",
        ),
        (
            (torch.ones(3),),
            {},
            ValueError,
            r"`prototypes` must be 2-D \(C, D\) with C >= 1, got \(3,\)",
        ),
        (
            (torch.ones(2, 3), ["a"]),
            {},
            ValueError,
            r"`classes` must name the C=2 prototypes, got 1",
        ),
        (
            (torch.ones(2, 3),),
            dict(activation="relu"),
            ValueError,
            r"`activation` must be one of \('sigmoid', 'softmax'\)",
        ),
        ((torch.ones(2, 3),), dict(logit_scale=0.0), ValueError, r"`logit_scale` must be positive"),
        (
            (torch.ones(2, 3),),
            dict(logit_bias=torch.ones(2)),
            ValueError,
            r"`logit_bias` must be a scalar, got shape \(2,\)",
        ),
        (
            (torch.ones(2, 3),),
            dict(logit_scale="10"),
            TypeError,
            r"`logit_scale` must be a number or a scalar tensor, got str",
        ),
    ],
)
def test_classifier_bad_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ZeroShotClassifier(*args, **kwargs)


def test_classifier_bad_images_and_prompts():
    clf = ZeroShotClassifier(torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r"`image_features` must have shape \(M, D=3\) .* got \(4, 5\)"
    ):
        clf(torch.ones(4, 5))
    with pytest.raises(
        TypeError,
        match=r"`image_features` must be a floating-point \(M, D\) tensor, got torch.int64",
    ):
        clf(torch.ones(4, 3, dtype=torch.long))
    encode, _, _ = table_encoder()
    with pytest.raises(
        ValueError, match=r"`templates` entries must be strings with one '\{\}', got 'photo'"
    ):
        ZeroShotClassifier.from_prompts(encode, ["a"], templates=["photo"])
    with pytest.raises(
        TypeError, match=r"`classes\['a'\]` must be a non-empty list of prompt strings"
    ):
        ZeroShotClassifier.from_prompts(encode, {"a": []})
    with pytest.raises(ValueError, match=r"`classes` is empty"):
        ZeroShotClassifier.from_prompts(encode, [])
    with pytest.raises(ValueError, match=r"`classes` must be distinct, got repeated 'a'"):
        ZeroShotClassifier.from_prompts(encode, ["a", "b", "a"])
