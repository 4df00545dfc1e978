"""The divergence guard: a step whose loss or gradient is not finite is never applied, never logged as a number,
never saved; train.on_nonfinite stop ends the run there with one line (exit 1), skip drops the step and goes on.

A NaN is injected into one chosen step's loss (the task's loss_sum, wrapped), so the step is known; a real
divergence (LoRA at lr 1e30) checks the CLI's line and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sora_cli.checkpoint import save_adapter
from sora_cli.engine import train
from sora_cli.errors import DivergedError, SoraError
from sora_cli.recipe import load_recipe
from sora_cli.tasks.classification import ClassificationTask
from tests.conftest import events

SETTINGS: dict[str, Any] = {"adapter": {"method": "lora", "r": 4, "alpha": 8, "sparse_lambda": None},
                            "train": {"max_steps": 6, "save_every": 1, "log_every": 1, "eval_every": 100,
                                      "keep_last": 10, "weight_decay": 0.0}}


def poison(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The loss of each of these optimizer steps (1-based; one micro-batch a step) becomes NaN."""
    original = ClassificationTask.loss_sum
    calls = {"n": 0}

    def loss_sum(self: ClassificationTask, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * float("nan") if calls["n"] in steps else loss

    monkeypatch.setattr(ClassificationTask, "loss_sum", loss_sum)


def adapter(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / name / "adapter.safetensors")


def test_stop_ends_the_run_at_the_step_with_the_last_checkpoint_whole(make_recipe: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(make_recipe(**SETTINGS))
    out = Path(recipe.train.output_dir or "")
    poison(monkeypatch, {4})
    with pytest.raises(DivergedError) as e:
        train(recipe)
    assert str(e.value).startswith("step 4: the loss is nan and the gradient norm nan (the step's first example: "
                                   "training example ")
    assert str(e.value).endswith(f"not applied, and the run stopped (train.on_nonfinite: stop). --resume continues "
                                 f"from the last checkpoint, {out / 'checkpoints' / 'step-3'}; lower train.lr, or "
                                 "set train.on_nonfinite: skip to drop such steps")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert not (out / "final").exists() and not (out / "best").exists()
    assert [(x["step"], x["loss"]) for x in events(out, "nonfinite")] == [(4, "nan")]
    assert [x["step"] for x in events(out, "train")] == [1, 2, 3]
    monkeypatch.undo()  # --resume continues from step-3 and finishes
    result = train(load_recipe(make_recipe(**SETTINGS)), resume=True)
    assert result.resumed_from == 3 and all(bool(torch.isfinite(v).all()) for v in adapter(out, "final").values())


def test_skip_drops_the_steps_update_and_goes_on(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(make_recipe(adapter=SETTINGS["adapter"], train={**SETTINGS["train"], "on_nonfinite": "skip"}))
    out = Path(recipe.train.output_dir or "")
    poison(monkeypatch, {3})
    result = train(recipe)
    assert result.step == 6 and (out / "final").is_dir()
    before, after, later = (adapter(out, f"checkpoints/step-{k}") for k in (2, 3, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing (no weight decay)
    assert any(not torch.equal(after[k], later[k]) for k in after)  # step 4 did
    assert [(x["step"], x["in_a_row"]) for x in events(out, "nonfinite")] == [(3, 1)]
    assert [x["step"] for x in events(out, "train")] == [1, 2, 4, 5, 6]  # no window of step 3 alone: nothing to log


def test_skip_stops_after_max_nonfinite_in_a_row(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(make_recipe(adapter=SETTINGS["adapter"], train={**SETTINGS["train"], "on_nonfinite": "skip",
                                                                          "max_nonfinite": 2}))
    poison(monkeypatch, {2, 4, 5})
    with pytest.raises(DivergedError, match=r"^step 5: .*the run stopped \(2 such steps in a row "
                                            r"\(train.max_nonfinite: 2\)\)"):
        train(recipe)


def test_a_real_divergence_is_one_line_and_exit_1(make_recipe: Any) -> None:
    """LoRA at lr 1e30: the first step's update is finite but enormous, the second step's loss is not."""
    recipe = make_recipe(adapter=SETTINGS["adapter"], train={"lr": 1e30, "max_steps": 4, "save_every": 1})
    p = subprocess.run([sys.executable, "-m", "sora_cli", "train", str(recipe)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: step 2: the loss is nan"), p.stderr
    out = Path(load_recipe(recipe).train.output_dir or "")
    assert not (out / "final").exists() and (out / "checkpoints" / "step-1").is_dir()
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())  # strict JSON


def test_no_adapter_file_is_written_with_a_non_finite_tensor(tmp_path: Path) -> None:
    with pytest.raises(SoraError, match=r"^adapter not saved: x.lora_B holds non-finite values \(NaN or infinity\)$"):
        save_adapter(tmp_path, {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.tensor([[1.0], [float("inf")]])}, {})
    assert list(tmp_path.iterdir()) == []
