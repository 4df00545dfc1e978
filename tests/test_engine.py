"""The engine on a tiny BERT and a generated CSV: golden losses, sparsity, exact resume, run-dir safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_cli.engine import train
from sora_cli.errors import CheckpointError, InputError
from sora_cli.recipe import load_recipe

from .conftest import events

# Train losses at steps 5, 10, ..., 30 of the tiny recipe (conftest.make_recipe) run in float64 on the CPU.
# float64 (the tiny base is pre-trained in float64 too), because in float32 the CPU's kernels (AVX2 and AVX-512 round
# differently) and 30 steps at lr 1e-2 move the losses by ~1e-3. In float64 the two agree to 2e-13 (measured here with
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 against AVX-512), so abs 1e-8 holds on any x86-64 CPU with
# AVX2, while any change to the math (loss, optimizer, threshold, data order) moves these by far more.
# Regenerate only for a deliberate change of the math: print them from metrics.jsonl.
GOLDEN_LOSSES = [0.39573793787965217, 0.04404720715086057, 0.06875194964408478, 0.0032734303582451136,
                 0.0026738232703140312, 0.14760102768600333]


def final_tensors(run: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run / name / "adapter.safetensors")


def test_short_run_golden_losses_and_sparsity(make_recipe) -> None:
    recipe = load_recipe(make_recipe(model={"dtype": "float64"}))
    result = train(recipe)
    run = Path(recipe.train.output_dir)
    losses = [e["loss"] for e in events(run, "train")]
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=1e-8, rel=0), losses
    tensors = final_tensors(run)
    gates = [t for k, t in tensors.items() if k.endswith(".gate")]
    zero = sum(int((g == 0).sum()) for g in gates)
    assert len(gates) == 13 and 0 < zero < 13 * 4  # some ranks switched off, not all
    assert (result.stats["zero_gates"], result.stats["total_gates"], result.stats["active_rank"]) == (zero, 52, 52 - zero)
    meta = json.loads((run / "final" / "adapter.json").read_text())
    assert meta["method"] == "sora" and meta["step"] == 30
    for name, m in meta["modules"].items():  # each module's recorded rank is its saved gate's non-zero count
        assert m["active_rank"] == int(torch.count_nonzero(tensors[f"{name}.gate"]))
    assert {k: v for k, v in meta["modules"]["bert.pooler.dense"].items() if k != "active_rank"} == {
        "r": 4, "s": 2.0, "d_in": 32, "d_out": 32, "base_zeros": 0}
    assert set(meta["metrics"]) == {"dev", "test"} and meta["metrics"]["test"]["accuracy"] >= 0.9  # it learns
    assert load_recipe(run / "recipe.yaml") == recipe  # the resolved recipe, readable again
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep_last 2
    assert [e["step"] for e in events(run, "eval")] == [15, 30]


def test_scaled_threshold_follows_the_lr_schedule(make_recipe) -> None:
    recipe = load_recipe(make_recipe(train={"warmup_steps": 10, "lr_scheduler": "cosine"}))
    train(recipe)
    logged = events(Path(recipe.train.output_dir), "train")
    assert len({e["lr"] for e in logged}) == len(logged)  # the LR really moves
    for e in logged:
        assert e["threshold"] == pytest.approx(5.0 * e["lr"], rel=1e-12)  # τ_t = λ·η_t


def test_lora_run_keeps_every_rank(make_recipe) -> None:
    recipe = load_recipe(make_recipe(adapter={"method": "lora", "r": 4, "alpha": 8, "sparse_lambda": None},
                                     train={"max_steps": 10, "eval_every": None, "save_every": None}))
    result = train(recipe)
    tensors = final_tensors(Path(recipe.train.output_dir))
    assert not any(k.endswith(".gate") for k in tensors)
    assert result.stats == {"active_rank": 52, "max_rank": 52}
    assert tensors["classifier.weight"].shape == (2, 32)


def _strip(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("examples_per_s", "tokens_per_s")}


def test_resume_mid_epoch_equals_uninterrupted(make_recipe) -> None:
    # 320 train examples, batch 16: 20 steps an epoch; step 10 is mid-epoch 0, step 30 mid-epoch 1.
    full = load_recipe(make_recipe("full", train={"keep_last": 3}))
    train(full)
    part = load_recipe(make_recipe("part", train={"keep_last": 3}))
    train(part)
    run = Path(part.train.output_dir)
    a, b = final_tensors(Path(full.train.output_dir)), final_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed makes CPU runs bit-for-bit repeatable
    for name in ("checkpoints/step-20", "checkpoints/step-30", "final", "best"):
        shutil.rmtree(run / name)  # as if killed right after step 10's checkpoint
    result = train(part, resume=True)
    assert (result.resumed_from, result.step) == (10, 30)
    a, b = final_tensors(Path(full.train.output_dir)), final_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(map(_strip, events(run, "train"))) == list(map(_strip, events(Path(full.train.output_dir), "train")))


def test_kill_9_then_resume_equals_uninterrupted(make_recipe) -> None:
    steps = {"max_steps": 120, "save_every": 10, "eval_every": 60, "keep_last": 20}
    reference = load_recipe(make_recipe("reference", train=steps))
    train(reference)
    path = make_recipe("killed", train=steps)
    run = Path(load_recipe(path).train.output_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sora_cli", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-20").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the training process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    result = train(load_recipe(path), resume=True)
    assert result.resumed_from is not None and 20 <= result.resumed_from < 120
    a, b = final_tensors(Path(reference.train.output_dir)), final_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_dir_is_never_overwritten(make_recipe) -> None:
    recipe = load_recipe(make_recipe(train={"max_steps": 5, "eval_every": None}))
    train(recipe)
    run = Path(recipe.train.output_dir)
    # the run's data; .lock is the writer's record (who holds the run, since when), rewritten by every run that
    # takes the directory, a finished one resumed included
    data = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = data()
    with pytest.raises(InputError, match="already holds a run; continue it with --resume, replace it with --overwrite"):
        train(recipe)
    assert data() == before
    changed = load_recipe(make_recipe(train={"max_steps": 5, "eval_every": None, "lr": 0.5}))
    with pytest.raises(InputError, match=r"--resume: the recipe differs from the run's recipe.yaml in train.lr"):
        train(changed, resume=True)
    assert data() == before
    result = train(recipe, resume=True)  # finished: nothing to do, nothing touched
    assert result.already_complete and data() == before
    train(changed, overwrite=True)
    assert load_recipe(run / "recipe.yaml").train.lr == 0.5


def test_damaged_checkpoint_falls_back_then_is_refused(make_recipe) -> None:
    steps = {"max_steps": 10, "eval_every": None, "save_every": 5}
    clean = load_recipe(make_recipe("clean", train=steps))
    train(clean)
    recipe = load_recipe(make_recipe(train=steps))
    train(recipe)
    run = Path(recipe.train.output_dir)
    shutil.rmtree(run / "final")
    weights = run / "checkpoints" / "step-10" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = train(recipe, resume=True)
    assert result.resumed_from == 5  # the newest readable checkpoint
    a, b = final_tensors(Path(clean.train.output_dir)), final_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(run / "final")
    for step in (5, 10):
        (run / "checkpoints" / f"step-{step}" / "training_state.json").write_text("{")
    # the run's files, not .lock: the writer's record, rewritten by whoever takes the directory
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(CheckpointError, match=r"no readable checkpoint to resume from .*training state unreadable"):
        train(recipe, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_early_stopping(make_recipe) -> None:
    recipe = load_recipe(make_recipe(train={"lr": 1e-9, "max_steps": 40, "eval_every": 2, "patience": 2}))
    result = train(recipe)
    run = Path(recipe.train.output_dir)
    # LR so small that the dev metric never improves after the first evaluation: stop 2 evaluations later.
    assert [e["step"] for e in events(run, "eval")] == [2, 4, 6]
    assert result.step == 6 and result.best_step == 2
    assert json.loads((run / "final" / "adapter.json").read_text())["step"] == 6
    again = train(recipe, resume=True)  # an early-stopped run is finished: resume trains no further
    assert again.already_complete and again.step == 6


def test_gradient_accumulation_matches_a_bigger_batch(make_recipe, tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert_dir, model)
    config = AutoConfig.from_pretrained(model)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(model)
    common = {"max_steps": 6, "eval_every": None, "log_every": 1}
    one = load_recipe(make_recipe("one", model={"name_or_path": str(model)}, train={"batch_size": 16, **common}))
    two = load_recipe(make_recipe("two", model={"name_or_path": str(model)},
                                  train={"batch_size": 8, "grad_accum": 2, **common}))
    train(one)
    train(two)
    a, b = final_tensors(Path(one.train.output_dir)), final_tensors(Path(two.train.output_dir))
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_regression_task_and_bf16(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sora_cli.tasks.classification import ClassificationTask

    from .conftest import make_sentences, write_csv

    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []  # (autocast on, prediction dtype, loss dtype) per batch
    real = ClassificationTask.loss_sum

    def spy(self, model, batch):
        loss = real(self, model, batch)
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype, loss.dtype))
        return loss

    monkeypatch.setattr(ClassificationTask, "loss_sum", spy)
    rows = [(text, float(label) * 4 + (len(text) % 3) / 3) for text, label in make_sentences(160, seed=5)]
    data = write_csv(tmp_path / "scores.csv", rows)
    recipe = load_recipe(make_recipe(data={"train_file": str(data), "task_type": "regression"},
                                     train={"max_steps": 30, "eval_every": None, "precision": "bf16"}))
    result = train(recipe)
    assert len(seen) == 30 and set(seen) == {(True, torch.bfloat16, torch.float32)}  # bf16 matmuls, float32 loss
    losses = [e["loss"] for e in events(Path(recipe.train.output_dir), "train")]
    assert losses[-1] < 0.5 * losses[0] and result.dev["pearson"] > 0.6, (losses, result.dev)  # it learns (9.0 -> 3.9, 0.76)
    meta = json.loads((Path(recipe.train.output_dir) / "final" / "adapter.json").read_text())
    assert meta["task"] == {"type": "regression", "num_labels": 1, "label_names": None}


def test_sentence_pairs_and_string_labels(make_recipe, tmp_path: Path) -> None:
    from .conftest import make_sentences

    rows = make_sentences(80, seed=3)
    path = tmp_path / "pairs.csv"
    path.write_text("first,second,verdict\n" + "".join(
        f"{a},{b},{'same' if la == lb else 'different'}\n" for (a, la), (b, lb) in zip(rows[::2], rows[1::2])))
    recipe = load_recipe(make_recipe(data={"train_file": str(path), "text_fields": ["first", "second"],
                                           "label_field": "verdict", "split": [0.5, 0.5]},
                                     train={"max_steps": 4, "eval_every": None, "batch_size": 8}))
    result = train(recipe)
    meta = json.loads((Path(recipe.train.output_dir) / "final" / "adapter.json").read_text())
    assert meta["task"] == {"type": "classification", "num_labels": 2, "label_names": ["different", "same"]}
    assert set(result.dev) == {"accuracy", "f1", "matthews"} and result.test == {}
