"""Backends: interchangeable implementations of the same loss (docs/backends.rst).

A backend is a function ``compute(problem, config) -> LossTerms``.  Backends are imported only
when first used, so optional ones (triton) never load with ``import mgll``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import numbers
import os
from collections.abc import Callable, Sequence

import torch

from mgll._problem import LossConfig, LossTerms, Problem

Backend = Callable[[Problem, LossConfig], LossTerms]

#: Backend name -> module implementing ``compute``.  ``"auto"`` picks among these.
BACKENDS: dict[str, str] = {
    "reference": "mgll.backends.reference",
    "fused": "mgll.backends.fused",
    "tiled": "mgll.backends.tiled",
    "triton": "mgll.backends.triton_kernels",
}


def available_backends(device: str | torch.device | None = None) -> tuple[str, ...]:
    """The names ``MGLLLoss(backend=...)`` can run with here, on ``device``.

    ``"auto"``, ``"reference"``, ``"fused"`` and ``"tiled"`` run everywhere.  ``"triton"`` is
    listed only where it can run: triton is installed and the tensors are on CUDA (with CUDA
    available), or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    Asking for ``backend="triton"`` anywhere else raises the error this rule predicts: an
    :class:`ImportError` naming the ``[triton]`` extra without triton, a
    :class:`ValueError` for tensors that are not on CUDA.

    Args:
        device: where the features will live (``"cpu"``, ``"cuda:0"``, a
            :class:`torch.device`); default: CUDA when it is available, else the CPU.

    Returns:
        A tuple of names, ``"auto"`` first.

    Raises:
        TypeError: if ``device`` is not a string, a :class:`torch.device` or None.

    Example:
        >>> import mgll
        >>> mgll.available_backends("cpu")[:4]
        ('auto', 'reference', 'fused', 'tiled')
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif isinstance(device, str):
        device = torch.device(device)
    elif not isinstance(device, torch.device):
        raise TypeError(
            f"`device` must be a string such as 'cpu' or 'cuda', a torch.device or None, "
            f"got {type(device).__name__}"
        )
    return tuple(name for name in ("auto", *BACKENDS) if _runs_on(name, device))


def _runs_on(name: str, device: torch.device) -> bool:
    if name != "triton":
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, problem: Problem) -> Backend:
    """The ``compute`` function of backend ``name``; ``"auto"`` chooses for ``problem``."""
    if name == "auto":
        name = choose_backend(problem)
    return importlib.import_module(BACKENDS[name]).compute


#: Default of :func:`set_memory_budget`: 2 GiB for the full-size buffers of ``"fused"``.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3

_memory_budget = DEFAULT_MEMORY_BUDGET


def set_memory_budget(nbytes: int | None) -> None:
    r"""Set how many bytes ``backend="auto"`` may spend on full-size logit buffers.

    ``"auto"`` picks ``"fused"`` while the :math:`N \times K_g` logits and their gradient of
    all granularities fit in this budget, and ``"tiled"`` (which never holds them) beyond it.
    The budget is a process-wide setting; ``None`` restores the default (2 GiB).

    Args:
        nbytes: the budget in bytes, a positive integer, or None for the default.

    Raises:
        TypeError: if ``nbytes`` is not an integer or None.
        ValueError: if ``nbytes`` is not positive.

    Example:
        >>> import mgll
        >>> mgll.set_memory_budget(512 * 1024**2)
        >>> mgll.get_memory_budget()
        536870912
        >>> mgll.set_memory_budget(None)
    """
    global _memory_budget
    if nbytes is None:
        _memory_budget = DEFAULT_MEMORY_BUDGET
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(
            f"`nbytes` must be an integer number of bytes or None, got {type(nbytes).__name__}"
        )
    if nbytes <= 0:
        raise ValueError(f"`nbytes` must be positive, got {nbytes}")
    _memory_budget = int(nbytes)


def get_memory_budget() -> int:
    """The budget in bytes that ``backend="auto"`` allows the full-size logit buffers.

    Example:
        >>> import mgll
        >>> mgll.get_memory_budget() > 0
        True
    """
    return _memory_budget


def logits_bytes(problem: Problem) -> int:
    """Bytes of the logits and their gradient that ``"fused"`` would hold for ``problem``."""
    return 2 * problem.image.element_size() * _logit_count(problem)


def _logit_count(problem: Problem) -> int:
    """Logits that ``"fused"`` holds for ``problem``: its row block and its column block."""
    widths = [t.shape[0] for t in problem.texts]
    return logit_count(problem.num_images, widths, problem.rows, problem.cols)


def logit_count(n: int, widths: Sequence[int], rows: slice, cols: Sequence[slice]) -> int:
    """Logits that ``"fused"`` holds for N images, texts of ``widths`` K_g, and this process's
    ``rows`` and ``cols``: N x K_g each for the whole batch, its row and column blocks else."""
    full = rows == slice(None) and all(c == slice(None) for c in cols)
    local = len(range(n)[rows])
    return sum(
        n * k if full else local * k + n * len(range(k)[c])
        for k, c in zip(widths, cols, strict=True)
    )


def auto_backend(device: torch.device, dtype: torch.dtype, logits: int) -> str:
    """What ``backend="auto"`` runs: the one policy of the eager and compiled paths.

    ``"triton"`` on CUDA when Triton is installed and the backend is registered (unknown labels
    included: docs/partial_annotation.rst); otherwise ``"fused"``, or ``"tiled"`` when the
    ``logits`` elements and their gradient, in the compute ``dtype``, would exceed the budget
    of :func:`set_memory_budget`.
    """
    triton = "triton" in BACKENDS and importlib.util.find_spec("triton") is not None
    if device.type == "cuda" and triton:
        return "triton"
    return "tiled" if 2 * dtype.itemsize * logits > get_memory_budget() else "fused"


def fused_would_run(image, texts, rows: slice | None = None, cols=None) -> bool:
    """Whether ``"auto"`` picks ``"fused"``, from shapes alone: for one process's full batch,
    or for its ``rows`` and ``cols`` of a distributed batch."""
    dtype = torch.promote_types(image.dtype, torch.float32)
    widths = [t.shape[0] for t in texts]
    rows, cols = rows or slice(None), cols or [slice(None)] * len(texts)
    logits = logit_count(image.shape[0], widths, rows, cols)
    return auto_backend(image.device, dtype, logits) == "fused"


def choose_backend(problem: Problem) -> str:
    """The fastest backend available for ``problem`` (:func:`auto_backend`)."""
    return auto_backend(problem.image.device, problem.image.dtype, _logit_count(problem))


def first_order_only(name: str):
    """Decorate an analytic ``backward``: refuse to build a second-order graph, clearly.

    The analytic backends return exact first-order gradients but do not differentiate them
    again.  A backward pass that must itself be differentiable (``create_graph=True``) runs in
    grad mode; there, instead of returning a gradient whose own gradient is silently wrong, raise
    an error that names the backend and the one that supports it.
    """

    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f'backend="{name}" computes exact first-order gradients but cannot '
                    "differentiate them again (a backward pass with create_graph=True, e.g. "
                    "torch.autograd.grad(loss, x, create_graph=True)); use "
                    'MGLLLoss(backend="reference") for second-order gradients (gradient '
                    'penalties, Hessian-vector products, MAML). backend="auto" picks "fused" or '
                    '"tiled" on the CPU and "triton" on CUDA, so it needs backend="reference" too'
                )
            return backward(ctx, *grads)

        return checked

    return wrap
