"""Unit tests of the digits demo: data composition, texts, metrics, losses and the report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import mgll
from mgll.evaluation import mean_average_precision
from mgll_demo import report
from mgll_demo.__main__ import main, parse_args
from mgll_demo.data import (
    CANVAS_SIZE,
    DIGIT_SIZE,
    GRANULARITIES,
    PARITY_ANCESTORS,
    Canvases,
    compose,
    parity_text,
    split_sources,
    summary_text,
)
from mgll_demo.evaluation import METRICS, caption_bank
from mgll_demo.tasks import fine_labels, make_merged_task, make_task
from mgll_demo.texts import class_prompts
from mgll_demo.towers import DualEncoder, Vocabulary, tokenize
from mgll_demo.training import (
    ABLATION,
    COMPARISON,
    EXTRA,
    FAIR,
    MERGED,
    PARTIAL,
    PARTIAL_CONTRASTS,
    Method,
    _pools,
    _shares,
    batch_labels,
    clip_loss,
)


def fake_digits(per_class: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Digit c, copy j is a constant image of value (10 c + j + 1) / 100: identifiable."""
    labels = np.repeat(np.arange(10), per_class)
    values = (10 * labels + np.tile(np.arange(per_class), 10) + 1) / 100.0
    images = np.broadcast_to(values[:, None, None], (len(labels), DIGIT_SIZE, DIGIT_SIZE))
    return images.astype(np.float32), labels


@pytest.fixture(scope="module")
def task(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MGLL_DEMO_CACHE", str(tmp_path_factory.mktemp("cache")))
    return make_task(n_train=300, n_test=120, n_probe=80, seed=3)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_split_is_disjoint_stratified_and_complete():
    _, labels = fake_digits(per_class=10)
    train, test = split_sources(labels, test_fraction=0.2, seed=0)
    assert set(train).isdisjoint(test)
    assert sorted([*train, *test]) == list(range(len(labels)))
    assert np.bincount(labels[test]).tolist() == [2] * 10


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        split_sources(np.arange(10), test_fraction=1.0)


def test_compose_places_each_source_digit_in_its_quadrant():
    digits, labels = fake_digits()
    pool = np.arange(len(labels))
    c = compose(digits, labels, pool, 200, np.random.default_rng(0))
    assert c.images.shape == (200, 1, CANVAS_SIZE, CANVAS_SIZE)
    counts = (c.sources >= 0).sum(1)
    assert counts.min() == 1 and counts.max() == 4
    assert set(counts.tolist()) == {1, 2, 3, 4}
    assert torch.equal(c.multi_hot.sum(1), counts)  # distinct classes per canvas
    for i in range(200):
        present = {int(labels[s]) for s in c.sources[i] if s >= 0}
        assert present == set(torch.nonzero(c.multi_hot[i]).flatten().tolist())
        for q in range(4):
            r, col = divmod(q, 2)
            block = c.images[
                i,
                0,
                r * DIGIT_SIZE : (r + 1) * DIGIT_SIZE,
                col * DIGIT_SIZE : (col + 1) * DIGIT_SIZE,
            ]
            src = int(c.sources[i, q])
            expected = 0.0 if src < 0 else float(digits[src, 0, 0])
            assert torch.allclose(block, torch.full_like(block, expected))


def test_compose_draws_only_from_the_pool():
    digits, labels = fake_digits()
    pool = np.flatnonzero(np.arange(len(labels)) % 6 < 3)  # copies 0-2 of every class
    c = compose(digits, labels, pool, 100, np.random.default_rng(1))
    used = set(c.sources[c.sources >= 0].tolist())
    assert used <= set(pool.tolist())


def test_compose_needs_every_class_in_the_pool():
    digits, labels = fake_digits()
    with pytest.raises(ValueError, match="every class"):
        compose(digits, labels, np.flatnonzero(labels < 9), 5, np.random.default_rng(0))


def test_task_train_and_test_share_no_source_digit(task):
    train = set(task.train.sources[task.train.sources >= 0].tolist())
    probe = set(task.probe.sources[task.probe.sources >= 0].tolist())
    test = set(task.test.sources[task.test.sources >= 0].tolist())
    assert train.isdisjoint(test)
    assert probe.isdisjoint(test)
    assert len(task.train) == 300 and len(task.test) == 120 and len(task.probe) == 80


def test_task_is_reproducible(task):
    again = make_task(n_train=300, n_test=120, n_probe=80, seed=3)
    assert torch.equal(again.train.images, task.train.images)
    assert again.train.texts == task.train.texts


@pytest.mark.parametrize(
    ("labels", "text"),
    [
        ((3,), "one digit, odd"),
        ((4,), "one digit, even"),
        ((1, 3), "two digits, all odd"),
        ((0, 2, 8), "three digits, all even"),
        ((1, 2, 3, 4), "four digits, odd and even"),
    ],
)
def test_summary_text(labels, text):
    assert summary_text(labels) == text


def test_texts_and_labels_per_granularity(task):
    c = task.train
    sets = c.label_sets()
    for i in range(20):
        digits = " and ".join(str(d) for d in sets[i]).replace(" and ", ", ", len(sets[i]) - 2)
        assert c.texts["digits"][i] == f"digits {digits}"
        assert c.texts["summary"][i] == summary_text(sets[i])
        assert c.texts["description"][i].startswith("a picture of ")
    assert torch.equal(c.labels["digits"], c.multi_hot)
    assert torch.equal(c.labels["description"], c.multi_hot)
    summary = c.labels["summary"]
    assert summary.dtype == torch.long and summary.shape == (len(c),)
    same = summary[:, None] == summary[None, :]
    text_same = torch.tensor([[a == b for b in c.texts["summary"]] for a in c.texts["summary"]])
    assert torch.equal(same, text_same)


@pytest.mark.parametrize(
    "trained", [GRANULARITIES, ("digits",), ("digits", "summary"), ("digits", "description")]
)
def test_zero_shot_prompts_use_only_trained_words(task, trained):
    """docs/demo.rst: a prompt word the text tower never saw would get an untrained embedding."""
    seen = {w for g in trained for t in task.train.texts[g] for w in tokenize(t)}
    prompts = class_prompts(trained)
    for c in range(10):
        assert ("digits " + str(c) in prompts[c]) == ("digits" in trained)
        assert len(prompts[c]) == ("digits" in trained) + 3 * ("description" in trained)
        for p in prompts[c]:
            assert set(tokenize(p)) <= seen, p


def test_zero_shot_needs_a_digit_granularity():
    with pytest.raises(ValueError, match="digits"):
        class_prompts(("summary",))


def test_set_ids_identify_digit_sets():
    mh = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    c = Canvases(torch.zeros(3, 1, 2, 2), mh, torch.zeros(3, 4, dtype=torch.long))
    assert c.set_ids().tolist() == [5, 5, 2]


def test_vocabulary_maps_unknown_words_to_zero():
    vocab = Vocabulary(["digits 3 and 7", "a picture of three"])
    ids, offsets = vocab.encode(["digits 3", "digits 9"])
    assert offsets.tolist() == [0, 2]
    assert ids[3] == 0 and (ids[:3] > 0).all()


def test_clip_loss_is_soft_clip_with_identity_targets():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    t = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(7.0)
    expected = mgll.functional.soft_clip_loss(scale * x @ t.T, torch.eye(6))
    torch.testing.assert_close(clip_loss(x, t, scale), expected)


@pytest.fixture(scope="module")
def merged(task):
    return make_merged_task(0.2, n_train=300, n_test=120, n_probe=80, seed=3)


@pytest.mark.parametrize(
    "method",
    [*COMPARISON, *ABLATION, *EXTRA, *FAIR, *MERGED, *PARTIAL],
    ids=lambda m: m.name,
)
def test_every_method_gives_a_finite_differentiable_loss(task, merged, method: Method):
    torch.manual_seed(0)
    merged_only = {"mixed", "fine"} & set(method.granularities) or method.subset == "fine"
    data = merged if merged_only else task
    vocab = Vocabulary(t for texts in data.train.texts.values() for t in texts)
    model = DualEncoder(vocab, bias_init=method.bias_init)
    idx = torch.cat(_pools(data, method))[:32]
    image = model.encode_image(data.train.images[idx])
    key = {"digits_exact": "digits"}
    texts = [
        model.encode_text([data.train.texts[key.get(g, g)][i] for i in idx.tolist()])
        for g in method.granularities
    ]
    labels = batch_labels(method, data.train, idx)
    parts = method.build_loss()(image, texts, model.scale(), model.logit_bias, labels)
    loss = sum(parts.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert model.image.head.weight.grad is not None


def test_merged_task_annotates_a_fraction_coarsely(merged):
    train = merged.train
    assert int(train.fine.sum()) == 60
    for i in range(len(train)):
        parity = train.parity()[i]
        if train.fine[i]:
            assert train.texts["mixed"][i] == train.texts["digits"][i]
            assert torch.equal(train.labels["mixed"][i, :10], train.multi_hot[i])
            assert not train.labels["mixed"][i, 10:].any()
        else:
            assert train.texts["mixed"][i] == parity_text(parity)
            assert not train.labels["mixed"][i, :10].any()
            assert torch.equal(train.labels["mixed"][i, 10:], parity)
    assert merged.test.fine is None and merged.test.texts["mixed"] == merged.test.texts["digits"]


def test_merged_task_leaves_coarse_only_canvases_unannotated_at_fine(merged):
    train = merged.train
    fine = train.labels["fine"]
    assert fine.dtype == torch.float32 and fine.shape == (len(train), 10)
    for i in range(len(train)):
        if train.fine[i]:
            assert train.texts["fine"][i] == train.texts["digits"][i]
            assert torch.equal(fine[i], train.multi_hot[i].float())
        else:  # no fine caption, no fine label: unknown, not negative
            assert train.texts["fine"][i] == "" and fine[i].isnan().all()
    assert torch.equal(train.labels["parity"], train.parity())
    for part in (merged.test, merged.probe):
        assert part.texts["fine"] == part.texts["digits"]
        assert torch.equal(part.labels["fine"], part.multi_hot.float())


def test_fine_labels_write_coarse_only_rows_three_ways():
    nan = float("nan")
    labels = torch.tensor([[nan] * 10, [nan] * 10, [nan] * 10, [0.0, 1.0] + [0.0] * 8])
    parity = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0]])  # odd, even, both; a fine canvas
    negative = fine_labels(labels, parity, "negative")
    assert torch.equal(negative[:3], torch.zeros(3, 10)) and torch.equal(negative[3], labels[3])
    unknown = fine_labels(labels, parity, "unknown")
    assert unknown[:3].isnan().all() and torch.equal(unknown[3], labels[3])
    implied = fine_labels(labels, parity, "implied")
    odd = torch.arange(10) % 2 == 1
    assert torch.equal(implied[0, ~odd], torch.zeros(5)) and implied[0, odd].isnan().all()
    assert torch.equal(implied[1, odd], torch.zeros(5)) and implied[1, ~odd].isnan().all()
    assert implied[2].isnan().all()  # "odd and even digits" rules out no digit
    assert torch.equal(implied[3], labels[3])
    assert labels[:3].isnan().all()  # the input is not modified
    with pytest.raises(ValueError, match="`unannotated` must be one of"):
        fine_labels(labels, parity, "zeros")


def test_implied_negatives_follow_the_parity_hierarchy(merged):
    train = merged.train
    idx = torch.nonzero(~train.fine).flatten()[:40]
    implied = fine_labels(train.labels["fine"][idx], train.labels["parity"][idx], "implied")
    for row, i in zip(implied, idx.tolist(), strict=True):
        for c in range(10):
            parent_annotated = bool(train.parity()[i, 0 if c % 2 else 1])
            assert bool(row[c].isnan()) == parent_annotated
            assert parent_annotated or (row[c] == 0 and not train.multi_hot[i, c])


def test_partial_methods_share_everything_but_the_coarse_only_labels(merged):
    train = merged.train
    by_name = {m.name: m for m in PARTIAL}
    assert {m.granularities for m in PARTIAL} == {("fine", "parity")}
    assert [len(p) for p in _pools(merged, by_name["mgll_dropped"])] == [60]
    assert [len(p) for p in _pools(merged, by_name["mgll_masked"])] == [60, 240]
    idx = torch.cat([torch.nonzero(train.fine).flatten()[:4], torch.nonzero(~train.fine)[:4, 0]])
    rows = {}
    for name in ("mgll_negative", "mgll_masked", "mgll_masked_implied"):
        fine, parity = batch_labels(by_name[name], train, idx)
        assert torch.equal(fine[:4], train.multi_hot[idx[:4]].float())
        assert torch.equal(parity, train.parity()[idx])
        rows[name] = fine[4:]
    assert torch.equal(rows["mgll_negative"], torch.zeros(4, 10))
    assert rows["mgll_masked"].isnan().all()
    implied = rows["mgll_masked_implied"]
    assert ((implied == 0) | implied.isnan()).all() and implied.isnan().any()
    assert by_name["mgll_masked_pw0"].loss_kwargs == {"pointwise_weight": (1.0, 0.0)}
    names = {m.name for m in (*MERGED, *PARTIAL)}
    assert all(a in names and b in names for a, b in PARTIAL_CONTRASTS)


def test_fine_caption_bank_holds_only_fine_canvases(merged):
    bank, names = caption_bank(merged.train, "fine")
    fine = torch.nonzero(merged.train.fine).flatten().tolist()
    assert "" not in bank and set(bank) == {merged.train.texts["digits"][i] for i in fine}
    assert len(names) == len(bank)


def test_parity_hierarchy_and_coarse_captions():
    assert PARITY_ANCESTORS[3, 10] == 1 and PARITY_ANCESTORS[4, 11] == 1
    assert PARITY_ANCESTORS.sum() == 10
    assert parity_text(torch.tensor([True, True])) == "odd and even digits"
    assert parity_text(torch.tensor([False, True])) == "even digits"


def test_merged_batches_give_the_fine_subset_a_fixed_share(merged):
    mixed, fine_only = MERGED[1], MERGED[3]
    pools = _pools(merged, mixed)
    assert [len(p) for p in pools] == [60, 240]
    assert _shares(pools, mixed, 128) == [32, 96]  # 25 % of each batch, not the natural 20 %
    assert len(_pools(merged, fine_only)) == 1 and len(_pools(merged, fine_only)[0]) == 60


def test_mixed_targets_follow_the_hierarchy(merged):
    train = merged.train
    fine = torch.nonzero(train.fine).flatten()[:3]
    coarse = torch.nonzero(~train.fine).flatten()[:3]
    idx = torch.cat([fine, coarse])
    C = batch_labels(MERGED[1], train, idx)["targets"][0]
    for a, i in enumerate(idx.tolist()):
        for b, k in enumerate(idx.tolist()):
            if train.fine[i] and not train.fine[k]:  # a fine image, a coarse text
                want = bool((train.parity()[i] & train.parity()[k]).any())
            elif not train.fine[i] and train.fine[k]:  # a coarse image never matches digits
                want = False
            elif train.fine[i]:
                want = bool((train.multi_hot[i] & train.multi_hot[k]).any())
            else:
                want = bool((train.parity()[i] & train.parity()[k]).any())
            assert bool(C[a, b] > 0) == want


def test_caption_bank_names_the_digits_of_its_captions(task):
    bank, names = caption_bank(task.train, "digits")
    assert len(bank) == len(set(task.train.texts["digits"]))
    for text, row in zip(bank, names, strict=True):
        assert {int(w) for w in tokenize(text) if w.isdigit()} == set(
            torch.nonzero(row).flatten().tolist()
        )


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    relevant = torch.tensor([[True, False, True, False], [False, False, False, False]])
    # query 0: hits at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2; query 1 has no relevant item
    assert mean_average_precision(scores, relevant) == pytest.approx((1 + 2 / 3) / 2)


def fake_runs() -> list[dict]:
    runs = []
    for m, base in (("clip", 0.8), ("mgll", 0.9)):
        for s in range(2):
            metrics = dict.fromkeys(METRICS, base + 0.01 * s)
            runs.append(
                {
                    "method": m,
                    "seed": s,
                    "metrics": metrics,
                    "train_seconds": 1.0,
                    "losses": [3.0, 2.0, 1.0],
                    "curve_steps": [1, 3],
                    "curve_zero_shot": [0.5, base],
                }
            )
    return runs


def test_summary_mean_and_spread():
    summary = report.summarise(fake_runs())
    assert summary["mgll"]["probe_100"]["mean"] == pytest.approx(0.905)
    assert summary["mgll"]["probe_100"]["std"] == pytest.approx(0.01 / 2**0.5)
    assert summary["clip"]["probe_100"]["n"] == 2
    text = report.table(summary)
    assert re.search(r"mgll\s+0\.9050 ± 0\.0071", text)
    assert report.table(summary, fmt="rst").startswith(".. list-table::")


def test_paired_differences_by_seed():
    runs = fake_runs()
    runs[3]["metrics"]["probe_100"] = 0.79  # mgll seed 1 below clip seed 1 (0.81)
    paired = report.paired_differences(runs)
    assert "clip" not in paired  # its own baseline
    d = paired["mgll"]["probe_100"]
    assert d["mean"] == pytest.approx(((0.9 - 0.8) + (0.79 - 0.81)) / 2)
    assert d["wins"] == 1 and d["n"] == 2
    assert "(1/2)" in report.table(paired, seconds=False)


def test_contrasts_pair_methods_within_a_fraction():
    runs = []
    for m, base in (("a", 0.8), ("b", 0.9)):
        for s in range(3):
            for frac in (0.5, 1.0):
                run = {"method": f"{m} f={frac:g}", "seed": s, "fraction": frac}
                run["metrics"] = dict.fromkeys(METRICS, base + 0.01 * s * frac)
                runs.append(run)
    runs[0]["metrics"]["probe_100"] = 1.0  # a, seed 0, f=0.5 above b
    out = report.contrasts(runs, [("b", "a"), ("b", "missing")])
    assert set(out) == {"b - a f=0.5", "b - a f=1"}
    d = out["b - a f=0.5"]["probe_100"]
    assert d["per_seed"] == pytest.approx([0.9 - 1.0, 0.1, 0.1]) and d["wins"] == 2
    assert out["b - a f=1"]["zero_shot_prompts"]["mean"] == pytest.approx(0.1)


def test_merge_writes_json_table_and_png(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps({"config": {"steps": 3}, "runs": fake_runs()}))
    assert main(["--merge", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["summary"]) == {"clip", "mgll"}
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "0"])
    from mgll_demo.__main__ import select_methods

    with pytest.raises(SystemExit, match="unknown method"):
        select_methods(parse_args(["--methods", "clip,nope"]))
    names = [m.name for m in select_methods(parse_args(["--ablation"]))]
    assert names[:2] == ["clip", "mgll"] and "mgll_coarse" in names and "reference_compat" in names
    assert "mgll_paper" in names and "mgll_g1_jaccard" in names
    merged = [m.name for m in select_methods(parse_args(["--merged"]))]
    assert merged == [m.name for m in (*MERGED, *PARTIAL)]


@pytest.mark.parametrize("blocked", [["tqdm"], ["matplotlib", "mlxtend"]])
def test_cli_without_the_demo_extra_names_it_in_one_line(blocked):
    import subprocess
    import sys

    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # as if not installed: find_spec and import see nothing\n"
        "from mgll_demo.__main__ import main\n"
        "sys.exit(main(['--quick', '--no-progress']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert "[demo] extra" in lines[0] and 'pip install -e ".[demo]"' in lines[0]
    assert all(name in lines[0] for name in blocked), lines[0]
    assert "method(s)" not in proc.stdout  # it stopped before training


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_figure_labels_axes_and_shows_spread_only_with_several_seeds(n_seeds):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    runs = [r for r in fake_runs() if r["seed"] < n_seeds]
    fig = report.figure(runs, report.summarise(runs))
    try:
        loss_ax, _, bar_ax = fig.axes
        assert all(ax.get_ylabel() for ax in fig.axes)
        assert bar_ax.get_ylim()[0] == 0.0  # bars from 0, not from the smallest value
        errorbars = [c for c in bar_ax.containers if isinstance(c, ErrorbarContainer)]
        assert bool(errorbars) == (n_seeds > 1)
        assert ("std over 2 seeds" in bar_ax.get_title()) == (n_seeds > 1)
        assert "one run" in bar_ax.get_title() or n_seeds > 1
        # raw losses on one axis, not each curve divided by its own start
        assert max(max(line.get_ydata()) for line in loss_ax.get_lines()) == pytest.approx(3.0)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["clip", "mgll"]
    finally:
        plt.close(fig)


def test_figure_draws_auroc_chance_names_the_curve_protocol_and_explains_methods():
    import matplotlib.pyplot as plt

    from mgll_demo.evaluation import AUROC_METRICS

    runs = fake_runs()
    for r in runs:
        r["description"] = f"what {r['method']} is"
    fig = report.figure(runs, report.summarise(runs))
    try:
        _, curve_ax, bar_ax = fig.axes
        assert "class prompts" in curve_ax.get_title()
        assert "dashed: AUROC chance" in bar_ax.get_title()
        dashed = [ln for ln in bar_ax.lines if ln.get_linestyle() == "--"]
        assert len(dashed) == sum(m in AUROC_METRICS for m in METRICS) == 5
        assert all(list(ln.get_ydata()) == [0.5, 0.5] for ln in dashed)
        centres = sorted(float(np.mean(ln.get_xdata())) for ln in dashed)
        labels = [t.get_text() for t in bar_ax.get_xticklabels()]
        assert [labels[round(c)] for c in centres] == [
            report._tick(report.label(m)) for m in METRICS if m in AUROC_METRICS
        ]
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["clip: what clip is", "mgll: what mgll is"]
    finally:
        plt.close(fig)
    for r in runs:  # no AUROC metric: no dashed line, and the title does not mention one
        r["metrics"] = {"superset_map": r["metrics"]["superset_map"]}
    fig = report.figure(runs, report.summarise(runs))
    try:
        assert not [ln for ln in fig.axes[2].lines if ln.get_linestyle() == "--"]
        assert "dashed" not in fig.axes[2].get_title()
    finally:
        plt.close(fig)


@pytest.mark.parametrize("paired", [False, True])
def test_text_tables_fit_100_columns_and_keep_every_cell(paired):
    runs = []
    for r in fake_runs():
        for tail in ("", "_g3_jaccard_kl_samples f=0.05"):
            runs.append(dict(r, method=r["method"] + tail, metrics=dict(r["metrics"])))
    summary = report.summarise(runs)
    data = report.paired_differences(runs) if paired else summary
    text = report.table(data, seconds=not paired)
    assert max(len(line) for line in text.splitlines()) <= report.WIDTH
    for metric in METRICS:  # every header word is there, wrapped or not
        assert all(word in text for word in report.label(metric).split())
    for name, stats in data.items():  # each block has the method's row, with its cells in order
        rows = [line for line in text.splitlines() if line.split("  ")[0].strip() == name]
        cells = [c for row in rows for c in re.split(r"\s{2,}", row.strip())[1:]]
        expected = [report._cell(stats[m]) for m in METRICS]
        assert cells[: len(expected)] == expected


def test_progress_bar_only_on_a_terminal(task, capsys):
    import io

    from mgll_demo.training import show_progress, train

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(True, Terminal()) and not show_progress(False, Terminal())
    assert not show_progress(True, io.StringIO())  # a file or a pipe
    train(COMPARISON[0], task, steps=2, batch_size=16, lr=1e-3, seed=0, progress=True)
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal: no frames


def test_report_follows_the_metrics_it_is_given():
    import matplotlib.pyplot as plt

    runs = fake_runs()
    for r in runs:
        r["metrics"] = {"new_metric": next(iter(r["metrics"].values()))}
    summary = report.summarise(runs)
    assert set(summary["mgll"]) == {"new_metric", "train_seconds"}
    assert "new metric" in report.table(summary)
    fig = report.figure(runs, summary)
    try:
        assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["new\nmetric"]
    finally:
        plt.close(fig)


def test_demo_extra_matches_what_the_demo_imports():
    import ast
    import sys
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    from mgll_demo.__main__ import DEMO_EXTRA

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {re.split(r"[<>=!~\[ ;]", req)[0] for req in extra["demo"]}
    imported = set()
    for path in (root / "src" / "mgll_demo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mgll", "mgll_demo", "torch", "numpy"}
    assert third_party == declared == set(DEMO_EXTRA), (third_party, declared, DEMO_EXTRA)
