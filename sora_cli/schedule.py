"""The sparsifying scheduler (SoRA, Algorithm 1): train, then keep training with a rising λ stage by
stage, recording how memorization and generalization change as parameters disappear.

    <out>/recipe.yaml  schedule.jsonl  schedule.csv
    <out>/runs/<k>/     stage k's run directory (the ordinary engine: checkpoints, exact resume)
    <out>/stages/<k>/   stage k's adapter: a checkpoint that inspect, prune and merge accept

Stage 0 is ordinary training with λ_0 (or, with `--from`, that checkpoint as it is). Stage k > 0
continues from stage k−1's adapter and optimizer state with λ_k for a fixed number of steps. With
`schedule.from_best` (the reference code) stage 1 starts from stage 0's best adapter instead of its last,
with stage 0's last optimizer state (the reference's `load_best_model_at_end` reloads the weights only).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sora_cli import render
from sora_cli.checkpoint import atomic_dir, load_adapter, step_checkpoints, write_text_atomic
from sora_cli.dist import current, on_main
from sora_cli.errors import InputError, plural
from sora_cli.optim import lr_factor, schedule_length, warmup_length
from sora_cli.recipe import Recipe, ScheduleConfig, TargetConfig, dump_recipe
from sora_cli.report import pyplot

RECORD_FIELDS = ["stage", "budget", "lambda", "steps", "nonzero_gates", "total_gates", "params", "memorization",
                 "memorization_pct", "generalization", "generalization_pct", "test", "checkpoint"]


def stage_thresholds(cfg: ScheduleConfig) -> list[float]:
    """λ_0 < … < λ_K. linear: even steps; log: even in log λ (start > 0); exp: even in exp λ (dense near stop)."""
    if cfg.thresholds is not None:
        return list(cfg.thresholds)
    start, stop, num = float(cfg.start or 0.0), float(cfg.stop or 0.0), int(cfg.num or 1)
    t = np.linspace(0.0, 1.0, num)
    if cfg.spacing == "log":
        values = np.exp(np.log(start) + t * (np.log(stop) - np.log(start)))
    elif cfg.spacing == "exp":  # log(linspace(e^start, e^stop)), computed without overflow
        with np.errstate(divide="ignore"):  # t = 0 with a far stop: log(0); the start is set below
            values = stop + np.log((1 - t) * np.exp(start - stop) + t)
    else:
        values = start + t * (stop - start)
    values[0], values[-1] = start, stop  # exact ends
    return [float(f"{v:.12g}") for v in values]  # 4.0, not 4.000000000000001 from exp(log(...))


@dataclasses.dataclass(frozen=True)
class Stage:
    k: int
    lam: float | None  # None: a budget stage, whose λ the controller finds
    steps: int
    lr: str  # how the LR behaves in this stage, for --plan
    lr_scale: float | None = None  # a constant LR factor (lr_reset: false, later stages); None: the LR schedule
    budget: float | None = None  # schedule.budgets: the fraction of the initial ranks this stage ends with


def plan(recipe: Recipe, n_train: int, from_checkpoint: bool = False) -> list[Stage]:
    cfg, t = _schedule(recipe), recipe.train
    first = schedule_length(t.max_steps, t.epochs, n_train, t.batch_size, t.grad_accum)
    later = schedule_length(cfg.steps_per_stage, cfg.epochs_per_stage or 1.0, n_train, t.batch_size, t.grad_accum)
    decayed = None if cfg.lr_reset else _decayed(recipe, first)
    values: list[tuple[float | None, float | None]] = (  # (λ, budget) of each stage
        [(None, b) for b in cfg.budgets] if cfg.budgets is not None else [(lam, None) for lam in stage_thresholds(cfg)])
    stages = []
    for k, (lam, budget) in enumerate(values):
        if k == 0:
            steps, lr = (0, "none: the given checkpoint") if from_checkpoint else (first, f"{t.lr_scheduler} schedule")
            stages.append(Stage(k, lam, steps, lr, budget=budget))
        else:
            lr = f"{t.lr_scheduler} schedule, restarted" if decayed is None else f"constant {decayed:g}× lr"
            stages.append(Stage(k, lam, later, lr, lr_scale=decayed, budget=budget))
    if cfg.reach_at is not None and cfg.reach_at >= 1:
        for stage in stages:
            if 0 < stage.steps < cfg.reach_at:
                raise InputError(f"schedule.reach_at: step {int(cfg.reach_at)} is past the end of stage {stage.k} "
                                 f"({plural(stage.steps, 'step')}); give a step up to {stage.steps}, or a fraction "
                                 "below 1")
    return stages


def train_size(recipe: Recipe) -> int:
    """Training items of the recipe's data, examples or packed rows (the stage lengths of a schedule in epochs
    depend on it); packed rows need the tokenizer, not the model."""
    from sora_cli.models import load_tokenizer
    from sora_cli.tasks import get_task

    task = get_task(recipe.data)
    task.load_data()
    if not recipe.data.packing:
        return task.train_size()
    return len(task.encode(load_tokenizer(recipe.model), recipe.data.max_length).train)


def checked_train_size(recipe: Recipe, out: Path) -> int:
    """Stage 0 prepared as the engine will (data, model, adapters: every input check) before the schedule directory
    is written or replaced; returns the training set's size in items. Costs one extra model load."""
    from sora_cli.engine import prepare

    cfg = _schedule(recipe)
    first = Stage(0, None, 0, "", budget=cfg.budgets[0]) if cfg.budgets else Stage(0, stage_thresholds(cfg)[0], 0, "")
    probe = stage_recipe(recipe, out, first)
    if probe.adapter.target is not None:  # a one-step probe: plan() checks reach_at against the stages' lengths
        probe = dataclasses.replace(probe, adapter=dataclasses.replace(
            probe.adapter, target=dataclasses.replace(probe.adapter.target, reach_at=0.5)))
    run = prepare(probe, out / "runs" / "0", total_steps=1)
    return len(run.data.train)  # what an epoch steps over: examples, or packed rows


def _schedule(recipe: Recipe) -> ScheduleConfig:
    if recipe.schedule is None:
        raise InputError("schedule: the recipe has no schedule section; add schedule.thresholds (or start, stop, "
                         "num) and schedule.steps_per_stage")
    if recipe.adapter.method != "sora":
        raise InputError(f"adapter.method: the sparsifying scheduler needs sora, not {recipe.adapter.method}")
    if recipe.edit is not None:
        raise InputError("data.task_type: the sparsifying scheduler needs a dev split to track generalization; an "
                         "edit task has none (run it with sora train)")
    return recipe.schedule


def _decayed(recipe: Recipe, first_steps: int) -> float:
    """The LR factor at the end of stage 0's schedule (the reference code keeps using it)."""
    t = recipe.train
    return lr_factor(first_steps, first_steps, warmup_length(t.warmup_steps, t.warmup_ratio, first_steps),
                     t.lr_scheduler)


def stage_recipe(recipe: Recipe, out: Path, stage: Stage) -> Recipe:
    """Stage k's own recipe: λ_k (or its budget, as adapter.target), its run directory, seed + k; later stages run
    their full length (no early stop)."""
    adapter = dataclasses.replace(recipe.adapter, sparse_lambda=stage.lam)
    if stage.budget is not None:
        reach_at = recipe.schedule.reach_at if recipe.schedule and recipe.schedule.reach_at else 0.8
        adapter = dataclasses.replace(adapter, target=TargetConfig(fraction=stage.budget, reach_at=reach_at))
    train = dataclasses.replace(recipe.train, output_dir=str(out / "runs" / str(stage.k)),
                                seed=recipe.train.seed + stage.k,
                                patience=recipe.train.patience if stage.k == 0 else None)
    return dataclasses.replace(recipe, adapter=adapter, train=train, schedule=None)


# ---------------------------------------------------------------------------------------------


def run(recipe: Recipe, out: Path, *, from_ckpt: Path | None = None, resume: bool = False,
        overwrite: bool = False) -> Iterator[dict[str, Any]]:
    """Run (or resume) every stage; yield each stage's record as it completes. Under torchrun every rank trains each
    stage; rank 0 alone reads and writes the schedule directory and shares what it read."""
    from sora_cli.engine import train

    world = current()
    cfg = _schedule(recipe)
    stages, done = on_main(open_schedule, recipe, out, from_ckpt, resume, overwrite, world=world)
    records: list[dict[str, Any]] = []
    previous: Path | None = from_ckpt
    for stage in stages:
        sub = stage_recipe(recipe, out, stage)
        run_dir = Path(sub.train.output_dir or "")
        if on_main(stage_done, out, stage, len(done), world=world):
            record = done[stage.k]
        else:
            weights = on_main(best_of_first, out, from_ckpt, world=world) if cfg.from_best and stage.k == 1 else None
            result = train(sub, resume=True, init_from=previous, init_weights=weights, total_steps=stage.steps,
                           lr_scale=stage.lr_scale, memorization_samples=cfg.memorization_samples,
                           best_memorization=cfg.from_best and stage.k == 0)
            # from_best: stage 1 continues stage 0's best/, so stage 0 keeps and records best/ (as the reference
            # scores its stage 0 after load_best_model_at_end); no best/ apart from final/: final/ is the best
            kept = "best" if cfg.from_best and stage.k == 0 and result.best_dev else "final"
            if kept == "best":
                result = dataclasses.replace(result, dev=result.best_dev, test=result.best_test,
                                             train_sample=result.best_train_sample)
            record = on_main(keep_stage, recipe, out, stage, result, from_ckpt, records, kept, world=world)
        records.append(record)
        previous = on_main(next_start, run_dir, stage, from_ckpt, world=world)
        yield record


def open_schedule(recipe: Recipe, out: Path, from_ckpt: Path | None, resume: bool,
                  overwrite: bool) -> tuple[list[Stage], list[dict[str, Any]]]:
    """Check everything, then create (or reopen) the schedule directory; the stages and the records done so far."""
    from sora_cli.rundir import check_run_dir

    check_run_dir(out, recipe, resume, overwrite)
    if from_ckpt is not None:  # a clear error now, before anything is written or deleted
        _, source = load_adapter(from_ckpt)
        if out.resolve() in from_ckpt.resolve().parents:
            raise InputError(f"--from: {from_ckpt} lies inside the schedule directory {out}; copy it out first")
        if source["method"] != "sora" or any(m.get("r_max", m["r"]) != recipe.adapter.r
                                             for m in source["modules"].values()):
            raise InputError(f"--from: {from_ckpt} is not a sora adapter with r={recipe.adapter.r} like this recipe's")
    state_file = out / "schedule_state.json"
    given = {"from": str(from_ckpt.resolve()) if from_ckpt else None}
    started = json.loads(state_file.read_text()) if resume and state_file.is_file() else given
    if started != given:
        raise InputError(f"--from: this schedule was started with --from {started['from']}; resume it with the same")
    stages = plan(recipe, checked_train_size(recipe, out), from_checkpoint=from_ckpt is not None)
    if not resume and out.exists():
        shutil.rmtree(out)  # --overwrite of a sora directory (checked above)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "recipe.yaml").is_file():
        write_text_atomic(out / "recipe.yaml", dump_recipe(recipe, f"sora schedule {out / 'recipe.yaml'} --resume"))
        write_text_atomic(state_file, json.dumps(given) + "\n")
    return stages, _read_records(out / "schedule.jsonl")


def keep_stage(recipe: Recipe, out: Path, stage: Stage, result: Any, from_ckpt: Path | None,
               records: list[dict[str, Any]], adapter: str = "final") -> dict[str, Any]:
    """Copy a finished stage's adapter (its run's final/ or best/) to stages/<k>/ and append its record to
    schedule.jsonl and .csv."""
    # --from: stage 0 is the given checkpoint itself (its own λ and metadata)
    kept = from_ckpt if stage.steps == 0 and from_ckpt is not None else result.output_dir / adapter
    with atomic_dir(out / "stages" / str(stage.k)) as tmp:
        for name in ("adapter.safetensors", "adapter.json"):
            shutil.copy2(kept / name, tmp / name)
    config = load_adapter(kept)[1].get("method_config", {})
    # --from: the checkpoint's own λ; a budget stage: the λ its controller ended with
    lam = config.get("sparse_lambda", stage.lam) if kept == from_ckpt else stage.lam
    if config.get("budget") and (kept == from_ckpt or stage.budget is not None):
        lam = config["budget"]["lambda"]
    record = _record(dataclasses.replace(stage, lam=lam, steps=result.step), out, result, recipe, records)
    _write_records(out, records + [record])
    return record


def best_of_first(out: Path, from_ckpt: Path | None) -> Path:
    """Stage 0's best adapter (schedule.from_best): its best/ by the dev metric, else its final/ (or --from's)."""
    if from_ckpt is not None:
        return from_ckpt
    first = out / "runs" / "0"
    return first / "best" if (first / "best" / "adapter.json").is_file() else first / "final"


def stage_done(out: Path, stage: Stage, recorded: int) -> bool:
    return stage.k < recorded and (out / "stages" / str(stage.k) / "adapter.json").is_file()


def next_start(run_dir: Path, stage: Stage, from_ckpt: Path | None) -> Path | None:
    """What the next stage continues: this stage's last step checkpoint (adapter and optimizer state)."""
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else (from_ckpt if stage.steps == 0 else run_dir / "final")


def _record(stage: Stage, out: Path, result: Any, recipe: Recipe, earlier: list[dict[str, Any]]) -> dict[str, Any]:
    from sora_cli.report import inspect_adapter
    from sora_cli.tasks import task_from_meta

    tensors, meta = load_adapter(out / "stages" / str(stage.k))
    report = inspect_adapter(tensors, meta)
    task = task_from_meta(meta, recipe.data)
    metric = task.metric(recipe.train.metric_for_best)
    higher = task.greater_is_better(metric)
    memorization = result.train_sample.get(metric)
    generalization = result.dev.get(metric)
    per_module = {row["module"]: {"nonzero_gates": row["rank"], "params": row["params_pruned"]}
                  for row in report["modules"]}
    return {
        "stage": stage.k, "budget": stage.budget, "lambda": stage.lam, "steps": stage.steps,
        "nonzero_gates": report["summary"]["rank"], "total_gates": report["summary"]["r"],
        "params": report["summary"]["params_pruned"],
        "memorization": memorization,
        "memorization_pct": percent_of_best(memorization, [r["memorization"] for r in earlier], higher),
        "generalization": generalization,
        "generalization_pct": percent_of_best(generalization, [r["generalization"] for r in earlier], higher),
        "test": result.test.get(metric), "checkpoint": str(out / "stages" / str(stage.k)),
        "modules": per_module,  # schedule.jsonl only; the CSV keeps the totals
    }


def percent_of_best(value: float | None, earlier: list[float | None], higher_is_better: bool) -> float | None:
    """value as % of the best so far (this one included): value/best when higher is better (accuracy), best/value
    when lower is (a loss), so 100 is always the best stage and less is worse."""
    seen = [v for v in [*earlier, value] if v is not None]
    if value is None or not seen:
        return None
    best = max(seen) if higher_is_better else min(seen)
    if higher_is_better:
        return 100 * value / best if best else None
    return 100 * best / value if value else None


def _write_records(out: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(out / "schedule.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    buffer = io.StringIO()
    budgets = any(r.get("budget") is not None for r in records)  # a λ schedule's CSV keeps its columns
    fields = RECORD_FIELDS if budgets else [f for f in RECORD_FIELDS if f != "budget"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(out / "schedule.csv", buffer.getvalue())


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # cut by a kill: that stage is redone
            break
    return records


def estimate_step_seconds(recipe: Recipe, steps: int = 4) -> float:
    """Seconds per optimizer step, from a short real run (tiny eval sets) in a temporary directory."""
    from sora_cli.engine import train

    with tempfile.TemporaryDirectory() as tmp:
        data = dataclasses.replace(recipe.data, max_eval_samples=1)
        t = dataclasses.replace(recipe.train, output_dir=tmp + "/run", log_every=1, eval_every=None, save_every=None)
        with warnings.catch_warnings(), render.console.capture():  # quiet: only the timing matters here
            warnings.simplefilter("ignore")  # a 1-example dev set makes scikit-learn warn about single labels
            train(dataclasses.replace(recipe, data=data, train=t, schedule=None), total_steps=steps)
        events = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        rates = [e["examples_per_s"] for e in events if e["event"] == "train"][1:]  # the first step warms up
    examples = recipe.train.batch_size * recipe.train.grad_accum
    return float(np.median([examples / r for r in rates])) if rates else float("nan")


def check_plot(path: Path) -> None:
    """Before any training: a --plot that could not be written fails now, not after the last stage."""
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot: {path} must be a .png file")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"--plot: {path.parent} is not a directory")
    pyplot()


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """The paper's figure: memorization and generalization (% of best so far) against surviving parameters."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    params = [r["params"] for r in records]
    for key, label in (("memorization_pct", "memorization"), ("generalization_pct", "generalization")):
        ax.plot(params, [r[key] for r in records], marker="o", label=label)
    for r in records:
        ax.annotate(f"λ={r['lambda']:g}", (r["params"], r["generalization_pct"] or 0), fontsize=7,
                    textcoords="offset points", xytext=(0, -12), ha="center")
    ax.invert_xaxis()  # parameters disappear from left to right
    ax.set_xlabel("surviving adapter parameters")
    ax.set_ylabel("% of best so far")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
