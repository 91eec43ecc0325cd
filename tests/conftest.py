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
