"""Glue between :class:`mgll.MGLLLoss` and the CLIP trainers users already have.

The submodules import their framework lazily (inside functions, or for ``hf_trainer`` when
``MGLLTrainer`` is first looked up), so ``import mgll`` and ``import mgll.integrations.*``
never import open_clip or transformers:

* :mod:`mgll.integrations.open_clip` — encode G granularity texts with an open_clip model and
  return the batch-first dict ``MGLLLoss`` consumes (``loss(**model_out, output_dict=True)``).
* :mod:`mgll.integrations.open_clip_train` — ``python -m mgll.integrations.open_clip_train``:
  open_clip's own trainer (``open_clip_train.main``) with MGLL as the loss, from a labelled CSV.
* :mod:`mgll.integrations.image_table` — a CSV/TSV of image paths and annotation columns as a
  ``Dataset`` of ``(image, annotation)`` items.
* :mod:`mgll.integrations.hf` — the same dict for a Hugging Face ``CLIPModel``, and
  ``MGLLModel`` / ``MultiGranularDataCollator`` for the ``Trainer``.
* :mod:`mgll.integrations.hf_trainer` — ``MGLLTrainer``, a ``transformers.Trainer``.
"""

__all__: list[str] = []
