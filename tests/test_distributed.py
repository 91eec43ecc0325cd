"""Distributed MGLL on gloo (CPU): DDP on W ranks equals one process on the concatenated batch.

The W = 2 and W = 3 groups are spawned once, side by side; their workers run every
configuration (backend x mode x distributed setting) and the bad-configuration scenarios, and
the tests compare each configuration with a single process in this one.  The process groups
rendezvous on a FileStore, gloo's connections stay on the loopback interface, collectives have
a short timeout and every test a pytest timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mgll
from mgll.distributed import bank_columns, global_loss

BACKENDS = [b for b in mgll.available_backends() if b not in ("auto", "triton")]
SIZES = {2: (4, 4), 3: (4, 3, 2)}  # per-rank batch sizes; W = 3 has an uneven last batch
# paired-soft: label probabilities, overlap rules; partial / bank-partial: unknown labels (NaN,
# whole unannotated rows, the id -1) and unknown bank pairs, gathered with their NaN
MODES = ("paired", "bank", "paired-soft", "partial", "bank-partial")
OVERLAP = {"paired-soft": ("count", "jaccard"), "partial": ("any", "jaccard")}
SETTINGS = {
    "full": dict(local_loss=False, gather_with_grad=False),
    "full-gathergrad": dict(local_loss=False, gather_with_grad=True),
    "local": dict(local_loss=True, gather_with_grad=True),
    # other loss options, so the global targets, coarse KL support and normalisers are exercised
    "local-variant": dict(
        local_loss=True,
        gather_with_grad=True,
        smooth_kl_support="coarse",
        pointwise_target="soft",
        pointwise_norm="images",
        granularity_weights=(1.0, 0.5),
        soft_clip_weight=(0.5, 1.0),  # per-granularity term weights, one granularity's off
        pointwise_weight=(1.0, 0.0),
    ),
}
BANK_SIZES = (5, 2)  # K_1 = 2 < W = 3: a rank owns no bank text of that granularity
D_IN, D = 6, 5
TOLERANCE = dict(rtol=1e-9, atol=1e-12)  # float64 throughout
TIMEOUT = 600  # generous: a loaded CI machine runs the spawned workers slowly
# a rank without samples (docs/errors.rst): it contributes no rows and the global loss is unchanged
EMPTY_SIZES = {2: (0, 5), 3: (4, 0, 3)}
EMPTY_SETTINGS = ("full", "local")


class Towers(nn.Module):
    """Linear image and text towers with a learnable logit scale and bias (open_clip style)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(D_IN, D)
        self.text = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, images, texts):
        return (
            self.image(images),
            [self.text(t) for t in texts],
            self.logit_scale.exp(),
            self.logit_bias,
        )


def make_model() -> Towers:
    torch.manual_seed(1234)
    return Towers().double()


def make_data(mode: str, n: int) -> dict:
    """The global batch: image inputs, text inputs and labels/targets for G = 2."""
    seeds = {"paired": 7, "bank": 11, "paired-soft": 13, "partial": 17, "bank-partial": 19}
    gen = torch.Generator().manual_seed(seeds[mode])
    images = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    if mode == "partial":
        texts = [torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for _ in range(2)]
        ids = torch.randint(0, 3, (n,), generator=gen)
        ids[torch.rand(n, generator=gen) < 0.25] = -1  # unannotated at granularity 0
        multi = (torch.rand(n, 3, generator=gen) < 0.4).to(torch.float64)
        multi[torch.rand(n, 3, generator=gen) < 0.25] = math.nan  # a class not annotated
        multi[torch.rand(n, generator=gen) < 0.2] = math.nan  # unannotated at granularity 1
        return dict(images=images, texts=texts, labels=[ids, multi])
    if mode == "bank-partial":
        texts = [torch.randn(k, D_IN, generator=gen, dtype=torch.float64) for k in BANK_SIZES]
        bank = [torch.rand(n, k, generator=gen, dtype=torch.float64) for k in BANK_SIZES]
        for c in bank:
            c[torch.rand(c.shape, generator=gen) < 0.4] = 0.0
            c[torch.rand(c.shape, generator=gen) < 0.3] = math.nan  # unknown pairs
        return dict(images=images, texts=texts, targets=bank)
    if mode == "paired-soft":  # uncertain labels (0.5), a soft granularity under each rule
        texts = [torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for _ in range(2)]
        levels = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        soft = [levels[torch.randint(0, 3, (n, 3), generator=gen)] for _ in range(2)]
        return dict(images=images, texts=texts, labels=soft)
    if mode == "paired":
        texts = [torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for _ in range(2)]
        ids = torch.randint(0, 3, (n,), generator=gen)
        multi_hot = torch.rand(n, 3, generator=gen) < 0.4  # some rows have no label
        return dict(images=images, texts=texts, labels=[ids, multi_hot])
    texts = [torch.randn(k, D_IN, generator=gen, dtype=torch.float64) for k in BANK_SIZES]
    soft = torch.rand(n, BANK_SIZES[0], generator=gen, dtype=torch.float64)
    soft = soft * (torch.rand(n, BANK_SIZES[0], generator=gen) < 0.5)  # zero rows and columns
    binary = (torch.rand(n, BANK_SIZES[1], generator=gen) < 0.5).to(torch.int64)
    return dict(images=images, texts=texts, targets=[soft, binary])


def local_part(data: dict, mode: str, start: int, stop: int) -> dict:
    part = dict(images=data["images"][start:stop])
    if not mode.startswith("bank"):
        part["texts"] = [t[start:stop] for t in data["texts"]]
        part["labels"] = [x[start:stop] for x in data["labels"]]
    else:
        part["texts"] = data["texts"]  # the bank is the same on every rank
        part["targets"] = [x[start:stop] for x in data["targets"]]
    return part


def run_step(model: nn.Module, loss_fn: nn.Module, data: dict) -> dict:
    image, texts, scale, bias = model(data["images"], data["texts"])
    supervision = {k: data[k] for k in ("labels", "targets") if k in data}
    terms = loss_fn(image, texts, scale, bias, output_dict=True, **supervision)
    loss = sum(terms.values())
    loss.backward()
    return dict(loss=loss.detach(), terms={k: v.detach() for k, v in terms.items()})


def loss_options(setting: str, backend: str, mode: str = "paired") -> dict:
    return dict(SETTINGS[setting], backend=backend, overlap=OVERLAP.get(mode, "any"))


CASES = [
    (world, backend, mode, setting)
    for world in SIZES
    for backend in BACKENDS
    for mode in MODES
    for setting in SETTINGS
]


def case_id(case) -> str:
    return "W{}-{}-{}-{}".format(*case)


EMPTY_CASES = [
    (world, backend, mode, setting)
    for world in SIZES
    for backend in BACKENDS
    for mode in MODES
    for setting in EMPTY_SETTINGS
]


# --- the workers ------------------------------------------------------------------------------


def loopback_env() -> dict[str, str]:
    """Keep gloo's connections on the loopback interface (no network)."""
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    return {"GLOO_SOCKET_IFNAME": loopback} if loopback else {}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(loopback_env())
    store = dist.FileStore(f"{folder}/store", world)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    sizes = SIZES[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = {"cases": {}, "errors": {}}
    for _, backend, mode, setting in (c for c in CASES if c[0] == world):
        model = DistributedDataParallel(make_model())
        data = local_part(make_data(mode, sum(sizes)), mode, start, stop)
        step = run_step(model, mgll.MGLLLoss(**loss_options(setting, backend, mode)), data)
        step["global"] = global_loss(step["terms"])
        step["grads"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        out["cases"][(backend, mode, setting)] = step
    out["empty"] = {}
    sizes = EMPTY_SIZES[world]
    first, last = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for _, backend, mode, setting in (c for c in EMPTY_CASES if c[0] == world):
        model = DistributedDataParallel(make_model())
        data = local_part(make_data(mode, sum(sizes)), mode, first, last)
        step = run_step(model, mgll.MGLLLoss(**loss_options(setting, backend, mode)), data)
        step["global"] = global_loss(step["terms"])
        step["grads"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        out["empty"][(backend, mode, setting)] = step
    for name, scenario in BAD_CONFIGURATIONS.items():
        try:
            scenario(rank, world, start, stop)
            out["errors"][name] = None
        except ValueError as error:
            out["errors"][name] = str(error)
        dist.barrier()  # every rank got here: nothing hangs after the error either
    torch.save(out, f"{folder}/rank{rank}.pt")
    teardown(f"{folder}/done{rank}")


def teardown(marker: str) -> None:
    """The teardown of docs/distributed.rst: no rank leaves while another still talks to it.

    A barrier first, so that every rank has finished all its collectives, then each destroys
    its group.  ``marker`` records that this rank passed the barrier with its results saved.
    """
    dist.barrier()
    Path(marker).touch()
    dist.destroy_process_group()


def _paired_call(rank, start, stop, g_count=2, **options):
    data = local_part(make_data("paired", 16), "paired", start, stop)
    texts, labels = data["texts"] * g_count, data["labels"] * g_count
    scale = torch.tensor(10.0, dtype=torch.float64)
    mgll.MGLLLoss(**options)(data["images"], texts[:g_count], scale, labels=labels[:g_count])


def _mismatched_g(rank, world, start, stop):
    _paired_call(rank, start, stop, g_count=2 if rank == 0 else 3)


def _mismatched_mode(rank, world, start, stop):
    if rank == 0:
        return _paired_call(rank, start, stop)
    data = local_part(make_data("bank", 16), "bank", start, stop)
    scale = torch.tensor(10.0, dtype=torch.float64)
    mgll.MGLLLoss()(data["images"], data["texts"], scale, targets=data["targets"])


def _mismatched_bank(rank, world, start, stop):
    data = local_part(make_data("bank", 16), "bank", start, stop)
    k = 1 if rank == world - 1 else 2  # the last rank passes a different bank
    texts, targets = [data["texts"][0][:k]], [data["targets"][0][:, :k]]
    mgll.MGLLLoss()(data["images"], texts, torch.tensor(10.0, dtype=torch.float64), targets=targets)


def _mismatched_local_loss(rank, world, start, stop):
    _paired_call(rank, start, stop, local_loss=rank == 0, gather_with_grad=True)


def _wrong_world_size(rank, world, start, stop):
    _paired_call(rank, start, stop, world_size=world + 1)


def _valid_after_errors(rank, world, start, stop):
    _paired_call(rank, start, stop, local_loss=True, gather_with_grad=True)


def _mismatched_overlap(rank, world, start, stop):
    _paired_call(rank, start, stop, overlap="jaccard" if rank == 0 else "count")


def _mixed_label_dtypes(rank, world, start, stop):
    """The same 0/1 labels, bool / int64 on most ranks and float / int32 on the last one."""
    data = local_part(make_data("paired", 16), "paired", start, stop)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss_fn = mgll.MGLLLoss(overlap="jaccard")
    expected = loss_fn(data["images"], data["texts"], scale, labels=data["labels"])
    ids, multi_hot = data["labels"]
    if rank == world - 1:
        ids, multi_hot = ids.int(), multi_hot.float()
    got = loss_fn(data["images"], data["texts"], scale, labels=[ids, multi_hot])
    if not torch.allclose(got, expected, rtol=1e-12, atol=0):
        raise ValueError(f"mixed label dtypes changed the loss: {got} instead of {expected}")


def _mixed_target_dtypes(rank, world, start, stop):
    """Bank mode: the same targets as float64 / int64 on most ranks, float32 / bool on the last."""
    data = local_part(make_data("bank", 16), "bank", start, stop)
    scale = torch.tensor(10.0, dtype=torch.float64)
    expected = mgll.MGLLLoss()(data["images"], data["texts"], scale, targets=data["targets"])
    soft, binary = data["targets"]
    if rank == world - 1:
        soft, binary = soft.float(), binary.bool()
    got = mgll.MGLLLoss()(data["images"], data["texts"], scale, targets=[soft, binary])
    if not torch.allclose(got, expected, rtol=1e-6, atol=0):
        raise ValueError(f"mixed target dtypes changed the loss: {got} instead of {expected}")


def _every_rank_empty(rank, world, start, stop):
    _paired_call(rank, start, start)  # N = 0 on every rank: the global batch is empty


BAD_CONFIGURATIONS = {
    "mismatched-G": _mismatched_g,
    "mismatched-mode": _mismatched_mode,
    "mismatched-bank": _mismatched_bank,
    "mismatched-local_loss": _mismatched_local_loss,
    "wrong-world_size": _wrong_world_size,
    "mismatched-overlap": _mismatched_overlap,
    "mixed-label-dtypes": _mixed_label_dtypes,
    "mixed-target-dtypes": _mixed_target_dtypes,
    "valid-after-errors": _valid_after_errors,
    "every-rank-empty": _every_rank_empty,
}
EXPECTED_ERRORS = {
    "mismatched-G": r"every rank must agree on the number of granularities G .*2 on ranks \[0\]; 3 on ranks \[1",
    "mismatched-mode": r"every rank must agree on the mode: .*`labels`.*`targets`",
    "mismatched-bank": r"every rank must agree on the text bank `text_features\[0\]` \(K_0 texts",
    "mismatched-local_loss": r"every rank must agree on `local_loss`, got 1 on ranks \[0\]; 0 on",
    "wrong-world_size": r"`world_size=\d` does not match the process group, whose world_size is \d",
    "mismatched-overlap": r"every rank must agree on the overlap rule of `labels\[0\]` \(`overlap=`\), got 'jaccard' on ranks \[0\]; 'count' on ranks \[1",
    "mixed-label-dtypes": None,
    "mixed-target-dtypes": None,
    "valid-after-errors": None,
    "every-rank-empty": r"every rank passed an empty batch \(N=0 on all \d ranks\)",
}


def _launch(folder) -> dict[int, list[dict]]:
    """Run the workers of every world size at once, with a deadline; none outlives the test."""
    contexts = {}
    for world in SIZES:
        (folder / f"w{world}").mkdir()
        contexts[world] = mp.start_processes(
            _worker,
            args=(world, str(folder / f"w{world}")),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
    deadline = time.monotonic() + TIMEOUT - 10
    try:
        for world, context in contexts.items():
            try:
                while not context.join(timeout=1.0):  # raises if a worker raised
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the {world} gloo workers did not finish in time")
            except mp.ProcessExitedException:
                # a signal (SIGABRT) inside destroy_process_group, after every rank saved its
                # results and passed the final barrier, is gloo's teardown on a loaded machine
                # (docs/distributed.rst), not a result under test; anything earlier fails
                done = [folder / f"w{world}" / f"done{r}" for r in range(world)]
                if not all(path.exists() for path in done):
                    raise
    finally:
        for context in contexts.values():
            for process in context.processes:
                if process.is_alive():
                    process.kill()
    return {
        world: [torch.load(folder / f"w{world}" / f"rank{r}.pt") for r in range(world)]
        for world in SIZES
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(W)``: every rank's results for world size W (all sizes run on first use)."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if not cache:
            cache.update(_launch(tmp_path_factory.mktemp("gloo")))
        return cache[world]

    return get


@functools.cache
def single_process(mode: str, setting: str, world: int, n: int | None = None) -> tuple[dict, dict]:
    """One process, no gathering, the reference backend, on the concatenated batch (of n)."""
    model = make_model()
    options = dict(
        loss_options(setting, "reference", mode), local_loss=False, gather_with_grad=False
    )
    n = sum(SIZES[world]) if n is None else n
    step = run_step(model, mgll.MGLLLoss(**options), make_data(mode, n))
    return step, {n: p.grad.clone() for n, p in model.named_parameters()}


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ddp_gradients_equal_single_process(runs, case):
    world, backend, mode, setting = case
    ranks = runs(world)
    _, expected = single_process(mode, setting, world)
    assert expected["logit_scale"].abs() > 1e-6 and expected["text.weight"].abs().max() > 1e-6
    for rank, result in enumerate(ranks):
        grads = result["cases"][(backend, mode, setting)]["grads"]
        for name, grad in expected.items():
            torch.testing.assert_close(
                grads[name], grad, **TOLERANCE, msg=lambda m, r=rank, n=name: f"rank {r} {n}: {m}"
            )


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gathered_loss_value_equals_single_process(runs, case):
    world, backend, mode, setting = case
    ranks = [r["cases"][(backend, mode, setting)] for r in runs(world)]
    expected, _ = single_process(mode, setting, world)
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean, expected["loss"], **TOLERANCE)
    for result in ranks:
        for key, value in expected["terms"].items():
            torch.testing.assert_close(result["global"][key], value, **TOLERANCE)
        if not SETTINGS[setting]["local_loss"]:  # every rank computes the global loss itself
            torch.testing.assert_close(result["loss"], expected["loss"], **TOLERANCE)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=case_id)
def test_a_rank_without_samples(runs, case):
    """A rank with N_r = 0: no hang, no error; loss and DDP gradients as one process."""
    world, backend, mode, setting = case
    ranks = [r["empty"][(backend, mode, setting)] for r in runs(world)]
    expected, grads = single_process(mode, setting, world, sum(EMPTY_SIZES[world]))
    mean = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean, expected["loss"], **TOLERANCE)
    for rank, result in enumerate(ranks):
        for key, value in expected["terms"].items():
            torch.testing.assert_close(result["global"][key], value, **TOLERANCE)
        for name, grad in grads.items():
            torch.testing.assert_close(
                result["grads"][name],
                grad,
                **TOLERANCE,
                msg=lambda m, r=rank, n=name: f"{r} {n}: {m}",
            )


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("world", SIZES)
@pytest.mark.parametrize("scenario", EXPECTED_ERRORS)
def test_bad_configuration_raises_on_every_rank(runs, world, scenario):
    messages = [r["errors"][scenario] for r in runs(world)]
    pattern = EXPECTED_ERRORS[scenario]
    for rank, message in enumerate(messages):
        if pattern is None:
            assert message is None, f"rank {rank} raised: {message}"
        else:
            assert message is not None, f"rank {rank} raised nothing"
            assert re.search(pattern, message), f"rank {rank}: {message}"


# --- in-process checks (no spawn) ----------------------------------------------------------------


def _paired_inputs(n=6):
    data = make_data("paired", n)
    return data["images"].requires_grad_(), data["texts"], data["labels"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(world_size=2), r"`world_size=2` asks for a distributed loss but torch.distributed"),
        (dict(rank=1), r"`rank=1` asks for a distributed loss but torch.distributed is not init"),
    ],
)
def test_explicit_distribution_without_a_group_raises(options, match):
    assert not dist.is_initialized()
    image, texts, labels = _paired_inputs()
    with pytest.raises(ValueError, match=match):
        mgll.MGLLLoss(**options)(image, texts, torch.tensor(10.0, dtype=image.dtype), labels=labels)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(local_loss=True), ValueError, r"`local_loss=True` needs `gather_with_grad=True`"),
        (dict(local_loss=1), TypeError, r"`local_loss` must be a bool, got int"),
        (dict(gather_with_grad="yes"), TypeError, r"`gather_with_grad` must be a bool, got str"),
        (dict(world_size=0), ValueError, r"`world_size` must be >= 1, got 0"),
        (dict(rank=-1), ValueError, r"`rank` must be >= 0, got -1"),
        (dict(rank=2, world_size=2), ValueError, r"`rank` must be < `world_size` \(2\), got 2"),
        (dict(rank=1.0), TypeError, r"`rank` must be an int or None, got float"),
        (dict(group="world"), TypeError, r"`group` must be a torch.distributed.ProcessGroup"),
    ],
)
def test_bad_options_raise_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        mgll.MGLLLoss(**options)


def test_functional_takes_the_same_options():
    image, texts, labels = _paired_inputs()
    with pytest.raises(ValueError, match=r"`local_loss=True` needs `gather_with_grad=True`"):
        mgll.mgll_loss(
            image, texts, torch.tensor(10.0, dtype=image.dtype), labels=labels, local_loss=True
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("setting", ["full", "local"])
def test_group_of_size_one_gathers_nothing(tmp_path, monkeypatch, setting):
    image, texts, labels = _paired_inputs()
    scale = torch.tensor(10.0, dtype=image.dtype)
    expected = mgll.MGLLLoss()(image, texts, scale, labels=labels)
    (grad,) = torch.autograd.grad(expected, image)
    for name, value in loopback_env().items():
        monkeypatch.setenv(name, value)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        loss_fn = mgll.MGLLLoss(**SETTINGS[setting], rank=0, world_size=1)
        loss = loss_fn(image, texts, scale, labels=labels)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(loss, image)[0], grad, rtol=0, atol=0)
        torch.testing.assert_close(global_loss(loss), expected.detach(), rtol=0, atol=0)
        assert "local_loss=" in repr(loss_fn) and "group=None" in repr(loss_fn)
    finally:
        dist.destroy_process_group()


def test_world_size_one_never_gathers():
    image, texts, labels = _paired_inputs()
    scale = torch.tensor(10.0, dtype=image.dtype)
    expected = mgll.MGLLLoss()(image, texts, scale, labels=labels)
    loss = mgll.MGLLLoss(world_size=1, rank=0)(image, texts, scale, labels=labels)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("k", "world"), [(5, 2), (5, 3), (2, 3), (7, 4)])
def test_bank_columns_partition_the_bank(k, world):
    blocks = [bank_columns(k, r, world) for r in range(world)]
    owned = [i for b in blocks for i in range(k)[b]]
    assert owned == list(range(k))
    assert max(len(range(k)[b]) for b in blocks) - min(len(range(k)[b]) for b in blocks) <= 1


def test_global_loss_without_a_group_is_the_value():
    terms = {"soft_clip_loss": torch.tensor(1.5, requires_grad=True), "x": torch.tensor(2.0)}
    out = global_loss(terms)
    assert out.keys() == terms.keys() and not out["soft_clip_loss"].requires_grad
    assert float(out["x"]) == 2.0


@pytest.mark.timeout(TIMEOUT)
def test_torchrun_example_matches_one_process(tmp_path):
    """The docs' example under torchrun (2 CPU ranks, uneven batch) checks itself and passes."""
    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_torchrun.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    command += [str(example), "--steps", "2", "--batch-size", "15", "--local-loss", "--check"]
    env = {**os.environ, **loopback_env()}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT - 10, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "check: DDP gradients equal one process on the global batch" in result.stdout
