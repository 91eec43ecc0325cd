"""mgll: Multi-Granular Language Learning as a drop-in CLIP loss for PyTorch."""

from mgll import functional
from mgll.backends import available_backends
from mgll.functional import mgll_loss
from mgll.loss import MGLLLoss

__version__ = "0.1.0"

__all__ = ["MGLLLoss", "__version__", "available_backends", "functional", "mgll_loss"]
