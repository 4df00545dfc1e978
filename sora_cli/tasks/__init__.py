"""Task presets (GLUE) and metrics (scikit-learn / scipy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
