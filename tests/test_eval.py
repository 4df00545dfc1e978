"""`sora eval` against the numbers training recorded, the base model evaluated by hand, and predictions counted by
hand; its errors. Labels are noisy (a fifth flipped) so that no metric is 1.0 and splits score differently."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sora_cli.checkpoint import load_adapter
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.models import load_adapted, load_base
from sora_cli.recipe import load_recipe
from sora_cli.tasks import EvalContext, task_from_meta

from .conftest import make_sentences, write_csv, write_jsonl

runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def report(*args: str) -> dict[str, Any]:
    """`sora eval ARGS --json`, checked to succeed with nothing but the JSON on stdout."""
    result = invoke("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def failure(*args: str) -> str:
    """`sora eval ARGS` expected to fail as bad input: exit 2, one line, no traceback."""
    result = invoke("eval", *args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    return result.output


def noisy_rows(n: int, seed: int, regression: bool = False) -> list[tuple[str, Any]]:
    """Sentiment sentences with a fifth of the labels flipped (classification), or a noisy score (regression)."""
    rng = random.Random(seed)
    rows = make_sentences(n, seed)
    if regression:
        return [(text, round(label + rng.gauss(0, 0.4), 3)) for text, label in rows]
    return [(text, 1 - label if rng.random() < 0.2 else label) for text, label in rows]


def trained(make_recipe: Any, tmp_path: Path, regression: bool = False) -> tuple[Path, Path]:
    """(run directory, its recipe file): a tiny SoRA run of 6 steps with step checkpoints at 3 and 6."""
    data = write_csv(tmp_path / "noisy.csv", noisy_rows(400, seed=1, regression=regression))
    path = make_recipe("evalrun", data={"train_file": str(data), **({"task_type": "regression"} if regression else {})},
                       train={"max_steps": 6, "eval_every": None, "save_every": 3})
    recipe = load_recipe(path)
    train(recipe)
    return Path(recipe.train.output_dir), path


@pytest.fixture
def run(make_recipe: Any, tmp_path: Path) -> Path:
    return trained(make_recipe, tmp_path)[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_final_scores_what_training_recorded(run: Path) -> None:
    recorded = load_adapter(run / "final")[1]["metrics"]
    assert recorded["test"] != recorded["dev"] and 0 < recorded["test"]["accuracy"] < 1  # the checks can fail
    before = snapshot(run)
    test = report(str(run / "final"))
    assert test["metrics"] == recorded["test"]  # exactly: same model, same data, same code path
    assert {k: v for k, v in test.items() if k != "metrics"} == {
        "checkpoint": str(run / "final"), "model": "adapter", "method": "sora", "base_model": test["base_model"],
        "task": "classification", "split": "test", "data": str(run.parent.parent / "noisy.csv"), "examples": 40,
        "step": 6}
    assert report(str(run / "final"), "--split", "dev")["metrics"] == recorded["dev"]
    table = invoke("eval", str(run / "final"))
    assert table.exit_code == 0, table.output
    assert f"{run / 'final'} (step 6)" in table.output and "sora adapter" in table.output
    assert "test: 40 examples from" in table.output
    assert f"accuracy   │ {recorded['test']['accuracy']:.4f}" in table.output
    assert snapshot(run) == before  # evaluation writes nothing


def test_step_checkpoint_finds_the_recipe_two_levels_up(run: Path) -> None:
    assert not (run / "checkpoints" / "recipe.yaml").exists()
    step3 = report(str(run / "checkpoints" / "step-3"))
    assert step3["step"] == 3 and step3["split"] == "test" and step3["examples"] == 40
    assert step3["checkpoint"] == str(run / "checkpoints" / "step-3")


def test_base_is_the_recorded_base_with_the_trained_head(make_recipe: Any, tmp_path: Path) -> None:
    # Regression: Pearson and Spearman move with every output, so the base and the adapter score differently.
    run, recipe_path = trained(make_recipe, tmp_path, regression=True)
    adapted = report(str(run / "final"))
    base = report(str(run / "final"), "--base")
    assert base["model"] == "base" and base["examples"] == adapted["examples"] == 40
    assert base["metrics"] != adapted["metrics"]

    tensors, meta = load_adapter(run / "final")
    model, tokenizer = load_base(run / "final", meta)  # its fresh head replaced by the checkpoint's
    heads = {k: v for k, v in tensors.items() if any(k.startswith(f"{m}.") for m in meta["modules_to_save"])}
    assert heads and not model.load_state_dict(heads, strict=False).unexpected_keys
    recipe = load_recipe(recipe_path)
    task = task_from_meta(meta, recipe.data)
    task.load_data()
    data = task.encode(tokenizer, recipe.data.max_length).test
    ctx = EvalContext(recipe.train.eval_batch_size, torch.device("cpu"), contextlib.nullcontext(), tokenizer)
    assert base["metrics"] == task.evaluate(model.eval(), data, ctx)
    bf16 = report(str(run / "final"), "train.precision=bf16")  # the recipe's autocast applies
    assert bf16["metrics"] != adapted["metrics"] and bf16["metrics"]["pearson"] == pytest.approx(
        adapted["metrics"]["pearson"], abs=0.05)


def test_data_file_scores_every_record(run: Path, tmp_path: Path) -> None:
    rows = noisy_rows(23, seed=5)
    path = write_csv(tmp_path / "extra.csv", rows)
    got = report(str(run / "final"), "--data", str(path))
    assert got["examples"] == 23 and got["split"] == "all" and got["data"] == str(path)

    model, tokenizer, _ = load_adapted(run / "final")
    correct = 0
    with torch.no_grad():
        for text, label in rows:
            inputs = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
            correct += int(model(**inputs).logits.argmax(-1).item() == label)
    assert 0 < correct < 23
    assert got["metrics"]["accuracy"] == correct / 23


def test_pruned_copy_scores_the_same(run: Path) -> None:
    assert invoke("prune", str(run / "final")).exit_code == 0
    pruned = report(str(run / "final-pruned"))  # next to final/: the run's recipe is one level up
    assert pruned["metrics"] == load_adapter(run / "final")[1]["metrics"]["test"]


def test_json_is_alone_on_stdout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sora_cli.evaluate
    from sora_cli import render

    def noisy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        render.note("dropped 1 of 9 dev examples")  # as a task does while encoding
        print("a stray print")
        return {"examples": 8}

    monkeypatch.setattr(sora_cli.evaluate, "evaluate_checkpoint", noisy)
    result = invoke("eval", str(tmp_path), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"examples": 8}
    assert "dropped 1 of 9" in result.stderr and "a stray print" in result.stderr


def test_overrides_apply_to_the_run_recipe(run: Path) -> None:
    assert report(str(run / "final"), "data.max_eval_samples=5")["examples"] == 5
    assert report(str(run / "final"), "data.max_eval_samples=7", "--split", "dev")["examples"] == 7


def test_explicit_recipe_for_a_copied_checkpoint(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "deep" / "final"
    shutil.copytree(run / "final", copy)
    out = failure(str(copy))
    assert f"{copy}: no recipe.yaml" in out and "--recipe" in out
    got = report(str(copy), "--recipe", str(run / "recipe.yaml"))
    assert got["metrics"] == load_adapter(run / "final")[1]["metrics"]["test"]


def test_bad_input_is_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    assert "no such checkpoint directory" in failure(str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in failure(str(tmp_path / "absent"))
    out = failure(str(run / "final"), "data.split=[0.8, 0.2]")
    assert "--split test" in out and "no test split, only train, dev" in out
    assert failure(str(run / "final"), "--data", str(tmp_path / "missing.csv")).count("missing.csv") == 1
    assert "not with --data" in failure(str(run / "final"), "--data", str(tmp_path / "x.csv"), "--split", "dev")
    assert "train.eval_batch_size: must be positive" in failure(str(run / "final"), "train.eval_batch_size=0")
    assert invoke("eval", str(run / "final"), "--split", "train").exit_code == 2  # typer: not dev or test
    if not torch.cuda.is_available():
        assert "train.device: cuda requested" in failure(str(run / "final"), "train.device=cuda")


def test_data_file_with_other_labels_is_refused(run: Path, tmp_path: Path) -> None:
    named = write_csv(tmp_path / "named.csv", [(t, "pos" if y else "neg") for t, y in noisy_rows(6, seed=2)])
    assert "labels (neg, pos) are not the checkpoint's (integer ids)" in failure(str(run / "final"), "--data",
                                                                                  str(named))
    three = write_csv(tmp_path / "three.csv", [("good film", 0), ("bad film", 1), ("the plot", 2)])
    assert "has label 2, but the checkpoint's head has 2 labels" in failure(str(run / "final"), "--data", str(three))


def tiny_deberta_dir(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A tiny DeBERTa-v2 encoder saved without a pooler, as microsoft/deberta-v3-base is: its sequence classifier's
    pooler.dense is newly initialised at every load (the BERT fixture's word-level tokenizer)."""
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    root = tmp_path / "tiny-deberta"
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    DebertaV2Model(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_a_head_the_base_lacks_is_trained_and_restored(make_recipe: Any, tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Regression: DeBERTa's pooler was left frozen at a random init and unsaved (all-linear even adapted it), so no
    checkpoint could be evaluated again. Now it trains with the classifier and eval scores what training recorded."""
    base = tiny_deberta_dir(tmp_path, tiny_bert_dir)
    data = write_csv(tmp_path / "noisy.csv", noisy_rows(200, seed=1, regression=True))
    path = make_recipe("deberta", model={"name_or_path": str(base)},
                       data={"train_file": str(data), "task_type": "regression"},
                       train={"max_steps": 4, "eval_every": None, "save_every": 4})
    recipe = load_recipe(path)
    train(recipe)
    tensors, meta = load_adapter(Path(recipe.train.output_dir or "") / "final")
    assert meta["modules_to_save"] == ["pooler.dense", "classifier"]
    assert not any(t.startswith("pooler") for t in meta["target_modules"])
    assert report(str(Path(recipe.train.output_dir or "") / "final"))["metrics"] == meta["metrics"]["test"]
    model = load_adapted(Path(recipe.train.output_dir or "") / "final")[0]
    assert torch.equal(model.pooler.dense.weight, tensors["pooler.dense.weight"])

    frozen = load_recipe(make_recipe("frozen", model={"name_or_path": str(base)},
                                     data={"train_file": str(data), "task_type": "regression"},
                                     adapter={"modules_to_save": ["classifier"]}))
    with pytest.raises(InputError, match=r"adapter.modules_to_save: pooler.dense is not in the base checkpoint "
                                         r"\(newly initialised\), so frozen it would stay random"):
        train(frozen)
    assert not Path(frozen.train.output_dir or "").exists()


def test_data_file_is_scored_whole_under_the_papers_split(make_recipe: Any, tmp_path: Path) -> None:
    """A run with data.glue_split: sora (rte: GLUE's validation halved into dev and test) scores every record of
    --data, not the half that the paper's cut would keep."""
    def write(name: str, rows: list[tuple[str, Any]]) -> Path:
        return write_jsonl(tmp_path / f"{name}.jsonl", [{"sentence1": t, "sentence2": "so it was", "label": y}
                                                         for t, y in rows])

    train_file, validation = write("train", noisy_rows(200, seed=1)), write("validation", noisy_rows(20, seed=2))
    recipe = load_recipe(make_recipe("paper-split", data={"task": "rte", "train_file": str(train_file),
                                                          "validation_file": str(validation),
                                                          "glue_split": "sora", "split_seed": 42},
                                     train={"max_steps": 3, "eval_every": None, "save_every": 3}))
    train(recipe)
    final = Path(recipe.train.output_dir or "") / "final"
    assert report(str(final))["examples"] == 10  # the test half
    extra = write("extra", noisy_rows(13, seed=5))
    assert report(str(final), "--data", str(extra))["examples"] == 13
