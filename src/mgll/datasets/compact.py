r"""A columnar store of annotation dicts: a few flat buffers instead of a dict per image.

A list of annotation dicts costs about 1–2 KB an image (a dict, its strings and lists), and
in a forked ``DataLoader`` worker reading an item changes the reference counts of its
objects, so the pages holding them are copied into the worker one by one: each worker grows
with the items it visits.  :class:`CompactAnnotations` keeps every field as a column:

* a column with few distinct values (labels, views, ages, the label lists a reader derives
  from the same cells) holds one code per row (``array`` of 1, 2 or 4 bytes) and the table of
  its distinct values, stored frozen (lists as tuples);
* a column of mostly distinct strings (image paths, ids) holds one UTF-8 buffer and the
  end offset of each row's string.

Indexing builds a fresh dict (fresh lists and dicts too, so changing one does not change the
store), equal to the annotation stored.  Forked workers then read flat buffers and a bounded
table of distinct values: their memory no longer grows with the items they visit.
"""

from __future__ import annotations

import gc
import pickle
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = ["CompactAnnotations"]


class _Tag:
    """A marker that stays the same object when pickled (for spawned DataLoader workers)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.name


_ABSENT = _Tag("_ABSENT")  # a key that a row does not have
_LIST, _DICT = _Tag("_LIST"), _Tag("_DICT")  # tags of frozen lists and dicts
_TEXT_AFTER = 1024  # distinct values before a column may become a text buffer


def _freeze(value: object) -> object:
    """A hashable stand-in for ``value`` (lists and dicts as tagged tuples)."""
    kind = type(value)
    if kind is str or value is None or kind is int or kind is float or kind is bool:
        return value
    if kind is list:
        return (_LIST, *map(_freeze, value))
    if kind is dict:
        return (_DICT, *((k, _freeze(v)) for k, v in value.items()))
    if kind is tuple:
        return tuple(map(_freeze, value))
    hash(value)  # anything else must be hashable (TypeError otherwise: kept as objects)
    return value


def _thaw(value: object) -> object:
    """The value :func:`_freeze` stood in for, with fresh lists and dicts."""
    if type(value) is not tuple or not value:
        return value
    head = value[0]
    if head is _LIST:
        return [_thaw(x) for x in value[1:]]
    if head is _DICT:
        return {k: _thaw(v) for k, v in value[1:]}
    return tuple(map(_thaw, value))


def _simple(value: object) -> bool:
    """Whether ``value`` can be returned as stored: no list or dict inside to copy."""
    if type(value) is not tuple:
        return True
    if value and (value[0] is _LIST or value[0] is _DICT):
        return False
    return all(map(_simple, value))


def _offsets() -> array:
    return array("I", [0])


def _append_offset(offsets: array, value: int) -> array:
    """``offsets`` with ``value`` appended (4-byte offsets until they overflow)."""
    try:
        offsets.append(value)
    except OverflowError:
        offsets = array("q", offsets)
        offsets.append(value)
    return offsets


class _Column:
    """One field of every row, in the cheapest form its values allow.

    ``codes`` (the start): a code per row into a table of distinct (frozen) values.  Once a
    column has more than ``_TEXT_AFTER`` distinct values and most rows bring a new one, it
    becomes, where every value allows: ``text`` (strings: one UTF-8 buffer and offsets),
    ``lists`` (lists of strings: a code per item into a vocabulary, and offsets) or
    ``record`` (dicts: a nested :class:`_Record`, one column per key); otherwise it stays
    ``codes``.  A value that fits none (unhashable) turns the column into plain ``objects``.
    """

    __slots__ = (
        "buffer", "codes", "index", "kind", "objects", "offsets", "plain", "record",
        "switch", "values", "vocab", "words",
    )  # fmt: skip

    def __init__(self, rows: int) -> None:
        self.kind, self.switch = "codes", True  # switch: may still change form
        self.buffer = self.offsets = self.objects = self.record = self.vocab = self.words = None
        self.values: list = [_ABSENT]
        self.index: dict | None = {_ABSENT: 0}
        self.codes = array("I", bytes(4 * rows))  # the rows before this column: absent
        self.plain: list[bool] = [True]  # per value: returned as stored (nothing to copy)

    def add(self, value: object) -> None:
        kind = self.kind
        if kind == "codes":
            try:
                key = _freeze(value)
                code = self.index.get(key)
            except TypeError:  # unhashable: keep the objects themselves
                self._to_objects()
                self.objects.append(value)
                return
            if code is None:
                code = self.index[key] = len(self.values)
                self.values.append(key)
                self.plain.append(_simple(key))
                self.codes.append(code)
                if self.switch and code > _TEXT_AFTER and code > len(self.codes) // 2:
                    self._reshape()
                return
            self.codes.append(code)
            return
        if kind == "text" and type(value) is str:
            self.buffer += value.encode("utf-8", "surrogatepass")
            self.offsets = _append_offset(self.offsets, len(self.buffer))
            return
        if kind == "lists" and type(value) is list and all(type(x) is str for x in value):
            self._add_list(value)
            return
        if kind == "record" and (value is _ABSENT or type(value) is dict):
            self.record.add(value)
            return
        if kind != "objects":
            self._to_objects()
        self.objects.append(value)

    def _add_list(self, value: list[str]) -> None:
        vocab, words = self.vocab, self.words
        for x in value:
            code = vocab.get(x)
            if code is None:
                code = vocab[x] = len(vocab)
                if code == 1 << 16 and words.typecode == "H":
                    words = self.words = array("I", words)
            words.append(code)
        self.offsets = _append_offset(self.offsets, len(words))

    def _reshape(self) -> None:
        """Mostly distinct values: a text buffer, item codes or a nested record if they allow."""
        self.switch = False  # tried once
        rows = [_thaw(self.values[c]) for c in self.codes]
        if all(type(v) is str for v in rows):
            self.kind, self.buffer, self.offsets = "text", bytearray(), _offsets()
        elif all(type(v) is list and all(type(x) is str for x in v) for v in rows):
            self.kind, self.vocab, self.words, self.offsets = "lists", {}, array("H"), _offsets()
        elif all(v is _ABSENT or type(v) is dict for v in rows):
            self.kind, self.record = "record", _Record()
        else:
            return
        self.values = self.index = self.codes = self.plain = None
        for v in rows:
            self.add(v)

    def _to_objects(self) -> None:
        objects = [self.get(i) for i in range(len(self))]
        self.kind, self.objects = "objects", objects
        self.values = self.index = self.codes = self.plain = self.buffer = self.offsets = None
        self.record = self.vocab = self.words = None

    def finish(self) -> None:
        """Drop what only building needs; the smallest code type."""
        if self.kind == "text":
            self.buffer = bytes(self.buffer)
        elif self.kind == "lists":
            self.vocab = list(self.vocab)
        elif self.kind == "record":
            self.record.finish()
        elif self.kind == "codes":
            self.index = None
            n = len(self.values)
            self.codes = array("B" if n <= 1 << 8 else "H" if n <= 1 << 16 else "I", self.codes)

    def __len__(self) -> int:
        if self.kind in ("text", "lists"):
            return len(self.offsets) - 1
        if self.kind == "record":
            return len(self.record)
        return len(self.objects) if self.kind == "objects" else len(self.codes)

    def get(self, i: int) -> object:
        kind = self.kind
        if kind == "codes":
            code = self.codes[i]
            value = self.values[code]
            return value if self.plain[code] else _thaw(value)
        if kind == "text":
            data = self.buffer[self.offsets[i] : self.offsets[i + 1]]
            return data.decode("utf-8", "surrogatepass")
        if kind == "lists":
            vocab = self.vocab
            return [vocab[c] for c in self.words[self.offsets[i] : self.offsets[i + 1]]]
        if kind == "record":
            return self.record.get(i)
        return self.objects[i]

    def nbytes(self) -> int:
        total = 0
        for part in (self.codes, self.buffer, self.offsets, self.words):
            if part is not None:
                total += len(part) * getattr(part, "itemsize", 1)
        return total + (self.record.nbytes() if self.record is not None else 0)


class _Record:
    """Rows of dicts: a column of key tuples (each row's keys, in order) and one column a key."""

    __slots__ = ("columns", "layouts", "rows")

    def __init__(self) -> None:
        self.layouts, self.columns, self.rows = _Column(0), {}, 0

    def add(self, value: Mapping | _Tag) -> None:
        columns = self.columns
        if value is _ABSENT:
            self.layouts.add(_ABSENT)
            for column in columns.values():
                column.add(_ABSENT)
        else:
            keys = tuple(value)
            self.layouts.add(keys)
            for key in keys:
                if key not in columns:
                    columns[key] = _Column(self.rows)
            get = value.get
            for key, column in columns.items():
                column.add(get(key, _ABSENT))
        self.rows += 1

    def finish(self) -> None:
        for column in (self.layouts, *self.columns.values()):
            column.finish()

    def __len__(self) -> int:
        return self.rows

    def get(self, i: int) -> dict | _Tag:
        keys = self.layouts.get(i)
        if keys is _ABSENT:
            return _ABSENT
        columns = self.columns
        return {key: columns[key].get(i) for key in keys}

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in (self.layouts, *self.columns.values()))


class CompactAnnotations(Sequence):
    r"""Annotation dicts held as columns: a sequence that costs bytes, not objects, per image.

    Built from any iterable of annotation dicts (a reader's output:
    :meth:`Annotations.compact() <mgll.datasets.generic.read_label_table>`), it behaves as
    the list of them: ``len``, indexing (a fresh dict equal to the one stored, keys in their
    order), slicing (a list), iteration, ``==`` against a sequence of dicts.  Nothing is
    shared between the dicts it returns, so a caller may change them.  ``counts`` holds the
    reader's counts when it came from a reader.  See :doc:`/guide_data` for when to use it.

    Args:
        annotations: the annotation dicts (mappings with string keys).

    Raises:
        TypeError: an item that is not a mapping.

    Example:
        >>> rows = [{"image": f"{i}.png", "finding": ["Edema"] if i % 2 else []} for i in range(4)]
        >>> store = CompactAnnotations(rows)
        >>> len(store), store[1], store == rows
        (4, {'image': '1.png', 'finding': ['Edema']}, True)
    """

    def __init__(self, annotations: Iterable[Mapping[str, object]]) -> None:
        record = _Record()
        for i, a in enumerate(annotations):
            if not isinstance(a, Mapping):
                raise TypeError(
                    f"`annotations` item {i} must be an annotation dict, got {type(a).__name__}"
                )
            record.add(a)
            del a  # the last annotation: created while reading, like the store's objects
        record.finish()
        # The store as new objects, allocated now that reading is over: objects created one by
        # one while a file streams through sit among the rows' short-lived objects, and each
        # keeps its block of the allocator's memory (a 1 MiB arena) from being returned when
        # the rows are freed, hundreds of MB for a few thousand small objects.  Written to one
        # buffer, dropped, and read back once a collection has freed the rows' cycles and free
        # lists (their arenas), its objects sit together.  A store holding a value that cannot
        # be pickled (a user's own object) is kept as it is.
        try:
            data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError):
            data = None
        if data is not None:
            del record
            gc.collect()
            record = pickle.loads(data)
            del data
        self._record, self._n = record, record.rows
        self.counts: dict[str, int] = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not isinstance(i, int) and hasattr(i, "__index__"):
            i = i.__index__()
        if not isinstance(i, int):
            raise TypeError(f"indices must be integers or slices, got {type(i).__name__}")
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} annotations")
        return self._record.get(i)

    def __iter__(self) -> Iterator[dict[str, object]]:
        for i in range(self._n):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactAnnotations) or (
            isinstance(other, Sequence) and not isinstance(other, (str, bytes))
        ):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence, as a list

    def __repr__(self) -> str:
        return f"CompactAnnotations(N={self._n}, keys={list(self._record.columns)})"

    def nbytes(self) -> int:
        """The bytes of the columns' buffers (codes, text, offsets), tables of values aside."""
        return self._record.nbytes()
