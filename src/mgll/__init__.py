"""mgll: Multi-Granular Language Learning as a drop-in CLIP loss for PyTorch."""

from mgll import datasets, distributed, evaluation, functional, targets, text
from mgll.backends import available_backends, get_memory_budget, set_memory_budget
from mgll.functional import mgll_loss
from mgll.loss import MGLLLoss
from mgll.text import Granularity, LabelHierarchy, MultiGranularTextBuilder
from mgll.zeroshot import ZeroShotClassifier

__version__ = "0.1.0"

__all__ = [
    "Granularity",
    "LabelHierarchy",
    "MGLLLoss",
    "MultiGranularTextBuilder",
    "ZeroShotClassifier",
    "__version__",
    "available_backends",
    "datasets",
    "distributed",
    "evaluation",
    "functional",
    "get_memory_budget",
    "mgll_loss",
    "set_memory_budget",
    "targets",
    "text",
]
