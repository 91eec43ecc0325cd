r"""One vocabulary for several providers: which classes each source annotates, under which name.

A :class:`LabelMap` holds, per source, a :class:`SourceLabels`: the classes the source
annotates at each labelled granularity (its own spelling), how they are renamed into the union
vocabulary, and the free-text granularities it carries.  The union class list of a granularity
is every source's renamed classes, in source order; a class with no counterpart in another
source stays a class of its own, and that other source's images are **unknown** there, not
negative.

:data:`CHEST_X_RAY_LABEL_MAP` maps ChestX-ray14 onto the CheXpert / MIMIC-CXR names; every
renaming and every decision to keep two classes apart is listed, with its source, in
:doc:`/guide_data` ("Merging sources").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mgll.datasets.chestxray14 import CHESTXRAY14_FINDINGS
from mgll.datasets.chexpert import CHEXPERT_CATEGORIES, CHEXPERT_OBSERVATIONS

__all__ = ["CHEST_X_RAY_LABEL_MAP", "LabelMap", "SourceLabels"]


@dataclass(frozen=True)
class SourceLabels:
    r"""What one source annotates: classes per granularity, their union names, its text fields.

    Args:
        classes: ``{granularity: [class, ...]}``: the classes the source annotates at each
            labelled granularity, in its own spelling (a granularity it does not list is not
            annotated at all: e.g. a coarse-only source lists only its coarse one).
        rename: ``{granularity: {source class: union class}}``; unlisted classes keep their name.
        texts: the free-text granularities it carries (e.g. ``("description",)``).
        uncertain: the granularity that the reader's ``"uncertain"`` list refers to; default
            the first of ``classes``.

    Example:
        >>> s = SourceLabels({"finding": ["Effusion", "Mass"]},
        ...                  rename={"finding": {"Effusion": "Pleural Effusion"}})
        >>> s.union("finding")
        ('Pleural Effusion', 'Mass')
    """

    classes: Mapping[str, Sequence[str]]
    rename: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    texts: Sequence[str] = ()
    uncertain: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.classes, Mapping) or not all(
            isinstance(v, Sequence) and not isinstance(v, str) for v in self.classes.values()
        ):
            raise TypeError(
                f"`classes` must map each granularity to a list of class names, got "
                f"{self.classes!r}"
            )
        stray = [g for g in self.rename if g not in self.classes]
        if stray:
            raise ValueError(
                f"`rename` names granularities {stray} that are not in `classes` "
                f"{list(self.classes)}; add their classes or drop the renaming"
            )
        for g, names in self.rename.items():
            unknown = [x for x in names if x not in self.classes[g]]
            if unknown:
                raise ValueError(
                    f"`rename[{g!r}]` renames {unknown}, which are not in `classes[{g!r}]`"
                )
        if isinstance(self.texts, str):
            raise TypeError(f"`texts` must be a list of granularity names, got {self.texts!r}")
        if self.uncertain is not None and self.uncertain not in self.classes:
            raise ValueError(
                f"`uncertain` must name a granularity of `classes` {list(self.classes)}, "
                f"got {self.uncertain!r}"
            )
        object.__setattr__(self, "classes", {g: tuple(v) for g, v in self.classes.items()})
        object.__setattr__(self, "rename", {g: dict(v) for g, v in self.rename.items()})
        object.__setattr__(self, "texts", tuple(self.texts))

    @property
    def uncertain_granularity(self) -> str | None:
        """The granularity of the reader's ``"uncertain"`` list."""
        return self.uncertain if self.uncertain is not None else next(iter(self.classes), None)

    def union(self, granularity: str) -> tuple[str, ...]:
        """The union names of the classes annotated at ``granularity`` (``()`` if none)."""
        names = self.rename.get(granularity, {})
        return tuple(names.get(x, x) for x in self.classes.get(granularity, ()))


@dataclass(frozen=True)
class LabelMap:
    r"""The sources of a merge and one union class list per labelled granularity.

    Args:
        sources: ``{source name: SourceLabels}``; the names are the ``source`` tags of the
            merged annotations and the keys :func:`~mgll.datasets.merge_sources` takes.

    Example:
        >>> m = LabelMap({
        ...     "a": SourceLabels({"finding": ["Effusion", "Hernia"]},
        ...                       rename={"finding": {"Effusion": "Pleural Effusion"}}),
        ...     "b": SourceLabels({"finding": ["Pleural Effusion", "Fracture"], "category": ["x"]}),
        ... })
        >>> m.classes("finding")
        ('Pleural Effusion', 'Hernia', 'Fracture')
        >>> m.granularities, m.with_source("c", SourceLabels({"category": ["y"]})).classes("category")
        (('finding', 'category'), ('x', 'y'))
    """

    sources: Mapping[str, SourceLabels]

    def __post_init__(self) -> None:
        if not isinstance(self.sources, Mapping) or not self.sources:
            raise TypeError(f"`sources` must be a non-empty mapping, got {self.sources!r}")
        bad = {
            k: type(v).__name__ for k, v in self.sources.items() if not isinstance(v, SourceLabels)
        }
        if bad:
            raise TypeError(f"`sources` values must be SourceLabels, got {bad}")
        object.__setattr__(self, "sources", dict(self.sources))

    @property
    def granularities(self) -> tuple[str, ...]:
        """Every labelled granularity, in order of first appearance."""
        return tuple(dict.fromkeys(g for s in self.sources.values() for g in s.classes))

    @property
    def text_granularities(self) -> tuple[str, ...]:
        """Every free-text granularity, in order of first appearance."""
        return tuple(dict.fromkeys(g for s in self.sources.values() for g in s.texts))

    def classes(self, granularity: str) -> tuple[str, ...]:
        """The union class list of ``granularity``."""
        if granularity not in self.granularities:
            raise ValueError(
                f"`granularity` must be one of {self.granularities}, got {granularity!r}"
            )
        return tuple(dict.fromkeys(x for s in self.sources.values() for x in s.union(granularity)))

    def with_source(self, name: str, labels: SourceLabels) -> LabelMap:
        """A copy with one more (or one replaced) source."""
        return LabelMap({**self.sources, name: labels})

    def __getitem__(self, name: str) -> SourceLabels:
        if name not in self.sources:
            raise KeyError(
                f"source {name!r} is not in the label map; known sources: {list(self.sources)}. "
                "Add it with LabelMap.with_source(name, SourceLabels(...))"
            )
        return self.sources[name]


_CHEXPERT_FINDINGS = tuple(x for x in CHEXPERT_OBSERVATIONS if x != "No Finding")
_CHEXPERT_LIKE = SourceLabels(
    {"category": CHEXPERT_CATEGORIES, "finding": _CHEXPERT_FINDINGS},
    texts=("description",),
    uncertain="finding",
)

#: CheXpert, MIMIC-CXR and ChestX-ray14: ``"finding"`` (CheXpert's 13 findings, then the 7
#: ChestX-ray14 findings without a CheXpert counterpart: 20 classes), ``"category"``
#: (CheXpert's roots; not annotated by ChestX-ray14) and ``"description"``.  ``Effusion`` is
#: ``Pleural Effusion`` and ``Pleural_Thickening`` is written ``Pleural Thickening``; the other
#: shared findings have the same names in both label definitions.
CHEST_X_RAY_LABEL_MAP = LabelMap(
    {
        "chexpert": _CHEXPERT_LIKE,
        "mimic_cxr": _CHEXPERT_LIKE,
        "chestxray14": SourceLabels(
            {"finding": CHESTXRAY14_FINDINGS},
            rename={
                "finding": {
                    "Effusion": "Pleural Effusion",
                    "Pleural_Thickening": "Pleural Thickening",
                }
            },
            texts=("description",),
        ),
    }
)
