"""Run-directory policy: a fresh run, `--resume`, `--overwrite`; the metrics log; what resume restores.

    <run>/recipe.yaml  metrics.jsonl  checkpoints/step-N/  best/  final/

An existing directory is never touched without --resume or --overwrite, and never deleted unless it holds a sora run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
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
    remove_dir,
    rng_from_files,
    step_checkpoints,
    write_text_atomic,
)
from sora_cli.errors import CheckpointError, InputError, SoraError
from sora_cli.recipe import Recipe, dump_recipe, load_recipe, recipe_diff
from sora_cli.runlock import LOCK, check_unlocked

METRICS = "metrics.jsonl"


RESUME_FREE = ("train.output_dir", "train.strategy", "train.fsdp_cpu_offload", "train.on_nonfinite",
               "train.max_nonfinite")


def check_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber anything; return True when there is a run to resume. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise InputError(f"train.output_dir: {out} exists and is not a directory; choose another --output-dir")
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; give one")
    if out.is_dir():
        check_unlocked(out)  # a live run writing here: refused before anything loads
    # the lock, and what a writer killed before recipe.yaml existed left half-written, are no run's content
    exists = out.is_dir() and any(p.name != LOCK and not p.name.startswith((".tmp-", ".del-")) for p in out.iterdir())
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
        # a moved run is fine, and so is another way of spreading it over processes (the same adapter, the same file)
        # or another answer to a diverging step (steps that were applied were finite either way)
        changed = [f for f in recipe_diff(previous, recipe) if f not in RESUME_FREE]
        if changed:
            raise InputError(f"--resume: the recipe differs from the run's recipe.yaml in {', '.join(changed)}; "
                             "resume with the same recipe, or start a new run")
    return resume and is_run


def start_fresh(out: Path, recipe: Recipe, has_run: bool, overwrite: bool) -> None:
    """A new run in `out`: replace an old run (only with --overwrite), write recipe.yaml and an empty log."""
    if has_run:
        render.note(f"{out}: no complete checkpoint yet; starting at step 0")
    elif out.exists() and overwrite:  # only ever a sora run: check_run_dir saw its recipe.yaml
        for child in out.iterdir():
            # this run's lock stays (removing it would let another process lock a new file), and so does
            # recipe.yaml until the new one replaces it: a kill part-way leaves a run that --overwrite still takes
            if child.name not in (LOCK, "recipe.yaml"):
                remove_dir(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "best", "final"):
        remove_dir(out / stale)
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe, f"sora train {out / 'recipe.yaml'} --resume"))
    (out / METRICS).write_text("")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop events logged after the checkpoint we resume from, and test events (all are logged again)."""
    if not path.is_file():
        return
    kept = [event for event in read_events(path) if event.get("step", 0) <= step and event.get("event") != "test"]
    write_text_atomic(path, "".join(json.dumps(event) + "\n" for event in kept))


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """metrics.jsonl's events in order (none when it is absent), skipping a line cut by a kill."""
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as written (a killed run keeps what it logged); with
    `tensorboard`, the same numbers as TensorBoard scalars (tag `<event or split>/<name>`, at the event's step)."""

    def __init__(self, path: Path | None, tensorboard: Path | None = None):
        """`path` None: a log that writes nothing (a torchrun rank other than 0)."""
        self._file: IO[str] | None = open(path, "a") if path is not None else None
        self._board: Any = None
        if tensorboard is not None and path is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked by the engine before anything is written

            self._board = SummaryWriter(str(tensorboard))

    def emit(self, event: dict[str, Any]) -> None:
        if self._file is None:
            return
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
        if self._file is not None:
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


@dataclass
class Resumable:
    """A readable step checkpoint, as rank 0 read it (under torchrun it is shared with every rank)."""

    step: int
    where: Path
    tensors: dict[str, torch.Tensor]  # the adapter
    state_tensors: dict[str, torch.Tensor]  # optimizer moments, RNG states, method statistics
    state: dict[str, Any]  # training_state.json


def find_resumable(out: Path, fingerprints: dict[str, str]) -> Resumable | None:
    """The newest readable step checkpoint of the run in `out` (falling back to older ones), or None when there is
    none. Finishes or rolls back a write that a kill interrupted, so call it on one process only."""
    recover(out)
    recover(out / "checkpoints")
    damaged: list[str] = []
    for step_no, ckpt in reversed(step_checkpoints(out)):
        try:
            tensors, meta = load_adapter(ckpt)
            state_tensors, state = load_training_state(ckpt)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for key, value in fingerprints.items():
            if meta.get(key) != value:
                what = "base model's adapted weights" if key == "base_fingerprint" else "training data"
                raise CheckpointError(f"{ckpt}: the {what} changed since this run started; resume with the "
                                      "same model and data, or start a new run")
        for problem in damaged:  # said only when an older checkpoint is taken instead; else the error says it
            render.note(f"skipping damaged checkpoint: {problem}")
        render.note(f"resuming {out} from step {step_no} ({ckpt.name})")
        return Resumable(step_no, ckpt, tensors, state_tensors, state)
    if damaged:  # never start over on top of checkpoints the user may still want
        raise CheckpointError(f"{out}: no readable checkpoint to resume from ({damaged[0]}); "
                              "start over with --overwrite")
    return None


def restore(point: Resumable, model: nn.Module, optimizer: torch.optim.Optimizer,
            rank: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """Load a checkpoint into the model, optimizer and this rank's RNGs; return the saved counters, the method's
    saved state, and whether this rank's RNGs were in it (not when it was saved by fewer processes)."""
    start_from(point, model, optimizer)
    had_rng = rng_from_files(point.state_tensors, point.state["rng"], rank)
    method_state = {k.removeprefix("method."): v for k, v in point.state_tensors.items() if k.startswith("method.")}
    return point.state["counters"], method_state, had_rng


def read_start(directory: Path, fingerprint: str, weights: Path | None = None) -> Resumable:
    """A checkpoint that a new run continues (the scheduler's next stage): its adapter, and with a step checkpoint
    its optimizer state too; `weights`: the adapter from that checkpoint instead (the state still from `directory`)."""
    source = weights or directory
    tensors, meta = load_adapter(source)
    if meta.get("base_fingerprint") != fingerprint:
        raise CheckpointError(f"{source}: was trained on another base model (fingerprint differs); "
                              "start from a checkpoint of this recipe's model")
    state_tensors, state = load_training_state(directory) if (directory / "training_state.json").is_file() \
        else ({}, {})
    return Resumable(int(meta.get("step", 0)), source, tensors, state_tensors, state)


def start_from(point: Resumable, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's adapter into the model and, when it has a training state, its moments into the optimizer."""
    load_trainable(model, point.tensors, point.where)
    if point.state:
        optimizer_from_files(optimizer, point.state_tensors, point.state["optimizer"])
