"""mgll: Multi-Granular Language Learning as a drop-in CLIP loss for PyTorch."""

import sys as _sys
import types as _types
import warnings as _warnings

from mgll import datasets, distributed, evaluation, functional, targets, text
from mgll.backends import available_backends, get_memory_budget, set_memory_budget
from mgll.evaluation import ZeroShotClassifier
from mgll.functional import mgll_loss
from mgll.loss import MGLLLoss
from mgll.text import Granularity, LabelHierarchy, MultiGranularTextBuilder

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


class _Moved(_types.ModuleType):
    """An old module path that still works for one release, with a DeprecationWarning."""

    def __init__(self, old: str, new: _types.ModuleType, home: str) -> None:
        super().__init__(old)
        self._new, self._home = new, home

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import system's probes (__path__, __spec__, ...)
            raise AttributeError(name)
        _warnings.warn(
            f"`{self.__name__}` moved into `{self._home}` in mgll 0.2 and will be removed in "
            f"0.3: import `{name}` from `{self._home}` instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self._new, name)


zeroshot = _sys.modules["mgll.zeroshot"] = _Moved(
    "mgll.zeroshot", evaluation.zeroshot, "mgll.evaluation"
)
