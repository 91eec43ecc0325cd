r"""Zero-shot multi-label scores: class prototypes from prompts, and caption-marginal scoring.

A class prototype is the mean of the L2-normalised embeddings of its prompts (several
templates, several granularities), renormalised.  Scores for new images are a sigmoid of the
scaled cosine plus bias (for pointwise-trained models: use the learned ``logit_scale`` and
``logit_bias``) or a softmax over the classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgll.evaluation._finite import finite
from mgll.evaluation.auroc import multilabel_auroc
from mgll.text import Granularity, encode_unique
from mgll.text.hierarchy import Label

__all__ = ["ZeroShotClassifier", "caption_marginal_scores"]

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


def caption_marginal_scores(
    image_features: Tensor,
    caption_features: Tensor,
    caption_labels: Tensor,
    logit_scale: float | Tensor,
) -> Tensor:
    r"""Zero-shot class scores: a model's caption probabilities summed over a class's captions.

    .. math::
        P_{ik} = \operatorname{softmax}_k\big(s\,\langle \hat x_i, \hat t_k\rangle\big), \qquad
        \text{score}_{ic} = \sum_{k:\ c \in L_k} P_{ik} = (P L)_{ic}

    with :math:`\hat x, \hat t` L2-normalised, s the model's logit scale and :math:`L_k` the
    label set of caption k (only the captions' text decides which class a caption names,
    never the images' labels).  A loss trained to match each image with exactly its caption
    (CLIP) is scored on what it learned: which caption of the bank fits, and so which classes.

    Args:
        image_features: the images to score.
        caption_features: the embedded caption bank (e.g. every distinct training caption).
        caption_labels: 0/1 (or weights): which classes each caption names.
        logit_scale: s, positive, already exponentiated (the trained model's value).

    Shape:
        - image_features: (M, D); caption_features: (K, D); caption_labels: (K, C)
        - Output: (M, C) float64 scores in [0, 1]

    Raises:
        ValueError: mismatched D or K, a NaN / inf feature or label, a negative label weight,
            or a non-positive ``logit_scale``.

    Example:
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # "3", "5", "3 and 5"
        >>> names = torch.tensor([[1, 0], [0, 1], [1, 1]])
        >>> caption_marginal_scores(images, captions, names, logit_scale=1.0)
        tensor([[0.8260, 0.5270],
                [0.5270, 0.8260]], dtype=torch.float64)

        (Image 0 has cosines 1, 0, 0.7071 with the captions, so P = (0.473, 0.174, 0.353):
        class "3" gets 0.473 + 0.353, class "5" gets 0.174 + 0.353.)
    """
    for name, t in (
        ("image_features", image_features),
        ("caption_features", caption_features),
        ("caption_labels", caption_labels),
    ):
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"`{name}` must be a 2-D tensor, got {got}")
    x, t = finite("image_features", image_features), finite("caption_features", caption_features)
    labels = finite("caption_labels", caption_labels)
    if bool((labels < 0).any()):
        raise ValueError(
            "`caption_labels` must be non-negative (0/1, or weights), got a minimum of "
            f"{labels.min().item()}; a negative weight would give a negative class score"
        )
    if x.shape[1] != t.shape[1] or labels.shape[0] != t.shape[0]:
        raise ValueError(
            "`image_features` (M, D), `caption_features` (K, D) and `caption_labels` (K, C) "
            f"must agree on D and K, got {tuple(x.shape)}, {tuple(t.shape)} and "
            f"{tuple(labels.shape)}"
        )
    scale = float(logit_scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"`logit_scale` must be positive and finite, got {scale}")
    p = torch.softmax(scale * F.normalize(x, dim=1) @ F.normalize(t, dim=1).T, dim=1)
    return p @ labels
