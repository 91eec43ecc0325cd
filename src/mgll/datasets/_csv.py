"""Reading label tables with the stdlib ``csv`` module: header checks and located errors."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from typing import TextIO, Union

Source = Union[str, "os.PathLike[str]", TextIO]


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
                self.header = self._header(csv.reader(f))
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
        return header

    def rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        """``(line, {column: stripped value})`` for each non-blank data row."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            yield from self._rows(stream)
            return
        if not isinstance(self.source, (str, os.PathLike)):
            raise ValueError(f"{self.name}: a text stream can be read only once; pass a path")
        with open(self.source, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            next(reader)
            yield from self._rows(reader)

    def _rows(self, reader) -> Iterator[tuple[int, dict[str, str]]]:
        width = len(self.header)
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # a blank line (e.g. at the end of the file)
            line = reader.line_num
            extra = [c for c in cells[width:] if c.strip()]
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
            cells = cells + [""] * (width - len(cells))
            yield line, {h: c.strip() for h, c in zip(self.header, cells, strict=False) if h}

    def error(self, line: int, column: str, message: str) -> ValueError:
        """A ValueError naming the file, line and column."""
        return ValueError(f"{self.name}: line {line}, column {column!r}: {message}")
