"""The collapse detector on hand-written loss sequences and labels."""

from __future__ import annotations

import math

import pytest

from sora_cli.collapse import BACK, BELOW, LossWatch, constant, label_entropy, label_variance

LN2 = math.log(2)


def watch(losses: list[float], chance: float = LN2) -> list[tuple[int, int]]:
    """(step, start step) of every collapse reported, windows logged every 10 steps."""
    w = LossWatch(chance)
    return [(10 * (i + 1), c.step) for i, x in enumerate(losses) if (c := w.update(10 * (i + 1), x)) is not None]


def test_chance_levels_by_hand() -> None:
    assert label_entropy([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert label_entropy([0, 1, 2] * 5) == pytest.approx(math.log(3))
    assert label_entropy([1] * 7) == 0.0
    assert label_variance([1.0, 2.0, 3.0, 6.0]) == pytest.approx((4 + 1 + 0 + 9) / 4)
    assert (BELOW * LN2, BACK * LN2) == pytest.approx((0.5545, 0.6585), abs=1e-4)


def test_a_loss_back_at_chance_for_five_windows_after_falling_is_a_collapse() -> None:
    # falls to 0.45 by step 40, back at 0.69 from step 60: reported at step 100, the 5th window at chance
    losses = [0.69, 0.60, 0.50, 0.45, 0.52, 0.69, 0.70, 0.69, 0.66, 0.693, 0.69, 0.69]
    assert watch(losses) == [(100, 60)]  # once: later windows at chance report nothing more


def test_four_windows_at_chance_are_not_yet_a_collapse() -> None:
    assert watch([0.5, 0.69, 0.69, 0.69, 0.69, 0.40]) == []


def test_a_slow_start_at_chance_is_not_a_collapse() -> None:
    assert watch([0.693] * 20 + [0.65, 0.60, 0.55, 0.50]) == []
    assert watch([0.693] * 8 + [0.56] * 3) == []  # 0.56 > 0.8 ln 2: never clearly below, however long


def test_a_noisy_plateau_that_touches_chance_resets() -> None:
    noisy = [0.50] + [0.68, 0.68, 0.60, 0.68, 0.68, 0.68, 0.64, 0.68, 0.68, 0.68, 0.68] + [0.55]
    assert watch(noisy) == []  # at most four windows in a row at or above 0.6585


def test_a_collapse_on_three_classes_and_non_finite_losses() -> None:
    ln3 = math.log(3)
    assert watch([0.8, 0.6] + [1.09] * 5, chance=ln3) == [(70, 30)]
    assert watch([0.5, float("nan"), float("inf")] + [0.69] * 4) == []  # a non-finite window is not counted
    assert watch([0.5] + [0.69] * 6, chance=0.0) == []  # one label only: no chance level to come back to


def test_constant_predictions() -> None:
    assert constant([1, 1, 1]) and constant(["positive"] * 4)
    assert not constant([1, 0, 1]) and not constant([1])
