r"""open_clip: encode G granularity texts and hand :class:`mgll.MGLLLoss` its batch-first dict.

open_clip's trainers call ``model_out = model(images, texts)`` and then
``losses = loss(**model_out, output_dict=True)``.  :class:`MultiGranularCLIP` wraps an
open_clip model so that its forward takes a *sequence* of G text batches and returns
``{"image_features", "text_features", "logit_scale"[, "logit_bias"]}`` with ``text_features``
a list of G tensors: the keyword arguments :class:`mgll.MGLLLoss` takes.  Only the labels
(paired) or targets (bank) are added by the training loop:

.. code-block:: python

    model = MultiGranularCLIP(open_clip.create_model("ViT-B-32", pretrained=None))
    loss_fn = mgll.MGLLLoss()
    out = model(images, [tokens_disease, tokens_description])       # G = 2 granularities
    losses = loss_fn(**out, labels=[disease_ids, description_ids], output_dict=True)
    sum(losses.values()).backward()

Wrap the model *before* DistributedDataParallel so the text passes run inside DDP's forward.
open_clip is imported by nothing here: any module with ``encode_image(x, normalize=...)``,
``encode_text(tokens, normalize=...)`` and a ``logit_scale`` parameter (log scale) works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from mgll.loss import MGLLLoss
from mgll.text import encode_unique

__all__ = [
    "FlatMGLLLoss",
    "FlatMultiGranularCLIP",
    "MultiGranularCLIP",
    "encode_granularities",
    "model_output",
]


def encode_granularities(
    model: nn.Module,
    texts: Sequence[Tensor | Sequence[str]],
    tokenizer: Callable[[list[str]], Tensor] | None = None,
    *,
    normalize: bool = True,
) -> list[Tensor]:
    """Encode G text batches with ``model.encode_text``.

    Args:
        model: an open_clip ``CLIP``-like model.
        texts: G entries, each a (K_g, L) token tensor, or a sequence of K_g strings (then
            ``tokenizer`` is required and each distinct string is encoded once).
        tokenizer: ``list[str] -> (n, L) token tensor``, e.g. ``open_clip.get_tokenizer(name)``.
        normalize: L2-normalise the features (open_clip's forward does).

    Returns:
        A list of G (K_g, D) text feature tensors.

    Raises:
        TypeError: ``texts`` is not a sequence, or strings are given without a tokenizer.

    Example:
        >>> class Toy(torch.nn.Module):  # stands in for open_clip.CLIP: encode_text only
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.txt = torch.nn.Embedding(50, 8)
        ...     def encode_text(self, tokens, normalize=False):
        ...         x = self.txt(tokens).mean(1)
        ...         return torch.nn.functional.normalize(x, dim=-1) if normalize else x
        >>> tokenize = lambda strings: torch.tensor([[len(s), s.count(" ")] for s in strings])
        >>> tokens = torch.randint(50, (4, 5))  # granularity 1: (K_1, L) tokens
        >>> strings = ["a DR image", "AMD", "a DR image"]  # granularity 2: K_2 strings
        >>> features = encode_granularities(Toy(), [tokens, strings], tokenize)
        >>> [tuple(f.shape) for f in features]
        [(4, 8), (3, 8)]
    """
    if isinstance(texts, (Tensor, str)) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise TypeError(
            "`texts` must be a non-empty sequence of G token tensors or G lists of strings, got "
            f"{type(texts).__name__}"
        )
    device = next(model.parameters()).device

    def encode(strings: list[str]) -> Tensor:
        return model.encode_text(tokenizer(strings).to(device), normalize=normalize)

    out = []
    for g, batch in enumerate(texts):
        if isinstance(batch, Tensor):
            out.append(model.encode_text(batch, normalize=normalize))
            continue
        if tokenizer is None:
            raise TypeError(f"`texts[{g}]` holds strings: pass a `tokenizer` to encode them")
        out.append(encode_unique(list(batch), encode))
    return out


def model_output(
    model: nn.Module,
    images: Tensor,
    texts: Sequence[Tensor | Sequence[str]],
    tokenizer: Callable[[list[str]], Tensor] | None = None,
    *,
    normalize: bool = True,
) -> dict[str, Tensor | list[Tensor]]:
    """The dict ``MGLLLoss`` consumes, from an open_clip model, images and G text batches.

    Shape:
        - images: the model's image input, batch first (N, ...)
        - texts[g]: (K_g, L) tokens, or K_g strings
        - Output: ``image_features`` (N, D), ``text_features`` a list of G (K_g, D),
          ``logit_scale`` (scalar, exponentiated), ``logit_bias`` (scalar) when the model has one

    Example:
        >>> class Toy(torch.nn.Module):  # stands in for open_clip.CLIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(50, 8)
        ...         self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        ...     def encode_image(self, x, normalize=False):
        ...         return torch.nn.functional.normalize(self.img(x), dim=-1)
        ...     def encode_text(self, t, normalize=False):
        ...         return torch.nn.functional.normalize(self.txt(t).mean(1), dim=-1)
        >>> out = model_output(Toy(), torch.randn(4, 12), [torch.randint(50, (4, 5))] * 2)
        >>> ids = torch.tensor([0, 0, 1, 2])
        >>> losses = mgll.MGLLLoss()(**out, labels=[ids, ids % 2], output_dict=True)
        >>> sum(losses.values()).backward()
    """
    out: dict[str, Tensor | list[Tensor]] = {
        "image_features": model.encode_image(images, normalize=normalize),
        "text_features": encode_granularities(model, texts, tokenizer, normalize=normalize),
    }
    return _add_scale_and_bias(out, model)


class MultiGranularCLIP(nn.Module):
    """Wrap an open_clip model so ``forward(images, texts)`` returns :func:`model_output`.

    ``texts`` is a sequence of G token tensors (or of string lists, with ``tokenizer``).  The
    wrapped model stays reachable as ``.model`` (for ``encode_image``, checkpoints, ...).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (or any module with the same methods).
        tokenizer: optional, to accept strings.
        normalize: L2-normalise the features.

    Example:
        >>> class Toy(torch.nn.Module):  # stands in for open_clip.CLIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(50, 8)
        ...         self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        ...     def encode_image(self, x, normalize=False):
        ...         return torch.nn.functional.normalize(self.img(x), dim=-1)
        ...     def encode_text(self, t, normalize=False):
        ...         return torch.nn.functional.normalize(self.txt(t).mean(1), dim=-1)
        >>> model = MultiGranularCLIP(Toy())
        >>> out = model(torch.randn(4, 12), [torch.randint(50, (4, 5)), torch.randint(50, (4, 7))])
        >>> sorted(out)
        ['image_features', 'logit_scale', 'text_features']
        >>> ids = torch.tensor([0, 0, 1, 2])
        >>> loss = mgll.MGLLLoss()(**out, labels=[ids, ids % 2])
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        *,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        for method in ("encode_image", "encode_text"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"`model` must have an `{method}` method (an open_clip model), got "
                    f"{type(model).__name__}"
                )
        if not isinstance(getattr(model, "logit_scale", None), Tensor):
            raise TypeError(f"`model` must have a `logit_scale` tensor, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.normalize = normalize

    def forward(
        self, images: Tensor, texts: Sequence[Tensor | Sequence[str]]
    ) -> dict[str, Tensor | list[Tensor]]:
        return model_output(self.model, images, texts, self.tokenizer, normalize=self.normalize)


def _flat_keys(g: int) -> tuple[str, str]:
    return ("text_features" if g == 0 else f"text_features_{g}"), f"labels_{g}"


class FlatMultiGranularCLIP(nn.Module):
    """An open_clip model whose forward takes a :class:`~mgll.text.TextBatch` and returns tensors.

    ``open_clip_train`` concatenates every value of the model's output dict with ``torch.cat``
    when it accumulates gradients (``--accum-freq``) and reads ``text_features`` as one (N, D)
    tensor in ``evaluate``.  So the G granularities travel as separate keys:
    ``text_features`` (granularity 0, what open_clip's retrieval metrics see),
    ``text_features_1`` ... ``text_features_{G-1}`` (each (N, D)) and ``labels_0`` ...
    ``labels_{G-1}`` (each (N, C_g)), beside ``image_features`` and ``logit_scale`` (and
    ``logit_bias``).  :class:`FlatMGLLLoss` puts them back together.  Each distinct string of
    the batch is tokenised and encoded once (one text-tower pass for all G).

    Attributes the wrapper lacks are looked up on the wrapped model (``logit_scale``,
    ``encode_image``, ``lock_image_tower``, ...), and its ``state_dict`` has the wrapped
    model's keys (no ``model.`` prefix), so checkpoints load into a plain open_clip model.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (``encode_image``, ``encode_text``,
            ``logit_scale``).
        tokenizer: ``list[str] -> (n, L)`` tokens, e.g. ``open_clip.get_tokenizer(name)``.
        normalize: L2-normalise the features.

    Example:
        >>> from mgll.text import Granularity, MultiGranularTextBuilder
        >>> class Toy(torch.nn.Module):  # stands in for open_clip.CLIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.img, self.txt = torch.nn.Linear(12, 8), torch.nn.Embedding(50, 8)
        ...         self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        ...     def encode_image(self, x, normalize=False):
        ...         return torch.nn.functional.normalize(self.img(x), dim=-1)
        ...     def encode_text(self, t, normalize=False):
        ...         return torch.nn.functional.normalize(self.txt(t).mean(1), dim=-1)
        >>> tokenize = lambda strings: torch.tensor([[len(s) % 50, s.count("o")] for s in strings])
        >>> builder = MultiGranularTextBuilder([
        ...     Granularity("animal", "a photo of a {}", classes=["cat", "dog"]),
        ...     Granularity("kind", classes=["pet", "wild"]),
        ... ])
        >>> texts = builder.build([{"animal": "cat", "kind": "pet"}, {"animal": "dog", "kind": "pet"}],
        ...                       label_format="multi_hot")
        >>> model = FlatMultiGranularCLIP(Toy(), tokenize)
        >>> out = model(torch.randn(2, 12), texts)
        >>> sorted(out)
        ['image_features', 'labels_0', 'labels_1', 'logit_scale', 'text_features', 'text_features_1']
        >>> sorted(model.state_dict())  # the wrapped model's keys
        ['img.bias', 'img.weight', 'logit_scale', 'txt.weight']
        >>> losses = FlatMGLLLoss()(**out, output_dict=True)
        >>> sum(losses.values()).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        *,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        MultiGranularCLIP(model)  # the same checks on the model's interface
        if not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be callable, got {type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.register_state_dict_post_hook(_strip_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def encode_texts(self, strings: list[str]) -> Tensor:
        """(n, D) features of n strings: tokenise, move to the model's device, encode."""
        device = self.model.logit_scale.device
        return self.model.encode_text(self.tokenizer(strings).to(device), normalize=self.normalize)

    def forward(self, image: Tensor | None = None, text=None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if image is not None:
            out["image_features"] = self.model.encode_image(image, normalize=self.normalize)
        if text is not None:
            if getattr(text, "mode", None) != "paired" or not callable(
                getattr(text, "encode", None)
            ):
                raise TypeError(
                    "`text` must be a paired-mode mgll TextBatch (what "
                    "`MultiGranularCollate(builder, mode='paired')` yields), got "
                    f"{type(text).__name__}"
                )
            for g, (features, part) in enumerate(
                zip(text.encode(self.encode_texts), text, strict=True)
            ):
                text_key, label_key = _flat_keys(g)
                out[text_key] = features
                out[label_key] = part.labels
        return _add_scale_and_bias(out, self.model)


def _add_scale_and_bias(out: dict, model: nn.Module) -> dict:
    """Add ``logit_scale`` (exponentiated) and, when the model has one, ``logit_bias``."""
    out["logit_scale"] = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        out["logit_bias"] = bias
    return out


def _strip_model_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_model_prefix(module, state_dict, prefix, *args) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class FlatMGLLLoss(MGLLLoss):
    """:class:`mgll.MGLLLoss` that takes :class:`FlatMultiGranularCLIP`'s flat output.

    ``loss(**model_out, output_dict=True)`` as open_clip's ``train_one_epoch`` calls it: the
    keys ``text_features``, ``text_features_1``, ... and ``labels_0``, ``labels_1``, ... are
    gathered into the G-lists :class:`~mgll.MGLLLoss` takes.  Same arguments as
    :class:`~mgll.MGLLLoss`.

    Example:
        >>> ids = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)  # (N, C_0) multi-hot
        >>> out = {"image_features": torch.randn(3, 8, requires_grad=True),
        ...        "text_features": torch.randn(3, 8), "text_features_1": torch.randn(3, 8),
        ...        "labels_0": ids, "labels_1": torch.ones(3, 1, dtype=torch.bool),
        ...        "logit_scale": torch.tensor(10.0)}
        >>> loss = FlatMGLLLoss()(**out)
        >>> loss.backward()
    """

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        *,
        output_dict: bool = False,
        **granularities: Tensor,
    ) -> Tensor | dict[str, Tensor]:
        texts, labels = [text_features], []
        g = 0
        while _flat_keys(g)[1] in granularities:
            if g > 0:
                key = _flat_keys(g)[0]
                if key not in granularities:
                    raise ValueError(f"`{key}` is missing: got `labels_{g}` without its texts")
                texts.append(granularities.pop(key))
            labels.append(granularities.pop(_flat_keys(g)[1]))
            g += 1
        if granularities or len(labels) != len(texts):
            raise ValueError(
                "expected the keys of FlatMultiGranularCLIP's output (`text_features`, "
                "`text_features_1`, ..., `labels_0`, `labels_1`, ...), got the unexpected "
                f"{sorted(granularities) or 'no `labels_0`'}"
            )
        return super().forward(
            image_features, texts, logit_scale, logit_bias, labels=labels, output_dict=output_dict
        )
