"""Checks at the public boundary (SPEC section 8): clear errors before any compute.

Every message names the argument, says what was expected and echoes what was received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

OPTIONS = {
    "pointwise_target": ("binary", "soft"),
    "pointwise_norm": ("pairs", "images"),
    "smooth_kl_support": ("samples", "coarse"),
}


def check_option(name: str, value: object) -> None:
    allowed = OPTIONS[name]
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")


def check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"`{name}` must be finite and non-negative, got {value}")
    return float(value)


def check_granularity_weights(value: Sequence[float] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise TypeError(
            f"`granularity_weights` must be a non-empty sequence of numbers, got {value!r}"
        )
    return tuple(check_weight(f"granularity_weights[{g}]", w) for g, w in enumerate(value))


def check_features(image: object, texts: object) -> list[Tensor]:
    """Image (N, D) and text features (a sequence of G (K_g, D) tensors) of one float dtype."""
    _check_float_matrix("image_features", image)
    if isinstance(texts, Tensor) or not isinstance(texts, Sequence) or len(texts) == 0:
        got = (
            f"a tensor of shape {tuple(texts.shape)}"
            if isinstance(texts, Tensor)
            else repr(type(texts).__name__)
        )
        raise TypeError(
            "`text_features` must be a non-empty sequence of G tensors (one (K_g, D) tensor per "
            f"granularity), got {got}"
        )
    n, d = image.shape
    if n == 0:
        raise ValueError("`image_features` is an empty batch (N=0); MGLL needs at least one image")
    for g, t in enumerate(texts):
        _check_float_matrix(f"text_features[{g}]", t)
        if t.shape[1] != d:
            raise ValueError(
                f"`text_features[{g}]` must have {d} columns to match `image_features` "
                f"(N={n}, D={d}), got {tuple(t.shape)}"
            )
        if t.shape[0] == 0:
            raise ValueError(
                f"`text_features[{g}]` is empty (K_{g}=0); every granularity needs a text"
            )
        _check_same_device(f"text_features[{g}]", t, image)
        if t.dtype != image.dtype:
            raise TypeError(
                f"`text_features[{g}]` must have the dtype of `image_features` ({image.dtype}), got {t.dtype}"
            )
    for name, x in [("image_features", image)] + [
        (f"text_features[{g}]", t) for g, t in enumerate(texts)
    ]:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"`{name}` contains NaN or infinite values")
    return list(texts)


def check_scale_and_bias(scale: object, bias: object, image: Tensor) -> None:
    for name, value, positive in (("logit_scale", scale, True), ("logit_bias", bias, False)):
        if value is None and name == "logit_bias":
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a scalar tensor, got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(
                f"`{name}` must be a scalar tensor (one element), got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}")
        _check_same_device(name, value, image)
        v = float(value.detach())
        if not (v == v and abs(v) != float("inf")):
            raise ValueError(f"`{name}` must be finite, got {v}")
        if positive and v <= 0:
            raise ValueError(
                f"`{name}` must be positive (already exponentiated, open_clip convention), got {v}"
            )


def check_labels_or_targets(
    labels: object, targets: object, image: Tensor, texts: Sequence[Tensor]
) -> tuple[str, list[Tensor]]:
    """Exactly one of ``labels`` (paired) and ``targets`` (bank); returns the mode and tensors."""
    if (labels is None) == (targets is None):
        which = "both" if labels is not None else "neither"
        raise ValueError(
            "pass exactly one of `labels` (paired mode: per granularity (N,) ids or (N, C_g) "
            f"multi-hot) and `targets` (bank mode: per granularity (N, K_g) co-occurrence), got {which}"
        )
    name, values = ("labels", labels) if labels is not None else ("targets", targets)
    g_count = len(texts)
    if isinstance(values, Tensor) or not isinstance(values, Sequence):
        raise TypeError(
            f"`{name}` must be a sequence of G={g_count} tensors, got {type(values).__name__}"
        )
    if len(values) != g_count:
        raise ValueError(
            f"`{name}` must have one entry per granularity: G={g_count} from `text_features`, "
            f"got {len(values)}"
        )
    n = image.shape[0]
    for g, v in enumerate(values):
        if not isinstance(v, Tensor):
            raise TypeError(f"`{name}[{g}]` must be a tensor, got {type(v).__name__}")
        _check_same_device(f"{name}[{g}]", v, image)
        if name == "labels":
            _check_labels(g, v, n, texts[g])
        else:
            _check_targets(g, v, n, texts[g])
    return ("paired" if name == "labels" else "bank"), list(values)


def _check_labels(g: int, labels: Tensor, n: int, text: Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"`labels[{g}]` must be integer ids (N,) or bool/integer multi-hot (N, C_g), got dtype "
            f"{labels.dtype}; pass float co-occurrence matrices as `targets` instead"
        )
    if labels.dim() not in (1, 2) or labels.shape[0] != n:
        raise ValueError(
            f"`labels[{g}]` must have shape (N,) or (N, C_g) with N={n}, got {tuple(labels.shape)}"
        )
    if text.shape[0] != n:
        raise ValueError(
            f"paired mode (`labels`) needs one text per image: `text_features[{g}]` must have "
            f"N={n} rows, got {tuple(text.shape)}; pass a text bank with `targets` instead"
        )
    if labels.dtype != torch.bool and bool((labels < 0).any()):
        kind = "ids" if labels.dim() == 1 else "multi-hot entries"
        raise ValueError(f"`labels[{g}]` {kind} must be non-negative, got min {int(labels.min())}")
    if labels.dim() == 2 and labels.dtype != torch.bool and bool((labels > 1).any()):
        raise ValueError(
            f"`labels[{g}]` multi-hot entries must be 0 or 1, got max {int(labels.max())}"
        )


def _check_targets(g: int, targets: Tensor, n: int, text: Tensor) -> None:
    expected = (n, text.shape[0])
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"`targets[{g}]` must have shape (N, K_{g}) = {expected} to match `image_features` and "
            f"`text_features[{g}]`, got {tuple(targets.shape)}"
        )
    if targets.is_complex():
        raise TypeError(f"`targets[{g}]` must be real, got {targets.dtype}")
    if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        raise ValueError(f"`targets[{g}]` contains NaN or infinite values")
    if targets.dtype != torch.bool and bool((targets < 0).any()):
        raise ValueError(f"`targets[{g}]` must be non-negative, got min {float(targets.min())}")


def check_granularity_count(weights: tuple[float, ...] | None, g_count: int) -> None:
    if weights is not None and len(weights) != g_count:
        raise ValueError(
            f"`granularity_weights` must have one weight per granularity: G={g_count} from "
            f"`text_features`, got {len(weights)}"
        )


def check_reference(reference: int | None, g_count: int) -> None:
    if reference is not None and not (isinstance(reference, int) and 0 <= reference < g_count):
        raise ValueError(
            f"`smooth_kl_reference` must be a granularity index in [0, {g_count - 1}] or None, "
            f"got {reference!r}"
        )


def _check_float_matrix(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D (rows, D), got shape {tuple(x.shape)}")


def _check_same_device(name: str, x: Tensor, image: Tensor) -> None:
    if x.device != image.device:
        raise ValueError(
            f"`{name}` is on {x.device} but `image_features` is on {image.device}; "
            "mgll never moves tensors, put them on one device"
        )
