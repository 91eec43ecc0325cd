r"""Merged annotations into the files ``python -m mgll.integrations.open_clip_train`` reads.

* :func:`write_webdataset`: tar shards with an image and a ``.json`` annotation per sample
  (the label lists, ``{class: weight}`` for weights below 1, and ``"unknown"``, so every
  unknown class reaches the builder) plus ``sizes.json``;
* :func:`write_csv`: a CSV/TSV with ``filepath`` and one column per granularity, labels joined
  by ``|``; an empty cell means "not annotated at this granularity" and a lone ``|``
  "annotated, no label".  A cell cannot say that *one* class is unknown, nor hold a weight:
  such annotations need the shards (or an explicit ``unknown="negative"``);
* :func:`open_clip_config`: the ``--mgll-config`` with every granularity's union classes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["open_clip_config", "write_csv", "write_webdataset"]


def _check_grans(annotations: Sequence[Mapping], granularities: Sequence[str]) -> list[str]:
    if (
        isinstance(granularities, str)
        or not isinstance(granularities, Sequence)
        or not granularities
    ):
        raise TypeError(f"`granularities` must be a non-empty list of names, got {granularities!r}")
    if len(annotations) == 0:
        raise ValueError("`annotations` is empty (N=0); there is nothing to write")
    return list(granularities)


def _cell(i: int, a: Mapping, g: str, separator: str, unknown: str) -> str:
    value = a.get(g)
    if value is None:
        return ""
    if isinstance(value, Mapping):
        if any(0 < w < 1 for w in value.values()):
            raise ValueError(
                f"`annotations[{i}]` (image {a.get('image')!r}) has weights below 1 at {g!r}; a "
                "CSV cell cannot hold them: use write_webdataset"
            )
        value = [x for x, w in value.items() if w > 0]
    elif isinstance(value, str):
        return value
    held = (a.get("unknown") or {}).get(g) if isinstance(a.get("unknown"), Mapping) else None
    if held and unknown == "error":
        raise ValueError(
            f"`annotations[{i}]` (image {a.get('image')!r}, source {a.get('source')!r}) has "
            f"{len(held)} unknown class(es) at {g!r} (e.g. {held[0]!r}); a CSV cell can say "
            "only 'not annotated at all', so they would become negatives. Use write_webdataset "
            "(its .json keeps them unknown), or pass unknown='negative' to accept that"
        )
    return separator.join(map(str, value)) if value else separator


def write_csv(
    annotations: Sequence[Mapping[str, object]],
    path: str | os.PathLike[str],
    granularities: Sequence[str],
    *,
    image_key: str = "filepath",
    separator: str = "|",
    unknown: str = "error",
) -> Path:
    r"""Write a CSV (TSV for a ``.tsv`` path) of images and label cells for the launcher.

    Args:
        annotations: merged (or reader) annotations with ``"image"``.
        path: the file to write.
        granularities: the fields to write, one column each, in order.
        image_key: the image column (the launcher's ``--csv-img-key``).
        separator: joins a label set (the granularities' ``separator``).
        unknown: ``"error"`` (default) refuses annotations with unknown classes; ``"negative"``
            writes their known positives, so the unknown classes read as negatives.

    Returns:
        ``path``.

    Raises:
        ValueError: weights below 1, unknown classes (unless ``unknown="negative"``), an
            empty set, an unknown ``unknown`` value.

    Example:
        >>> import tempfile
        >>> rows = [{"image": "a.png", "finding": ["Edema", "Mass"], "category": None},
        ...         {"image": "b.png", "finding": [], "category": ["Lung Opacity"]}]
        >>> out = write_csv(rows, tempfile.mkdtemp() + "/train.csv", ["finding", "category"])
        >>> print(out.read_text(), end="")
        filepath,finding,category
        a.png,Edema|Mass,
        b.png,|,Lung Opacity
    """
    grans = _check_grans(annotations, granularities)
    if unknown not in ("error", "negative"):
        raise ValueError(f"`unknown` must be 'error' or 'negative', got {unknown!r}")
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow([image_key, *grans])
        for i, a in enumerate(annotations):
            writer.writerow([a["image"], *(_cell(i, a, g, separator, unknown) for g in grans)])
    return path


def _json(a: Mapping, grans: list[str]) -> bytes:
    out: dict[str, object] = {g: a.get(g) for g in grans}
    unknown = a.get("unknown")
    if isinstance(unknown, Mapping):
        out["unknown"] = {g: list(v) for g, v in unknown.items() if g in grans and v}
    for key in ("source", "patient_id"):
        if a.get(key) is not None:
            out[key] = a[key]
    return json.dumps(out, allow_nan=False).encode()


def write_webdataset(
    annotations: Sequence[Mapping[str, object]],
    folder: str | os.PathLike[str],
    granularities: Sequence[str],
    *,
    prefix: str = "train",
    shards: int = 1,
    root: str | os.PathLike[str] | None = None,
) -> str:
    r"""Write webdataset shards (an image and a ``.json`` per sample) and ``sizes.json``.

    Args:
        annotations: merged (or reader) annotations with ``"image"`` (a file path).
        folder: where the shards go (created).
        granularities: the annotation fields to keep in each ``.json``.
        prefix: the shards' name, ``{prefix}-{k}.tar``.
        shards: the number of shards (at least the number of processes that read them).
        root: a folder that relative image paths are resolved against.

    Returns:
        The ``--train-data`` / ``--val-data`` pattern, e.g. ``".../train-{0..1}.tar"``.

    Raises:
        ValueError: an image that is not a file, fewer annotations than shards.

    Example:
        >>> import tempfile, pathlib, tarfile
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (4, 4)).save(d / "a.png")
        >>> rows = [{"image": "a.png", "finding": ["Edema"], "unknown": {"finding": ["Mass"]}}]
        >>> pattern = write_webdataset(rows, d / "shards", ["finding"], root=d)
        >>> with tarfile.open(pattern) as tar:
        ...     tar.getnames()
        ['00000000.png', '00000000.json']
    """
    grans = _check_grans(annotations, granularities)
    if (
        isinstance(shards, bool)
        or not isinstance(shards, int)
        or not 1 <= shards <= len(annotations)
    ):
        raise ValueError(
            f"`shards` must be an int in [1, N={len(annotations)}] (at least one sample a "
            f"shard), got {shards!r}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for k in range(shards):
        name = f"{prefix}-{k}.tar"
        part = range(k, len(annotations), shards)
        with tarfile.open(folder / name, "w") as tar:
            for i in part:
                _add_sample(tar, i, annotations[i], grans, root)
        sizes[name] = len(part)
    file = folder / "sizes.json"
    old = json.loads(file.read_text()) if file.is_file() else {}
    file.write_text(json.dumps({**old, **sizes}))
    return str(folder / (f"{prefix}-{{0..{shards - 1}}}.tar" if shards > 1 else f"{prefix}-0.tar"))


def _add_sample(tar: tarfile.TarFile, i: int, a: Mapping, grans: list[str], root) -> None:
    image = Path(str(a.get("image")))
    if root is not None and not image.is_absolute():
        image = Path(root) / image
    if not image.is_file():
        raise ValueError(f"`annotations[{i}]`: the image {str(image)!r} is not a file")
    ext = image.suffix.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg", "webp"):
        raise ValueError(f"`annotations[{i}]`: {str(image)!r} is not a png/jpg/jpeg/webp image")
    for suffix, data in ((ext, image.read_bytes()), ("json", _json(a, grans))):
        info = tarfile.TarInfo(f"{i:08d}.{suffix}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def open_clip_config(
    classes: Mapping[str, Sequence[str]],
    granularities: Sequence[str] | None = None,
    *,
    template: str = "a chest X-ray showing {}",
    missing_text: str = "a chest X-ray with no finding",
    loss: Mapping[str, object] | None = None,
) -> dict:
    r"""The ``--mgll-config`` for merged files: each granularity with its declared classes.

    Args:
        classes: ``{granularity: classes}``, e.g. :attr:`MergedAnnotations.classes
            <mgll.datasets.MergedAnnotations>`.
        granularities: the ones to train on, in the loss's order; default all of ``classes``.
        template: every granularity's text template.
        missing_text: the text of an image without a positive there.
        loss: :class:`~mgll.MGLLLoss` keyword arguments.

    Example:
        >>> cfg = open_clip_config({"finding": ("Edema", "Mass")})
        >>> cfg["granularities"][0]["classes"], cfg["granularities"][0]["separator"]
        (['Edema', 'Mass'], '|')
    """
    grans = list(classes) if granularities is None else list(granularities)
    unknown = [g for g in grans if g not in classes]
    if unknown:
        raise ValueError(f"`granularities` names {unknown}, not in `classes` {list(classes)}")
    return {
        "granularities": [
            {
                "name": g,
                "template": template,
                "separator": "|",
                "last_joiner": " and ",
                "missing_text": missing_text,
                "classes": list(classes[g]),
            }
            for g in grans
        ],
        "loss": dict(loss or {}),
    }
