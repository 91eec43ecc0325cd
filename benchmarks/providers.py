"""What the benchmark compares: the inputs of one point and the providers that compute a loss.

A *provider* turns the inputs of a point into two callables, ``forward()`` (the loss, features
requiring grad, no backward) and ``step()`` (one forward+backward to the image features, the
text features and the logit scale: the step a trainer pays for).  Providers:

* ``naive``: the composition of torch ops the authors' code uses (``benchmarks/naive.py``);
* ``mgll-<backend>`` and ``mgll-<backend>+compile``: every backend of
  :func:`mgll.available_backends` (``auto`` excluded), eager and under ``torch.compile``;
* ``open_clip``: open_clip's ``ClipLoss`` once per granularity (plain CLIP: less work, one
  hard target per row, no pointwise or consistency term);
* ``floor``: the matrix products alone, per granularity the logits ``X T^T`` in forward and the
  two gradient products ``dZ T`` and ``dZ^T X`` in backward, which no implementation avoids.

Inputs are paired mode (docs/concepts.rst): G granularities with K_g = N texts each and integer
class ids from coarse to fine (8, N/8 and N/2 classes), features drawn from N(0, 1).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: Logit scale used by every point (CLIP's learned temperature settles near 1/0.07 ~ 14).
LOGIT_SCALE = 14.0
#: Fixed providers, in display order; mgll backends are inserted after ``naive``.
FIXED = ("naive", "open_clip", "floor")


class Skip(Exception):
    """A provider that cannot run this point; the message is the recorded reason."""


@dataclass
class Inputs:
    """One point's batch: features requiring grad, a logit scale and paired class ids."""

    image: Tensor
    texts: list[Tensor]
    scale: Tensor
    labels: list[Tensor]

    @property
    def leaves(self) -> list[Tensor]:
        return [self.image, *self.texts, self.scale]


def class_counts(n: int, g: int) -> list[int]:
    """Distinct class ids per granularity, coarse to fine: 8, N/8, N/2 (at least 2 each)."""
    return [max(2, c) for c in (8, n // 8, n // 2)][:g]


def make_inputs(
    n: int, g: int, d: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> Inputs:
    """Random paired-mode inputs for N images, G granularities and width D."""
    if g < 1 or g > 3:
        raise ValueError(f"`g` must be 1, 2 or 3, got {g}")
    gen = torch.Generator(device).manual_seed(seed)

    def feats() -> Tensor:
        x = torch.randn(n, d, generator=gen, device=device).to(dtype)
        return x.requires_grad_(True)

    image = feats()
    texts = [feats() for _ in range(g)]
    labels = [torch.randint(0, c, (n,), generator=gen, device=device) for c in class_counts(n, g)]
    scale = torch.tensor(LOGIT_SCALE, device=device, dtype=torch.float32, requires_grad=True)
    return Inputs(image, texts, scale, labels)


# ------------------------------------------------------------------------------- providers


def provider_names(device: str, include_compile: bool = True) -> list[str]:
    """Every provider that may run on ``device`` (unavailable ones are kept and skipped)."""
    import mgll

    names = ["naive"]
    for backend in mgll.available_backends():
        if backend == "auto":
            continue
        names.append(f"mgll-{backend}")
        if include_compile and backend != "triton":  # triton kernels: torch.compile n/a
            names.append(f"mgll-{backend}+compile")
    return [*names, "open_clip", "floor"]


def skip_reason(name: str, device: str) -> str | None:
    """Why provider ``name`` cannot run on ``device`` at all, or None."""
    base = name.removesuffix("+compile")
    if base == "mgll-triton" and device != "cuda":
        return "triton backend needs CUDA (the interpreter is a test tool, not a benchmark)"
    if base == "open_clip" and importlib.util.find_spec("open_clip") is None:
        return "open_clip is not installed"
    return None


def build(name: str, inp: Inputs) -> tuple[Callable[[], Tensor], Callable[[], object]]:
    """``(forward, step)`` callables for provider ``name`` on ``inp``; raises :class:`Skip`."""
    reason = skip_reason(name, inp.image.device.type)
    if reason:
        raise Skip(reason)
    base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    if base == "floor":
        return _floor(inp)
    loss = _loss_fn(base)
    if compiled:
        loss = torch.compile(loss)

    def forward() -> Tensor:
        return loss(inp.image, inp.texts, inp.scale, inp.labels)

    def step() -> tuple[Tensor, ...]:
        return torch.autograd.grad(forward(), inp.leaves)

    return forward, step


def _loss_fn(base: str) -> Callable[..., Tensor]:
    if base == "naive":
        return naive_loss()
    if base == "open_clip":
        clip = _open_clip_loss_module().ClipLoss()

        def clip_loss(image, texts, scale, labels):  # plain CLIP per granularity, like for like
            image = F.normalize(image, dim=-1)
            return sum(clip(image, F.normalize(t, dim=-1), scale) for t in texts)

        return clip_loss
    if base.startswith("mgll-"):
        import mgll

        backend = base.removeprefix("mgll-")
        if backend not in mgll.available_backends():
            raise Skip(f"mgll backend {backend!r} is not available in this installation")

        def mgll_loss(image, texts, scale, labels):
            # The paper's sample-level smooth KL: the same math as the naive composition.
            return mgll.mgll_loss(
                image, texts, scale, labels=labels, smooth_kl_support="samples", backend=backend
            )

        return mgll_loss
    raise ValueError(f"unknown provider {base!r}")


def _open_clip_loss_module():
    """open_clip's ``loss.py``, loaded on its own: it needs only torch, while importing the
    package (models, tokenizers, transformers) takes 10-20 s on a busy machine, per worker."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    try:
        loader = importlib.util.spec_from_file_location("_open_clip_loss", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    except (ImportError, OSError):  # a layout that needs the package: import it whole
        return importlib.import_module("open_clip.loss")


def _floor(inp: Inputs) -> tuple[Callable[[], Tensor], Callable[[], object]]:
    """The matrix products alone: Z = s X T^T, then dZ T and dZ^T X (dZ stands in for Z)."""
    x, ts, s = inp.image.detach(), [t.detach() for t in inp.texts], inp.scale.detach()

    @torch.no_grad()
    def forward() -> Tensor:
        return [s * (x @ t.T) for t in ts][-1]

    @torch.no_grad()
    def step() -> list[Tensor]:
        grads = []
        for t in ts:
            z = s * (x @ t.T)
            grads += [z @ t, z.T @ x]
        return grads

    return forward, step


def naive_loss() -> Callable[..., Tensor]:
    """``naive_mgll_loss`` from ``benchmarks/naive.py`` (the authors' composition of ops)."""
    from naive import naive_mgll_loss

    return naive_mgll_loss
