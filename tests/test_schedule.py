"""The sparsifying scheduler: thresholds, plan, stage records against their checkpoints, lr_reset, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sora_cli.cli import app
from sora_cli.models import load_adapted, load_base
from sora_cli.recipe import Recipe, ScheduleConfig, load_recipe
from sora_cli.schedule import run, stage_thresholds

runner = CliRunner()


def test_thresholds_by_hand() -> None:
    assert stage_thresholds(ScheduleConfig(start=0, stop=1, num=5)) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert stage_thresholds(ScheduleConfig(start=0.01, stop=1, num=3, spacing="log")) == pytest.approx([0.01, 0.1, 1])
    assert stage_thresholds(ScheduleConfig(start=1, stop=32, num=6, spacing="log")) == [1, 2, 4, 8, 16, 32]
    # exp: even steps in e^λ, so log of linspace(e^0, e^1): dense near the stop
    assert stage_thresholds(ScheduleConfig(start=0, stop=1, num=3, spacing="exp")) == pytest.approx(
        [0.0, math.log((1 + math.e) / 2), 1.0])
    assert stage_thresholds(ScheduleConfig(start=0, stop=2000, num=2, spacing="exp")) == [0.0, 2000.0]  # no overflow
    assert stage_thresholds(ScheduleConfig(thresholds=(0.1, 0.3, 2.0))) == [0.1, 0.3, 2.0]


def sched_recipe(make_recipe, name: str = "sched", **schedule):
    return make_recipe(name, adapter={"sparse_lambda": None},
                       train={"max_steps": 20, "save_every": 5, "eval_every": None, "keep_last": 10},
                       schedule={"thresholds": [0.5, 5.0, 1000.0], "steps_per_stage": 10,
                                 "memorization_samples": 50, **schedule})


def test_schedule_errors(make_recipe, tmp_path: Path) -> None:
    result = runner.invoke(app, ["schedule", str(make_recipe()), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "schedule: the recipe has no schedule section" in result.output
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "schedule.thresholds=[2, 1]"])
    assert result.exit_code == 2 and "schedule.thresholds: expected rising non-negative values, got [2.0, 1.0]" \
        in result.output
    assert not (tmp_path / "s").exists()


def test_plan(make_recipe) -> None:
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "--plan"])
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if line.startswith("│")]
    assert rows == [["0", "0.5", "20", "linear schedule"], ["1", "5", "10", "linear schedule, restarted"],
                    ["2", "1000", "10", "linear schedule, restarted"]]
    assert "40 training steps at " in result.output and "s/step (measured)" in result.output
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "schedule.lr_reset=false",
                                 "adapter.threshold=fixed", "--plan"])
    assert "constant 0× lr" in result.output  # the reference code: the decayed schedule stays at 0
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "schedule.lr_reset=false", "--plan"])
    assert result.exit_code == 2 and "the scaled threshold λ·lr never moves a gate" in result.output


def test_three_stages(make_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(sched_recipe(make_recipe))
    out = tmp_path / "schedule"
    records = list(run(recipe, out))
    assert [r["lambda"] for r in records] == [0.5, 5.0, 1000.0] and [r["steps"] for r in records] == [20, 10, 10]
    for r in records:  # what was recorded is what the stage's checkpoint holds
        tensors = load_file(out / "stages" / str(r["stage"]) / "adapter.safetensors")
        meta = json.loads((out / "stages" / str(r["stage"]) / "adapter.json").read_text())
        gates = {k.removesuffix(".gate"): t for k, t in tensors.items() if k.endswith(".gate")}
        assert r["nonzero_gates"] == sum(int((g != 0).sum()) for g in gates.values())
        assert r["params"] == sum(int((g != 0).sum()) * (meta["modules"][n]["d_in"] + meta["modules"][n]["d_out"] + 1)
                                  for n, g in gates.items())
        assert 0 <= r["memorization"] <= 1 and r["generalization_pct"] <= 100
        assert sum(m["params"] for m in r["modules"].values()) == r["params"] and len(r["modules"]) == 13
    assert records[0]["nonzero_gates"] > 0 and records[-1]["nonzero_gates"] == 0  # λ = 1000 switches all off
    # Memorization scored the same 50 training examples in every stage (what each stage's engine logged), although
    # each stage has its own train.seed (its own batch order and dropout).
    scored = [[e for e in map(json.loads, (out / "runs" / str(k) / "metrics.jsonl").read_text().splitlines())
               if e.get("split") == "train_sample"] for k in range(3)]
    assert [len(s) for s in scored] == [1, 1, 1] and {s[0]["examples"] for s in scored} == {50}
    assert len({s[0]["sample_sha256"] for s in scored}) == 1
    seeds = {load_recipe(out / "runs" / str(k) / "recipe.yaml").train.seed for k in range(3)}
    assert len(seeds) == 3
    lines = (out / "schedule.csv").read_text().splitlines()
    assert lines[0].startswith("stage,lambda,steps,nonzero_gates") and len(lines) == 4
    # every gate zero: the adapted model is the frozen base carrying the same trained head
    adapted, tokenizer, meta = load_adapted(out / "stages" / "2")
    base, _ = load_base(out / "stages" / "2", meta)
    tensors = load_file(out / "stages" / "2" / "adapter.safetensors")
    base.classifier.load_state_dict({"weight": tensors["classifier.weight"], "bias": tensors["classifier.bias"]})
    base.eval()
    inputs = dict(tokenizer(["good fun film", "a dull cold plot"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(adapted(**inputs).logits, base(**inputs).logits)
    assert runner.invoke(app, ["inspect", str(out / "stages" / "1")]).exit_code == 0


def test_without_lr_reset_only_the_gates_move(make_recipe, tmp_path: Path) -> None:
    # the reference code: fixed threshold (τ = λ every step), the LR schedule decayed to 0 after stage 0
    recipe = load_recipe(sched_recipe(make_recipe, lr_reset=False, thresholds=[0.001, 0.01, 0.05]),
                         ["adapter.threshold=fixed"])
    out = tmp_path / "ref"
    list(run(recipe, out))
    stage = [load_file(out / "stages" / str(k) / "adapter.safetensors") for k in range(3)]
    for k in (1, 2):
        for key, value in stage[0].items():
            if not key.endswith(".gate"):
                assert torch.equal(stage[k][key], value), key  # A, B and the head: LR is 0 after stage 0
    assert any(not torch.equal(stage[1][k], stage[0][k]) for k in stage[0] if k.endswith(".gate"))


def test_resume_inside_stage_2(make_recipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    list(run(load_recipe(sched_recipe(make_recipe, "a")), full))
    part = tmp_path / "part"
    recipe = load_recipe(sched_recipe(make_recipe, "b"))
    list(run(recipe, part))
    shutil.rmtree(part / "stages" / "2")
    shutil.rmtree(part / "runs" / "2" / "final")
    shutil.rmtree(part / "runs" / "2" / "checkpoints" / "step-10")
    (part / "schedule.jsonl").write_text("".join((part / "schedule.jsonl").read_text().splitlines(True)[:2]))
    capsys.readouterr()
    records = list(run(recipe, part, resume=True))
    assert [r["stage"] for r in records] == [0, 1, 2]
    said = capsys.readouterr().out
    assert said.count("resuming") == 1 and "runs/2 from step 5" in said  # stages 0, 1 reused, 2 mid-stage
    assert (part / "schedule.jsonl").read_text().replace("/part/", "/x/") == \
        (full / "schedule.jsonl").read_text().replace("/full/", "/x/")
    a = load_file(full / "stages" / "2" / "adapter.safetensors")
    b = load_file(part / "stages" / "2" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe, "b")), "-o", str(part)])
    assert result.exit_code == 2 and "already holds a run; continue it with --resume" in result.output


def test_from_a_checkpoint_and_plot(make_recipe, tmp_path: Path) -> None:
    from sora_cli.engine import train

    trained = load_recipe(make_recipe("trained", train={"max_steps": 10, "eval_every": None}))
    train(trained)
    ckpt = Path(trained.train.output_dir) / "final"
    out = tmp_path / "from"
    plot = tmp_path / "curve.png"
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "--from", str(ckpt), "-o", str(out),
                                 "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "schedule.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [0, 10, 10]  # stage 0 is the given checkpoint, as it is
    assert records[0]["lambda"] == 5.0  # the checkpoint's own λ, not λ_0
    a, b = load_file(ckpt / "adapter.safetensors"), load_file(out / "stages" / "0" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records[0]["generalization_pct"] == 100.0 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "sparsifying schedule" in result.output and "mem %" in result.output




def test_a_bad_plot_path_fails_before_training(make_recipe, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "s"
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "-o", str(out),
                                 "--plot", str(tmp_path / "file" / "c.png")])
    assert result.exit_code == 2 and "is not a directory" in result.output and not out.exists()
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "-o", str(out), "--plot", "c.pdf"])
    assert result.exit_code == 2 and "must be a .png file" in result.output and not out.exists()


def test_percent_of_best_in_the_metric_direction() -> None:
    from sora_cli.schedule import percent_of_best

    assert percent_of_best(0.8, [1.0, None], True) == pytest.approx(80.0)  # accuracy: value / best
    assert percent_of_best(0.6, [0.5], False) == pytest.approx(100 * 0.5 / 0.6)  # a loss: best / value
    assert percent_of_best(0.5, [0.6, 0.9], False) == pytest.approx(100.0)  # the lowest loss is the best stage
    assert percent_of_best(None, [0.5], True) is None


def test_a_bad_model_input_fails_before_the_schedule_directory_is_touched(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "data.max_length=512", "-o", str(out)])
    assert result.exit_code == 2 and "data.max_length: 512 is longer than the model's 64 positions" in result.output
    assert not out.exists()
    (out / "stages").mkdir(parents=True)
    (out / "recipe.yaml").write_text("an earlier schedule")  # --overwrite must not delete it for a bad recipe
    result = runner.invoke(app, ["schedule", str(sched_recipe(make_recipe)), "data.max_length=512", "-o", str(out),
                                 "--overwrite"])
    assert result.exit_code == 2 and (out / "recipe.yaml").read_text() == "an earlier schedule"


def reference_schedule(make_recipe, name: str, thresholds: list[float], from_best: bool) -> Recipe:
    """The reference's scheduler on the tiny recipe: threshold reference, decayed LR after stage 0, 10 steps of
    stage 0 with dev and a checkpoint every 5 (so best/ may be step 5), 3 steps per later stage."""
    return load_recipe(make_recipe(
        name, adapter={"threshold": "reference", "sparse_lambda": 1e-3},
        train={"max_steps": 10, "save_every": 5, "eval_every": 5},
        schedule={"thresholds": thresholds, "steps_per_stage": 3, "memorization_samples": 20, "lr_reset": False,
                  "from_best": from_best}))


@pytest.mark.parametrize("from_best", [True, False])
def test_from_best_starts_stage_1_from_stage_0s_best_and_later_stages_continue(make_recipe, from_best: bool) -> None:
    """The reference's scheduler: lr_reset false (the decayed LR, 0 here) and `threshold: reference`, so after stage
    0 only the threshold moves the gates and A, B and the head stay where each stage started. Stage 0's best/ is
    made to differ from its last checkpoint; from_best: true starts stage 1 from best/, false from the last
    checkpoint. Stage 2 continues from stage 1 either way: its gates are stage 1's, cut 3 more times with λ_2."""
    from sora_cli.checkpoint import load_adapter, save_adapter
    from sora_cli.optim import proximal_step

    recipe = reference_schedule(make_recipe, f"best-{from_best}", [1e-3, 1e-2, 5e-2], from_best)
    out = Path(recipe.train.output_dir or "")
    stages = run(recipe, out)
    record = next(stages)  # stage 0 done
    best = out / "runs" / "0" / "best"
    tensors, meta = load_adapter(best)
    final = load_adapter(out / "runs" / "0" / "final")
    assert meta["step"] == 5 and final[1]["step"] == 10  # best/ is not final/ here
    kept, scored = (tensors, meta) if from_best else final  # stage 0 as stage 1 continues it, scored on dev
    assert all(torch.equal(t, kept[n]) for n, t in load_file(out / "stages" / "0" / "adapter.safetensors").items())
    assert record["generalization"] == scored["metrics"]["dev"]["accuracy"]
    moved = {k: v * 0.5 if "lora_" in k else v for k, v in tensors.items()}
    save_adapter(best, moved, meta)  # a best/ that no checkpoint equals
    list(run(recipe, out, resume=True))
    last = load_file(out / "runs" / "0" / "checkpoints" / "step-10" / "adapter.safetensors")
    start = moved if from_best else last
    first, second = (load_file(out / "stages" / str(k) / "adapter.safetensors") for k in (1, 2))
    for stage in (first, second):
        assert all(torch.equal(stage[n], start[n]) for n in stage if not n.endswith(".gate")), from_best
    gates = [n for n in first if n.endswith(".gate")]
    expected = {n: first[n].clone() for n in gates}
    for _ in range(3):
        proximal_step(expected.values(), "reference", 5e-2, lr=0.0)
    assert all(torch.equal(second[n], expected[n]) for n in gates), from_best
    assert any(not torch.equal(second[n], first[n]) for n in gates)  # λ_2 did cut


def test_from_best_records_stage_0s_best_again_when_its_record_was_lost(make_recipe) -> None:
    """A schedule killed after stage 0's run finished but before its record was written: on --resume stage 0's run is
    complete, and its record must still describe best/ (scored by the run's last metrics.jsonl events), not final/."""
    recipe = reference_schedule(make_recipe, "lost-record", [1e-3, 1e-2], from_best=True)
    out = Path(recipe.train.output_dir or "")
    records = list(run(recipe, out))
    assert json.loads((out / "runs" / "0" / "best" / "adapter.json").read_text())["step"] == 5  # not final/
    shutil.rmtree(out / "stages")
    for name in ("schedule.jsonl", "schedule.csv"):
        (out / name).unlink()
    again = list(run(recipe, out, resume=True))
    assert again == records
    kept = load_file(out / "stages" / "0" / "adapter.safetensors")
    best = load_file(out / "runs" / "0" / "best" / "adapter.safetensors")
    assert all(torch.equal(t, best[n]) for n, t in kept.items())  # best/ (step 5) again, not final/ (step 10)
