r"""Zero-shot multi-label classification from text prototypes, and AUROC in torch.

A class prototype is the mean of the L2-normalised embeddings of its prompts (several
templates, several granularities), renormalised.  Scores for new images are a sigmoid of the
scaled cosine plus bias (for pointwise-trained models: use the learned ``logit_scale`` and
``logit_bias``) or a softmax over the classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgll._hierarchy import Label
from mgll.text import Granularity, encode_unique

__all__ = ["ZeroShotClassifier", "multilabel_auroc"]

_ACTIVATIONS = ("sigmoid", "softmax")


class ZeroShotClassifier(nn.Module):
    r"""Multi-label zero-shot scores against one text prototype per class.

    .. math::
        p_c = \frac{\bar t_c}{\lVert \bar t_c \rVert},\quad
        \bar t_c = \frac{1}{|P_c|}\sum_{q\in P_c} \frac{e(q)}{\lVert e(q)\rVert},\qquad
        \text{score}_{ic} = \sigma\big(s\,\langle \hat x_i, p_c\rangle + b\big)
        \ \text{or}\ \operatorname{softmax}_c\big(s\,\langle \hat x_i, p_c\rangle\big)

    with :math:`P_c` the prompts of class c and e the text encoder.

    Args:
        prototypes: one row per class (normalised here).
        classes: the C class names (default ``0..C-1``).
        logit_scale: s, positive, already exponentiated (the trained model's value).
        logit_bias: b for the sigmoid (default 0).
        activation: ``"sigmoid"`` (independent per class; the multi-label default) or
            ``"softmax"`` (one distribution over the classes).

    Shape:
        - prototypes: (C, D)
        - input: image features (M, D), normalised here
        - Output: (M, C) scores in [0, 1]

    Example:
        >>> encode = lambda strings: torch.stack([torch.randn(8) for _ in strings])
        >>> clf = ZeroShotClassifier.from_prompts(
        ...     encode, ["DR", "AMD"], templates=["a fundus image of {}", "{}"], logit_scale=10.0
        ... )
        >>> clf(torch.randn(5, 8)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        prototypes: Tensor,
        classes: Sequence[Label] | None = None,
        *,
        logit_scale: float | Tensor = 1.0,
        logit_bias: float | Tensor | None = None,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if not isinstance(prototypes, Tensor) or not prototypes.is_floating_point():
            got = prototypes.dtype if isinstance(prototypes, Tensor) else type(prototypes).__name__
            raise TypeError(f"`prototypes` must be a floating-point (C, D) tensor, got {got}")
        if prototypes.dim() != 2 or prototypes.shape[0] == 0:
            raise ValueError(
                f"`prototypes` must be 2-D (C, D) with C >= 1, got {tuple(prototypes.shape)}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {_ACTIVATIONS}, got {activation!r}")
        classes = tuple(range(prototypes.shape[0])) if classes is None else tuple(classes)
        if len(classes) != prototypes.shape[0]:
            raise ValueError(
                f"`classes` must name the C={prototypes.shape[0]} prototypes, got {len(classes)}"
            )
        if not bool(torch.isfinite(prototypes.detach()).all()):
            raise ValueError(
                "`prototypes` must be finite (no NaN or inf): a non-finite prototype would turn "
                "every score into NaN; check the text encoder's output"
            )
        scale = _scalar("logit_scale", logit_scale, prototypes)
        if not float(scale) > 0:
            raise ValueError(f"`logit_scale` must be positive (exponentiated), got {float(scale)}")
        bias = _scalar("logit_bias", 0.0 if logit_bias is None else logit_bias, prototypes)
        self.register_buffer("prototypes", F.normalize(prototypes.detach(), dim=1))
        self.register_buffer("logit_scale", scale)
        self.register_buffer("logit_bias", bias)
        self.classes = classes
        self.activation = activation

    @classmethod
    def from_prompts(
        cls,
        encode_fn: Callable[[list[str]], Tensor],
        classes: Sequence[Label] | Mapping[Label, Sequence[str]],
        templates: Sequence[str] | None = None,
        granularities: Sequence[Granularity] | None = None,
        **kwargs,
    ) -> ZeroShotClassifier:
        """Prototypes from prompts across templates and granularities.

        A class's prompts are ``template.format(c)`` for every template, plus every
        :meth:`Granularity.prompts` text (template applied to the label or its descriptions) of
        every granularity given; with ``classes`` a mapping ``{class: [prompts]}`` those lists
        are used as they are.  Word the prompts the way the text tower saw text in training.
        ``encode_fn`` runs once, on the distinct prompts, without gradients.

        Args:
            encode_fn: ``list[str] -> Tensor`` (n, D).
            classes: class labels, or ``{class: [prompts]}``.
            templates: format strings with one ``{}``; default ``["{}"]`` when no
                ``granularities`` are given.
            granularities: add each granularity's prompts for every class.
            **kwargs: ``logit_scale``, ``logit_bias``, ``activation``.
        """
        prompts = _prompts(classes, templates, granularities)
        flat = [p for ps in prompts.values() for p in ps]
        with torch.no_grad():
            emb = F.normalize(encode_unique(flat, encode_fn).float(), dim=1)
        sizes = [len(ps) for ps in prompts.values()]
        means = torch.stack([chunk.mean(0) for chunk in torch.split(emb, sizes)])
        return cls(means, list(prompts), **kwargs)

    def logits(self, image_features: Tensor) -> Tensor:
        """Scaled cosine similarities (plus the bias for ``"sigmoid"``), (M, C)."""
        x = self._check_images(image_features)
        z = self.logit_scale * (F.normalize(x, dim=1) @ self.prototypes.to(x.dtype).T)
        return z + self.logit_bias if self.activation == "sigmoid" else z

    def forward(self, image_features: Tensor) -> Tensor:
        z = self.logits(image_features)
        return torch.sigmoid(z) if self.activation == "sigmoid" else torch.softmax(z, dim=1)

    @torch.no_grad()
    def evaluate(self, image_features: Tensor, targets: Tensor) -> dict[str, object]:
        """Per-class and macro AUROC of the scores against multi-label ground truth.

        Args:
            image_features: (M, D).
            targets: (M, C) 0/1 ground truth, columns in ``classes`` order.

        Returns:
            ``{"per_class": (C,) float64 tensor, "macro": float, "classes": tuple}``; see
            :func:`multilabel_auroc` for classes with a single ground-truth value (NaN,
            excluded from the macro).
        """
        per_class = multilabel_auroc(self(image_features), targets)
        valid = per_class[~per_class.isnan()]
        macro = float(valid.mean()) if valid.numel() else float("nan")
        return {"per_class": per_class, "macro": macro, "classes": self.classes}

    def extra_repr(self) -> str:
        return (
            f"classes={len(self.classes)}, dim={self.prototypes.shape[1]}, "
            f"logit_scale={float(self.logit_scale):.4g}, logit_bias={float(self.logit_bias):.4g}, "
            f"activation={self.activation!r}"
        )

    def _check_images(self, x: object) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"`image_features` must be a floating-point (M, D) tensor, got {got}")
        d = self.prototypes.shape[1]
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(
                f"`image_features` must have shape (M, D={d}) to match the prototypes, got "
                f"{tuple(x.shape)}"
            )
        if x.device != self.prototypes.device:
            raise ValueError(
                f"`image_features` is on {x.device} but the prototypes are on "
                f"{self.prototypes.device}; move the classifier with `.to(device)`"
            )
        if not bool(torch.isfinite(x).all()):
            row = int((~torch.isfinite(x)).any(1).nonzero()[0])
            raise ValueError(
                f"`image_features` must be finite (no NaN or inf), got a non-finite value in row "
                f"{row}; its scores would be NaN"
            )
        return x


def multilabel_auroc(scores: Tensor, targets: Tensor) -> Tensor:
    r"""Per-class ROC AUC, rank-based (Mann-Whitney U) with average ranks for ties.

    .. math::
        \mathrm{AUC}_c = \frac{\sum_{i: y_{ic}=1} r_{ic} - P_c(P_c+1)/2}{P_c\,(M-P_c)}

    with :math:`r_{ic}` the 1-based rank of :math:`\text{score}_{ic}` within column c (tied
    scores share their average rank, so a tie counts one half) and :math:`P_c` the positives.
    A class whose ground truth has a single value (no positive or no negative) has no AUROC:
    its entry is NaN, and a macro average should skip it (``per_class.nanmean()``; this is
    what :meth:`ZeroShotClassifier.evaluate` does).

    Args:
        scores: any real scores, higher = more likely positive.
        targets: 0/1 ground truth.

    Shape:
        - scores: (M, C) (or (M,) for one class)
        - targets: same shape
        - Output: (C,) float64 (or a scalar for 1-D input)

    Example:
        >>> multilabel_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.7500, dtype=torch.float64)
    """
    s, y = _check_auroc(scores, targets)
    one = s.dim() == 1
    s, y = (s[:, None], y[:, None]) if one else (s, y)
    m = s.shape[0]
    pos = y.sum(0)
    neg = m - pos
    ranks = torch.stack([_average_ranks(s[:, c]) for c in range(s.shape[1])], dim=1)
    u = (ranks * y).sum(0) - pos * (pos + 1) / 2
    auc = u / (pos * neg).clamp_min(1)
    auc = torch.where((pos > 0) & (neg > 0), auc, torch.full_like(auc, float("nan")))
    return auc[0] if one else auc


def _average_ranks(x: Tensor) -> Tensor:
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2  # mean of ranks end-count+1 .. end
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def _check_auroc(scores: object, targets: object) -> tuple[Tensor, Tensor]:
    for name, x in (("scores", scores), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if scores.dim() not in (1, 2) or scores.shape != targets.shape or scores.shape[0] == 0:
        raise ValueError(
            f"`scores` and `targets` must have one shape, (M, C) or (M,) with M >= 1, got "
            f"{tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if scores.is_complex() or not bool(torch.isfinite(scores.double()).all()):
        raise ValueError("`scores` must be real and finite (no NaN or infinite values)")
    y = targets.detach().double()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError(f"`targets` must be 0/1, got values {torch.unique(y).tolist()[:5]}")
    return scores.detach().double(), y


def _prompts(classes, templates, granularities) -> dict:
    if isinstance(classes, Mapping):
        out = {c: list(ps) for c, ps in classes.items()}
        for c, ps in out.items():
            if not ps or not all(isinstance(p, str) for p in ps):
                raise TypeError(f"`classes[{c!r}]` must be a non-empty list of prompt strings")
    else:
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise TypeError(
                f"`classes` must be a sequence of labels or a mapping, got {type(classes).__name__}"
            )
        dup = sorted({repr(c) for c in classes if list(classes).count(c) > 1})
        if dup:
            raise ValueError(f"`classes` must be distinct, got repeated {', '.join(dup)}")
        if templates is None and not granularities:
            templates = ["{}"]
        for t in templates or ():
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"`templates` entries must be strings with one '{{}}', got {t!r}")
        for g in granularities or ():
            if not isinstance(g, Granularity):
                raise TypeError(f"`granularities` must hold Granularity, got {type(g).__name__}")
        out = {
            c: [t.format(c) for t in templates or ()]
            + [p for g in granularities or () for p in g.prompts(c)]
            for c in classes
        }
    if len(out) == 0:
        raise ValueError("`classes` is empty; pass at least one class")
    return out


def _scalar(name: str, value: object, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be a scalar, got shape {tuple(value.shape)}")
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number or a scalar tensor, got {type(value).__name__}")
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"`{name}` must be finite, got {value}")
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)
