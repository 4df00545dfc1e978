"""The SoRA reference code's AdamW arithmetic (transformers 4.14's AdamW and the reference's SparseAdamW), for
`threshold: reference` runs that follow the published gate trajectory (METHODS.md, "SoRA — reproducing the reference
code").

With m, v the moment estimates after the usual updates at step t and c = lr_t · √(1 − β2^t) / (1 − β1^t):

    main groups (A, B, the head):  p ← p − c · m ⊘ (√v + ε)          one fused add-divide (addcdiv)
                                   p ← p − lr_t · wd · p             decoupled decay on the *updated* value
    the gate group ("gate": True): u = (m ⊘ (√v + ε)) · (−c)         divide, then multiply, then add
                                   p ← p + u

ε is added to √v before the bias correction, which is folded into the step size c (torch's AdamW divides v by its
correction first and adds ε after). The threshold that follows the gate update is SoRA's `after_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

REFERENCE_EPS = 1e-8  # transformers' adam_epsilon, the main optimizer's
REFERENCE_GATE_EPS = 1e-6  # the reference's SparseAdamW default, the gates'


class ReferenceAdamW(torch.optim.Optimizer):
    """AdamW as the reference computes it (bias correction on, betas (0.9, 0.999)). A group may set its own `eps`
    and `gate: True` (the gates' divide-then-multiply update)."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = REFERENCE_EPS, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "gate": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group, beta1, beta2)
        return loss


def update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
           group: dict[str, Any], beta1: float, beta2: float) -> None:
    """One parameter's step, in the reference's order of operations (each op rounds as the reference's does)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    lr, decay = group["lr"], group["weight_decay"]
    step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)  # a Python float, as the reference's
    if group["gate"]:
        to_add = torch.div(exp_avg, denom) * (-step_size)
        if decay > 0.0:  # the reference adds the decay to the same update (the gates have none)
            to_add = to_add + (-lr * decay) * p
        p.add_(to_add)
        return
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if decay > 0.0:
        p.add_(p, alpha=-lr * decay)
