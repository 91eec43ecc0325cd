"""``Granularity``: how one annotation field becomes text (re-exported by :mod:`mgll.text`)."""

from __future__ import annotations

import math
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mgll.text.hierarchy import Label, label_key

#: The annotation key of the labels whose value is unknown (not annotated, or uncertain under
#: U-Ignore): ``{"unknown": {field: [labels]}}``, keyed by the field a granularity reads.
UNKNOWN_KEY = "unknown"


@dataclass(frozen=True)
class Granularity:
    r"""How one annotation field becomes text.

    A sample's labels at this granularity are read from ``annotation[key]`` (default: ``name``):
    a string or integer is one label, a list/tuple/set is a label set, a mapping
    ``{label: weight}`` is a label set with weights in [0, 1] (uncertain labels, see
    :meth:`weights_of`), an empty list means "annotated, no label here" (a negative of every
    class), and a missing key or ``None`` means **not annotated at this granularity** (every
    class unknown: a NaN row in float labels, id -1, the text ``unannotated_text``), unless
    ``required`` makes it an error.  Single classes are unknown when the annotation lists them
    under ``annotation["unknown"][field]`` (see :data:`UNKNOWN_KEY`; the readers do so for
    uncertain findings under U-Ignore) or maps them to ``nan``; a mapping's ``0.0`` is an
    explicit negative.  The sample's text is
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
            its column has no positive, so it is never an anchor).  The default ``""`` is
            sent to the text encoder as an empty string; give a sentence (``"no finding"``)
            or make sure your tokenizer handles empty strings.
        required: every annotation must have the field (a missing one is an error naming the
            sample; a field absent from the whole batch is reported as a misspelt ``key``).
            Default: a missing field means "not annotated here".
        unannotated_text: the paired-mode text of a sample not annotated here; the loss
            ignores that text row (its labels are unknown), so it only has to be a valid
            input of the text encoder.
        null_labels: labels that mean "nothing here" (``"No Finding"``, or a free-text
            granularity's "no finding" sentence): dropped, so such a sample is annotated
            with no positive (its text is ``missing_text``) instead of sharing a class with
            every other sample that says the same.
        coarse: the name of a coarser granularity of the same builder whose classes are also
            classes here (the roots of the hierarchy, say): where a sample's own value of such
            a class is unknown, the coarse annotation gives it (its labels positive, its other
            classes known negatives), and the builder's hierarchy then carries the negatives
            down to their descendants.

    Example:
        >>> g = Granularity("digits", "digits {}", last_joiner=" and ")
        >>> g.render(g.labels_of({"digits": [7, 3]}))
        'digits 3 and 7'
    """

    name: str
    template: str = "{}"
    descriptions: Mapping[Label, str | Sequence[str]] | None = field(default=None, hash=False)
    key: str | None = field(default=None, kw_only=True)
    classes: Sequence[Label] | None = field(default=None, kw_only=True)
    joiner: str = field(default=", ", kw_only=True)
    last_joiner: str | None = field(default=None, kw_only=True)
    separator: str | None = field(default=None, kw_only=True)
    missing_text: str = field(default="", kw_only=True)
    required: bool = field(default=False, kw_only=True)
    unannotated_text: str = field(default="", kw_only=True)
    coarse: str | None = field(default=None, kw_only=True)
    null_labels: tuple = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.required, bool):
            raise TypeError(f"`required` must be a bool, got {type(self.required).__name__}")
        for attr in ("name", "template", "joiner", "missing_text", "unannotated_text"):
            _check_str(attr, getattr(self, attr))
        for attr in ("key", "last_joiner", "separator", "coarse"):
            if getattr(self, attr) is not None:
                _check_str(attr, getattr(self, attr))
        _check_template(self.template)
        object.__setattr__(self, "descriptions", _check_descriptions(self.descriptions))
        if self.classes is not None:
            object.__setattr__(self, "classes", _check_classes(self.classes))
        if isinstance(self.null_labels, str) or not isinstance(self.null_labels, Sequence):
            raise TypeError(
                f"`null_labels` must be a sequence of labels, got {type(self.null_labels).__name__}"
            )
        object.__setattr__(self, "null_labels", tuple(self.null_labels))

    @property
    def source(self) -> str:
        """The annotation field this granularity reads."""
        return self.key if self.key is not None else self.name

    def labels_of(self, annotation: Mapping[str, object], where: str = "annotation") -> tuple:
        """The sample's labels here, de-duplicated, in canonical order (``()`` if none)."""
        return tuple(self.weights_of(annotation, where))

    def weights_of(
        self, annotation: Mapping[str, object], where: str = "annotation", keep_zeros: bool = False
    ) -> dict:
        """The sample's labels here with their weights, in canonical order (``{}`` if none).

        A plain label or label list gives weight 1.0 to each label; a mapping
        ``{label: weight}`` (weights in [0, 1], e.g. 0.5 for an uncertain finding under
        U-Soft) gives its own weights, and a label of weight 0 is dropped (absent) unless
        ``keep_zeros`` (a weight ``nan``, unknown, is dropped too unless ``keep_zeros``).

        Example:
            >>> g = Granularity("finding")
            >>> g.weights_of({"finding": {"Edema": 0.5, "Cardiomegaly": 1.0, "Fracture": 0.0}})
            {'Cardiomegaly': 1.0, 'Edema': 0.5}
            >>> g.weights_of({"finding": ["Edema"]})
            {'Edema': 1.0}
        """
        value = annotation.get(self.source)
        if value is None:
            return {}
        if isinstance(value, Mapping):
            weights = {x: _check_weight(where, self.source, x, w) for x, w in value.items()}
            items = [x for x, w in weights.items() if keep_zeros or w > 0]
        else:
            if isinstance(value, str) and self.separator is not None:
                value = [part.strip() for part in value.split(self.separator) if part.strip()]
            items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            weights = None
        if self.null_labels:
            items = [x for x in items if x not in self.null_labels]
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
        return {x: 1.0 if weights is None else weights[x] for x in self.canonical(items)}

    def values_of(self, annotation: Mapping[str, object], where: str = "annotation") -> dict | None:
        """The sample's known and unknown labels here, or ``None`` when it is not annotated.

        Positive labels map to their weight in (0, 1], explicit negatives (``0.0`` in a
        mapping) to 0.0, unknown labels (``nan`` in a mapping, or listed under
        ``annotation["unknown"][field]``) to ``nan``; every other class is a negative.

        Example:
            >>> g = Granularity("finding")
            >>> g.values_of({"finding": ["Edema"], "unknown": {"finding": ["Effusion"]}})
            {'Edema': 1.0, 'Effusion': nan}
            >>> g.values_of({"image": "a.png"}) is None  # no field: not annotated here
            True
        """
        value = annotation.get(self.source)
        if value is None:
            return None
        values = dict(self.weights_of(annotation, where, keep_zeros=True))
        unknown = annotation.get(UNKNOWN_KEY)
        unknown = unknown.get(self.source, ()) if isinstance(unknown, Mapping) else ()
        if unknown:
            listed = self.weights_of({self.source: list(unknown)}, f"{where}[{UNKNOWN_KEY!r}]")
            values.update(dict.fromkeys(listed, math.nan))
        return {x: values[x] for x in self.canonical(values)}

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


def _check_weight(where: str, source: str, label: object, weight: object) -> float:
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not (0 <= weight <= 1 or math.isnan(weight)):
        raise ValueError(
            f"`{where}[{source!r}]` maps label {label!r} to weight {weight!r}; a label weight "
            "must be a number in [0, 1] (1 positive, 0 negative, e.g. 0.5 uncertain) or nan "
            "(unknown)"
        )
    return float(weight)


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
