"""Run-directory policy: a fresh run, `--resume`, `--overwrite`; the metrics log; what resume restores.

    <run>/recipe.yaml  metrics.jsonl  checkpoints/step-N/  best/  final/

An existing directory is never touched without --resume or --overwrite, and never deleted unless it holds a sora run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from sora_cli import render
from sora_cli.checkpoint import (
    load_adapter,
    load_training_state,
    optimizer_from_files,
    recover,
    rng_from_files,
    step_checkpoints,
    write_text_atomic,
)
from sora_cli.errors import CheckpointError, InputError, SoraError
from sora_cli.recipe import Recipe, dump_recipe, load_recipe, recipe_diff

METRICS = "metrics.jsonl"


def check_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber anything; return True when there is a run to resume. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise InputError(f"train.output_dir: {out} exists and is not a directory; choose another --output-dir")
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; give one")
    exists = out.is_dir() and any(out.iterdir())
    is_run = (out / "recipe.yaml").is_file()
    if exists and not is_run:  # never write into, or delete, a directory that is not a sora run
        raise InputError(f"train.output_dir: {out} is not empty and holds no sora run (no recipe.yaml); "
                         "choose another --output-dir")
    if exists and not (resume or overwrite):
        raise InputError(f"train.output_dir: {out} already holds a run; continue it with --resume, "
                         "replace it with --overwrite, or choose another --output-dir")
    if resume and is_run:
        try:
            previous = load_recipe(out / "recipe.yaml")
        except SoraError as e:
            raise CheckpointError(f"{out / 'recipe.yaml'}: unreadable ({e}); cannot resume this run") from None
        changed = [f for f in recipe_diff(previous, recipe) if f != "train.output_dir"]  # a moved run is fine
        if changed:
            raise InputError(f"--resume: the recipe differs from the run's recipe.yaml in {', '.join(changed)}; "
                             "resume with the same recipe, or start a new run")
    return resume and is_run


def start_fresh(out: Path, recipe: Recipe, has_run: bool, overwrite: bool) -> None:
    """A new run in `out`: replace an old run (only with --overwrite), write recipe.yaml and an empty log."""
    if has_run:
        render.note(f"{out}: no complete checkpoint yet; starting at step 0")
    elif out.exists() and overwrite:
        shutil.rmtree(out)  # only ever a sora run: check_run_dir saw its recipe.yaml
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "best", "final"):
        shutil.rmtree(out / stale, ignore_errors=True)
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe, f"sora train {out / 'recipe.yaml'} --resume"))
    (out / METRICS).write_text("")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from, and test events (all are logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
            if event.get("step", 0) <= step and event.get("event") != "test":
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as written (a killed run keeps what it logged); with
    `tensorboard`, the same numbers as TensorBoard scalars (tag `<event or split>/<name>`, at the event's step)."""

    def __init__(self, path: Path, tensorboard: Path | None = None):
        self._file: IO[str] = open(path, "a")
        self._board: Any = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked by the engine before anything is written

            self._board = SummaryWriter(str(tensorboard))

    def emit(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        if self._board is not None:
            group = event.get("split") or event.get("checkpoint") or event["event"]
            prefix = f"{event['event']}_{group}" if event["event"] == "test" else group
            for key, value in event.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._board.add_scalar(f"{prefix}/{key}", value, event.get("step", 0))
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: adapter tensors and the trained heads, under state-dict names."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = set(trainable_tensors(model))
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise CheckpointError(f"{where}: does not match this recipe's adapter ({'missing' if missing else 'extra'} "
                              f"tensor {name}); resume with the recipe that made it")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(value)


def resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           fingerprints: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]] | None:
    """Load the newest readable step checkpoint (falling back to older ones) into the model, optimizer and RNGs;
    return (its step, the saved counters, the saved method state), or None when there is none."""
    recover(out)
    recover(out / "checkpoints")
    damaged: list[str] = []
    for step_no, ckpt in reversed(step_checkpoints(out)):
        try:
            tensors, meta = load_adapter(ckpt)
            state_tensors, state = load_training_state(ckpt)
        except CheckpointError as e:
            render.note(f"skipping damaged checkpoint: {e}")
            damaged.append(str(e))
            continue
        for key, value in fingerprints.items():
            if meta.get(key) != value:
                what = "base model's adapted weights" if key == "base_fingerprint" else "training data"
                raise CheckpointError(f"{ckpt}: the {what} changed since this run started; resume with the "
                                      "same model and data, or start a new run")
        load_trainable(model, tensors, ckpt)
        optimizer_from_files(optimizer, state_tensors, state["optimizer"])
        rng_from_files(state_tensors, state["rng"])
        render.note(f"resuming {out} from step {step_no} ({ckpt.name})")
        method_state = {k.removeprefix("method."): v for k, v in state_tensors.items() if k.startswith("method.")}
        return step_no, state["counters"], method_state
    if damaged:  # never start over on top of checkpoints the user may still want
        raise CheckpointError(f"{out}: no readable checkpoint to resume from ({damaged[0]}); "
                              "start over with --overwrite")
    return None


def start_from(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> None:
    """A new run that continues another's adapter; with a step checkpoint, its optimizer state too."""
    tensors, meta = load_adapter(directory)
    if meta.get("base_fingerprint") != fingerprint:
        raise CheckpointError(f"{directory}: was trained on another base model (fingerprint differs); "
                              "start from a checkpoint of this recipe's model")
    load_trainable(model, tensors, directory)
    if (directory / "training_state.json").is_file():
        state_tensors, state = load_training_state(directory)
        optimizer_from_files(optimizer, state_tensors, state["optimizer"])
