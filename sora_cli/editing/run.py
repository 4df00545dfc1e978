"""The knowledge-editing protocol (`sora train` on a recipe with data.task_type: edit).

Modes (edit.mode):
- single: every request gets a fresh adapter (the same initial tensors each time, seeded by train.seed + its index,
  so an edit's numbers do not depend on the others), trained, scored, discarded: EasyEdit's default protocol;
- batch: all requests in one adapter, scored at the end;
- sequential: the requests one after another on the same adapter (a fresh optimizer each), all scored at the end,
  so earlier edits can be forgotten; `just_after` keeps each edit's reliability right after its own training.

An edit runs train.max_steps passes over its requests, each pass one optimizer step per train.batch_size requests
(EasyEdit's `num_steps` and `batch_size`), with the engine's own `train_step` (the method's hooks included: RoseLoRA
masks). edit.stop_loss ends an edit once a pass's mean loss is below it, from pass edit.stop_after on.

Writes <output_dir>/recipe.yaml, edits.jsonl (one line per edit, appended as it finishes: --resume continues a
single-mode run after the last complete line) and summary.json; batch and sequential also save the adapter (final/).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from sora_cli import render
from sora_cli.adapters import adapters_disabled
from sora_cli.checkpoint import write_text_atomic
from sora_cli.dist import SINGLE, World, current, on_main
from sora_cli.editing.changed import changed_weights
from sora_cli.editing.metrics import PROTOCOL, agreement, mean, predict, token_accuracy
from sora_cli.editing.requests import EditRequest
from sora_cli.engine import Run, prepare, synchronise, train_step
from sora_cli.errors import InputError
from sora_cli.optim import lr_factor, set_lr, warmup_length
from sora_cli.recipe import EditConfig, Recipe
from sora_cli.rundir import check_run_dir, start_fresh
from sora_cli.runlock import lock_run
from sora_cli.strategy import Strategy, rank_seed
from sora_cli.tasks.causal_lm import collate, left_padded, normalize_answer, stop_ids
from sora_cli.tasks.edit import EditTask, split_ids

Pair = tuple[list[int], list[int]]
METRICS = ("reliability", "generalization", "locality", "portability")


@dataclass
class Probes:
    """The token ids of one request's probes: (prompt ids, target ids) each."""

    rewrite: Pair
    rephrase: list[Pair]
    portability: list[Pair]
    locality: list[Pair]

    def pairs(self) -> list[Pair]:
        return [self.rewrite, *self.rephrase, *self.portability, *self.locality]


@dataclass
class EditResult:
    output_dir: Path
    mode: str
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Session:
    """What every edit shares: the prepared run, the requests, their probes, the unedited model's predictions."""

    run: Run
    edit: EditConfig
    requests: list[EditRequest]
    probes: list[Probes]
    base: list[list[list[int]]] = field(default_factory=list)  # per request: the unedited argmax of every probe
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # the fresh adapter's trainable tensors
    base_match: list[float] = field(default_factory=list)  # edit.exact_match: the unedited model's generations


def probes_of(tokenizer: Any, r: EditRequest) -> Probes:
    return Probes(split_ids(tokenizer, r.prompt, r.target_new),
                  [split_ids(tokenizer, p, r.target_new) for p in r.rephrase],
                  [split_ids(tokenizer, p.prompt, p.target) for p in r.portability],
                  [split_ids(tokenizer, p.prompt, p.target) for p in r.locality])


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) inside, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def predictions(s: Session, indices: list[int]) -> list[list[list[int]]]:
    """Per request in `indices`: the model's argmax at every target position of every probe (one batched pass, in
    this process)."""
    run = s.run
    flat = [pair for i in indices for pair in s.probes[i].pairs()]
    with evaluating(run.model), run.ctx.autocast:
        preds = predict(run.model, flat, run.tokenizer.pad_token_id, run.ctx.device, run.ctx.batch_size)
    out, at = [], 0
    for i in indices:
        n = len(s.probes[i].pairs())
        out.append(preds[at: at + n])
        at += n
    return out


def scores(p: Probes, preds: list[list[int]], base: list[list[int]]) -> dict[str, float | None]:
    """One request's metrics from its probes' predictions (`base`: the unedited model's, for locality)."""
    n_re, n_po = len(p.rephrase), len(p.portability)
    rest = preds[1:]
    return {
        "reliability": token_accuracy(preds[0], p.rewrite[1]),
        "generalization": mean([token_accuracy(a, t) for a, (_, t) in zip(rest[:n_re], p.rephrase)]),
        "locality": mean([agreement(a, b) for a, b in zip(rest[n_re + n_po:], base[1 + n_re + n_po:])]),
        "portability": mean([token_accuracy(a, t) for a, (_, t) in zip(rest[n_re: n_re + n_po], p.portability)]),
    }


def shared_predictions(s: Session, indices: list[int]) -> list[list[list[int]]]:
    """`predictions`, each torchrun rank scoring a share of the requests; every rank gets all of them."""
    return s.run.world.map(indices, lambda mine: predictions(s, mine))


def open_session(recipe: Recipe) -> Session:
    """Load the model and requests, inject the adapter, score the unedited model (nothing written yet)."""
    edit = recipe.edit or EditConfig()
    world = current()
    run = prepare(recipe, Path(recipe.train.output_dir or "runs/edit"), None, Strategy(world))
    synchronise(run)
    task = run.task
    assert isinstance(task, EditTask)
    s = Session(run, edit, task.requests, [probes_of(run.tokenizer, r) for r in task.requests])
    every = list(range(len(s.requests)))
    with adapters_disabled(run.model):
        s.base = shared_predictions(s, every)
        if edit.exact_match:
            s.base_match = world.map(every, lambda mine: [generated_match(s, i) for i in mine])
    s.initial = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return s


def reset_adapter(s: Session) -> None:
    with torch.no_grad():
        for name, p in s.run.model.named_parameters():
            if name in s.initial:
                p.copy_(s.initial[name])


def apply_edit(s: Session, indices: list[int], seed: int, world: World = SINGLE) -> dict[str, Any]:
    """Train the current adapter on the requests `indices` (a fresh optimizer and method state); its trace. With a
    torchrun `world`, its ranks train the one adapter together, each on its slice of every batch of requests."""
    run, cfg = s.run, s.run.recipe.train
    # dropout's draws: the same for an edit whatever ran before it (and each torchrun rank its own)
    torch.manual_seed(seed if world.main else rank_seed(seed, world.rank))
    chunks = [indices[i: i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    passes = cfg.max_steps or 1
    total = passes * len(chunks)
    run.optimizer = run.method.optimizer(run.model)
    run.method.setup(run.model, total, None)
    warmup, step, started = warmup_length(cfg.warmup_steps, cfg.warmup_ratio, total), 0, time.perf_counter()
    run.model.train()
    for done in range(1, passes + 1):
        losses = []
        for chunk in chunks:
            set_lr(run.optimizer, lr_factor(step, total, warmup, cfg.lr_scheduler))
            mine = world.part(chunk)
            batches = [{k: v.to(run.ctx.device) for k, v in
                        collate(run.data.train, mine, run.tokenizer.pad_token_id).items()}] if mine else []
            loss, _ = train_step(run.model, run.task, run.method, run.optimizer, batches, run.params,
                                 cfg.max_grad_norm, run.ctx.autocast, step, Strategy(world))
            losses.append(float(loss))
            step += 1
        if s.edit.stop_loss is not None and done > s.edit.stop_after and sum(losses) / len(losses) < s.edit.stop_loss:
            break
    return {"passes": done, "steps": step, "loss": sum(losses) / len(losses),
            "seconds": round(time.perf_counter() - started, 3)}


@torch.inference_mode()
def generated_match(s: Session, i: int) -> float:
    """1.0 when the greedy continuation of the prompt begins with target_new (both SQuAD-normalised), else 0.0:
    a generation-based score, stored under its own name, never averaged with the teacher-forced ones."""
    run, tok, model = s.run, s.run.tokenizer, cast(Any, s.run.model)
    inputs = left_padded([s.probes[i].rewrite[0]], tok.pad_token_id, run.ctx.device)
    with evaluating(run.model), run.ctx.autocast:
        out = model.generate(**inputs, max_new_tokens=run.recipe.data.max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(model, tok), temperature=None,
                             top_p=None, top_k=None)
    words = normalize_answer(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)).split()
    target = normalize_answer(s.requests[i].target_new).split()
    return float(words[: len(target)] == target)


def record(s: Session, i: int, preds: list[list[int]], trace: dict[str, Any]) -> dict[str, Any]:
    r = s.requests[i]
    item = {"index": i, "prompt": r.prompt, "target_new": r.target_new, "ground_truth": r.ground_truth,
            "pre": scores(s.probes[i], s.base[i], s.base[i]), "post": scores(s.probes[i], preds, s.base[i]), **trace}
    if s.edit.exact_match:
        item["pre"]["exact_match"], item["post"]["exact_match"] = s.base_match[i], generated_match(s, i)
    return item


def run_edits(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> EditResult:
    """Apply and score the recipe's edits as edit.mode says; write edits.jsonl and summary.json."""
    t0 = time.perf_counter()
    out = Path(recipe.train.output_dir or "runs/edit")
    edit = recipe.edit or EditConfig()
    world = current()
    has_run = on_main(check_run_dir, out, recipe, resume, overwrite, world=world)
    if has_run and edit.mode != "single":
        raise InputError(f"--resume: a {edit.mode}-mode edit run cannot continue part-way (its adapter holds every "
                         "edit so far); start it again with --overwrite")
    s = open_session(recipe)
    with lock_run(out) if world.main else contextlib.nullcontext():  # rank 0 alone writes the run directory
        return edit_claimed(s, out, recipe, has_run, overwrite, t0)


def edit_claimed(s: Session, out: Path, recipe: Recipe, has_run: bool, overwrite: bool, t0: float) -> EditResult:
    """`run_edits` once the run directory is this run's: edits.jsonl, summary.json (final/ in batch modes)."""
    edit, world = recipe.edit or EditConfig(), s.run.world
    done = on_main(read_done, out / "edits.jsonl", world=world) if has_run else {}
    if not has_run and world.main:
        start_fresh(out, recipe, has_run, overwrite)
    render.note(f"{s.run.method.name} edits {len(s.requests)} requests ({edit.mode}) on "
                f"{len(s.run.injection.targets)} modules, r={recipe.adapter.r}; {recipe.train.max_steps} passes each")
    with (out / "edits.jsonl").open("a") if world.main else contextlib.nullcontext() as log:
        records = edit_all(s, done, log)
    summary = summarize(s, records)
    if world.main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if edit.mode != "single":
        s.run.save(out / "final", sum(r["steps"] for r in records), {"edit": summary["post"]})
    return EditResult(out, edit.mode, summary, time.perf_counter() - t0)


def read_done(path: Path) -> dict[int, dict[str, Any]]:
    """The complete lines of an interrupted single-mode run's edits.jsonl (a line cut by a kill is dropped)."""
    done: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[item["index"]] = item
    write_text_atomic(path, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    return done


def edit_all(s: Session, done: dict[int, dict[str, Any]], log: Any) -> list[dict[str, Any]]:
    """Every request edited as the mode says; each record written to `log` (None: not rank 0) once it is final."""
    n, seed, world = len(s.requests), s.run.recipe.train.seed, s.run.world
    if s.edit.mode == "single":
        return edit_each(s, done, log)
    if s.edit.mode == "batch":
        trace = apply_edit(s, list(range(n)), seed, world)
        trace["seconds"] = trace["seconds"] / n  # one adapter for all: its time shared out per edit
        every = shared_predictions(s, list(range(n)))
        trace.update(changed_weights(s.run.model, type(s.run.method)))  # one adapter: counted once
        records = world.map(list(range(n)), lambda mine: [record(s, i, every[i], trace) for i in mine])
    else:
        records = []
        with render.TrainProgress(n, label="edit") as progress:
            for i in range(n):
                records.append(edit_one(s, i, world))
                records[-1]["just_after"] = records[-1].pop("post")
                progress.update(i + 1, records[-1]["loss"])
        preds_all = shared_predictions(s, list(range(n)))  # scored once more at the end: what later edits undid
        for i, r in enumerate(records):
            r["post"] = scores(s.probes[i], preds_all[i], s.base[i])
    if log is not None:
        log.write("".join(json.dumps(r) + "\n" for r in records))
    return records


def edit_one(s: Session, i: int, world: World = SINGLE) -> dict[str, Any]:
    """Request i trained into the current adapter (seeded by train.seed + i) and scored right after: its record."""
    trace = {**apply_edit(s, [i], s.run.recipe.train.seed + i, world),
             **changed_weights(s.run.model, type(s.run.method))}
    (preds,) = predictions(s, [i])
    return record(s, i, preds, trace)


def edit_each(s: Session, done: dict[int, dict[str, Any]], log: Any) -> list[dict[str, Any]]:
    """Single mode: each request on a fresh adapter. Under torchrun the ranks edit different requests at once (an
    edit's numbers depend on nothing else), rank k the k-th of each round; rank 0 logs each round in order."""
    world = s.run.world
    records = dict(done)
    pending = [i for i in range(len(s.requests)) if i not in done]
    with render.TrainProgress(len(s.requests), start=len(done), label="edit") as progress:
        for start in range(0, len(pending), world.size):
            turn = pending[start: start + world.size]
            item = None
            if world.rank < len(turn):
                i = turn[world.rank]
                reset_adapter(s)
                item = edit_one(s, i)
            for finished in [r for r in world.gather(item) if r is not None]:
                records[finished["index"]] = finished
                if log is not None:
                    log.write(json.dumps(finished) + "\n")
                    log.flush()
                progress.update(len(records), finished["loss"])
    return [records[i] for i in sorted(records)]


def per_edit(counts: list[int], mode: str) -> float | None:
    """Base weights changed: each edit's own adapter (single), or the adapter after the last edit (the others,
    whose records count cumulatively)."""
    return mean(counts) if mode == "single" or not counts else float(counts[-1])


def summarize(s: Session, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over edits (each edit's own mean first; an edit without rephrases etc. is left out of that mean)."""
    def means(key: str) -> dict[str, float | None]:
        names = (*METRICS, "exact_match") if s.edit.exact_match else METRICS
        return {m: mean([r[key][m] for r in records if r.get(key, {}).get(m) is not None]) for m in names}

    run = s.run
    return {"protocol": PROTOCOL, "mode": s.edit.mode, "method": run.method.name, "edits": len(records),
            "source": run.task.meta()["source"], "base_model": run.recipe.model.name_or_path,
            "pre": means("pre"), "post": means("post"),
            **({"just_after": means("just_after")} if s.edit.mode == "sequential" else {}),
            # single: the mean over edits; batch and sequential: what the one final adapter changes
            "changed_weights_per_edit": per_edit([r["changed_weights"] for r in records], s.edit.mode),
            "rounded_away_per_edit": per_edit([r["rounded_away"] for r in records], s.edit.mode),
            "adapted_base_weights": records[0]["adapted_base_weights"] if records else 0,
            "seconds_per_edit": mean([r["seconds"] for r in records]),
            "steps_per_edit": mean([r["steps"] for r in records])}
