"""Tasks: one file each (model class, data encoding, batches, loss as a sum and a count, evaluation).

`get_task` picks the task a recipe asks for; `task_from_meta` rebuilds the one a checkpoint was trained for.
"""

from __future__ import annotations

from typing import Any

from sora_cli.errors import CheckpointError
from sora_cli.recipe import DataConfig
from sora_cli.tasks.causal_lm import CausalLMTask
from sora_cli.tasks.classification import (
    CLASSIFICATION_METRICS,
    GLUE,
    REGRESSION_METRICS,
    ClassificationTask,
    compute_metrics,
    selection_metric,
    task_type_of,
)
from sora_cli.tasks.edit import EditTask
from sora_cli.tasks.task import EncodedSplits, EvalContext, Task

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "regression": ClassificationTask,
                                "causal_lm": CausalLMTask, "edit": EditTask}


def get_task(data: DataConfig) -> Task:
    """The recipe's task: data.task_type, else the GLUE preset's, else classification."""
    return TASKS[task_type_of(data)](data)


def task_from_meta(meta: dict[str, Any], data: DataConfig | None = None, where: str = "adapter.json") -> Task:
    """The task a checkpoint records (its `task` block), over `data` (default: no data, for merge)."""
    block = meta["task"]
    if block.get("type") not in TASKS:
        raise CheckpointError(f"{where}: unknown task type {block.get('type')!r}; this sora knows {', '.join(TASKS)}")
    return TASKS[block["type"]].from_meta(block, data or DataConfig(dataset="packaged:none"))


__all__ = ["CLASSIFICATION_METRICS", "GLUE", "REGRESSION_METRICS", "TASKS", "EncodedSplits", "EvalContext", "Task",
           "compute_metrics", "get_task", "selection_metric", "task_from_meta"]
