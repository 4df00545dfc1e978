"""Step time and peak memory on a causal LM: sora's LoRA and SoRA against PEFT LoRA and the frozen floor, with and
without selective logits and gradient checkpointing.

    python bench/speed_causal.py            # SmolLM2-135M-Instruct (packaged GGUF), the causal quickstart's batches
    python bench/speed_causal.py --smoke    # CI: a tiny random Llama, a few steps

Every contestant is a copy of one loaded base model, adapted on the same targets (all linears, r = 8, alpha 16),
stepped by the engine's own `train_step` on the same fixed batches, interleaved (the order rotates and reverses every
repeat). All use the causal task's loss, which applies the LM head only where a label exists ("selective logits");
the "full logits" rows compute the LM head at every position first, as transformers' own loss does. PEFT's model is
stepped through `get_base_model()` so that its loss is the same function. Peak memory: peak RSS of the training
steps, each contestant in its own process. Writes speed_causal.json and speed_causal.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import causal_setup  # noqa: E402
import common  # noqa: E402
from speed import interleaved_steps, ratio  # noqa: E402

from sora_cli import compiled  # noqa: E402
from sora_cli.adapters import fused, get_method  # noqa: E402
from sora_cli.adapters.inject import inject, select_targets  # noqa: E402
from sora_cli.data import TrainOrder  # noqa: E402
from sora_cli.engine import enable_checkpointing, train_step  # noqa: E402
from sora_cli.models import load_model  # noqa: E402
from sora_cli.optim import build_optimizer  # noqa: E402
from sora_cli.recipe import AdapterConfig, Recipe, load_recipe  # noqa: E402
from sora_cli.tasks.causal_lm import CausalLMTask  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart-causal.yaml"
LABELS = {
    "peft-lora": "PEFT LoRA r=8",
    "sora-lora": "sora LoRA r=8",
    "sora-r8": "sora SoRA r_max=8",
    "peft-lora-full": "PEFT LoRA r=8, full logits",
    "sora-r8-full": "sora SoRA r_max=8, full logits",
    "sora-r8-ckpt": "sora SoRA r_max=8, gradient checkpointing",
    "sora-lora-graph": "sora LoRA r=8, autograd's graph (unfused)",
    "sora-r8-graph": "sora SoRA r_max=8, autograd's graph (unfused)",
    "floor": "frozen base + 1 scalar (floor)",
}
COLUMNS = ["contestant", "ms / step", "step / PEFT LoRA", "step / floor", "peak memory (MiB)", "memory / PEFT LoRA"]


class FullLogits(CausalLMTask):
    """The same loss computed the usual way: logits at every position (B, T, V), then the labelled ones."""

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100, reduction="sum")


def recipe(smoke: bool, workdir: Path, sets: Sequence[str] = ()) -> Recipe:
    overrides = ["data.max_train_samples=400", "data.max_eval_samples=8"]
    if smoke:
        model, data = causal_setup.smoke_data(workdir)
        overrides += [f"model.name_or_path={model}", f"data.train_file={data}", "data.dataset=null"]
    return load_recipe(RECIPE, [*overrides, *sets])


def load(smoke: bool, workdir: Path, sets: Sequence[str] = ()) -> tuple[Recipe, CausalLMTask, nn.Module, Any,
                                                                       list[str], Any]:
    """The recipe (`sets`: overrides), its task, the loaded base model, the tokenizer, its target Linears and the
    encoded train split."""
    r = recipe(smoke, workdir, sets)
    task = CausalLMTask(r.data)
    task.load_data()
    torch.manual_seed(0)
    base, tokenizer = load_model(r.model, task)
    targets = select_targets(base, "all-linear", [])
    return r, task, base, tokenizer, targets, task.encode(tokenizer, r.data.max_length).train


def setup(smoke: bool, workdir: Path, steps: int) -> tuple[Recipe, nn.Module, list[str], list[dict[str, Any]]]:
    """The recipe, the loaded base model, its target Linears and the first `steps` training batches."""
    r, task, base, tokenizer, targets, data = load(smoke, workdir)
    order = TrainOrder(len(data), r.train.batch_size, 0)
    batches = [task.collate(data, order.indices(k)[1], tokenizer.pad_token_id) for k in range(steps)]
    return r, base, targets, batches


def contestant(key: str, r: Recipe, base: nn.Module, targets: list[str], compile: bool = False) -> Any:
    """`step(batch)`: one engine step of a fresh copy of the base adapted as `key` says (`compile`: its blocks
    compiled as train.compile compiles them)."""
    model = copy.deepcopy(base)
    task = (FullLogits if key.endswith("-full") else CausalLMTask)(r.data)
    if key.startswith("peft-lora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        wrapped = get_peft_model(model, config)
        optimizer = build_optimizer(wrapped, [], r.train.lr, 0.0)
        stepped, method = wrapped.get_base_model(), common.Hooks(key)
    elif key == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        scale = nn.Parameter(torch.ones(()))
        model.register_parameter("bench_input_scale", scale)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * scale)
        optimizer, stepped, method = build_optimizer(model, [], r.train.lr, 0.0), model, common.Hooks(key)
    else:
        kind = "lora" if key.startswith("sora-lora") else "sora"
        adapter = AdapterConfig(method=kind, r=8, alpha=16.0, target_modules=tuple(targets),
                                sparse_lambda=r.adapter.sparse_lambda if kind == "sora" else None)
        method = get_method(adapter, r.train)
        inject(model, method, ())
        if key.endswith("-ckpt"):
            enable_checkpointing(model)
        optimizer, stepped = build_optimizer(model, method.param_groups(model), r.train.lr, 0.0), model
    if compile:
        compiled.compile_blocks(model)
    stepped.train()
    return Step(stepped, task, method, optimizer, unfused=key.endswith("-graph"))


class Step:
    """`step(batch)`: one engine `train_step` of a contestant (max_grad_norm 1, no autocast), steps counted."""

    def __init__(self, model: nn.Module, task: CausalLMTask, method: Any, optimizer: torch.optim.Optimizer,
                 unfused: bool = False):
        self.model, self.task, self.method, self.optimizer = model, task, method, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.count, self.unfused = 0, unfused

    def __call__(self, batch: dict[str, Any]) -> Any:
        self.count += 1
        with unfused() if self.unfused else contextlib.nullcontext():
            return train_step(self.model, self.task, self.method, self.optimizer, [batch], self.params, 1.0,
                              contextlib.nullcontext(), self.count - 1)


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """sora's adapted layers as autograd builds them from their ops (before adapters/fused.py): the cut, measured."""
    saved = fused.applies
    fused.applies = lambda *args: False
    try:
        yield
    finally:
        fused.applies = saved


def time_steps(keys: list[str], r: Recipe, base: nn.Module, targets: list[str], batches: list[dict[str, Any]],
               repeats: int) -> dict[str, list[float]]:
    return interleaved_steps({key: contestant(key, r, base, targets) for key in keys}, batches, repeats)


def peak_memory(keys: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS (MiB) of each contestant's training steps, one fresh process at a time (each loads the model)."""
    peaks = {}
    for key in keys:
        cmd = [sys.executable, __file__, "--child", key, "--steps", str(args.steps)]
        cmd += ["--smoke"] if args.smoke else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {key} failed:\n{proc.stderr[-2000:]}")
        peaks[key] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return peaks


def child(key: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r, base, targets, batches = setup(args.smoke, Path(tmp), args.steps)
        step = contestant(key, r, base, targets)
        del base  # only the contestant's own copy stays
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        for batch in batches:
            step(batch)
        status = Path("/proc/self/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    print(json.dumps({"key": key, "peak_mib": peak}))


def rows(times: dict[str, list[float]], memory: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {key: {"label": LABELS[key], "ms_per_step": 1000 * statistics.median(t),
                  "vs_peft_lora": ratio(times, key, "peft-lora"), "vs_floor": ratio(times, key, "floor"),
                  "peak_mib": memory[key], "memory_vs_peft_lora": memory[key] / memory["peft-lora"],
                  "repeats_ms": [1000 * x for x in t]} for key, t in times.items()}


def targets_met(table: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    lora, sora = table["sora-lora"]["vs_peft_lora"], ratio_of(table, "sora-r8", "sora-lora")
    floor_sora, floor_lora = table["sora-r8"]["vs_floor"], table["sora-lora"]["vs_floor"]
    sora_peft = table["sora-r8"]["vs_peft_lora"]
    return [("sora LoRA step time ≤ 1.0 × PEFT LoRA's", f"{lora:.3f}×", lora <= 1.0),
            ("SoRA step time ≤ 1.05 × sora LoRA's", f"{sora:.3f}×", sora <= 1.05),
            ("SoRA step time ≤ 1.2 × the frozen floor's", f"{floor_sora:.3f}×", floor_sora <= 1.2),
            ("sora LoRA step time ≤ 1.15 × the frozen floor's", f"{floor_lora:.3f}×", floor_lora <= 1.15),
            ("SoRA step time ≤ PEFT LoRA's", f"{sora_peft:.3f}×", sora_peft <= 1.0)]


def ratio_of(table: dict[str, dict[str, Any]], key: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(table[key]["repeats_ms"], table[ref]["repeats_ms"]))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, a few steps (CI)")
    parser.add_argument("--steps", type=int, help="training steps per contestant per repeat (default 3; smoke 2)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 4; smoke 2)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--child", choices=list(LABELS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 3)
    args.repeats = args.repeats or (2 if args.smoke else 4)
    if args.child:
        child(args.child, args)
        return Path()
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    keys = list(LABELS)
    with tempfile.TemporaryDirectory() as tmp:
        r, base, targets, batches = setup(args.smoke, Path(tmp), args.steps)
        print(f"{r.model.name_or_path}: {len(targets)} target modules; timing {len(keys)} contestants", flush=True)
        times = time_steps(keys, r, base, targets, batches, args.repeats)
        tokens = [int(b["attention_mask"].sum()) for b in batches]
    table = rows(times, peak_memory(keys, args))
    checks = targets_met(table)
    command = "python bench/speed_causal.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "speed_causal.json", {"machine": facts, "model": r.model.name_or_path, "command": command,
                                                 "steps_per_repeat": args.steps, "repeats": args.repeats,
                                                 "batch_size": r.train.batch_size, "tokens_per_batch": tokens,
                                                 "training": table,
                                                 "targets": [{"target": t, "measured": v, "met": ok}
                                                             for t, v, ok in checks]})
    lines = [[x["label"], f"{x['ms_per_step']:.0f}", f"{x['vs_peft_lora']:.3f}", f"{x['vs_floor']:.3f}",
              f"{x['peak_mib']:,.0f}", f"{x['memory_vs_peft_lora']:.3f}"] for x in table.values()]
    text = (f"### Causal LM: step time and memory\n\n{r.model.name_or_path}, the causal quickstart's batches "
            f"(batch {r.train.batch_size}, {min(tokens)}–{max(tokens)} tokens a batch), all linears, r=8; "
            f"{args.repeats} interleaved repeats of {args.steps} steps. Machine: {facts['cpu']} "
            f"({facts['torch_threads']} threads); commit {facts['commit']}.\n\n`{command}`\n\n"
            + common.markdown_table(COLUMNS, lines)
            + "\n\nRatios: median of the per-repeat ratios. Memory: peak RSS of the training steps, own process.\n\n"
            + common.target_lines(checks)
            + "\n")
    (out / "speed_causal.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
