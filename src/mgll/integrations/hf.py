r"""Hugging Face transformers: the dict :class:`mgll.MGLLLoss` consumes, from a ``CLIPModel``.

.. code-block:: python

    model = transformers.CLIPModel(config)
    out = model_output(model, pixel_values, [tokens_g1, tokens_g2])  # tokenizer outputs
    losses = mgll.MGLLLoss()(**out, labels=[ids_g1, ids_g2], output_dict=True)

Works with ``CLIPModel`` (and ``SiglipModel``, whose ``logit_bias`` is passed on), with
``get_image_features`` / ``get_text_features`` returning either a tensor (transformers 4.x)
or an output whose ``pooler_output`` holds the projected features (transformers 5.x).
transformers itself is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["features", "model_output"]


def features(output: object) -> Tensor:
    """The projected features of ``get_*_features``: the tensor, or its ``pooler_output``.

    Example:
        >>> from types import SimpleNamespace
        >>> features(torch.ones(2, 4)).shape  # transformers 4.x returns the tensor
        torch.Size([2, 4])
        >>> features(SimpleNamespace(pooler_output=torch.zeros(3, 4))).shape  # 5.x: an output
        torch.Size([3, 4])
    """
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(
        "expected a tensor or an output with a `pooler_output` tensor from "
        f"`get_image_features`/`get_text_features`, got {type(output).__name__}"
    )


def model_output(
    model: nn.Module,
    pixel_values: Tensor,
    texts: Sequence[Mapping[str, Tensor] | Tensor],
    *,
    normalize: bool = True,
) -> dict[str, Tensor | list[Tensor]]:
    """Image features, G text-feature tensors, the exponentiated logit scale (and bias).

    Args:
        model: a transformers ``CLIPModel``-like model (``get_image_features``,
            ``get_text_features``, ``logit_scale``).
        pixel_values: (N, 3, H, W) images.
        texts: G entries, each the tokenizer's output (``input_ids``, ``attention_mask``) or
            an ``input_ids`` tensor (K_g, L).
        normalize: L2-normalise the features.

    Returns:
        ``{"image_features": (N, D), "text_features": [G x (K_g, D)], "logit_scale": ()}``
        plus ``"logit_bias"`` when the model has one: ``MGLLLoss(**out, labels=...)``.

    Raises:
        TypeError: ``texts`` is not a non-empty sequence of token batches.

    Example:
        >>> class Toy(torch.nn.Module):  # stands in for transformers.CLIPModel
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.vision, self.text = torch.nn.Linear(48, 8), torch.nn.Embedding(50, 8)
        ...         self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
        ...     def get_image_features(self, pixel_values):
        ...         return self.vision(pixel_values.flatten(1))
        ...     def get_text_features(self, input_ids, attention_mask=None):
        ...         return self.text(input_ids).mean(1)
        >>> tokens = {"input_ids": torch.randint(50, (4, 6)), "attention_mask": torch.ones(4, 6)}
        >>> out = model_output(Toy(), torch.randn(4, 3, 4, 4), [tokens, torch.randint(50, (4, 9))])
        >>> [tuple(t.shape) for t in out["text_features"]]
        [(4, 8), (4, 8)]
        >>> ids = torch.tensor([0, 0, 1, 2])
        >>> loss = mgll.MGLLLoss()(**out, labels=[ids, ids % 2])
        >>> loss.backward()
    """
    if isinstance(texts, (Tensor, Mapping)) or not isinstance(texts, Sequence) or not texts:
        raise TypeError(
            "`texts` must be a non-empty sequence of G token batches (tokenizer outputs or "
            f"input_ids tensors), got {type(texts).__name__}"
        )

    def prepare(x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if normalize else x

    text_features = []
    for g, batch in enumerate(texts):
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"`texts[{g}]` must hold `input_ids`, got {type(batch).__name__}")
        text_features.append(prepare(features(model.get_text_features(**batch))))
    out: dict[str, Tensor | list[Tensor]] = {
        "image_features": prepare(features(model.get_image_features(pixel_values=pixel_values))),
        "text_features": text_features,
        "logit_scale": model.logit_scale.exp(),
    }
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, Tensor):
        out["logit_bias"] = bias
    return out
