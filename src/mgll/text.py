r"""Label-to-text builders: structured annotations in, texts and loss inputs out (SPEC section 6).

A :class:`Granularity` says how one annotation field becomes text (a template, optional
per-label descriptions); a :class:`MultiGranularTextBuilder` turns a batch of annotations
(``{"disease": ["DR", "DME"], "description": "...", ...}``) into, per granularity, the texts
to encode, their de-duplicated ``unique_texts`` with an ``inverse`` index, and the ``labels``
(paired mode) or ``targets`` (bank mode) that :class:`mgll.MGLLLoss` needs.

Example:
    >>> builder = MultiGranularTextBuilder([
    ...     Granularity("disease", "This is a fundus image of {}."),
    ...     Granularity("explanation"),
    ... ])
    >>> batch = builder.build([
    ...     {"disease": ["DR", "DME"], "explanation": "hard exudates near the macula"},
    ...     {"disease": ["DME", "DR"], "explanation": "microaneurysms"},
    ...     {"disease": "AMD"},
    ... ])
    >>> batch["disease"].texts
    ('This is a fundus image of DME, DR.', 'This is a fundus image of DME, DR.', 'This is a fundus image of AMD.')
    >>> batch["disease"].unique_texts, batch["disease"].inverse
    (('This is a fundus image of DME, DR.', 'This is a fundus image of AMD.'), tensor([0, 0, 1]))
    >>> batch["disease"].labels  # multi-hot over classes ('AMD', 'DME', 'DR')
    tensor([[False,  True,  True],
            [False,  True,  True],
            [ True, False, False]])
    >>> encode = lambda strings: torch.randn(len(strings), 16)  # a toy text encoder
    >>> image = torch.randn(3, 16, requires_grad=True)
    >>> loss = mgll.MGLLLoss()(image, batch.encode(encode), torch.tensor(10.0), **batch.loss_kwargs())
    >>> loss.backward()
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mgll._hierarchy import Label, LabelHierarchy, label_key
from mgll._textbatch import GranularityTexts, TextBatch, encode_unique, unique_inverse

__all__ = [
    "Granularity",
    "GranularityTexts",
    "LabelHierarchy",
    "MultiGranularTextBuilder",
    "TextBatch",
    "encode_unique",
]

_MODES = ("paired", "bank")
_LABEL_FORMATS = ("auto", "ids", "multi_hot")


@dataclass(frozen=True)
class Granularity:
    r"""How one annotation field becomes text.

    A sample's labels at this granularity are read from ``annotation[key]`` (default: ``name``):
    a string or integer is one label, a list/tuple/set is a label set, ``None``, an empty list
    or a missing key means "no label here".  The sample's text is
    ``template.format(phrases)`` where the phrases of its labels, in canonical order (the order
    of ``classes`` when given, else sorted), are joined with ``joiner`` (and ``last_joiner``
    between the last two), so equal label sets always give equal strings.  A label's phrase is
    its description when ``descriptions`` has one (the first, or a random one when
    :meth:`MultiGranularTextBuilder.build` gets an ``rng``), else the label itself.

    Args:
        name: the granularity's name (also the default annotation key).
        template: a format string with one ``{}`` field, e.g. ``"This is a fundus image of {}."``.
        descriptions: ``{label: text or [texts]}``; a description replaces the label's name in
            the text (and every description becomes a zero-shot prompt).
        key: the annotation field to read; default ``name``.
        classes: the label vocabulary, in order: fixes class ids, the canonical order and the
            bank; labels outside it are an error.  Default: the labels seen in each batch, sorted.
        joiner: between the phrases of a multi-label sample.
        last_joiner: between the last two phrases (``" and "`` gives "3, 5 and 7"); default
            ``joiner``.
        separator: split string values on it into label sets (``"DR, DME"`` with ``","``).
        missing_text: the paired-mode text of a sample without a label here (a pure negative:
            its column has no positive, so it is never an anchor).

    Example:
        >>> g = Granularity("digits", "digits {}", last_joiner=" and ")
        >>> g.render(g.labels_of({"digits": [7, 3]}))
        'digits 3 and 7'
    """

    name: str
    template: str = "{}"
    descriptions: Mapping[Label, str | Sequence[str]] | None = None
    key: str | None = field(default=None, kw_only=True)
    classes: Sequence[Label] | None = field(default=None, kw_only=True)
    joiner: str = field(default=", ", kw_only=True)
    last_joiner: str | None = field(default=None, kw_only=True)
    separator: str | None = field(default=None, kw_only=True)
    missing_text: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        for attr in ("name", "template", "joiner", "missing_text"):
            _check_str(attr, getattr(self, attr))
        for attr in ("key", "last_joiner", "separator"):
            if getattr(self, attr) is not None:
                _check_str(attr, getattr(self, attr))
        _check_template(self.template)
        object.__setattr__(self, "descriptions", _check_descriptions(self.descriptions))
        if self.classes is not None:
            object.__setattr__(self, "classes", _check_classes(self.classes))

    @property
    def source(self) -> str:
        """The annotation field this granularity reads."""
        return self.key if self.key is not None else self.name

    def labels_of(self, annotation: Mapping[str, object], where: str = "annotation") -> tuple:
        """The sample's labels here, de-duplicated, in canonical order (``()`` if none)."""
        value = annotation.get(self.source)
        if value is None:
            return ()
        if isinstance(value, str) and self.separator is not None:
            value = [part.strip() for part in value.split(self.separator) if part.strip()]
        items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        for j, x in enumerate(items):
            if isinstance(x, bool) or not isinstance(x, (str, int)):
                raise TypeError(
                    f"`{where}[{self.source!r}]` must hold labels that are strings or integers "
                    f"(or a list of them), got {type(x).__name__} at position {j}: {x!r}"
                )
        if self.classes is not None:
            unknown = [x for x in items if x not in self.classes]
            if unknown:
                raise ValueError(
                    f"`{where}[{self.source!r}]` holds labels not in `classes` of granularity "
                    f"{self.name!r}: {', '.join(map(repr, unknown))}"
                )
        return self.canonical(items)

    def canonical(self, labels: Sequence[Label]) -> tuple:
        """``labels`` de-duplicated in canonical order (``classes`` order, else sorted)."""
        if self.classes is not None:
            order = {c: j for j, c in enumerate(self.classes)}
            return tuple(
                sorted(set(labels), key=lambda x: (order.get(x, len(order)), label_key(x)))
            )
        return tuple(sorted(set(labels), key=label_key))

    def phrases(self, label: Label) -> tuple[str, ...]:
        """The texts that can stand for ``label``: its descriptions, else its name."""
        return self.descriptions.get(label, (str(label),))

    def render(self, labels: Sequence[Label], rng: random.Random | None = None) -> str:
        """The text of one sample whose labels (canonical order) are ``labels``."""
        if len(labels) == 0:
            return self.missing_text
        parts = [self._phrase(x, rng) for x in labels]
        last = self.joiner if self.last_joiner is None else self.last_joiner
        joined = parts[0] if len(parts) == 1 else self.joiner.join(parts[:-1]) + last + parts[-1]
        return self.template.format(joined)

    def prompts(self, label: Label) -> list[str]:
        """Every text this granularity can produce for ``label`` alone (for zero-shot)."""
        return [self.template.format(p) for p in self.phrases(label)]

    def _phrase(self, label: Label, rng: random.Random | None) -> str:
        options = self.phrases(label)
        return options[0] if rng is None or len(options) == 1 else rng.choice(options)


class MultiGranularTextBuilder:
    r"""Turn a batch of structured annotations into texts and MGLL loss inputs.

    Per granularity, :meth:`build` returns a :class:`GranularityTexts` with ``texts`` (what to
    encode, K_g strings), ``unique_texts`` and ``inverse`` (``texts[k] ==
    unique_texts[inverse[k]]``, so a text encoder runs once per distinct string) and:

    * ``mode="paired"`` (K_g = N, text k belongs to sample k): ``labels``, (N,) class ids when
      every sample has exactly one label there, else an (N, C_g) bool multi-hot (a sample
      without a label is an all-zero row: no positive);
    * ``mode="bank"`` (one text per class: every class of ``classes`` when declared, else every
      class present in the batch): ``targets``, the (N, K_g) float 0/1 co-occurrence.

    With a ``hierarchy`` a sample's label set is expanded with the ancestors of its labels
    before labels and targets are formed (a "moderate NPDR" image is also a "DR" image: a
    positive of the bank text "DR", and of a paired "severe NPDR" text through "DR"); the
    texts show the annotated labels only.  One :class:`LabelHierarchy` applies to every
    granularity, labels outside it having no ancestors; a mapping ``{name: hierarchy}`` applies
    per granularity and then every label there must be in its hierarchy.

    Args:
        granularities: the G granularities, in the order of the loss's ``text_features``.
        hierarchy: ``None``, one :class:`LabelHierarchy`, or ``{granularity name: hierarchy}``.
    """

    def __init__(
        self,
        granularities: Sequence[Granularity],
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> None:
        if isinstance(granularities, Granularity) or not isinstance(granularities, Sequence):
            raise TypeError(
                "`granularities` must be a non-empty sequence of Granularity, got "
                f"{type(granularities).__name__}"
            )
        if len(granularities) == 0:
            raise ValueError("`granularities` must hold at least one Granularity, got none")
        for g, gran in enumerate(granularities):
            if not isinstance(gran, Granularity):
                raise TypeError(
                    f"`granularities[{g}]` must be a Granularity, got {type(gran).__name__}"
                )
        names = [gran.name for gran in granularities]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"`granularities` must have distinct names, got repeated {dup}")
        self.granularities = tuple(granularities)
        self._hierarchies = _check_hierarchy(hierarchy, names)

    def __repr__(self) -> str:
        names = ", ".join(repr(g.name) for g in self.granularities)
        return f"MultiGranularTextBuilder([{names}])"

    def build(
        self,
        annotations: Sequence[Mapping[str, object]],
        mode: str = "paired",
        *,
        label_format: str = "auto",
        rng: random.Random | None = None,
    ) -> TextBatch:
        """Texts, unique texts, inverse indices and loss inputs for a batch of N annotations.

        Args:
            annotations: N mappings from field names to labels (see :class:`Granularity`).
            mode: ``"paired"`` (one text per sample, ``labels``) or ``"bank"`` (one text per
                class, ``targets``).
            label_format: paired mode only: ``"auto"`` (ids when every sample has exactly one
                label at the granularity, else multi-hot), ``"ids"`` (an error if a sample
                has zero or several labels) or ``"multi_hot"``.
            rng: picks one of several descriptions per label at random; default the first.

        Returns:
            A :class:`TextBatch`, indexable by granularity name or position.
        """
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if label_format not in _LABEL_FORMATS:
            raise ValueError(
                f"`label_format` must be one of {_LABEL_FORMATS}, got {label_format!r}"
            )
        if isinstance(annotations, (str, Mapping)) or not isinstance(annotations, Sequence):
            raise TypeError(
                "`annotations` must be a sequence of N mappings (one per sample), got "
                f"{type(annotations).__name__}"
            )
        if len(annotations) == 0:
            raise ValueError("`annotations` is empty (N=0); pass at least one sample")
        for i, a in enumerate(annotations):
            if not isinstance(a, Mapping):
                raise TypeError(f"`annotations[{i}]` must be a mapping, got {type(a).__name__}")
        parts = [
            self._one(gran, annotations, mode, label_format, rng) for gran in self.granularities
        ]
        return TextBatch(tuple(parts), mode)

    def _one(self, gran, annotations, mode, label_format, rng) -> GranularityTexts:
        own = [gran.labels_of(a, f"annotations[{i}]") for i, a in enumerate(annotations)]
        sets = [self._expand(gran, labels, i) for i, labels in enumerate(own)]
        if gran.classes is not None:
            classes = gran.classes
        else:
            classes = gran.canonical([x for s in sets for x in s])
        index = {c: j for j, c in enumerate(classes)}
        multi_hot = torch.zeros(len(sets), len(classes), dtype=torch.bool)
        for i, s in enumerate(sets):
            multi_hot[i, [index[x] for x in s]] = True
        labels = targets = None
        if mode == "paired":
            texts = tuple(gran.render(labels, rng) for labels in own)
            labels = _paired_labels(gran.name, multi_hot, label_format)
        else:
            texts = tuple(gran.render((c,), rng) for c in classes)
            targets = multi_hot.to(torch.float32)
        unique, inverse = unique_inverse(texts)
        return GranularityTexts(
            name=gran.name,
            mode=mode,
            texts=texts,
            unique_texts=unique,
            inverse=inverse,
            classes=tuple(classes),
            label_sets=tuple(sets),
            labels=labels,
            targets=targets,
        )

    def _expand(self, gran: Granularity, labels: tuple, i: int) -> tuple:
        strict, hierarchy = self._hierarchies.get(gran.name, (False, None))
        if hierarchy is None or not labels:
            return labels
        try:
            expanded = hierarchy.expand(labels, strict=strict)
        except ValueError as err:
            raise ValueError(f"`annotations[{i}]` at granularity {gran.name!r}: {err}") from None
        if gran.classes is not None:
            missing = [x for x in expanded if x not in gran.classes]
            if missing:
                raise ValueError(
                    f"`annotations[{i}]`: the ancestors {', '.join(map(repr, missing))} of its "
                    f"labels are not in `classes` of granularity {gran.name!r}; declare them"
                )
        return gran.canonical(expanded)

    @classmethod
    def mgll_fundus(
        cls,
        levels: Sequence[str] = ("disease", "description"),
        *,
        separator: str | None = None,
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> MultiGranularTextBuilder:
        """A builder for MGLL-Fundus records ``{"ImageID", "Disease", "Description", "Keyword"}``.

        Granularities (choose with ``levels``, in order): ``"disease"`` (field ``Disease``,
        prompt ``"This is a fundus image of {}"`` as in the authors' code), ``"description"``
        (field ``Description``, verbatim) and ``"keyword"`` (field ``Keyword``, the disease
        prompt).  ``separator`` (e.g. ``","``) splits multi-disease strings into label sets;
        by default a whole string is one label, so samples match when their strings are
        identical, as in the authors' code.
        """
        table = {
            "disease": ("Disease", "This is a fundus image of {}"),
            "description": ("Description", "{}"),
            "keyword": ("Keyword", "This is a fundus image of {}"),
        }
        return cls(_preset("levels", levels, table, separator), hierarchy)

    @classmethod
    def midrc(
        cls,
        levels: Sequence[str] = ("modality", "study_description", "series_description"),
        *,
        hierarchy: LabelHierarchy | Mapping[str, LabelHierarchy] | None = None,
    ) -> MultiGranularTextBuilder:
        """A builder for MIDRC records ``{"modality", "study_description_0", "series_description"}``.

        Granularities: ``"modality"`` (prompt ``"This is a {} image."``), ``"study_description"``
        (field ``study_description_0``, verbatim) and ``"series_description"`` (verbatim).
        """
        table = {
            "modality": ("modality", "This is a {} image."),
            "study_description": ("study_description_0", "{}"),
            "series_description": ("series_description", "{}"),
        }
        return cls(_preset("levels", levels, table, None), hierarchy)


def _preset(arg, levels, table, separator) -> list[Granularity]:
    if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise TypeError(f"`{arg}` must be a non-empty sequence of names from {tuple(table)}")
    unknown = [x for x in levels if x not in table]
    if unknown:
        raise ValueError(f"`{arg}` must name granularities from {tuple(table)}, got {unknown}")
    return [Granularity(x, table[x][1], key=table[x][0], separator=separator) for x in levels]


def _paired_labels(name: str, multi_hot: Tensor, label_format: str) -> Tensor:
    counts = multi_hot.sum(1)
    single = bool((counts == 1).all())
    if label_format == "ids" and not single:
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(
            f"`label_format='ids'` needs exactly one label per sample at granularity {name!r}, "
            f"but sample {bad} has {int(counts[bad])}; use 'multi_hot' or 'auto'"
        )
    if label_format == "multi_hot" or not single:
        return multi_hot
    return multi_hot.to(torch.long).argmax(1)


def _check_str(attr: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"`{attr}` must be a string, got {type(value).__name__}")


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"`template` is not a valid format string ({err}): {template!r}") from None
    if fields not in ([""], ["0"]):
        raise ValueError(
            f"`template` must hold exactly one '{{}}' field for the labels, got {template!r}"
        )


def _check_descriptions(descriptions: object) -> dict:
    if descriptions is None:
        return {}
    if not isinstance(descriptions, Mapping):
        raise TypeError(
            f"`descriptions` must be a mapping {{label: text or [texts]}}, got "
            f"{type(descriptions).__name__}"
        )
    out = {}
    for label, texts in descriptions.items():
        texts = (texts,) if isinstance(texts, str) else texts
        if (
            not isinstance(texts, Sequence)
            or len(texts) == 0
            or not all(isinstance(t, str) for t in texts)
        ):
            raise TypeError(
                f"`descriptions[{label!r}]` must be a string or a non-empty list of strings, "
                f"got {texts!r}"
            )
        out[label] = tuple(texts)
    return out


def _check_classes(classes: object) -> tuple:
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise TypeError(f"`classes` must be a sequence of labels, got {type(classes).__name__}")
    out = tuple(classes)
    dup = sorted({repr(c) for c in out if out.count(c) > 1})
    if dup:
        raise ValueError(f"`classes` must be distinct, got repeated {', '.join(dup)}")
    return out


def _check_hierarchy(hierarchy: object, names: list[str]) -> dict:
    if hierarchy is None:
        return {}
    if isinstance(hierarchy, LabelHierarchy):
        return {n: (False, hierarchy) for n in names}
    if not isinstance(hierarchy, Mapping):
        raise TypeError(
            "`hierarchy` must be a LabelHierarchy or a mapping {granularity name: "
            f"LabelHierarchy}}, got {type(hierarchy).__name__}"
        )
    unknown = [n for n in hierarchy if n not in names]
    if unknown:
        raise ValueError(f"`hierarchy` names unknown granularities {unknown}; known: {names}")
    for n, h in hierarchy.items():
        if not isinstance(h, LabelHierarchy):
            raise TypeError(f"`hierarchy[{n!r}]` must be a LabelHierarchy, got {type(h).__name__}")
    return {n: (True, h) for n, h in hierarchy.items()}
