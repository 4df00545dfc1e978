"""The small interface through which a method plugs into the one training engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from sora_cli.recipe import AdapterConfig, TrainConfig


class Method:
    """Build the method's layer, add its optimizer groups, and act after backward / after the step.

    The engine calls, per optimizer step: `extra_loss` (added to the task loss), backward,
    `after_backward`, `optimizer.step()`, `after_step`. Defaults do nothing.
    """

    name = "base"

    def __init__(self, adapter: AdapterConfig, train: TrainConfig):
        self.adapter = adapter
        self.train = train

    def make_layer(self, base: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Extra optimizer groups for parameters the method owns (kept out of the main AdamW groups)."""
        return []

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Runs right after `optimizer.step()`; returns numbers worth logging."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Method settings recorded in every checkpoint's adapter.json."""
        return {}
