"""Backends: interchangeable implementations of the same loss (SPEC section 5).

A backend is a function ``compute(problem, config) -> LossTerms``.  Backends are imported only
when first used, so optional ones (triton) never load with ``import mgll``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mgll._problem import LossConfig, LossTerms, Problem

Backend = Callable[[Problem, LossConfig], LossTerms]

#: Backend name -> module implementing ``compute``.  ``"auto"`` picks among these.
BACKENDS: dict[str, str] = {
    "reference": "mgll.backends.reference",
    "triton": "mgll.backends.triton_kernels",
}


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``MGLLLoss(backend=...)`` on this installation."""
    return ("auto", *BACKENDS)


def resolve_backend(name: str, problem: Problem) -> Backend:
    """The ``compute`` function of backend ``name``; ``"auto"`` chooses for ``problem``."""
    if name == "auto":
        name = choose_backend(problem)
    return importlib.import_module(BACKENDS[name]).compute


def choose_backend(problem: Problem) -> str:
    """The fastest backend available for ``problem``."""
    return "reference"
