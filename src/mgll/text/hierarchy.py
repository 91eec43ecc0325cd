"""``LabelHierarchy``: a forest of labels, so that a fine label implies its ancestors."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

Label = Hashable


class LabelHierarchy:
    """A label forest given as ``{child: parent}``; a fine label implies all its ancestors.

    Roots are labels that appear only as parents (or are listed in ``labels`` without a parent);
    a child may map to ``None`` to declare it a root explicitly.  The mapping is validated on
    construction: no label may be its own ancestor (cycles are reported as the loop of names),
    and when a vocabulary ``labels`` is given every child and parent must belong to it (unknown
    labels are reported by name).

    Args:
        parents: ``{child: parent}`` (parent ``None`` for an explicit root).
        labels: optional vocabulary; default: every label named in ``parents``.

    Raises:
        TypeError: ``parents`` is not a mapping, or holds unhashable labels.
        ValueError: a cycle, or labels outside ``labels``.

    Example:
        >>> h = LabelHierarchy({"moderate NPDR": "NPDR", "NPDR": "DR", "PDR": "DR"})
        >>> h.ancestors("moderate NPDR")
        ('NPDR', 'DR')
        >>> h.expand(["moderate NPDR", "AMD"], strict=False)
        ('AMD', 'DR', 'NPDR', 'moderate NPDR')
    """

    def __init__(
        self, parents: Mapping[Label, Label | None], labels: Iterable[Label] | None = None
    ) -> None:
        if not isinstance(parents, Mapping):
            raise TypeError(
                f"`parents` must be a mapping {{child: parent}}, got {type(parents).__name__}"
            )
        for child, parent in parents.items():
            if not isinstance(parent, Hashable):
                raise TypeError(
                    f"`parents` must map each child to one parent label (or None), got "
                    f"{type(parent).__name__} {parent!r} for child {child!r}"
                )
        self._parents: dict[Label, Label] = {c: p for c, p in parents.items() if p is not None}
        named = set(parents) | set(self._parents.values())
        if labels is not None:
            if isinstance(labels, str):
                raise TypeError("`labels` must be an iterable of labels, got a single string")
            vocab = set(labels)
            unknown = named - vocab
            if unknown:
                raise ValueError(
                    f"`parents` names labels missing from `labels`: {_names(unknown)}; add them "
                    "to the vocabulary or fix the spelling"
                )
            self._labels = frozenset(vocab)
        else:
            self._labels = frozenset(named)
        self._ancestors = {x: self._walk(x) for x in sorted(self._labels, key=label_key)}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, object], labels: Iterable[Label] | None = None
    ) -> LabelHierarchy:
        """From ``{child: parent}`` or ``{"parents": {child: parent}, "labels": [...]}``."""
        if isinstance(data, Mapping) and isinstance(data.get("parents"), list | tuple):
            raise TypeError(
                "`data['parents']` must be a mapping {child: parent}, got a "
                f"{type(data['parents']).__name__}; write it as a JSON object, e.g. "
                '{"parents": {"NPDR": "DR"}}'
            )
        if isinstance(data, Mapping) and "parents" in data and isinstance(data["parents"], Mapping):
            extra = set(data) - {"parents", "labels"}
            if extra:
                raise ValueError(
                    f"`data` with a 'parents' key may only also hold 'labels', got keys {_names(extra)}"
                )
            return cls(data["parents"], data.get("labels", labels))
        return cls(data, labels)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LabelHierarchy:
        """Load a JSON file holding either form accepted by :meth:`from_dict`.

        Raises:
            ValueError: the file is not UTF-8 JSON holding an object (the message names the
                file and, for a JSON error, the line and column); the checks of
                :meth:`from_dict`, with the file named.
            TypeError: a non-mapping ``parents`` (also naming the file).
        """
        name = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"`path` {name!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                f"{exc.colno}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"`path` {name!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save the "
                "hierarchy as UTF-8 JSON"
            ) from exc
        if not isinstance(data, dict):
            raise ValueError(f"`path` {name!r} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"in {name!r}: {exc}") from exc

    @property
    def labels(self) -> frozenset[Label]:
        """Every known label."""
        return self._labels

    @property
    def parents(self) -> dict[Label, Label]:
        """A copy of ``{child: parent}`` (roots omitted)."""
        return dict(self._parents)

    def __contains__(self, label: object) -> bool:
        return label in self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        roots = sorted(str(x) for x in self._labels if x not in self._parents)
        return f"LabelHierarchy({len(self._labels)} labels, roots={roots})"

    def ancestors(self, label: Label) -> tuple[Label, ...]:
        """The ancestors of ``label``, nearest first; ``()`` for a root.

        Raises:
            ValueError: ``label`` is not in the hierarchy (reported by name).
        """
        try:
            return self._ancestors[label]
        except (KeyError, TypeError):
            raise ValueError(
                f"`label` {label!r} is not in the hierarchy ({len(self._labels)} labels)"
            ) from None

    def expand(self, labels: Iterable[Label], strict: bool = True) -> tuple[Label, ...]:
        """``labels`` with all their ancestors added, de-duplicated, in canonical (sorted) order.

        Args:
            labels: the labels of one sample.
            strict: raise on labels outside the hierarchy (default); with ``strict=False``
                they are kept and have no ancestors.

        Raises:
            ValueError: unknown labels (all of them, by name) when ``strict``.
        """
        if isinstance(labels, str):
            labels = [labels]
        labels = list(labels)
        unknown = [x for x in labels if x not in self._labels]
        if unknown and strict:
            raise ValueError(
                f"`labels` holds labels not in the hierarchy: {_names(unknown)}; pass "
                "strict=False to keep them without ancestors"
            )
        out = set(labels)
        for x in labels:
            out.update(self._ancestors.get(x, ()))
        return tuple(sorted(out, key=label_key))

    def matrix(self, classes: Sequence[Label]) -> Tensor:
        """Ancestor matrix A over ``classes``: ``A[c, p] = 1`` when ``classes[p]`` is an ancestor
        of ``classes[c]`` (for :func:`mgll.targets.expand_ancestors`).  Ancestors missing from
        ``classes`` are skipped, so a chain through them still links the listed classes.

        Shape:
            - Output: (C_g, C_g) bool
        """
        index = {c: j for j, c in enumerate(classes)}
        out = torch.zeros(len(classes), len(classes), dtype=torch.bool)
        for j, c in enumerate(classes):
            for p in self._ancestors.get(c, ()):
                if p in index:
                    out[j, index[p]] = True
        return out

    def _walk(self, label: Label) -> tuple[Label, ...]:
        chain: list[Label] = []
        seen = {label}
        node = label
        while node in self._parents:
            node = self._parents[node]
            if node in seen:
                path = [label, *chain, node]
                loop = path[path.index(node) :]
                raise ValueError("`parents` has a cycle: " + " -> ".join(repr(x) for x in loop))
            seen.add(node)
            chain.append(node)
        return tuple(chain)


def label_key(label: Label) -> tuple[int, str, object]:
    """Canonical sort key: numbers before strings, each in natural order; anything else by repr."""
    if isinstance(label, bool):
        return (2, "", repr(label))
    if isinstance(label, (int, float)):
        return (0, "", label)
    if isinstance(label, str):
        return (1, label, "")
    return (2, "", repr(label))


def _names(labels: Iterable[Label]) -> str:
    return ", ".join(repr(x) for x in sorted(labels, key=label_key))
