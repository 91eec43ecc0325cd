r"""Run open_clip's own trainer (``open_clip_train.main``) with MGLL as the loss.

.. code-block:: console

   $ python -m mgll.integrations.open_clip_train <open_clip_train arguments> <--mgll-... arguments>

Every argument not starting with ``--mgll-`` goes to ``open_clip_train``'s parser unchanged;
its ``main`` runs as it is (``train_one_epoch``, ``evaluate``, logging, checkpoints,
``--precision``, ``--accum-freq``, ``--local-loss --gather-with-grad``, ``--torchcompile``,
torchrun).  No file of open_clip is edited: while ``main`` runs, these names are replaced
(and restored afterwards), and nothing else:

* ``open_clip_train.main.create_model_and_transforms``: the model is wrapped in
  :class:`~mgll.integrations.open_clip.FlatMultiGranularCLIP`, because open_clip's model takes
  one ``(N, L)`` token tensor while MGLL needs G granularities and the labels.
* ``open_clip_train.main.create_loss``: returns :class:`~mgll.integrations.open_clip.FlatMGLLLoss`
  with the ``--mgll-*`` options and ``--local-loss`` / ``--gather-with-grad``, because
  open_clip's factory knows only its own losses.
* ``open_clip_train.data.get_dataset_fn``: ``--train-data`` / ``--val-data`` CSV/TSV files
  become :class:`~mgll.integrations.image_table.ImageTableDataset` collated by
  :class:`mgll.datasets.MultiGranularCollate`, because open_clip's loader yields
  ``(image, caption)`` and no labels.  Webdataset shards go through open_clip's own
  ``get_wds_dataset``, whose last six pipeline stages (caption filter, decode, rename,
  tokenise, to-tuple, batch) are replaced by stages reading each sample's ``.json`` annotation.
* ``open_clip_train.train.zero_shot_eval``: adds the multi-label zero-shot AUROC of
  :class:`mgll.ZeroShotClassifier` on the validation set (every ``--zeroshot-frequency``
  epochs), because open_clip's zero-shot evaluation knows only ImageNet.
* ``torch.nn.parallel.DistributedDataParallel`` (for CPU processes only): drops
  ``device_ids=[cpu]``, which open_clip passes and torch rejects, so torchrun with the gloo
  backend runs on CPUs.

Only the open_clip versions in :data:`TESTED_OPEN_CLIP` are accepted (the ``examples`` extra
pins them); ``--mgll-allow-untested-open-clip`` runs on another version at your own risk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mgll.text import Granularity, MultiGranularTextBuilder

__all__ = ["TESTED_OPEN_CLIP", "main", "parse_mgll_args"]

#: The open_clip_torch versions this module's hooks were tested with (the extra pins them).
TESTED_OPEN_CLIP = ("3.3.0",)
_FLAGS = {"allow-untested-open-clip"}


def parse_mgll_args(argv: Sequence[str]) -> tuple[list[str], dict]:
    """Split ``argv`` into open_clip's arguments and the mgll settings.

    ``--mgll-config FILE`` (JSON, or YAML with PyYAML) gives ``{"granularities": [Granularity
    keyword arguments, ...], "loss": {MGLLLoss keyword arguments}, "model_configs": [...]}``;
    ``--mgll-granularity NAME[=TEMPLATE]`` (repeatable) adds a granularity read from column
    NAME, split on ``--mgll-separator`` (default ``|``); ``--mgll-model-config FILE.json``
    registers an open_clip model config (its name is the file's stem).  Every other
    ``--mgll-some-option VALUE`` is the ``MGLLLoss`` keyword ``some_option`` (VALUE read as JSON
    when it parses, else as a string), so new loss options need no change here.

    Example:
        >>> rest, cfg = parse_mgll_args(["--model", "RN50", "--mgll-smooth-kl-weight", "0.5",
        ...                              "--mgll-granularity", "digits=the digits {}"])
        >>> rest, cfg["loss"], [g.name for g in cfg["granularities"]]
        (['--model', 'RN50'], {'smooth_kl_weight': 0.5}, ['digits'])
    """
    rest, own, loss = [], {"model_configs": []}, {}
    grans, separator, i = [], "|", 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--mgll_"):
            fixed = "--mgll-" + arg[len("--mgll_") :].split("=")[0].replace("_", "-")
            raise SystemExit(
                f"mgll: unknown argument `{arg.split('=')[0]}`: mgll's options are spelled with "
                f"dashes, e.g. `{fixed}`"
            )
        if not arg.startswith("--mgll-"):
            rest.append(arg)
            i += 1
            continue
        name, _, value = arg[len("--mgll-") :].partition("=")
        if name in _FLAGS:
            own[name] = True
            i += 1
            continue
        if not value:
            if i + 1 >= len(argv):
                raise SystemExit(f"mgll: `{arg}` needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "config":
            file_cfg = _read_config(value)
            loss.update(file_cfg.get("loss", {}))
            grans += [Granularity(**g) for g in file_cfg.get("granularities", [])]
            own["model_configs"] += list(file_cfg.get("model_configs", []))
        elif name == "granularity":
            column, _, template = value.partition("=")
            grans.append((column, template or "{}"))
        elif name == "separator":
            separator = value
        elif name == "model-config":
            own["model_configs"].append(value)
        else:
            loss[name.replace("-", "_")] = _literal(value)
    grans = [
        g if isinstance(g, Granularity) else Granularity(g[0], g[1], separator=separator)
        for g in grans
    ]
    return rest, {**own, "loss": loss, "granularities": grans}


def _literal(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _read_config(path: str) -> dict:
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _check_open_clip(allow_untested: bool = False) -> str:
    """The installed open_clip_torch version; an error if it was never tested with this module."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("open_clip_torch")
        import open_clip_train.main  # noqa: F401  (needs open_clip_torch[training])
    except (PackageNotFoundError, ImportError) as err:
        raise SystemExit(
            f"mgll: open_clip's trainer is not importable ({err}); install it with "
            'the [examples] extra: pip install -e ".[examples]" in a clone of mgll '
            f"(open_clip_torch {TESTED_OPEN_CLIP[-1]})"
        ) from None
    if found not in TESTED_OPEN_CLIP and not allow_untested:
        raise SystemExit(
            f"mgll: open_clip_torch {found} is installed, but this launcher hooks open_clip's "
            f"internals and was tested with {', '.join(TESTED_OPEN_CLIP)} only. Install "
            f"open_clip_torch=={TESTED_OPEN_CLIP[-1]}, or pass --mgll-allow-untested-open-clip"
        )
    return found


def _classes_from_files(grans: Sequence[Granularity], files: Sequence, **table) -> list:
    """Each granularity with ``classes`` declared; undeclared ones get every label in ``files``.

    Every rank reads the same files, so derived class lists (hence label ids) agree on every
    rank and every batch; declaring ``classes`` in the config is still the safer path.  A
    derived list that looks wrong (see :func:`_suspicious`) is a loud warning.
    """
    from mgll.integrations.image_table import ImageTableDataset

    tables = [ImageTableDataset(f, **table) for f in files if f]
    out = []
    for g in grans:
        if g.classes is None:
            labels = {x for t in tables for a in t.annotations for x in g.labels_of(a)}
            g = dataclasses.replace(g, classes=g.canonical(labels))
            for problem in _suspicious(g):
                logging.warning(
                    f"mgll: WARNING: granularity {g.name!r} declares no `classes` and its "
                    f"{len(g.classes)} classes read from the data files look wrong: {problem}. "
                    "Each distinct string is its own class (exact-set matching instead of "
                    "overlaps); declare `classes` in --mgll-config to make this an error"
                )
        out.append(g)
    return out


_SEPARATORS = "|;,/+&"


def _suspicious(gran: Granularity) -> list[str]:
    """Why a class list read from data files may be wrong: a likely separator inside a class
    name (``circle;cross`` read with ``|``), or names that differ only in case."""
    names = [c for c in gran.classes if isinstance(c, str)]
    out = []
    for sep in _SEPARATORS.replace(gran.separator or "", ""):
        joined = [c for c in names if sep in c]
        if joined:
            out.append(
                f"{len(joined)} class name(s) contain {sep!r}, e.g. {joined[0]!r}, but the "
                f"separator is {gran.separator!r} (--mgll-separator, or `separator` in the config)"
            )
    by_case: dict[str, list[str]] = {}
    for c in names:
        by_case.setdefault(c.casefold(), []).append(c)
    clashes = [group for group in by_case.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" / ".join(map(repr, group)) for group in clashes[:3])
        out.append(f"{len(clashes)} class name(s) differ only in case: {shown}")
    return out


def _announce(grans: Sequence[Granularity], declared: set[str]) -> None:
    """The class count and a few examples of each granularity, printed (not only logged)."""
    for g in grans:
        shown = ", ".join(map(repr, g.classes[:5])) + (", ..." if len(g.classes) > 5 else "")
        how = "declared" if g.name in declared else "read from the data files"
        count = f"{len(g.classes)} class" + ("es" if len(g.classes) != 1 else "")
        message = f"mgll: granularity {g.name!r}: {count} ({how}): {shown}"
        print(message, flush=True)
        logging.info(message)


@contextlib.contextmanager
def _patched(target: object, name: str, value: object) -> Iterator[None]:
    if not hasattr(target, name):
        raise SystemExit(f"mgll: {target.__name__}.{name} is gone: untested open_clip version")
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


class _Hooks:
    """The replacements of open_clip's functions; each one's reason is in the module docstring."""

    def __init__(self, cfg: dict) -> None:
        import open_clip
        import open_clip_train.data as oc_data
        import open_clip_train.main as oc_main
        import open_clip_train.train as oc_train

        self.cfg, self.builder, self.open_clip, self.oc_data = cfg, None, open_clip, oc_data
        self.original = {
            "create_model_and_transforms": oc_main.create_model_and_transforms,
            "zero_shot_eval": oc_train.zero_shot_eval,
        }
        ddp = torch.nn.parallel.DistributedDataParallel
        self.targets = [
            (oc_main, "create_model_and_transforms", self.create_model_and_transforms),
            (oc_main, "create_loss", self.create_loss),
            (oc_data, "get_dataset_fn", self.get_dataset_fn),
            (oc_train, "zero_shot_eval", self.zero_shot_eval),
            (torch.nn.parallel, "DistributedDataParallel", _cpu_friendly(ddp)),
        ]

    def installed(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for target, name, value in self.targets:
            stack.enter_context(_patched(target, name, value))
        return stack

    def create_model_and_transforms(self, model_name, *args, **kwargs):
        from mgll.integrations.open_clip import FlatMultiGranularCLIP

        create = self.original["create_model_and_transforms"]
        model, train_tf, val_tf = create(model_name, *args, **kwargs)
        tokenizer = self.open_clip.get_tokenizer(
            model_name,
            cache_dir=kwargs.get("cache_dir"),
            context_length=kwargs.get("force_context_length"),
        )
        return FlatMultiGranularCLIP(model, tokenizer), train_tf, val_tf

    def create_loss(self, args):
        from mgll.integrations.open_clip import FlatMGLLLoss

        options = {**self.cfg["loss"]}
        for key in ("local_loss", "gather_with_grad"):
            if key in options:
                raise SystemExit(f"mgll: use open_clip's --{key.replace('_', '-')} flag")
            options[key] = bool(getattr(args, key))
        if args.distributed and self.builder is not None:
            self._check_ranks_agree(args)
        try:
            return FlatMGLLLoss(**options)
        except TypeError as err:
            raise SystemExit(
                f"mgll: {err}; each --mgll-NAME VALUE is an MGLLLoss keyword argument, see "
                "help(mgll.MGLLLoss)"
            ) from None

    def _check_ranks_agree(self, args) -> None:
        from torch import distributed as dist

        mine = [(g.name, tuple(map(str, g.classes))) for g in self.builder.granularities]
        every = [None] * args.world_size
        dist.all_gather_object(every, mine)
        if any(other != mine for other in every):
            declared = all(g.classes is not None for g in self.cfg["granularities"])
            fix = (
                "every rank must read the same --mgll-config (its `classes`) and data files"
                if declared
                else "declare `classes` in --mgll-config (the ranks read different data files)"
            )
            raise SystemExit(
                "mgll: the ranks disagree on the class lists, so one label id would mean "
                f"different classes on different ranks: {_differences(every)}; {fix}"
            )

    def get_dataset_fn(self, data_path, dataset_type):
        ext = str(data_path).rsplit(".", 1)[-1]
        if dataset_type == "csv" or (dataset_type == "auto" and ext in ("csv", "tsv")):
            return self.csv_data
        if dataset_type == "webdataset" or (dataset_type == "auto" and ext == "tar"):
            return self.wds_data
        raise SystemExit(
            f"mgll: --dataset-type {dataset_type} ({data_path}) is not supported; MGLL reads "
            "labelled CSV/TSV files or webdataset shards with a .json per sample"
        )

    def _builder(self, args, scan: bool) -> MultiGranularTextBuilder:
        if self.builder is None:
            grans = self.cfg["granularities"]
            if scan:  # CSV files: classes not declared are read from the files
                table = {"image_key": args.csv_img_key, "sep": args.csv_separator}
                grans = _classes_from_files(grans, [args.train_data, args.val_data], **table)
            undeclared = [g.name for g in grans if g.classes is None]
            if undeclared:
                raise SystemExit(
                    f"mgll: granularities {undeclared} declare no `classes`; webdataset shards "
                    "are not scanned, so declare them in --mgll-config"
                )
            self.builder = MultiGranularTextBuilder(grans)
            if getattr(args, "rank", 0) == 0:
                declared = {g.name for g in self.cfg["granularities"] if g.classes is not None}
                _announce(grans, declared)
        return self.builder

    def csv_data(self, args, preprocess_fn, is_train, epoch=0, tokenizer=None):
        from torch.utils.data import DataLoader, DistributedSampler

        from mgll.datasets import MultiGranularCollate
        from mgll.integrations.image_table import ImageTableDataset

        builder = self._builder(args, scan=True)
        columns = sorted({g.source for g in builder.granularities})
        path = args.train_data if is_train else args.val_data
        dataset = ImageTableDataset(
            path, preprocess_fn, columns=columns, image_key=args.csv_img_key, sep=args.csv_separator
        )
        try:  # the whole table now: not when a bad row's batch is first drawn
            dataset.check(builder.granularities)
        except ValueError as err:
            raise SystemExit(f"mgll: {err}") from None
        sampler = DistributedSampler(dataset) if args.distributed and is_train else None
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=is_train and sampler is None,
            num_workers=args.workers,
            pin_memory=False,  # torch's pin_memory would turn the TextBatch into a list
            sampler=sampler,
            drop_last=is_train,
            collate_fn=MultiGranularCollate(builder, mode="paired"),
        )
        loader.num_samples, loader.num_batches = len(dataset), len(loader)
        return self.oc_data.DataInfo(loader, sampler)

    def wds_data(self, args, preprocess_fn, is_train, epoch=0, tokenizer=None):
        """open_clip's own webdataset pipeline (shards, shuffles, epochs, sizes), with its last
        six stages (caption filter, decode, rename, tokenise, to_tuple, batch) replaced by
        stages that read each sample's ``.json`` annotation and batch with the collate."""
        import webdataset as wds

        from mgll.datasets import MultiGranularCollate

        collate = MultiGranularCollate(self._builder(args, scan=False), mode="paired")
        info = self.oc_data.get_wds_dataset(
            args, preprocess_fn, is_train, epoch, tokenizer=tokenizer
        )
        loader = info.dataloader.pipeline[0]  # WebLoader -> its DataLoader -> the stages
        loader.collate_fn = _as_is  # torch's default_convert would turn the TextBatch into a list
        pipe = loader.dataset.pipeline
        tail = [getattr(getattr(stage, "f", None), "__name__", None) for stage in pipe[-6:]]
        if tail != ["_select", "_decode", "_rename", "_map_dict", "_to_tuple", "_batched"]:
            raise SystemExit(f"mgll: open_clip's webdataset pipeline changed ({tail}): untested")
        pipe[-6:] = [
            wds.select(lambda sample: "json" in sample),
            wds.decode("pilrgb", handler=self.oc_data.log_and_continue),
            wds.to_tuple("jpg;png;jpeg;webp", "json"),
            wds.map_tuple(preprocess_fn, _annotation),
            wds.batched(args.batch_size, partial=not is_train, collation_fn=collate),
        ]
        return info

    def zero_shot_eval(self, model, data, epoch, args, tokenizer=None):
        results = self.original["zero_shot_eval"](model, data, epoch, args, tokenizer=tokenizer)
        freq = args.zeroshot_frequency
        if "val" not in data or not freq or (epoch % freq and epoch != args.epochs):
            return results
        grans = self.builder.granularities
        return {**results, **_zero_shot_auroc(_unwrap(model), data["val"].dataloader, grans, args)}


def _as_is(batch):
    return batch


def _annotation(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"a sample's .json must hold an object of annotations, got {value!r}")
    return value


def _zero_shot_auroc(model, loader, grans, args) -> dict[str, float]:
    """Macro AUROC of :class:`mgll.ZeroShotClassifier` per granularity on the validation set."""
    from open_clip import get_input_dtype
    from open_clip_train.precision import get_autocast

    from mgll.evaluation import ZeroShotClassifier

    device = torch.device(args.device)
    autocast = get_autocast(args.precision, device_type=device.type)
    features, targets = [], []
    with torch.inference_mode(), autocast():
        for images, texts in loader:
            images = images.to(device=device, dtype=get_input_dtype(args.precision))
            features.append(model.encode_image(images, normalize=True).float().cpu())
            targets.append([part.multi_hot() for part in texts])
        features = torch.cat(features)
        bias = getattr(model, "logit_bias", None)
        out = {}
        for g, gran in enumerate(grans):
            clf = ZeroShotClassifier.from_prompts(
                lambda strings: model.encode_texts(strings).float().cpu(),
                gran.classes,
                granularities=[gran],
                logit_scale=model.logit_scale.exp().float().cpu(),
                logit_bias=None if bias is None else bias.float().cpu(),
            )
            truth = torch.cat([t[g] for t in targets])
            out[f"mgll_zeroshot_auroc_{gran.name}"] = clf.evaluate(features, truth)["macro"]
    logging.info(f"mgll: zero-shot multi-label AUROC on the validation set: {out}")
    return out


def _differences(every: Sequence[list]) -> str:
    """What each rank's class lists differ in from rank 0's, rank by rank."""
    base = dict(every[0])
    parts = []
    for rank, lists in enumerate(every[1:], start=1):
        mine = dict(lists)
        if list(mine) != list(base):
            parts.append(f"rank {rank} has granularities {list(mine)}, rank 0 {list(base)}")
            continue
        for name, classes in mine.items():
            if classes == base[name]:
                continue
            extra = [c for c in classes if c not in base[name]]
            missing = [c for c in base[name] if c not in classes]
            detail = f"only on rank {rank}: {extra}; only on rank 0: {missing}"
            if not extra and not missing:
                detail = f"the same {len(classes)} classes in another order"
            parts.append(f"rank {rank}, granularity {name!r}: {detail}")
    return "; ".join(parts)


def _unwrap(model):
    while True:
        if "_orig_mod" in getattr(model, "_modules", {}):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _cpu_friendly(ddp: type) -> type:
    class DistributedDataParallel(ddp):
        """torch's DDP, without open_clip's ``device_ids=[cpu]`` that torch rejects."""

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    return DistributedDataParallel


def main(argv: Sequence[str] | None = None) -> int | None:
    """Parse the arguments, install the hooks, run ``open_clip_train.main.main``, restore.

    Args:
        argv: open_clip_train's arguments and the ``--mgll-*`` ones (see
            :func:`parse_mgll_args`); default ``sys.argv[1:]``.

    Returns:
        What ``open_clip_train.main.main`` returns.

    Raises:
        SystemExit: a bad ``--mgll-*`` setting, no granularity, an untested open_clip version,
            or open_clip's own argument errors.

    Example:
        >>> try:
        ...     main(["--train-data", "train.csv", "--model", "RN50"])
        ... except SystemExit as err:
        ...     print(str(err)[:60])
        mgll: no granularity given; pass --mgll-granularity COLUMN[=
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, cfg = parse_mgll_args(argv)
    if not cfg["granularities"]:
        raise SystemExit(
            "mgll: no granularity given; pass --mgll-granularity COLUMN[=TEMPLATE] (repeatable) "
            "or a --mgll-config file with a 'granularities' list"
        )
    if "--distill-model" in rest or any(a.startswith("--distill-model=") for a in rest):
        raise SystemExit("mgll: --distill-model is not supported with MGLL")
    _check_open_clip(cfg.get("allow-untested-open-clip", False))
    import open_clip
    import open_clip_train.main as oc_main

    for file in cfg["model_configs"]:
        open_clip.add_model_config(file)
    with _Hooks(cfg).installed():
        return oc_main.main(rest)


if __name__ == "__main__":
    sys.exit(main())
