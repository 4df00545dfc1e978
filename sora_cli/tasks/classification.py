"""Sequence classification and regression (encoders such as BERT): one label per text or text pair.

Loss: cross-entropy (classification) or squared error (regression), summed over examples; the engine divides by the
step's example count. Metrics: accuracy, F1, Matthews (scikit-learn); Pearson, Spearman (scipy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sora_cli import collapse
from sora_cli.data import eval_order, load_raw, split_fractions, split_indices
from sora_cli.errors import InputError
from sora_cli.recipe import DataConfig
from sora_cli.tasks.task import EncodedSplits, EvalContext, Rows, Task


@dataclass(frozen=True)
class TaskPreset:
    name: str
    text_fields: tuple[str, ...]
    num_labels: int  # 1 = regression
    metric: str  # model-selection metric
    validation_split: str = "validation"
    hub_id: str = "nyu-mll/glue"

    @property
    def task_type(self) -> str:
        return "regression" if self.num_labels == 1 else "classification"


GLUE: dict[str, TaskPreset] = {
    "cola": TaskPreset("cola", ("sentence",), 2, "matthews"),
    "sst2": TaskPreset("sst2", ("sentence",), 2, "accuracy"),
    "mrpc": TaskPreset("mrpc", ("sentence1", "sentence2"), 2, "f1"),
    "qqp": TaskPreset("qqp", ("question1", "question2"), 2, "accuracy"),
    "stsb": TaskPreset("stsb", ("sentence1", "sentence2"), 1, "pearson"),
    "mnli": TaskPreset("mnli", ("premise", "hypothesis"), 3, "accuracy", validation_split="validation_matched"),
    "qnli": TaskPreset("qnli", ("question", "sentence"), 2, "accuracy"),
    "rte": TaskPreset("rte", ("sentence1", "sentence2"), 2, "accuracy"),
}

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def task_type_of(data: DataConfig) -> str:
    """data.task_type, else the GLUE preset's, else classification."""
    return data.task_type or (GLUE[data.task].task_type if data.task in GLUE else "classification")


def default_metric(task_type: str) -> str:
    return "pearson" if task_type == "regression" else "accuracy"


def selection_metric(metric_for_best: str | None, task: str | None, task_type: str) -> str:
    """train.metric_for_best, else the GLUE preset's, else the task type's default."""
    return metric_for_best or (GLUE[task].metric if task in GLUE else default_metric(task_type))


def compute_metrics(task_type: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Classification: predictions are logits (N, C); regression: values (N,) or (N, 1)."""
    if task_type == "regression":
        from scipy.stats import pearsonr, spearmanr

        pred = predictions.reshape(-1).astype(np.float64)
        gold = labels.reshape(-1).astype(np.float64)
        if len(pred) < 2 or np.std(pred) == 0 or np.std(gold) == 0:  # undefined correlation
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(pred, gold)[0]), "spearman": float(spearmanr(pred, gold)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = predictions.argmax(-1)
    binary = predictions.shape[-1] == 2
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "f1": float(f1_score(labels, pred, average="binary" if binary else "macro", zero_division=0)),
        "matthews": float(matthews_corrcoef(labels, pred)),
    }


# ---------------------------------------------------------------------------------------------
# Examples


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[Any]  # int class ids, or floats for regression
    places: list[str]  # where each example is in its file ("data.train_file: d.csv, line 42"), for errors

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: list[int]) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                     [self.places[i] for i in indices])


@dataclass
class Splits:
    train: Split
    dev: Split | None
    test: Split | None
    task_type: str  # classification | regression
    num_labels: int
    label_names: list[str] | None  # for string labels: id -> name


def load_splits(cfg: DataConfig) -> Splits:
    preset = GLUE.get(cfg.task) if cfg.task else None
    raw = load_raw(cfg, preset.hub_id if preset else None, cfg.task if preset else None,
                   preset.validation_split if preset else "validation")
    text_fields = cfg.text_fields or (preset.text_fields if preset else ("text",))
    task_type = task_type_of(cfg)

    where = cfg.train_file and "data.train_file" or "data.dataset"
    columns = list(raw.columns["train"])
    for key, fields in (("data.text_fields", text_fields), ("data.label_field", (cfg.label_field,))):
        missing = [f for f in fields if f not in columns]
        if missing:
            raise InputError(f"{key}: {', '.join(map(repr, missing))} not in the data ({where}); "
                             f"its columns are: {', '.join(columns)}")

    def examples(name: str) -> Split:
        columns = raw.columns[name]
        texts = list(zip(*(["" if t is None else str(t) for t in columns[f]] for f in text_fields)))
        return Split(texts, list(columns[cfg.label_field]), raw.places[name])

    train = examples("train")
    dev = examples("validation") if "validation" in raw.columns else None
    test = examples("test") if "test" in raw.columns else None
    if test is not None and task_type == "classification" and all(y == -1 for y in test.labels):
        test = None  # GLUE's hidden test labels
    if cfg.glue_split == "sora" and cfg.task is not None:
        if dev is None:
            raise InputError(f"data.glue_split: sora splits GLUE's validation data, but {where} has none; give "
                             "data.validation_file or use glue_split: glue")
        train, dev, test = sora_splits(cfg.task, train, dev, cfg.split_seed)
    elif dev is None:
        train_all = train
        parts = split_indices(len(train), split_fractions(cfg.split, test is not None), cfg.split_seed)
        train, dev = train.take(parts[0]), train.take(parts[1])
        test = test or (train_all.take(parts[2]) if len(parts) == 3 else None)

    label_names, num_labels = _labels(cfg, task_type, preset, train, dev, test)
    return Splits(_head(train, cfg.max_train_samples) or train, _head(dev, cfg.max_eval_samples),
                  _head(test, cfg.max_eval_samples), task_type, num_labels, label_names)


# The SoRA paper's GLUE splits (TsinghuaC3I/SoRA, src/processor.py; its seed is 42): GLUE's test labels are hidden,
# so its "test" numbers come from GLUE's validation data.
SORA_HALVED = ("cola", "mrpc", "rte", "stsb", "mnli")  # validation halved: dev, test (mnli: matched)
SORA_DEV_SIZE = 1000  # the other tasks: dev is 1,000 training examples, test is GLUE's validation


def sora_splits(task: str, train: Split, validation: Split, seed: int) -> tuple[Split, Split, Split]:
    """(train, dev, test) as the reference cuts them: one torch.randperm seeded by `seed`, the first part dev.
    Large tasks keep the rest of the training set in that permuted order, as the reference's select() does."""
    gen = torch.Generator().manual_seed(seed)
    if task in SORA_HALVED:
        order = torch.randperm(len(validation), generator=gen).tolist()
        half = len(validation) // 2
        return train, validation.take(order[:half]), validation.take(order[half:])
    order = torch.randperm(len(train), generator=gen).tolist()
    if len(order) <= SORA_DEV_SIZE:
        raise InputError(f"data.glue_split: sora takes {SORA_DEV_SIZE} of {task}'s training examples as dev, but "
                         f"there are only {len(order)}")
    return train.take(order[SORA_DEV_SIZE:]), train.take(order[:SORA_DEV_SIZE]), validation


def _labels(cfg: DataConfig, task_type: str, preset: TaskPreset | None, train: Split, dev: Split | None,
            test: Split | None) -> tuple[list[str] | None, int]:
    """Check the labels (string labels become ids, whole floats ints, in place); return (label names, number of
    labels). A bad label is named by its record's place in its file."""
    splits = [s for s in (train, dev, test) if s is not None]
    field = cfg.label_field
    if task_type == "regression":
        for split in splits:
            for y, place in zip(split.labels, split.places, strict=True):
                if not isinstance(y, (int, float, np.number)) or isinstance(y, bool):
                    raise InputError(f"{place}: {field} {y!r} is not a number (this is a regression task); fix "
                                     "the label, or set data.task_type: classification")
        return None, 1
    label_names = None
    if any(isinstance(y, str) for y in train.labels):
        label_names = sorted({str(y) for y in train.labels})
        index = {n: i for i, n in enumerate(label_names)}
        for split in splits:
            for y, place in zip(split.labels, split.places, strict=True):
                if str(y) not in index:
                    raise InputError(f"{place}: {field} {y!r} never occurs in the training data, whose labels are "
                                     f"{label_names}; fix the label")
            split.labels = [index[str(y)] for y in split.labels]
    for split in splits:
        split.labels = [_class_id(y, place, field) for y, place in zip(split.labels, split.places, strict=True)]
    num_labels = cfg.num_labels or (preset.num_labels if preset else max(train.labels) + 1)
    for split in splits:
        for y, place in zip(split.labels, split.places, strict=True):
            if not 0 <= y < num_labels:
                raise InputError(f"{place}: {field} {y} is outside 0..{num_labels - 1}; set data.num_labels or fix "
                                 "the label")
    return label_names, num_labels


def _class_id(y: Any, place: str, field: str) -> int:
    """A class id: an int, or a float with no fraction (a column that pandas read as floats)."""
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, (float, np.floating)) and float(y).is_integer():
        return int(y)
    raise InputError(f"{place}: {field} {y!r} is not an integer class id; fix the label, or set "
                     "data.task_type: regression")


def _head(split: Split | None, n: int | None) -> Split | None:
    if split is None or n is None:
        return split
    return Split(split.texts[:n], split.labels[:n], split.places[:n])


# ---------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor  # (N,) long, or (N,) float for regression

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


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


# ---------------------------------------------------------------------------------------------
# The task


class ClassificationTask(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    task_heads = ("classifier", "score")

    def __init__(self, data: DataConfig, task_type: str | None = None, num_labels: int | None = None,
                 label_names: list[str] | None = None):
        super().__init__(data)
        self.task_type = task_type or task_type_of(data)
        self.num_labels = num_labels
        self.label_names = label_names
        self.splits: Splits | None = None

    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def configure(self, config: Any) -> None:
        # This task's head, whatever the checkpoint saved: problem_type cleared first, since transformers
        # validates it against num_labels on every assignment.
        config.problem_type = None
        config.num_labels = self.num_labels
        config.problem_type = "regression" if self.task_type == "regression" else "single_label_classification"
        if self.label_names:
            config.id2label = dict(enumerate(self.label_names))
            config.label2id = {n: i for i, n in enumerate(self.label_names)}

    def load_data(self) -> None:
        self.splits = load_splits(self.data)
        self.task_type, self.num_labels = self.splits.task_type, self.splits.num_labels
        self.label_names = self.splits.label_names

    def _loaded(self) -> Splits:
        assert self.splits is not None, "load_data() first"
        return self.splits

    def train_size(self) -> int:
        return len(self._loaded().train)

    def fingerprint(self) -> str:
        train = self._loaded().train
        return hashlib.sha256(json.dumps([train.texts, train.labels]).encode()).hexdigest()

    def encode(self, tokenizer: Any, max_length: int) -> EncodedSplits:
        s = self._loaded()

        def enc(split: Split | None) -> Encoded | None:
            return encode(split, tokenizer, max_length, self.task_type) if split is not None else None

        return EncodedSplits(enc(s.train), enc(s.dev), enc(s.test))

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(data, indices, pad_id)

    def subset(self, data: Encoded, indices: list[int]) -> Encoded:
        types = [data.token_type_ids[i] for i in indices] if data.token_type_ids is not None else None
        return Encoded([data.input_ids[i] for i in indices], types, data.labels[indices])

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (B, C), or (B, 1) for regression
        if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32 at least (float64 stays)
            logits = logits.float()
        if self.task_type == "regression":
            return F.mse_loss(logits.reshape(-1), batch["labels"].to(logits.dtype).reshape(-1), reduction="sum")
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    @torch.inference_mode()
    def predict(self, model: nn.Module, data: Encoded, ctx: EvalContext) -> Rows:
        """logits (N, C) (regression: (N, 1)) in float32 and labels (N,), in the data's order."""
        order = eval_order(data.lengths, ctx.batch_size)
        logits = []
        for indices in order:
            batch = {k: v.to(ctx.device) for k, v in collate(data, indices, ctx.tokenizer.pad_token_id).items()}
            batch.pop("labels")
            with ctx.autocast:
                logits.append(model(**batch).logits.float().cpu())
        out = torch.empty((len(data), logits[0].shape[-1]), dtype=torch.float32)
        out[torch.tensor([i for indices in order for i in indices])] = torch.cat(logits)
        return {"logits": out.numpy(), "labels": data.labels.cpu().numpy()}

    def score(self, rows: Rows) -> dict[str, float]:
        """The metrics; with `constant_predictor: 1` when a classifier gives every example the same class."""
        metrics = compute_metrics(self.task_type, rows["logits"], rows["labels"])
        if self.task_type == "classification" and collapse.constant(rows["logits"].argmax(-1).tolist()):
            metrics["constant_predictor"] = 1.0
        return metrics

    def chance_loss(self, train: Encoded) -> float | None:
        labels = train.labels.tolist()
        return collapse.label_variance(labels) if self.task_type == "regression" else collapse.label_entropy(labels)

    def metric(self, metric_for_best: str | None) -> str:
        metric = selection_metric(metric_for_best, self.data.task, self.task_type)
        allowed = REGRESSION_METRICS if self.task_type == "regression" else CLASSIFICATION_METRICS
        if metric not in allowed:
            raise InputError(f"train.metric_for_best: {metric!r} is not a {self.task_type} metric; "
                             f"use one of {', '.join(allowed)}")
        return metric

    def meta(self) -> dict[str, Any]:
        return {"type": self.task_type, "num_labels": self.num_labels, "label_names": self.label_names}

    @classmethod
    def from_meta(cls, block: dict[str, Any], data: DataConfig) -> ClassificationTask:
        return cls(data, block["type"], block["num_labels"], block.get("label_names"))
