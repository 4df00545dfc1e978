"""Memory and step time of a quantized base: float32, bfloat16 and 4-bit NF4 bases under sora's SoRA and LoRA and
PEFT's LoRA (with bitsandbytes for NF4) at equal r, with `sora plan`'s prediction beside every measurement.

    python bench/memory.py                      # SmolLM2-135M and a ~1.2B Llama (random weights), on this CPU
    python bench/memory.py --models smollm2     # SmolLM2 only (minutes)
    python bench/memory.py --smoke              # CI: a tiny random Llama, one step each

Models: SmolLM2-135M-Instruct (the packaged GGUF, dequantised once and saved as safetensors, so that transformers
quantizes it while loading for sora and PEFT alike) and a Llama of TinyLlama-1.1B's shape with SmolLM2's vocabulary
(1.17B parameters, seeded random weights saved once in bfloat16). Bases: float32; bfloat16 (weights and autocast);
NF4 with double quantization and bfloat16 compute over a bfloat16 model (QLoRA's setting). Every contestant adapts
all linears but lm_head with r = 8, alpha 16, on the causal quickstart's batches (batch 8), stepped by the engine's
`train_step`, and runs in its own process, which measures:

- weights: the exact bytes of the base model's tensors (4-bit codes and their quantization statistics included), and
  the resident memory loading adds (RSS after loading minus RSS before; tensors loaded zero-copy from the mapped
  checkpoint are copied into the process's own memory first, and the model is loaded once before, so that the
  libraries loading imports are not counted);
- peak: the highest RSS over a warm-up step and one more (VmHWM, reset after loading) minus RSS before loading: what
  the model, its adapters, gradients, optimizer state and activations take, the process's libraries excluded;
  glibc's mmap threshold is fixed at 1 MiB there (MALLOC_MMAP_THRESHOLD_), so that a freed tensor leaves RSS as
  it leaves a GPU allocator's live bytes, instead of staying in the heap;
- step time: median of the timed steps after one warm-up step, in another process with the default allocator.

`sora plan`'s peak for the same recipe stands beside each peak. Writes memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from sora_cli.adapters import get_method  # noqa: E402
from sora_cli.adapters.inject import inject, select_targets  # noqa: E402
from sora_cli.data import TrainOrder  # noqa: E402
from sora_cli.engine import train_step  # noqa: E402
from sora_cli.models import load_model  # noqa: E402
from sora_cli.optim import build_optimizer  # noqa: E402
from sora_cli.recipe import Recipe, load_recipe  # noqa: E402
from sora_cli.tasks.causal_lm import CausalLMTask  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart-causal.yaml"
MIB = 2**20
LENGTH = 128  # tokens per example: every batch is padded to it (8 x 128 tokens a step)
BASES: dict[str, list[str]] = {  # recipe overrides of each base
    "float32": ["model.dtype=float32", "train.precision=fp32"],
    "bfloat16": ["model.dtype=bfloat16", "train.precision=bf16"],
    "nf4": ["model.dtype=bfloat16", "train.precision=bf16", "model.quantization=nf4",
            "model.double_quantization=true", "model.compute_dtype=bfloat16"],
}
ADAPTERS = {"sora-sora": "sora SoRA r_max=8", "sora-lora": "sora LoRA r=8", "peft-lora": "PEFT LoRA r=8"}
COLUMNS = ["model", "base", "contestant", "weights (MiB)", "weights / bf16", "peak (MiB)", "plan (MiB)",
           "plan / peak", "peak / PEFT", "s / step", "step / PEFT"]


# ---------------------------------------------------------------------------------------------
# Models, saved once


def model_dirs(names: list[str], work: Path, smoke: bool) -> dict[str, Path]:
    """{name: a transformers directory (safetensors + tokenizer)}, each built once under `work`."""
    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

        tiny = work / "tiny-llama"
        return {"tiny": tiny if tiny.is_dir() else save_tiny_causal_model(tiny, tiny_causal_tokenizer())}
    dirs = {"smollm2": work / "smollm2", "llama-1b": work / "llama-1b"}
    if not (dirs["smollm2"] / "config.json").is_file():
        base, tokenizer = load_model(load_recipe(RECIPE).model, CausalLMTask(load_recipe(RECIPE).data))
        base.save_pretrained(dirs["smollm2"])
        tokenizer.save_pretrained(dirs["smollm2"])
    if "llama-1b" in names and not (dirs["llama-1b"] / "config.json").is_file():
        save_llama_1b(dirs["llama-1b"], dirs["smollm2"])
    return {n: dirs[n] for n in names}


def save_llama_1b(directory: Path, tokenizer_dir: Path) -> None:
    """TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632) with SmolLM2's tokenizer and
    vocabulary (49,152), seeded random weights, saved in bfloat16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# One contestant, in its own process


def recipe(model_dir: Path, base: str, adapter: str, smoke: bool, work: Path, extra: tuple[str, ...] = ()) -> Recipe:
    """The causal quickstart on `model_dir` with `base`'s settings, `adapter`'s method, and `extra` overrides."""
    overrides = [f"model.name_or_path={model_dir}", *BASES[base], "data.max_train_samples=200",
                 "data.max_eval_samples=8", f"data.max_length={LENGTH}",
                 f"adapter.method={'lora' if adapter == 'sora-lora' else 'sora'}"]
    if adapter == "sora-lora":
        overrides.append("adapter.sparse_lambda=null")
    if smoke:
        rows = [{"instruction": "classify the sentiment of this review", "input": f"the film was {w}",
                 "output": "positive" if w in ("good", "great") else "negative"}
                for w in ["good", "bad", "great", "awful"] * 8]
        (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        overrides += [f"data.train_file={work / 'data.jsonl'}", "data.dataset=null"]
    return load_recipe(RECIPE, [*overrides, *extra])


def full_length(batch: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch right-padded to `length` tokens (B, length): every step holds exactly the tokens `sora plan` is told
    (batch × data.max_length), whatever the examples' own lengths."""
    pad = length - batch["input_ids"].shape[1]
    values = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, pad), value=values[k]) for k, v in batch.items()}


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def peak_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def settle_heap() -> None:
    """Return freed memory to the system, so that RSS counts what is live (loading leaves freed buffers behind)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def own_memory(model: torch.nn.Module) -> None:
    """Copy every tensor loaded zero-copy from the memory-mapped checkpoint into the process's own memory (tied
    weights stay tied), so that RSS counts what the model holds: a mapped tensor counts only once touched, and the
    mapping keeps the pages of weights that were read and quantized resident although nothing refers to them."""
    seen: set[int] = set()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is None or id(t) in seen or type(t).__name__ in ("Params4bit", "Int8Params"):
                    continue
                seen.add(id(t))
                t.data = t.data.clone()


def tensor_bytes(model: torch.nn.Module) -> int:
    """Exact bytes of the base model: its frozen parameters and buffers (the trained adapters excluded)."""
    from sora_cli.quantization import tensor_bytes as held

    return held([p for p in model.parameters() if not p.requires_grad] + list(model.buffers()))


def build(r: Recipe, adapter: str, task: CausalLMTask) -> tuple[torch.nn.Module, Any, Any, list[torch.nn.Parameter]]:
    """(the stepped model, its method hooks, its optimizer, its trainable parameters)."""
    if adapter == "peft-lora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from sora_cli import quantization

        kwargs: dict[str, Any] = {"dtype": getattr(torch, r.model.dtype)}
        if r.model.quantization:
            kwargs["quantization_config"] = quantization.bnb_config(r.model)
        model = AutoModelForCausalLM.from_pretrained(r.model.name_or_path, **kwargs)
        targets = select_targets(model, "all-linear", [])
        wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                                   task_type="CAUSAL_LM"))
        own_memory(model)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped.get_base_model(), common.Hooks(adapter), build_optimizer(wrapped, [], r.train.lr, 0.0), params
    model, _ = load_model(r.model, task)
    own_memory(model)
    method = get_method(r.adapter, r.train)
    inject(model, method, ())
    params = [p for p in model.parameters() if p.requires_grad]
    return model, method, build_optimizer(model, method.param_groups(model), r.train.lr, 0.0), params


def child(args: argparse.Namespace) -> None:
    """One contestant: `--mode memory` loads it and measures weights and the peak over a warm-up step and one more;
    `--mode time` times `--steps` steps after a warm-up."""
    r = recipe(Path(args.model_dir), args.base, args.adapter, args.smoke, Path(args.work))
    task = CausalLMTask(r.data)
    task.load_data()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(r.model.name_or_path)
    data = task.encode(tokenizer, r.data.max_length).train
    order = TrainOrder(len(data), r.train.batch_size, 0)
    steps = 1 if args.mode == "memory" else args.steps
    batches = [full_length(task.collate(data, order.indices(k)[1], tokenizer.pad_token_id), r.data.max_length,
                           tokenizer.pad_token_id) for k in range(steps + 1)]
    build(r, args.adapter, task)  # a first load, dropped: imports and initialises what loading needs, once
    settle_heap()
    before = rss_mib()
    model, method, optimizer, params = build(r, args.adapter, task)
    settle_heap()
    weights = rss_mib() - before
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if r.train.precision == "bf16" else contextlib.nullcontext()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    seconds = []
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, task, method, optimizer, [batch], params, 1.0, autocast, k)
        seconds.append(time.perf_counter() - t0)
    if args.mode == "time":
        print(json.dumps({"step_s": seconds[1:], "tokens": [int(b["attention_mask"].sum()) for b in batches[1:]]}))
        return
    print(json.dumps({"weights_rss_mib": weights, "weights_mib": tensor_bytes(model) / MIB,
                      "peak_mib": peak_mib() - before,
                      "label_tokens": max(math.ceil(task.count(b) / len(b["input_ids"])) for b in batches),
                      "trainable": sum(p.numel() for p in params)}))


def measure(model_dir: Path, base: str, adapter: str, args: argparse.Namespace) -> dict[str, Any]:
    """The contestant's memory (its own process, glibc's mmap threshold fixed at 1 MiB so that freed tensors leave
    RSS, as they leave a GPU allocator's live bytes) and its step time (another process, the default allocator)."""
    found: dict[str, Any] = {}
    for mode, env in (("memory", {"MALLOC_MMAP_THRESHOLD_": str(2**20)}), ("time", {})):
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model-dir", str(model_dir), "--base", base,
               "--adapter", adapter, "--steps", str(args.steps), "--work", str(args.work)]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True,
                              env={**os.environ, **env})
        if proc.returncode != 0:
            raise SystemExit(f"{model_dir.name} {base} {adapter} ({mode}) failed:\n{proc.stderr[-3000:]}")
        found.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return found


def planned_mib(model_dir: Path, base: str, adapter: str, args: argparse.Namespace, label_tokens: int) -> float:
    """`sora plan`'s peak for the same recipe, one process, told the labelled tokens per example (the batches'
    largest: the one-word answers and the end-of-turn token)."""
    from sora_cli.plan import plan

    report = plan(recipe(model_dir, base, adapter, args.smoke, Path(args.work)), label_tokens=label_tokens)
    return float(report["bytes"]["peak"]) / MIB


def table_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model, base, contestant), with the ratios to bf16's weights and to PEFT on the same base."""
    rows = []
    for model, by_base in results.items():
        for base, by_adapter in by_base.items():
            peft = by_adapter["peft-lora"]
            for adapter, x in by_adapter.items():
                step = statistics.median(x["step_s"])
                rows.append({"model": model, "base": base, "contestant": ADAPTERS[adapter], "key": adapter, **x,
                             "step_median_s": step,
                             "weights_vs_bf16": x["weights_mib"] / by_base["bfloat16"][adapter]["weights_mib"]
                             if "bfloat16" in by_base else None,
                             "plan_vs_peak": x["plan_mib"] / x["peak_mib"],
                             "peak_vs_peft": x["peak_mib"] / peft["peak_mib"],
                             "step_vs_peft": step / statistics.median(peft["step_s"])})
    return rows


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    checks = []
    for r in rows:
        where = f"{r['model']} {r['base']} {r['contestant']}"
        if r["base"] == "nf4" and r["weights_vs_bf16"] is not None:
            checks.append((f"{where}: weights' memory ≤ 0.35 × bf16's", f"{r['weights_vs_bf16']:.3f}×",
                           r["weights_vs_bf16"] <= 0.35))
        if r["base"] == "nf4" and r["key"].startswith("sora"):
            checks.append((f"{where}: step ≤ 1.05 × PEFT QLoRA's", f"{r['step_vs_peft']:.3f}×",
                           r["step_vs_peft"] <= 1.05))
            checks.append((f"{where}: peak ≤ 1.0 × PEFT QLoRA's", f"{r['peak_vs_peft']:.3f}×", r["peak_vs_peft"] <= 1))
        if r["key"].startswith("sora"):
            checks.append((f"{where}: sora plan within ±25% of the measured peak", f"{r['plan_vs_peak']:.3f}×",
                           0.75 <= r["plan_vs_peak"] <= 1.25))
    return checks


def render(rows: list[dict[str, Any]], checks: list[tuple[str, str, bool]], facts: dict[str, Any], command: str,
           steps: int) -> str:
    lines = [[r["model"], r["base"], r["contestant"], f"{r['weights_mib']:,.0f}",
              "–" if r["weights_vs_bf16"] is None else f"{r['weights_vs_bf16']:.3f}", f"{r['peak_mib']:,.0f}",
              f"{r['plan_mib']:,.0f}", f"{r['plan_vs_peak']:.2f}", f"{r['peak_vs_peft']:.3f}",
              f"{r['step_median_s']:.2f}", f"{r['step_vs_peft']:.3f}"] for r in rows]
    return (f"### Memory: quantized bases\n\nBatches of 8 × {LENGTH} tokens from the causal quickstart's data, all "
            f"linears but lm_head, r=8; {steps} timed steps after a warm-up, each contestant in its own process. "
            f"Machine: {facts['cpu']} ({facts['torch_threads']} threads); commit {facts['commit']}; bitsandbytes "
            f"{facts.get('bitsandbytes', '?')}.\n\n`{command}`\n\n" + common.markdown_table(COLUMNS, lines)
            + "\n\nWeights: the exact bytes of the base model's tensors. Peak: the highest RSS of a warm-up step and "
            "one more, minus RSS before loading (glibc's mmap threshold fixed at 1 MiB, so freed tensors leave RSS). "
            "Plan: `sora plan`'s peak for the same recipe. NF4: double quantization, bfloat16 compute, bfloat16 "
            "elsewhere; PEFT loads the same directory through transformers with the same BitsAndBytesConfig.\n\n"
            + common.target_lines(checks)
            + "\n")


def arguments(description: str) -> argparse.ArgumentParser:
    """The options this bench and bench/fsdp.py share (their models, steps, folders, and a child's model)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, one step each (CI)")
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=["smollm2", "llama-1b"])
    parser.add_argument("--steps", type=int, help="timed steps per contestant (default 2; smoke 1)")
    parser.add_argument("--work", type=Path, help="where the saved models live (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> Path:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--base", choices=list(BASES), help=argparse.SUPPRESS)
    parser.add_argument("--adapter", choices=list(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.smoke else 2)
    if args.child:
        child(args)
        return Path()
    facts = common.machine(torch.device("cpu"))
    with contextlib.suppress(ImportError):
        facts["bitsandbytes"] = __import__("bitsandbytes").__version__
    out = common.results_dir(args.out, facts, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        dirs = model_dirs(args.models, args.work, args.smoke)
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name, directory in dirs.items():
            for base in BASES:
                for adapter in ADAPTERS:
                    x = measure(directory, base, adapter, args)
                    x["plan_mib"] = planned_mib(directory, base, adapter, args, x["label_tokens"])
                    results.setdefault(name, {}).setdefault(base, {})[adapter] = x
                    print(f"{name} {base} {adapter}: {json.dumps(x)}", flush=True)
    rows = table_rows(results)
    checks = targets(rows)
    command = "python bench/memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "memory.json", {"machine": facts, "command": command, "length": LENGTH, "rows": rows,
                                           "targets": [{"target": t, "measured": v, "met": ok}
                                                       for t, v, ok in checks]})
    text = render(rows, checks, facts, command, args.steps)
    (out / "memory.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
