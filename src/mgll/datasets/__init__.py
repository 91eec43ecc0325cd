"""From dataset label files to annotations, and from annotations to DataLoader batches.

The first layer of mgll's data flow: data files → annotations (this package) → texts and
labels (:mod:`mgll.text`) → the loss.  Nothing here imports the loss.
"""

from mgll.datasets.collate import MultiGranularCollate

__all__ = ["MultiGranularCollate"]
