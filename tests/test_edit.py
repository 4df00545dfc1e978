"""Knowledge editing on a tiny Llama: EasyEdit's teacher-forced metrics against hand-computed token accuracies,
padding on either side, the three modes, exact resume of a single-mode run, and the changed-weight count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sora_cli.editing.metrics import agreement, padded, predict, token_accuracy
from sora_cli.editing.run import open_session, predictions, run_edits, scores
from sora_cli import schedule
from sora_cli.errors import InputError, RecipeError
from sora_cli.evaluate import evaluate_checkpoint
from sora_cli.recipe import load_recipe
from sora_cli.tasks.edit import split_ids
from tests.conftest import write_recipe
from tests.tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

EDITS = [  # EasyEdit's format, with words of the tiny tokenizer's vocabulary; multi-token targets among them
    {"prompt": "the movie was", "target_new": "very good", "ground_truth": "bad",
     "rephrase_prompt": "this film was", "locality": {"nq": {"prompt": "what is the plot", "ground_truth": "awful"}},
     "portability": {"one_hop": {"prompt": "the review of the movie was", "ground_truth": "very good"}}},
    {"prompt": "the plot was", "target_new": "great", "ground_truth": "awful",
     "rephrase_prompt": ["what plot was", "this plot was"],
     "locality": {"nq": {"prompt": "hello , you are", "ground_truth": "helpful"}}},
    {"prompt": "answer one word : the film is", "target_new": "not very bad", "ground_truth": "good",
     "locality_prompt": "the task is", "locality_ground_truth": "a review"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_model(tmp_path_factory.mktemp("tiny-llama"), tiny_causal_tokenizer())


@pytest.fixture
def edit_recipe(tmp_path: Path, tiny_dir: Path):
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))

    def make(name: str = "edit", **sections: dict[str, Any]) -> Path:
        recipe: dict[str, Any] = {
            "model": {"name_or_path": str(tiny_dir), "dtype": "float64"},
            "adapter": {"method": "roselora", "r": 4, "alpha": 16, "dropout": 0.1, "density": 0.25, "sparsify_start": 2,
                        "sparsify_end": 12, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train_file": str(edits), "task_type": "edit", "max_length": 32},
            "train": {"lr": 5e-2, "batch_size": 1, "max_steps": 20, "lr_scheduler": "constant",
                      "output_dir": str(tmp_path / "runs" / name), "seed": 5},
            "edit": {"mode": "single"},
        }
        return write_recipe(tmp_path / f"{name}.yaml", recipe, sections)

    return make


def hand_predictions(model: Any, prompt: list[int], target: list[int]) -> list[int]:
    """Argmax of the full logits of the unpadded sequence alone, at positions len(prompt) − 1 ... − 2."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0]  # (T, V)
    return [int(logits[len(prompt) + k - 1].argmax()) for k in range(len(target))]


def test_token_accuracy_and_agreement_hand_worked() -> None:
    assert token_accuracy([4, 5, 6], [4, 9, 6]) == pytest.approx(2 / 3, abs=1e-15)
    assert agreement([1, 2], [1, 2]) == 1.0 and agreement([7], [8]) == 0.0


def test_teacher_forced_predictions_equal_the_sequence_alone_with_either_padding(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = [split_ids(tok, e["prompt"], e["target_new"]) for e in EDITS]
    assert [len(t) for _, t in pairs] == [2, 1, 3]  # multi-token targets; prompts of 3, 3 and 6 tokens
    hand = [hand_predictions(model, p, t) for p, t in pairs]
    for side in ("left", "right"):
        assert predict(model, pairs, tok.pad_token_id, torch.device("cpu"), side=side) == hand  # type: ignore[arg-type]


def test_padding_keeps_each_rows_positions() -> None:
    inputs, offsets = padded([[5, 6, 7], [8]], 0, "left", torch.device("cpu"))
    assert offsets == [0, 2] and inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert inputs["position_ids"][1, 2] == 0 and inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    inputs, offsets = padded([[5, 6, 7], [8]], 0, "right", torch.device("cpu"))
    assert offsets == [0, 0] and inputs["position_ids"][1, 0] == 0 and inputs["input_ids"][1].tolist() == [8, 0, 0]


def test_metrics_of_the_protocol_match_hand_computed_accuracies(edit_recipe, tiny_dir: Path) -> None:
    s = open_session(load_recipe(edit_recipe()))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for i, e in enumerate(EDITS):
        pre = scores(s.probes[i], s.base[i], s.base[i])
        p, t = split_ids(tok, e["prompt"], e["target_new"])
        assert pre["reliability"] == token_accuracy(hand_predictions(model, p, t), t)
        assert pre["locality"] == 1.0  # the unedited model agrees with itself
    rephrases = [split_ids(tok, q, "great") for q in EDITS[1]["rephrase_prompt"]]
    expected = sum(token_accuracy(hand_predictions(model, q, t), t) for q, t in rephrases) / 2
    assert scores(s.probes[1], s.base[1], s.base[1])["generalization"] == pytest.approx(expected, abs=1e-15)
    assert scores(s.probes[1], s.base[1], s.base[1])["portability"] is None  # no portability probe: left out
    # a fresh adapter (B = 0) changes nothing: every prediction equals the unedited model's, locality is 1.0
    live = predictions(s, [0, 1, 2])
    assert live == s.base and all(scores(s.probes[i], live[i], s.base[i])["locality"] == 1.0 for i in range(3))


def test_single_mode_edits_reliably_and_touches_few_weights(edit_recipe) -> None:
    recipe = load_recipe(edit_recipe())
    result = run_edits(recipe)
    out = Path(recipe.train.output_dir)
    lines = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["index"] for r in lines] == [0, 1, 2] and result.summary == summary
    assert summary["protocol"] == "easyedit-teacher-forced" and summary["mode"] == "single"
    assert summary["post"]["reliability"] >= 0.8 and summary["pre"]["reliability"] == 0.0
    for r in lines:  # q_proj (32 × 32) and v_proj (16 × 32) of 2 layers; ⌈0.25 · d⌉ entries per row / column
        assert r["adapted_base_weights"] == 2 * (32 * 32 + 16 * 32)
        assert 0 < r["changed_weights"] <= 2 * (8 * 8 + 4 * 8) * 4  # Σ_modules r · nnz(B col) · nnz(A row)
    assert not (out / "final").exists()  # single mode discards every adapter


def test_single_mode_resume_continues_after_the_last_complete_edit(edit_recipe) -> None:
    full = load_recipe(edit_recipe("full"))
    run_edits(full)
    part = load_recipe(edit_recipe("part"))
    run_edits(part)
    log = Path(part.train.output_dir) / "edits.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:40])  # killed while writing the second edit's line
    run_edits(part, resume=True)
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log.read_text().splitlines()]
    expected = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (Path(full.train.output_dir) / "edits.jsonl").read_text().splitlines()]
    assert strip == expected


def test_batch_and_sequential_modes(edit_recipe) -> None:
    batch = load_recipe(edit_recipe("batch", edit={"mode": "batch"}, train={"batch_size": 3, "max_steps": 30}))
    b = run_edits(batch).summary
    assert b["mode"] == "batch" and (Path(batch.train.output_dir) / "final" / "adapter.safetensors").is_file()
    assert b["post"]["reliability"] > b["pre"]["reliability"]
    with pytest.raises(InputError, match="a knowledge-editing adapter; sora train scored its edits"):
        evaluate_checkpoint(Path(batch.train.output_dir) / "final", [])
    seq = load_recipe(edit_recipe("seq", edit={"mode": "sequential"}))
    s = run_edits(seq).summary
    assert s["just_after"]["reliability"] > s["pre"]["reliability"]
    lines = [json.loads(line) for line in (Path(seq.train.output_dir) / "edits.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"pre", "just_after", "post"} for r in lines)  # each edit right after, and at the end
    assert s["changed_weights_per_edit"] == lines[-1]["changed_weights"]  # the final adapter, not a mean
    with pytest.raises(Exception, match="a sequential-mode edit run cannot continue part-way"):
        run_edits(seq, resume=True)


def test_edit_recipe_errors(edit_recipe, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="edit: only applies to data.task_type: edit"):
        load_recipe(edit_recipe(data={"task_type": "causal_lm"}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([EDITS[0], {"prompt": "x"}]))
    with pytest.raises(Exception, match=r"bad.json: line 1 \(list index 1\): .*target_new"):
        run_edits(load_recipe(edit_recipe("bad", data={"train_file": str(bad)})))
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written
    scheduled = load_recipe(edit_recipe("sched", adapter={"method": "sora", "density": None, "sparsify_start": None,
                                                          "sparsify_end": None},
                                        schedule={"thresholds": [0.1, 1.0], "steps_per_stage": 2}))
    with pytest.raises(InputError, match="the sparsifying scheduler needs a dev split"):
        schedule.plan(scheduled, 3)


def test_generation_based_exact_match_is_stored_under_its_own_name(edit_recipe, tiny_dir: Path) -> None:
    recipe = load_recipe(edit_recipe("em", edit={"mode": "single", "exact_match": True}, data={"max_new_tokens": 3}))
    summary = run_edits(recipe).summary
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    lines = [json.loads(line) for line in (Path(recipe.train.output_dir) / "edits.jsonl").read_text().splitlines()]
    for e, r in zip(EDITS, lines):  # the unedited model's greedy continuation, by hand
        ids = torch.tensor([split_ids(tok, e["prompt"], e["target_new"])[0]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        words = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower().split()
        target = e["target_new"].lower().split()
        assert r["pre"]["exact_match"] == float(words[: len(target)] == target)
        assert r["post"]["exact_match"] in (0.0, 1.0)
    assert summary["post"]["exact_match"] == sum(r["post"]["exact_match"] for r in lines) / 3
    assert summary["post"]["exact_match"] > summary["pre"]["exact_match"]  # the edits took, in generation too
