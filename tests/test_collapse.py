"""The collapse detector on hand-written loss sequences and labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sora_cli.checkpoint import step_checkpoints
from sora_cli.cli import app
from sora_cli.collapse import BACK, BELOW, LossWatch, constant, label_entropy, label_variance

from .conftest import events

runner = CliRunner()

LN2 = math.log(2)


def watch(losses: list[float], chance: float = LN2) -> list[tuple[int, int]]:
    """(last step of the window that reported it, the step it began) of every collapse; windows of 10 steps."""
    w = LossWatch(chance)
    return [(10 * (i + 1), c.step) for i, x in enumerate(losses) if (c := w.update(10 * i + 1, x)) is not None]


def test_chance_levels_by_hand() -> None:
    assert label_entropy([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert label_entropy([0, 1, 2] * 5) == pytest.approx(math.log(3))
    assert label_entropy([1] * 7) == 0.0
    assert label_variance([1.0, 2.0, 3.0, 6.0]) == pytest.approx((4 + 1 + 0 + 9) / 4)
    assert (BELOW * LN2, BACK * LN2) == pytest.approx((0.5545, 0.6585), abs=1e-4)


def test_a_loss_back_at_chance_for_five_windows_after_falling_is_a_collapse() -> None:
    # falls to 0.45 by step 40, back at 0.69 from step 51: reported at step 100, the 5th window at chance
    losses = [0.69, 0.60, 0.50, 0.45, 0.52, 0.69, 0.70, 0.69, 0.66, 0.693, 0.69, 0.69]
    assert watch(losses) == [(100, 51)]  # once: later windows at chance report nothing more


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
    assert watch([0.8, 0.6] + [1.09] * 5, chance=ln3) == [(70, 21)]
    assert watch([0.5, float("nan"), float("inf")] + [0.69] * 4) == []  # a non-finite window is not counted
    assert watch([0.5] + [0.69] * 6, chance=0.0) == []  # one label only: no chance level to come back to


def test_constant_predictions() -> None:
    assert constant([1, 1, 1]) and constant(["positive"] * 4)
    assert not constant([1, 0, 1]) and not constant([1])


def test_a_classifier_answering_one_class_is_marked() -> None:
    import numpy as np

    from sora_cli.recipe import DataConfig
    from sora_cli.render import constant_rows
    from sora_cli.tasks.classification import ClassificationTask

    task = ClassificationTask(DataConfig(train_file="x.csv"), "classification", 2, None)
    labels = np.array([0, 1, 1, 0])
    one_class = task.score({"logits": np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]]), "labels": labels})
    assert one_class == {"accuracy": 0.5, "f1": pytest.approx(2 / 3), "matthews": 0.0, "constant_predictor": 1.0}
    mixed = task.score({"logits": np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]]), "labels": labels})
    assert "constant_predictor" not in mixed
    assert constant_rows({"final/": ({}, one_class), "best/": (mixed, mixed)}) == [
        ("warning", "final/ gives every example the same prediction: a constant predictor")]


def test_a_causal_lm_answering_alike_is_marked() -> None:
    import numpy as np

    from sora_cli.recipe import DataConfig
    from sora_cli.tasks.causal_lm import CausalLMTask, answer_id, normalize_answer

    task = CausalLMTask(DataConfig(train_file="x.jsonl", choices=("positive", "negative")))
    task.format = "alpaca"
    n = 4

    def rows(answers: list[str], repeated: list[bool], picks: list[int]) -> dict[str, np.ndarray]:
        return {"loss": np.ones(n), "correct": np.ones(n), "tokens": np.ones(n), "exact": np.zeros(n),
                "chosen": np.zeros(n), "answer": np.array([answer_id(normalize_answer(a)) for a in answers]),
                "repeated": np.array(repeated, dtype=float), "pick": np.array(picks, dtype=float)}

    varied = ["positive", "Negative.", "negative", "positive"]
    assert "constant_predictor" not in task.score(rows(varied, [False, True, False, True], [0, 1, 1, 0]))
    same = ["Positive!", "positive", "the positive", "positive"]  # alike after normalize_answer
    assert task.score(rows(same, [False] * n, [0, 1, 1, 0]))["constant_predictor"] == 1.0
    assert task.score(rows(varied, [True] * n, [0, 1, 1, 0]))["constant_predictor"] == 1.0  # "a a a", "b b b", ...
    assert task.score(rows(varied, [False] * n, [1] * n))["constant_predictor"] == 1.0  # one choice for all


def collapsing(make_recipe: Any, name: str, on_collapse: str) -> Path:
    """LoRA on the tiny BERT with the LR warming up to 1.0 over 54 steps: the first steps learn (the loss falls
    below 0.55 by step 4), the large ones throw the loss far above ln 2 for good."""
    return make_recipe(name, adapter={"method": "lora", "sparse_lambda": None},
                       train={"lr": 1.0, "warmup_ratio": 0.9, "max_steps": 60, "log_every": 2, "eval_every": 30,
                              "save_every": 2, "keep_last": 10, "on_collapse": on_collapse})


def train_labels(run: Path) -> list[int]:
    """The run's training labels, as the engine split them."""
    from sora_cli.recipe import load_recipe
    from sora_cli.tasks import get_task

    task = get_task(load_recipe(run.parent.parent / f"{run.name}.yaml").data)
    task.load_data()
    return list(task.splits.train.labels)


def test_a_collapsing_run_warns_and_goes_on(make_recipe: Any, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(collapsing(make_recipe, "warn", "warn"))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "warn"
    [event] = events(run, "collapse")
    losses = {e["step"]: e["loss"] for e in events(run, "train")}
    assert min(losses[s] for s in losses if s < event["since"]) <= BELOW * LN2  # clearly below before ...
    assert all(losses[s] >= BACK * LN2 for s in range(event["since"] + 1, event["step"] + 1, 2))  # ... then back
    assert event["chance"] == pytest.approx(label_entropy(train_labels(run)))
    line = next(x for x in result.output.splitlines() if "has collapsed" in x)
    assert line.startswith(f"warning: step {event['step']}: the training loss has been back at the chance level or "
                           f"above since step {event['since']} (")
    assert line.endswith("try a lower train.lr (now 1) (train.on_collapse: stop ends such a run)")
    assert (run / "final" / "adapter.safetensors").is_file()


def test_a_collapsing_run_stops_with_the_last_checkpoint_before_it(make_recipe: Any, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(collapsing(make_recipe, "stop", "stop"))])
    run = tmp_path / "runs" / "stop"
    [event] = events(run, "collapse")
    kept = [step for step, _ in step_checkpoints(run)]
    assert kept and kept == [s for s in range(2, event["step"] + 1, 2) if s < event["since"]], (kept, event)
    assert result.exit_code == 1 and not (run / "final").exists()
    assert result.output.strip().splitlines()[-1].endswith(
        f"The run stopped (train.on_collapse: stop). --resume continues from the last checkpoint, "
        f"{run / 'checkpoints' / f'step-{kept[-1]}'}")
