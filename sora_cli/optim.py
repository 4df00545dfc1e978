"""Optimizer groups, learning-rate schedules and the proximal gate step (METHODS.md, SoRA)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sora_cli.reference_adamw import ReferenceAdamW


@torch.no_grad()
def soft_threshold_(v: torch.Tensor, tau: float) -> torch.Tensor:
    """In place: S_τ(v) = sign(v) · max(|v| − τ, 0)."""
    shrunk = (v.abs() - tau).clamp_(min=0)
    return v.copy_(torch.sign(v) * shrunk)


@torch.no_grad()
def reference_threshold_(v: torch.Tensor, lam: float) -> torch.Tensor:
    """In place, the reference code's three lines: v[v > λ] −= λ; v[v < −λ] += λ; v[|v| < λ] = 0.

    Net effect |v| < 2λ → 0, else v − sign(v)·λ (and |v| == λ stays). Not a true soft-threshold:
    kept only for parity with published numbers (`threshold: reference`).
    """
    v.sub_(lam * (v > lam)).add_(lam * (v < -lam))
    return v.masked_fill_(v.abs() < lam, 0.0)


def proximal_step(params: Iterable[torch.Tensor], mode: str, lam: float, lr: float) -> float:
    """Apply the L1 proximal operator to every gate after the optimizer step; return τ used.

    scaled: τ = λ·η_t (the proximal gradient step, η_t the gate group's LR at this step);
    fixed: τ = λ; reference: the reference code's shrink-then-cut with λ.
    """
    tau = lam * lr if mode == "scaled" else lam
    if tau == 0.0:
        return 0.0
    for p in params:
        if mode == "reference":
            reference_threshold_(p.data, tau)
        else:
            soft_threshold_(p.data, tau)
    return tau


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based); transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)  # linear


def schedule_length(max_steps: int | None, epochs: float | None, n_train: int, batch_size: int,
                    grad_accum: int) -> int:
    """Optimizer steps of a run: max_steps, else epochs over the training set (3 when neither is given)."""
    per_epoch = math.ceil(n_train / batch_size)
    return max_steps or max(1, math.ceil((epochs or 3.0) * per_epoch / grad_accum))


def warmup_length(warmup_steps: int | None, warmup_ratio: float, total: int) -> int:
    return warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total)


def reference_lengths(epochs: float | None, max_steps: int | None, warmup_steps: int | None, warmup_ratio: float,
                      n_train: int, batch_size: int) -> tuple[int, int, int]:
    """(n, the main optimizer's warm-up, the gates' warm-up) as the SoRA reference computes them: n =
    int(epochs · examples / batch) (max_steps when given), the main warm-up ceil(ratio · n) (transformers'
    `get_warmup_steps`), the gates' int(epochs · examples / batch · ratio), from the unrounded product. `batch_size` is
    the micro-batch, as the reference's count of steps takes it (gradient accumulation not divided out)."""
    exact = float(max_steps) if max_steps else (epochs or 3.0) * (n_train / batch_size)
    n = int(exact)
    main = warmup_steps if warmup_steps else math.ceil(n * warmup_ratio)
    return n, main, int(exact * warmup_ratio)


def reference_factor(step: int, total: int, warmup: int) -> float:
    """transformers' linear schedule with warm-up, in its own arithmetic: t/w, then max(0, (n − t)/(n − w))."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float | dict[str, float]) -> None:
    """Each group's LR: base_lr × factor, or × factor[its name] (factor["*"] for the groups not named)."""
    for group in optimizer.param_groups:
        f = factor.get(group.get("name", "*"), factor["*"]) if isinstance(factor, dict) else factor
        group["lr"] = group["base_lr"] * f


# Device types with a fused AdamW kernel in torch >= 2.4 (torch keeps its own list private).
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")


def build_optimizer(model: nn.Module, extra_groups: list[dict[str, Any]], lr: float, weight_decay: float,
                    reference: bool = False) -> torch.optim.Optimizer:
    """AdamW with groups: main (weight decay), main without decay (biases, norms), then the method's own.
    `reference`: the SoRA reference code's AdamW arithmetic instead of torch's (reference_adamw.py)."""
    owned = {id(p) for g in extra_groups for p in g["params"]}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in owned:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norm weights are the 1-D tensors
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "name": "main"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": "main_no_decay"},
        *extra_groups,
    ]
    groups = [g for g in groups if g["params"]]
    if reference:
        return ReferenceAdamW(groups, lr=lr)
    # The fused kernel: one pass over all tensors of a group instead of ~10 small ops per tensor per step.
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
