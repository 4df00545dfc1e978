"""Where an adapter step's time goes: torch.profiler over the engine's `train_step` on a causal LM, for the frozen
floor, sora's LoRA and SoRA and PEFT LoRA, split into the step's phases and the kinds of work in each; and SoRA
with its layers as autograd's graph of their ops (before adapters/fused.py), to show what fusing cut.

    python bench/profile_causal.py            # SmolLM2-135M-Instruct, the causal quickstart's batches
    python bench/profile_causal.py --smoke    # CI: a tiny random Llama

Each contestant (speed_causal.py's: a copy of one base, all linears, r = 8) takes one warm-up step, then `--steps`
steps under the profiler on the same batches. Every profiled operator's self time is put in one row: its phase
(forward, backward, gradient norm, clipping, the method's hooks, the optimizer, zero_grad: found by walking up the
profiler's event tree to the scope it ran in; the bench labels the engine's calls with `record_function`) and its
kind (matmuls with a rank-sized operand, i.e. the adapters'; the base's matmuls; attention; element-wise; the
rest). "Not in an operator" is the wall time of the step minus all operators' self time: Python, autograd and
the dispatcher between operators. The profiler's own overhead inflates small operators, so the table says where
time goes, and speed_causal.py's unprofiled step times say how much there is. Writes profile.json and profile.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import speed_causal  # noqa: E402

from sora_cli import engine  # noqa: E402

CONTESTANTS = ("floor", "sora-lora", "sora-r8", "peft-lora", "sora-r8-graph")
RANK = 8  # the contestants' r: a 2-D matmul operand with a dimension of 8 is an adapter's
PHASES = ("forward", "backward", "gradient norm", "clip", "method hooks", "optimizer", "zero_grad")
KINDS = ("adapter matmuls", "base matmuls", "attention", "element-wise", "other operators")
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
ATTENTION = ("attention", "sdpa", "flash", "softmax")
ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::sub", "aten::div", "aten::neg",
               "aten::silu", "aten::silu_backward", "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum",
               "aten::cat", "aten::copy_", "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::zeros",
               "aten::clone", "aten::addcmul_", "aten::addcdiv_", "aten::lerp_", "aten::sqrt", "aten::where",
               "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_addcmul_", "aten::_foreach_addcdiv_",
               "aten::_foreach_lerp_", "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_maximum_",
               "aten::mul_backward", "aten::abs", "aten::sign", "aten::clamp", "aten::clamp_min", "aten::embedding",
               "aten::embedding_dense_backward", "aten::index", "aten::masked_fill", "aten::exp", "aten::log"}
# The scopes the engine's calls run in; autograd's own frames mark the backward pass.
SCOPES = {"bench::grad_norm": "gradient norm", "bench::clip": "clip", "bench::after_backward": "method hooks",
          "bench::after_step": "method hooks", "bench::zero_grad": "zero_grad"}


def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return call


@contextmanager
def engine_scopes(step: Any) -> Iterator[None]:
    """Label the engine's calls inside `train_step` (it looks them up at call time), for the profiled steps only."""
    method, optimizer = step.method, step.optimizer
    saved = (engine.check_finite, torch.nn.utils.clip_grads_with_norm_)
    engine.check_finite = labelled("bench::grad_norm", engine.check_finite)
    torch.nn.utils.clip_grads_with_norm_ = labelled("bench::clip", torch.nn.utils.clip_grads_with_norm_)
    method.after_backward = labelled("bench::after_backward", method.after_backward)
    method.after_step = labelled("bench::after_step", method.after_step)
    optimizer.zero_grad = labelled("bench::zero_grad", optimizer.zero_grad)
    try:
        yield
    finally:
        engine.check_finite, torch.nn.utils.clip_grads_with_norm_ = saved
        for obj, attr in ((method, "after_backward"), (method, "after_step"), (optimizer, "zero_grad")):
            vars(obj).pop(attr, None)


def phase(event: FunctionEvent) -> str:
    node: FunctionEvent | None = event
    while node is not None:
        if node.name in SCOPES:
            return SCOPES[node.name]
        if node.name.startswith("Optimizer.step#"):
            return "optimizer"
        if node.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        node = node.cpu_parent
    return "forward"


def kind(event: FunctionEvent) -> str:
    name = event.name
    if name in MATMULS:
        matrices = [s for s in event.input_shapes if len(s) == 2]
        return "adapter matmuls" if any(RANK in s for s in matrices) else "base matmuls"
    if any(a in name.lower() for a in ATTENTION):
        return "attention"
    return "element-wise" if name in ELEMENTWISE else "other operators"


def leaves(events: list[FunctionEvent]) -> Iterator[FunctionEvent]:
    """The aten operators with self time: self time excludes children, so a matmul and the mm inside it are not
    counted twice."""
    for e in events:
        if e.name.startswith("aten::") and e.self_cpu_time_total > 0:
            yield e


def profile_one(step: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """ms per step by (phase, kind), and the step's wall time, over the batches."""
    step(batches[0])  # warm-up: allocates AdamW's state
    with engine_scopes(step), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        wall = time.perf_counter() - t0
    events = list(prof.events())
    cells: dict[str, float] = defaultdict(float)
    for e in leaves(events):
        cells[f"{phase(e)} | {kind(e)}"] += e.self_cpu_time_total / 1000 / len(batches)  # µs → ms per step
    wall_ms = 1000 * wall / len(batches)
    fused = sum(e.name == "autograd::engine::evaluate_function: LowRankLinearBackward" for e in events)
    return {"wall_ms": wall_ms, "cells": dict(cells), "outside_ms": wall_ms - sum(cells.values()),
            "fused_backward_nodes_per_step": fused / len(batches)}


def rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One line per (phase, kind) that any contestant spends ≥ 0.5 ms a step in, then the time outside operators
    and the total; each contestant's ms, and SoRA's and LoRA's difference from the floor."""
    keys = [f"{p} | {k}" for p in PHASES for k in KINDS]
    out = []
    for key in keys:
        ms = {c: r["cells"].get(key, 0.0) for c, r in results.items()}
        if max(ms.values()) >= 0.5:
            out.append([key.replace(" | ", ": "), *(f"{ms[c]:,.1f}" for c in results), *differences(ms)])
    outside = {c: r["outside_ms"] for c, r in results.items()}
    total = {c: r["wall_ms"] for c, r in results.items()}
    out.append(["not in an operator", *(f"{outside[c]:,.1f}" for c in results), *differences(outside)])
    out.append(["**step (wall, profiled)**", *(f"**{total[c]:,.1f}**" for c in results), *differences(total)])
    return out


def differences(ms: dict[str, float]) -> list[str]:
    return [f"{ms[c] - ms['floor']:+,.1f}" if c in ms else "–" for c in ("sora-r8", "sora-lora")]


def write(out: Path, results: dict[str, dict[str, Any]], r: Any, steps: int, facts: dict[str, Any],
          argv: list[str] | None) -> Path:
    command = "python bench/profile_causal.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "profile.json", {"machine": facts, "model": r.model.name_or_path, "command": command,
                                            "steps": steps, "results": results})
    columns = ["phase: kind (ms / step)", *(speed_causal.LABELS[c] for c in results), "SoRA − floor",
               "LoRA − floor"]
    text = (f"### Where the adapter step's time goes (torch.profiler)\n\n{r.model.name_or_path}, the causal "
            f"quickstart's batches of {r.train.batch_size}, all linears, r=8, {steps} profiled steps after one "
            f"warm-up. Machine: {facts['cpu']} ({facts['torch_threads']} threads); commit {facts['commit']}; "
            f"torch {facts['torch']}.\n\n`{command}`\n\n" + common.markdown_table(columns, rows(results))
            + "\n\nSelf time of the operators, by the phase of `train_step` they ran in and their kind; adapter "
              "matmuls: a 2-D operand with a dimension of r = 8. Rows under 0.5 ms for every contestant are left "
              "out. Not in an operator: the profiled step's wall time minus every operator's self time (Python, "
              "autograd, the dispatcher). The profiler slows small operators; speed_causal.py has the unprofiled "
              "times.\n")
    (out / "profile.md").write_text(text)
    print(text)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama (CI)")
    parser.add_argument("--steps", type=int, help="profiled steps per contestant (default 3; smoke 2)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.smoke else 3)
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        r, base, targets, batches = speed_causal.setup(args.smoke, Path(tmp), steps)
        results = {}
        for key in CONTESTANTS:
            print(f"profiling {key}", flush=True)
            results[key] = profile_one(speed_causal.contestant(key, r, base, targets), batches)
    return write(out, results, r, steps, facts, argv)


if __name__ == "__main__":
    main()
