"""Root conftest: names the docstring examples (run with --doctest-modules) may use."""

import pytest
import torch

import mgll


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, mgll=mgll)
