"""Glue between :class:`mgll.MGLLLoss` and the CLIP trainers users already have.

The submodules import their framework lazily (inside functions), so ``import mgll`` and
``import mgll.integrations`` never import open_clip or transformers:

* :mod:`mgll.integrations.open_clip` — encode G granularity texts with an open_clip model and
  return the batch-first dict ``MGLLLoss`` consumes (``loss(**model_out, output_dict=True)``).
* :mod:`mgll.integrations.hf` — the same for a Hugging Face ``CLIPModel``.
"""

__all__: list[str] = []
