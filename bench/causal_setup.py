"""The causal quickstart as a bench setup: SmolLM2-135M-Instruct on the packaged instruction data (ASSETS.md), or
with `smoke` a tiny random Llama on a few dozen made-up reviews.

It offers what bench/common.py's contestants and training loop read from a classification `Setup` (the base model
per seed, the target Linears, no trained head, the task whose loss and collate every contestant uses), and scores
the held-out split as `sora train` does: greedy exact match and the two answers' likelihoods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch
from torch import nn

from sora_cli.adapters.inject import select_targets
from sora_cli.models import load_model
from sora_cli.recipe import load_recipe
from sora_cli.tasks.causal_lm import CausalData, CausalLMTask
from sora_cli.tasks.task import EvalContext

RECIPE = common.REPO / "recipes" / "quickstart-causal.yaml"


@dataclass
class CausalSetup:
    description: str
    tokenizer: Any
    train: CausalData
    test: CausalData
    split: str
    targets: list[str]
    device: torch.device
    task: CausalLMTask
    model: nn.Module  # loaded once: a causal LM has no freshly initialised head, so every seed shares it
    heads: list[str] = dataclasses.field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def base(self, seed: int) -> nn.Module:
        return self.model


def settings(smoke: bool, seeds: tuple[int, ...], steps: int | None = None) -> common.Settings:
    """The causal quickstart's run shape. Learning rates: SoRA the recipe's; LoRA and AdaLoRA their MiniLM dev
    optimum (common.LORA_LR, ADALORA_LR), not tuned on this task."""
    recipe = load_recipe(RECIPE)
    t = recipe.train
    return common.Settings(recipe=recipe, steps=steps or (6 if smoke else int(t.max_steps or 0)),
                           batch_size=t.batch_size, max_length=recipe.data.max_length, warmup_ratio=t.warmup_ratio,
                           seeds=seeds, lrs={"sora-r8": t.lr, "peft-lora": common.LORA_LR,
                                             "peft-adalora": common.ADALORA_LR})


def smoke_data(workdir: Path) -> tuple[str, Path]:
    """A tiny random Llama and 64 one-word-answer records in the quickstart's alpaca columns."""
    sys.path.insert(0, str(common.REPO / "tests"))
    from tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

    model = save_tiny_causal_model(workdir / "tiny-llama", tiny_causal_tokenizer())
    words = ["good", "bad", "great", "awful"] * 16
    rows = [{"instruction": "classify the sentiment of this review", "input": f"the film was {w}",
             "output": "positive" if w in ("good", "great") else "negative"} for w in words]
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(model), data


def load_setup(s: common.Settings, smoke: bool, workdir: Path, device: str = "cpu") -> CausalSetup:
    recipe = s.recipe
    data, model_config = recipe.data, recipe.model
    if smoke:
        path, file = smoke_data(workdir)
        model_config = dataclasses.replace(model_config, name_or_path=path)
        data = dataclasses.replace(data, dataset=None, train_file=str(file), max_eval_samples=8)
    task = CausalLMTask(data)
    task.load_data()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_config, task)
    splits = task.encode(tokenizer, s.max_length)
    held = splits.test if splits.test is not None else splits.dev
    assert splits.train is not None and held is not None
    name = "tiny random Llama, made-up reviews" if smoke else f"{model_config.name_or_path} on {data.dataset}"
    return CausalSetup(description=f"{name}: {len(splits.train):,d} train / {len(held):,d} test",
                       tokenizer=tokenizer, train=splits.train, test=held, split="test",
                       targets=select_targets(model, recipe.adapter.target_modules, []),
                       device=torch.device(device), task=task, model=model.to(device))


@torch.inference_mode()
def held_out(model: nn.Module, setup: CausalSetup, batch_size: int) -> dict[str, float]:
    """The held-out split's metrics (exact_match, choice_accuracy, loss, ...), scored as `sora train` scores them."""
    model.eval()
    ctx = EvalContext(batch_size=batch_size, device=setup.device, autocast=contextlib.nullcontext(),
                      tokenizer=setup.tokenizer)
    return setup.task.score(setup.task.predict(model, setup.test, ctx))
