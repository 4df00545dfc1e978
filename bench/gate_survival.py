"""Which SoRA ranks survive, against where their gates started: does the task pick the ranks, or the initial draw?

    python bench/gate_survival.py runs/quickstart [more run folders]

For each finished SoRA run: its recipe's initial gates, drawn again exactly as `sora train` drew them (the same
seed, model, injection order), against the gates of `final/`. Prints, per run: the ranks switched off; how many of
those started below the threshold's total pull λ·Σ_t η_t and how many above; whether surviving gates kept their
sign; and Spearman's rank correlation of |g_0| and |g_final| (1: the final order is the initial order).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from sora_cli.adapters import adapter_layers
from sora_cli.engine import prepare
from sora_cli.optim import lr_factor, warmup_length
from sora_cli.recipe import Recipe, load_recipe


def initial_gates(recipe: Recipe) -> dict[str, torch.Tensor]:
    """The gates the recipe's run started from: prepare() seeds, loads and injects as train() does."""
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(recipe, Path(tmp) / "run")
        return {name: layer.gate.detach().clone() for name, layer in adapter_layers(run.model)}


def total_pull(recipe: Recipe) -> float:
    """λ · Σ_t η_t: how far the `scaled` soft-threshold moves a gate towards zero over the whole run."""
    t, a = recipe.train, recipe.adapter
    steps = int(t.max_steps or 0)
    warmup = warmup_length(t.warmup_steps, t.warmup_ratio, steps)
    lr = a.gate_lr or t.lr
    return (a.sparse_lambda or 0.0) * sum(lr * lr_factor(s, steps, warmup, t.lr_scheduler) for s in range(steps))


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (every switched-off gate ties at 0)."""
    plain = torch.empty(len(x), dtype=torch.float64)
    plain[torch.argsort(x)] = torch.arange(len(x), dtype=torch.float64)
    _, group = torch.unique(x, return_inverse=True)
    total = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, plain)
    return (total / torch.bincount(group).double())[group]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def report(run_dir: Path) -> str:
    recipe = load_recipe(run_dir / "recipe.yaml", [f"train.output_dir={run_dir}"])
    start = initial_gates(recipe)
    final = load_file(run_dir / "final" / "adapter.safetensors")
    g0 = torch.cat([start[n] for n in start]).double()
    g1 = torch.cat([final[f"{n}.gate"] for n in start]).double()
    pull = total_pull(recipe)
    off, small = g1 == 0, g0.abs() < pull
    kept_sign = float((torch.sign(g0) == torch.sign(g1))[~off].double().mean())
    return (f"{run_dir}: {int(off.sum())}/{len(g1)} ranks off; total pull λ·Σ η_t = {pull:.3f}; off among gates "
            f"that started below it {int((off & small).sum())}/{int(small.sum())}, above it "
            f"{int((off & ~small).sum())}/{int((~small).sum())}; survivors that kept their sign {kept_sign:.3f}; "
            f"Spearman(|g_0|, |g_final|) = {spearman(g0.abs(), g1.abs()):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished SoRA run folders (recipe.yaml and final/)")
    for run_dir in parser.parse_args(argv).runs:
        print(report(run_dir), flush=True)


if __name__ == "__main__":
    sys.exit(main())
