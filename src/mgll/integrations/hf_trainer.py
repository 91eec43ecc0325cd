r"""A Hugging Face ``Trainer`` for :class:`~mgll.integrations.hf.MGLLModel`.

.. code-block:: python

    from mgll.integrations.hf import MGLLModel, MultiGranularDataCollator
    from mgll.integrations.hf_trainer import MGLLTrainer

    trainer = MGLLTrainer(
        model=MGLLModel(clip_model),                 # forward returns the loss
        args=TrainingArguments(output_dir="out", per_device_train_batch_size=64),
        train_dataset=rows,                          # items: {"image": ..., annotation fields}
        data_collator=MultiGranularDataCollator(builder, tokenizer, image_processor),
    )
    trainer.train()                                  # also under torchrun: DDP wraps MGLLModel

:class:`MGLLTrainer` is ``transformers.Trainer`` with two settings made for you (a plain
``Trainer`` works too if you make them yourself):

* ``remove_unused_columns=False``: the rows carry the image and annotation fields, which are no
  arguments of the model's ``forward``; the ``Trainer`` would drop them before the collator.
* ``label_names=["labels"]``: the per-granularity labels travel to the model under ``labels``.

and it logs the three terms (``soft_clip_loss``, ``pointwise_loss``, ``smooth_kl_loss``,
averaged over the logging interval) beside ``loss``.  transformers is imported when
``MGLLTrainer`` is first looked up, not when this module is imported:

>>> import tempfile
>>> from transformers import TrainingArguments
>>> from mgll.integrations.hf_trainer import MGLLTrainer
>>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True)
>>> trainer = MGLLTrainer(model=torch.nn.Linear(2, 2), args=args)
>>> trainer.args.remove_unused_columns, trainer.args.label_names
(False, ['labels'])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["MGLLTrainer"]  # noqa: F822 (defined on first access: see __getattr__)

_TERMS = ("soft_clip_loss", "pointwise_loss", "smooth_kl_loss")
log = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "MGLLTrainer":
        try:
            from transformers import Trainer
        except ImportError as err:
            raise ImportError(
                f"MGLLTrainer needs transformers and accelerate ({err}); "
                'install the [examples] extra (pip install -e ".[examples]" in a clone of mgll)'
            ) from err
        cls = globals()["MGLLTrainer"] = _define(Trainer)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_rows(collator, *datasets) -> None:
    """Every labelled row checked when the trainer is built, not when its batch is drawn."""
    from mgll.integrations.hf import MultiGranularDataCollator

    if not isinstance(collator, MultiGranularDataCollator):
        return
    for data in datasets:
        for part in data.values() if isinstance(data, dict) else [data]:
            if isinstance(part, Sequence) or hasattr(part, "column_names"):
                collator.check(part)


def _define(Trainer: type) -> type:
    class MGLLTrainer(Trainer):
        """``transformers.Trainer`` for :class:`~mgll.integrations.hf.MGLLModel`.

        Sets ``args.remove_unused_columns = False`` and ``args.label_names = ["labels"]`` (both
        logged when they change what you passed), checks every row of a sequence or
        ``datasets.Dataset`` against the collator's declared classes at once, and adds the mean of each MGLL term since the
        last log to the ``Trainer``'s logs.  Takes exactly ``Trainer``'s arguments.

        Example:
            >>> import tempfile
            >>> from transformers import TrainingArguments
            >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True)
            >>> trainer = MGLLTrainer(model=torch.nn.Linear(2, 2), args=args)
            >>> trainer.args.remove_unused_columns, trainer.args.label_names
            (False, ['labels'])
        """

        def __init__(self, *args, **kwargs) -> None:
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            if training_args is not None:
                if training_args.remove_unused_columns:
                    log.info(
                        "MGLLTrainer: remove_unused_columns=False (the collator needs the rows)"
                    )
                training_args.remove_unused_columns = False
                if training_args.label_names not in (None, ["labels"]):
                    log.info(f"MGLLTrainer: label_names {training_args.label_names} -> ['labels']")
                training_args.label_names = ["labels"]
            super().__init__(*args, **kwargs)
            _check_rows(self.data_collator, self.train_dataset, self.eval_dataset)
            if training_args is None:  # the Trainer made default arguments
                self.args.remove_unused_columns = False
                self.args.label_names = self.label_names = ["labels"]
            self._mgll_sums: dict[str, float] = {}
            self._mgll_count = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            if model.training:
                for term in _TERMS:
                    if term in outputs:
                        value = float(outputs[term].detach())
                        self._mgll_sums[term] = self._mgll_sums.get(term, 0.0) + value
                self._mgll_count += 1
            loss = outputs["loss"]
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs and self._mgll_count:
                logs.update({k: v / self._mgll_count for k, v in self._mgll_sums.items()})
                self._mgll_sums, self._mgll_count = {}, 0
            super().log(logs, *args, **kwargs)

    MGLLTrainer.__qualname__ = "MGLLTrainer"
    MGLLTrainer.__module__ = __name__
    # a module-level name for pickling, reprs and the API reference (autodoc skips locals)
    MGLLTrainer.__qualname__ = "MGLLTrainer"
    return MGLLTrainer
