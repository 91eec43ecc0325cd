"""MultiGranularCollate: stable label shapes, DataLoader workers, and the errors it explains."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import mgll
from mgll.datasets import MultiGranularCollate
from mgll.text import Granularity, MultiGranularTextBuilder

CLASSES = ["Atelectasis", "Edema", "Effusion"]


def builder() -> MultiGranularTextBuilder:
    return MultiGranularTextBuilder(
        [
            Granularity(
                "finding", "a chest X-ray with {}", classes=CLASSES, missing_text="no finding"
            ),
            Granularity("report"),
        ]
    )


def items(n: int) -> list:
    out = []
    for i in range(n):
        finding = [CLASSES[i % 3]] if i % 4 else []  # one label or none: 'auto' would give ids
        out.append((torch.full((1, 4, 4), float(i)), {"finding": finding, "report": f"note {i}"}))
    return out


def test_collate_stacks_images_and_builds_texts():
    images, batch = MultiGranularCollate(builder())(items(4))
    assert images.shape == (4, 1, 4, 4)
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    finding = batch["finding"]
    assert finding.texts[0] == "no finding"
    assert finding.labels.dtype == torch.float32 and finding.labels.shape == (4, 3)
    assert finding.labels.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_label_shapes_do_not_switch_between_batches():
    collate = MultiGranularCollate(builder())
    _, single = collate(items(4)[1:])  # every sample has exactly one label
    assert single["finding"].labels.shape == (3, 3)
    assert single["finding"].labels.dtype == torch.float32
    auto = builder().build([a for _, a in items(4)[1:]], label_format="auto")
    assert auto["finding"].labels.dim() == 1  # 'auto' (opt-in) switches to ids


def test_label_format_per_granularity_and_soft():
    collate = MultiGranularCollate(builder(), label_format={"finding": "soft"})
    _, batch = collate([(torch.zeros(2), {"finding": {"Edema": 0.5}, "report": "x"})])
    assert batch["finding"].labels.dtype == torch.float32
    assert batch["finding"].labels.tolist() == [[0.0, 0.5, 0.0]]
    assert batch["report"].labels.tolist() == [[1.0]]  # unnamed: multi_hot
    with pytest.raises(ValueError, match=r"label_format='multi_hot'.* use 'soft'"):
        MultiGranularCollate(builder())(
            [(torch.zeros(2), {"finding": {"Edema": 0.5}, "report": ""})]
        )


@pytest.mark.parametrize("mode", ["paired", "bank"])
def test_dataloader_with_two_workers(mode):
    data = items(12)
    collate = MultiGranularCollate(builder(), mode, seed=3)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3
    for b, (images, texts) in enumerate(batches):
        expected = collate(data[4 * b : 4 * b + 4])[1]
        assert torch.equal(images, torch.stack([x for x, _ in data[4 * b : 4 * b + 4]]))
        for got, want in zip(texts, expected, strict=True):
            assert got.texts == want.texts
            assert torch.equal(got.loss_input, want.loss_input)


def test_pickle_round_trip_and_to_device():
    collate = pickle.loads(pickle.dumps(MultiGranularCollate(builder(), seed=1)))
    _, batch = collate(items(3))
    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, mgll.text.TextBatch) and moved is not batch
    assert moved.names == batch.names
    assert moved["finding"].labels.dtype == torch.float32
    assert torch.equal(moved["finding"].inverse, batch["finding"].inverse)
    features = moved.encode(lambda s: torch.randn(len(s), 8))
    image = torch.randn(3, 8, requires_grad=True)
    mgll.MGLLLoss()(image, features, torch.tensor(10.0), **moved.loss_kwargs()).backward()
    assert image.grad is not None


def test_default_collate_dict_of_lists_points_to_the_collate():
    records = [{"finding": c, "report": "x"} for c in CLASSES]
    loader = DataLoader(records, batch_size=3)  # torch's default collate
    merged = next(iter(loader))
    assert isinstance(merged, dict)
    with pytest.raises(TypeError, match=r"default DataLoader collate.*MultiGranularCollate"):
        builder().build(merged)


@pytest.mark.parametrize(
    ("kwargs", "batch", "error", "match"),
    [
        ({"builder": "nope"}, None, TypeError, r"`builder` must be a mgll.text"),
        ({"mode": "both"}, None, ValueError, r"`mode` must be 'paired' or 'bank'"),
        ({"label_format": "onehot"}, None, ValueError, r"`label_format` must be one of"),
        ({"label_format": {"findng": "soft"}}, None, ValueError, r"unknown granularities"),
        ({"seed": 1.5}, None, TypeError, r"`seed` must be an int"),
        ({}, [], ValueError, r"`items` is empty"),
        ({}, [{"finding": "Edema"}], TypeError, r"`items\[0\]` must be an \(image, annotation\)"),
        ({}, [(torch.zeros(1), "Edema")], TypeError, r"`items\[0\]\[1\]` .* must be a mapping"),
    ],
)
def test_collate_bad_input(kwargs, batch, error, match):
    args = {"builder": builder()} | kwargs
    with pytest.raises(error, match=match):
        collate = MultiGranularCollate(args.pop("builder"), **args)
        collate(batch)
