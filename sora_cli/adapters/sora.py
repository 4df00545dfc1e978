"""SoRA (Ding et al., EMNLP 2023, arXiv 2311.11696): LoRA with a gate between A and B,
made sparse by a proximal (soft-threshold) step after every optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sora_cli.adapters.lora import LoRALinear
from sora_cli.adapters.method import Calibration, Method, Tensors, adapter_layers
from sora_cli.adapters.sora_budget import BudgetRun, resolve
from sora_cli.optim import lr_factor, proximal_step, warmup_length
from sora_cli.precision import wide
from sora_cli.reference_adamw import REFERENCE_GATE_EPS


class SoRALinear(LoRALinear):
    """LoRA with a rank gate g (r,):

        h = W0 x + b + s · B (g ⊙ (A · dropout(x)))

    A rank i is off exactly when g_i == 0; `prune` then removes row i of A and column i of B.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, gate_init: str = "normal",
                 **options: bool):
        super().__init__(base, r, alpha, dropout, **options)
        gate = torch.empty(r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        if gate_init == "normal":
            nn.init.normal_(gate)  # N(0, 1), as the reference code
        else:
            nn.init.ones_(gate)
        self.gate = nn.Parameter(gate)

    def rank_scale(self) -> torch.Tensor:
        return self.gate * self.scaling  # (r,): s · g, applied to A · x before B

    def active_rank(self) -> int:
        return int(torch.count_nonzero(self.gate))


def gates(model: nn.Module) -> list[nn.Parameter]:
    return [m.gate for m in model.modules() if isinstance(m, SoRALinear)]


class SoRA(Method):
    name = "sora"
    layer = SoRALinear
    rank_dims = {"lora_A": 0, "lora_B": 1, "gate": 0}
    budget: BudgetRun | None = None  # adapter.target's controller (setup builds it)

    def make_layer(self, base: nn.Linear) -> nn.Module:
        a = self.adapter
        return SoRALinear(base, a.r, a.alpha, a.dropout, gate_init=a.gate_init or "normal", **self.layer_options())

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # The gates' own AdamW: no weight decay, same LR schedule, gate_lr (default: the main lr); under `threshold:
        # reference`, the reference's SparseAdamW (its ε, its divide-then-multiply update).
        lr = self.adapter.gate_lr or self.train.lr
        group = {"params": gates(model), "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": "gate"}
        return [{**group, "eps": REFERENCE_GATE_EPS, "gate": True} if self.reference else group]

    @property
    def reference(self) -> bool:
        """`threshold: reference`: the reference code's whole step (METHODS.md), not only its threshold."""
        return self.adapter.threshold == "reference"

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        # Optional l1_loss_weight · Σ|g| / numel(g) (the reference GLUE scripts); the proximal step is the real L1.
        weight = self.adapter.l1_loss_weight
        if not weight:
            return None
        g = torch.cat([p.reshape(-1) for p in gates(model)])
        return weight * g.abs().sum() / g.numel()

    def setup(self, model: nn.Module, total_steps: int, calibration: Calibration | None) -> None:
        """With adapter.target: the budget resolved against the adapted modules and the run's length (refused in one
        line when it cannot be met), and its controller."""
        if self.adapter.target is None:
            return
        layers = list(adapter_layers(model))
        t = self.train
        warmup = warmup_length(t.warmup_steps, t.warmup_ratio, total_steps)
        lr = self.adapter.gate_lr or t.lr
        self.budget = BudgetRun(resolve(self.adapter.target, layers, total_steps), layers,
                                self.adapter.threshold or "scaled",
                                lambda step: lr * lr_factor(step, total_steps, warmup, t.lr_scheduler))

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        (group,) = [g for g in optimizer.param_groups if g.get("name") == "gate"]
        if self.budget is not None:
            return self.budget.after_step(group["lr"], step)
        tau = proximal_step(group["params"], self.adapter.threshold or "scaled", self.adapter.sparse_lambda or 0.0,
                            lr=group["lr"])
        return {"threshold": tau}

    def settled(self, step: int) -> bool:
        return self.budget is None or self.budget.settled

    def state_dict(self) -> Tensors:
        return self.budget.state_dict() if self.budget is not None else {}

    def load_state_dict(self, state: Tensors) -> None:
        if self.budget is not None:
            self.budget.load_state_dict(state)

    def stats(self, model: nn.Module) -> dict[str, int]:
        ranks = [(m.r, m.active_rank()) for _, m in adapter_layers(model)]  # one host sync per layer
        active, total = sum(a for _, a in ranks), sum(r for r, _ in ranks)
        totals = {"active_rank": active, "max_rank": total, "zero_gates": total - active, "total_gates": total}
        return {**totals, **(self.budget.totals() if self.budget is not None else {})}

    def describe(self) -> dict[str, Any]:
        a = self.adapter
        described = {"gate_init": a.gate_init, "sparse_lambda": a.sparse_lambda, "threshold": a.threshold,
                     "gate_lr": a.gate_lr, "l1_loss_weight": a.l1_loss_weight}
        return {**described, "budget": self.budget.describe()} if self.budget is not None else described

    @classmethod
    def checkpoint_totals(cls, meta: dict[str, Any]) -> dict[str, int]:
        budget = meta.get("method_config", {}).get("budget")
        if not budget:
            return {}
        return {f"budget_{budget['unit']}": budget["budget"], "budget_reached": budget["reached"],
                "budget_cut": budget["final_cut"]}

    # -- rules over checkpoints: the gate scales B's columns, and a zero gate is a rank that prune cuts

    @classmethod
    def factors(cls, tensors: Tensors, name: str, module: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        b = wide(tensors[f"{name}.lora_B"]) * wide(tensors[f"{name}.gate"])  # B diag(g): (d_out, r)
        return module["s"] * b, wide(tensors[f"{name}.lora_A"])

    @classmethod
    def surviving(cls, tensors: Tensors, name: str, module: dict[str, Any], eps: float) -> torch.Tensor:
        return torch.nonzero(tensors[f"{name}.gate"].abs() > eps).flatten()

    @classmethod
    def gate_values(cls, tensors: Tensors, name: str) -> torch.Tensor | None:
        return tensors.get(f"{name}.gate")

    @classmethod
    def rank_params(cls, module: dict[str, Any]) -> int:
        return int(module["d_in"] + module["d_out"] + 1)  # A's row, B's column and the gate entry
