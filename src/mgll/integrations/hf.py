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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MGLLModel", "MultiGranularDataCollator", "features", "model_output"]


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
        TypeError: ``texts`` is not a non-empty sequence of token batches, or ``model`` is a
            ``DistributedDataParallel`` (use :class:`MGLLModel`).

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
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "`model` is wrapped in DistributedDataParallel: calling its towers outside DDP's "
            "forward (e.g. through `model.module`) leaves gradients unsynchronised and the "
            "replicas drift apart. Wrap `MGLLModel(clip_model)` in DDP instead: its forward "
            "runs every pass and the loss"
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


class MGLLModel(nn.Module):
    r"""A ``CLIPModel``-like model and :class:`mgll.MGLLLoss` in one module: ``forward`` returns the loss.

    The image pass, the G text passes and the loss all run inside ``forward``, so
    ``DistributedDataParallel`` (the ``Trainer``'s, or your own) wraps one module, sees every
    parameter used, and synchronises every gradient; under ``torch.distributed`` the loss
    gathers the features of all ranks (see :doc:`/distributed`), so the averaged gradients
    equal those of one process on the concatenated batch.  Each granularity's texts arrive
    de-duplicated (``input_ids[g]`` holds the U_g distinct texts, ``text_index[g]`` maps the N
    samples to them), as :class:`MultiGranularDataCollator` produces.

    Args:
        model: a transformers ``CLIPModel`` (or any module with ``get_image_features``,
            ``get_text_features`` and a ``logit_scale``; a ``logit_bias`` is used when present).
        loss: the loss module; default ``mgll.MGLLLoss()``.
        normalize: L2-normalise the features.

    Shape:
        - pixel_values: (N, 3, H, W)
        - input_ids[g], attention_mask[g]: (U_g, L_g) tokens of the distinct texts
        - text_index[g]: (N,) long, sample i's text is row ``text_index[g][i]``
        - labels[g]: (N, C_g) multi-hot (or (N,) ids)
        - Output: ``{"loss", "soft_clip_loss", "pointwise_loss", "smooth_kl_loss"}``

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
        >>> model = MGLLModel(Toy())
        >>> out = model(
        ...     pixel_values=torch.randn(3, 3, 4, 4),
        ...     input_ids=[torch.randint(50, (2, 6)), torch.randint(50, (3, 5))],  # U_g distinct
        ...     text_index=[torch.tensor([0, 1, 0]), torch.tensor([0, 1, 2])],
        ...     labels=[torch.tensor([[1, 0], [0, 1], [1, 0]]).bool(), torch.eye(3).bool()],
        ... )
        >>> sorted(out)
        ['loss', 'pointwise_loss', 'smooth_kl_loss', 'soft_clip_loss']
        >>> out["loss"].backward()
    """

    accepts_loss_kwargs = False  # the Trainer must not rescale the loss by the process count

    def __init__(self, model: nn.Module, loss: nn.Module | None = None, *, normalize: bool = True):
        super().__init__()
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"`model` must have a `{method}` method (a transformers CLIPModel), got "
                    f"{type(model).__name__}"
                )
        if not isinstance(getattr(model, "logit_scale", None), Tensor):
            raise TypeError(f"`model` must have a `logit_scale` tensor, got {type(model).__name__}")
        if loss is None:
            from mgll.loss import MGLLLoss

            loss = MGLLLoss()
        self.model, self.loss, self.normalize = model, loss, normalize

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Sequence[Tensor],
        attention_mask: Sequence[Tensor] | None = None,
        text_index: Sequence[Tensor] | None = None,
        labels: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if isinstance(input_ids, Tensor) or not isinstance(input_ids, Sequence) or not input_ids:
            raise TypeError(
                "`input_ids` must be a non-empty list of G token tensors (one per granularity), "
                f"got {type(input_ids).__name__}; use MultiGranularDataCollator"
            )
        if labels is None or len(labels) != len(input_ids):
            raise ValueError(
                f"`labels` must hold one tensor per granularity (G={len(input_ids)}), got "
                f"{'None' if labels is None else len(labels)}"
            )
        texts = []
        for g, ids in enumerate(input_ids):
            batch = {"input_ids": ids}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask[g]
            feats = features(self.model.get_text_features(**batch))
            texts.append(feats if text_index is None else feats[text_index[g]])
        image = features(self.model.get_image_features(pixel_values=pixel_values))
        if self.normalize:
            image, texts = F.normalize(image, dim=-1), [F.normalize(t, dim=-1) for t in texts]
        bias = getattr(self.model, "logit_bias", None)
        losses = self.loss(
            image,
            texts,
            self.model.logit_scale.exp(),
            bias if isinstance(bias, Tensor) else None,
            labels=list(labels),
            output_dict=True,
        )
        return {"loss": sum(losses.values()), **losses}


class MultiGranularDataCollator:
    """A Trainer ``data_collator``: rows (an image + annotation fields) to :class:`MGLLModel` inputs.

    Each row is a mapping holding the image under ``image_key`` and the annotation fields the
    builder reads (e.g. ``{"image": PIL image, "findings": "Edema|Effusion", "report": "..."}``).
    The rows become ``(image, annotation)`` items for :class:`mgll.datasets.MultiGranularCollate`
    (the one collate of the library: fixed multi-hot label shapes from the declared
    ``classes``), then each granularity's distinct texts are tokenised once.

    Every granularity must declare its ``classes``: label column c must mean the same class on
    every batch and every rank, since the loss gathers labels across processes.

    Args:
        builder: a :class:`~mgll.text.MultiGranularTextBuilder` whose granularities all declare
            ``classes``.
        tokenizer: a transformers tokenizer (called with ``padding=True, truncation=True,
            return_tensors="pt"``) or any ``list[str] -> (n, L)`` tensor / mapping callable.
        image_processor: a transformers image processor (called on the list of images with
            ``return_tensors="pt"``), or a per-image ``callable -> (3, H, W)`` tensor, or None
            (the images are already tensors).
        image_key: the row field holding the image.

    Returns:
        ``collator(rows)`` returns ``{"pixel_values", "input_ids", "attention_mask",
        "text_index", "labels"}``, the last four lists of G tensors.

    Raises:
        ValueError: a granularity without declared ``classes``; a row without ``image_key``.

    Example:
        >>> from mgll.text import Granularity, MultiGranularTextBuilder
        >>> builder = MultiGranularTextBuilder([
        ...     Granularity("digits", "digits {}", separator="|", classes=list("0123")),
        ...     Granularity("parity", separator="|", classes=["even", "odd"]),
        ... ])
        >>> tokenize = lambda strings: torch.tensor([[len(s), s.count("1")] for s in strings])
        >>> collate = MultiGranularDataCollator(builder, tokenize)
        >>> rows = [{"image": torch.zeros(3, 2, 2), "digits": "1|2", "parity": "even|odd"},
        ...         {"image": torch.ones(3, 2, 2), "digits": "2", "parity": "even"},
        ...         {"image": torch.ones(3, 2, 2), "digits": "1|2", "parity": "even|odd"}]
        >>> batch = collate(rows)
        >>> batch["pixel_values"].shape, [t.shape[0] for t in batch["input_ids"]]  # U_g distinct
        (torch.Size([3, 3, 2, 2]), [2, 2])
        >>> batch["text_index"][0], batch["labels"][1]
        (tensor([0, 1, 0]), tensor([[1., 1.],
                [1., 0.],
                [1., 1.]]))
    """

    def __init__(self, builder, tokenizer, image_processor=None, *, image_key: str = "image"):
        from mgll.datasets import MultiGranularCollate

        undeclared = [g.name for g in builder.granularities if g.classes is None]
        if undeclared:
            raise ValueError(
                f"granularities {undeclared} of `builder` declare no `classes`; declare them "
                "(Granularity(..., classes=[...])) so label ids mean the same class on every "
                "batch and every rank"
            )
        if not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be callable, got {type(tokenizer).__name__}")
        self.collate = MultiGranularCollate(builder, mode="paired", image_collate=list)
        self.tokenizer, self.image_processor, self.image_key = tokenizer, image_processor, image_key

    def check(self, rows: object) -> None:
        """Check every row's labels against the declared ``classes`` before training starts
        (the collator alone sees a bad row only when its batch is drawn).

        Args:
            rows: a sequence of row mappings, or a ``datasets.Dataset`` (its annotation
                columns are read; the images are not decoded).

        Raises:
            ValueError: naming the first bad row, its field and the unknown labels.
        """
        grans = self.collate.builder.granularities
        if hasattr(rows, "column_names"):  # a datasets.Dataset: columns, not decoded rows
            sources = [g.source for g in grans if g.source in rows.column_names]
            columns = {c: rows[c] for c in sources}
            rows = [{c: columns[c][i] for c in sources} for i in range(len(rows))]
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                continue  # reported with its own message by __call__
            for gran in grans:
                try:
                    gran.weights_of(row, f"rows[{i}]")
                except (ValueError, TypeError) as err:
                    raise type(err)(
                        f"{err}; fix row {i} of the data set, or add the label"
                    ) from None

    def _pixels(self, images: list) -> Tensor:
        proc = self.image_processor
        if proc is not None and callable(getattr(proc, "preprocess", None)):
            return proc(images=images, return_tensors="pt")["pixel_values"]
        return torch.stack([im if proc is None else proc(im) for im in images])

    def _tokens(self, strings: list[str]) -> dict[str, Tensor]:
        try:
            out = self.tokenizer(strings, padding=True, truncation=True, return_tensors="pt")
        except TypeError:  # a plain callable: list[str] -> tokens
            out = self.tokenizer(strings)
        return dict(out) if isinstance(out, Mapping) else {"input_ids": out}

    def __call__(self, rows: Sequence[Mapping[str, object]]) -> dict[str, object]:
        items = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or self.image_key not in row:
                hint = ""
                if isinstance(row, Mapping):  # e.g. every field dropped before the collator
                    hint = (
                        "; a transformers.Trainer with `remove_unused_columns=True` (its default) "
                        "drops the fields that are no argument of the model's forward before "
                        "they reach the collator: pass TrainingArguments(..., "
                        "remove_unused_columns=False) or use "
                        "mgll.integrations.hf_trainer.MGLLTrainer, which sets it"
                    )
                raise ValueError(
                    f"`rows[{i}]` must be a mapping with the image under {self.image_key!r}, got "
                    f"{sorted(row) if isinstance(row, Mapping) else type(row).__name__}{hint}"
                )
            items.append(
                (row[self.image_key], {k: v for k, v in row.items() if k != self.image_key})
            )
        images, texts = self.collate(items)
        tokens = [self._tokens(list(part.unique_texts)) for part in texts]
        out: dict[str, object] = {
            "pixel_values": self._pixels(images),
            "input_ids": [t["input_ids"] for t in tokens],
            "text_index": [part.inverse for part in texts],
            "labels": [part.labels for part in texts],
        }
        if all("attention_mask" in t for t in tokens):
            out["attention_mask"] = [t["attention_mask"] for t in tokens]
        return out
