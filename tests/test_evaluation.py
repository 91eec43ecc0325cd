"""mgll.evaluation against hand-computed values (scikit-learn only as an optional cross-check)."""

from __future__ import annotations

import math

import pytest
import torch

from mgll.evaluation import (
    caption_marginal_scores,
    linear_probe,
    linear_probe_auroc,
    macro_auroc,
    mean_average_precision,
    ndcg,
    probe,
    relevance,
)


def test_macro_auroc_skips_classes_without_both_values():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.5], [0.4, 0.8, 0.5], [0.1, 0.7, 0.5]])
    truth = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])  # class 2: no negative
    # class 0: positives 0.9, 0.4 vs negatives 0.2, 0.1 -> 1.0; class 1: 0.3, 0.7 vs 0.1, 0.8
    # -> pairs won: (0.3>0.1), (0.7>0.1) = 2 of 4 -> 0.5
    assert macro_auroc(scores, truth) == pytest.approx(0.75)
    assert math.isnan(macro_auroc(scores[:, 2:], truth[:, 2:]))


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.2]])
    relevant = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    # q0: hits at ranks 1, 3 -> (1 + 2/3) / 2; q1: ranking 3, 2, 1, 0 -> hits at 1, 4 ->
    # (1 + 2/4) / 2; q2 has no relevant item and is skipped
    expected = ((1 + 2 / 3) / 2 + (1 + 0.5) / 2) / 2
    assert mean_average_precision(scores, relevant) == pytest.approx(expected)


def test_mean_average_precision_excludes_items_and_breaks_ties_by_item_order():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.2]])
    relevant = torch.tensor([[1, 0, 1, 0]])
    exclude = torch.tensor([[True, False, False, False]])  # the query itself
    # after exclusion: items 1, 2 tie (kept in order 1, 2), so the hit is at rank 2 -> 1/2
    assert mean_average_precision(scores, relevant, exclude) == pytest.approx(0.5)
    assert math.isnan(mean_average_precision(scores, torch.zeros(1, 4)))


def test_ndcg_by_hand_with_cutoff_and_exclusion():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.2, 0.1]])
    gains = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]])  # q1 has no gain: skipped
    dcg = 0.5 + 0.0 / math.log2(3) + 1.0 / 2
    idcg = 1.0 + 0.5 / math.log2(3)
    assert ndcg(scores, gains) == pytest.approx(dcg / idcg)
    assert ndcg(scores, gains, k=1) == pytest.approx(0.5 / 1.0)
    exclude = torch.tensor([[True, False, False], [False, False, False]])
    # left: items 1 (gain 0), 2 (gain 1) -> DCG = 1 / log2(3), IDCG = 1
    assert ndcg(scores, gains, exclude) == pytest.approx(1 / math.log2(3))


def test_ndcg_is_one_for_the_ideal_ranking():
    g = torch.rand(5, 9, generator=torch.Generator().manual_seed(0))
    assert ndcg(g, g) == pytest.approx(1.0)


Q = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
ITEMS = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("superset", [[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]),
        ("exact", [[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]),
        ("any", [[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]),
        ("jaccard", [[1 / 2, 1 / 2, 0, 1], [1, 1 / 3, 1 / 2, 1 / 2], [0, 0, 0, 0]]),
    ],
)
def test_relevance_rules_by_hand(rule, expected):
    torch.testing.assert_close(
        relevance(Q, ITEMS, rule), torch.tensor(expected, dtype=torch.float64)
    )


def test_relevance_old_rule_name_shares_warns_and_gives_any():
    with pytest.warns(DeprecationWarning, match=r"relevance\(rule='shares'\)`.*rule='any'"):
        old = relevance(Q, ITEMS, "shares")
    assert torch.equal(old, relevance(Q, ITEMS, "any"))
    with pytest.raises(ValueError, match=r"`rule` must be one of .*'any'"):
        relevance(Q, ITEMS, "share")


def test_caption_marginal_scores_equal_a_loop():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    names = (torch.rand(7, 3, generator=g) > 0.5).long()
    got = caption_marginal_scores(x, t, names, torch.tensor(3.0))
    for i in range(5):
        cos = [float(torch.cosine_similarity(x[i], t[k], dim=0)) for k in range(7)]
        z = sum(math.exp(3.0 * c) for c in cos)
        for c in range(3):
            want = sum(math.exp(3.0 * cos[k]) / z for k in range(7) if names[k, c])
            assert float(got[i, c]) == pytest.approx(want)


def test_probe_is_invariant_to_a_per_feature_affine_map():
    """Standardised on the probe set: rescaling or shifting a feature changes nothing."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 5, generator=g)
    y = torch.stack([x[:, 0] + 0.5 * torch.randn(80, generator=g) > 0, x[:, 1] > 0.3], dim=1)
    scale, shift = torch.tensor([0.01, 10.0, 1.0, 3.0, 0.2]), torch.randn(5, generator=g)
    a = linear_probe(x, y, x[:20], folds=4)
    b = linear_probe(x * scale + shift, y, x[:20] * scale + shift, folds=4)
    assert a["l2"] == b["l2"]
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)


def test_probe_picks_the_best_cross_validated_l2():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 6, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 2] - x[:, 3] > 0], dim=1)
    fit = linear_probe(x, y, x, l2_grid=[1e-4, 1e-2, 1.0], folds=3)
    assert set(fit["cv_auroc"]) == {1e-4, 1e-2, 1.0}
    assert fit["cv_auroc"][fit["l2"]] == max(fit["cv_auroc"].values())
    assert macro_auroc(fit["scores"], y) > 0.95


def test_fit_is_the_minimiser_of_the_stated_objective():
    """Zero gradient of (1/n) sum BCE + lambda |w|^2 at the returned weights (KKT)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(50, 2, generator=g) > 0.5).double()
    w, b = probe._fit(z, y, (0.05,), max_iter=200)
    w, b = w[0].requires_grad_(), b[0].requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum")
    (loss / 50 + 0.05 * w.pow(2).sum()).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5


def test_fit_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = (z[:, 0] + torch.randn(40, generator=g, dtype=torch.float64) > 0).double()[:, None]
    lam = 0.02
    w, b = probe._fit(z, y, (lam,), max_iter=300)
    ref = linear_model.LogisticRegression(C=1 / (2 * 40 * lam), tol=1e-10, max_iter=10000)
    ref.fit(z.numpy(), y[:, 0].numpy())
    torch.testing.assert_close(w[0, :, 0], torch.from_numpy(ref.coef_[0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        b[0, 0].reshape(1), torch.from_numpy(ref.intercept_), rtol=1e-4, atol=1e-5
    )


def test_probe_fraction_uses_a_seeded_subset():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(100, 3, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0], dim=1)
    full = linear_probe_auroc(x[:60], y[:60], x[60:], y[60:])
    direct = macro_auroc(linear_probe(x[:60], y[:60], x[60:])["scores"], y[60:])
    assert full == pytest.approx(direct)
    small = linear_probe_auroc(x[:60], y[:60], x[60:], y[60:], fraction=0.1)
    subset = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:6]
    by_hand = macro_auroc(linear_probe(x[subset], y[subset], x[60:])["scores"], y[60:])
    assert small == pytest.approx(by_hand)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: relevance(Q, ITEMS, "overlap"), "rule"),
        (lambda: relevance(Q, ITEMS[:, :2], "exact"), "same C"),
        (lambda: relevance(Q * 2, ITEMS, "exact"), "0/1"),
        (lambda: mean_average_precision(torch.zeros(2, 3), torch.zeros(3, 2)), "one"),
        (lambda: ndcg(torch.zeros(1, 2), -torch.ones(1, 2)), "non-negative"),
        (lambda: ndcg(torch.zeros(1, 2), torch.ones(1, 2), k=0), "`k`"),
        (lambda: linear_probe(torch.zeros(5, 2), torch.zeros(4, 1), torch.zeros(1, 2)), "same n"),
        (lambda: linear_probe(torch.zeros(5, 2), torch.zeros(5, 1), torch.zeros(1, 3)), "D=2"),
        (
            lambda: linear_probe(torch.zeros(5, 2), torch.zeros(5, 1), torch.zeros(1, 2), folds=1),
            "folds",
        ),
        (
            lambda: linear_probe(
                torch.zeros(5, 2), torch.zeros(5, 1), torch.zeros(1, 2), l2_grid=[]
            ),
            "l2_grid",
        ),
        (
            lambda: linear_probe_auroc(
                torch.zeros(5, 2),
                torch.zeros(5, 1),
                torch.zeros(1, 2),
                torch.zeros(1, 1),
                fraction=0,
            ),
            "fraction",
        ),
        (
            lambda: caption_marginal_scores(
                torch.zeros(2, 3), torch.ones(4, 3), torch.ones(4, 2), 0.0
            ),
            "logit_scale",
        ),
        (
            lambda: caption_marginal_scores(
                torch.zeros(2, 3), torch.ones(4, 2), torch.ones(4, 2), 1.0
            ),
            "agree",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_ridge_fit_is_the_closed_form_minimiser():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(30, 4, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)
    y = (torch.rand(30, 2, generator=g) > 0.5).double()
    w, b = probe._fit_ridge(z, y, (0.1, 1.0), max_iter=0)
    for j, lam in enumerate((0.1, 1.0)):
        ww = w[j].clone().requires_grad_()
        bb = b[j].clone().requires_grad_()
        loss = ((z @ ww + bb - y) ** 2).sum() / 30 + lam * ww.pow(2).sum()
        loss.backward()
        assert ww.grad.abs().max() < 1e-10 and bb.grad.abs().max() < 1e-10


def test_ridge_probe_ranks_like_the_logistic_one_on_easy_data():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 4, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] - x[:, 3] > 0.2], dim=1)
    ridge = linear_probe_auroc(x[:80], y[:80], x[80:], y[80:], solver="ridge")
    logistic = linear_probe_auroc(x[:80], y[:80], x[80:], y[80:])
    assert ridge > 0.95 and logistic > 0.95
    with pytest.raises(ValueError, match="solver"):
        linear_probe(x, y, x, solver="svm")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("metric", "arg"),
    [
        (lambda s, g: mean_average_precision(s, g), "scores"),
        (lambda s, g: ndcg(s, g), "scores"),
        (lambda s, g: macro_auroc(s, g), "scores"),
        (lambda s, g: mean_average_precision(g, s.abs()), "relevant"),
        (lambda s, g: ndcg(g, s.abs()), "gains"),
    ],
    ids=["map", "ndcg", "auroc", "map-relevant", "ndcg-gains"],
)
def test_every_metric_rejects_non_finite_scores(metric, arg, bad):
    scores = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    scores[1, 2] = bad
    truth = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=rf"`{arg}` must be finite .* at index \(1, 2\)"):
        metric(scores, truth)


def test_retrieval_ignores_non_finite_scores_it_excludes():
    scores = torch.tensor([[INF, 0.9, 0.1]])  # the query itself, excluded
    exclude = torch.tensor([[True, False, False]])
    assert mean_average_precision(scores, torch.tensor([[1, 1, 0]]), exclude) == 1.0


@pytest.mark.parametrize("where", ["train_features", "test_features"])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("solver", ["logistic", "ridge"])
def test_probe_rejects_non_finite_features(where, bad, solver):
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, :1] > 0).float()
    xt = x[:4].clone()
    (x if where == "train_features" else xt)[2, 1] = bad
    with pytest.raises(ValueError, match=rf"`{where}` must be finite .* at index \(2, 1\)"):
        linear_probe(x, y, xt, folds=2, solver=solver)


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("image_features", r"`image_features` must be finite"),
        ("caption_features", r"`caption_features` must be finite"),
        ("caption_labels", r"`caption_labels` must be finite"),
        ("negative", r"`caption_labels` must be non-negative .* -1\.0"),
    ],
)
def test_caption_marginal_scores_never_return_nan_or_negative_scores(where, match):
    images, captions = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    names = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    if where == "negative":
        names[2, 0] = -1.0
    else:
        {"image_features": images, "caption_features": captions, "caption_labels": names}[where][
            1, 0
        ] = NAN
    with pytest.raises(ValueError, match=match):
        caption_marginal_scores(images, captions, names, logit_scale=1.0)
