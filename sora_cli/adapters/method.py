"""The interface through which a method plugs into the one training engine and the pure checkpoint tools.

Nothing outside `adapters/<method>.py` tests a method's name or looks for its tensor names: the engine calls the
instance hooks below, and `prune`, `merge`, `export` and `inspect` call the class-level rules, which are pure
functions of a checkpoint's tensors and one module's adapter.json entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sora_cli.dist import SINGLE, World
from sora_cli.optim import build_optimizer
from sora_cli.precision import wide
from sora_cli.recipe import with_method_defaults

if TYPE_CHECKING:
    from sora_cli.recipe import AdapterConfig, TrainConfig

Tensors = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]


@dataclass
class Calibration:
    """Training examples for a method's data-driven initialisation (LoRS's gradient init), and how to score them."""

    batches: list[Batch]  # on the model's device
    loss_sum: Callable[[nn.Module, Batch], torch.Tensor]  # a batch's summed loss (the task's), with grad
    count: Callable[[Batch], int]  # what that sums over: examples, or label tokens
    autocast: contextlib.AbstractContextManager[Any]  # training's (bf16 when train.precision says so)
    world: World = SINGLE  # under torchrun: `batches` are this rank's slices; sums go over every rank


class Method:
    """Per optimizer step the engine calls: `extra_loss` (added to the task loss), backward, `after_backward`,
    clip, `optimizer.step()`, `after_step`. Defaults do nothing. `setup` runs once, after injection."""

    name: ClassVar[str] = "base"
    layer: ClassVar[type[nn.Module]]
    rank_dims: ClassVar[dict[str, int]] = {"lora_A": 0, "lora_B": 1}  # tensor per module -> its rank dimension
    peft_export: ClassVar[str | None] = None  # why a standard LoRA adapter cannot carry it (None: it can)
    # True: the factors themselves are sparse (entries of A and B exactly zero), so `inspect` reports the support of
    # A, B and ΔW (nnz, density, the bound nnz(B̃A) ≤ Σ_i nnz(B̃[:, i])·nnz(A[i, :]), the touched base weights)
    sparse_factors: ClassVar[bool] = False

    def __init__(self, adapter: AdapterConfig, train: TrainConfig):
        self.adapter = with_method_defaults(adapter)  # a config built in code gets the recipe's defaults
        self.train = train

    # -- training hooks -------------------------------------------------------------------------------------------

    def make_layer(self, base: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def layer_options(self) -> dict[str, bool]:
        """The layer options every method shares (LoRALinear's rslora, keep_sparsity, exact)."""
        a = self.adapter
        return {"rslora": a.use_rslora, "keep_sparsity": bool(a.keep_sparsity), "exact": a.grad == "exact"}

    def calibration_samples(self) -> int:
        """How many training examples `setup` wants as `calibration` (0: it takes none)."""
        return 0

    def setup(self, model: nn.Module, total_steps: int, calibration: Calibration | None) -> None:
        """Once, after injection and before the first step (schedules, calibration-based initialisation)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Extra optimizer groups for parameters the method owns (kept out of the main AdamW groups)."""
        return []

    @property
    def reference(self) -> bool:
        """Whether the method reproduces its reference code's step: that code's AdamW arithmetic
        (reference_adamw.py) and, with a linear schedule, its LR schedule (formula, warm-up rounding per optimizer)."""
        return False

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of a fresh run (or of each edit): AdamW over the main groups and `param_groups`."""
        return build_optimizer(model, self.param_groups(model), self.train.lr, self.train.weight_decay,
                               reference=self.reference)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Runs right after `optimizer.step()`; returns numbers worth logging."""
        return {}

    def settled(self, step: int) -> bool:
        """Whether the adapter's structure after `step` steps is the one the run ends with (SoRA to a budget: from
        reach_at on), so that an evaluation there may become best/ and count towards early stopping."""
        return True

    def state_dict(self) -> Tensors:
        """Running statistics the method keeps between steps, saved with the training state (exact resume)."""
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        return None

    def stats(self, model: nn.Module) -> dict[str, int]:
        """Totals for the log, the progress bar and the run summary: `active_rank` and `max_rank` at least."""
        ranks = [(m.r, m.active_rank()) for _, m in adapter_layers(model)]
        return {"active_rank": sum(a for _, a in ranks), "max_rank": sum(r for r, _ in ranks)}

    def describe(self) -> dict[str, Any]:
        """Method settings recorded in every checkpoint's adapter.json."""
        return {}

    # -- pure rules over checkpoints (class-level: no model, no recipe) --------------------------------------------

    @classmethod
    def factors(cls, tensors: Tensors, name: str, module: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̃, A) in float32 (float64 for a float64 adapter) with ΔW = B̃ A: B̃ (d_out, r) carries every scale (s, and
        SoRA's gate)."""
        return module["s"] * wide(tensors[f"{name}.lora_B"]), wide(tensors[f"{name}.lora_A"])

    @classmethod
    def delta(cls, tensors: Tensors, name: str, module: dict[str, Any]) -> torch.Tensor:
        """ΔW of one module, (d_out, d_in), in the factors' dtype."""
        b, a = cls.factors(tensors, name, module)
        return b @ a

    @classmethod
    def surviving(cls, tensors: Tensors, name: str, module: dict[str, Any], eps: float) -> torch.Tensor:
        """Indices of the ranks that `prune` keeps (ascending). Default: every rank."""
        return torch.arange(module["r"])

    @classmethod
    def checkpoint_totals(cls, meta: dict[str, Any]) -> dict[str, int]:
        """Totals beyond the ranks that the run summary shows, read back from a checkpoint's adapter.json."""
        return {}

    @classmethod
    def gate_values(cls, tensors: Tensors, name: str) -> torch.Tensor | None:
        """Per-rank gate magnitudes for `inspect` (None: the method has no gates)."""
        return None

    @classmethod
    def rank_params(cls, module: dict[str, Any]) -> int:
        """Adapter parameters per rank of one module."""
        return int(module["d_in"] + module["d_out"])


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(name, layer) of every adapted layer: anything with a low-rank `lora_A` and an `active_rank`."""
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "active_rank"):
            yield name, m


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its untouched base (every adapted layer computes W0 x + b only), without a second copy."""
    layers = [m for _, m in adapter_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False
