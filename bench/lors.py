"""LoRS on a sparse base (METHODS.md "LoRS"): what training costs, memory and time, against plain LoRA and the
masked-LoRA baseline that lets autograd store W_eff; and what survives the merge, quality and the zero pattern.

    python bench/lors.py                  # SmolLM2-135M-Instruct pruned by Wanda (50% and 2:4), the causal quickstart
    python bench/lors.py --part speed     # only part 1 (memory and time); --part quality: only part 2 (a part
                                          # run on its own keeps the other part's numbers in --out's lors.json)
    python bench/lors.py --smoke          # CI: a tiny random Llama, both parts, a few steps; measures nothing
    python bench/lors.py --from-json bench/results/<folder>/lors.json   # rewrite lors.md only

Sparse bases: `sora sparsify` (a subprocess, into the work dir) on the recipe's model, Wanda calibrated on `--samples`
of the recipe's training examples: 50% unstructured (per output row) and 2:4.

Part 1, memory and time per step, on the 50% base (every contestant computes densely, so the pattern does not change
the cost). Contestants, each a deep copy of the loaded sparse base with all linears but lm_head adapted (r=8, alpha 16),
stepped by the engine's `train_step` on the same fixed batches: 8 rows of T tokens cut from the training examples'
token ids concatenated into one stream, every token a label.
- lors-approx / lors-exact: sora's LoRS layer (the custom Function: saves x, A, B and a reference to W0).
- lora: plain sora LoRA on the sparse base (does not keep the zeros).
- naive-masked: `F.linear(x, (W0 + s·B A) ⊙ (W0 ≠ 0), b)` with ordinary autograd, as masked-LoRA baselines do.
Measured at each length:
- saved for backward: the bytes autograd packs during one forward (the loss) of one batch, read exactly through
  `torch.autograd.graph.saved_tensors_hooks`; each storage counted once, none that is a parameter's or buffer's
  (a saved reference to the frozen W0 costs no memory).
- step time: median ms/step over interleaved repeats (bench/speed.py's `interleaved`); the ratio to LoRA is the
  median of the per-repeat ratios.
- peak RSS: each contestant in its own process, forked from one that has only imported the libraries (it loads the
  base, copies and adapts it, drops the base), then for each length, shortest first: VmHWM reset through
  /proc/self/clear_refs, the same steps, VmHWM read. One process at a time (smoke: side by side).

Part 2, quality after merge, on each sparse base: LoRS and LoRA trained by `sora_cli.engine.train` on the causal
quickstart recipe (its lr, batches and seed; r=8, alpha 16; `--steps`), each merged by `merge_checkpoint`; LoRA's merged
weights are also re-pruned to the base's mask (⊙ (W0 ≠ 0) on every adapted module). Every model is scored as a plain
model on the test split by the causal task's own evaluation (choice accuracy, exact match, loss), beside the dense and
the sparse base zero-shot, with the actual sparsity of its adapted linears. Writes lors.json and lors.md.
The smoke mode runs on one thread, its subprocesses too (a tiny model gains nothing from more).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from speed import interleaved_steps, ratio  # noqa: E402

from sora_cli.adapters import LoRA, LoRALinear, get_method  # noqa: E402
from sora_cli.adapters.inject import inject, select_targets  # noqa: E402
from sora_cli.adapters.method import Method  # noqa: E402
from sora_cli.engine import eval_context, pick_device, train, train_step  # noqa: E402
from sora_cli.merge import merge_checkpoint  # noqa: E402
from sora_cli.models import load_model  # noqa: E402
from sora_cli.optim import build_optimizer  # noqa: E402
from sora_cli.recipe import AdapterConfig, Recipe, TrainConfig, load_recipe  # noqa: E402
from sora_cli.tasks import Task, get_task  # noqa: E402
from sora_cli.tasks.causal_lm import CausalLMTask  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart-causal.yaml"
R, ALPHA, BATCH = 8, 16.0, 8
SPEED_EXAMPLES = 1000  # training examples whose token ids make the speed batches' stream
# sparse base -> (sora sparsify's rule options, label)
BASES: dict[str, tuple[list[str], str]] = {"wanda-50pct": (["--sparsity", "0.5"], "Wanda 50%"),
                                           "wanda-2of4": (["--pattern", "2:4"], "Wanda 2:4")}
SPEED_BASE = "wanda-50pct"
CONTESTANTS = {"lors-approx": "LoRS (approx grad)", "lors-exact": "LoRS (exact grad)",
               "lora": "LoRA (zeros not kept)", "naive-masked": "masked LoRA, plain autograd"}
TRAINED = ("lors", "lora")
ROWS = {"dense": "dense base, zero-shot", "sparse": "sparse base, zero-shot", "lors": "LoRS, merged",
        "lora": "LoRA, merged", "lora-repruned": "LoRA, merged, re-pruned to the base's mask"}
SPEED_COLUMNS = ["contestant", "seq len", "saved for backward (MiB)", "saved / LoRA", "ms / step", "step / LoRA",
                 "peak RSS (MiB)", "RSS / LoRA"]
QUALITY_COLUMNS = ["sparse base", "model", "choice accuracy", "exact match", "loss", "sparsity of adapted linears",
                   "train (s)"]
HEADING = "### LoRS: memory, time and quality on a sparse base"


class NaiveMaskedLinear(LoRALinear):
    """h = x ((W0 + s·B A) ⊙ (W0 ≠ 0))ᵀ + b with ordinary autograd: the mask and W_eff (d_out × d_in) are stored for
    backward, as masked-LoRA baselines do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight + self.scaling * (self.lora_B @ self.lora_A)) * (self.weight != 0)
        return F.linear(x, w, self.bias)


class NaiveMasked(LoRA):
    name = "naive-masked"
    layer = NaiveMaskedLinear

    def make_layer(self, base: nn.Linear) -> nn.Module:
        return NaiveMaskedLinear(base, self.adapter.r, self.adapter.alpha, self.adapter.dropout)


# ---------------------------------------------------------------------------------------------
# Setup: the recipe, the smoke files, the sparse bases


def write_smoke_files(work: Path) -> None:
    """A tiny random Llama and a small alpaca file (as bench/speed_causal.py's smoke), into the work dir."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

    save_tiny_causal_model(work / "tiny-llama", tiny_causal_tokenizer())
    rows = [{"instruction": "classify the sentiment of this review", "input": f"the film was {w}",
             "output": "positive" if w in ("good", "great") else "negative"}
            for w in ["good", "bad", "great", "awful"] * 16]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_recipe(smoke: bool, work: Path, extra: list[str] | None = None) -> Recipe:
    """The causal quickstart recipe (smoke: on the tiny model and file of `write_smoke_files`), then `extra`."""
    smoke_overrides = [f"model.name_or_path={work / 'tiny-llama'}", f"data.train_file={work / 'data.jsonl'}",
                       "data.dataset=null", "data.max_length=64"] if smoke else []
    return load_recipe(RECIPE, [*smoke_overrides, *(extra or [])])


def sparsify(recipe: Recipe, work: Path, keys: list[str], samples: int, smoke: bool) -> dict[str, Path]:
    """`sora sparsify` for each base in `keys`, one subprocess after the other (two side by side on two cores
    oversubscribe the threads and take several times as long): {key: sparse model dir}."""
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    for key in keys:
        cmd = [sys.executable, "-m", "sora_cli", "sparsify", str(recipe_file), "-o", str(work / key), "--method",
               "wanda", *BASES[key][0], "--samples", str(samples), "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(smoke))
        if proc.returncode != 0:
            raise SystemExit(f"sora sparsify for {key} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {key: work / key for key in keys}


def child_env(smoke: bool) -> dict[str, str] | None:
    """A subprocess's environment: the smoke mode runs everything on one thread (a tiny model gains nothing from more,
    and on a shared machine a busy second thread stalls every op)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"} if smoke else None


def load_dir(recipe: Recipe, path: Path | str, task: Task) -> tuple[nn.Module, Any]:
    return load_model(dataclasses.replace(recipe.model, name_or_path=str(path), gguf_file=None), task)


def linear_targets(model: nn.Module) -> list[str]:
    """Every Linear outside lm_head: the adapted (and pruned) modules."""
    return select_targets(model, "all-linear", [])


# ---------------------------------------------------------------------------------------------
# Part 1: memory and time per step


@dataclass
class Contestant:
    model: nn.Module
    step: Callable[[dict[str, torch.Tensor]], Any]


def method_for(key: str, targets: list[str], cfg: TrainConfig) -> Method:
    adapter = AdapterConfig(method="lora", r=R, alpha=ALPHA, target_modules=tuple(targets))
    if key.startswith("lors-"):
        return get_method(dataclasses.replace(adapter, method="lors", grad=key.removeprefix("lors-")), cfg)
    return NaiveMasked(adapter, cfg) if key == "naive-masked" else get_method(adapter, cfg)


def contestant(key: str, base: nn.Module, task: Task, cfg: TrainConfig, targets: list[str]) -> Contestant:
    """A fresh copy of the base adapted as `key` says, and `step(batch)`: one engine step of it."""
    model = copy.deepcopy(base)
    method = method_for(key, targets, cfg)
    inject(model, method, ())
    optimizer = build_optimizer(model, method.param_groups(model), cfg.lr, 0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    counter = itertools.count()
    return Contestant(model, lambda batch: train_step(model, task, method, optimizer, [batch], params, 1.0,
                                                      contextlib.nullcontext(), next(counter)))


def speed_inputs(recipe: Recipe, sparse: Path, lengths: list[int],
                 steps: int) -> tuple[CausalLMTask, nn.Module, dict[int, list[dict[str, torch.Tensor]]]]:
    """The task, the loaded sparse base and, per length T, `steps` fixed (8, T) batches cut from one token stream."""
    task = CausalLMTask(dataclasses.replace(recipe.data, max_train_samples=SPEED_EXAMPLES))
    task.load_data()
    torch.manual_seed(0)
    base, tokenizer = load_dir(recipe, sparse, task)
    stream = [t for e in task.encode(tokenizer, recipe.data.max_length).train.examples for t in e.input_ids]
    return task, base, {n: stream_batches(stream, n, steps) for n in lengths}


def stream_batches(stream: list[int], length: int, steps: int) -> list[dict[str, torch.Tensor]]:
    need = steps * BATCH * length
    if len(stream) < need:
        raise SystemExit(f"{len(stream)} training tokens; {steps} steps of {BATCH} x {length} need {need}")
    blocks = torch.tensor(stream[:need]).view(steps, BATCH, length)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]


def saved_for_backward(model: nn.Module, task: Task, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward after one forward (the loss) of `batch`: each packed tensor's storage,
    counted once, except the model's own parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss_sum(model, batch)
    del loss  # frees the graph and what it saved
    return total


def measure_speed(contestants: dict[str, Contestant], task: Task, batches: list[dict[str, torch.Tensor]],
                  repeats: int) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Saved bytes (one forward of the first batch) and seconds per step over interleaved repeats, per contestant."""
    saved = {key: saved_for_backward(c.model, task, batches[0]) for key, c in contestants.items()}
    return saved, interleaved_steps({key: c.step for key, c in contestants.items()}, batches, repeats)


def peak_memory(args: argparse.Namespace, work: Path, sparse: Path) -> dict[str, dict[str, float]]:
    """Peak RSS (MiB) per contestant and length: one process imports torch, transformers and sora once, then forks a
    fresh child per contestant (it inherits nothing but the imports), one at a time (smoke: side by side)."""
    cmd = [sys.executable, __file__, "--memory-children", "--work", str(work), "--base", str(sparse),
           "--speed-steps", str(args.speed_steps), "--lengths", *map(str, args.lengths),
           *(["--smoke"] if args.smoke else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.smoke))
    if proc.returncode != 0:
        raise SystemExit(f"peak memory children failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    peaks: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return peaks


def memory_children(args: argparse.Namespace) -> None:
    """Fork one child per contestant (before this process runs any torch op, so no thread pool is inherited); print
    {contestant: {length: peak MiB}}."""
    preload(args)
    files = {key: args.work / f"peak-{key}.json" for key in CONTESTANTS}
    pids = []
    for key, f in files.items():
        f.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:
            os._exit(forked_child(key, args))
        pids.append(pid)
        if not args.smoke:
            os.waitpid(pid, 0)
    for pid in pids if args.smoke else []:
        os.waitpid(pid, 0)
    failed = [key for key, f in files.items() if not f.is_file()]
    if failed:
        raise SystemExit(f"memory child for {', '.join(failed)} failed (its traceback is above)")
    print(json.dumps({key: json.loads(f.read_text()) for key, f in files.items()}))


def preload(args: argparse.Namespace) -> None:
    """What each child would otherwise import on first use (the data loader, the tokenizer, the model's class), done
    once before forking; no torch op runs here."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    CausalLMTask(bench_recipe(args.smoke, args.work).data).load_data()
    AutoTokenizer.from_pretrained(args.base)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(args.base))]


def forked_child(key: str, args: argparse.Namespace) -> int:
    """The peak RSS of `key`'s training steps at each length, written to <work>/peak-<key>.json; the exit code."""
    try:
        recipe = bench_recipe(args.smoke, args.work)
        task, base, batches = speed_inputs(recipe, args.base, args.lengths, args.speed_steps)
        c = contestant(key, base, task, recipe.train, linear_targets(base))
        del base  # only the contestant's own copy stays
        peaks = {}
        for length in sorted(batches):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            for batch in batches[length]:
                c.step(batch)
            peaks[str(length)] = vm_hwm_mib()
        (args.work / f"peak-{key}.json").write_text(json.dumps(peaks))
        return 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def vm_hwm_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def speed_part(args: argparse.Namespace, work: Path, sparse: Path) -> dict[str, Any]:
    recipe = bench_recipe(args.smoke, work)
    task, base, batches = speed_inputs(recipe, sparse, args.lengths, args.speed_steps)
    targets = linear_targets(base)
    print(f"speed: {recipe.model.name_or_path} ({SPEED_BASE}), {len(targets)} target modules, lengths "
          f"{args.lengths}", flush=True)
    contestants = {key: contestant(key, base, task, recipe.train, targets) for key in CONTESTANTS}
    measured = {n: measure_speed(contestants, task, batches[n], args.repeats) for n in args.lengths}
    del contestants, base
    t0 = time.perf_counter()
    peaks = peak_memory(args, work, sparse)
    print(f"peak RSS children: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [speed_row(key, n, measured[n][0], measured[n][1], peaks) for n in args.lengths for key in CONTESTANTS]
    return {"model": recipe.model.name_or_path, "sparse_base": SPEED_BASE, "targets": len(targets), "r": R,
            "alpha": ALPHA, "batch_size": BATCH, "lengths": args.lengths, "steps_per_repeat": args.speed_steps,
            "repeats": args.repeats, "rows": rows, "checks": speed_checks(rows)}


def speed_row(key: str, length: int, saved: dict[str, int], times: dict[str, list[float]],
              peaks: dict[str, dict[str, float]]) -> dict[str, Any]:
    peak, lora_peak = peaks[key][str(length)], peaks["lora"][str(length)]
    return {"key": key, "label": CONTESTANTS[key], "seq_len": length, "saved_bytes": saved[key],
            "saved_mib": saved[key] / 2**20, "saved_vs_lora": saved[key] / saved["lora"],
            "ms_per_step": 1000 * statistics.median(times[key]), "step_vs_lora": ratio(times, key, "lora"),
            "peak_mib": peak, "rss_vs_lora": peak / lora_peak, "repeats_ms": [1000 * t for t in times[key]]}


def speed_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, at each length: LoRS (approx) against LoRA and against naive masking."""
    out = []
    for length in sorted({r["seq_len"] for r in rows}):
        at = {r["key"]: r for r in rows if r["seq_len"] == length}
        lors = at["lors-approx"]
        naive = lors["saved_bytes"] / at["naive-masked"]["saved_bytes"]
        for target, value, ok in (
                (f"LoRS (approx) saved for backward ≤ 1.05 × LoRA's at T={length}", lors["saved_vs_lora"],
                 lors["saved_vs_lora"] <= 1.05),
                (f"LoRS (approx) saved for backward ≤ 0.6 × naive masked's at T={length}", naive, naive <= 0.6),
                (f"LoRS (approx) step time ≤ 1.25 × LoRA's at T={length}", lors["step_vs_lora"],
                 lors["step_vs_lora"] <= 1.25)):
            out.append({"target": target, "measured": f"{value:.3f}×", "met": ok})
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: quality after merge


def train_and_merge(kind: str, key: str, sparse: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train `kind` (lors | lora) on the sparse base through the engine, then merge its final adapter."""
    extra = [f"model.name_or_path={sparse}", "model.gguf_file=null", f"adapter.method={kind}",
             "adapter.sparse_lambda=null", f"adapter.r={R}", f"adapter.alpha={ALPHA}", f"train.max_steps={args.steps}",
             "train.eval_every=null", f"train.output_dir={work / 'runs' / f'{key}-{kind}'}",
             f"data.max_eval_samples={args.eval_samples}"]
    result = train(bench_recipe(args.smoke, work, extra), overwrite=True)
    merged = work / "merged" / f"{key}-{kind}"
    report = merge_checkpoint(result.output_dir / "final", merged, force=True)
    return {"seconds": result.seconds, "steps": result.step, "adapter_test": result.test,
            "base_test": result.base_test, "merged_dir": str(merged),
            "merge": {"zero_pattern_kept": report["zero_pattern_kept"], "total": report["total"]}}


def sparsity(model: nn.Module, names: list[str]) -> dict[str, Any]:
    weights = [model.get_submodule(n).weight for n in names]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    return {"zeros": zeros, "weights": total, "sparsity": zeros / total}


def score(model: nn.Module, tokenizer: Any, task: Task, recipe: Recipe) -> dict[str, Any]:
    """The causal task's test metrics of a plain model, and the sparsity of its adapted linears."""
    device = pick_device(recipe.train.device)
    model.to(device).eval()
    data = task.encode(tokenizer, recipe.data.max_length).test
    metrics = task.evaluate(model, data, eval_context(recipe, device, tokenizer))
    return {**{k: metrics[k] for k in ("choice_accuracy", "exact_match", "loss")},
            **sparsity(model, linear_targets(model))}


def score_base(key: str, sparse: Path, runs: dict[str, dict[str, Any]], recipe: Recipe,
               task: Task) -> list[dict[str, Any]]:
    """The sparse base zero-shot, LoRS and LoRA merged, and LoRA merged then re-pruned to the base's mask."""
    model, tokenizer = load_dir(recipe, sparse, task)
    rows = [{"base": key, "row": "sparse", **score(model, tokenizer, task, recipe)}]
    masks = {n: model.get_submodule(n).weight != 0 for n in linear_targets(model)}  # on the scoring device
    for kind in TRAINED:
        model, tokenizer = load_dir(recipe, runs[kind]["merged_dir"], task)
        rows.append({"base": key, "row": kind, "train_seconds": runs[kind]["seconds"],
                     **score(model, tokenizer, task, recipe)})
    with torch.no_grad():  # `model` is LoRA's merged model, scored above
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)
    rows.append({"base": key, "row": "lora-repruned", "train_seconds": runs["lora"]["seconds"],
                 **score(model, tokenizer, task, recipe)})
    return rows


def quality_part(args: argparse.Namespace, work: Path, bases: dict[str, Path]) -> dict[str, Any]:
    recipe = bench_recipe(args.smoke, work, [f"data.max_eval_samples={args.eval_samples}"])
    task = get_task(dataclasses.replace(recipe.data, max_train_samples=1))  # scoring encodes the test split only
    task.load_data()
    model, tokenizer = load_model(recipe.model, task)
    rows = [{"base": "dense", "row": "dense", **score(model, tokenizer, task, recipe)}]
    del model
    runs: dict[str, dict[str, Any]] = {}
    for key, sparse in bases.items():
        runs[key] = {kind: train_and_merge(kind, key, sparse, args, work) for kind in TRAINED}
        rows += score_base(key, sparse, runs[key], recipe, task)
    t = recipe.train
    return {"model": recipe.model.name_or_path, "data": recipe.data.dataset or recipe.data.train_file,
            "steps": args.steps, "lr": t.lr, "batch_size": t.batch_size, "seed": t.seed, "r": R, "alpha": ALPHA,
            "eval_samples": args.eval_samples, "calibration_samples": args.samples, "rows": rows, "runs": runs}


# ---------------------------------------------------------------------------------------------
# lors.md


def speed_text(s: dict[str, Any]) -> str:
    lines = [[r["label"], str(r["seq_len"]), f"{r['saved_mib']:,.2f}", f"{r['saved_vs_lora']:.3f}",
              f"{r['ms_per_step']:,.1f}", f"{r['step_vs_lora']:.3f}", f"{r['peak_mib']:,.0f}",
              f"{r['rss_vs_lora']:.3f}"] for r in s["rows"]]
    checks = "\n".join(f"- {'met' if c['met'] else '**missed**'}: {c['target']} — measured {c['measured']}"
                       for c in s["checks"])
    return (f"Memory and time per step: {s['model']} pruned by {BASES[s['sparse_base']][1]}, {s['targets']} linears "
            f"adapted (all but lm_head), r={s['r']}, alpha {s['alpha']:g}; batches of {s['batch_size']} × T tokens, "
            f"every token a label; {s['repeats']} interleaved repeats of {s['steps_per_repeat']} steps.\n\n"
            + common.markdown_table(SPEED_COLUMNS, lines)
            + "\n\nRows: LoRS is sora's layer (a custom autograd Function that saves x, A, B and a reference to W0, "
              "and rebuilds the mask and W_eff in backward), with the approximate or the exact adapter gradients; "
              "LoRA is plain sora LoRA on the same base (its update is dense: the zeros are not kept); masked LoRA, "
              "plain autograd computes (W0 + s·B A) ⊙ (W0 ≠ 0) in the forward and lets autograd store the mask and "
              "W_eff. Saved for backward: exact bytes of the tensors autograd keeps after one forward, each storage "
              "once, the model's parameters and buffers excluded. Step time: median; ratios: median of the "
              "per-repeat ratios. Peak RSS: the training steps, each contestant in its own process.\n\n" + checks)


def quality_text(q: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "–"

    lines = [["dense" if r["base"] == "dense" else BASES[r["base"]][1], ROWS[r["row"]], cell(r, "choice_accuracy"),
              cell(r, "exact_match"), cell(r, "loss"), f"{100 * r['sparsity']:.2f}%",
              f"{r['train_seconds']:.0f}" if "train_seconds" in r else "–"] for r in q["rows"]]
    kept = "; ".join(f"{BASES[k][1]}: {'yes' if runs['lors']['merge']['zero_pattern_kept'] else '**no**'}"
                     for k, runs in q["runs"].items())
    return (f"Quality after merge: {q['model']}, {q['data']}; LoRS (approx gradients, LoRA's init) and LoRA "
            f"(r={q['r']}, alpha {q['alpha']:g}, all linears but lm_head) trained {q['steps']} steps each "
            f"(lr {q['lr']:g}, batch {q['batch_size']}, seed {q['seed']}) on each sparse base (Wanda calibrated on "
            f"{q['calibration_samples']} training examples); test split, "
            f"{q['eval_samples']} examples at most.\n\n"
            + common.markdown_table(QUALITY_COLUMNS, lines)
            + "\n\nRows: the dense base and each sparse base zero-shot; LoRS merged ((W0 + s·B A) ⊙ M: the base's "
              "zeros kept); LoRA merged (W0 + s·B A: every weight changes); LoRA merged then multiplied by the base's "
              "mask (what keeping a sparse model after plain LoRA costs). Sparsity: zeros / weights of the adapted "
              "linears of the scored model. train (s): wall seconds of the training run (engine, evaluations "
              f"included). LoRS merge kept the zero pattern exactly: {kept}.")


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    shown = [data[p] for p in ("speed", "quality") if p in data]
    commands = dict.fromkeys(x.get("command", data["command"]) for x in shown)  # a part run on its own: its command
    parts = [HEADING, f"Machine: {m['cpu']} ({m['torch_threads']} threads); commit {m['commit']}.",
             "\n".join(f"`{c}`" for c in commands)]
    parts += [speed_text(data["speed"])] if "speed" in data else []
    parts += [quality_text(data["quality"])] if "quality" in data else []
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, both parts, a few steps (CI)")
    parser.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--steps", type=int, help="training steps of each quality run (default 100; smoke 4)")
    parser.add_argument("--eval-samples", type=int, help="test (and dev) examples scored (default 300; smoke 8)")
    parser.add_argument("--samples", type=int, help="Wanda calibration examples (default 128; smoke 8)")
    parser.add_argument("--lengths", type=int, nargs="+", help="speed: tokens per row (default 64 128; smoke 16 32)")
    parser.add_argument("--speed-steps", type=int, help="speed: steps per contestant per repeat (default 2)")
    parser.add_argument("--repeats", type=int, help="speed: interleaved repeats (default 4; smoke 2)")
    parser.add_argument("--work", type=Path, help="keep the sparse bases, runs and merged models here "
                                                  "(default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--from-json", type=Path, help="rewrite lors.md beside this lors.json; run nothing")
    parser.add_argument("--memory-children", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (4 if smoke else 100)
    args.eval_samples = args.eval_samples or (8 if smoke else 300)
    args.samples = args.samples or (8 if smoke else 128)
    args.lengths = args.lengths or ([16, 32] if smoke else [64, 128])
    args.speed_steps = args.speed_steps or 2
    args.repeats = args.repeats or (2 if smoke else 4)
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both parts (or the one asked for) in `work`: the measured numbers, by part."""
    if args.smoke:
        write_smoke_files(work)
    t0 = time.perf_counter()
    keys = [SPEED_BASE] if args.part == "speed" else list(BASES)
    bases = sparsify(bench_recipe(args.smoke, work), work, keys, args.samples, args.smoke)
    print(f"[{time.perf_counter() - t0:.0f} s] sparse bases: {', '.join(keys)}", flush=True)
    data: dict[str, Any] = {}
    if args.part in ("speed", "all"):
        data["speed"] = speed_part(args, work, bases[SPEED_BASE])
        print(f"[{time.perf_counter() - t0:.0f} s] part 1 (speed) done", flush=True)
    if args.part in ("quality", "all"):
        data["quality"] = quality_part(args, work, bases)
        print(f"[{time.perf_counter() - t0:.0f} s] part 2 (quality) done", flush=True)
    return data


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    if args.memory_children:
        memory_children(args)
        return Path()
    if args.from_json is not None:
        text = markdown(json.loads(args.from_json.read_text()))
        (args.from_json.parent / "lors.md").write_text(text)
        print(text)
        return args.from_json.parent
    command = "python bench/lors.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if args.smoke:  # one thread, as child_env says; restored after (pytest runs other tests in this process)
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, threads)
        facts = common.machine(torch.device("cpu"))
        out = common.results_dir(args.out, facts, args.smoke)
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        measured = {part: {**numbers, "command": command} for part, numbers in run(args, work).items()}
    previous = json.loads((out / "lors.json").read_text()) if (out / "lors.json").is_file() else {}
    kept = {p: previous[p] for p in ("speed", "quality") if p in previous and args.part not in (p, "all")}
    data = {"machine": facts, "command": command, **kept, **measured}  # --part quality keeps an earlier speed part
    common.write_json(out / "lors.json", data)
    text = markdown(data)
    (out / "lors.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
