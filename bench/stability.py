"""Stability: how often SoRA, sora's LoRA and PEFT LoRA collapse to a constant predictor, by learning rate, seed
and dataset, and their test accuracy, side by side (issue 27, part 2).

    python bench/stability.py                                   # 3 datasets x 4 lrs x 5 seeds x 3 methods
    python bench/stability.py --datasets rotten_tomatoes --lrs 2e-3 --methods sora lora
    python bench/stability.py --methods sora --set adapter.gate_init=ones --tag gate-ones   # a variant's column
    python bench/stability.py --smoke                           # CI: a tiny random BERT, a few steps

Every run is the quickstart recipe (`recipes/quickstart.yaml`: all-MiniLM-L6-v2, r 8, alpha 16, all linears,
600 steps of 16, linear LR with 6% warm-up) with the dataset, method, learning rate and seed changed. SoRA and
sora's LoRA are whole `sora train` runs (the engine, its collapse watch and its test scores); PEFT LoRA is stepped by
the engine's `train_step` on the same data and split (bench/common.py), its losses read by the same watch.

A run *collapsed* when the training loss went back to the chance level after it was clearly below it (the engine's
`collapse` event: sora_cli/collapse.py) or when its final model gives every test example the same class. Each cell:
collapsed / runs, and the final model's test accuracy, mean ± std over seeds. Finished runs are kept in runs.jsonl
and skipped when the command is run again, so the grid fills in over several sittings; cells run in the order of
`--lrs` and `--datasets` (the shipped learning rate first).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from sora_cli import collapse  # noqa: E402
from sora_cli.engine import train  # noqa: E402
from sora_cli.recipe import Recipe, load_recipe  # noqa: E402
from sora_cli.rundir import read_events  # noqa: E402
from sora_cli.tasks import get_task  # noqa: E402

DATASETS = ("rotten_tomatoes", "convention_speeches", "debates_2016")
LRS = (2e-3, 4e-3, 1e-3, 5e-4)  # the quickstart's first
METHODS = ("sora", "lora", "peft-lora")
LABELS = {"sora": "SoRA", "lora": "sora LoRA", "peft-lora": "PEFT LoRA"}
AT_CHANCE = 0.01  # a final test accuracy within 1 point of the majority class's share: the run learnt nothing
LOG_EVERY = 10  # the engine's logged window (train.log_every's default): PEFT's losses are read in the same windows


def split_key(key: str) -> tuple[str, str]:
    """`sora+gate-ones` -> (`sora`, `gate-ones`): a method key is a method, or a method and a variant's `--tag`."""
    method, _, tag = key.partition("+")
    return method, tag


def base_method(key: str) -> str:
    return split_key(key)[0]


def label(key: str) -> str:
    method, tag = split_key(key)
    return LABELS[method] + (f", {tag}" if tag else "")


def recipe_for(dataset: str, key: str, lr: float, seed: int, steps: int | None, extra: list[str],
               out: Path) -> Recipe:
    method = base_method(key)
    sets = [f"data.dataset=packaged:{dataset}", f"adapter.method={'lora' if method == 'peft-lora' else method}",
            f"train.lr={lr}", f"train.seed={seed}", f"train.output_dir={out}"]
    if method != "sora":
        sets.append("adapter.sparse_lambda=null")
    if steps is not None:
        sets += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 3)}",
                 f"train.save_every={max(1, steps // 3)}"]
    return load_recipe(common.QUICKSTART, [*sets, *extra])


def sora_run(recipe: Recipe) -> dict[str, Any]:
    """One `sora train` run: its collapse event, logged losses and final/'s test scores."""
    t0 = time.perf_counter()
    result = train(recipe)
    events = list(read_events(Path(recipe.train.output_dir or "") / "metrics.jsonl"))
    fired = [e for e in events if e.get("event") == "collapse"]
    return {"losses": [e["loss"] for e in events if e.get("event") == "train"],
            "collapse_step": fired[0]["since"] if fired else None,
            "accuracy": result.test["accuracy"], "constant": bool(result.test.get("constant_predictor")),
            "seconds": time.perf_counter() - t0}


def peft_run(recipe: Recipe, smoke: bool, workdir: Path) -> dict[str, Any]:
    """PEFT LoRA on the recipe's data and split, stepped by the engine's train_step; the engine's watch reads its
    losses in the engine's logged windows."""
    t0 = time.perf_counter()
    steps = int(recipe.train.max_steps or 0)
    s = dataclasses.replace(common.settings(smoke), recipe=recipe, steps=steps, seeds=(recipe.train.seed,),
                            lrs={"peft-lora": recipe.train.lr})
    setup = common.load_setup(s, smoke, workdir)
    c = common.build("peft-lora", setup, s, recipe.train.seed)
    per_step: list[float] = []
    common.train(c, setup, s, recipe.train.seed, per_step)
    watch = collapse.LossWatch(collapse.label_entropy(setup.train.labels.tolist()))
    losses, fired = [], None
    for first in range(0, steps, LOG_EVERY):  # the engine's windows: steps first+1 .. first+LOG_EVERY (1-based)
        window = per_step[first:first + LOG_EVERY]
        losses.append(sum(window) / len(window))
        fired = fired or watch.update(first + 1, losses[-1])
    accuracy, logits = common.held_out_accuracy(c.model, setup)
    return {"losses": losses, "collapse_step": fired.step if fired else None, "accuracy": accuracy,
            "constant": collapse.constant(logits.argmax(-1).tolist()), "seconds": time.perf_counter() - t0}


def run_one(dataset: str, key: str, lr: float, seed: int, steps: int | None, extra: list[str], smoke: bool,
            tmp: Path) -> dict[str, Any]:
    out = tmp / f"{dataset}-{key}-{lr:g}-{seed}"
    recipe = recipe_for(dataset, key, lr, seed, steps, extra, out)
    found = peft_run(recipe, smoke, tmp) if base_method(key) == "peft-lora" else sora_run(recipe)
    found["collapsed"] = found["collapse_step"] is not None or found["constant"]
    return {"dataset": dataset, "method": key, "lr": lr, "seed": seed, "steps": int(recipe.train.max_steps or 0),
            "set": extra, **found}


def majority_share(recipe: Recipe) -> float:
    """The test accuracy of always answering the test split's most frequent class."""
    task = get_task(recipe.data)
    task.load_data()
    labels = [int(x) for x in task.splits.test.labels]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def cells(records: list[dict[str, Any]], majority: dict[str, float] | None = None
          ) -> dict[tuple[str, float, str], dict[str, Any]]:
    """(dataset, lr, method) -> runs, collapsed, at chance (final test accuracy within AT_CHANCE of the dataset's
    `majority` share, whatever the watch saw: a run that never left chance) and accuracy mean / std."""
    grouped: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault((r["dataset"], r["lr"], r["method"]), []).append(r)
    found = {}
    for key, runs in grouped.items():
        acc = [r["accuracy"] for r in runs]
        floor = (majority or {}).get(key[0], -1.0) + AT_CHANCE
        found[key] = {"runs": len(runs), "collapsed": sum(r["collapsed"] for r in runs),
                      "at_chance": sum(a <= floor for a in acc),
                      "seeds": sorted(r["seed"] for r in runs), "accuracy_mean": statistics.fmean(acc),
                      "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0}
    return found


def targets(found: dict[tuple[str, float, str], dict[str, Any]], shipped_lr: float) -> list[tuple[str, str, bool]]:
    """Issue 27's targets over the cells run so far."""
    checks = []
    for (dataset, lr, method), c in sorted(found.items()):
        base, tag = split_key(method)
        if base != "sora":
            continue
        sora, lora_name = ("SoRA", "LoRA") if not tag else (f"SoRA ({tag})", f"LoRA ({tag})")
        lora = found.get((dataset, lr, "lora" + (f"+{tag}" if tag else "")))  # a variant against LoRA's same variant
        if lora is not None:
            rate, lora_rate = c["collapsed"] / c["runs"], lora["collapsed"] / lora["runs"]
            checks.append((f"{dataset}, lr {lr:g}: {sora}'s collapse rate ≤ {lora_name}'s",
                           f"{c['collapsed']}/{c['runs']} vs {lora['collapsed']}/{lora['runs']}", rate <= lora_rate))
            checks.append((f"{dataset}, lr {lr:g}: {sora} ends at chance no more often than {lora_name}",
                           f"{c['at_chance']}/{c['runs']} vs {lora['at_chance']}/{lora['runs']}",
                           c["at_chance"] / c["runs"] <= lora["at_chance"] / lora["runs"]))
            if lora["collapsed"] == 0:
                gap = 100 * (c["accuracy_mean"] - lora["accuracy_mean"])
                checks.append((f"{dataset}, lr {lr:g}: {sora}'s accuracy ≥ {lora_name}'s − 0.5 point",
                               f"{gap:+.2f} points", gap >= -0.5))
        if tag:
            continue
        if dataset == "rotten_tomatoes" and lr == shipped_lr:
            checks.append(("the quickstart as shipped (SoRA, lr 2e-3, Rotten Tomatoes) never collapses",
                           f"{c['collapsed']}/{c['runs']}", c["collapsed"] == 0))
    return checks


def markdown(found: dict[tuple[str, float, str], dict[str, Any]], facts: dict[str, Any], source: str,
             shipped_lr: float, methods: list[str], majority: dict[str, float]) -> str:
    rows = []
    for dataset in DATASETS:
        for lr in sorted({k[1] for k in found if k[0] == dataset}):
            row = [dataset, f"{lr:g}"]
            for method in methods:
                c = found.get((dataset, lr, method))
                row.append("–" if c is None else f"{c['collapsed']}/{c['runs']} · {c['at_chance']}/{c['runs']} · "
                                                 f"{100 * c['accuracy_mean']:.2f} ± {100 * c['accuracy_std']:.2f}")
            rows.append(row)
    checks = common.target_lines(targets(found, shipped_lr))
    return ("### Stability: collapse rate and test accuracy\n\n"
            f"{source}, commit {facts['commit']}; "
            f"torch {facts['torch']}, transformers {facts.get('transformers')}, peft {facts.get('peft')}.\n\n"
            + common.markdown_table(["dataset", "lr", *(label(m) for m in methods)], rows)
            + "\n\nEach cell: runs collapsed / runs, runs at chance / runs, then the final model's test accuracy in "
              "%, mean ± std over those runs, all included. The quickstart recipe with the dataset, method, lr and "
              "seed changed; collapsed: the loss back at chance after it was clearly below it (the engine's collapse "
              "watch), or one class for every test example; at chance: a final test accuracy within 1 point of "
              "always answering the majority class (" + ", ".join(f"{d} {100 * m:.2f}%" for d, m in
                                                                 sorted(majority.items())) + "), collapsed or not.\n"
            + (f"\n{checks}\n" if checks else ""))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the recipe's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for a variant of the methods (needs --tag)")
    parser.add_argument("--tag", help="the variant's name: its runs are kept as METHOD+TAG, a column of their own")
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT, 256 examples (CI)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the runs finished so far")
    args = parser.parse_args(argv)
    if bool(args.set) != bool(args.tag):
        parser.error("--set and --tag go together: a variant's runs need a name of their own")
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    log = out / "stability-runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    quickstart = load_recipe(common.QUICKSTART)
    shipped_lr, steps = quickstart.train.lr, args.steps or int(quickstart.train.max_steps or 0)
    with tempfile.TemporaryDirectory() as tmp:
        smoke = []
        if args.smoke:
            tiny = common.tiny_model_dir(Path(tmp) / "tiny-bert")
            smoke = [f"model.name_or_path={tiny}", "data.max_train_samples=256", "data.max_eval_samples=64"]
        finished = {(r["dataset"], r["method"], r["lr"], r["seed"], r["steps"]) for r in done}
        grid = [] if args.report else itertools.product(args.lrs, args.datasets, args.seeds, args.methods)
        for lr, dataset, seed, method in grid:
            key = f"{method}+{args.tag}" if args.tag else method
            if (dataset, key, lr, seed, steps) in finished:
                continue
            print(f"{dataset} {key} lr {lr:g} seed {seed}", flush=True)
            record = run_one(dataset, key, lr, seed, args.steps, [*smoke, *args.set], args.smoke, Path(tmp))
            record["cpu"] = facts["cpu"]  # a collapse is a knife-edge of the numerics: which CPU's kernels ran it
            done.append(record)
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        mine = [r for r in done if r["steps"] == steps]
        majority = {d: majority_share(recipe_for(d, "lora", shipped_lr, 0, args.steps, smoke, Path(tmp)))
                    for d in sorted({r["dataset"] for r in mine})}
    found = cells(mine, majority)
    command = "python bench/stability.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    source = f"`{command}`; machine {facts['cpu']} ({facts['torch_threads']} threads)"
    if args.report:  # every finished run, from any sitting: not one command's cells, nor one machine's
        source = (f"`python bench/stability.py --out {args.out}` (the whole grid; `--report` tabulates the {len(mine)} "
                  f"runs finished so far, kept in {log.name}, from sittings on 2-core CPUs, 1 thread a run)")
    common.write_json(out / "stability.json", {"machine": facts, "command": command, "steps": steps,
                                               "majority_share": majority,
                                               "cells": [{"dataset": d, "lr": lr, "method": m, **c}
                                                         for (d, lr, m), c in sorted(found.items())],
                                               "targets": [{"target": t, "measured": v, "met": ok}
                                                           for t, v, ok in targets(found, shipped_lr)]})
    keys = sorted({k[2] for k in found}, key=lambda m: (METHODS.index(base_method(m)), m))
    text = markdown(found, facts, source, shipped_lr, keys, majority)
    (out / "stability.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
