"""Metrics against hand-computed values; GLUE presets."""

from __future__ import annotations

import numpy as np
import pytest

from sora_cli.tasks import GLUE, compute_metrics


def test_classification_metrics_by_hand() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])  # predicts 1 0 1 0 1
    labels = np.array([1, 0, 0, 0, 1])
    m = compute_metrics("classification", logits, labels)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.8)  # tp 2, fp 1, fn 0 -> P 2/3, R 1
    # MCC = (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2·2 − 1·0)/sqrt(3·2·3·2) = 4/6
    assert m["matthews"] == pytest.approx(4 / 6)


def test_regression_metrics() -> None:
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    m = compute_metrics("regression", pred[:, None], np.array([2.0, 4.0, 6.0, 100.0]))
    assert m["spearman"] == pytest.approx(1.0)
    assert 0.7 < m["pearson"] < 0.9


def test_glue_presets() -> None:
    assert GLUE["cola"].metric == "matthews" and GLUE["mrpc"].metric == "f1" and GLUE["stsb"].metric == "pearson"
    assert GLUE["stsb"].task_type == "regression" and GLUE["mnli"].num_labels == 3
    assert GLUE["mnli"].validation_split == "validation_matched"
    assert GLUE["qqp"].text_fields == ("question1", "question2")
