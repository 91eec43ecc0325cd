r"""Soft-target constructors: co-occurrence matrices C (N x K) from labels (docs/concepts.rst).

Every function is a pure tensor function returning a float32 (or wider) matrix that can be
passed to :class:`mgll.MGLLLoss` as a bank ``targets[g]`` entry, or to
:func:`mgll.functional.soft_clip_loss`.  ``C[i, k] > 0`` means "text k describes image i".

How the loss reads C, per direction (paper eq. 1-3, docs/concepts.rst): the image-to-text term uses C normalised per
**row** (:math:`W^r`, each image's distribution over texts) and the text-to-image term uses C
normalised per **column** (:math:`W^c`, each text's distribution over images).  For a
*symmetric* C (``b`` omitted, so K = N: a paired batch) :math:`W^c = (W^r)^\top`, so both
directions see the same weights; for a bank C (K texts of their own, not symmetric) the two
normalisations genuinely differ and the text-to-image side must use the column-normalised
one.  :func:`normalize` makes either normalisation explicit.

Shape letters: N rows (images), K columns (texts), C_g label classes at a granularity.
"""

from mgll.targets.constructors import (
    expand_ancestors,
    from_hierarchy,
    from_ids,
    from_multi_hot,
    label_set_ids,
    normalize,
    similarity_softmax,
    smooth,
    stable_ids,
)

__all__ = [
    "expand_ancestors",
    "from_hierarchy",
    "from_ids",
    "from_multi_hot",
    "label_set_ids",
    "normalize",
    "similarity_softmax",
    "smooth",
    "stable_ids",
]
