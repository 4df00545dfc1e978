"""RoseLoRA (Wang et al., EMNLP 2024, arXiv 2406.10777): LoRA whose A rows and B columns keep only a fraction τ of
their entries, chosen by smoothed sensitivity, so the merged update B A changes few base weights.

Forward is plain LoRA. Per step: after backward the importance Ī ← β Ī + (1 − β) |p ⊙ ∂L/∂p| of every entry of A
and B; after the optimizer step the density τ_t of the cubic schedule and, while τ_t < 1, the masks (and the
optional clamp). See METHODS.md "RoseLoRA".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sora_cli.adapters.lora import LoRALinear
from sora_cli.adapters.method import Calibration, Method, Tensors, adapter_layers
from sora_cli.errors import InputError
from sora_cli.recipe import AdapterConfig, TrainConfig


def density_at(t: int, density: float, start: int, end: int) -> float:
    """τ_t: 1 up to t_i, then τ + (1 − τ)(1 − (t − t_i)/(t_f − t_i))³, and τ from t_f on."""
    if t <= start:
        return 1.0
    if t >= end:
        return density
    return density + (1 - density) * (1 - (t - start) / (end - start)) ** 3


def budget(density: float, d: int) -> int:
    """max(1, ⌈τ·d⌉) entries kept of d. τ·d is rounded to 9 digits first, so 0.05 · 20 (1.0000000000000002 in
    binary floating point) keeps 1 entry, not 2."""
    return min(d, max(1, math.ceil(round(density * d, 9))))


def keep_mask(importance: torch.Tensor, density: float, dim: int, rule: str) -> torch.Tensor:
    """A 0/1 mask over `importance`, computed independently along `dim` (1: each row of A, 0: each column of B)."""
    d = importance.shape[dim]
    if rule == "reference":
        return reference_mask(importance, density, dim)
    k = budget(density, d)
    # a stable descending sort: among equal importances the lowest index comes first, and wins
    order = torch.argsort(importance, dim=dim, descending=True, stable=True).narrow(dim, 0, k)
    return torch.zeros_like(importance).scatter_(dim, order, 1.0)


def reference_mask(importance: torch.Tensor, density: float, dim: int) -> torch.Tensor:
    """The published code's rule: k = int(d·(1 − τ)), thr = the k-th smallest Ī along `dim`, keep Ī ≥ thr.
    That keeps d − k + 1 entries plus every tie of thr (and everything where thr is 0)."""
    k = int(importance.shape[dim] * (1 - density))
    if k == 0:  # kthvalue needs k >= 1; nothing would be masked anyway
        return torch.ones_like(importance)
    thr = torch.kthvalue(importance, k, dim=dim, keepdim=True).values
    return (importance >= thr).to(importance.dtype)


def window(value: float, total: int) -> int:
    """A schedule point given as a step (an integer) or as a fraction of training (below 1)."""
    return int(value) if value >= 1 or float(value).is_integer() else round(value * total)


class RoseLoRA(Method):
    name = "roselora"
    layer = LoRALinear
    sparse_factors = True  # `inspect` shows the support of A, B and B A

    def __init__(self, adapter: AdapterConfig, train: TrainConfig):
        super().__init__(adapter, train)
        self.layers: dict[str, LoRALinear] = {}
        self.importance: Tensors = {}  # "<module>.lora_A" / "<module>.lora_B" -> Ī, shaped like the tensor
        self.start = self.end = 0

    def make_layer(self, base: nn.Linear) -> nn.Module:
        return LoRALinear(base, self.adapter.r, self.adapter.alpha, self.adapter.dropout, **self.layer_options())

    def setup(self, model: nn.Module, total_steps: int, calibration: Calibration | None) -> None:
        a = self.adapter
        assert a.sparsify_start is not None and a.sparsify_end is not None
        self.start, self.end = window(a.sparsify_start, total_steps), window(a.sparsify_end, total_steps)
        if self.end <= self.start:
            raise InputError(f"adapter.sparsify_end: step {self.end} of {total_steps} does not come after "
                             f"adapter.sparsify_start (step {self.start}); move the end later or the start earlier")
        self.layers = dict(adapter_layers(model))
        self.importance = {}  # a fresh adapter (each edit of a `single` edit run) starts without history

    def after_backward(self, model: nn.Module, step: int) -> None:
        beta = self.adapter.importance_beta or 0.0
        with torch.no_grad():
            for key, p in self._tensors():
                score = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                old = self.importance.get(key)
                self.importance[key] = score if old is None else old.mul_(beta).add_(score, alpha=1 - beta)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        a = self.adapter
        assert a.density is not None and a.mask_rule is not None
        tau = density_at(step, a.density, self.start, self.end)
        if tau < 1 and self.importance:
            with torch.no_grad():
                for key, p in self._tensors():
                    dim = 1 if key.endswith("lora_A") else 0  # rows of A (r, d_in); columns of B (d_out, r)
                    p.mul_(keep_mask(self.importance[key], tau, dim, a.mask_rule))
                    if a.clamp is not None:
                        p.clamp_(-a.clamp, a.clamp)
        return {"density": tau}

    def _tensors(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{t}", getattr(m, t)) for name, m in self.layers.items() for t in ("lora_A", "lora_B")]

    def state_dict(self) -> Tensors:
        return dict(self.importance)

    def load_state_dict(self, state: Tensors) -> None:
        self.importance = {k: v.clone() for k, v in state.items()}

    def stats(self, model: nn.Module) -> dict[str, int]:
        totals = super().stats(model)
        nnz = numel = 0
        for _, m in adapter_layers(model):
            for p in (m.lora_A, m.lora_B):
                nnz, numel = nnz + int(torch.count_nonzero(p)), numel + p.numel()
        return {**totals, "adapter_nnz": nnz, "adapter_numel": numel}

    def describe(self) -> dict[str, Any]:
        a = self.adapter
        return {"density": a.density, "sparsify_start": a.sparsify_start, "sparsify_end": a.sparsify_end,
                "importance_beta": a.importance_beta, "mask_rule": a.mask_rule, "clamp": a.clamp}

    # -- rules over checkpoints: a rank whose A row or B column is all zero adds nothing, so prune cuts it

    @classmethod
    def surviving(cls, tensors: Tensors, name: str, module: dict[str, Any], eps: float) -> torch.Tensor:
        a_rows = tensors[f"{name}.lora_A"].abs().amax(dim=1) > eps  # (r,)
        b_cols = tensors[f"{name}.lora_B"].abs().amax(dim=0) > eps  # (r,)
        return torch.nonzero(a_rows & b_cols).flatten()
