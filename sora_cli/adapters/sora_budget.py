"""SoRA to a budget in a training run (`adapter.target`): budget.py's law reading the live gates.

Each optimizer step before `reach_at`: the proximal step with the controller's λ (never below the budget: the
floor puts back what it zeroed past it), the surviving count read (one host sync), λ updated. At `reach_at`
the final cut zeroes the smallest |g| until the count is within the budget, and the surviving set is fixed:
the remaining steps train the survivors with no threshold, the cut gates held at zero (as AdaLoRA fixes its
budget after t_final and RoseLoRA its masks after t_f). So from `reach_at` on, every checkpoint, evaluation
and best/ meets the budget exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sora_cli.budget import MARGIN, Controller, final_cut, floor, initial_lambda
from sora_cli.errors import InputError, plural
from sora_cli.optim import proximal_step

if TYPE_CHECKING:
    from sora_cli.adapters.sora import SoRALinear
    from sora_cli.recipe import TargetConfig

PATH_POINTS = 200  # adapter.json keeps at most this many (step, λ, count) points of the trajectory


@dataclass(frozen=True)
class Target:
    """A budget resolved against the model and the run: an absolute count and the step it is due."""

    unit: str  # ranks, or params (adapter parameters after prune: d_in + d_out + 1 per rank, as inspect counts)
    budget: int
    reach_at: int  # optimizer steps done when the final cut comes


def rank_cost(layer: SoRALinear, unit: str) -> int:
    return 1 if unit == "ranks" else layer.in_features + layer.out_features + 1


def resolve(cfg: TargetConfig, layers: list[tuple[str, SoRALinear]], total: int) -> Target:
    """The recipe's target as a count and a step; a budget the adapter cannot hold, one that keeps nothing, or a
    reach_at past the end, refused in one line before training."""
    unit = cfg.unit
    ranks = sum(m.r for _, m in layers)
    full = sum(m.r * rank_cost(m, unit) for _, m in layers)
    shape = f"r = {layers[0][1].r} on {len(layers)} modules" if len({m.r for _, m in layers}) == 1 else \
        f"{len(layers)} modules"
    if cfg.fraction is not None:
        budget = math.floor(cfg.fraction * ranks + 1e-9)
        if budget == 0:
            raise InputError(f"adapter.target.fraction: {cfg.fraction:g} of the {ranks} ranks ({shape}) keeps none; "
                             f"give at least {1 / ranks:.4g}")
    else:
        budget = int(cfg.params if cfg.params is not None else cfg.ranks or 0)
    if budget > full:
        raise InputError(f"adapter.target.{unit}: {budget:,d} is more than the adapter has ({shape}: {full:,d} "
                         f"{'ranks' if unit == 'ranks' else 'parameters'}); give at most {full:,d}, or raise adapter.r")
    smallest = min(rank_cost(m, unit) for _, m in layers)
    if budget < smallest:
        raise InputError(f"adapter.target.params: {budget:,d} is less than one rank of the smallest adapted module "
                         f"({smallest:,d} parameters); give at least {smallest:,d}")
    reach = int(cfg.reach_at) if cfg.reach_at >= 1 else max(1, math.ceil(cfg.reach_at * total))
    if total and reach > total:
        raise InputError(f"adapter.target.reach_at: step {reach} is past the end of training "
                         f"({plural(total, 'step')}); give a step up to {total}, or a fraction of training below 1")
    return Target(unit, budget, reach)


class BudgetRun:
    """The controller, the final cut and the held set of one run. `lr_at(step)`: the gate group's LR at a step (the
    feed-forward start sums it up to reach_at)."""

    def __init__(self, target: Target, layers: list[tuple[str, SoRALinear]], threshold: str,
                 lr_at: Callable[[int], float]):
        self.target, self.threshold, self.lr_at = target, threshold, lr_at
        self.names = [name for name, _ in layers]
        self.gates = [m.gate for _, m in layers]
        self.costs = {name: rank_cost(m, target.unit) for name, m in layers}
        self.cost_vector = torch.tensor([self.costs[n] for n in self.names], dtype=torch.float64,
                                        device=self.gates[0].device)
        self.controller: Controller | None = None
        self.alive: list[torch.Tensor] | None = None  # after the cut: 1 where a gate survives
        self.cut = 0
        self.restored = 0  # gates the floor put back, over the run
        self.trajectory: list[tuple[float, float, float]] = []  # (steps done, λ used, count after)

    def count(self) -> float:
        """Surviving ranks, or their parameters: Σ_modules nnz(g) · cost. One host sync."""
        nnz = torch.stack([torch.count_nonzero(g.detach()) for g in self.gates]).to(torch.float64)
        return float(nnz @ self.cost_vector)

    def start(self, step: int) -> Controller:
        """The controller of a run's first step: its path from the count now, λ_0 by the feed-forward rule."""
        now = max(self.count(), 1.0)
        aim = min(self.target.budget * (1 + MARGIN), now)
        scaled = self.threshold == "scaled"
        lrs = [self.lr_at(t) if scaled else 1.0 for t in range(step, self.target.reach_at)]
        lam = initial_lambda(self.gates, aim / now, lrs or [1.0])
        return Controller.starting_at(now, self.target.budget, self.target.reach_at, lam)

    def after_step(self, lr: float, step: int) -> dict[str, float]:
        """After optimizer step `step` (0-based): the proximal step with λ_t and λ's update; at reach_at the cut;
        after it, the cut gates re-zeroed (AdamW's moments would move them)."""
        if self.alive is not None:
            for g, keep in zip(self.gates, self.alive):
                g.data.mul_(keep)
            return {"threshold": 0.0, "lambda": self.last_lambda or 0.0}
        if self.controller is None:
            self.controller = self.start(step)
        done, lam = step + 1, self.controller.lam
        before = [g.detach().clone() for g in self.gates]  # (Σ r,) in all: cheap
        tau = proximal_step(self.gates, self.threshold, lam, lr=lr)
        count = self.count()
        if count < self.target.budget:  # the floor: never below the budget before the cut
            count = self.hold_floor(before)
        self.trajectory.append((float(done), lam, count))
        self.controller.update(count, done)
        if done >= self.target.reach_at:
            self.settle()
        return {"threshold": tau, "lambda": lam}

    def hold_floor(self, before: list[torch.Tensor]) -> float:
        """Put back the gates this step zeroed, largest |g| first, until the budget holds; the count after."""
        kept, restored = floor({n: b.cpu() for n, b in zip(self.names, before)},
                               {n: g.detach().cpu() for n, g in zip(self.names, self.gates)}, self.costs,
                               self.target.budget)
        for name, g in zip(self.names, self.gates):
            g.data.copy_(kept[name])
        self.restored += restored
        return self.count()

    def settle(self) -> None:
        """The final cut (smallest |g| first, ties by module name and index) and the fixed surviving set."""
        gates = {name: g.detach().cpu() for name, g in zip(self.names, self.gates)}
        kept, self.cut = final_cut(gates, self.costs, self.target.budget)
        for name, g in zip(self.names, self.gates):
            g.data.copy_(kept[name])
        self.alive = [(g.detach() != 0).to(g.dtype) for g in self.gates]

    @property
    def last_lambda(self) -> float | None:
        """The λ of the last proximal step (the one the budget needed); None before the first."""
        return self.trajectory[-1][1] if self.trajectory else None

    @property
    def settled(self) -> bool:
        return self.alive is not None

    # -- the training state (exact resume) and adapter.json ---------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.controller is None:
            return {}
        c = self.controller
        state = {"budget.controller": torch.tensor([c.start, c.budget, c.reach_at, c.log_lambda, c.low, c.high,
                                                    c.last_error], dtype=torch.float64),
                 "budget.trajectory": torch.tensor(self.trajectory, dtype=torch.float64).reshape(-1, 3),
                 "budget.cut": torch.tensor([self.cut, self.restored], dtype=torch.int64)}
        if self.alive is not None:
            state["budget.alive"] = torch.cat([a.reshape(-1) for a in self.alive]).to(torch.uint8).cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "budget.controller" not in state:
            return
        start, budget, reach_at, u, low, high, e = state["budget.controller"].tolist()
        self.controller = Controller(start, budget, int(reach_at), u, low, high, e)
        self.trajectory = [(a, b, c) for a, b, c in state["budget.trajectory"].tolist()]
        self.cut, self.restored = state["budget.cut"].tolist()
        if "budget.alive" in state:
            flat = state["budget.alive"].to(self.gates[0].device)
            sizes = [g.numel() for g in self.gates]
            self.alive = [part.to(g.dtype) for part, g in zip(torch.split(flat, sizes), self.gates)]

    def describe(self) -> dict[str, Any]:
        """adapter.json's `budget`: the target, where the run stands, and λ's trajectory (thinned)."""
        c, t = self.controller, self.target
        points = self.trajectory
        if len(points) > PATH_POINTS:
            every = math.ceil(len(points) / PATH_POINTS)
            points = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
        return {"unit": t.unit, "budget": t.budget, "reach_at": t.reach_at, "reached": round(self.count()),
                "start": c.start if c else None, "aim": c.budget if c else None,
                "lambda_start": points[0][1] if points else None, "lambda": self.last_lambda,
                "final_cut": self.cut, "floor_restored": self.restored, "settled": self.settled,
                "path": [[int(s), lam, round(n)] for s, lam, n in points]}

    def totals(self) -> dict[str, int]:
        return {f"budget_{self.target.unit}": self.target.budget, "budget_reached": round(self.count()),
                "budget_cut": self.cut}
