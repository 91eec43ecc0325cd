"""Shared test settings: deterministic seeds; Triton kernels run in the interpreter on CPU."""

import os

import pytest
import torch
from hypothesis import settings

# Must be set before triton is imported anywhere: without a GPU the kernels run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles and chunks, so that every backend crosses several blocks on small inputs."""
    from mgll.backends import fused, tiled, triton_kernels

    monkeypatch.setattr(tiled, "TILE_ROWS", 3)
    monkeypatch.setattr(tiled, "TILE_COLS", 4)
    monkeypatch.setattr(fused, "CHUNK", 40)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
        monkeypatch.setitem(triton_kernels.INTERPRETER_BLOCKS, key, 16)


# The slow tests, marked here in one place: each took 20 s or more (or shares a fixture or a
# process pool that does) in a full run on a 2-core CPU; see the README's "Set-up" section.
# ``python -m pytest -m "not slow"`` leaves them out; CI runs everything.  A file alone marks the
# whole file.  A name that no longer exists in its file is an error, so the list cannot rot.
SLOW = (
    "tests/test_backends.py::test_torch_compile_equals_eager_fused",
    "tests/test_bench.py::test_quick_json_is_complete",  # the two share the bench run fixture
    "tests/test_bench.py::test_quick_csv_md_png",
    "tests/test_bench.py::test_readers_quick",
    "tests/test_core.py::test_torch_compile_equals_eager",
    # torchrun, 2 processes:
    "tests/test_datasets_merge.py::test_merged_recipe_trains_under_the_open_clip_launcher_with_2_processes",
    "tests/test_distributed.py",  # process groups in subprocesses
    "tests/test_docs.py",  # two Sphinx builds
    "tests/test_examples.py",  # the demo and the framework examples, end to end
    "tests/test_extreme.py::test_large_batch_tiled",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        path, _, rest = item.nodeid.partition("::")
        name = rest.split("[")[0].split("::")[0]
        if path in SLOW or f"{path}::{name}" in SLOW:
            item.add_marker(pytest.mark.slow)
        if getattr(item, "module", None) is not None:
            modules.setdefault(path, item.module)
    for entry in SLOW:
        path, _, name = entry.partition("::")
        if name and path in modules and not hasattr(modules[path], name):
            raise pytest.UsageError(f"tests/conftest.py SLOW lists {entry}, which does not exist")
