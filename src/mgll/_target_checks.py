"""Input checks of the soft-target constructors in :mod:`mgll.targets` (private).

Each helper takes the argument's name so that its error names the argument, the expected and
the received value.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


def _unit_rows(x: Tensor) -> Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _ids_tensor(name: str, ids: object) -> Tensor:
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"`{name}` must hold integer or bool ids, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"`{name}` must be 1-D (N,), got shape {tuple(ids.shape)}")
        return ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(
            f"`{name}` must be a 1-D integer tensor or a sequence of hashable keys, got "
            f"{type(ids).__name__}"
        )
    return _encode_keys(ids, ids)[0]


def _encode_keys(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[Tensor, Tensor]:
    codes: dict[Hashable, int] = {}
    out = []
    for name, keys in (("ids_a", a), ("ids_b", b)):
        row = []
        for j, key in enumerate(keys):
            try:
                row.append(codes.setdefault(key, len(codes)))
            except TypeError:
                raise TypeError(
                    f"`{name}[{j}]` must be hashable (an id or a key such as a string), got "
                    f"{type(key).__name__}"
                ) from None
        out.append(torch.tensor(row, dtype=torch.long))
    return out[0], out[1]


def _multi_hot(name: str, x: object, classes: int | None = None, soft: bool = False) -> Tensor:
    """Validated label sets as float (at least float32); ``soft`` also allows floats in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a (rows, C_g) multi-hot tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D (rows, C_g) multi-hot, got shape {tuple(x.shape)}")
    if classes is not None and x.shape[1] != classes:
        raise ValueError(
            f"`{name}` must have C_g={classes} columns to match `a`, got {tuple(x.shape)}"
        )
    if x.is_complex():
        raise TypeError(f"`{name}` must be real 0/1 entries, got dtype {x.dtype}")
    if soft and x.is_floating_point():
        bad = ~((x >= 0) & (x <= 1))  # also NaN
        if bool(bad.any()):
            raise ValueError(
                f"`{name}` multi-hot entries must be 0/1 or label probabilities in [0, 1], got "
                f"{x[bad][0].item()}"
            )
    elif x.dtype != torch.bool and bool(((x != 0) & (x != 1)).any()):
        bad = x[(x != 0) & (x != 1)][0].item()
        raise ValueError(f"`{name}` multi-hot entries must be 0 or 1, got {bad}")
    return x.to(
        torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    )


def _ancestor_matrix(ancestors: object, classes: int) -> Tensor:
    if not isinstance(ancestors, Tensor):
        raise TypeError(
            f"`ancestors` must be a (C_g, C_g) tensor (LabelHierarchy.matrix), got "
            f"{type(ancestors).__name__}"
        )
    if tuple(ancestors.shape) != (classes, classes):
        raise ValueError(
            f"`ancestors` must have shape (C_g, C_g) = {(classes, classes)} to match the label "
            f"sets, got {tuple(ancestors.shape)}"
        )
    return (ancestors != 0).to(torch.float32)


def _cooc(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}")
    x = x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    if bool((x < 0).any()):
        raise ValueError(f"`{name}` must be non-negative, got min {float(x.min())}")
    return x
