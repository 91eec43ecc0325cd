"""mgll.text: granularities, the label hierarchy, the builder's round trip and the loss inputs."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mgll
from mgll import targets
from mgll._problem import cooccurrence_from_labels
from mgll.text import (
    Granularity,
    LabelHierarchy,
    MultiGranularTextBuilder,
    encode_unique,
)

FUNDUS = [
    {
        "disease": ["diabetic retinopathy", "diabetic macular edema"],
        "description": ["moderate NPDR", "severe DME"],
        "explanation": "lots of hard exudates near the macula",
    },
    {
        "disease": ["diabetic macular edema", "diabetic retinopathy"],
        "description": "severe DME",
        "explanation": "lots of hard exudates near the macula",
    },
    {"disease": "glaucoma", "description": "large cup-to-disc ratio", "explanation": []},
    {"disease": [], "description": [], "explanation": "a healthy fundus"},
    {"disease": "diabetic retinopathy", "description": ["moderate NPDR"], "explanation": []},
]


def fundus_builder(**kwargs) -> MultiGranularTextBuilder:
    return MultiGranularTextBuilder(
        [
            Granularity("disease", "This is a fundus image of {}."),
            Granularity("description", "{}", last_joiner=" and "),
            Granularity("explanation"),
        ],
        **kwargs,
    )


def toy_encoder(dim: int = 12):
    """A deterministic toy text tower: one learnable row per distinct string, counting calls."""
    table: dict[str, torch.Tensor] = {}
    calls: list[list[str]] = []

    def encode(strings: list[str]) -> torch.Tensor:
        calls.append(list(strings))
        for s in strings:
            if s not in table:
                gen = torch.Generator().manual_seed(len(table) + 1)
                table[s] = torch.randn(dim, generator=gen, dtype=torch.float64)
        return torch.stack([table[s] for s in strings])

    return encode, calls


# ---------------------------------------------------------------- Granularity


def test_granularity_canonical_text_and_joiners():
    g = Granularity("digits", "digits {}", last_joiner=" and ")
    assert g.render(g.labels_of({"digits": [7, 3, 5, 3]})) == "digits 3, 5 and 7"
    assert g.render(g.labels_of({"digits": 4})) == "digits 4"
    assert g.render(g.labels_of({})) == ""  # missing: the missing_text
    ordered = Granularity("d", "{}", classes=["odd", "even"], joiner=" + ")
    assert ordered.render(ordered.labels_of({"d": ["even", "odd"]})) == "odd + even"


def test_granularity_descriptions_key_and_separator():
    g = Granularity(
        "dx",
        "fundus with {}",
        {"DR": ["microaneurysms", "dot haemorrhages"], "DME": "retinal thickening"},
        key="Disease",
        separator=",",
        missing_text="no finding",
    )
    labels = g.labels_of({"Disease": "DR, DME"})
    assert labels == ("DME", "DR")
    assert g.render(labels) == "fundus with retinal thickening, microaneurysms"
    assert g.render(labels, random.Random(3)) in {
        "fundus with retinal thickening, microaneurysms",
        "fundus with retinal thickening, dot haemorrhages",
    }
    assert g.prompts("DR") == ["fundus with microaneurysms", "fundus with dot haemorrhages"]
    assert g.prompts("AMD") == ["fundus with AMD"]
    assert g.render(g.labels_of({"dx": "DR"})) == "no finding"  # reads `key`, not `name`


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(template="no field"),
            ValueError,
            r"`template` must hold exactly one '\{\}' field .* got 'no field'",
        ),
        (dict(template="{} and {}"), ValueError, r"`template` must hold exactly one"),
        (dict(template="{label}"), ValueError, r"`template` must hold exactly one"),
        (dict(template="{"), ValueError, r"`template` is not a valid format string"),
        (dict(template=3), TypeError, r"`template` must be a string, got int"),
        (dict(descriptions=["a"]), TypeError, r"`descriptions` must be a mapping"),
        (
            dict(descriptions={"DR": []}),
            TypeError,
            r"`descriptions\['DR'\]` must be a string or a non-empty list",
        ),
        (dict(classes="DR"), TypeError, r"`classes` must be a sequence of labels, got str"),
        (dict(classes=["DR", "DR"]), ValueError, r"`classes` must be distinct, got repeated 'DR'"),
        (dict(joiner=None), TypeError, r"`joiner` must be a string, got NoneType"),
    ],
)
def test_granularity_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        Granularity("g", **kwargs)


@pytest.mark.parametrize(
    ("annotation", "error", "match"),
    [
        (
            {"g": [1.5]},
            TypeError,
            r"`annotation\['g'\]` must hold labels that are strings or integers .* got float",
        ),
        ({"g": True}, TypeError, r"got bool"),
        (
            {"g": "AMD"},
            ValueError,
            r"`annotation\['g'\]` holds labels not in `classes` of granularity 'g': 'AMD'",
        ),
    ],
)
def test_granularity_bad_labels(annotation, error, match):
    with pytest.raises(error, match=match):
        Granularity("g", classes=["DR"]).labels_of(annotation)


# ---------------------------------------------------------------- LabelHierarchy

PARENTS = {"moderate NPDR": "NPDR", "severe NPDR": "NPDR", "NPDR": "DR", "PDR": "DR", "AMD": None}


def test_hierarchy_ancestors_and_expand():
    h = LabelHierarchy(PARENTS)
    assert h.ancestors("moderate NPDR") == ("NPDR", "DR")
    assert h.ancestors("DR") == ()
    assert h.ancestors("AMD") == ()
    assert h.expand(["moderate NPDR", "PDR"]) == ("DR", "NPDR", "PDR", "moderate NPDR")
    assert h.expand("AMD") == ("AMD",)
    assert h.expand(["glaucoma", "NPDR"], strict=False) == ("DR", "NPDR", "glaucoma")
    assert len(h) == 6 and "AMD" in h and "glaucoma" not in h


def test_hierarchy_matrix_feeds_targets():
    h = LabelHierarchy(PARENTS)
    classes = ["DR", "NPDR", "moderate NPDR", "AMD"]
    m = h.matrix(classes)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 0] = want[2, 0] = want[2, 1] = True
    assert torch.equal(m, want)
    hot = torch.tensor([[0, 0, 1, 0]])
    assert targets.expand_ancestors(hot, m).tolist() == [[1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("parents", "match"),
    [
        ({"a": "a"}, r"`parents` has a cycle: 'a' -> 'a'"),
        ({"a": "b", "b": "a"}, r"`parents` has a cycle: 'a' -> 'b' -> 'a'"),
        ({"x": "a", "a": "b", "b": "c", "c": "a"}, r"cycle: 'a' -> 'b' -> 'c' -> 'a'"),
    ],
)
def test_hierarchy_cycles(parents, match):
    with pytest.raises(ValueError, match=match):
        LabelHierarchy(parents)


def test_hierarchy_unknown_labels_reported_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"missing from `labels`: 'NPDR', 'moderat NPDR'"):
        LabelHierarchy({"moderat NPDR": "NPDR", "NPDR": "DR"}, labels=["DR", "moderate NPDR"])
    h = LabelHierarchy(PARENTS)
    with pytest.raises(ValueError, match=r"`label` 'glaucoma' is not in the hierarchy"):
        h.ancestors("glaucoma")
    with pytest.raises(ValueError, match=r"labels not in the hierarchy: 'CRVO', 'glaucoma'"):
        h.expand(["glaucoma", "DR", "CRVO"])
    with pytest.raises(TypeError, match=r"`parents` must be a mapping"):
        LabelHierarchy([("a", "b")])


def test_hierarchy_from_dict_and_json(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(PARENTS))
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"parents": {"NPDR": "DR"}, "labels": ["DR", "NPDR", "AMD"]}))
    assert LabelHierarchy.from_json(plain).parents == LabelHierarchy(PARENTS).parents
    h = LabelHierarchy.from_json(full)
    assert h.labels == {"DR", "NPDR", "AMD"} and h.ancestors("NPDR") == ("DR",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"parents": {"a": "b", "b": "a"}}))
    with pytest.raises(ValueError, match="cycle"):
        LabelHierarchy.from_json(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        LabelHierarchy.from_json(listed)
    with pytest.raises(ValueError, match=r"may only also hold 'labels', got keys 'extra'"):
        LabelHierarchy.from_dict({"parents": {}, "extra": 1})


# ---------------------------------------------------------------- builder: paired mode


def test_paired_fundus_texts_unique_inverse_and_labels():
    batch = fundus_builder().build(FUNDUS)
    disease = batch["disease"]
    assert disease.texts == (
        "This is a fundus image of diabetic macular edema, diabetic retinopathy.",
        "This is a fundus image of diabetic macular edema, diabetic retinopathy.",
        "This is a fundus image of glaucoma.",
        "",
        "This is a fundus image of diabetic retinopathy.",
    )
    assert disease.unique_texts == disease.texts[:1] + disease.texts[2:]
    assert disease.inverse.tolist() == [0, 0, 1, 2, 3]
    assert disease.classes == ("diabetic macular edema", "diabetic retinopathy", "glaucoma")
    assert disease.labels.dtype == torch.float32
    assert disease.labels.int().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert batch["description"].texts[0] == "moderate NPDR and severe DME"
    explanation = batch["explanation"]  # free text: one label per string; two samples have none
    assert explanation.labels.shape == (5, 2) and explanation.labels.sum(1).tolist() == [
        1,
        1,
        0,
        1,
        0,
    ]


def test_paired_single_labels_give_ids_when_asked():
    builder = MultiGranularTextBuilder([Granularity("dx", "a {} image")])
    anns = [{"dx": "DR"}, {"dx": "AMD"}, {"dx": "DR"}]
    batch = builder.build(anns, label_format="ids")
    assert batch[0].labels.dtype == torch.long and batch[0].labels.tolist() == [1, 0, 1]
    assert builder.build(anns, label_format="auto")[0].labels.tolist() == [1, 0, 1]
    default = builder.build(anns)  # multi_hot: the same shape and dtype whatever the batch
    assert default[0].labels.dtype == torch.float32
    assert default[0].labels.tolist() == [[0, 1], [1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"one label per annotated sample .* sample 1 has 0 lab"):
        builder.build([{"dx": "DR"}, {"dx": []}], label_format="ids")
    none = builder.build([{"dx": "DR"}, {"dx": []}], label_format="auto")  # no label: multi-hot
    assert none[0].labels.tolist() == [[True], [False]]
    unannotated = builder.build([{"dx": "DR"}, {}, {"dx": "AMD"}], label_format="ids")
    assert unannotated[0].labels.tolist() == [1, -1, 0]  # -1: not annotated


@st.composite
def annotation_batches(draw):
    labels = st.sampled_from(["DR", "DME", "AMD", "glaucoma", "normal"])
    value = st.one_of(st.none(), labels, st.lists(labels, max_size=4))
    n = draw(st.integers(1, 10))
    batch = [
        {k: v for k, v in {"a": draw(value), "b": draw(value)}.items() if v is not None}
        for _ in range(n)
    ]
    batch[0] = {"a": batch[0].get("a"), "b": batch[0].get("b")}  # a field of every batch
    return batch


def _label_set(value) -> frozenset:
    if value is None:
        return frozenset()
    return frozenset([value]) if isinstance(value, str) else frozenset(value)


@given(annotation_batches(), st.sampled_from(["paired", "bank"]))
def test_round_trip_and_canonical_strings(annotations, mode):
    builder = MultiGranularTextBuilder([Granularity("a", "x {}"), Granularity("b")])
    batch = builder.build(annotations, mode)
    for part in batch:
        assert len(set(part.unique_texts)) == len(part.unique_texts)
        assert part.texts == tuple(part.unique_texts[j] for j in part.inverse.tolist())
    if mode == "paired":  # equal label sets <=> equal strings (samples with labels)
        for part, key in zip(batch, "ab", strict=True):
            sets = [_label_set(a.get(key)) for a in annotations]
            for i, k in itertools.product(range(len(sets)), repeat=2):
                if sets[i] and sets[k]:
                    assert (sets[i] == sets[k]) == (part.texts[i] == part.texts[k])
    kwargs = batch.loss_kwargs()
    assert list(kwargs) == (["labels"] if mode == "paired" else ["targets"])


def test_paired_labels_give_the_cooccurrence_of_label_sets():
    batch = fundus_builder().build(FUNDUS)
    c = cooccurrence_from_labels(batch["disease"].labels).dense()
    sets = [set(s) for s in batch["disease"].label_sets]
    want = torch.tensor([[float(bool(a & b)) for b in sets] for a in sets])
    torch.testing.assert_close(c, want)


# ---------------------------------------------------------------- builder: bank mode


def test_bank_targets_and_declared_classes():
    builder = MultiGranularTextBuilder(
        [Granularity("dx", "a fundus image of {}.", classes=["AMD", "DR", "DME", "normal"])]
    )
    part = builder.build([{"dx": ["DR", "DME"]}, {"dx": "AMD"}, {"dx": []}, {}], "bank")[0]
    assert part.texts == tuple(f"a fundus image of {c}." for c in ("AMD", "DR", "DME", "normal"))
    assert part.labels is None and part.targets.dtype == torch.float32
    assert part.targets[:3].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert part.targets[3].isnan().all()  # not annotated: every pair unknown
    present = MultiGranularTextBuilder([Granularity("dx")]).build(
        [{"dx": "DR"}, {"dx": "AMD"}], "bank"
    )
    assert present[0].texts == ("AMD", "DR")  # undeclared classes: those present, sorted


def test_bank_with_hierarchy_and_partial_credit_helper():
    h = LabelHierarchy(PARENTS)
    builder = MultiGranularTextBuilder([Granularity("dx")], hierarchy=h)
    part = builder.build([{"dx": "moderate NPDR"}, {"dx": "PDR"}, {"dx": "glaucoma"}], "bank")[0]
    assert part.classes == ("DR", "NPDR", "PDR", "glaucoma", "moderate NPDR")
    assert part.targets.tolist() == [[1, 1, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    # the builder's bank targets are from_hierarchy (no partial credit) on the annotated labels
    own = torch.zeros(3, 5)
    own[0, 4] = own[1, 2] = own[2, 3] = 1
    full = targets.from_hierarchy(
        own, torch.eye(5), ancestors=h.matrix(part.classes), ancestor_credit=0.0
    )
    torch.testing.assert_close(part.targets, full)


def test_paired_with_hierarchy_shares_ancestors():
    builder = MultiGranularTextBuilder(
        [Granularity("dx")], hierarchy={"dx": LabelHierarchy(PARENTS)}
    )
    part = builder.build([{"dx": "moderate NPDR"}, {"dx": "severe NPDR"}, {"dx": "AMD"}])[0]
    assert part.texts == ("moderate NPDR", "severe NPDR", "AMD")  # texts: annotated labels only
    c = cooccurrence_from_labels(part.labels).dense()
    torch.testing.assert_close(c, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match=r"`annotations\[1\]` at granularity 'dx': .*'glaucoma'"):
        builder.build([{"dx": "DR"}, {"dx": "glaucoma"}])  # a per-granularity hierarchy is strict
    declared = MultiGranularTextBuilder(
        [Granularity("dx", classes=["NPDR", "moderate NPDR"])], hierarchy=LabelHierarchy(PARENTS)
    )
    with pytest.raises(ValueError, match=r"the ancestors 'DR' of its labels are not in `classes`"):
        declared.build([{"dx": "moderate NPDR"}])


def test_random_descriptions_and_multi_hot_view():
    g = Granularity("dx", "{}", {"DR": ["a", "b", "c"]})
    builder = MultiGranularTextBuilder([g])
    anns = [{"dx": "DR"}] * 30
    first = builder.build(anns)[0]
    assert set(first.texts) == {"a"}  # no rng: the first description
    drawn = builder.build(anns, rng=random.Random(1))[0]
    assert set(drawn.texts) == {"a", "b", "c"}
    assert drawn.texts == builder.build(anns, rng=random.Random(1))[0].texts
    assert drawn.labels.tolist() == [[1.0]] * 30  # the label, not the text, decides co-occurrence
    bank = builder.build([{"dx": "DR"}, {}], "bank")[0]
    assert bank.multi_hot().tolist() == [[True], [False]]
    assert hash(g) == hash(Granularity("dx", "{}", {"DR": "x"}))  # hashable despite the dict


# ---------------------------------------------------------------- encoding


def test_encode_unique_runs_once_and_keeps_gradients():
    weight = torch.randn(3, requires_grad=True)
    calls = []

    def encode(strings):
        calls.append(strings)
        return torch.stack([weight * len(s) for s in strings])

    out = encode_unique(["ab", "c", "ab", "ab"], encode)
    assert calls == [["ab", "c"]]
    torch.testing.assert_close(out, torch.stack([weight * 2, weight, weight * 2, weight * 2]))
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.full((3,), 7.0))


def test_batch_encode_one_call_over_all_granularities():
    batch = fundus_builder().build(FUNDUS)
    encode, calls = toy_encoder()
    feats = batch.encode(encode)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == len(batch.unique_texts)
    assert [f.shape[0] for f in feats] == [5, 5, 5]
    torch.testing.assert_close(feats[0], encode_unique(batch["disease"].texts, encode))


@pytest.mark.parametrize(
    ("texts", "fn", "error", "match"),
    [
        (
            "abc",
            lambda s: torch.ones(len(s), 2),
            TypeError,
            r"`texts` must be a sequence of strings, got str",
        ),
        (
            ["a", 1],
            lambda s: torch.ones(len(s), 2),
            TypeError,
            r"`texts\[1\]` must be a string, got int",
        ),
        (["a", "b"], "encoder", TypeError, r"`encode_fn` must be callable, got str"),
        (
            ["a", "b"],
            lambda s: [[0.0]] * len(s),
            TypeError,
            r"`encode_fn` must return a torch.Tensor, got list",
        ),
        (
            ["a", "b", "a"],
            lambda s: torch.ones(3, 2),
            ValueError,
            r"`encode_fn` must return \(2, D\), one row per distinct string, got shape \(3, 2\)",
        ),
    ],
)
def test_encode_unique_bad_input(texts, fn, error, match):
    with pytest.raises(error, match=match):
        encode_unique(texts, fn)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["paired", "bank"])
@pytest.mark.parametrize("smooth_kl_support", ["samples", "coarse"])
def test_end_to_end_equals_hand_built_loss_inputs(mode, smooth_kl_support):
    """annotations -> builder -> MGLLLoss == the same loss from hand-built labels / targets."""
    batch = fundus_builder().build(FUNDUS, mode)
    encode, _ = toy_encoder()
    image = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    loss_fn = mgll.MGLLLoss(smooth_kl_support=smooth_kl_support)
    built = loss_fn(image, batch.encode(encode), scale, bias, **batch.loss_kwargs())

    dis = ["diabetic macular edema", "diabetic retinopathy", "glaucoma"]
    desc = ["large cup-to-disc ratio", "moderate NPDR", "severe DME"]
    expl = ["a healthy fundus", "lots of hard exudates near the macula"]
    if mode == "paired":
        hand = dict(
            labels=[
                torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]),
                torch.tensor([[0, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]]),
                torch.tensor([[0, 1], [0, 1], [0, 0], [1, 0], [0, 0]]),
            ]
        )
        texts = [
            [
                "This is a fundus image of diabetic macular edema, diabetic retinopathy.",
                "This is a fundus image of diabetic macular edema, diabetic retinopathy.",
                "This is a fundus image of glaucoma.",
                "",
                "This is a fundus image of diabetic retinopathy.",
            ],
            [
                "moderate NPDR and severe DME",
                "severe DME",
                "large cup-to-disc ratio",
                "",
                "moderate NPDR",
            ],
            [expl[1], expl[1], "", expl[0], ""],
        ]
    else:
        hand = dict(
            targets=[
                torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]),
                torch.tensor([[0.0, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]]),
                torch.tensor([[0.0, 1], [0, 1], [0, 0], [1, 0], [0, 0]]),
            ]
        )
        texts = [[f"This is a fundus image of {d}." for d in dis], desc, expl]
    feats = [encode(t) for t in texts]
    manual = loss_fn(image, feats, scale, bias, **hand)
    torch.testing.assert_close(built, manual, rtol=1e-12, atol=1e-12)
    g_built = torch.autograd.grad(built, image)[0]
    g_manual = torch.autograd.grad(manual, image)[0]
    torch.testing.assert_close(g_built, g_manual, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dataset presets


def test_mgll_fundus_records():
    records = [
        {
            "ImageID": "a.png",
            "Disease": "diabetic retinopathy",
            "Description": "NPDR",
            "Keyword": "DR",
        },
        {"ImageID": "b.png", "Disease": "glaucoma", "Description": "cupping", "Keyword": "GL"},
    ]
    batch = MultiGranularTextBuilder.mgll_fundus().build(records)
    assert batch.names == ["disease", "description"]
    assert batch["disease"].texts == (
        "This is a fundus image of diabetic retinopathy",
        "This is a fundus image of glaucoma",
    )
    assert batch["description"].texts == ("NPDR", "cupping")
    assert batch["disease"].labels.tolist() == [[1, 0], [0, 1]]
    kw = MultiGranularTextBuilder.mgll_fundus(["keyword"]).build(records)
    assert kw[0].texts == ("This is a fundus image of DR", "This is a fundus image of GL")
    split = MultiGranularTextBuilder.mgll_fundus(["disease"], separator=",")
    assert split.build([{"Disease": "DR, DME"}])[0].classes == ("DME", "DR")
    with pytest.raises(
        ValueError, match=r"`levels` must name granularities from .* got \['lesion'\]"
    ):
        MultiGranularTextBuilder.mgll_fundus(["lesion"])


def test_midrc_records():
    records = [
        {"modality": "CR", "study_description_0": "XR CHEST 1 VIEW", "series_description": "AP"},
        {"modality": "DX", "study_description_0": "XR CHEST 1 VIEW", "series_description": "PA"},
    ]
    batch = MultiGranularTextBuilder.midrc().build(records)
    assert batch.names == ["modality", "study_description", "series_description"]
    assert batch["modality"].texts == ("This is a CR image.", "This is a DX image.")
    assert batch["study_description"].labels.tolist() == [[1], [1]]
    assert batch["study_description"].unique_texts == ("XR CHEST 1 VIEW",)


# ---------------------------------------------------------------- builder bad input


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (
            (Granularity("a"),),
            TypeError,
            r"`granularities` must be a non-empty sequence of Granularity, got Granularity",
        ),
        (([],), ValueError, r"`granularities` must hold at least one Granularity, got none"),
        ((["a"],), TypeError, r"`granularities\[0\]` must be a Granularity, got str"),
        (
            ([Granularity("a"), Granularity("a", key="b")],),
            ValueError,
            r"distinct names, got repeated \['a'\]",
        ),
        (
            ([Granularity("a")], {"b": LabelHierarchy({})}),
            ValueError,
            r"`hierarchy` names unknown granularities \['b'\]",
        ),
        (
            ([Granularity("a")], {"a": {}}),
            TypeError,
            r"`hierarchy\['a'\]` must be a LabelHierarchy, got dict",
        ),
        (
            ([Granularity("a")], [1]),
            TypeError,
            r"`hierarchy` must be a LabelHierarchy or a mapping",
        ),
    ],
)
def test_builder_bad_construction(args, error, match):
    with pytest.raises(error, match=match):
        MultiGranularTextBuilder(*args)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([],), {}, ValueError, r"`annotations` is empty \(N=0\)"),
        (({"a": 1},), {}, TypeError, r"`annotations` must be a sequence of N mappings .* got dict"),
        (([{"a": "x"}, "b"],), {}, TypeError, r"`annotations\[1\]` must be a mapping, got str"),
        (([{"a": [None]}],), {}, TypeError, r"`annotations\[0\]\['a'\]` must hold labels"),
        (
            ([{"a": "x"}], "dense"),
            {},
            ValueError,
            r"`mode` must be one of \('paired', 'bank'\), got 'dense'",
        ),
        (
            ([{"a": "x"}],),
            dict(label_format="onehot"),
            ValueError,
            r"`label_format` must be one of",
        ),
    ],
)
def test_builder_bad_annotations(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiGranularTextBuilder([Granularity("a")]).build(*args, **kwargs)


# ---------------------------------------------------------------- partial annotation


def test_a_missing_field_is_unannotated_and_none_is_too():
    builder = MultiGranularTextBuilder(
        [Granularity("dx", "a {} image", classes=["AMD", "DR"], missing_text="normal")]
    )
    part = builder.build([{"dx": "DR"}, {"dx": []}, {}, {"dx": None}])[0]
    assert part.texts == ("a DR image", "normal", "", "")  # "": the unannotated placeholder
    labels = part.labels
    assert labels.dtype == torch.float32
    assert labels[:2].tolist() == [[0, 1], [0, 0]]
    assert labels[2:].isnan().all()
    assert part.label_sets == (("DR",), (), (), ())
    assert builder.build([{}, {}])[0].labels.isnan().all()  # a whole batch without it: allowed


def test_required_granularity_keeps_the_error():
    builder = MultiGranularTextBuilder([Granularity("dx", key="dxs", required=True)])
    with pytest.raises(ValueError, match=r"reads the field 'dxs', which no annotation"):
        builder.build([{"dx": "DR"}])
    with pytest.raises(ValueError, match=r"required, but `annotations\[1\]` has no field 'dxs'"):
        builder.build([{"dxs": "DR"}, {"dx": "DR"}])
    with pytest.raises(TypeError, match=r"`required` must be a bool"):
        Granularity("dx", required="yes")


def test_per_class_unknowns_from_the_unknown_key_and_nan_weights():
    nan = float("nan")
    g = Granularity("finding", classes=["Edema", "Effusion", "Fracture"])
    builder = MultiGranularTextBuilder([g])
    part = builder.build(
        [
            {"finding": ["Edema"], "unknown": {"finding": ["Fracture"]}},
            {"finding": {"Effusion": nan, "Edema": 0.0}},
            {"finding": [], "unknown": {"other": ["Edema"]}},  # another field's unknowns
        ]
    )[0]
    want = torch.tensor([[1, 0, nan], [0, nan, 0], [0, 0, 0]])
    torch.testing.assert_close(part.labels, want, equal_nan=True)
    assert part.texts[0] == "Edema"  # the text shows the positives only
    with pytest.raises(ValueError, match=r"needs exactly one label .* sample 0 has unknown class"):
        builder.build(
            [{"finding": ["Edema"], "unknown": {"finding": ["Fracture"]}}], label_format="ids"
        )
    with pytest.raises(ValueError, match=r"holds labels not in `classes`.*'Cough'"):
        builder.build([{"finding": [], "unknown": {"finding": ["Cough"]}}])


def test_auto_gives_float_when_a_label_is_unknown():
    builder = MultiGranularTextBuilder([Granularity("dx")])
    labels = builder.build([{"dx": ["a", "b"]}, {}], label_format="auto")[0].labels
    assert labels.dtype == torch.float32 and labels[1].isnan().all()
    assert builder.build([{"dx": "a"}, {}], label_format="auto")[0].labels.tolist() == [0, -1]


H = LabelHierarchy({"NPDR": "DR", "PDR": "DR", "mild": "NPDR", "AMD": None})
DX = ["DR", "NPDR", "PDR", "mild", "AMD"]


def hierarchical(**kwargs) -> MultiGranularTextBuilder:
    return MultiGranularTextBuilder(
        [
            Granularity("category", classes=["DR", "AMD"]),
            Granularity("dx", classes=DX, **kwargs),
        ],
        hierarchy={"dx": H},
    )


def test_hierarchy_positives_up_unknowns_up_negatives_down():
    nan = float("nan")
    part = hierarchical().build(
        [
            {"category": [], "dx": ["mild"]},  # positive up: NPDR and DR
            {"category": [], "dx": [], "unknown": {"dx": ["mild"]}},  # unknown up: NPDR, DR
            {"category": [], "dx": {"DR": 0.0}, "unknown": {"dx": ["mild", "PDR"]}},  # down
            {"category": [], "dx": {"NPDR": 0.0, "PDR": 1.0}, "unknown": {"dx": ["mild"]}},
        ]
    )["dx"]
    want = torch.tensor(
        [
            [1, 1, 0, 1, 0],
            [nan, nan, 0, nan, 0],
            [0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0],
        ]
    )
    torch.testing.assert_close(part.labels, want, equal_nan=True)
    assert part.conflicts == 0


def test_hierarchy_conflicts_are_counted_and_the_hierarchy_wins():
    batch = hierarchical().build(
        [
            {"category": [], "dx": {"mild": 1.0, "NPDR": 0.0, "DR": 0.0}},  # two overridden
            {"category": [], "dx": {"PDR": 1.0, "AMD": 0.0}},  # AMD is no ancestor: fine
        ]
    )
    torch.testing.assert_close(
        batch["dx"].labels, torch.tensor([[1.0, 1, 0, 1, 0], [1, 0, 1, 0, 0]])
    )
    assert batch["dx"].conflicts == 2 and batch.conflicts == {"category": 0, "dx": 2}


def test_a_coarse_only_annotation_gives_negatives_outside_its_groups():
    """Category DR only: DR positive, AMD a known negative, the DR subtree unknown."""
    nan = float("nan")
    builder = hierarchical(coarse="category")
    batch = builder.build([{"category": ["DR"]}, {"category": ["AMD"]}, {"dx": ["PDR"]}])
    want = torch.tensor(
        [
            [1, nan, nan, nan, 0],
            [0, 0, 0, 0, 1],  # a negative DR makes its whole subtree negative
            [1, 0, 1, 0, 0],
        ]
    )
    torch.testing.assert_close(batch["dx"].labels, want, equal_nan=True)
    assert batch["dx"].texts == ("", "", "PDR")  # no fine text for the coarse-only images
    assert batch["category"].labels[2].isnan().all()
    contradicted = builder.build([{"category": ["AMD"], "dx": ["mild"], "unknown": {"dx": ["DR"]}}])
    assert contradicted["dx"].conflicts == 1  # the coarse negative DR, overridden by "mild"


def test_builder_bad_coarse():
    with pytest.raises(ValueError, match=r"`coarse='b'`, which is not a granularity"):
        MultiGranularTextBuilder([Granularity("a", coarse="b")])
    with pytest.raises(ValueError, match=r"`coarse` granularities form a cycle: 'a' -> 'b' -> 'a'"):
        MultiGranularTextBuilder([Granularity("a", coarse="b"), Granularity("b", coarse="a")])
