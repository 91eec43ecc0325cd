"""The trainer integrations' pieces: open_clip_train's flat adapters and launcher, the HF wrapper."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mgll
from mgll.datasets import MultiGranularCollate
from mgll.integrations import hf, image_table, open_clip_train
from mgll.integrations.open_clip import FlatMGLLLoss, FlatMultiGranularCLIP
from mgll.text import Granularity, MultiGranularTextBuilder


class ToyCLIP(torch.nn.Module):
    """open_clip's CLIP interface, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(64, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))

    def encode_image(self, x, normalize=False):
        y = self.img(x)
        return torch.nn.functional.normalize(y, dim=-1) if normalize else y

    def encode_text(self, t, normalize=False):
        y = self.txt(t).mean(1)
        return torch.nn.functional.normalize(y, dim=-1) if normalize else y

    def lock_image_tower(self):
        return "locked"


def tokenize(strings):
    return torch.tensor([[len(s) % 64, sum(map(ord, s)) % 64, s.count(" ")] for s in strings])


BUILDER = MultiGranularTextBuilder(
    [
        Granularity("digits", "digits {}", separator="|", classes=[str(d) for d in range(4)]),
        Granularity("parity", "{} digits", separator="|", classes=["even", "odd"]),
    ]
)
ROWS = [
    {"digits": "1|2", "parity": "even|odd"},
    {"digits": "2", "parity": "even"},
    {"digits": "1|2", "parity": "even|odd"},
    {"digits": "3", "parity": "odd"},
]


def batch(n=4):
    items = [(torch.randn(12), ROWS[i % len(ROWS)]) for i in range(n)]
    return MultiGranularCollate(BUILDER)(items)


def test_flat_adapters_equal_the_list_interface():
    torch.manual_seed(0)
    model = FlatMultiGranularCLIP(ToyCLIP(), tokenize)
    images, texts = batch()
    out = model(images, texts)
    got = FlatMGLLLoss()(**out, output_dict=True)
    features = texts.encode(lambda s: model.model.encode_text(tokenize(s), normalize=True))
    want = mgll.MGLLLoss()(
        model.model.encode_image(images, normalize=True),
        features,
        model.model.logit_scale.exp(),
        output_dict=True,
        **texts.loss_kwargs(),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_flat_output_concatenates_like_open_clip_accumulation():
    """--accum-freq: open_clip torch.cats every value over micro-batches; the loss still works."""
    torch.manual_seed(0)
    model = FlatMultiGranularCLIP(ToyCLIP(), tokenize)
    parts = [model(*batch()) for _ in range(2)]
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "logit_scale"}
    loss = FlatMGLLLoss()(**joined, logit_scale=parts[0]["logit_scale"])
    loss.backward()
    assert joined["labels_0"].shape == (8, 4) and joined["labels_1"].shape == (8, 2)


def test_flat_wrapper_keeps_open_clip_interface_and_checkpoints():
    inner = ToyCLIP()
    model = FlatMultiGranularCLIP(inner, tokenize)
    assert model.logit_scale is inner.logit_scale and model.lock_image_tower() == "locked"
    state = model.state_dict()
    assert set(state) == set(inner.state_dict())  # no "model." prefix: open_clip loads it
    fresh = ToyCLIP()
    fresh.load_state_dict(state)
    wrapped = FlatMultiGranularCLIP(ToyCLIP(), tokenize)
    wrapped.load_state_dict(state)  # and a wrapper loads a plain checkpoint
    torch.testing.assert_close(wrapped.model.img.weight, inner.img.weight)
    ddp_like = torch.nn.ModuleDict({"module": model})  # nested prefixes, as DDP's "module."
    assert "module.img.weight" in ddp_like.state_dict()
    ddp_like.load_state_dict(ddp_like.state_dict())


def test_flat_wrapper_rejects_token_tensors():
    model = FlatMultiGranularCLIP(ToyCLIP(), tokenize)
    with pytest.raises(TypeError, match="paired-mode mgll TextBatch"):
        model(torch.randn(2, 12), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unexpected"):
        FlatMGLLLoss()(torch.randn(2, 8), torch.randn(2, 8), torch.tensor(1.0), extra=torch.ones(2))


def test_parse_mgll_args_passes_loss_options_through(tmp_path):
    config = tmp_path / "mgll.json"
    config.write_text(
        json.dumps(
            {
                "granularities": [{"name": "digits", "separator": "|", "classes": ["1", "2"]}],
                "loss": {"smooth_kl_weight": 0.25, "pointwise_target": "soft"},
            }
        )
    )
    argv = ["--model", "RN50", "--mgll-config", str(config), "--mgll-smooth-kl-weight=0.5"]
    argv += ["--mgll-overlap", "jaccard", "--mgll-granularity", "parity={} digits", "--lr", "1"]
    rest, cfg = open_clip_train.parse_mgll_args(argv)
    assert rest == ["--model", "RN50", "--lr", "1"]
    # later arguments win; unknown names pass through generically (e.g. a new loss option)
    assert cfg["loss"] == {
        "smooth_kl_weight": 0.5,
        "pointwise_target": "soft",
        "overlap": "jaccard",
    }
    assert [g.name for g in cfg["granularities"]] == ["digits", "parity"]
    assert cfg["granularities"][1].template == "{} digits"
    assert cfg["granularities"][1].separator == "|"
    with pytest.raises(SystemExit, match="needs a value"):
        open_clip_train.parse_mgll_args(["--mgll-overlap"])


def test_launcher_rejects_untested_open_clip(monkeypatch):
    pytest.importorskip("open_clip_train.main")
    monkeypatch.setattr(open_clip_train, "TESTED_OPEN_CLIP", ("0.0.1",))
    with pytest.raises(SystemExit, match=r"tested with 0\.0\.1 only"):
        open_clip_train.main(["--mgll-granularity", "digits"])


def test_launcher_restores_open_clip(tmp_path):
    oc_main = pytest.importorskip("open_clip_train.main")
    before = (oc_main.create_loss, torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(SystemExit):  # open_clip's own parser rejects the bad flag
        open_clip_train.main(["--no-such-flag", "--mgll-granularity", "digits"])
    assert (oc_main.create_loss, torch.nn.parallel.DistributedDataParallel) == before
    with pytest.raises(SystemExit, match="no granularity"):
        open_clip_train.main(["--model", "RN50"])


def test_image_table_reads_csv_and_names_missing_columns(tmp_path):
    from PIL import Image

    Image.new("RGB", (6, 4)).save(tmp_path / "a.png")
    (tmp_path / "t.tsv").write_text("filepath\tdigits\tnote\na.png\t1|2\t\n")
    data = image_table.ImageTableDataset(tmp_path / "t.tsv", root=tmp_path)
    image, annotation = data[0]
    assert image.size == (6, 4) and annotation == {"digits": "1|2", "note": None}
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['path'\]"):
        image_table.ImageTableDataset(tmp_path / "t.tsv", image_key="path")


class ToyHF(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(64, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))

    def get_image_features(self, pixel_values):
        return self.img(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.txt(input_ids).mean(1)


def test_hf_collator_and_model_equal_the_plain_loss():
    torch.manual_seed(0)
    rows = [{"image": torch.randn(12), **ROWS[i]} for i in range(4)]
    inputs = hf.MultiGranularDataCollator(BUILDER, tokenize)(rows)
    assert [len(t) for t in inputs["input_ids"]] == [3, 3]  # distinct texts only
    model = hf.MGLLModel(ToyHF())
    out = model(**inputs)
    images, texts = MultiGranularCollate(BUILDER)([(r["image"], r) for r in rows])
    ref = mgll.MGLLLoss()(
        model.model.get_image_features(images),
        texts.encode(lambda s: model.model.get_text_features(tokenize(s))),
        model.model.logit_scale.exp(),
        **texts.loss_kwargs(),
    )
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_hf_collator_requires_declared_classes():
    loose = MultiGranularTextBuilder([Granularity("digits", separator="|")])
    with pytest.raises(ValueError, match="declare no `classes`"):
        hf.MultiGranularDataCollator(loose, tokenize)
    with pytest.raises(ValueError, match="with the image under 'image'"):
        hf.MultiGranularDataCollator(BUILDER, tokenize)([{"digits": "1"}])
    with pytest.raises(TypeError, match="get_image_features"):
        hf.MGLLModel(torch.nn.Linear(2, 2))


def test_hf_model_output_points_ddp_users_to_mgll_model():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed for the type check
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="Wrap `MGLLModel"):
        hf.model_output(FakeDDP(ToyHF()), torch.randn(2, 12), [torch.zeros(2, 3).long()])


def test_hf_collator_points_plain_trainer_users_to_remove_unused_columns():
    """A plain Trainer with default arguments hands the collator rows without their fields."""
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    trainer = transformers.Trainer(
        model=hf.MGLLModel(ToyHF()),
        args=args,
        train_dataset=[{"image": torch.randn(12), **ROWS[i]} for i in range(4)],
        data_collator=hf.MultiGranularDataCollator(BUILDER, tokenize),
    )
    with pytest.raises(ValueError, match=r"got \[\]; .*remove_unused_columns=False.*MGLLTrainer"):
        next(iter(trainer.get_train_dataloader()))


def test_parse_mgll_args_names_an_underscored_option():
    with pytest.raises(SystemExit, match=r"unknown argument `--mgll_config`.*`--mgll-config`"):
        open_clip_train.parse_mgll_args(["--mgll_config", "mgll.json"])
    with pytest.raises(SystemExit, match=r"`--mgll_smooth_kl_weight`.*`--mgll-smooth-kl-weight`"):
        open_clip_train.parse_mgll_args(["--mgll_smooth_kl_weight=0.5"])


def _table(tmp_path, rows, name="train.csv"):
    (tmp_path / name).write_text("filepath,shapes\n" + "".join(f"a.png,{r}\n" for r in rows))
    return tmp_path / name


def test_image_table_check_names_file_and_line_of_an_unknown_label(tmp_path):
    path = _table(tmp_path, ["circle", "cross|circle", "square", "circle"])
    data = image_table.ImageTableDataset(path)
    declared = Granularity("shapes", separator="|", classes=["circle", "cross"])
    with pytest.raises(ValueError, match=r"train\.csv', line 4, column 'shapes': .*'square'"):
        data.check([declared])
    data.check([Granularity("shapes", separator="|")])  # undeclared: any label


def test_launcher_checks_the_whole_table_when_the_dataset_is_built(tmp_path):
    pytest.importorskip("open_clip_train.main")
    from types import SimpleNamespace

    path = _table(tmp_path, ["circle"] * 20 + ["square"])  # the bad row is the last one
    cfg = {"granularities": [Granularity("shapes", separator="|", classes=["circle"])]}
    args = SimpleNamespace(train_data=str(path), val_data=None, csv_img_key="filepath",
                           csv_separator=",", distributed=False, batch_size=4, workers=0)  # fmt: skip
    with pytest.raises(SystemExit, match=r"train\.csv', line 22, column 'shapes'.*'square'"):
        open_clip_train._Hooks(cfg).csv_data(args, None, is_train=True)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            ["circle;cross", "square", "circle"],
            r"1 class name\(s\) contain ';', e\.g\. 'circle;cross'",
        ),
        (["Red", "red|blue", "blue"], r"differ only in case: 'Red' / 'red'"),
    ],
    ids=["separator", "case"],
)
def test_undeclared_classes_that_look_wrong_warn_loudly(tmp_path, caplog, rows, match):
    path = _table(tmp_path, rows)
    with caplog.at_level("WARNING"):
        grans = open_clip_train._classes_from_files([Granularity("shapes", separator="|")], [path])
    assert len(grans[0].classes) == 3
    assert any(r.levelname == "WARNING" and re.search(match, r.message) for r in caplog.records)


def test_announce_prints_the_class_count_with_examples(capsys):
    grans = [
        Granularity("digits", classes=[str(d) for d in range(10)]),
        Granularity("p", classes=["a"]),
    ]
    open_clip_train._announce(grans, declared={"digits"})
    out = capsys.readouterr().out
    assert "granularity 'digits': 10 classes (declared): '0', '1', '2', '3', '4', ..." in out
    assert "granularity 'p': 1 class (read from the data files): 'a'" in out


def test_rank_disagreement_says_what_differs_rank_by_rank():
    base = [("digits", ("0", "1", "2")), ("parity", ("even", "odd"))]
    other = [("digits", ("0", "1", "3")), ("parity", ("even", "odd"))]
    message = open_clip_train._differences([base, base, other])
    assert message == "rank 2, granularity 'digits': only on rank 2: ['3']; only on rank 0: ['2']"


def test_mgll_trainer_checks_every_row_before_training(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mgll.integrations.hf_trainer import MGLLTrainer

    rows = [{"image": torch.randn(12), **ROWS[i % 4]} for i in range(9)]
    rows[7] = {**rows[7], "digits": "1|7"}  # 7 is not a declared class
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    collator = hf.MultiGranularDataCollator(BUILDER, tokenize)
    with pytest.raises(ValueError, match=r"`rows\[7\]\['digits'\]` holds labels not in .*'7'"):
        MGLLTrainer(model=hf.MGLLModel(ToyHF()), args=args, train_dataset=rows,
                    data_collator=collator)  # fmt: skip

    class Columns:  # a datasets.Dataset's column access, without the datasets package
        column_names = ("image", "digits", "parity")

        def __len__(self):
            return len(rows)

        def __getitem__(self, column):
            return [r[column] for r in rows]

    with pytest.raises(ValueError, match=r"`rows\[7\]\['digits'\]`"):
        collator.check(Columns())
