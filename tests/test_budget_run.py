"""SoRA to a budget in real runs (adapter.target): the tiny BERT lands on its budget, in ranks and in parameters; the
final cut keeps the largest |g| and holds the rest at zero; λ's state survives --resume bit for bit, before and
after the cut; best/ waits for the budget; `inspect` shows λ's trajectory; `sora schedule` by budgets."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from sora_cli.adapters.sora import SoRALinear
from sora_cli.adapters.sora_budget import BudgetRun, Target
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.recipe import load_recipe
from sora_cli.report import inspect_adapter

from .conftest import events

runner = CliRunner()
RANKS = 13 * 4  # the tiny BERT: 2 layers × 6 linear modules + the pooler, r = 4


def budget_recipe(make_recipe, name: str, target: dict, **train_fields):
    return make_recipe(name, adapter={"sparse_lambda": None, "target": target},
                       train={"max_steps": 30, "save_every": 10, "eval_every": 10, "log_every": 1, **train_fields})


def final_meta(run: Path, name: str = "final") -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(run / name / "adapter.safetensors"), json.loads((run / name / "adapter.json").read_text())


@pytest.mark.parametrize(("target", "unit", "budget"), [({"fraction": 0.5}, "ranks", RANKS // 2),
                                                        ({"ranks": 20, "reach_at": 0.5}, "ranks", 20),
                                                        ({"params": 1500, "reach_at": 24}, "params", 1500)])
def test_a_run_lands_on_its_budget(make_recipe, target: dict, unit: str, budget: int) -> None:
    recipe = load_recipe(budget_recipe(make_recipe, "run", target))
    result = train(recipe)
    run = Path(recipe.train.output_dir)
    tensors, meta = final_meta(run)
    report = inspect_adapter(tensors, meta)
    reached = report["summary"]["rank" if unit == "ranks" else "params_pruned"]  # as inspect counts them
    # at most the budget; below it by less than one rank's parameters (d_in + d_out + 1 ≤ 81 here, 1,537 in MiniLM)
    assert budget - (1 if unit == "ranks" else 81) < reached <= budget, (reached, budget)
    b = meta["method_config"]["budget"]
    assert (b["unit"], b["budget"], b["reached"], b["settled"]) == (unit, budget, reached, True)
    assert meta["method_config"]["sparse_lambda"] is None
    reach = b["reach_at"]
    assert reach == {"fraction": 24, "ranks": 15, "params": 24}[next(iter(target))]  # 0.8 (the default) of 30
    # the trajectory: one point a step up to reach_at; λ logged in the train events is the one each step used
    lams = [e["lambda"] for e in events(run, "train")]
    assert [p[1] for p in b["path"]] == lams[:reach] and set(lams[reach:]) == {lams[reach - 1]} == {b["lambda"]}
    if unit == "ranks":  # the cut took what survived the proximal steps beyond the budget
        assert b["final_cut"] == b["path"][-1][2] - reached
    assert result.stats["budget_reached"] == reached and result.stats[f"budget_{unit}"] == budget
    counts = [e["budget_reached"] for e in events(run, "train")]
    assert all(c == reached for c in counts[reach:])  # held from the cut on
    assert result.best_step is None or result.best_step >= reach  # best/ only once the budget holds


def test_the_cut_keeps_the_largest_gates_and_holds_the_rest_at_zero() -> None:
    torch.manual_seed(0)
    layers = [(f"m{i}", SoRALinear(nn.Linear(6, 5), r=4, alpha=4.0)) for i in range(2)]
    with torch.no_grad():
        layers[0][1].gate.copy_(torch.tensor([0.9, -0.05, 0.0, 2.0]))
        layers[1][1].gate.copy_(torch.tensor([-0.3, 0.05, 1.1, -0.04]))
    run = BudgetRun(Target("ranks", budget=5, reach_at=1), layers, "scaled", lambda step: 0.0)
    run.start(0)
    run.settle()  # 7 alive, budget 5: −0.04 goes, then of the tie at |0.05| the one of m0 (by module name)
    assert layers[0][1].gate.tolist() == pytest.approx([0.9, 0.0, 0.0, 2.0])
    assert layers[1][1].gate.tolist() == pytest.approx([-0.3, 0.05, 1.1, 0.0])
    assert run.cut == 2 and run.settled and run.count() == 5
    with torch.no_grad():  # AdamW's moments move a cut gate, and a survivor: the hold zeroes only the cut one
        layers[0][1].gate.add_(0.01)
    stats = run.after_step(lr=1e-3, step=5)
    assert layers[0][1].gate.tolist() == pytest.approx([0.91, 0.0, 0.0, 2.01]) and stats["threshold"] == 0.0
    floored = BudgetRun(Target("ranks", budget=3, reach_at=10), layers, "fixed", lambda step: 0.0)
    floored.controller = floored.start(0)
    floored.controller.log_lambda = math.log(100.0)  # a threshold of 100 would zero every gate
    floored.after_step(lr=1e-3, step=0)  # the floor keeps the three largest |g| at their values
    assert [m.gate.tolist() for _, m in layers] == [pytest.approx([0.91, 0.0, 0.0, 2.01]),
                                                     pytest.approx([0.0, 0.0, 1.1, 0.0])]
    assert floored.count() == 3 and floored.restored == 3 and floored.trajectory[-1][1:] == pytest.approx((100.0, 3.0))
    params = BudgetRun(Target("params", budget=2 * 12, reach_at=1), layers, "scaled", lambda step: 0.0)
    params.start(0)
    params.settle()  # 12 parameters a rank (6 + 5 + 1): two ranks fit, 2.01 and 1.1
    assert [int(torch.count_nonzero(m.gate)) for _, m in layers] == [1, 1] and params.count() == 24


@pytest.mark.parametrize("killed_after", [10, 25])  # before the cut at step 20, and after it
def test_the_budget_state_survives_resume_bit_for_bit(make_recipe, killed_after: int) -> None:
    target = {"fraction": 0.5, "reach_at": 20}
    full = load_recipe(budget_recipe(make_recipe, "full", target, save_every=5, keep_last=10))
    train(full)
    part = load_recipe(budget_recipe(make_recipe, "part", target, save_every=5, keep_last=10))
    train(part)
    run = Path(part.train.output_dir)
    for step in range(killed_after + 5, 35, 5):
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    for name in ("final", "best"):
        shutil.rmtree(run / name, ignore_errors=True)
    result = train(load_recipe(run / "recipe.yaml"), resume=True)
    assert (result.resumed_from, result.step) == (killed_after, 30)
    (a, meta_a), (b, meta_b) = final_meta(Path(full.train.output_dir)), final_meta(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["method_config"]["budget"] == meta_b["method_config"]["budget"]
    strip = ("examples_per_s", "tokens_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in events(run, "train")] == \
        [{k: v for k, v in e.items() if k not in strip} for e in events(Path(full.train.output_dir), "train")]


def test_inspect_shows_the_trajectory_and_plots_it(make_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(budget_recipe(make_recipe, "shown", {"ranks": 30, "reach_at": 20}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    result = runner.invoke(app, ["inspect", str(final), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    meta = json.loads((final / "adapter.json").read_text())["method_config"]["budget"]
    assert f"budget 30 ranks by step 20; reached 30; the final cut took {meta['final_cut']} ranks" in result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()
            if line.startswith("│") and line.count("│") == 4]
    first, last = meta["path"][0], meta["path"][-1]
    assert rows[0] == ["1", f"{first[1]:.4g}", str(first[2])] and rows[-2] == ["20", f"{last[1]:.4g}", str(last[2])]
    assert rows[-1] == ["20, cut", "", "30"]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    as_json = json.loads(runner.invoke(app, ["inspect", str(final), "--json"]).output)
    assert as_json["budget"] == meta


def test_a_schedule_by_budgets(make_recipe, tmp_path: Path) -> None:
    path = make_recipe("sched", adapter={"sparse_lambda": None},
                       train={"max_steps": 20, "save_every": 5, "eval_every": None, "keep_last": 10},
                       schedule={"budgets": [0.75, 0.5, 0.25], "steps_per_stage": 10, "memorization_samples": 50})
    plan = runner.invoke(app, ["schedule", str(path), "--plan"])
    assert plan.exit_code == 0, plan.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in plan.output.splitlines() if line.startswith("│")]
    assert [r[:3] for r in rows] == [["0", "75% of the ranks", "20"], ["1", "50% of the ranks", "10"],
                                     ["2", "25% of the ranks", "10"]]
    out = tmp_path / "sched"
    result = runner.invoke(app, ["schedule", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "schedule.jsonl").read_text().splitlines()]
    assert [(r["budget"], r["nonzero_gates"]) for r in records] == [(0.75, 39), (0.5, 26), (0.25, 13)]
    for r in records:  # the λ each stage needed: its controller's last
        meta = json.loads((out / "stages" / str(r["stage"]) / "adapter.json").read_text())
        assert r["lambda"] == meta["method_config"]["budget"]["lambda"] > 0
    assert (out / "schedule.csv").read_text().splitlines()[0].startswith("stage,budget,lambda,")
