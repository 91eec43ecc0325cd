"""Checks at the public boundary (docs/errors.rst): clear errors before any compute.

Every message names the argument, says what was expected and echoes what was received.

Two kinds of check:

* *structure* (types, ranks, shapes, dtypes, devices, option values) reads only tensor
  metadata and costs nothing; it always runs.
* *values* (finiteness, signs, zero norms) reads the data.  All value conditions of one call
  are reduced on the tensors' device and read back with a single host synchronisation
  (:func:`check_values`); only when one fails are they re-examined one by one to write the
  message.  ``validate=False`` skips this part.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

OPTIONS = {
    "pointwise_target": ("binary", "soft", "graded"),
    "pointwise_norm": ("pairs", "images"),
    "smooth_kl_support": ("samples", "coarse"),
}


# ----------------------------------------------------------------------------- settings


def check_option(name: str, value: object) -> None:
    allowed = OPTIONS[name]
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"`{name}` must be finite and non-negative, got {value}")
    return float(value)


def check_term_weight(name: str, value: object) -> float | tuple[float, ...]:
    """A term weight: one number, or a non-empty sequence of one number per granularity."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(
                f"`{name}` must be one number or one number per granularity, got an empty "
                f"sequence; pass a float, or a sequence of length G"
            )
        return tuple(check_weight(f"{name}[{g}]", w) for g, w in enumerate(value))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a real number or a sequence of one per granularity, "
            f"got {type(value).__name__}"
        )
    return check_weight(name, value)


def check_term_weight_count(name: str, weight: object, g_count: int) -> None:
    if isinstance(weight, tuple) and len(weight) != g_count:
        raise ValueError(
            f"`{name}` must have one weight per granularity: G={g_count} from "
            f"`text_features`, got {len(weight)} ({weight}); pass {g_count} values or one float"
        )


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


def check_granularity_count(weights: tuple[float, ...] | None, g_count: int) -> None:
    if weights is not None and len(weights) != g_count:
        raise ValueError(
            f"`granularity_weights` must have one weight per granularity: G={g_count} from "
            f"`text_features`, got {len(weights)}"
        )


def check_reference(reference: int | None, g_count: int) -> None:
    valid = isinstance(reference, int) and not isinstance(reference, bool)
    if reference is not None and not (valid and 0 <= reference < g_count):
        raise ValueError(
            f"`smooth_kl_reference` must be a granularity index in [0, {g_count - 1}] or None, "
            f"got {reference!r}"
        )


# ----------------------------------------------------------------------------- structure


def check_features(image: object, texts: object, allow_empty: bool = False) -> list[Tensor]:
    """Image (N, D) and text features (a sequence of G (K_g, D) tensors) of one float dtype.

    ``allow_empty``: N = 0 is valid (a rank without samples under ``torch.distributed``; the
    global batch is checked once gathered).
    """
    _check_float_matrix("image_features", image)
    if image.is_meta:
        raise ValueError(
            "`image_features` is a meta tensor (no data: device='meta'); the loss needs the "
            "values, so build the model and its inputs on a real device (e.g. call "
            "`model.to_empty(device=...)` and load weights) before computing it"
        )
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
    if n == 0 and not allow_empty:
        raise ValueError("`image_features` is an empty batch (N=0); MGLL needs at least one image")
    for g, t in enumerate(texts):
        _check_float_matrix(f"text_features[{g}]", t)
        if t.shape[1] != d:
            _check_not_transposed(image, texts, g)
            raise ValueError(
                f"`text_features[{g}]` must have {d} columns to match `image_features` "
                f"(N={n}, D={d}), got {tuple(t.shape)}"
            )
        if t.shape[0] == 0 and not (allow_empty and n == 0):  # paired on an empty rank: K_g = 0
            raise ValueError(
                f"`text_features[{g}]` is empty (K_{g}=0); every granularity needs a text"
            )
        check_same_device(f"text_features[{g}]", t, image)
        if t.dtype != image.dtype:
            raise TypeError(
                f"`text_features[{g}]` must have the dtype of `image_features` ({image.dtype}), "
                f"got {t.dtype}"
            )
    return list(texts)


def _check_not_transposed(image: Tensor, texts: Sequence[object], g: int) -> None:
    """Blame ``image_features`` when it is (D, N): its rows match the texts' common D."""
    widths = {t.shape[1] for t in texts if isinstance(t, Tensor) and t.dim() == 2}
    if widths == {image.shape[0]}:
        other = f" (or `text_features[{g}].T` if that is the transposed one)"
        raise ValueError(
            f"`image_features` must be (N, D) with the D={image.shape[0]} columns of "
            f"`text_features`, got {tuple(image.shape)}, which looks transposed: pass "
            f"`image_features.T`{other if len(texts) == 1 else ''}"
        )


def check_scalar(name: str, value: object, like: Tensor, like_name: str = "image_features") -> None:
    """A one-element floating-point tensor on the device of ``like``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        learned = " (a learned one, `model.logit_scale.exp()`, is a tensor already)"
        raise TypeError(
            f"`{name}` must be a scalar tensor, got the Python {type(value).__name__} {value!r}; "
            f"pass `torch.tensor({float(value)!r})`{learned if name == 'logit_scale' else ''}"
        )
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must be a scalar tensor (one element), got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}")
    check_same_device(name, value, like, like_name)


def check_scale_and_bias(scale: object, bias: object, image: Tensor) -> None:
    check_scalar("logit_scale", scale, image)
    if isinstance(bias, Sequence) and not isinstance(bias, str | Tensor):
        raise TypeError(
            f"`logit_bias` must be a scalar tensor or None, got a {type(bias).__name__} of "
            f"{len(bias)}: did you pass labels positionally? use labels=[...] (or targets=[...]); "
            "they are keyword-only, after the optional logit_bias"
        )
    if bias is not None:
        check_scalar("logit_bias", bias, image)


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
    for g, x in enumerate(values):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}[{g}]` must be a tensor, got {type(x).__name__}")
        check_same_device(f"{name}[{g}]", x, image)
        if name == "labels":
            _check_labels(g, x, n, texts[g])
        else:
            _check_targets(g, x, n, texts[g])
    return ("paired" if name == "labels" else "bank"), list(values)


def _check_labels(g: int, labels: Tensor, n: int, text: Tensor) -> None:
    if labels.is_complex() or (labels.is_floating_point() and labels.dim() != 2):
        raise TypeError(
            f"`labels[{g}]` must be integer ids (N,) or multi-hot (N, C_g) (bool/integer 0/1, or "
            f"float label probabilities in [0, 1]), got dtype {labels.dtype} with shape "
            f"{tuple(labels.shape)}; pass float co-occurrence matrices as `targets` instead"
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


def _check_targets(g: int, targets: Tensor, n: int, text: Tensor) -> None:
    expected = (n, text.shape[0])
    if targets.dim() != 2 or tuple(targets.shape) != expected:
        raise ValueError(
            f"`targets[{g}]` must have shape (N, K_{g}) = {expected} to match `image_features` and "
            f"`text_features[{g}]`, got {tuple(targets.shape)}"
        )
    if targets.is_complex():
        raise TypeError(f"`targets[{g}]` must be real, got {targets.dtype}")


def check_logits_and_targets(logits: object, targets: object, bias: object = None) -> None:
    """The (N, K) ``logits``, ``targets`` (and scalar ``bias``) of the one-term functions."""
    for name, x in (("logits", logits), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"`{name}` must be 2-D (N, K), got shape {tuple(x.shape)}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"`targets` must have the shape of `logits` {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be floating point, got {logits.dtype}")
    if targets.is_complex():
        raise TypeError(f"`targets` must be real, got {targets.dtype}")
    check_same_device("targets", targets, logits, like_name="logits")
    conditions = [_finite("logits", logits), *_nonnegative("targets", targets)]
    if bias is not None:
        check_scalar("logit_bias", bias, logits, like_name="logits")
        conditions.append(_scalar_condition("logit_bias", bias, positive=False))
        conditions.append(_bias_bound(bias))
    check_values(conditions)


def check_smooth_kl_inputs(logits: object, owners: object, groups: object) -> list[Tensor | None]:
    """G logit matrices (N, K_g), ownerships (K_g, N) or None, groups (N, J) or None."""
    if isinstance(logits, Tensor) or not isinstance(logits, Sequence) or len(logits) == 0:
        raise TypeError(
            f"`logits` must be a non-empty sequence of G (N, K_g) tensors, got {_describe(logits)}"
        )
    for g, z in enumerate(logits):
        _check_float_matrix(f"logits[{g}]", z, f"(N, K_{g})")
    first = logits[0]
    n = first.shape[0]
    if owners is None:
        owners = [None] * len(logits)
    if isinstance(owners, Tensor) or not isinstance(owners, Sequence):
        raise TypeError(
            f"`owners` must be None or a sequence of G={len(logits)} tensors or None, "
            f"got {_describe(owners)}"
        )
    if len(owners) != len(logits):
        raise ValueError(f"`owners` must have G={len(logits)} entries, got {len(owners)}")
    conditions = []
    for g, (z, r) in enumerate(zip(logits, owners, strict=True)):
        if z.shape[0] != n:
            raise ValueError(f"`logits[{g}]` must have shape (N={n}, K_{g}), got {tuple(z.shape)}")
        check_same_device(f"logits[{g}]", z, first, like_name="logits[0]")
        conditions.append(_finite(f"logits[{g}]", z))
        if r is None:
            if z.shape[1] != n:
                raise ValueError(
                    f"`logits[{g}]` must be square (N, N) when `owners[{g}]` is None (paired), "
                    f"got {tuple(z.shape)}"
                )
            continue
        _check_real_tensor(f"owners[{g}]", r, (z.shape[1], n), f"(K_{g}, N)", first)
        conditions.extend(_nonnegative(f"owners[{g}]", r))
    if groups is not None:
        _check_real_tensor("groups", groups, (n, None), "(N, J)", first)
        conditions.extend(_nonnegative("groups", groups))
    check_values(conditions)
    return list(owners)


def check_same_device(
    name: str, x: Tensor, like: Tensor, like_name: str = "image_features"
) -> None:
    if x.device != like.device:
        raise ValueError(
            f"`{name}` is on {x.device} but `{like_name}` is on {like.device}; "
            "mgll never moves tensors, put them on one device"
        )


def _check_float_matrix(name: str, x: object, letters: str = "(rows, D)") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D {letters}, got shape {tuple(x.shape)}")


def _check_real_tensor(
    name: str, x: object, shape: tuple[int | None, ...], letters: str, like: Tensor
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got {x.dtype}")
    if x.dim() != len(shape) or any(
        e is not None and e != s for e, s in zip(shape, x.shape, strict=False)
    ):
        expected = ", ".join("any" if e is None else str(e) for e in shape)
        raise ValueError(f"`{name}` must have shape {letters} = ({expected}), got {tuple(x.shape)}")
    check_same_device(name, x, like, like_name="logits[0]")


def _describe(x: object) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


# ------------------------------------------------------------------ value checks (one sync)

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
    # a paired sample unannotated at g has no text there: its row may be anything finite
    ignored = [None] + [unannotated_rows(x) if mode == "paired" else None for x in values]
    conditions = []
    for (name, x), skip in zip(features, ignored, strict=True):
        conditions.extend(_unit_norm(name, x, skip) if normalize else [_finite(name, x)])
    conditions.append(_scalar_condition("logit_scale", scale, positive=True))
    if bias is not None:
        conditions.append(_scalar_condition("logit_bias", bias, positive=False))
        conditions.append(_bias_bound(bias))
    name = "labels" if mode == "paired" else "targets"
    for g, x in enumerate(values):
        if mode == "bank":  # NaN: an unknown pair (docs/partial_annotation.rst)
            conditions.extend(_nonnegative(f"targets[{g}]", x, unknown_ok=True))
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


def _nonnegative(name: str, x: Tensor, unknown_ok: bool = False) -> list[Condition]:
    """Finite (when floating point) and >= 0 (when not bool): co-occurrence, owners, groups.

    ``unknown_ok``: NaN entries are allowed (unknown pairs of bank targets); inf is not.
    """
    if x.is_floating_point():
        conditions = [_not_infinite(name, x) if unknown_ok else _finite(name, x)]
    else:
        conditions = []
    if x.dtype == torch.bool:
        return conditions

    def fail() -> None:
        raise ValueError(
            f"`{name}` must be non-negative, got min {x.detach().nan_to_num(0).min().item()}"
        )

    ok = x.detach() >= 0
    return [*conditions, ((ok | torch.isnan(x.detach()) if unknown_ok else ok).all(), fail)]


def _not_infinite(name: str, x: Tensor) -> Condition:
    def fail() -> None:
        index = tuple(torch.isinf(x.detach()).nonzero()[0].tolist())
        raise ValueError(
            f"`{name}` must be finite or NaN (NaN = unknown, docs/partial_annotation.rst), got "
            f"{x.detach()[index].item()} at index {index}"
        )

    return ~torch.isinf(x.detach()).any(), fail


def unannotated_rows(labels: Tensor) -> Tensor | None:
    """(N,) bool: paired samples with no annotation (id -1, or a label row NaN everywhere)."""
    if labels.dim() == 1:
        return labels == -1 if not labels.is_floating_point() else None
    if not labels.is_floating_point() or labels.shape[1] == 0:
        return None
    return torch.isnan(labels).all(1)


def _label_range(name: str, labels: Tensor) -> list[Condition]:
    def negative() -> None:
        if labels.dim() == 1:
            raise ValueError(
                f"`{name}` ids must be non-negative, or -1 for a sample without an annotation "
                f"at this granularity, got min {int(labels.min())}"
            )
        raise ValueError(
            f"`{name}` multi-hot entries must be non-negative, got min {int(labels.min())}; "
            "pass float labels with NaN for classes that are not annotated"
        )

    def not_binary() -> None:
        raise ValueError(f"`{name}` multi-hot entries must be 0 or 1, got max {int(labels.max())}")

    if labels.is_floating_point():  # (N, C_g) label probabilities; NaN: not annotated
        in_range = ((labels >= 0) & (labels <= 1) | torch.isnan(labels)).all()
        return [_not_infinite(name, labels), (in_range, _outside(name, labels))]
    lowest = -1 if labels.dim() == 1 else 0  # -1: the missing id
    conditions = [((labels >= lowest).all(), negative)]
    if labels.dim() == 2:
        conditions.append(((labels <= 1).all(), not_binary))
    return conditions


def _outside(name: str, labels: Tensor) -> Callable[[], None]:
    def fail() -> None:
        bad = ((labels < 0) | (labels > 1)).nonzero()[0]
        raise ValueError(
            f"`{name}` multi-hot entries must be label probabilities in [0, 1], got "
            f"{labels[tuple(bad.tolist())].item()} at index {tuple(bad.tolist())}; map uncertain "
            "labels to a probability (e.g. 0.5), or to NaN to leave them unknown"
        )

    return fail


def _unit_norm(name: str, x: Tensor, ignored: Tensor | None = None) -> list[Condition]:
    """Finite entries and a row norm that ``F.normalize`` can divide by (0 < norm < inf).

    ``ignored``: (N,) rows the loss never reads (texts of unannotated samples): finite suffices.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    norms = torch.linalg.vector_norm(x.detach(), dim=1, dtype=dtype)
    if ignored is not None:
        norms = torch.where(ignored & torch.isfinite(norms), 1.0, norms)

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
