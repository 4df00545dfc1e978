"""SoRA to a budget (issue 24): the control law that moves the sparsity strength λ so that the surviving count (ranks
or inference parameters) follows a path from everything at step 0 to the budget at `reach_at`, and the final cut.

This module is the law and its pieces, tested against hand-worked sequences; adapters/sora_budget.py runs it on
the live gates of a training run.

The law, in METHODS.md's terms. Each step the proximal step soft-thresholds every gate by τ_t = λ_t · η_t. Read:
the surviving count c_t (non-zero gates, or the parameters they keep). Path: b_t = C_0 − (C_0 − C*) · p(t / T),
p(x) = 3x² − 2x³ (smooth start and arrival), p = 1 after T = reach_at; C* is the budget. Error: e_t = (c_t − b_t) /
C_0, positive when too much survives. Update, a PI controller in velocity form on u = log λ:

    u_{t+1} = clip(u_t + K_p · (e_t − e_{t−1}) + K_i · e_t, u_min, u_max)

Why this form. The count falls as λ rises (a larger threshold zeroes more gates), so the loop's sign is fixed. In
log λ the plant's gain hardly depends on λ's scale: doubling λ doubles every step's threshold whatever λ is, so one
pair of gains serves a 10⁻³ and a 10 alike. The velocity form keeps no integral apart from u itself, so clipping u
is the anti-windup: no hidden sum goes on growing while λ sits at a bound. The integral term removes the steady
error of a ramp-following loop (the path falls at a steady rate for most of T); the proportional term on the
error's change damps it. Gates take several steps to cross zero after λ moves, so K_i is small against that delay.

The aim: the path ends at C*·(1 + m), m = 5 %, not at C*. A gate that the loop zeroes one step too many is
lost for the budget (the final cut can remove ranks, never bring one back), so the loop lands a little above
and the final cut takes the excess. On simulated gates (tests/test_budget.py) a bigger gain oscillates: at K_p =
5, K_i = 0.5 the count swings to all or nothing, the delay between λ and the count being the limit.

The start: λ_0 is the λ whose thresholds, summed over T steps of the schedule's η, equal the |g| quantile that
the budget cuts at: q / Σ_t η_t, with q the (1 − C*/C_0) quantile of the initial |g|. Feedback corrects the rest.

The final cut: where more than the budget survives at the end, the gates with the smallest |g| are zeroed (the
order the proximal step itself zeroes them in) until the count is within the budget.

The floor: a step whose threshold would take the count below the budget puts back the gates it zeroed, largest
|g| first, until the budget is met again. The cut can only remove ranks, so without it a loop that undershoots
(the count falls steeply where many |g| are alike, and λ reacts a few steps late) would end below the budget:
measured on the MiniLM quickstart at 25 %, 71 of 74 ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

K_P = 2.0  # on the change of the relative error
K_I = 0.5  # per step, on the relative error: 10 % too many alive raises λ by e^0.05 a step
MARGIN = 0.05  # the path aims 5 % above the budget; the final cut takes the rest
LOG_RANGE = 12.0  # u stays within ln(λ_0) ± 12 (λ over about ten decades)


def smooth(x: float) -> float:
    """p(x) = 3x² − 2x³ on [0, 1], 0 before, 1 after."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def path(start: float, budget: float, step: int, reach_at: int) -> float:
    """b_t: the count the run should have at `step` (all of `start` at 0, `budget` from `reach_at` on)."""
    return start - (start - budget) * smooth(step / reach_at)


@dataclass
class Controller:
    """The PI law on log λ. State: u = log λ and the last error (both saved with the training state)."""

    start: float  # C_0: the count at step 0
    budget: float  # where the path ends: C* · (1 + m)
    reach_at: int  # T
    log_lambda: float
    low: float  # u_min
    high: float  # u_max
    last_error: float = 0.0
    kp: float = K_P
    ki: float = K_I

    @classmethod
    def starting_at(cls, start: float, budget: float, reach_at: int, lam: float,
                    margin: float = MARGIN) -> Controller:
        """A controller whose path aims at min(budget · (1 + margin), start)."""
        u = math.log(lam)
        return cls(start, min(budget * (1 + margin), start), reach_at, u, u - LOG_RANGE, u + LOG_RANGE)

    @property
    def lam(self) -> float:
        return math.exp(self.log_lambda)

    def error(self, count: float, step: int) -> float:
        return (count - path(self.start, self.budget, step, self.reach_at)) / self.start

    def update(self, count: float, step: int) -> float:
        """Read the count after `step`'s proximal step; return the λ for the next step."""
        e = self.error(count, step)
        u = self.log_lambda + self.kp * (e - self.last_error) + self.ki * e
        self.log_lambda, self.last_error = min(max(u, self.low), self.high), e
        return self.lam

    def state(self) -> dict[str, float]:
        return {"log_lambda": self.log_lambda, "last_error": self.last_error}

    def load(self, state: dict[str, float]) -> None:
        self.log_lambda, self.last_error = float(state["log_lambda"]), float(state["last_error"])


def initial_lambda(gates: Sequence[torch.Tensor], keep: float, lrs: list[float]) -> float:
    """λ_0 = q / Σ η_t: q the |g| quantile below which a share 1 − `keep` of the gates lies, `lrs` the gate
    learning rate of each step up to reach_at."""
    g = torch.cat([x.detach().abs().reshape(-1).double() for x in gates])
    q = float(torch.quantile(g, min(max(1.0 - keep, 0.0), 1.0)))
    return max(q, 1e-12) / max(sum(lrs), 1e-12)


def final_cut(gates: dict[str, torch.Tensor], costs: dict[str, int], budget: float) -> tuple[dict[str, torch.Tensor],
                                                                                             int]:
    """(gates with the smallest |g| zeroed until Σ cost of the survivors ≤ budget, how many were zeroed).

    `costs[name]` is what one surviving rank of that module counts (1 for a budget in ranks, d_in + d_out + 1 for
    one in parameters). Ties break by module name, then index, so the cut is the same on every machine."""
    alive = [(float(g[i].abs()), name, i) for name, g in sorted(gates.items()) for i in range(g.numel())
             if g[i] != 0]
    total = sum(costs[name] for _, name, _ in alive)
    out = {name: g.clone() for name, g in gates.items()}
    cut = 0
    for _, name, i in sorted(alive):
        if total <= budget:
            break
        out[name][i] = 0
        total -= costs[name]
        cut += 1
    return out, cut


def floor(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], costs: dict[str, int],
          budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """(`after` with gates that this step's threshold zeroed put back at their values `before` it, largest |g|
    first, until Σ cost of the survivors ≥ budget; how many were put back). The proximal step never takes the count
    below the budget: a rank lost before reach_at could not come back for the final cut, which only removes."""
    alive = sum(costs[name] * int(torch.count_nonzero(g)) for name, g in after.items())
    died = [(-float(before[name][i].abs()), name, i) for name, g in sorted(after.items()) for i in range(g.numel())
            if g[i] == 0 and before[name][i] != 0]
    out = {name: g.clone() for name, g in after.items()}
    restored = 0
    for _, name, i in sorted(died):
        if alive >= budget:
            break
        out[name][i] = before[name][i]
        alive += costs[name]
        restored += 1
    return out, restored
