"""recipes/paper/: the SoRA paper's GLUE runs and sparsifying-scheduler runs. They need the hub and a GPU, so they are
validated, not trained: each loads and resolves, carries the reference scripts' settings (TsinghuaC3I/SoRA
scripts/run_glue_sora_no_schedule.sh and run_glue_sora_schedule_dense.sh), names its command, and plans the stages
and learning-rate schedule that the reference computes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_cli.adapters import get_method
from sora_cli.adapters.inject import inject
from sora_cli.optim import reference_lengths
from sora_cli.recipe import GLUE_TASKS, Recipe, load_recipe
from sora_cli.schedule import plan

PAPER = Path(__file__).parent.parent / "recipes" / "paper"
# GLUE's training-set sizes; qqp, qnli and sst2 lose 1,000 examples to dev under data.glue_split: sora.
TRAIN = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "stsb": 5749, "mnli": 392702, "qnli": 104743,
         "rte": 2490}
DEV_FROM_TRAIN = ("qqp", "qnli", "sst2")


def n_train(task: str) -> int:
    return TRAIN[task] - (1000 if task in DEV_FROM_TRAIN else 0)


def test_every_task_has_both_recipes_and_nothing_else() -> None:
    expected = {f"{kind}-{task}.yaml" for kind in ("glue", "schedule") for task in GLUE_TASKS}
    assert {p.name for p in PAPER.glob("*.yaml")} == expected


def common(recipe: Recipe, path: Path, task: str) -> None:
    """What every paper recipe shares: the model, the reference's arithmetic and split, the adapter's shape."""
    a, d, t = recipe.adapter, recipe.data, recipe.train
    command = f"# sora {'schedule' if recipe.schedule else 'train'} recipes/paper/{path.name}"
    assert path.read_text().startswith(command)
    assert "# Paper's number: " in path.read_text()
    assert recipe.model.name_or_path == "microsoft/deberta-v3-base"
    assert (a.method, a.r, a.alpha, a.threshold, a.gate_init, a.dropout, a.gate_lr) == (
        "sora", 8, 16.0, "reference", "normal", 0.0, None)  # gate_lr None: the reference's sparse_lr = lr
    assert (d.task, d.glue_split, d.split_seed) == (task, "sora", 42)
    assert (t.lr_scheduler, t.warmup_ratio, t.weight_decay, t.max_grad_norm, t.grad_accum) == (
        "linear", 0.06, 0.1, 0.1, 1)
    assert (t.eval_every, t.save_every, t.max_steps) == (1000, 1000, None)


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_recipe_has_the_no_schedule_scripts_settings(task: str) -> None:
    path = PAPER / f"glue-{task}.yaml"
    recipe = load_recipe(path)
    common(recipe, path, task)
    a, t = recipe.adapter, recipe.train
    assert recipe.schedule is None
    assert (a.sparse_lambda, a.l1_loss_weight, recipe.data.max_length) == (3e-4, 10.0, 128)
    assert (t.lr, t.batch_size, t.epochs, t.seed) == (8e-4, 8, 20.0, 0)


def test_glue_stsb_follows_the_references_step_counts() -> None:
    """STS-B, the script's own task: 5,749 examples, batch 8, 20 epochs. The reference's schedule length is
    int(20 · 5749 / 8) = int(14372.5) = 14372; warm-up ceil(0.06 · 14372) = ceil(862.32) = 863 for A, B and the head
    and int(14372.5 · 0.06) = int(862.35) = 862 for the gates. The run itself is 20 · ceil(5749 / 8) = 14,380 steps,
    as transformers' Trainer counts epochs."""
    t = load_recipe(PAPER / "glue-stsb.yaml").train
    assert reference_lengths(t.epochs, t.max_steps, t.warmup_steps, t.warmup_ratio, 5749, t.batch_size) == (
        14372, 863, 862)
    assert plan_steps(PAPER / "schedule-stsb.yaml", 5749)[0] == 50 * math.ceil(5749 / 32)


def plan_steps(path: Path, n: int) -> list[int]:
    return [s.steps for s in plan(load_recipe(path), n)]


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_schedule_recipe_plans_the_references_stages(task: str) -> None:
    """Seven stages at ξ = np.linspace(0, 7e-4, 7) exactly (the reference's lambda_schedule linear); stage 0 is 50
    epochs of batch 32, each later stage 15 epochs at stage 0's decayed learning rate, which is 0 there."""
    path = PAPER / f"schedule-{task}.yaml"
    recipe = load_recipe(path)
    common(recipe, path, task)
    a, t, s = recipe.adapter, recipe.train, recipe.schedule
    assert s is not None
    assert (a.sparse_lambda, a.l1_loss_weight, recipe.data.max_length) == (0.0, 1e-3, 320)
    assert (t.lr, t.batch_size, t.epochs, t.seed) == (1.2e-3, 32, 50.0, 48)
    assert (s.epochs_per_stage, s.lr_reset, s.from_best, s.memorization_samples) == (15.0, False, True, 1000)
    stages = plan(recipe, n_train(task))
    per_epoch = math.ceil(n_train(task) / 32)
    assert [st.lam for st in stages] == np.linspace(0, 7e-4, 7).tolist()
    assert [st.steps for st in stages] == [50 * per_epoch] + [15 * per_epoch] * 6
    assert [st.lr_scale for st in stages] == [None] + [0.0] * 6


def test_target_modules_are_the_references_six_linears_per_layer() -> None:
    """On a DeBERTa-v2 sequence classifier (a tiny config): query/key/value, the attention output and both
    feed-forward linears of every layer, as the reference's attn@.q/k/v/proj and ff@.w1/w2; never the pooler or
    the classifier."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    recipe = load_recipe(PAPER / "glue-rte.yaml")
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48))
    injection = inject(model, get_method(recipe.adapter, recipe.train))
    layer = ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
             "attention.output.dense", "intermediate.dense", "output.dense"]
    assert injection.targets == [f"deberta.encoder.layer.{i}.{m}" for i in range(2) for m in layer]
    assert injection.modules_to_save == ["classifier"]  # the pooler too when the checkpoint lacks it (the real one)
