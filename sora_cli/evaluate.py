"""`sora eval`: score any checkpoint (final/, best/, checkpoints/step-N/, a pruned copy) on its run's data or a file.

The recipe is the run's recipe.yaml (found above the checkpoint) or `--recipe`, with the same `KEY=VALUE`
overrides as `sora train`. The task comes from the checkpoint's own task block, so the label count and names are
the ones its head was trained with. Everything else is what the engine does at the end of training: the same
encoding, batch size, device, autocast and `task.evaluate`, so a checkpoint scores exactly what training recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from sora_cli.adapters.method import adapters_disabled
from sora_cli.checkpoint import load_adapter
from sora_cli.dist import SINGLE
from sora_cli.engine import check_length, eval_context, pick_device
from sora_cli.errors import InputError
from sora_cli.models import load_adapted
from sora_cli.recipe import DataConfig, load_recipe
from sora_cli.tasks import GLUE, EncodedSplits, EvalContext, Task, task_from_meta

RECIPE = "recipe.yaml"
SPLITS = ("dev", "test")


def evaluate_checkpoint(ckpt: Path, overrides: list[str], *, split: str = "test", data_file: Path | None = None,
                        base: bool = False, recipe_path: Path | None = None) -> dict[str, Any]:
    """Evaluate `ckpt` (its adapter, or with `base` its untouched base model) on one split of its run's data, or on
    every record of `data_file`; return a JSON-ready report. Bad input raises InputError / CheckpointError."""
    if split not in SPLITS:
        raise InputError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    # The cheap checks first, in the order the user gave things: the checkpoint, the recipe, the data.
    _, meta = load_adapter(ckpt)
    recipe = load_recipe(recipe_path if recipe_path is not None else find_recipe(ckpt), overrides)
    if recipe.edit is not None:
        raise InputError(f"{ckpt}: a knowledge-editing adapter; sora train scored its edits (edits.jsonl and "
                         "summary.json beside it), and sora eval scores splits of a training set, which edits lack")
    data_cfg, split = (recipe.data, split) if data_file is None else (file_data(recipe.data, data_file), "dev")
    source = data_source(data_cfg, split)
    device = pick_device(recipe.train.device, SINGLE)
    task = task_from_meta(meta, data_cfg, str(ckpt))
    task.load_data()
    check_labels(task.meta(), meta["task"], source)
    model, tokenizer, _ = load_adapted(ckpt)
    model.to(device)
    check_length(model, recipe.data.max_length)
    examples = pick_split(task.encode(tokenizer, recipe.data.max_length), split, source)
    metrics = score(task, model, examples, eval_context(recipe, device, tokenizer), base)
    return {"checkpoint": str(ckpt), "model": "base" if base else "adapter", "method": meta["method"],
            "base_model": meta["base_model"], "task": meta["task"]["type"],
            "split": "all" if data_file is not None else split, "data": source, "examples": len(examples),
            "metrics": metrics, "step": meta["step"]}


def find_recipe(ckpt: Path) -> Path:
    """The run's recipe.yaml: final/, best/ and pruned copies sit in the run directory (one level up), a step
    checkpoint in <run>/checkpoints/ (two levels up). Resolved first, so `sora eval .` looks above the cwd."""
    here = ckpt.resolve()
    for run_dir in (here.parent, here.parent.parent):
        if (run_dir / RECIPE).is_file():
            return run_dir / RECIPE
    raise InputError(f"{ckpt}: no {RECIPE} in {here.parent} or {here.parent.parent} (the run directory of a "
                     "checkpoint); pass the recipe it was trained with: --recipe FILE")


def file_data(data: DataConfig, data_file: Path) -> DataConfig:
    """The recipe's data section reading every record of `data_file` as the dev split: a validation file stops the
    task from cutting the file into train/dev/test; train (needed by the loader, and where string labels get their
    ids) is the same file, capped at one example so that it is not encoded twice."""
    if not data_file.is_file():  # named as the option the user gave, not as the recipe field it becomes
        raise InputError(f"--data: file not found: {data_file}")
    return dataclasses.replace(data, dataset=None, train_file=str(data_file), validation_file=str(data_file),
                               test_file=None, max_train_samples=1, glue_split="glue")  # not the paper's cut


def data_source(data: DataConfig, split: str) -> str:
    """Where a split's examples come from, for the report: its own file, else what the task cuts it from."""
    own = data.validation_file if split == "dev" else data.test_file
    if own or data.dataset or data.train_file:
        return str(own or data.dataset or data.train_file)
    return f"{GLUE[data.task].hub_id} ({data.task})" if data.task in GLUE else "data"


def check_labels(found: dict[str, Any], recorded: dict[str, Any], source: str) -> None:
    """Refuse data whose labels map to other class ids than the checkpoint's head (the metrics would be
    meaningless): string labels get their ids from the sorted names in the data, integer labels are the ids."""
    names, want = found.get("label_names"), recorded.get("label_names")
    if names != want:
        shown = [", ".join(map(str, n)) if n else "integer ids" for n in (names, want)]
        raise InputError(f"{source}: its labels ({shown[0]}) are not the checkpoint's ({shown[1]}); evaluate data "
                         "with the labels the checkpoint was trained on, every one of them")
    count, head = found.get("num_labels"), recorded.get("num_labels")
    if count is not None and head is not None and count > head:
        raise InputError(f"{source}: has label {count - 1}, but the checkpoint's head has {head} labels "
                         f"(0..{head - 1})")


def pick_split(splits: EncodedSplits, split: str, source: str) -> Any:
    """The encoded split asked for, or an error naming it and the splits the data has."""
    data = getattr(splits, split)
    if data is None:
        have = ", ".join(name for name in ("train", "dev", "test") if getattr(splits, name) is not None)
        hint = "; give data.test_file or three data.split fractions, or use --split dev" if split == "test" else ""
        raise InputError(f"--split {split}: the data ({source}) has no {split} split, only {have}{hint}")
    return data


def score(task: Task, model: nn.Module, data: Any, ctx: EvalContext, base: bool) -> dict[str, float]:
    """The task's metrics of the adapted model, or of its base: the same model with every adapted layer computing
    W0 x + b (the trained head, if any, stays), which needs no second copy of the weights."""
    with adapters_disabled(model) if base else contextlib.nullcontext():
        return task.evaluate(model, data, ctx)
