"""Memory and step time per process: one process, data parallel (DDP) and FSDP2 (train.strategy: fsdp) on 2
processes, with `sora plan`'s prediction beside every measurement.

    python bench/fsdp.py                       # SmolLM2-135M and a ~1.2B Llama (random weights), on this CPU
    python bench/fsdp.py --models smollm2      # SmolLM2 only (minutes)
    python bench/fsdp.py --smoke               # CI: a tiny random Llama, one step each

The models, recipe and batches are bench/memory.py's (the causal quickstart's data, every batch padded to 8 × 128
tokens, LoRA r = 8 on all linears but lm_head, float32). Each contestant is sora's own training path: `engine.prepare`
under the strategy (FSDP2 shards the base there), then the engine's `train_step` on this process's slice of each
global batch. Each runs in its own launch (torchrun for 2 processes), twice: once for memory, with glibc's mmap
threshold fixed at 1 MiB so that freed tensors leave RSS, once for time with the default allocator. Per process:

- weights: the exact bytes of the base's tensors this process holds between steps (its shards under FSDP2; the
  adapters excluded);
- peak: the highest RSS over a warm-up step and one more (VmHWM, reset after loading) minus RSS before loading; the
  largest over the processes. Loading itself is not counted: every process reads the whole checkpoint before FSDP2
  shards it (see README "Sharding the base");
- step time: median of the timed steps after a warm-up (1 thread per process under torchrun; 2 in one process).
"""

from __future__ import annotations

import argparse
import contextlib
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
import memory  # noqa: E402

from sora_cli.engine import prepare, synchronise, train_step  # noqa: E402
from sora_cli.recipe import Recipe  # noqa: E402
from sora_cli.strategy import choose  # noqa: E402

CONTESTANTS = {"single": ("one process", 1), "ddp": ("DDP, 2 processes", 2), "fsdp": ("FSDP2, 2 processes", 2)}
COLUMNS = ["model", "contestant", "weights / process (MiB)", "weights / DDP's", "peak / process (MiB)",
           "plan (MiB)", "plan / peak", "s / step", "step / one process"]


def bench_recipe(model_dir: Path, key: str, smoke: bool, work: Path) -> Recipe:
    """bench/memory.py's float32 LoRA recipe under the contestant's strategy."""
    strategy = "auto" if key == "single" else key
    return memory.recipe(model_dir, "float32", "sora-lora", smoke, work,
                         (f"train.strategy={strategy}", f"train.output_dir={work / 'runs' / key}"))


def local_bytes(model: torch.nn.Module) -> int:
    """The base's tensors held by this process: frozen parameters (a DTensor's local shard) and buffers."""
    from sora_cli.quantization import tensor_bytes

    held = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters() if not p.requires_grad]
    return tensor_bytes(held + list(model.buffers()))


def worker(args: argparse.Namespace) -> None:
    """One process of a contestant's launch: prepare the run under its strategy, step it, report (rank 0)."""
    from sora_cli import dist

    world = dist.start("cpu")
    r = bench_recipe(Path(args.model_dir), args.key, args.smoke, Path(args.work))
    out, strategy = Path(r.train.output_dir or args.work), choose(r.train, world)
    prepare(r, out, args.steps + 1, choose(r.train, world))  # a first run, dropped: what loading imports, once
    memory.settle_heap()
    before = memory.rss_mib()
    run = prepare(r, out, args.steps + 1, strategy)
    synchronise(run)
    if args.key != "fsdp":
        memory.own_memory(run.model)
    memory.settle_heap()
    weights = local_bytes(run.model)
    run.model.train()
    pad = run.tokenizer.pad_token_id
    Path("/proc/self/clear_refs").write_text("5")
    seconds, labels = [], []
    for k in range(args.steps + 1):
        mine, placeholder = run.strategy.batch(run.order.indices(k)[1])
        batch = memory.full_length(run.task.collate(run.data.train, mine, pad), r.data.max_length, pad)
        t0 = time.perf_counter()
        train_step(run.model, run.task, run.method, run.optimizer, [batch], run.params, 1.0, run.ctx.autocast, k,
                   run.strategy, int(placeholder))
        seconds.append(time.perf_counter() - t0)
        labels.append(math.ceil(run.task.count(batch) / len(batch["input_ids"])))
    peaks = world.gather(memory.peak_mib() - before)
    label_tokens = max(sum(world.gather(labels), []))
    if world.main:
        print(json.dumps({"weights_mib": weights / memory.MIB, "peak_mib": max(peaks), "peaks_mib": peaks,
                          "step_s": seconds[1:], "label_tokens": label_tokens, "processes": world.size}))
    dist.stop()


def measure(model_dir: Path, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The contestant's memory (mmap threshold 1 MiB) and step time (default allocator), each its own launch."""
    n = CONTESTANTS[key][1]
    found: dict[str, Any] = {}
    for mode, env in (("memory", {"MALLOC_MMAP_THRESHOLD_": str(2**20)}), ("time", {})):
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={n}"]
        cmd = [*launch, __file__, "--child", "--key", key, "--model-dir", str(model_dir), "--steps",
               str(args.steps), "--work", str(args.work), *(["--smoke"] if args.smoke else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            raise SystemExit(f"{model_dir.name} {key} ({mode}) failed:\n{proc.stderr[-3000:]}")
        x = json.loads(proc.stdout.strip().splitlines()[-1])
        found.update({k: v for k, v in x.items() if mode == "memory" or k == "step_s"})
    return found


def planned_mib(model_dir: Path, key: str, args: argparse.Namespace, label_tokens: int) -> float:
    """`sora plan`'s peak per process for the same recipe and number of processes."""
    from sora_cli.plan import plan

    r = bench_recipe(model_dir, key, args.smoke, Path(args.work))
    report = plan(r, processes=CONTESTANTS[key][1], label_tokens=label_tokens,
                  strategy=None if key == "single" else key)
    return float(report["bytes"]["peak"]) / memory.MIB


def table_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for model, by_key in results.items():
        one, ddp = statistics.median(by_key["single"]["step_s"]), by_key["ddp"]["weights_mib"]
        for key, x in by_key.items():
            step = statistics.median(x["step_s"])
            rows.append({"model": model, "key": key, "contestant": CONTESTANTS[key][0], **x, "step_median_s": step,
                         "weights_vs_ddp": x["weights_mib"] / ddp, "plan_vs_peak": x["plan_mib"] / x["peak_mib"],
                         "step_vs_single": step / one})
    return rows


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    checks = []
    for r in rows:
        where = f"{r['model']} {r['contestant']}"
        if r["key"] == "fsdp":
            checks.append((f"{where}: weights per process ≤ 0.55 × DDP's", f"{r['weights_vs_ddp']:.3f}×",
                           r["weights_vs_ddp"] <= 0.55))
        checks.append((f"{where}: sora plan within ±25% of the measured peak", f"{r['plan_vs_peak']:.3f}×",
                       0.75 <= r["plan_vs_peak"] <= 1.25))
    return checks


def render(rows: list[dict[str, Any]], checks: list[tuple[str, str, bool]], facts: dict[str, Any], command: str,
           steps: int) -> str:
    lines = [[r["model"], r["contestant"], f"{r['weights_mib']:,.0f}", f"{r['weights_vs_ddp']:.3f}",
              f"{r['peak_mib']:,.0f}", f"{r['plan_mib']:,.0f}", f"{r['plan_vs_peak']:.2f}",
              f"{r['step_median_s']:.2f}", f"{r['step_vs_single']:.3f}"] for r in rows]
    return (f"### Memory per process: one process, DDP and FSDP2\n\nBatches of 8 × {memory.LENGTH} tokens (global), "
            f"sora LoRA r=8 on all linears but lm_head, float32; {steps} timed steps after a warm-up, each "
            f"contestant in its own launch. Machine: {facts['cpu']} ({facts['torch_threads']} threads); commit "
            f"{facts['commit']}.\n\n`{command}`\n\n" + common.markdown_table(COLUMNS, lines)
            + "\n\nWeights: the exact bytes of the base's tensors one process holds between steps (FSDP2: its "
            "shards). Peak: the highest RSS of a warm-up step and one more, minus RSS before loading, the largest "
            "over the processes. Plan: `sora plan --processes N --strategy S`'s peak for the same recipe. Under "
            "torchrun each process has one thread, so on 2 cores the step times compare the strategies' "
            "communication and placeholders, not a speed-up.\n\n"
            + common.target_lines(checks)
            + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = memory.arguments(__doc__.splitlines()[0])
    parser.add_argument("--key", choices=list(CONTESTANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.smoke else 2)
    if args.child:
        worker(args)
        return Path()
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        args.work = (args.work or Path(tmp)).resolve()
        args.work.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[str, dict[str, Any]]] = {}
        for name, directory in memory.model_dirs(args.models, args.work, args.smoke).items():
            for key in CONTESTANTS:
                x = measure(directory, key, args)
                x["plan_mib"] = planned_mib(directory, key, args, x["label_tokens"])
                results.setdefault(name, {})[key] = x
                print(f"{name} {key}: {json.dumps(x)}", flush=True)
    rows = table_rows(results)
    checks = targets(rows)
    command = "python bench/fsdp.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "fsdp.json", {"machine": facts, "command": command, "rows": rows,
                                         "targets": [{"target": t, "measured": v, "met": ok} for t, v, ok in checks]})
    text = render(rows, checks, facts, command, args.steps)
    (out / "fsdp.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
