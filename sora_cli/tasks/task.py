"""The Task interface: everything that differs between fine-tuning a classifier and a causal LM.

The engine calls, in order: `load_data` (columns, before the model: a classifier's head size depends on the labels),
`configure` + `auto_class` (the model), `encode` (token ids, once the tokenizer exists); per step `collate`,
`count` and `loss_sum`; per evaluation `evaluate`. The engine never asks which task it runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from sora_cli.recipe import DataConfig

Rows = dict[str, np.ndarray]  # an evaluation's per-example outputs: name -> (examples, ...), in the data's order


@dataclass
class EncodedSplits:
    train: Any  # the task's encoded split (classification.Encoded, causal_lm.CausalData): len() and .lengths
    dev: Any | None
    test: Any | None


@dataclass(frozen=True)
class EvalContext:
    """What evaluation needs besides the model and the data."""

    batch_size: int
    device: torch.device
    autocast: contextlib.AbstractContextManager[Any]
    tokenizer: Any
    synced: bool = False  # FSDP2: every rank runs the same forwards, so generation steps until all are done


class Task:
    name: ClassVar[str] = "base"
    peft_task_type: ClassVar[str] = ""
    task_heads: ClassVar[tuple[str, ...]] = ()  # modules_to_save when the recipe gives none (() = none)
    # Score the untouched base model on test at the end of training too (a zero-shot baseline; a classifier's
    # base has an untrained head, so there it means nothing).
    scores_base: ClassVar[bool] = False

    def __init__(self, data: DataConfig):
        self.data = data

    # -- model
    def auto_class(self) -> Any:
        """The transformers `AutoModelFor…` class."""
        raise NotImplementedError

    def configure(self, config: Any) -> None:
        """Adjust the model config before loading (a classifier's label count, names, problem type)."""
        return None

    # -- data
    def load_data(self) -> None:
        """Read the train/dev/test examples (no tokenizer yet)."""
        raise NotImplementedError

    def train_size(self) -> int:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the training examples in order: resume refuses data that changed under the run."""
        raise NotImplementedError

    def encode(self, tokenizer: Any, max_length: int) -> EncodedSplits:
        raise NotImplementedError

    def collate(self, data: Any, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def subset(self, data: Any, indices: list[int]) -> Any:
        raise NotImplementedError

    def chance_loss(self, train: Any) -> float | None:
        """The training loss of the best constant predictor on `train` (collapse.py), or None where none exists."""
        return None

    def example_count(self, data: Any, indices: list[int]) -> int:
        """Examples in these training items (a packed row holds several)."""
        return len(indices)

    # -- loss and evaluation
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over in this batch: examples, or label tokens."""
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed (not averaged) loss of a batch, as a 0-d tensor with grad."""
        raise NotImplementedError

    def predict(self, model: nn.Module, data: Any, ctx: EvalContext) -> Rows:
        """What scoring needs of each example (logits and labels, or summed token losses and hits)."""
        raise NotImplementedError

    def score(self, rows: Rows) -> dict[str, float]:
        """The metrics of a whole split from its examples' rows."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, ctx: EvalContext) -> dict[str, float]:
        """The task's metrics on `data`, in this process (a run's strategy shares a split over torchrun's ranks)."""
        return self.score(self.predict(model, data, ctx))

    def metric(self, metric_for_best: str | None) -> str:
        """The model-selection metric: train.metric_for_best, else the task's own."""
        raise NotImplementedError

    def greater_is_better(self, metric: str) -> bool:
        return True

    # -- checkpoints
    def meta(self) -> dict[str, Any]:
        """This task's block in adapter.json (`type` first): enough to rebuild the model for merge and eval."""
        raise NotImplementedError

    @classmethod
    def from_meta(cls, block: dict[str, Any], data: DataConfig) -> Task:
        raise NotImplementedError
