"""Reading label tables with the stdlib ``csv`` module: header checks and located errors."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import TextIO, Union

from mgll.datasets.compact import CompactAnnotations

Source = Union[str, "os.PathLike[str]", TextIO]

# Report fields can be long (the csv module's default limit is 128 KiB); the largest limit
# a C long holds on every platform.
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class Annotations(itertools.chain, Iterator[dict]):
    """A reader's lazy iterator of annotation dicts, with ``counts`` of what it read.

    ``counts`` grows as the iterator is consumed (complete once exhausted): ``rows`` (data
    rows read), ``kept`` (annotations yielded), ``skipped_view`` (rows outside ``views=``),
    ``contradictions`` (rows whose labels contradict themselves, e.g. "No Finding" together
    with a finding; they are kept as read) and, for joins, ``unmatched_images`` and
    ``unmatched_studies``.
    """

    # An itertools.chain over the one generator: next() is then a C call, not a Python one.
    def __new__(cls, make: Callable[[dict], Iterator[dict]]) -> Annotations:
        counts = {"rows": 0, "kept": 0, "skipped_view": 0, "contradictions": 0}
        return cls._over(make(counts), counts)

    def __init__(self, make: Callable[[dict], Iterator[dict]]) -> None:
        pass  # made by __new__

    @classmethod
    def _over(cls, it: Iterator[dict], counts: dict) -> Annotations:
        out = super().__new__(cls, it)
        out.counts = counts
        return out

    def map(self, fn: Callable[[dict], dict]) -> Annotations:
        """The same rows passed through ``fn``, sharing ``counts``."""
        return Annotations._over(map(fn, self), self.counts)

    def compact(self) -> CompactAnnotations:
        """Read the remaining rows into a :class:`~mgll.datasets.CompactAnnotations`.

        The map-style form of a reader's output: a sequence equal to ``list(...)`` of it, in a
        few flat buffers (tens of bytes an image instead of 1–2 KB), whose items forked
        ``DataLoader`` workers read without copying the parent's memory page by page.  Its
        ``counts`` are the reader's, complete.
        """
        out = CompactAnnotations(self)
        out.counts = self.counts
        return out


class ImagePaths:
    """Joins a label file's image paths to ``root`` and keeps them inside it.

    The check is lexical (``..`` and absolute paths; no file is opened, so a symbolic link
    inside ``root`` is the user's own choice).  ``strip`` names a leading directory that the
    paths carry and ``root`` may already end with (CheXpert's ``CheXpert-v1.0-small``).
    """

    def __init__(
        self, root: object, allow_outside: bool = False, strip: Sequence[str] = ()
    ) -> None:
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"`root` must be a directory path or None, got {type(root).__name__}")
        if not isinstance(allow_outside, bool):
            raise TypeError(
                f"`allow_outside_root` must be a bool, got {type(allow_outside).__name__}"
            )
        self.root = None if root is None else os.fspath(root)
        self.allow_outside = allow_outside
        base = "" if self.root is None else os.path.basename(os.path.normpath(self.root))
        self._strip = base if base in strip else None

    def join(self, path: str, table: Table, line: int, column: str) -> str:
        if self.root is None:
            return path
        if self._strip is not None:
            head, sep, rest = path.replace("\\", "/").partition("/")
            if head == self._strip and sep:
                path = rest  # root already ends with the paths' first directory
        fast = ".." not in path and path[:1] not in _SEPARATORS and ":" not in path
        if fast and path.strip("./\\"):  # relative, with a name in it: stays inside root
            return os.path.join(self.root, path)
        if os.path.isabs(path) or os.path.splitdrive(path)[0]:
            if self.allow_outside:
                return path
            raise table.error(
                line, column, f"the image path {path!r} is absolute, so it would ignore `root` "
                f"{self.root!r}; pass allow_outside_root=True if that is intended",
            )  # fmt: skip
        joined = os.path.join(self.root, path)
        inside = os.path.relpath(os.path.normpath(joined), os.path.normpath(self.root))
        if not self.allow_outside and (inside == "." or inside.split(os.sep)[0] == os.pardir):
            raise table.error(
                line, column, f"the image path {path!r} leads outside `root` {self.root!r}; "
                "pass allow_outside_root=True if that is intended",
            )  # fmt: skip
        return joined


_SEPARATORS = ("/", "\\")


def source_name(source: Source) -> str:
    """The file name used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


class Table:
    """A CSV label table whose header has been checked; iterating parses rows on demand.

    A path is opened afresh (``utf-8-sig``, so a byte-order mark is dropped; ``newline=""``,
    so Windows line ends and quoted line breaks are handled by :mod:`csv`) for the header
    check and again for each pass over the rows; a text stream is read once, from where the
    header ends.  Columns with an empty name (ChestX-ray14's trailing comma) are ignored.
    """

    def __init__(self, source: Source, required: Sequence[str], what: str) -> None:
        if not isinstance(source, (str, os.PathLike, io.IOBase)) and not hasattr(source, "read"):
            raise TypeError(
                f"`path` must be a file path or a text stream, got {type(source).__name__}"
            )
        self.source = source
        self.name = source_name(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                try:
                    self.header = self._header(reader)
                except UnicodeDecodeError as err:
                    raise self._not_utf8(err, reader) from None
            self._stream = None
        else:
            self._stream = csv.reader(source)
            self.header = self._header(self._stream)
        missing = [c for c in required if c not in self.header]
        if missing:
            raise ValueError(
                f"{self.name}: the header lacks the column(s) {missing} of a {what} file; "
                f"columns present: {[c for c in self.header if c]}. Is this the right file?"
            )

    def _header(self, reader) -> list[str]:
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{self.name}: the file is empty (no header line)") from None
        header = [h.lstrip("\ufeff").strip() for h in header]
        named = [h for h in header if h]
        dup = sorted({h for h in named if named.count(h) > 1})
        if dup:
            raise ValueError(f"{self.name}: line 1 (the header) repeats the column(s) {dup}")
        self._named_width = max((j + 1 for j, h in enumerate(header) if h), default=0)
        self.index = {h: j for j, h in enumerate(header) if h}
        return header

    def rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        """``(line, {column: stripped value})`` for each non-blank data row."""
        named = [(h, j) for j, h in enumerate(self.header) if h]
        keys, where = [h for h, _ in named], [j for _, j in named]
        prefix = where == list(range(len(where)))  # unnamed columns only at the end
        width, filled = len(self.header), self.filled
        unnamed = [j for j, h in enumerate(self.header) if not h]
        strip = str.strip
        with self.reading() as reader:
            for cells in reader:
                cells = [*map(strip, cells)]
                if not any(cells):
                    continue  # a blank line (e.g. at the end of the file)
                line, n = reader.line_num, len(cells)
                if n != width or (filled is not None and any(filled(cells))):
                    self._check_width(cells, line, width, unnamed)
                    if n < width:
                        cells += [""] * (width - n)
                if prefix:
                    yield line, dict(zip(keys, cells))  # noqa: B905 (shorter: keys)
                else:
                    yield line, {h: cells[j] for h, j in zip(keys, where, strict=True)}

    def _not_utf8(self, err: UnicodeDecodeError, reader) -> ValueError:
        line = _bad_utf8_line(self.source)
        where = f"line {line}" if line is not None else f"after line {reader.line_num}"
        return ValueError(
            f"{self.name}: {where} is not UTF-8 text ({err.reason}, byte "
            f"{err.object[err.start : err.start + 1]!r}); re-save the file as UTF-8"
        )

    @contextlib.contextmanager
    def reading(self) -> Iterator[Iterator[list[str]]]:
        """The ``csv`` reader of the data rows (raw fields: see :attr:`filled`); decoding
        and csv errors raised while it is read become errors naming the line."""
        if csv.field_size_limit() < _FIELD_LIMIT:
            csv.field_size_limit(_FIELD_LIMIT)
        if self._stream is not None:
            reader, self._stream = self._stream, None
            with self._errors(reader):
                yield reader
            return
        if not isinstance(self.source, (str, os.PathLike)):
            raise ValueError(f"{self.name}: a text stream can be read only once; pass a path")
        with open(self.source, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            next(reader)
            with self._errors(reader):
                yield reader

    @contextlib.contextmanager
    def _errors(self, reader) -> Iterator[None]:
        try:
            yield
        except UnicodeDecodeError as err:
            raise self._not_utf8(err, reader) from None
        except csv.Error as err:
            raise ValueError(f"{self.name}: line {reader.line_num + 1}: {err}") from None

    @property
    def filled(self) -> Callable[[list[str]], object] | None:
        """``None`` without unnamed columns, else ``cells ->`` their cells (a str for one
        column, a tuple for several: ``any()`` of it says whether one holds something).
        A row of raw fields is regular when it has the header's width and nothing there;
        the others go through :meth:`irregular`."""
        unnamed = [j for j, h in enumerate(self.header) if not h]
        return itemgetter(*unnamed) if unnamed else None

    def irregular(self, cells: list[str], line: int) -> list[str] | None:
        """A raw row that is not regular (see :attr:`filled`): ``None`` for a blank one, else the
        row padded to the header's width, after the checks of its width (errors)."""
        stripped = [c.strip() for c in cells]
        if not any(stripped):
            return None
        width = len(self.header)
        unnamed = [j for j, h in enumerate(self.header) if not h]
        self._check_width(stripped, line, width, unnamed)
        return cells + [""] * (width - len(cells)) if len(cells) < width else cells

    def _check_width(self, cells: list[str], line: int, width: int, unnamed: list[int]) -> None:
        """Errors for a row with too many, too few or shifted fields."""
        extra = [c for c in cells[width:] if c]
        if extra:
            raise ValueError(
                f"{self.name}: line {line} has {len(cells)} fields but the header has "
                f"{width}; extra value(s) {extra}. Quote fields that contain a comma"
            )
        if len(cells) < self._named_width:
            raise ValueError(
                f"{self.name}: line {line} has {len(cells)} fields but the header has "
                f"{self._named_width}; is the row truncated?"
            )
        filled = [j for j in unnamed if j < len(cells) and cells[j]]
        if filled:
            raise ValueError(
                f"{self.name}: line {line} has the value {cells[filled[0]]!r} in the "
                f"unnamed column {filled[0] + 1}, so its fields are shifted; quote fields "
                "that contain a comma (e.g. a label list)"
            )

    def error(self, line: int, column: str, message: str) -> ValueError:
        """A ValueError naming the file, line and column."""
        return ValueError(f"{self.name}: line {line}, column {column!r}: {message}")


def _bad_utf8_line(source: object) -> int | None:
    """The first line of a file that is not UTF-8 (only on the error path: reads it again)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    with open(source, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None
