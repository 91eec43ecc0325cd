"""Value checks at the public boundary (docs/errors.rst), used by :mod:`mgll._validation`.

*Values* (finiteness, signs, zero norms) read the data.  All value conditions of one call are
reduced on the tensors' device and read back with a single host synchronisation
(:func:`check_values`); only when one fails are they re-examined one by one to write the
message.  ``validate=False`` skips this part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: A row whose L2 norm is at most this is "zero" for ``F.normalize`` (its default ``eps``).
NORM_EPS = 1e-12

#: The largest accepted ``|logit_bias|``.  A sigmoid saturates in every float type long before
#: (sigma(+-100) is exactly 0 or 1 in float32), and the pointwise term sums N * K_g values of
#: about ``|b|``: below this bound that sum cannot overflow float32 (a bias of 1e37 gave inf).
MAX_LOGIT_BIAS = 1e6

#: A value condition: a 0-dim bool tensor that is True when the input is valid, and the
#: function that raises the detailed error when it is not (called on the error path only).
Condition = tuple[Tensor, Callable[[], None]]


def check_values(conditions: Sequence[Condition]) -> None:
    """Evaluate every condition with one host synchronisation; raise the first failure."""
    if not conditions:
        return
    if bool(torch.stack([ok for ok, _ in conditions]).all()):
        return
    for ok, fail in conditions:
        if not bool(ok):
            fail()
    raise RuntimeError("internal error: a failing value check did not say why")  # pragma: no cover


def batch_conditions(
    image: Tensor,
    texts: Sequence[Tensor],
    scale: Tensor,
    bias: Tensor | None,
    mode: str,
    values: Sequence[Tensor],
    normalize: bool,
) -> list[Condition]:
    """The value conditions of :func:`mgll.functional.mgll_loss` (docs/errors.rst)."""
    features = [("image_features", image)] + [
        (f"text_features[{g}]", t) for g, t in enumerate(texts)
    ]
    conditions = []
    for name, x in features:
        conditions.extend(_unit_norm(name, x) if normalize else [_finite(name, x)])
    conditions.append(_scalar_condition("logit_scale", scale, positive=True))
    if bias is not None:
        conditions.append(_scalar_condition("logit_bias", bias, positive=False))
        conditions.append(_bias_bound(bias))
    name = "labels" if mode == "paired" else "targets"
    for g, x in enumerate(values):
        if mode == "bank":
            conditions.extend(_nonnegative(f"targets[{g}]", x))
        elif x.dtype != torch.bool:
            conditions.extend(_label_range(f"{name}[{g}]", x))
    return conditions


def _finite(name: str, x: Tensor) -> Condition:
    return torch.isfinite(x.detach()).all(), lambda: _raise_not_finite(name, x)


def _raise_not_finite(name: str, x: Tensor) -> None:
    bad = (~torch.isfinite(x.detach())).nonzero()
    if len(bad):
        index = tuple(bad[0].tolist())
        raise ValueError(
            f"`{name}` must be finite (no NaN or inf), got {x.detach()[index].item()} at "
            f"index {index}"
        )


def _nonnegative(name: str, x: Tensor) -> list[Condition]:
    """Finite (when floating point) and >= 0 (when not bool): co-occurrence, owners, groups."""
    conditions = [_finite(name, x)] if x.is_floating_point() else []
    if x.dtype == torch.bool:
        return conditions

    def fail() -> None:
        raise ValueError(f"`{name}` must be non-negative, got min {x.detach().min().item()}")

    return [*conditions, ((x.detach() >= 0).all(), fail)]


def _label_range(name: str, labels: Tensor) -> list[Condition]:
    def negative() -> None:
        kind = "ids" if labels.dim() == 1 else "multi-hot entries"
        raise ValueError(f"`{name}` {kind} must be non-negative, got min {int(labels.min())}")

    def not_binary() -> None:
        raise ValueError(f"`{name}` multi-hot entries must be 0 or 1, got max {int(labels.max())}")

    if labels.is_floating_point():  # (N, C_g) label probabilities
        in_range = ((labels >= 0) & (labels <= 1)).all()
        return [_finite(name, labels), (in_range, _outside(name, labels))]
    conditions = [((labels >= 0).all(), negative)]
    if labels.dim() == 2:
        conditions.append(((labels <= 1).all(), not_binary))
    return conditions


def _outside(name: str, labels: Tensor) -> Callable[[], None]:
    def fail() -> None:
        bad = ((labels < 0) | (labels > 1)).nonzero()[0]
        raise ValueError(
            f"`{name}` multi-hot entries must be label probabilities in [0, 1], got "
            f"{labels[tuple(bad.tolist())].item()} at index {tuple(bad.tolist())}; map uncertain "
            "labels to a probability (e.g. 0.5) and unknown ones to 0 before the loss"
        )

    return fail


def _unit_norm(name: str, x: Tensor) -> list[Condition]:
    """Finite entries and a row norm that ``F.normalize`` can divide by (0 < norm < inf)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    norms = torch.linalg.vector_norm(x.detach(), dim=1, dtype=dtype)

    def not_finite() -> None:
        _raise_not_finite(name, x)  # NaN or inf entries; else the norm itself overflows
        row = int((~torch.isfinite(norms)).nonzero()[0])
        raise ValueError(
            f"`{name}` row {row} has finite entries but an L2 norm that overflows {dtype}; "
            "it cannot be normalised (scale the features down)"
        )

    def zero() -> None:
        row = int((norms <= NORM_EPS).nonzero()[0])
        raise ValueError(
            f"`{name}` row {row} has zero L2 norm (<= {NORM_EPS:g}, got {norms[row].item():g}); "
            "with `normalize=True` its direction, and so every cosine logit, is undefined. "
            "Drop or replace that row, or pass `normalize=False` with your own normalisation"
        )

    return [(torch.isfinite(norms).all(), not_finite), ((norms > NORM_EPS).all(), zero)]


def _scalar_condition(name: str, value: Tensor, positive: bool) -> Condition:
    v = value.detach().reshape(())
    ok = torch.isfinite(v) & (v > 0) if positive else torch.isfinite(v)

    def fail() -> None:
        got = v.item()
        if got != got or abs(got) == float("inf"):
            raise ValueError(f"`{name}` must be finite, got {got}")
        raise ValueError(
            f"`{name}` must be positive (already exponentiated, open_clip convention), got {got}"
        )

    return ok, fail


def _bias_bound(bias: Tensor) -> Condition:
    """``|logit_bias| <= MAX_LOGIT_BIAS`` (a NaN or inf bias fails the finiteness check first)."""
    b = bias.detach().reshape(())

    def fail() -> None:
        raise ValueError(
            f"`logit_bias` must lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (a sigmoid bias: "
            f"SigLIP starts at -10; beyond this the pointwise sums can overflow), got {b.item():g}"
        )

    return ~(b.abs() > MAX_LOGIT_BIAS), fail
