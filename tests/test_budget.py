"""The budget controller's law (sora_cli/budget.py) against hand-worked numbers, its anti-windup, its state, the
feed-forward start, the final cut, and a closed loop on simulated gates."""

from __future__ import annotations

import math

import pytest
import torch

from sora_cli.budget import Controller, final_cut, floor, initial_lambda, path, smooth


def test_the_path_is_smooth_and_arrives() -> None:
    assert [smooth(x) for x in (-1.0, 0.0, 0.5, 1.0, 2.0)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert path(100, 40, 2, 10) == pytest.approx(100 - 60 * 0.104, abs=1e-12)  # p(0.2) = 0.04 · 2.6
    assert path(100, 40, 5, 10) == pytest.approx(70.0, abs=1e-12)
    assert path(100, 40, 10, 10) == path(100, 40, 500, 10) == 40


def test_the_law_against_a_hand_worked_sequence() -> None:
    c = Controller.starting_at(start=100, budget=50, reach_at=10, lam=0.1, margin=0.0)
    c.ki = 0.2
    # step 1: b = 100 − 50 · p(0.1) = 98.6, e = 0.014; Δu = 2 · 0.014 + 0.2 · 0.014 = 0.0308
    # step 2: b = 94.8, e = 0.032; Δu = 2 · 0.018 + 0.2 · 0.032 = 0.0424
    # step 3: b = 89.2, e = 0.008; Δu = 2 · (−0.024) + 0.2 · 0.008 = −0.0464
    lams = [c.update(count, step) for step, count in ((1, 100), (2, 98), (3, 90))]
    expected = [0.1 * math.exp(d) for d in (0.0308, 0.0308 + 0.0424, 0.0308 + 0.0424 - 0.0464)]
    assert lams == pytest.approx(expected, rel=1e-12)
    assert c.last_error == pytest.approx(0.008, abs=1e-15)


def test_no_windup_at_the_bound() -> None:
    c = Controller.starting_at(start=100, budget=10, reach_at=10, lam=1.0, margin=0.0)
    for step in range(1, 1001):  # nothing dies: the error stays at 0.9, λ climbs to its bound and stays there
        c.update(100, step)
    assert c.log_lambda == c.high
    c.update(1, 1001)  # then far too few survive (e = −0.09): λ falls at once, no stored sum to unwind
    drop = c.kp * (-0.09 - 0.9) + c.ki * -0.09
    assert c.log_lambda == pytest.approx(c.high + drop, abs=1e-12) and c.log_lambda < c.high - 1.9
    assert Controller.starting_at(100, 50, 10, 1.0).budget == pytest.approx(52.5)  # the 5 % margin
    assert Controller.starting_at(100, 99, 10, 1.0).budget == 100  # never above the start


def test_the_state_round_trips() -> None:
    a = Controller.starting_at(start=64, budget=16, reach_at=20, lam=0.3)
    for step, count in enumerate((64, 63, 60, 55), start=1):
        a.update(count, step)
    b = Controller.starting_at(start=64, budget=16, reach_at=20, lam=0.3)
    b.load(a.state())
    assert a.update(50, 5) == b.update(50, 5)


def test_the_feed_forward_start() -> None:
    gates = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])]
    # keep half: the 0.5 quantile of |g| = 2.5 (linear interpolation), over Σ η = 10 · 0.1 = 1.0
    assert initial_lambda(gates, 0.5, [0.1] * 10) == pytest.approx(2.5, rel=1e-12)
    assert initial_lambda(gates, 0.25, [0.5] * 2) == pytest.approx(3.25, rel=1e-12)  # 0.75 quantile: 3.25


def test_the_final_cut_takes_the_smallest_gates_first() -> None:
    gates = {"a": torch.tensor([0.5, -0.1, 0.0, 2.0], dtype=torch.float64),
             "b": torch.tensor([0.3, -0.05], dtype=torch.float64)}
    ranks, n = final_cut(gates, {"a": 1, "b": 1}, budget=3)
    assert n == 2 and ranks["a"].tolist() == [0.5, 0.0, 0.0, 2.0] and ranks["b"].tolist() == [0.3, 0.0]
    params, n = final_cut(gates, {"a": 10, "b": 3}, budget=25)  # 36 → 33 (b[1]) → 23 (a[1]): stop
    assert n == 2 and params["a"].tolist() == [0.5, 0.0, 0.0, 2.0] and params["b"].tolist() == [0.3, 0.0]
    same, n = final_cut(gates, {"a": 1, "b": 1}, budget=5)
    assert n == 0 and all(torch.equal(same[k], gates[k]) for k in gates)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_a_closed_loop_on_simulated_gates_lands_on_the_budget(keep: float, seed: int) -> None:
    """400 gates N(0, 1), each step a noisy gradient step then the soft-threshold by λ · η (SoRA's scaled
    threshold), λ from the controller: the count stays near the path, ends above the budget by less than the
    margin's worth, and the final cut lands exactly on the budget (at most it, within 2 % below)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(400, generator=gen, dtype=torch.float64)
    eta, steps, reach = 0.01, 400, 300
    budget = keep * g.numel()
    c = Controller.starting_at(g.numel(), budget, reach, initial_lambda([g], keep * 1.05, [eta] * reach))
    worst = 0.0
    for step in range(1, steps + 1):
        g = g - eta * 0.5 * torch.randn(g.shape, generator=gen, dtype=torch.float64)  # the loss's pull: noise
        before, g = g, torch.sign(g) * (g.abs() - c.lam * eta).clamp(min=0)
        g = floor({"g": before}, {"g": g}, {"g": 1}, budget)[0]["g"]
        count = int(torch.count_nonzero(g))
        assert count >= budget
        worst = max(worst, abs(c.error(count, step)))
        c.update(count, step)
    assert worst < 0.15  # the count never strays more than 15 % of the start from the path
    assert budget <= count <= 1.25 * budget, (count, budget)
    cut, n = final_cut({"g": g}, {"g": 1}, budget)
    kept = int(torch.count_nonzero(cut["g"]))
    assert 0.98 * budget <= kept <= budget and n == count - kept


def test_the_floor_puts_back_what_a_step_zeroed_largest_first() -> None:
    before = {"a": torch.tensor([0.5, -0.1, 0.0, 2.0], dtype=torch.float64),
              "b": torch.tensor([0.3, -0.3, 0.05], dtype=torch.float64)}
    after = {"a": torch.tensor([0.4, 0.0, 0.0, 1.9], dtype=torch.float64),
             "b": torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)}
    # 2 alive, budget 4: of those this step zeroed (a[1], b[0], b[1], b[2]; a[2] was zero already) the two largest
    # |g| come back at their values before the step: the tie |0.3| by name and index, b[0] then b[1]
    out, n = floor(before, after, {"a": 1, "b": 1}, budget=4)
    assert n == 2 and out["a"].tolist() == [0.4, 0.0, 0.0, 1.9] and out["b"].tolist() == [0.3, -0.3, 0.0]
    out, n = floor(before, after, {"a": 10, "b": 3}, budget=26)  # 20 alive: b[0] → 23, b[1] → 26: enough
    assert n == 2 and out["b"].tolist() == [0.3, -0.3, 0.0]
    same, n = floor(before, after, {"a": 1, "b": 1}, budget=2)
    assert n == 0 and all(torch.equal(same[k], after[k]) for k in after)
