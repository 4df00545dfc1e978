"""Why a classifier collapses: the engine's own steps of a recipe, with per-step measurements of the adapter and the
head (issue 27, part 1).

    python bench/collapse_probe.py recipes/quickstart.yaml --steps 200 --seeds 0 1 2 --methods sora lora
    python bench/collapse_probe.py --smoke       # CI: a tiny random BERT

For each method and seed: `prepare` the recipe as `sora train` would (same data order, initialisation, optimizer
and LR schedule over the recipe's whole length), then take its first `--steps` steps with the engine's `train_step`
and, after every step, record the training loss and: the norms of every A, B and gate (summed in squares over the
adapted layers), of the update ΔW = s·B·diag(g)·A and of its change over the step (Adam's effective step on the
product), the pooler's (where it trains: a checkpoint without one, as MiniLM's, gets a fresh pooler that trains
with the head) and the classifier's weight norms and their change, and the share of the pooler's tanh outputs
within 0.01 of ±1 on the step's batch (saturated: their gradient is < 2% of the unsaturated one), and the last
layer's [CLS] states on that batch: their mean pairwise cosine and mean norm (README "Reliability": on a checkpoint
trained with mean pooling they barely depend on the sentence, and a run stuck at chance is one whose [CLS] states
shrank and grew alike). `--set model.pooling=mean` probes the mean-pooled head. Writes
probe.jsonl (one line per step) and probe.md (per run: the loss and those numbers at a few steps, and whether and
when the loss returned to the chance level).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from sora_cli.adapters import adapter_layers  # noqa: E402
from sora_cli.engine import prepare, train_step  # noqa: E402
from sora_cli.optim import set_lr  # noqa: E402
from sora_cli.recipe import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SATURATED = 0.99  # |tanh| above this: its derivative 1 − tanh² is below 0.02


def delta_w(layer: nn.Module) -> torch.Tensor:
    """s · B diag(g) A (d_out, d_in), float64; LoRA's s · B A."""
    scale = layer.scale_vector().detach().double()
    return layer.lora_B.detach().double() @ (scale[:, None] * layer.lora_A.detach().double())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """ΔW of every adapted layer and the head's weights, float64 copies."""
    found = {f"dw:{name}": delta_w(layer) for name, layer in adapter_layers(model)}
    for name, p in model.named_parameters():
        if p.requires_grad and ("pooler" in name or "classifier" in name) and name.endswith("weight"):
            found[f"head:{name}"] = p.detach().double().clone()
    return found


def norms(model: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    def total(tensors: Any) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))

    layers = [layer for _, layer in adapter_layers(model)]
    out = {"A": total(x.lora_A.detach() for x in layers), "B": total(x.lora_B.detach() for x in layers),
           "dW": total(v for k, v in after.items() if k.startswith("dw:")),
           "dW_step": total(after[k] - before[k] for k in after if k.startswith("dw:")),
           "dW_step_max": max(float((after[k] - before[k]).norm()) for k in after if k.startswith("dw:"))}  # one module
    if all(hasattr(x, "gate") for x in layers):
        out["g"] = total(x.gate.detach() for x in layers)
        # a rank's update moves with |g_i| under Adam: the module of largest RMS gate steps most against LoRA's
        out["g_rms_max"] = max(float(x.gate.detach().pow(2).mean().sqrt()) for x in layers)
        out["zero_gates"] = sum(int((x.gate == 0).sum()) for x in layers)
    for part in ("pooler", "classifier"):
        keys = [k for k in after if k.startswith("head:") and part in k]
        if keys:
            out[part] = total(after[k] for k in keys)
            out[f"{part}_step"] = total(after[k] - before[k] for k in keys)
    return out


def saturation(model: nn.Module) -> tuple[list[float], Any]:
    """A list the pooler's forward hook fills with the share of saturated tanh outputs; the hook's handle."""
    seen: list[float] = []
    pooler = getattr(getattr(model, "bert", None), "pooler", None)
    if pooler is None:
        return seen, None

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        seen.append(float((out.detach().abs() > SATURATED).double().mean()))

    return seen, pooler.register_forward_hook(hook)


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """The mean cosine over the n·(n − 1) ordered pairs of distinct rows of x (n, d): 1 when every row points alike."""
    unit = nn.functional.normalize(x.double(), dim=-1)
    n = unit.shape[0]
    return float(((unit @ unit.T).sum() - n) / max(1, n * n - n))


def first_token(model: nn.Module) -> tuple[list[tuple[float, float]], Any]:
    """A list the last encoder layer's forward hook fills with its first ([CLS]) token's states on the batch: their
    mean pairwise cosine and mean norm (how much the classifier's [CLS] head has to tell the sentences apart)."""
    seen: list[tuple[float, float]] = []
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        return seen, None

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        cls = (out[0] if isinstance(out, tuple) else out).detach()[:, 0]  # (batch, d)
        seen.append((mean_pairwise_cosine(cls), float(cls.double().norm(dim=-1).mean())))

    return seen, layers[-1].register_forward_hook(hook)


def probe(recipe_path: Path, overrides: list[str], steps: int, workdir: Path) -> list[dict[str, Any]]:
    recipe = load_recipe(recipe_path, [*overrides, f"train.output_dir={workdir}"])  # its own LR schedule's length
    run = prepare(recipe, workdir)
    run.model.train()
    seen, handle = saturation(run.model)
    cls_seen, cls_handle = first_token(run.model)
    rows = []
    before = snapshot(run.model)
    for step in range(steps):
        batches, idle, _, _ = run.micro_batches(step)
        set_lr(run.optimizer, run.lr_factor(step))
        loss, _ = train_step(run.model, run.task, run.method, run.optimizer, batches, run.params,
                             recipe.train.max_grad_norm, run.ctx.autocast, step, idle=idle)
        after = snapshot(run.model)  # the next step's "before"
        row = {"step": step + 1, "loss": float(loss), **norms(run.model, before, after)}
        before = after
        if seen:
            row["pooler_saturated"] = seen[-1]
        if cls_seen:
            row["cls_cos"], row["cls_norm"] = cls_seen[-1]
        rows.append(row)
    for h in (handle, cls_handle):
        if h is not None:
            h.remove()
    return rows


def chance(rows: list[dict[str, Any]], level: float, window: int = 20) -> int | None:
    """The first step after which the mean loss of `window` steps is back within 3% of `level`, having been below
    0.8 of it; None if never."""
    low = False
    for i in range(window, len(rows) + 1):
        mean = sum(r["loss"] for r in rows[i - window:i]) / window
        low = low or mean < 0.8 * level
        if low and mean > 0.97 * level:
            return rows[i - 1]["step"]
    return None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, nargs="?", default=REPO / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--methods", nargs="+", default=["sora", "lora"])
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every run (key=value)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT (CI)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    args = parser.parse_args(argv)
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = list(args.set)
        recipe = args.recipe
        if args.smoke:
            tiny = common.tiny_model_dir(Path(tmp) / "tiny-bert")
            base += [f"model.name_or_path={tiny}", "data.max_train_samples=256", "data.max_eval_samples=64"]
        for method in args.methods:
            for seed in args.seeds:
                key = f"{method} seed {seed}"
                print(f"probing {key}", flush=True)
                sets = [*base, f"adapter.method={method}", f"train.seed={seed}"]
                if method != "sora":
                    sets.append("adapter.sparse_lambda=null")
                runs[key] = probe(recipe, sets, args.steps, Path(tmp) / key.replace(" ", "-"))
    return write(out, runs, args, facts, argv)


def write(out: Path, runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, facts: dict[str, Any],
          argv: list[str] | None) -> Path:
    with (out / "probe.jsonl").open("w") as f:
        for key, rows in runs.items():
            for row in rows:
                f.write(json.dumps({"run": key, **row}) + "\n")
    level = math.log(2)  # binary labels: the chance loss of balanced data
    marks = sorted({max(1, args.steps * k // 4) for k in range(1, 5)})
    columns = ["run", "step", "loss (mean of 10)", "|A|", "|B|", "|g|", "|ΔW|", "|ΔW step|", "|pooler|",
               "|classifier|", "pooler saturated", "[CLS] cos", "|[CLS]|"]
    lines = []
    for key, rows in runs.items():
        for m in marks:
            window = rows[max(0, m - 10):m]
            r = rows[m - 1]
            lines.append([key, str(m), f"{sum(x['loss'] for x in window) / len(window):.3f}", f"{r['A']:.2f}",
                          f"{r['B']:.3f}", f"{r['g']:.2f}" if "g" in r else "–", f"{r['dW']:.3f}",
                          f"{r['dW_step']:.2e}", f"{r.get('pooler', 0):.2f}", f"{r.get('classifier', 0):.3f}",
                          f"{100 * r.get('pooler_saturated', 0):.1f}%", f"{r.get('cls_cos', math.nan):.2f}",
                          f"{r.get('cls_norm', math.nan):.2f}"])
    back = "; ".join(f"{k}: {'step ' + str(s) if (s := chance(rows, level)) else 'never'}" for k, rows in runs.items())
    command = "python bench/collapse_probe.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = (f"### Collapse probe\n\n`{command}`; machine {facts['cpu']}, commit {facts['commit']}.\n\n"
            + common.markdown_table(columns, lines)
            + f"\n\nNorms over all adapted layers (Frobenius, summed in squares); ΔW = s·B·diag(g)·A. [CLS] cos, "
              f"|[CLS]|: the last layer's first-token states on the step's batch, their mean pairwise cosine and mean "
              f"norm. Back at the "
              f"chance loss ln 2 (20-step mean within 3% after it was below 80%): {back}.\n")
    (out / "probe.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
