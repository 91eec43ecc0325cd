r"""A CSV/TSV of images and annotations as a ``Dataset`` of ``(image, annotation)`` items.

One row per image: a column with the image path and any number of annotation columns (a
label list such as ``3|5``, a sentence, ...).  Each item is ``(transform(image), annotation)``
with ``annotation`` the row's annotation cells (an empty cell is ``None``: no label there), the
input :class:`mgll.datasets.MultiGranularCollate` and :class:`mgll.MultiGranularTextBuilder`
expect; the builder's :class:`~mgll.Granularity` ``separator`` splits ``3|5`` into a label set.
Parsing uses the standard library ``csv`` module; images are opened with Pillow only when an
item is read.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

__all__ = ["ImageTableDataset"]


class ImageTableDataset(Dataset):
    """``(image, annotation)`` items from the rows of a CSV or TSV file.

    Args:
        path: the CSV (``,``) or TSV (tab) file, with a header row.
        transform: applied to each image (a PIL RGB image), e.g. open_clip's preprocess.
        image_key: the column holding each image's path.
        columns: the annotation columns to keep; default every column but ``image_key``.
        sep: the delimiter; default ``"\\t"`` for ``.tsv`` files, else ``","``.
        root: a folder that relative image paths are resolved against; default the current
            directory (as open_clip's ``CsvDataset``).

    Raises:
        ValueError: the file has no rows, or lacks ``image_key`` or one of ``columns``.

    Example:
        >>> import tempfile, PIL.Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> PIL.Image.new("RGB", (4, 4)).save(folder / "a.png")
        >>> _ = (folder / "data.csv").write_text("filepath,digits,parity\\na.png,3|5,odd\\n")
        >>> data = ImageTableDataset(folder / "data.csv", root=folder)
        >>> image, annotation = data[0]
        >>> image.size, annotation
        ((4, 4), {'digits': '3|5', 'parity': 'odd'})
    """

    def __init__(
        self,
        path: str | Path,
        transform: Callable | None = None,
        *,
        image_key: str = "filepath",
        columns: Sequence[str] | None = None,
        sep: str | None = None,
        root: str | Path | None = None,
    ) -> None:
        path = Path(path)
        if sep is None:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=sep)
            header = list(reader.fieldnames or [])
            rows, lines = [], []
            for row in reader:  # the line each row ends on, for messages naming the row
                rows.append(row)
                lines.append(reader.line_num)
        if not rows:
            raise ValueError(f"`path` {str(path)!r} has no data rows; expected a header and rows")
        if columns is None:
            columns = [c for c in header if c != image_key]
        missing = [c for c in [image_key, *columns] if c not in header]
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks the column(s) {missing} (delimiter {sep!r}); its header is "
                f"{header}. Pass the right `image_key`/`columns` (open_clip: --csv-img-key, "
                "--csv-separator)"
            )
        self.path, self.transform, self.root, self.lines = path, transform, root, lines
        self.images = [row[image_key] for row in rows]
        self.columns = tuple(columns)
        self.annotations = [
            {c: (row[c] if row[c] != "" else None) for c in columns} for row in rows
        ]

    def check(self, granularities: Sequence) -> None:
        """Check every row against the granularities' declared ``classes`` now, not when its
        batch is first drawn (after training has started, at a shuffled position).

        Args:
            granularities: :class:`~mgll.Granularity` objects; those without ``classes``
                accept any label.

        Raises:
            ValueError: naming the file, its line and column, and the unknown labels.
        """
        declared = [g for g in granularities if g.classes is not None and g.source in self.columns]
        bad = []
        for annotation, line in zip(self.annotations, self.lines, strict=True):
            for gran in declared:
                try:
                    gran.weights_of(annotation, "row")
                except (ValueError, TypeError) as err:
                    bad.append((line, gran, err))
        if bad:
            line, gran, err = bad[0]
            more = f" (and {len(bad) - 1} more bad cell(s))" if len(bad) > 1 else ""
            raise ValueError(
                f"{str(self.path)!r}, line {line}, column {gran.source!r}: {err}{more}; fix the "
                f"rows, or add the labels to `classes` of granularity {gran.name!r}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        file = Path(self.images[index])
        if self.root is not None and not file.is_absolute():
            file = Path(self.root) / file
        with Image.open(file) as im:
            image = im.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, dict(self.annotations[index])
