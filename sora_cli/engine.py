"""The one training loop: prepare -> loop -> finish.

Read it top to bottom: `prepare` loads the task's data, the model and the method (nothing written yet); `train`
opens the run directory and runs the loop { forward, loss, backward, clip, optimizer step, method step (SoRA's
proximal gate step), log, eval, save }; `finish` scores the final (and best) adapter and writes final/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sora_cli import __version__, collapse, compiled, packing, pooling, quantization, render
from sora_cli.adapters import Method, adapters_disabled, get_method
from sora_cli.adapters.inject import Injection, count_parameters, inject
from sora_cli.adapters.method import Calibration
from sora_cli.checkpoint import (
    atomic_dir,
    load_adapter,
    remove_dir,
    remove_old_checkpoints,
    save_adapter,
    save_training_state,
    step_checkpoints,
)
from sora_cli.data import TrainOrder
from sora_cli.dist import SINGLE, World, current
from sora_cli.errors import CollapseError, DivergedError, InputError
from sora_cli.models import base_fingerprint, load_model, resolve_model_path
from sora_cli.optim import (
    lr_factor,
    reference_factor,
    reference_lengths,
    schedule_length,
    set_lr,
    trainable_parameters,
    warmup_length,
)
from sora_cli.recipe import Recipe, TrainConfig
from sora_cli.rundir import (
    METRICS,
    MetricsLog,
    check_run_dir,
    find_resumable,
    load_trainable,
    read_events,
    read_start,
    restore,
    start_fresh,
    start_from,
    trainable_tensors,
    truncate_metrics,
)
from sora_cli.runlock import RunLock, lock_run
from sora_cli.strategy import ONE, Strategy, choose, rank_seed
from sora_cli.tasks import EncodedSplits, EvalContext, Task, get_task


@dataclass
class RunResult:
    output_dir: Path
    step: int
    dev: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_dev: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    base_test: dict[str, float] = field(default_factory=dict)  # the base model zero-shot (tasks that score it)
    stats: dict[str, int] = field(default_factory=dict)  # the method's totals (ranks, zero gates, ...)
    trainable: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    resumed_from: int | None = None
    train_sample: dict[str, float] = field(default_factory=dict)
    best_train_sample: dict[str, float] = field(default_factory=dict)  # the memorization sample, on best/


@dataclass
class TrainState:
    """The loop's counters, saved with every step checkpoint (training_state.json) for an exact resume."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    last_dev: dict[str, float] = field(default_factory=dict)
    # the current logging window
    window_loss: float = 0.0
    window_steps: int = 0
    window_examples: int = 0
    window_tokens: int = 0  # the batches' tokens, padding excluded
    window_seconds: float = 0.0
    nonfinite: int = 0  # train.on_nonfinite skip: steps dropped in a row


class NonFiniteStep(Exception):
    """A training step's loss or gradient was not finite; nothing of the step was applied (train_step raises it)."""

    def __init__(self, loss: float, norm: float):
        super().__init__(f"loss {loss}, gradient norm {norm}")
        self.loss, self.norm = loss, norm


@dataclass
class Run:
    """Everything the loop needs, built by `prepare` before anything is written."""

    recipe: Recipe
    out: Path
    task: Task
    model: nn.Module
    tokenizer: Any
    method: Method
    injection: Injection
    data: EncodedSplits
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    order: TrainOrder
    total: int
    warmup: int
    metric: str
    ctx: EvalContext
    facts: dict[str, Any]  # fingerprints and the base model's size, for adapter.json
    strategy: Strategy = ONE  # how the run is spread over torchrun's processes (one: no other)
    # (n, main warm-up, gate warm-up) of the reference's LR schedule, for a method that asks for it (linear only)
    reference_schedule: tuple[int, int, int] | None = None
    lengths: list[int] = field(default_factory=list)  # tokens of each training item (example, or packed row)
    compiled_blocks: int = 0  # train.compile: the blocks compiled
    watch: collapse.LossWatch | None = None  # the training loss against the chance level (collapse.py)

    @property
    def world(self) -> World:
        return self.strategy.world

    def micro_batches(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int, int, int]:
        """The device batches of optimizer step `step`: this rank's slice of each global micro-batch (all of it in one
        process; a rank whose slice is empty gets no batch, or under FSDP2 a placeholder, weighted 0, put last);
        how many of them are placeholders; the step's examples and tokens (padding excluded) over every rank."""
        accum = self.recipe.train.grad_accum
        indices = [self.order.indices(step * accum + micro)[1] for micro in range(accum)]
        pad = self.tokenizer.pad_token_id
        real: list[dict[str, torch.Tensor]] = []
        idle: list[dict[str, torch.Tensor]] = []
        for mine, placeholder in map(self.strategy.batch, indices):
            if mine:
                batch = {k: v.to(self.ctx.device) for k, v in self.task.collate(self.data.train, mine, pad).items()}
                (idle if placeholder else real).append(batch)
        examples = sum(self.task.example_count(self.data.train, i) for i in indices)
        return real + idle, len(idle), examples, sum(self.lengths[k] for i in indices for k in i)

    def lr_factor(self, step: int) -> float | dict[str, float]:
        """The LR factor of optimizer step `step`: the recipe's schedule, or (a method that asks for it, with a linear
        schedule) the reference code's, whose main and gate optimizers round their warm-ups differently."""
        if self.reference_schedule is None:
            return lr_factor(step, self.total, self.warmup, self.recipe.train.lr_scheduler)
        n, main, gate = self.reference_schedule
        return {"*": reference_factor(step, n, main), "gate": reference_factor(step, n, gate)}

    def evaluate(self, data: Any) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.strategy.evaluate(self.task, self.model, data, self.ctx)
        finally:
            self.model.train(was_training)

    def save(self, directory: Path, step: int, metrics: dict[str, Any], state: TrainState | None = None) -> None:
        """An adapter checkpoint (with the training state when `state` is given), written atomically by rank 0.
        Under torchrun every rank calls it: it checks that all ranks hold the same adapter and method state, and
        gathers their RNG states into the training state."""
        tensors, method_state = trainable_tensors(self.model), self.method.state_dict()

        def write(ranks: list[dict[str, torch.Tensor]]) -> None:
            with atomic_dir(directory) as tmp:
                save_adapter(tmp, tensors, adapter_meta(self, step, metrics))
                if state is not None:
                    save_training_state(tmp, self.optimizer, dataclasses.asdict(state), method_state, ranks)

        self.strategy.save(directory, {**tensors, **{f"method.{k}": v for k, v in method_state.items()}},
                           state is not None, write)


# ---------------------------------------------------------------------------------------------
# Prepare


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, world: World = SINGLE) -> torch.device:
    if world.size > 1:
        return world.device  # cuda:LOCAL_RANK, or the CPU (dist.start checked train.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device: {name} requested but CUDA is not available; use auto or cpu")
    return torch.device(name)


def prepare(recipe: Recipe, out: Path, total_steps: int | None = None, strategy: Strategy = ONE) -> Run:
    """Data, model, adapters, optimizer, the method's setup: everything but the run directory (a failure here writes
    nothing). Under torchrun the ranks load together (a failure on any stops all of them there), the strategy places
    the model (FSDP2 shards it), then the method's setup runs, with its collectives (LoRS's gradient init sums over
    the ranks)."""
    run = strategy.load(load, recipe, out, total_steps, strategy)
    strategy.prepare(run.model, run.ctx.device)
    cfg = recipe.train
    if cfg.compile:
        run.compiled_blocks = compiled.compile_blocks(run.model, cfg.gradient_checkpointing)
    run.method.setup(run.model, run.total, calibration(run.task, run.data.train, run.tokenizer,
                                                       run.method.calibration_samples(), cfg, run.ctx, strategy.world))
    return run


def load(recipe: Recipe, out: Path, total_steps: int | None, strategy: Strategy) -> Run:
    """Everything `prepare` does but placing the model and the method's setup, with no collective (so every rank
    may fail alone). The optimizer holds the parameters themselves, which setup initialises in place."""
    cfg, world = recipe.train, strategy.world
    device = pick_device(cfg.device, world)
    if cfg.batch_size < world.size and recipe.edit is None:  # an edit's ranks may hold no request: editing/run.py
        raise InputError(f"train.batch_size: {cfg.batch_size} is the global batch, split across the {world.size} "
                         f"processes; give at least {world.size}, or launch fewer processes")
    if "tensorboard" in cfg.report_to and importlib.util.find_spec("tensorboard") is None:
        raise InputError("train.report_to: tensorboard needs the tensorboard package: pip install tensorboard "
                         '(or pip install -e ".[tensorboard]")')
    seed_everything(cfg.seed)
    task = get_task(recipe.data)
    task.load_data()
    metric = task.metric(cfg.metric_for_best)
    model, tokenizer = load_model(recipe.model, task, device)
    check_length(model, recipe.data.max_length)
    if recipe.data.packing:
        packing.check_model(model)
    method = get_method(recipe.adapter, cfg)
    base_parameters = count_parameters(model)[1]
    injection = inject(model, method, task.task_heads)
    facts = {"base_fingerprint": base_fingerprint(model, injection.targets), "data_fingerprint": task.fingerprint(),
             "base_parameters": base_parameters}
    strategy.check(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.compile:
        compiled.check(model, device, recipe.model.quantization is not None)
    data = task.encode(tokenizer, recipe.data.max_length)
    total = total_steps if total_steps is not None else schedule_length(
        cfg.max_steps, cfg.epochs, len(data.train), cfg.batch_size, cfg.grad_accum)
    ctx = eval_context(recipe, device, tokenizer)
    optimizer = method.optimizer(model)
    reference = reference_lengths(cfg.epochs, cfg.max_steps, cfg.warmup_steps, cfg.warmup_ratio, len(data.train),
                                  cfg.batch_size) if method.reference and cfg.lr_scheduler == "linear" else None
    chance = task.chance_loss(data.train)
    return Run(recipe, out, task, model, tokenizer, method, injection, data, optimizer, trainable_parameters(model),
               TrainOrder(len(data.train), cfg.batch_size, cfg.seed), total,
               warmup_length(cfg.warmup_steps, cfg.warmup_ratio, total), metric, ctx, facts, strategy, reference,
               list(data.train.lengths), watch=collapse.LossWatch(chance) if chance is not None else None)


def synchronise(run: Run) -> None:
    """Under torchrun: every rank starts from rank 0's trainable tensors, with its own dropout stream."""
    run.strategy.synchronise(run.params, run.recipe.train.seed)


def calibration(task: Task, train: Any, tokenizer: Any, samples: int, cfg: TrainConfig,
                ctx: EvalContext, world: World) -> Calibration | None:
    """`samples` training examples drawn by train.seed (its own generator: training's draws are untouched), in
    batches of train.batch_size (this rank's slice of each, under torchrun), for a method's data-driven
    initialisation; None when the method wants none."""
    if samples <= 0:
        return None
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:samples].tolist()
    pad = tokenizer.pad_token_id
    parts = [world.part(chosen[i: i + cfg.batch_size]) for i in range(0, len(chosen), cfg.batch_size)]
    batches = [{k: v.to(ctx.device) for k, v in task.collate(train, mine, pad).items()} for mine in parts if mine]
    return Calibration(batches, task.loss_sum, task.count, ctx.autocast, world)


def check_length(model: nn.Module, max_length: int) -> None:
    """Longer inputs than the model's positions would fail deep inside the model: say so up front."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max_length > positions:
        raise InputError(f"data.max_length: {max_length} is longer than the model's {positions} positions; "
                         f"use at most {positions}")


def eval_context(recipe: Recipe, device: torch.device, tokenizer: Any) -> EvalContext:
    """Evaluation's batch size, device and autocast (bf16 when train.precision says so); training's too."""
    autocast: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if recipe.train.precision == "bf16"
        else contextlib.nullcontext())
    return EvalContext(recipe.train.eval_batch_size, device, autocast, tokenizer)


def enable_checkpointing(model: Any) -> None:
    """Recompute each block's activations in backward. Non-reentrant checkpointing works on a frozen base whose
    inputs need no gradient (the reentrant kind would give the adapters none)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # a cache is useless in training and conflicts with recomputation


def adapter_meta(run: Run, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    r = run.recipe
    return {
        "sora_version": __version__,
        "method": run.method.name,
        "method_config": run.method.describe(),
        # (W0 + s·B·A) ⊙ (W0 ≠ 0): evaluation, merge and export must keep the base's zeros too
        "keep_sparsity": bool(run.method.adapter.keep_sparsity),
        "use_rslora": run.method.adapter.use_rslora,
        "base_model": r.model.name_or_path,
        "base_model_revision": r.model.revision,
        "base_model_loading": {"dtype": r.model.dtype, "gguf_file": r.model.gguf_file,
                               "trust_remote_code": r.model.trust_remote_code, "pooling": r.model.pooling,
                               "quantization": quantization.describe(r.model)},
        **run.facts,
        "task": run.task.meta(),
        "target_modules": run.injection.targets,
        "modules_to_save": run.injection.modules_to_save,
        "modules": module_meta(run.model),
        "step": step,
        "metrics": metrics,
    }


def module_meta(model: nn.Module) -> dict[str, dict[str, Any]]:
    """adapter.json's per-module entries: what `attach` and `prune` need to rebuild or cut a layer."""
    from sora_cli.adapters import adapter_layers

    return {name: {"r": m.r, "s": m.scaling, "d_in": m.in_features, "d_out": m.out_features,
                   "active_rank": m.active_rank(), "base_zeros": m.base_zeros}
            for name, m in adapter_layers(model)}


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model: nn.Module, task: Task, method: Method, optimizer: torch.optim.Optimizer,
               batches: list[dict[str, torch.Tensor]], params: list[nn.Parameter], max_grad_norm: float | None,
               autocast: contextlib.AbstractContextManager[Any], step: int, strategy: Strategy = ONE,
               idle: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step over `batches` (the micro-batches of gradient accumulation; under torchrun, this rank's
    slices of them):

        loss = Σ_ranks Σ_micro-batches task loss sum / the step's count over all ranks + method.extra_loss
        backward per micro-batch;  all-reduce the gradients (torchrun);  extra_loss backward;  method.after_backward;
        clip;  optimizer.step();  method.after_step;  zero_grad

    Dividing every micro-batch's sum by the whole step's count (not each by its own) keeps the loss unbiased when
    micro-batches, or ranks, differ in size or in label tokens. The gradients are summed over the ranks once per
    optimizer step (not per micro-batch), before the method's hooks, so SoRA's proximal step and RoseLoRA's masks
    see the whole batch's gradient on every rank; extra_loss, the same on every rank, is added after the sum.
    The last `idle` batches are placeholders (FSDP2: a rank with no examples still runs every forward and backward
    with the others), weighted 0. Returns the loss as a float64 device tensor (no host sync) and the method's
    numbers. bench/ times this very function for every contestant, PEFT's included.
    """
    real = len(batches) - idle
    count = max(strategy.total(sum(task.count(b) for b in batches[:real])), 1)
    loss = torch.zeros((), dtype=torch.float64, device=params[0].device)  # logged: never rounded to float32
    for i, batch in enumerate(batches):
        with autocast:
            part = strategy.call(model, task.loss_sum, batch) / count
        if i >= real:
            part = part * 0.0
        part.backward()
        loss += part.detach()
    loss = strategy.reduce(params, loss)
    with autocast:
        extra = method.extra_loss(model)
    if extra is not None:
        extra.backward()
        loss += extra.detach()
    norm = check_finite(loss, params, optimizer)
    method.after_backward(model, step)
    if max_grad_norm:  # gates included; with the norm just checked (after_backward changes no gradient's norm)
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    optimizer.step()
    stats = method.after_step(model, optimizer, step)
    optimizer.zero_grad(set_to_none=True)
    return loss, stats


def check_finite(loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The gradients' total norm; raise NonFiniteStep (the gradients cleared) unless the step's loss and every
    gradient are finite: checked before the method's hooks, clipping and the optimizer see them, so a non-finite
    value never reaches a weight, an optimizer state or a method's state. One host sync a step (every rank holds
    the same summed values)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if bool(torch.isfinite(loss) & torch.isfinite(norm)):
        return norm
    optimizer.zero_grad(set_to_none=True)
    raise NonFiniteStep(float(loss), float(norm))


# ---------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, init_from: Path | None = None,
          init_weights: Path | None = None, total_steps: int | None = None, lr_scale: float | None = None,
          memorization_samples: int | None = None, best_memorization: bool = False) -> RunResult:
    """Train as the recipe says. The sparsifying scheduler drives the same loop through the keywords:
    `init_from` starts a fresh run from a checkpoint's adapter (and optimizer state, if it has one), `init_weights`
    with another checkpoint's adapter instead (schedule.from_best);
    `total_steps` overrides the recipe's length (0: evaluate only); `lr_scale` replaces the LR schedule by
    a constant factor (the reference code's decayed schedule); `memorization_samples` also scores a fixed
    seeded sample of the training examples at the end ("memorization"), and with `best_memorization` on best/ too
    (the schedule's stage 0 under from_best)."""
    t0 = time.perf_counter()
    out = Path(recipe.train.output_dir or "runs/run")
    strategy = choose(recipe.train, current())
    has_run = strategy.main(check_run_dir, out, recipe, resume, overwrite)
    run = prepare(recipe, out, total_steps, strategy)
    synchronise(run)
    (state, resumed_from), lock = strategy.load(claim_run, run, has_run, overwrite, init_from, init_weights)
    try:
        return train_claimed(run, state, resumed_from, t0, lr_scale, memorization_samples, best_memorization)
    finally:
        if lock is not None:
            lock.release()


def claim_run(run: Run, has_run: bool, overwrite: bool, init_from: Path | None,
              init_weights: Path | None) -> tuple[tuple[TrainState, int | None], RunLock | None]:
    """Lock the run directory (rank 0, which alone writes it: runlock.py), then `open_run`; if opening fails the
    lock is let go, and a directory that taking it created is removed again."""
    lock = lock_run(run.out) if run.strategy.writes else None
    try:
        return open_run(run, has_run, overwrite, init_from, init_weights), lock
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise


def train_claimed(run: Run, state: TrainState, resumed_from: int | None, t0: float, lr_scale: float | None,
                  memorization_samples: int | None, best_memorization: bool) -> RunResult:
    """`train` once the run directory is this run's: the loop, the final scores, final/."""
    recipe, out, strategy = run.recipe, run.out, run.strategy
    trainable, all_params = count_parameters(run.model)
    if state.step >= run.total or state.stopped:
        done = strategy.main(finished, out, state, trainable, t0)
        if done is not None:
            return done
    if resumed_from is not None and strategy.writes:
        truncate_metrics(out / METRICS, state.step)
    render.note(render.trainable_line(trainable, all_params))
    render.note(f"{run.method.name} on {len(run.injection.targets)} modules, r={recipe.adapter.r}; "
                f"{len(run.data.train):,d} train / {len(run.data.dev or []):,d} dev / "
                f"{len(run.data.test or []):,d} test examples; {run.total} steps on {run.ctx.device.type}"
                + (f" ({strategy.label})" if strategy.world.size > 1 else "")
                + (f"; base {render.quantization_text(q)}" if (q := quantization.describe(recipe.model)) else ""))
    log = MetricsLog(out / METRICS if strategy.writes else None,
                     out / "tensorboard" if "tensorboard" in recipe.train.report_to else None)
    try:
        loop(run, state, log, lr_scale)
        result = finish(run, state, log, memorization_samples, best_memorization)
    finally:
        log.close()
    result.trainable, result.resumed_from, result.seconds = trainable, resumed_from, time.perf_counter() - t0
    return result


def open_run(run: Run, has_run: bool, overwrite: bool, init_from: Path | None,
             init_weights: Path | None = None) -> tuple[TrainState, int | None]:
    """Resume the run in `run.out` (model, optimizer, RNGs, counters, method state), or start it fresh. Rank 0 reads
    the checkpoint and shares it; a checkpoint saved by fewer processes has no RNG state for the extra ranks, which
    start their own streams at the resumed step."""
    strategy, fingerprints = run.strategy, {k: run.facts[k] for k in ("base_fingerprint", "data_fingerprint")}
    point = strategy.main(find_resumable, run.out, fingerprints) if has_run else None
    if point is not None:
        counters, method_state, had_rng = restore(point, run.model, run.optimizer, strategy.world.rank)
        if not had_rng:
            torch.manual_seed(rank_seed(run.recipe.train.seed + point.step, strategy.world.rank))
        run.method.load_state_dict(method_state)
        return TrainState(**counters), point.step
    if init_from is not None:
        start_from(strategy.main(read_start, init_from, run.facts["base_fingerprint"], init_weights),
                   run.model, run.optimizer)
    if strategy.writes:
        start_fresh(run.out, run.recipe, has_run, overwrite)
    return TrainState(), None


def loop(run: Run, state: TrainState, log: MetricsLog, lr_scale: float | None) -> None:
    cfg = run.recipe.train
    run.model.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=run.ctx.device)  # read only when logged or saved
    with render.TrainProgress(run.total, start=state.step) as progress:
        while state.step < run.total and not state.stopped:
            started = time.perf_counter()
            set_lr(run.optimizer, lr_scale if lr_scale is not None else run.lr_factor(state.step))
            batches, idle, examples, tokens = run.micro_batches(state.step)
            try:
                loss, stats = train_step(run.model, run.task, run.method, run.optimizer, batches, run.params,
                                         cfg.max_grad_norm, run.ctx.autocast, state.step, run.strategy, idle)
                window_loss += loss
                state.window_steps, state.nonfinite = state.window_steps + 1, 0
            except NonFiniteStep as e:
                stats = {}
                skip_or_stop(run, state, log, progress, e)
            state.step += 1
            state.window_examples, state.window_tokens = state.window_examples + examples, state.window_tokens + tokens
            state.window_seconds += time.perf_counter() - started
            step = state.step
            if step % cfg.log_every == 0 or step == run.total:
                log_window(run, state, log, progress, window_loss, stats)
            else:
                progress.update(step)
            if run.data.dev is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == run.total):
                evaluate_dev(run, state, log, progress)
            if (cfg.save_every and step % cfg.save_every == 0) or step == run.total or state.stopped:
                state.window_loss += float(window_loss)  # the open window's loss is saved with the state
                window_loss.zero_()
                run.save(run.out / "checkpoints" / f"step-{step}", step, {"dev": state.last_dev}, state)
                if run.strategy.writes:
                    remove_old_checkpoints(run.out, cfg.keep_last)
            if state.stopped:
                progress.log(f"early stop at step {step}: no dev {run.metric} gain in {cfg.patience} evaluations")


def skip_or_stop(run: Run, state: TrainState, log: MetricsLog, progress: render.TrainProgress,
                 e: NonFiniteStep) -> None:
    """A step whose loss or gradient was not finite (none of it applied): logged; dropped under train.on_nonfinite
    skip, below max_nonfinite in a row; else the run stops here, its last checkpoint whole for --resume."""
    cfg = run.recipe.train
    step, first = state.step + 1, run.order.indices(state.step * cfg.grad_accum)[1][0]
    if isinstance(run.data.train, packing.PackedData):  # a packed row: name its first example
        first = run.data.train.rows[first][0]
    state.nonfinite += 1
    log.emit({"event": "nonfinite", "step": step, "loss": json_number(e.loss), "grad_norm": json_number(e.norm),
              "first_example": first, "in_a_row": state.nonfinite})
    what = (f"step {step}: the loss is {e.loss:g} and the gradient norm {e.norm:g} (the step's first example: "
            f"training example {first})")
    if cfg.on_nonfinite == "skip" and state.nonfinite < cfg.max_nonfinite:
        progress.log(f"{what}; its update dropped (train.on_nonfinite: skip, {state.nonfinite} in a row)")
        return
    why = (f"{state.nonfinite} such steps in a row (train.max_nonfinite: {cfg.max_nonfinite})"
           if cfg.on_nonfinite == "skip" else "train.on_nonfinite: stop")
    raise DivergedError(f"{what}; not applied, and the run stopped ({why}). {last_good(run)}; lower train.lr, or "
                        "set train.on_nonfinite: skip to drop such steps")


def on_collapse(run: Run, state: TrainState, log: MetricsLog, progress: render.TrainProgress,
                found: collapse.Collapse) -> None:
    """The loss is back at chance (collapse.py): logged; a warning line, or (train.on_collapse: stop) the run stops
    with the step checkpoints saved since the collapse began removed, so --resume takes the last one before it."""
    cfg = run.recipe.train
    log.emit({"event": "collapse", "step": state.step, "since": found.step, "loss": found.loss,
              "chance": found.chance})
    message = f"step {state.step}: {found.message(collapse_tip(run))}"
    if cfg.on_collapse == "warn":
        progress.log(f"warning: {message} (train.on_collapse: stop ends such a run)")
        return
    run.strategy.main(remove_checkpoints_since, run.out, found.step)
    raise CollapseError(f"{message}. The run stopped (train.on_collapse: stop). {last_good(run)}")


def collapse_tip(run: Run) -> str:
    tip = f"try a lower train.lr (now {run.recipe.train.lr:g})"
    tip += " or adapter.gate_lr" if run.method.name == "sora" else ""
    return tip + pooling.collapse_tip(resolve_model_path(run.recipe.model.name_or_path), run.recipe.model.pooling)


def remove_checkpoints_since(run_dir: Path, step: int) -> None:
    for saved, path in step_checkpoints(run_dir):
        if saved >= step:
            remove_dir(path)


def last_good(run: Run) -> str:
    """Where --resume would continue: the run's last step checkpoint (every one holds finite tensors only)."""
    saved = step_checkpoints(run.out)
    if not saved:
        return "No checkpoint was saved before it"
    return f"--resume continues from the last checkpoint, {saved[-1][1]}"


def json_number(x: float) -> float | str:
    """`x`, or its name when not finite (metrics.jsonl stays strict JSON)."""
    return x if math.isfinite(x) else str(x)


def log_window(run: Run, state: TrainState, log: MetricsLog, progress: render.TrainProgress,
               window_loss: torch.Tensor, stats: dict[str, float]) -> None:
    if state.window_steps == 0:  # every step of the window was dropped (train.on_nonfinite: skip): nothing to log
        progress.update(state.step)
        state.window_examples, state.window_tokens, state.window_seconds = 0, 0, 0.0
        return
    state.window_loss += float(window_loss)  # the one host sync, off the per-step path
    window_loss.zero_()
    totals = run.method.stats(run.model)
    event = {"event": "train", "step": state.step,
             "epoch": round(state.step * run.recipe.train.grad_accum / run.order.per_epoch, 4),
             "loss": state.window_loss / state.window_steps, "lr": run.optimizer.param_groups[0]["lr"], **stats,
             **{k: v for k, v in totals.items() if k != "max_rank"},
             **({"nonzero_gates": totals["total_gates"] - totals["zero_gates"]} if "total_gates" in totals else {}),
             "examples_per_s": round(state.window_examples / max(state.window_seconds, 1e-9), 2),
             "tokens_per_s": round(state.window_tokens / max(state.window_seconds, 1e-9), 1)}
    log.emit(event)
    progress.update(state.step, event["loss"], event["lr"], (totals["active_rank"], totals["max_rank"]))
    found = run.watch.update(state.step - state.window_steps + 1, event["loss"]) if run.watch is not None else None
    if found is not None:
        on_collapse(run, state, log, progress, found)
    state.window_loss, state.window_steps, state.window_seconds = 0.0, 0, 0.0
    state.window_examples = state.window_tokens = 0


def evaluate_dev(run: Run, state: TrainState, log: MetricsLog, progress: render.TrainProgress) -> None:
    """Score dev; keep best/ by the task's metric (in its direction); count evaluations without a gain. Every rank
    scores the same gathered rows, but rank 0's decision is the one all ranks follow (none can stop alone)."""
    cfg = run.recipe.train
    state.last_dev = dev = run.evaluate(run.data.dev)
    log.emit({"event": "eval", "split": "dev", "step": state.step, **dev})
    progress.log(f"step {state.step}  dev  {render.metrics_text(dev)}")
    if dev.get("constant_predictor"):
        progress.log(f"warning: step {state.step}: the model gives every dev example the same prediction "
                     f"(a constant predictor); {collapse_tip(run)}")
    value = dev[run.metric]
    better = state.best_metric is None or (value > state.best_metric if run.task.greater_is_better(run.metric)
                                           else value < state.best_metric)
    better = run.strategy.decide(better)
    if not run.method.settled(state.step):  # SoRA before its budget's reach_at: not yet the adapter it ends with
        return
    if better:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        run.save(run.out / "best", state.step, {"dev": dev})
    else:
        state.bad_evals += 1
        state.stopped = bool(cfg.patience and state.bad_evals >= cfg.patience)  # alike on every rank, as `better`


# ---------------------------------------------------------------------------------------------
# Finish


def finish(run: Run, state: TrainState, log: MetricsLog, memorization_samples: int | None,
           best_memorization: bool = False) -> RunResult:
    """Test metrics of the final (and best) adapter; the memorization sample; final/."""
    step, data = state.step, run.data
    if data.dev is not None and not state.last_dev:  # no step ran (total 0), or resumed past the last eval
        state.last_dev = run.evaluate(data.dev)
        log.emit({"event": "eval", "split": "dev", "step": step, **state.last_dev})
    result = RunResult(run.out, step, dev=state.last_dev, best_step=state.best_step, stats=run.method.stats(run.model))
    if run.recipe.train.compile:
        report_compile(run, result, log, step)
    if data.test is not None:
        result.test = run.evaluate(data.test)
        log.emit({"event": "test", "checkpoint": "final", "step": step, **result.test})
        if run.task.scores_base:
            with adapters_disabled(run.model):
                result.base_test = run.evaluate(data.test)
            log.emit({"event": "test", "checkpoint": "base", "step": 0, **result.base_test})
    sample = memorization_sample(len(data.train), memorization_samples, run.recipe.data.split_seed,
                                 datasets_shuffle=run.recipe.data.glue_split == "sora") if memorization_samples else []
    if sample:
        result.train_sample = run.evaluate(run.task.subset(data.train, sample))
        log.emit({"event": "eval", "split": "train_sample", "step": step, "examples": len(sample),
                  "sample_sha256": hashlib.sha256(str(sample).encode()).hexdigest(), **result.train_sample})
    extra = {k: v for k, v in (("test", result.test), ("base_test", result.base_test),
                                ("train_sample", result.train_sample)) if v}
    run.save(run.out / "final", step, {"dev": result.dev, **extra})
    best = run.strategy.main(read_best_meta, run.out) if state.best_step not in (None, step) else None
    if best is not None:
        result.best_dev = best["metrics"].get("dev", {})
        score_best(run, state, log, result, sample if best_memorization else [])
    return result


def report_compile(run: Run, result: RunResult, log: MetricsLog, step: int) -> None:
    """train.compile's outcome, torch's counts for this process: graph breaks (part of a block runs in Python) and
    eager fallbacks (dynamo's recompile limit hit: a block's later variants run uncompiled)."""
    found = {"compiled_blocks": run.compiled_blocks, "graph_breaks": compiled.graph_breaks(),
             "eager_fallbacks": compiled.eager_fallbacks()}
    result.stats.update(found)
    log.emit({"event": "compile", "step": step, "blocks": found["compiled_blocks"],
              "graph_breaks": found["graph_breaks"], "eager_fallbacks": found["eager_fallbacks"]})


def score_best(run: Run, state: TrainState, log: MetricsLog, result: RunResult, sample: list[int]) -> None:
    """best/'s test metrics (and memorization on `sample`), with best/ loaded into the model: final/ is saved."""
    data = run.data
    if data.test is None and not sample:
        return
    load_trainable(run.model, run.strategy.main(read_best_tensors, run.out), run.out / "best")
    if data.test is not None:
        result.best_test = run.evaluate(data.test)
        log.emit({"event": "test", "checkpoint": "best", "step": state.best_step, **result.best_test})
    if sample:  # the schedule's stage 0 with from_best records best/, which stage 1 continues
        result.best_train_sample = run.evaluate(run.task.subset(data.train, sample))
        log.emit({"event": "eval", "split": "train_sample", "checkpoint": "best", "step": state.best_step,
                  **result.best_train_sample})


def read_best_meta(out: Path) -> dict[str, Any] | None:
    path = out / "best" / "adapter.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_best_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_adapter(out / "best")[0]


def memorization_sample(n_train: int, size: int, split_seed: int, datasets_shuffle: bool = False) -> list[int]:
    """The training examples that "memorization" scores: seeded by the data split, not by train.seed, so
    every stage of a schedule (each with its own train.seed) scores the same examples. `datasets_shuffle`: the
    SoRA reference's sample, `Dataset.shuffle(seed).select(range(size))` (numpy's default_rng permutation)."""
    if datasets_shuffle:
        return np.random.default_rng(split_seed).permutation(n_train)[:size].tolist()
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))[:size].tolist()


def finished(out: Path, state: TrainState, trainable: int, t0: float) -> RunResult | None:
    """The result of a run that is already complete, from its final/ checkpoint (None: it has none yet)."""
    from sora_cli.adapters import method_class

    if not (out / "final" / "adapter.json").is_file():
        return None
    tensors, meta = load_adapter(out / "final")
    metrics = meta["metrics"]
    result = RunResult(out, state.step, dev=metrics.get("dev", {}), test=metrics.get("test", {}),
                       base_test=metrics.get("base_test", {}),
                       train_sample=metrics.get("train_sample", {}), best_step=state.best_step, trainable=trainable,
                       seconds=time.perf_counter() - t0, already_complete=True,
                       stats=checkpoint_stats(method_class(meta["method"]), tensors, meta))
    best = read_best_meta(out) if state.best_step not in (None, state.step) else None
    if best is not None:  # what finish() scored on best/, from its metrics.jsonl events
        result.best_dev = best["metrics"].get("dev", {})
        result.best_test, result.best_train_sample = best_scores(out / METRICS)
    return result


def best_scores(metrics: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(test, memorization sample) of best/ as finish() logged them last; empty where it logged none."""
    found: dict[str, dict[str, float]] = {"test": {}, "train_sample": {}}
    meta = ("event", "split", "checkpoint", "step", "examples", "sample_sha256")
    for event in read_events(metrics):
        kind = "test" if event.get("event") == "test" else event.get("split")
        if event.get("checkpoint") == "best" and kind in found:
            found[kind] = {k: v for k, v in event.items() if k not in meta}
    return found["test"], found["train_sample"]


def checkpoint_stats(method: type[Method], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, int]:
    """The method's totals from a checkpoint: ranks surviving (per the method's prune rule) and gates."""
    active = max_rank = zero = gated = 0
    for name, m in meta["modules"].items():
        alive = len(method.surviving(tensors, name, m, 0.0)) if m["r"] else 0
        active, max_rank = active + alive, max_rank + m["r"]
        if method.gate_values(tensors, name) is not None:
            zero, gated = zero + m["r"] - alive, gated + m["r"]
    totals = {"active_rank": active, "max_rank": max_rank, **method.checkpoint_totals(meta)}
    return {**totals, "zero_gates": zero, "total_gates": gated} if gated else totals
