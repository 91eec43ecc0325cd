"""Root conftest: names the docstring examples (run with --doctest-modules) may use."""

import importlib.util

import pytest
import torch

import mgll

# The Triton kernel modules import triton at module level (the [triton] extra).
collect_ignore_glob = (
    [] if importlib.util.find_spec("triton") else ["src/mgll/backends/_triton_*.py"]
)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, mgll=mgll)
