"""Step time, peak memory and inference latency: sora's LoRA and SoRA against PEFT LoRA and AdaLoRA.

    python bench/speed.py                  # quickstart model and data, on this machine's CPU
    python bench/speed.py --device cuda    # the same on a GPU
    python bench/speed.py --smoke          # CI: tiny random BERT, a few steps, under a minute

Training step: one full `engine.train_step` (forward, backward, clip, AdamW, the method's after-step hook) on
the same fixed batches for every contestant, interleaved (the order rotates and reverses every repeat so no
contestant always runs first); the ratio to PEFT LoRA is the median of the per-repeat ratios. The frozen floor
is the same model with every weight frozen and one trainable scalar on the input embeddings: what a zero-cost
adapter would take. AdaLoRA is timed in its budget phase (sensitivity update every step, re-masking every ΔT).
Peak memory: each contestant in its own process (peak RSS during the training steps on CPU,
`torch.cuda.max_memory_allocated` on GPU). Inference: base model, merged SoRA and the unmerged pruned SoRA
on the same test batches. Writes speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
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
from sora_cli.adapters import adapter_layers  # noqa: E402

TRAINING = ("peft-lora", "sora-lora", "sora-r8", "peft-adalora", "floor")
INFERENCE = ("base", "merged", "pruned")
INFERENCE_LABELS = {"base": "base model (no adapter)", "merged": "sora SoRA r_max=8, merged",
                    "pruned": "sora SoRA r_max=8, pruned, unmerged"}
TRAIN_COLUMNS = ["contestant", "ms / step", "step / PEFT LoRA", "step / floor", "peak memory (MiB)",
                 "memory / PEFT LoRA"]
INFER_COLUMNS = ["model", "ms / batch", "latency / base", "repeat spread"]


def contestant(key: str, setup: common.Setup, s: common.Settings) -> tuple[common.Contestant, Any]:
    """The contestant (seed 0) and `step(batch)`, which passes it the step index `step_numbers` gives."""
    c = common.frozen_floor(setup, s, 0) if key == "floor" else common.build(key, setup, s, 0)
    step_once, numbers = common.stepper(c, s, setup.task), step_numbers(key, s)
    return c, lambda batch: step_once(batch, next(numbers))


def step_numbers(key: str, s: common.Settings):
    """The step index each timed step passes to the hooks: AdaLoRA's stays inside its budget phase."""
    sched = common.adalora_schedule(s.steps)
    lo, span = sched["tinit"] + 1, sched["total_step"] - sched["tfinal"] - sched["tinit"] - 1
    k = 0
    while True:
        yield lo + k % span if key == "peft-adalora" else k
        k += 1


def interleaved(run: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Each repeat calls every run[key]() once, in an order that rotates and reverses: seconds per call."""
    keys = list(run)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(repeats):
        order = keys[i % len(keys):] + keys[: i % len(keys)]
        for key in (order if i % 2 == 0 else order[::-1]):
            times[key].append(run[key]())
    return times


def interleaved_steps(steps: dict[str, Any], batches: list[Any], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each steps[key](batch) over all `batches`, after one warm-up pass (allocator, AdamW
    state), in `interleaved` repeats."""
    run = {}
    for key, step in steps.items():

        def one_pass(step: Any = step) -> float:
            t0 = time.perf_counter()
            for batch in batches:
                step(batch)
            return (time.perf_counter() - t0) / len(batches)

        one_pass()
        run[key] = one_pass
    return interleaved(run, repeats)


def ratio(times: dict[str, list[float]], key: str, ref: str) -> float:
    return statistics.median(a / b for a, b in zip(times[key], times[ref]))


def spread(values: list[float]) -> float:
    """Repeat-to-repeat spread, (max - min) / median."""
    return (max(values) - min(values)) / statistics.median(values)


def time_training(setup: common.Setup, s: common.Settings, steps: int, repeats: int) -> dict[str, list[float]]:
    batches = common.fixed_batches(setup, s, 0, steps)
    run = {}
    for key in TRAINING:
        _, step = contestant(key, setup, s)

        def one_pass(step=step) -> float:
            common.sync(setup.device)
            t0 = time.perf_counter()
            for batch in batches:
                step(batch)
            common.sync(setup.device)
            return (time.perf_counter() - t0) / len(batches)

        one_pass()  # warm-up: allocator, kernels, AdamW state
        run[key] = one_pass
    return interleaved(run, repeats)


def profile(setup: common.Setup, s: common.Settings, keys: tuple[str, ...], steps: int, out: Path) -> None:
    """torch.profiler over `steps` training steps of each contestant: the ops that take the time, by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batches = common.fixed_batches(setup, s, 0, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    for key in keys:
        c, step = contestant(key, setup, s)
        for batch in batches[:2]:  # warm-up
            step(batch)
        with torch_profile(activities=activities) as prof:
            for batch in batches:
                step(batch)
            common.sync(setup.device)
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (out / f"profile-{key}.txt").write_text(f"{c.label}: {steps} steps\n{table}\n")
        print(f"{out / f'profile-{key}.txt'}")


def peak_memory(keys: tuple[str, ...], args: argparse.Namespace) -> dict[str, float]:
    """Peak memory (MiB) of each contestant's training steps, each measured in its own fresh process (the
    processes run side by side: a process's peak is its own, whatever runs beside it)."""
    procs = {}
    for key in keys:
        cmd = [sys.executable, __file__, "--child", key, "--steps", str(args.steps), "--device", args.device]
        procs[key] = subprocess.Popen(cmd + (["--smoke"] if args.smoke else []), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    peaks = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {key} failed:\n{stderr[-2000:]}")
        peaks[key] = json.loads(stdout.strip().splitlines()[-1])["peak_mib"]
    return peaks


def child(key: str, args: argparse.Namespace) -> None:
    s = common.settings(args.smoke)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        setup = common.load_setup(s, args.smoke, Path(tmp), args.device)
        _, step = contestant(key, setup, s)
        batches = common.fixed_batches(setup, s, 0, args.steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        for batch in batches:
            step(batch)
        common.sync(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            status = Path("/proc/self/status").read_text()
            peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    print(json.dumps({"key": key, "peak_mib": peak}))


def time_inference(setup: common.Setup, s: common.Settings, batches_n: int, repeats: int,
                   keep: float) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Base, merged and pruned-unmerged models on the same test batches. The SoRA adapter is a trained-like
    one: B random (so merging changes every weight) and a seeded `keep` fraction of the gates left non-zero."""
    sora = common.build("sora-r8", setup, s, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(sora.model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
            layer.gate.mul_((torch.rand(layer.r, generator=gen) < keep).to(layer.gate.dtype))
    models = {"base": setup.base(0).to(setup.device).eval(), **common.adapter_copies(sora, setup, 0, ("merged", "pruned"))}
    size = s.batch_size
    batches = common.held_out_batches(setup, size, batches_n)
    outputs = {}

    def one_pass(model: torch.nn.Module, key: str) -> float:
        with torch.inference_mode():
            common.sync(setup.device)
            t0 = time.perf_counter()
            outputs[key] = [model(**b).logits for b in batches]
            common.sync(setup.device)
        return (time.perf_counter() - t0) / len(batches)

    run = {key: (lambda m=models[key], key=key: one_pass(m, key)) for key in INFERENCE}
    for f in run.values():
        f()  # warm-up
    times = interleaved(run, repeats)
    parity = max(float((a - b).abs().max()) for a, b in zip(outputs["merged"], outputs["pruned"]))
    ranks = sum(m.r for _, m in adapter_layers(models["pruned"]))
    return times, {"merged_vs_pruned_max_logit_diff": parity, "pruned_rank": ranks,
                   "max_rank": s.r * len(setup.targets), "batches": len(batches), "batch_size": size}


def targets(train_rows: dict[str, Any], infer_rows: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out = []
    r = train_rows["sora-r8"]["vs_peft_lora"]
    out.append(("SoRA step time ≤ 1.05 × PEFT LoRA's at equal r", f"{r:.3f}×", r <= 1.05))
    f = train_rows["sora-r8"]["vs_floor"]
    out.append(("SoRA step time ≤ 1.15 × the frozen-base floor", f"{f:.3f}×", f <= 1.15))
    m, noise = infer_rows["merged"]["vs_base"], infer_rows["base"]["spread"]
    out.append(("merged-model latency within noise of the base model",
                f"{m:.3f}× (base's own repeat spread {100 * noise:.1f}%)", abs(m - 1) <= max(noise, 0.02)))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few steps (CI)")
    parser.add_argument("--steps", type=int, help="training steps per contestant per repeat (default 10; smoke 2)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 8; smoke 2)")
    parser.add_argument("--keep", type=float, default=0.5,
                        help="fraction of SoRA ranks kept for the inference models (the quickstart keeps 52%%)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--profile", nargs="*", choices=TRAINING, metavar="CONTESTANT",
                        help="only profile these contestants (default sora-r8 and floor): profile-<name>.txt")
    parser.add_argument("--child", choices=TRAINING, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.repeats = args.repeats or (2 if args.smoke else 8)
    if args.child:
        child(args.child, args)
        return Path()
    s = common.settings(args.smoke)
    facts = common.machine(torch.device(args.device))
    out = common.results_dir(args.out, facts, args.smoke)
    if args.profile is not None:
        with tempfile.TemporaryDirectory() as tmp:
            setup = common.load_setup(s, args.smoke, Path(tmp), args.device)
            profile(setup, s, tuple(args.profile) or ("sora-r8", "floor"), args.steps, out)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        setup = common.load_setup(s, args.smoke, Path(tmp), args.device)
        print(f"{setup.description}; {len(setup.targets)} target modules; timing {len(TRAINING)} contestants", flush=True)
        step_times = time_training(setup, s, args.steps, args.repeats)
        infer_times, infer_facts = time_inference(setup, s, args.steps, args.repeats, args.keep)
    memory = peak_memory(TRAINING, args)
    labels = {k: common.LABELS[k].format(r=s.r) for k in TRAINING}
    train_rows = {key: {"label": labels[key], "ms_per_step": 1000 * statistics.median(t),
                        "vs_peft_lora": ratio(step_times, key, "peft-lora"), "vs_floor": ratio(step_times, key, "floor"),
                        "peak_mib": memory[key], "memory_vs_peft_lora": memory[key] / memory["peft-lora"],
                        "repeats_ms": [1000 * x for x in t]} for key, t in step_times.items()}
    infer_rows = {key: {"label": INFERENCE_LABELS[key], "ms_per_batch": 1000 * statistics.median(t),
                        "vs_base": ratio(infer_times, key, "base"), "spread": spread(t),
                        "repeats_ms": [1000 * x for x in t]} for key, t in infer_times.items()}
    command = "python bench/speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    checks = targets(train_rows, infer_rows)
    common.write_json(out / "speed.json", {"machine": facts, "setup": setup.description, "command": command,
                                          "steps_per_repeat": args.steps, "repeats": args.repeats,
                                          "batch_size": s.batch_size, "training": train_rows, "inference": infer_rows,
                                          "inference_setup": infer_facts,
                                          "targets": [{"target": t, "measured": v, "met": ok} for t, v, ok in checks]})
    train_table = [[r["label"], f"{r['ms_per_step']:.1f}", f"{r['vs_peft_lora']:.3f}", f"{r['vs_floor']:.3f}",
                    f"{r['peak_mib']:,.0f}", f"{r['memory_vs_peft_lora']:.3f}"] for r in train_rows.values()]
    infer_table = [[r["label"], f"{r['ms_per_batch']:.1f}", f"{r['vs_base']:.3f}", f"{100 * r['spread']:.1f}%"]
                   for r in infer_rows.values()]
    memory_kind = "peak RSS of the training steps, own process" if args.device == "cpu" else \
        "torch.cuda.max_memory_allocated, own process"
    text = (f"### Speed and memory\n\n{setup.description}; batch {s.batch_size}, max_length {s.max_length}, "
            f"r={s.r}; {args.repeats} interleaved repeats of {args.steps} steps. Machine: {facts['cpu']} "
            f"({facts['torch_threads']} threads, {facts['device']}{', ' + facts['gpu'] if 'gpu' in facts else ''}); "
            f"commit {facts['commit']}.\n\n`{command}`\n\n"
            + common.markdown_table(TRAIN_COLUMNS, train_table)
            + f"\n\nRatios: median of the per-repeat ratios. Memory: {memory_kind}.\n\n"
            + common.markdown_table(INFER_COLUMNS, infer_table)
            + f"\n\nInference on {infer_facts['batches']} test batches of {infer_facts['batch_size']}; the pruned "
              f"adapter keeps {infer_facts['pruned_rank']} of {infer_facts['max_rank']} ranks; merged and pruned "
              f"logits agree to {infer_facts['merged_vs_pruned_max_logit_diff']:.1e}.\n\n"
            + common.target_lines(checks)
            + "\n")
    (out / "speed.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
