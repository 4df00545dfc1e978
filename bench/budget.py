"""SoRA to a budget: one run with `adapter.target` against the other ways to get an adapter of that size.

    python bench/budget.py                 # MiniLM quickstart: budgets 25/50/75% of r_max = 8, seeds 0 1 2
    python bench/budget.py --seeds 0       # one seed (the λ search runs on the first seed given)
    python bench/budget.py --smoke         # CI: tiny random BERT, 1 seed x 8 steps
    python bench/budget.py --causal        # the causal quickstart (SmolLM2-135M-Instruct, 120 steps), seed 0

For each budget B (a fraction of the initial ranks: 8 · 37 on MiniLM, 8 · 210 on SmolLM2), on the quickstart's
model and data, every contestant stepped by the engine's own `train_step` on the same batches (bench/common.py;
bench/causal_setup.py for the causal LM, scored by greedy exact match on 300 test prompts as `sora train` does):

- **SoRA, adapter.target**: `fraction: B`, reached at 80% of training (then the surviving set trains on): one run.
- **SoRA, hand-searched λ**: what a user does without a target: train with a λ, count the surviving ranks, change λ
  and train again, until the count lands within 2% below B (or MAX_SEARCH runs), starting from the recipe's λ
  (1 on MiniLM, 4 on SmolLM2). The search runs on the first
  seed (doubling or halving λ until the count is bracketed, then interpolating in log λ), and the other seeds
  train with the λ it found; every run of the search is counted.
- **PEFT AdaLoRA**, init_r = 8 and target_r = 8 · B (its budget is target_r per module on average), its schedule
  set to reach the budget at 80% of training as well (tinit 10%, tfinal 20%).
- **PEFT LoRA** at the uniform rank 8 · B: the same ranks as the budget, with no gate (d_in + d_out a rank).

Finished runs are kept in runs.jsonl and skipped when the command runs again (the λ search resumes too). Writes
budget.json and budget.md (runs-causal.jsonl, budget-causal.json and budget-causal.md with --causal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import causal_setup  # noqa: E402
import common  # noqa: E402

from sora_cli.adapters import adapter_layers  # noqa: E402
from sora_cli.recipe import TargetConfig  # noqa: E402

BUDGETS = (0.25, 0.5, 0.75)
REACH_AT = 0.8
MAX_SEARCH = 6  # runs the λ search may take per budget
TOLERANCE = 0.02  # a count within 2% below the budget, never above, has landed
COLUMNS = ["budget", "contestant", "lr", "runs", "ranks (per seed)", "inference params", "accuracy",
           "train time / run (s)", "time to this adapter (s)"]


def contestant(key: str, setup: common.Setup, s: common.Settings, seed: int) -> common.Contestant:
    """`target-B`, `lambda-λ`, `adalora-R` or `lora-R` as a contestant on the seed's base model."""
    kind, value = key.split("-", 1)
    sora = dataclasses.replace(s.recipe.adapter, method="sora", sparse_lambda=None)
    if kind == "target":
        target = TargetConfig(fraction=float(value), reach_at=REACH_AT)
        adapter = dataclasses.replace(sora, target=target)
        return common.sora_contestant(key, f"SoRA adapter.target {float(value):.0%}", adapter, setup, s, seed,
                                      s.lrs["sora-r8"])
    if kind == "lambda":
        adapter = dataclasses.replace(sora, sparse_lambda=float(value))
        return common.sora_contestant(key, f"SoRA λ = {float(value):g}", adapter, setup, s, seed, s.lrs["sora-r8"])
    r = int(value)
    if kind == "adalora":
        schedule = {"total_step": s.steps, "tinit": max(1, s.steps // 10), "tfinal": max(1, s.steps // 5),
                    "deltaT": max(1, min(10, s.steps // 20)), "target_r": r}
        return common.peft_contestant(key, f"PEFT AdaLoRA r {s.r}→{r}", setup, s, seed, s.lrs["peft-adalora"],
                                      s.r, adalora=schedule)
    if kind == "lora":
        return common.peft_contestant(key, f"PEFT LoRA r={r}", setup, s, seed, s.lrs["peft-lora"], r)
    raise KeyError(key)


def ranks_and_parameters(c: common.Contestant) -> tuple[int, int]:
    """(surviving ranks, inference parameters) as shipped: SoRA its non-zero gates, d_in + d_out + 1 each (what
    `sora prune` keeps, as `inspect` counts it); AdaLoRA its triplets with E != 0, d_in + d_out + 1 each (PEFT saves
    the rank pattern); LoRA every rank, d_in + d_out each."""
    ranks = params = 0
    if c.key.startswith(("target", "lambda")):
        for _, m in adapter_layers(c.model):
            alive = int(torch.count_nonzero(m.gate))
            ranks, params = ranks + alive, params + alive * (m.in_features + m.out_features + 1)
        return ranks, params
    for module in c.model.modules():
        if c.key.startswith("adalora") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            ranks, params = ranks + kept, params + kept * (module.in_features + module.out_features + 1)
        elif c.key.startswith("lora") and "default" in getattr(module, "lora_A", {}):
            r = module.r["default"]
            ranks, params = ranks + r, params + r * (module.in_features + module.out_features)
    return ranks, params


def run_one(key: str, setup: Any, s: common.Settings, seed: int) -> dict[str, Any]:
    c = contestant(key, setup, s, seed)
    record: dict[str, Any] = {"key": key, "label": c.label, "seed": seed, "lr": c.lr, "steps": s.steps,
                              "trainable_params": c.trainable(), "initial_sha256": common.initial_hashes(c)}
    record.update(common.train(c, setup, s, seed))
    if isinstance(setup, causal_setup.CausalSetup):  # the quickstart's metric: greedy exact match
        record["metrics"] = causal_setup.held_out(c.model, setup, s.recipe.train.eval_batch_size)
        record["accuracy"] = record["metrics"]["exact_match"]
    else:
        record["accuracy"], _ = common.held_out_accuracy(c.model, setup)
    record["ranks"], record["inference_params"] = ranks_and_parameters(c)
    budget = getattr(c.hooks, "budget", None)
    if budget is not None:
        record["lambda"], record["final_cut"] = budget.last_lambda, budget.cut
    return record


def landed(count: int, budget: int) -> bool:
    return (1 - TOLERANCE) * budget <= count <= budget


def search(budget: int, measure: Callable[[float], int], start: float = 1.0) -> list[tuple[float, int]]:
    """The λ search a user runs by hand: from the recipe's λ, double λ while too many ranks survive and halve it
    while too few, then interpolate log λ linearly in the count between the closest λ on either side, aiming at
    the middle of the landing window; λ rounded to 3 significant digits. Returns every (λ, count)."""
    tried: list[tuple[float, int]] = []
    lam = start
    for _ in range(MAX_SEARCH):
        count = measure(lam)
        tried.append((lam, count))
        if landed(count, budget):
            break
        above = [t for t in tried if t[1] > budget]  # too many survive: λ too small
        below = [t for t in tried if t[1] < (1 - TOLERANCE) * budget]
        if above and below:
            (l1, c1), (l2, c2) = max(above), min(below)
            aim = (1 - TOLERANCE / 2) * budget
            lam = math.exp(math.log(l1) + (math.log(l2) - math.log(l1)) * (c1 - aim) / (c1 - c2))
        else:
            lam = lam * 2 if count > budget else lam / 2
        lam = float(f"{lam:.3g}")
        if any(lam == t[0] for t in tried):  # the rounding repeats a λ: nothing new to learn
            break
    return tried


def best_found(tried: list[tuple[float, int]], budget: int) -> tuple[float, int]:
    """The searched λ: the first that landed, else the closest count."""
    for lam, count in tried:
        if landed(count, budget):
            return lam, count
    return min(tried, key=lambda t: abs(t[1] - budget))


class Runs:
    """runs.jsonl: finished runs, looked up by (key, seed, steps); a missing one is trained and appended."""

    def __init__(self, path: Path, setup: Any, s: common.Settings):
        self.path, self.setup, self.s = path, setup, s
        self.done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def get(self, key: str, seed: int) -> dict[str, Any]:
        for r in self.done:
            if (r["key"], r["seed"], r["steps"]) == (key, seed, self.s.steps):
                return r
        record = run_one(key, self.setup, self.s, seed)
        self.done.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"seed {seed}  {record['label']:<28} acc {record['accuracy']:.4f}  ranks {record['ranks']:>4d}  "
              f"params {record['inference_params']:>9,d}  {record['train_seconds']:7.1f} s", flush=True)
        return record


def rows_for(budget: float, total_ranks: int, runs: Runs, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """The four contestants' rows for one budget (the λ search runs here, on the first seed)."""
    count = math.floor(budget * total_ranks + 1e-9)
    r = round(budget * runs.s.r)
    first = seeds[0]
    start = runs.s.recipe.adapter.sparse_lambda or 1.0
    tried = search(count, lambda lam: runs.get(f"lambda-{lam:g}", first)["ranks"], start)
    lam, _ = best_found(tried, count)
    search_seconds = sum(runs.get(f"lambda-{t:g}", first)["train_seconds"] for t, _ in tried)
    rows = []
    for key, n_runs in ((f"target-{budget:g}", 1), (f"lambda-{lam:g}", len(tried)), (f"adalora-{r}", 1),
                        (f"lora-{r}", 1)):
        records = [runs.get(key, seed) for seed in seeds]
        searched = key.startswith("lambda")
        seconds = statistics.fmean(x["train_seconds"] for x in records)
        rows.append({"budget": budget, "budget_ranks": count, "key": key, "runs": n_runs, "seeds": list(seeds),
                     "label": records[0]["label"] + (" (hand-searched)" if searched else ""), "lr": records[0]["lr"],
                     "ranks": [x["ranks"] for x in records], "accuracy": [x["accuracy"] for x in records],
                     "inference_params_mean": statistics.fmean(x["inference_params"] for x in records),
                     "train_seconds_mean": seconds, "seconds_to_adapter": search_seconds if searched else seconds,
                     "lambda": [x.get("lambda") for x in records], "search": tried if searched else None})
    return rows


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f} (n={len(values)})"


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The issue's targets: every target run on its budget; accuracy against AdaLoRA and uniform LoRA."""
    out = []
    by = {(r["budget"], r["key"].split("-")[0]): r for r in rows}
    for budget in sorted({r["budget"] for r in rows}):
        mine = by[(budget, "target")]
        ok = all(landed(n, mine["budget_ranks"]) for n in mine["ranks"])
        out.append((f"{budget:.0%}: adapter.target lands within 2% below {mine['budget_ranks']} ranks, never above",
                    ", ".join(map(str, mine["ranks"])), ok))
        for other, name in (("adalora", "PEFT AdaLoRA"), ("lora", "uniform PEFT LoRA")):
            gap = 100 * (statistics.fmean(mine["accuracy"]) - statistics.fmean(by[(budget, other)]["accuracy"]))
            out.append((f"{budget:.0%}: accuracy ≥ {name}'s", f"{gap:+.2f} points", gap >= 0))
    return out


def markdown(rows: list[dict[str, Any]], s: common.Settings, setup_text: str, facts: dict[str, Any],
             command: str, causal: bool = False) -> str:
    columns = [c.replace("accuracy", "exact match") for c in COLUMNS] if causal else COLUMNS
    metric = ("Exact match of the greedy answer on the test prompts" if causal
              else "Accuracy on the test split") + " in %, mean ± std over seeds"
    table = [[f"{r['budget']:.0%} ({r['budget_ranks']} ranks)", r["label"], f"{r['lr']:g}", str(r["runs"]),
              ", ".join(map(str, r["ranks"])), f"{r['inference_params_mean']:,.0f}", mean_std(r["accuracy"]),
              f"{r['train_seconds_mean']:.1f}", f"{r['seconds_to_adapter']:.1f}"] for r in rows]
    checks = "\n".join(f"- {'met' if ok else '**missed**'}: {what} — measured {value}"
                       for what, value, ok in targets(rows))
    searches = "\n".join(f"- {r['budget']:.0%}: " + ", ".join(f"λ = {lam:g} → {n}" for lam, n in r["search"])
                         for r in rows if r["search"])
    title = "SoRA to a budget, causal LM" if causal else "SoRA to a budget"
    return (f"### {title}\n\n{setup_text}; {s.steps} steps of {s.batch_size}, max_length {s.max_length}, "
            f"linear LR with {s.warmup_ratio:g} warm-up, r_max = {s.r}, seeds {', '.join(map(str, s.seeds))}. "
            f"Machine: {facts['cpu']} ({facts['torch_threads']} threads, {facts['device']}); commit "
            f"{facts['commit']}; torch {facts['torch']}, transformers {facts.get('transformers')}, peft "
            f"{facts.get('peft')}.\n\n`{command}`\n\n" + common.markdown_table(columns, table)
            + f"\n\n{metric}. Ranks: what survives at the end, per seed "
              "(AdaLoRA: triplets with E ≠ 0). Inference params: the adapter as shipped, pruned, head excluded. Runs: "
              "training runs to get this adapter for one seed (the λ search's on the first seed; the other seeds "
              "reuse its λ). Time to this adapter: the training time of those runs.\n\n"
            + f"The λ searches (first seed), λ → surviving ranks:\n\n{searches}\n\n{checks}\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 seed x 8 steps (CI)")
    parser.add_argument("--causal", action="store_true", help="the causal quickstart (one seed unless --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    args = parser.parse_args(argv)
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.smoke or args.causal else (0, 1, 2))
    steps = args.steps or (8 if args.smoke else None)
    s = causal_setup.settings(args.smoke, seeds, steps) if args.causal else common.settings(args.smoke, seeds, steps)
    facts = common.machine(torch.device(args.device))
    out = common.results_dir(args.out, facts, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        setup = (causal_setup.load_setup(s, args.smoke, Path(tmp), args.device) if args.causal
                 else common.load_setup(s, args.smoke, Path(tmp), args.device, "test"))
        total = s.r * len(setup.targets)
        print(f"{setup.description}; {len(setup.targets)} target modules, {total} ranks; {s.steps} steps; "
              f"seeds {seeds}", flush=True)
        suffix = "-causal" if args.causal else ""
        runs = Runs(out / f"runs{suffix}.jsonl", setup, s)
        command = "python bench/budget.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        for n in range(1, len(seeds) + 1):  # every contestant on the first seed, then the next: tables as it goes
            rows = [row for budget in args.budgets for row in rows_for(budget, total, runs, seeds[:n])]
            text = write(out / f"budget{suffix}", rows, dataclasses.replace(s, seeds=seeds[:n]), setup.description,
                         facts, command)
    print(text)
    return out


def write(stem: Path, rows: list[dict[str, Any]], s: common.Settings, setup: str, facts: dict[str, Any],
          command: str) -> str:
    """stem.json and stem.md (budget or budget-causal)."""
    checks = [{"target": t, "measured": v, "met": ok} for t, v, ok in targets(rows)]
    common.write_json(stem.with_suffix(".json"), {"machine": facts, "setup": setup, "command": command,
                                                  "steps": s.steps, "seeds": list(s.seeds), "rows": rows,
                                                  "targets": checks})
    text = markdown(rows, s, setup, facts, command, causal=stem.name.endswith("-causal"))
    stem.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
