"""The public soft-target constructors and the checks of their inputs (re-exported by :mod:`mgll.targets`)."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from mgll.targets.overlap import RULES, partial_overlap
from mgll.targets.overlap import overlap as _overlap
from mgll.targets.renamed import renamed_keyword


def from_ids(
    ids_a: Tensor | Sequence[Hashable], ids_b: Tensor | Sequence[Hashable] | None = None
) -> Tensor:
    r"""Equality co-occurrence from one class id per sample.

    .. math::
        C_{ik} = \mathbb 1[\mathrm{ids\_a}_i = \mathrm{ids\_b}_k]

    Symmetric when ``ids_b`` is omitted (``ids_b = ids_a``), and then an equivalence relation:
    the row-normalised (image-to-text) and column-normalised (text-to-image) weights are
    transposes of each other, each spreading mass evenly over the samples of the same class.
    Equals the loss's own rule for paired ``labels[g]`` given as (N,) ids.

    Args:
        ids_a: integer ids, or a list of hashable keys (strings, tuples, ...).
        ids_b: the column ids (a text bank's classes); default ``ids_a``.  Must be of the same
            kind as ``ids_a`` (both tensors, or both lists of keys).

    Shape:
        - ids_a: (N,)
        - ids_b: (K,)
        - Output: (N, K) float32, entries 0 or 1

    Raises:
        TypeError: a tensor of floating dtype, or keys that are not hashable.
        ValueError: a tensor that is not 1-D.

    Example:
        >>> from_ids(["DR", "AMD", "DR"])
        tensor([[1., 0., 1.],
                [0., 1., 0.],
                [1., 0., 1.]])
    """
    a = _ids_tensor("ids_a", ids_a)
    if ids_b is None:
        b = a
    elif isinstance(ids_a, Tensor) != isinstance(ids_b, Tensor):
        raise TypeError(
            "`ids_b` must be of the same kind as `ids_a` (both tensors or both sequences of "
            f"keys), got {type(ids_a).__name__} and {type(ids_b).__name__}"
        )
    elif isinstance(ids_a, Tensor):
        b = _ids_tensor("ids_b", ids_b)
    else:
        a, b = _encode_keys(ids_a, ids_b)
    b = b.to(a.device)
    c = (a[:, None] == b[None, :]).to(torch.float32)
    if not isinstance(ids_a, Tensor):
        return c
    for name, ids in (("ids_a", a), ("ids_b", b)):
        if bool((ids < -1).any()):
            raise ValueError(
                f"`{name}` ids must be non-negative, or -1 for a sample without an annotation, "
                f"got {int(ids.min())}"
            )
    # -1: not annotated, so every pair with it is unknown (docs/partial_annotation.rst)
    return torch.where((a[:, None] >= 0) & (b[None, :] >= 0), c, torch.nan)


def from_multi_hot(
    a: Tensor, b: Tensor | None = None, overlap: str = "jaccard", *, mode: str | None = None
) -> Tensor:
    r"""Co-occurrence from the overlap of multi-hot label sets (or label probabilities).

    .. math::
        \text{any: } C_{ik} = \mathbb 1[|a_i \cap b_k| > 0] \qquad
        \text{count: } C_{ik} = |a_i \cap b_k| \qquad
        \text{jaccard: } C_{ik} = \frac{|a_i \cap b_k|}{|a_i \cup b_k|}\ (0 \text{ if empty})

    Entries may be label probabilities :math:`a_c \in [0, 1]` (an uncertain finding counted
    with weight u, e.g. 0.5).  Reading :math:`a_c` as the probability that label c is present,
    labels independent, the rules generalise to

    .. math::
        \text{any: } 1 - \prod_c (1 - a_{ic} b_{kc}) \qquad
        \text{count: } \sum_c a_{ic} b_{kc} \qquad
        \text{jaccard: } \frac{\sum_c \min(a_{ic}, b_{kc})}{\sum_c \max(a_{ic}, b_{kc})}

    "any" is the probability that the two share at least one label, "count" the expected
    number of shared labels, "jaccard" the fuzzy-set Jaccard index.  On 0/1 entries each equals
    the set rule above exactly.  The product rules read a row and a column as independent
    draws, also on the diagonal: a sample whose only label is uncertain (0.5) overlaps itself
    with weight 0.25 under "any", while "jaccard" gives every labelled sample weight 1 with
    itself (:math:`\min(a, a) / \max(a, a)`).  Every rule is symmetric in (a, b), so C is
    symmetric when ``b`` is omitted; with overlapping label sets it is not an equivalence
    relation (not transitive: {DR, DME} overlaps {DR} and {DME}, which do not overlap), so a
    sample's positives need not be each other's.  Each direction is normalised on its own by
    the loss (rows for image-to-text, columns for text-to-image).  A sample without any label
    has an all-zero row and column (never an anchor).  These are exactly the loss's own rules
    for paired multi-hot ``labels[g]`` with ``MGLLLoss(overlap=rule)`` (one implementation),
    with the loss's default: ``from_multi_hot(labels)`` as bank ``targets[g]`` gives the loss
    of ``MGLLLoss()`` on paired ``labels[g]``.

    Args:
        a: label sets of the rows: 0/1 entries (bool, integer or float) or float label
            probabilities in [0, 1].
        b: label sets of the columns; default ``a``.
        overlap: ``"jaccard"`` (intersection over union, default, as the loss's), ``"any"``
            (binary overlap) or ``"count"`` (number of shared labels).
        mode: the old name of ``overlap`` (mgll 0.1, whose default was ``"any"``): still
            accepted with a DeprecationWarning until 0.3.

    Shape:
        - a: (N, C_g)
        - b: (K, C_g)
        - Output: (N, K) float32 (float64 for float64 inputs)

    Raises:
        ValueError: integer entries other than 0/1, float entries outside [0, 1] or not finite,
            shapes that do not match, or an unknown ``overlap``.
        TypeError: a non-tensor input.

    Example:
        >>> a = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
        >>> from_multi_hot(a)  # overlap="jaccard"
        tensor([[1.0000, 0.5000, 0.0000],
                [0.5000, 1.0000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
        >>> u = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.5, 1.0]])  # 0.5: an uncertain label
        >>> from_multi_hot(u, overlap="any")
        tensor([[1.0000, 0.5000, 0.5000],
                [0.5000, 0.2500, 0.2500],
                [0.5000, 0.2500, 1.0000]])
    """
    rule = renamed_keyword("from_multi_hot", "mode", "overlap", mode, overlap, "jaccard")
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(
            f"`overlap` must be one of {RULES} (from_multi_hot takes one rule; the loss's "
            f"per-granularity list is one call per granularity), got {rule!r}"
        )
    x = _multi_hot("a", a, soft=True)
    y = x if b is None else _multi_hot("b", b, classes=x.shape[1], soft=True).to(x.dtype)
    unknown = (torch.isnan(x).any() | torch.isnan(y).any()).item()
    binary = all(((t == 0) | (t == 1) | torch.isnan(t)).all() for t in (x, y))
    if not unknown:
        return _overlap(x, y, rule, bool(binary))
    weights, known = partial_overlap(x, y, rule, bool(binary))
    return torch.where(known, weights, torch.nan)


def label_set_ids(a: Tensor) -> Tensor:
    r"""One integer id per distinct label set: "same caption" labels for an extra granularity.

    .. math::
        \mathrm{id}_i = \sum_c a_{ic}\, 2^c

    Two samples get the same id exactly when their label sets are equal (an empty set is a set
    of its own), so paired ids ``label_set_ids(a)`` make the targets "exactly that label set",
    the target of a plain CLIP caption.  Pass them as one more granularity beside the multi-hot
    labels, with the same texts used twice::

        labels = [a, label_set_ids(a)]; texts = [caption_features, caption_features]
        loss_fn = MGLLLoss(overlap=["jaccard", "any"])  # the rule of the ids is "equal id"

    The id depends on the set only, not on the batch, so it is the same on every rank under
    ``torch.distributed``.  (Ids from ``torch.unique(a, dim=0, return_inverse=True)`` are
    not: they number the sets of each rank's own batch, and rank 0's set 3 need not be rank
    1's set 3; use them only in one process.)

    Args:
        a: 0/1 label sets (bool, integer or float), at most 63 classes (the bits of an int64).
            For label probabilities decide first which sets count as equal, e.g. ``a > 0``.

    Shape:
        - a: (N, C_g)
        - Output: (N,) int64

    Raises:
        ValueError: entries other than 0/1, a tensor that is not 2-D, or more than 63 classes.
        TypeError: a non-tensor input.

    Example:
        >>> label_set_ids(torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]]))
        tensor([5, 2, 5, 0])
    """
    x = _multi_hot("a", a)
    if x.shape[1] > 63:
        raise ValueError(
            f"`a` must have at most 63 classes for exact int64 set ids, got C_g={x.shape[1]}; "
            "split the classes or number the sets of the global batch yourself"
        )
    bits = 2 ** torch.arange(x.shape[1], dtype=torch.int64, device=x.device)
    return (x.to(torch.int64) * bits).sum(1)


def expand_ancestors(a: Tensor, ancestors: Tensor) -> Tensor:
    r"""Add every label's ancestors to multi-hot label sets ("a fine label implies its parents").

    .. math::
        \hat a_{ic} = \max\big(a_{ic},\ \max_{c'} a_{ic'} A_{c'c}\big)

    Args:
        a: multi-hot label sets, entries 0/1.
        ancestors: A with ``A[c, p] = 1`` when class p is a (transitive) ancestor of class c,
            as returned by :meth:`mgll.text.LabelHierarchy.matrix`.

    Shape:
        - a: (N, C_g)
        - ancestors: (C_g, C_g)
        - Output: (N, C_g) float32, entries 0 or 1

    Example:
        >>> A = torch.tensor([[0, 0], [1, 0]])  # class 1 ("NPDR") has ancestor class 0 ("DR")
        >>> expand_ancestors(torch.tensor([[0, 1]]), A)
        tensor([[1., 1.]])
    """
    x = _multi_hot("a", a)
    anc = _ancestor_matrix(ancestors, x.shape[1])
    return ((x + x @ anc) > 0).to(x.dtype)


def from_hierarchy(
    a: Tensor, b: Tensor | None = None, *, ancestors: Tensor, ancestor_credit: float = 0.0
) -> Tensor:
    r"""Co-occurrence over a label hierarchy, with optional partial credit for relatives.

    .. math::
        C_{ik} = \begin{cases}
            1 & \text{if } \hat a_i \cap b_k \ne \emptyset
              \quad\text{(text k names a label of image i or one of its ancestors)}\\
            \text{ancestor\_credit} & \text{else if } \hat a_i \cap \hat b_k \ne \emptyset
              \quad\text{(they only share an ancestor)}\\
            0 & \text{otherwise}
        \end{cases}

    where :math:`\hat a` adds the ancestors (:func:`expand_ancestors`): a fine label implies
    its ancestors, not the other way round.  An image labelled "moderate NPDR" is a full
    positive of the bank text "DR"; an image labelled only "DR" is not a full positive of the
    text "NPDR" (it may be PDR), and with ``ancestor_credit=0.5`` both it and a "PDR" image are
    half positives of "NPDR".  The default ``ancestor_credit=0`` is what
    :class:`mgll.text.MultiGranularTextBuilder` produces in bank mode; ``ancestor_credit=1`` is
    the any-overlap of the expanded sets (symmetric when ``b`` is omitted; the builder's paired
    labels with a hierarchy).  For ``0 <= ancestor_credit < 1`` the result is **not**
    symmetric, even with ``b`` omitted: the rows are images, the columns texts; the loss
    normalises rows (image-to-text) and columns (text-to-image) separately.

    Args:
        a: multi-hot label sets of the rows, entries 0/1.
        b: label sets of the columns; default ``a``.
        ancestors: (C_g, C_g) ancestor matrix, see :func:`expand_ancestors`.
        ancestor_credit: weight in [0, 1] for pairs related only through a shared ancestor.

    Shape:
        - a: (N, C_g)
        - b: (K, C_g)
        - Output: (N, K) float32

    Example:
        >>> A = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0]])  # DR <- NPDR, DR <- PDR
        >>> a = torch.tensor([[0, 1, 0], [0, 0, 1]])  # an NPDR image, a PDR image
        >>> from_hierarchy(a, torch.eye(3), ancestors=A, ancestor_credit=0.5)  # bank: DR, NPDR, PDR
        tensor([[1.0000, 1.0000, 0.5000],
                [1.0000, 0.5000, 1.0000]])
    """
    if isinstance(ancestor_credit, bool) or not isinstance(ancestor_credit, (int, float)):
        raise TypeError(f"`ancestor_credit` must be a number, got {type(ancestor_credit).__name__}")
    if not 0.0 <= ancestor_credit <= 1.0:
        raise ValueError(f"`ancestor_credit` must be in [0, 1], got {ancestor_credit}")
    x = _multi_hot("a", a)
    y = x if b is None else _multi_hot("b", b, classes=x.shape[1])
    x_up, y_up = expand_ancestors(x, ancestors), expand_ancestors(y, ancestors)
    implied = (x_up @ y.T) > 0
    related = (x_up @ y_up.T) > 0
    out = torch.where(implied, 1.0, torch.where(related, float(ancestor_credit), 0.0))
    return out.to(x.dtype)


def normalize(C: Tensor, dim: int) -> Tensor:
    r"""Normalise C per direction; lines without a positive stay zero.

    .. math::
        \text{dim}=1:\ W^r_{ik} = \frac{C_{ik}}{\sum_{k'} C_{ik'}} \qquad
        \text{dim}=0:\ W^c_{ik} = \frac{C_{ik}}{\sum_{i'} C_{i'k}}

    ``dim=1`` gives the image-to-text weights (each row a distribution over texts);
    ``dim=0`` gives the text-to-image weights (each column a distribution over images).
    The result is symmetric only if C is symmetric with equal line sums.

    Args:
        C: non-negative co-occurrence.
        dim: 1 (rows, image-to-text) or 0 (columns, text-to-image).

    Shape:
        - C: (N, K)
        - Output: (N, K), the dtype of C promoted to at least float32

    Example:
        >>> normalize(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), dim=1)
        tensor([[0.5000, 0.5000],
                [0.0000, 0.0000]])
    """
    c = _cooc("C", C)
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"`dim` must be 0 (columns) or 1 (rows) of the (N, K) matrix, got {dim}")
    sums = c.sum(dim, keepdim=True)
    return c / torch.where(sums > 0, sums, torch.ones_like(sums))


def smooth(C: Tensor, epsilon: float, dim: int = 1) -> Tensor:
    r"""Label smoothing of a normalised target, line by line.

    .. math::
        \tilde W = (1-\varepsilon)\, W + \varepsilon / L

    where W is C normalised along ``dim`` (:func:`normalize`) and L the length of that line
    (K for rows, N for columns).  Lines without a positive stay zero (they are not anchors).
    Not symmetric in general; smoothing makes every entry of an anchored line positive, so
    use it with the soft pointwise target (``pointwise_target="soft"``) or with
    :func:`mgll.functional.soft_clip_loss` in the direction it was normalised for.

    Args:
        C: non-negative co-occurrence (normalised or not; it is normalised first).
        epsilon: smoothing mass in [0, 1).
        dim: 1 (rows, image-to-text, default) or 0 (columns, text-to-image).

    Shape:
        - C: (N, K)
        - Output: (N, K)

    Example:
        >>> smooth(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 0.2)
        tensor([[0.8500, 0.0500, 0.0500, 0.0500],
                [0.0000, 0.0000, 0.0000, 0.0000]])
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"`epsilon` must be a number, got {type(epsilon).__name__}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"`epsilon` must be in [0, 1), got {epsilon}")
    w = normalize(C, dim)
    anchored = (w.sum(dim, keepdim=True) > 0).to(w.dtype)
    return (1.0 - epsilon) * w + anchored * (epsilon / w.shape[dim])


def similarity_softmax(a: Tensor, b: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    r"""MedCLIP-style soft targets: a softmax over label-vector cosine similarity.

    .. math::
        W_{ik} = \frac{\exp(\cos(a_i, b_k)/\tau)}{\sum_{k'} \exp(\cos(a_i, b_{k'})/\tau)}

    MedCLIP uses :math:`\tau = 1`, which keeps targets close to uniform; a small temperature
    sharpens them towards the rows' best matches.  The result is already row-normalised (the
    image-to-text weights); the loss column-normalises it for text-to-image.  Not symmetric,
    even with ``b`` omitted.  Rows whose label vector is all zero stay zero (no anchor), and
    columns with a zero label vector get no mass.

    Args:
        a: label vectors of the rows (multi-hot or soft, non-negative).
        b: label vectors of the columns; default ``a``.
        temperature: :math:`\tau > 0`.

    Shape:
        - a: (N, C_g)
        - b: (K, C_g)
        - Output: (N, K) float32, rows sum to 1 or 0

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> similarity_softmax(a, temperature=0.1).round(decimals=4)
        tensor([[0.9493, 0.0507],
                [0.0507, 0.9493]])
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a number, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    x = _cooc("a", a)
    y = x if b is None else _cooc("b", b)
    if y.dim() != 2 or y.shape[1] != x.shape[1]:
        raise ValueError(f"`b` must have shape (K, C_g={x.shape[1]}), got {tuple(y.shape)}")
    xn, yn = _unit_rows(x), _unit_rows(y)
    logits = (xn @ yn.T) / temperature
    col_ok = (y.abs().sum(1) > 0)[None, :]
    logits = logits.masked_fill(~col_ok, float("-inf"))
    row_ok = (x.abs().sum(1, keepdim=True) > 0) & col_ok.any()
    w = torch.softmax(torch.where(row_ok, logits, torch.zeros_like(logits)), dim=1)
    return torch.where(row_ok, w, torch.zeros_like(w))


def stable_ids(labels: Sequence[str]) -> Tensor:
    r"""Integer class ids for label strings that are the same on every rank and in every run.

    Under ``torch.distributed`` the loss gathers every rank's ``labels`` and compares ids across
    ranks, so an id must mean the same class everywhere.  Numbering each batch's labels on its
    own (``torch.unique(..., return_inverse=True)`` per batch) gives rank 0's "DR" and rank 1's
    "AMD" the same id 0, and the loss trains on wrong targets without any error.  The first
    choice is the declared classes of a :class:`mgll.text.Granularity` (the builder's ids);
    this helper serves labels that are only known as strings: each id is the first 63 bits of
    the BLAKE2b hash of the UTF-8 string (not Python's ``hash``, which changes from process to
    process).  Two distinct strings share an id with probability about :math:`2^{-63}` per pair.

    Args:
        labels: one label string per sample.

    Shape:
        - Output: (N,) int64, non-negative

    Raises:
        TypeError: ``labels`` is a single string, or holds something other than strings.

    Example:
        >>> ids = stable_ids(["DR", "AMD", "DR"])
        >>> ids.dtype, bool(ids[0] == ids[2]), bool(ids[0] != ids[1])
        (torch.int64, True, True)
        >>> bool((stable_ids(["AMD"]) == ids[1]).all())  # the same id in any batch, on any rank
        True
    """
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        got = "a single string" if isinstance(labels, str) else type(labels).__name__
        raise TypeError(f"`labels` must be a sequence of label strings, got {got}")
    ids = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise TypeError(f"`labels[{i}]` must be a string, got {type(label).__name__}")
        digest = hashlib.blake2b(label.encode("utf-8"), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "big") >> 1)  # 63 bits: a non-negative int64
    return torch.tensor(ids, dtype=torch.int64).reshape(len(ids))


# Input checks: each takes the argument's name, so that its error names the argument, the
# expected and the received value.


def _unit_rows(x: Tensor) -> Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _ids_tensor(name: str, ids: object) -> Tensor:
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"`{name}` must hold integer or bool ids, got dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"`{name}` must be 1-D (N,), got shape {tuple(ids.shape)}")
        return ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(
            f"`{name}` must be a 1-D integer tensor or a sequence of hashable keys, got "
            f"{type(ids).__name__}"
        )
    return _encode_keys(ids, ids)[0]


def _encode_keys(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[Tensor, Tensor]:
    codes: dict[Hashable, int] = {}
    out = []
    for name, keys in (("ids_a", a), ("ids_b", b)):
        row = []
        for j, key in enumerate(keys):
            try:
                row.append(codes.setdefault(key, len(codes)))
            except TypeError:
                raise TypeError(
                    f"`{name}[{j}]` must be hashable (an id or a key such as a string), got "
                    f"{type(key).__name__}"
                ) from None
        out.append(torch.tensor(row, dtype=torch.long))
    return out[0], out[1]


def _multi_hot(name: str, x: object, classes: int | None = None, soft: bool = False) -> Tensor:
    """Validated label sets as float (at least float32); ``soft`` also allows floats in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a (rows, C_g) multi-hot tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D (rows, C_g) multi-hot, got shape {tuple(x.shape)}")
    if classes is not None and x.shape[1] != classes:
        raise ValueError(
            f"`{name}` must have C_g={classes} columns to match `a`, got {tuple(x.shape)}"
        )
    if x.is_complex():
        raise TypeError(f"`{name}` must be real 0/1 entries, got dtype {x.dtype}")
    if soft and x.is_floating_point():
        bad = ~((x >= 0) & (x <= 1) | torch.isnan(x))  # NaN: not annotated
        if bool(bad.any()):
            raise ValueError(
                f"`{name}` multi-hot entries must be 0/1, label probabilities in [0, 1] or NaN "
                f"(not annotated), got {x[bad][0].item()}"
            )
    elif x.dtype != torch.bool and bool(((x != 0) & (x != 1)).any()):
        bad = x[(x != 0) & (x != 1)][0].item()
        raise ValueError(f"`{name}` multi-hot entries must be 0 or 1, got {bad}")
    return x.to(
        torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    )


def _ancestor_matrix(ancestors: object, classes: int) -> Tensor:
    if not isinstance(ancestors, Tensor):
        raise TypeError(
            f"`ancestors` must be a (C_g, C_g) tensor (LabelHierarchy.matrix), got "
            f"{type(ancestors).__name__}"
        )
    if tuple(ancestors.shape) != (classes, classes):
        raise ValueError(
            f"`ancestors` must have shape (C_g, C_g) = {(classes, classes)} to match the label "
            f"sets, got {tuple(ancestors.shape)}"
        )
    return (ancestors != 0).to(torch.float32)


def _cooc(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}")
    x = x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    if bool((x < 0).any()):
        raise ValueError(f"`{name}` must be non-negative, got min {float(x.min())}")
    return x
