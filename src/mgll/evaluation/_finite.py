"""The one finiteness rule of the evaluation layer: a NaN or inf input is an error, never ranked."""

from __future__ import annotations

import torch
from torch import Tensor


def finite(name: str, x: Tensor, where: Tensor | None = None) -> Tensor:
    """``x`` as float64 after checking it is real and finite (at ``where`` only, if given).

    A NaN sorts as the largest value and an inf saturates a fit, so either would give a
    normal-looking metric; the message names the first bad entry so the user can trace it.
    """
    if x.is_complex():
        raise ValueError(f"`{name}` must be real, got dtype {x.dtype}")
    v = x.detach().double()
    bad = ~torch.isfinite(v)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"`{name}` must be finite (no NaN or infinite values), got {int(bad.sum())} "
            f"non-finite value(s), the first {v[first].item()} at index {first}; check the "
            "model's outputs (a diverged run or an fp16 overflow) before evaluating"
        )
    return v
