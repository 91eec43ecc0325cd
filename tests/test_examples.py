"""The examples' smoke modes and the demo's ``--quick`` mode, each in a subprocess; integrations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mgll
from mgll.integrations import hf, open_clip

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MGLL_DEMO_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "error"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_plain_loop_smoke(tmp_path):
    out = run([str(EXAMPLES / "plain_loop.py"), "--smoke"], tmp_path)
    assert "loss" in out.stdout


@pytest.mark.parametrize(
    "flags",
    [["--smoke"], ["--smoke", "--nproc", "2", "--accum-freq", "2"], ["--smoke", "--webdataset"]],
    ids=["one-process", "torchrun2-accum2", "webdataset"],
)
def test_open_clip_train_example(tmp_path, flags):
    """open_clip's own trainer with MGLL from a labelled CSV: the three terms logged, loss falls."""
    pytest.importorskip("open_clip_train.main")
    pytest.importorskip("mlxtend")
    out = run([str(EXAMPLES / "open_clip_train.py"), *flags, "--workdir", "w"], tmp_path)
    assert "smoke: ok" in out.stdout
    log = (tmp_path / "w" / "logs" / "run" / "out.log").read_text()
    for term in ("Soft_clip_loss", "Pointwise_loss", "Smooth_kl_loss"):
        assert f"{term}: " in log
    assert "mgll_zeroshot_auroc_digits" in log and "image_to_text_R@1" in log  # both evaluations
    world = 2 if "--nproc" in flags else 1
    assert f"total {world}." in log or world == 1
    assert (tmp_path / "w" / "logs" / "run" / "checkpoints" / "epoch_3.pt").is_file()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp-trainer", "fully-shard"])
def test_hf_trainer_example_replicas_stay_identical(tmp_path, fsdp):
    """torchrun 2 gloo processes: identical replicas, equal to one process on the full batch;
    the one-process run is the smoke run (finite, falling loss).  With ``--fsdp``: torch's
    ``fully_shard`` in a plain loop (accelerate runs DDP on CPUs), gathered parameters alike."""
    pytest.importorskip("accelerate")
    pytest.importorskip("mlxtend")
    flags = ["--check-replicas", "--workdir", "w", *(["--fsdp"] if fsdp else [])]
    out = run([str(EXAMPLES / "hf_clip_train.py"), *flags], tmp_path)
    assert ("fully_shard: ok" if fsdp else "replicas: ok") in out.stdout


def test_demo_quick(tmp_path):
    pytest.importorskip("mlxtend")
    out = run(["-m", "mgll_demo", "--quick", "--no-progress", "--out", "out"], tmp_path)
    assert "held-out metrics" in out.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["summary"]) == {"clip", "mgll", "mgll_jx"}
    for run_ in data["runs"]:
        assert all(0.0 <= v <= 1.0 for v in run_["metrics"].values()), run_["metrics"]
        assert all(torch.isfinite(torch.tensor(run_["losses"])))
    assert (tmp_path / "out" / "results.png").is_file()


def test_import_mgll_stays_light(tmp_path):
    code = (
        "import sys, mgll, mgll.integrations, mgll.integrations.open_clip, mgll.integrations.hf\n"
        "import mgll.integrations.open_clip_train, mgll.integrations.image_table\n"
        "import mgll.integrations.hf_trainer\n"
        "heavy = {'open_clip', 'transformers', 'matplotlib', 'mgll_demo', 'mlxtend'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    run(["-c", code], tmp_path)


class ToyCLIP(torch.nn.Module):
    """open_clip's CLIP interface, in miniature."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(30, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0)) if bias else None

    def encode_image(self, x, normalize=False):
        y = self.img(x)
        return torch.nn.functional.normalize(y, dim=-1) if normalize else y

    def encode_text(self, t, normalize=False):
        y = self.txt(t).mean(1)
        return torch.nn.functional.normalize(y, dim=-1) if normalize else y


def tokenizer(strings):
    return torch.tensor([[len(s) % 30, s.count("a") % 30] for s in strings])


@pytest.mark.parametrize("bias", [False, True])
def test_open_clip_wrapper_output_feeds_mgll(bias):
    torch.manual_seed(0)
    model = open_clip.MultiGranularCLIP(ToyCLIP(bias), tokenizer)
    texts = [["a cat", "a dog", "a cat", "car"], torch.randint(30, (4, 3))]
    out = model(torch.randn(4, 12), texts)
    assert set(out) == {"image_features", "text_features", "logit_scale"} | (
        {"logit_bias"} if bias else set()
    )
    assert torch.allclose(out["image_features"].norm(dim=1), torch.ones(4))
    # strings are tokenised and encoded once per distinct string, then gathered back
    assert torch.equal(out["text_features"][0][0], out["text_features"][0][2])
    ids = torch.tensor([0, 1, 0, 2])
    losses = mgll.MGLLLoss()(**out, labels=[ids, ids % 2], output_dict=True)
    sum(losses.values()).backward()
    assert model.model.logit_scale.grad is not None


def test_open_clip_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="encode_image"):
        open_clip.MultiGranularCLIP(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="tokenizer"):
        open_clip.encode_granularities(ToyCLIP(), [["a", "b"]])
    with pytest.raises(TypeError, match="non-empty sequence"):
        open_clip.encode_granularities(ToyCLIP(), torch.zeros(2, 3, dtype=torch.long))


class ToyHF(torch.nn.Module):
    """transformers' CLIPModel feature interface; returns an output object like 5.x."""

    class Out:
        def __init__(self, pooled):
            self.pooler_output = pooled

    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(30, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))

    def get_image_features(self, pixel_values):
        return self.Out(self.img(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self.txt(input_ids).mean(1)  # a tensor, like transformers 4.x


def test_hf_model_output_feeds_mgll():
    torch.manual_seed(0)
    tokens = [
        {"input_ids": torch.randint(30, (4, 5)), "attention_mask": torch.ones(4, 5)},
        torch.randint(30, (4, 5)),
    ]
    out = hf.model_output(ToyHF(), torch.randn(4, 12), tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert len(out["text_features"]) == 2
    loss = mgll.MGLLLoss()(**out, labels=[torch.tensor([0, 1, 0, 1])] * 2)
    loss.backward()


def test_hf_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="non-empty sequence"):
        hf.model_output(ToyHF(), torch.randn(2, 12), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        hf.model_output(ToyHF(), torch.randn(2, 12), [{"ids": torch.zeros(2, 3)}])
    with pytest.raises(TypeError, match="pooler_output"):
        hf.features(object())
