"""`sora sparsify`: masks on hand-worked matrices (magnitude per matrix, Wanda per row, n:m), block-by-block Wanda
calibration against a reference made of full forwards (tiny Llama, tiny BERT), the command end to end (a causal
recipe with wanda, a classification recipe, bare model directories with magnitude), and every bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sora_cli.adapters.inject import select_targets
from sora_cli.cli import app
from sora_cli.recipe import load_recipe
from sora_cli.sparsify import (
    PATTERN_MEANING,
    Rule,
    find_blocks,
    keep_mask,
    matrix_mask,
    model_inputs,
    nm_mask,
    prune_weight,
    row_mask,
    score,
    wanda_prune,
)
from sora_cli.tasks import get_task

from .conftest import tiny_bert_config, tiny_llama_config, write_recipe
from .tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

runner = CliRunner()
WORDS = ["the", "movie", "film", "plot", "was", "very", "it", "and", "good", "great", "bad", "awful"]


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["sparsify", *args])


def records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"instruction": "classify the sentiment of this review",
             "input": " ".join(rng.sample(WORDS, rng.randint(1, 8))),  # lengths vary: tokens depend on the draw
             "output": rng.choice(["positive", "negative"])} for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_model(tmp_path_factory.mktemp("tiny-llama"), tiny_causal_tokenizer())


@pytest.fixture(scope="module")
def causal_recipe(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("causal-recipe")
    data = root / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(30, seed=1)))
    recipe = {"model": {"name_or_path": str(llama_dir)},
              "data": {"train_file": str(data), "task_type": "causal_lm", "max_length": 64, "chat_template": True},
              "train": {"seed": 3, "output_dir": str(root / "runs")}}
    return write_recipe(root / "causal.yaml", recipe, {})


def weights(directory: Path, causal: bool = True) -> dict[str, torch.Tensor]:
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(directory).state_dict()


# ---------------------------------------------------------------------------------------------
# Masks on hand-worked matrices


def test_magnitude_one_threshold_per_matrix_ties_to_the_lower_flat_index() -> None:
    w = torch.tensor([[0.1, -0.5, 0.3, 2.0],
                      [-0.3, 0.05, 1.0, -0.2],
                      [0.7, 0.3, -0.9, 0.4]])
    # int(12 · 0.45) = 5 lowest |W| of the whole matrix: 0.05, 0.1, 0.2, then two of the three 0.3s (flat 2, 4);
    # the third 0.3 (flat 9) stays. Row 2 keeps everything: one threshold per matrix, not per row.
    expected = torch.tensor([[False, True, False, True],
                             [False, False, True, False],
                             [True, True, True, True]])
    assert torch.equal(matrix_mask(score(w), 0.45), expected)
    pruned = w.clone()
    prune_weight(pruned, Rule("magnitude", sparsity=0.45))
    assert torch.equal(pruned, w * expected)


def test_wanda_per_row_with_hand_picked_norms_differs_from_magnitude() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [4.0, 3.0, 2.0, 1.0]])
    sq_norm = torch.tensor([16.0, 4.0, 1.0, 1.0])  # ‖X‖ = 4, 2, 1, 1
    # Scores: row 0 = 4, 4, 3, 4 (loses 3, then the first of the tied 4s); row 1 = 16, 6, 2, 1 (loses 1 and 2).
    assert torch.equal(score(w, sq_norm), torch.tensor([[4.0, 4.0, 3.0, 4.0], [16.0, 6.0, 2.0, 1.0]]))
    wanda = torch.tensor([[False, True, False, True], [True, True, False, False]])
    assert torch.equal(keep_mask(score(w, sq_norm), Rule("wanda", sparsity=0.5)), wanda)
    assert torch.equal(row_mask(score(w, sq_norm), 0.5), wanda)
    # Magnitude zeroes the 4 lowest |W| of the matrix: the 1s and 2s (flat 0, 7, 1, 6).
    magnitude = torch.tensor([[False, False, True, True], [True, True, False, False]])
    assert torch.equal(keep_mask(score(w), Rule("magnitude", sparsity=0.5)), magnitude)
    assert not torch.equal(wanda, magnitude)
    pruned = w.clone()
    prune_weight(pruned, Rule("wanda", sparsity=0.5), sq_norm)
    assert torch.equal(pruned, torch.tensor([[0.0, 2.0, 0.0, 4.0], [4.0, 3.0, 0.0, 0.0]]))


def test_two_four_hand_worked_and_random() -> None:
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 5.0, 5.0, 1.0, 5.0],
                      [0.0, 0.0, 0.0, 0.0, -1.0, 2.0, -2.0, 1.0]])
    # Each group of 4 keeps its 2 highest |W|; among ties the lower index is kept (5, 5, 5 -> the first two).
    expected = torch.tensor([[False, True, True, False, True, True, False, False],
                             [True, True, False, False, False, True, True, False]])
    assert torch.equal(nm_mask(score(w), 2, 4), expected)
    assert torch.equal(keep_mask(score(w), Rule("magnitude", pattern=(2, 4))), expected)
    # 1:4 keeps one: the highest, the first of ties.
    assert torch.equal(nm_mask(score(w), 1, 4).nonzero()[:, 1], torch.tensor([1, 4, 0, 5]))
    big = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    pruned = big.clone()
    prune_weight(pruned, Rule("magnitude", pattern=(2, 4)))
    groups, original = pruned.reshape(16, 8, 4), big.abs().reshape(16, 8, 4)
    assert ((groups != 0).sum(-1) == 2).all()
    kept = torch.where(groups != 0, original, torch.inf).amin(-1)
    dropped = torch.where(groups == 0, original, -torch.inf).amax(-1)
    assert (kept > dropped).all()  # the two kept are the two largest of every group


# ---------------------------------------------------------------------------------------------
# Block-by-block calibration against full forwards


def reference_wanda(model: nn.Module, groups: list[list[str]], batches: list[dict[str, Any]], rule: Rule) -> None:
    """Wanda written the slow way: for each group (block i's linears, then those outside the blocks), a full model
    forward per sample with hooks on that group only, the blocks before it already pruned; the masks as the Wanda
    reference computes them (sort along the row; n:m group by group)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.eval()
    for names in groups:
        sq = {n: torch.zeros(linears[n].in_features) for n in names}

        def hook_for(total: torch.Tensor) -> Any:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d_in)
                total.add_(x.pow(2).sum(0))
            return hook

        handles = [linears[n].register_forward_hook(hook_for(sq[n])) for n in names]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for h in handles:
            h.remove()
        for n in names:
            w = linears[n].weight.data
            metric = w.abs() * sq[n].sqrt()
            mask = torch.zeros_like(w, dtype=torch.bool)  # True = prune
            if rule.pattern is not None:
                keep_n, m = rule.pattern
                for ii in range(0, w.shape[1], m):
                    order = torch.sort(metric[:, ii:ii + m], dim=1, descending=True, stable=True)[1]
                    mask.scatter_(1, ii + order[:, keep_n:], True)
            else:
                assert rule.sparsity is not None
                order = torch.sort(metric, dim=-1, stable=True)[1]
                mask.scatter_(1, order[:, : int(w.shape[1] * rule.sparsity)], True)
            w[mask] = 0


def tiny_model(kind: str) -> tuple[nn.Module, list[str], str, int]:
    """(model, targets, block-list prefix, number of blocks), seeded."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = tiny_llama_config()
        config.num_hidden_layers = 3
        model: nn.Module = LlamaForCausalLM(config)
        return model, select_targets(model, "all-linear", []), "model.layers", 3
    if kind == "gemma3":  # sliding-window and full layers, each with its own mask and rotary table
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        gemma = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3,
                                 max_position_embeddings=64, attn_implementation="eager",
                                 layer_types=["sliding_attention", "full_attention"] * 2)
        model = Gemma3ForCausalLM(gemma)
        return model, select_targets(model, "all-linear", []), "model.layers", 4
    model = BertForSequenceClassification(tiny_bert_config(40, num_labels=2))
    return model, select_targets(model, "all-linear", ["classifier"]), "bert.encoder.layer", 2


def test_find_blocks_takes_the_outermost_longest_list() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))  # longer, but inside a block

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(9))  # longest, but holds no target
            self.layers = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(4, 2)

    toy = Toy()
    targets = select_targets(toy, "all-linear", ["head"])
    found = find_blocks(toy, targets)
    assert found is not None and found[0] == "layers" and found[1] is toy.layers
    assert find_blocks(toy, ["head"]) is None
    for kind, prefix in (("llama", "model.layers"), ("bert", "bert.encoder.layer")):
        model, targets, _, _ = tiny_model(kind)
        assert (found := find_blocks(model, targets)) is not None and found[0] == prefix


@pytest.mark.parametrize("rule", [Rule("wanda", sparsity=0.5), Rule("wanda", pattern=(2, 4))], ids=["0.5", "2:4"])
@pytest.mark.parametrize("kind", ["llama", "bert", "gemma3"])
def test_wanda_block_by_block_equals_full_forward_reference(kind: str, rule: Rule) -> None:
    model, targets, prefix, n_blocks = tiny_model(kind)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for length in (5, 9, 7, 12):
        ids = torch.randint(0, 40, (1, length), generator=gen)
        batches.append(model_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "labels": ids}))
    assert all("labels" not in b for b in batches)
    reference = tiny_model(kind)[0]
    wanda_prune(model, targets, batches, rule)
    groups = [[t for t in targets if t.startswith(f"{prefix}.{i}.")] for i in range(n_blocks)]
    outside = [t for t in targets if not any(t in g for g in groups)]
    assert outside == (["bert.pooler.dense"] if kind == "bert" else [])
    reference_wanda(reference, groups + [outside], batches, rule)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for name in targets:
        assert (got[f"{name}.weight"] == 0).float().mean() == 0.5


# ---------------------------------------------------------------------------------------------
# The command


def calibration_tokens(recipe: Path, llama_dir: Path, samples: int, seed: int) -> tuple[int, str]:
    """Total tokens of the seeded draw, and the data fingerprint, computed here from the task."""
    from transformers import AutoTokenizer

    loaded = load_recipe(recipe)
    task = get_task(loaded.data)
    task.load_data()
    data = task.encode(AutoTokenizer.from_pretrained(llama_dir), 64).train
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples]
    return sum(len(data.examples[int(i)].input_ids) for i in order), task.fingerprint()


def test_wanda_from_a_causal_recipe_end_to_end(causal_recipe: Path, llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    result = invoke(str(causal_recipe), "-o", str(out), "--method", "wanda", "--sparsity", "0.5", "--samples", "6")
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output
    before, after = weights(llama_dir), weights(out)
    report = json.loads((out / "sparsify.json").read_text())
    targets = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert report["targets"] == targets
    for name in targets:
        w = after[f"{name}.weight"]
        d_out, d_in = w.shape
        assert ((w == 0).sum(1) == int(d_in * 0.5)).all(), name  # every row loses exactly int(d_in · ρ)
        assert report["modules"][name] == {"shape": [d_out, d_in], "weights": d_out * d_in,
                                           "zeros": d_out * d_in // 2, "sparsity": 0.5}
        assert torch.equal(w, before[f"{name}.weight"] * (w != 0))  # kept weights untouched
    assert any(not torch.equal(after[f"{n}.weight"] != 0, row_mask(score(before[f"{n}.weight"]), 0.5))
               for n in targets)  # the input norms changed the choice: not |W| per row
    others = [k for k in before if k.removesuffix(".weight") not in targets]
    assert "lm_head.weight" in others and "model.embed_tokens.weight" in others and "model.norm.weight" in others
    for key in others:
        assert torch.equal(before[key], after[key]), key
    tokens, fingerprint = calibration_tokens(causal_recipe, llama_dir, 6, seed=3)
    data = load_recipe(causal_recipe).data.train_file
    assert report["calibration"] == {"data": data, "fingerprint": fingerprint, "samples": 6, "tokens": tokens,
                                     "seed": 3}
    total = sum(m["weights"] for m in report["modules"].values())
    assert report["total"] == {"weights": total, "zeros": total // 2, "sparsity": 0.5}
    assert {k: report[k] for k in ("source", "base_model", "method", "sparsity")} == {
        "source": str(causal_recipe), "base_model": str(llama_dir), "method": "wanda", "sparsity": 0.5}
    assert "pattern" not in report and report["sora_version"]
    assert f"total: {total // 2:,d} of {total:,d} weights zero (50.00%) in 14 modules" in result.output
    assert "calibrated on 6 samples" in result.output and f"({tokens:,d} tokens)" in result.output


def test_wanda_seed_changes_the_draw(causal_recipe: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(str(causal_recipe), "-o", str(a), "--method", "wanda", "--pattern", "2:4", "--samples", "3",
                  "--seed", "11").exit_code == 0
    assert invoke(str(causal_recipe), "-o", str(b), "--method", "wanda", "--pattern", "2:4", "--samples", "3",
                  "--seed", "12").exit_code == 0
    ra, rb = (json.loads((d / "sparsify.json").read_text()) for d in (a, b))
    assert ra["calibration"]["seed"] == 11 and rb["calibration"]["seed"] == 12
    assert ra["pattern"] == "2:4" and ra["pattern_meaning"] == PATTERN_MEANING and "sparsity" not in ra
    wa, wb = weights(a), weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # other calibration tokens, other masks


def test_wanda_from_a_classification_recipe(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "sparse-bert"
    result = invoke(str(make_recipe()), "-o", str(out), "--method", "wanda", "--sparsity", "0.25", "--samples", "5")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sparsify.json").read_text())
    assert "bert.pooler.dense" in report["targets"] and not any("classifier" in t for t in report["targets"])
    assert report["calibration"]["samples"] == 5
    from transformers import AutoModelForSequenceClassification

    state = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    for name in report["targets"]:
        w = state[f"{name}.weight"]
        assert ((w == 0).sum(1) == int(w.shape[1] * 0.25)).all(), name


def test_recipe_heads_are_left_out(tmp_path: Path, tiny_csv: Path) -> None:
    """RoBERTa's classification head holds two Linears (classifier.dense, classifier.out_proj): `all-linear` over a
    recipe leaves out the task's whole head, not only modules named like a head."""
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    from .conftest import NEGATIVE, NEUTRAL, POSITIVE, SPECIAL

    base = tmp_path / "roberta"
    base.mkdir()
    (base / "vocab.txt").write_text("\n".join(SPECIAL + NEUTRAL + POSITIVE + NEGATIVE) + "\n")
    BertTokenizerFast(str(base / "vocab.txt"), do_lower_case=True).save_pretrained(base)
    RobertaModel(RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=64, pad_token_id=0),
                 add_pooling_layer=False).save_pretrained(base)
    recipe = write_recipe(tmp_path / "roberta.yaml", {"model": {"name_or_path": str(base)},
                                                      "data": {"train_file": str(tiny_csv), "max_length": 16}}, {})
    out = tmp_path / "sparse-roberta"
    result = invoke(str(recipe), "-o", str(out), "--method", "magnitude", "--sparsity", "0.5")
    assert result.exit_code == 0, result.output
    targets = json.loads((out / "sparsify.json").read_text())["targets"]
    assert len(targets) == 6 and not any(t.startswith("classifier") for t in targets), targets


def test_magnitude_two_four_from_a_bare_model_dir(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse-24"
    result = invoke(str(llama_dir), "-o", str(out), "--method", "magnitude", "--pattern", "2:4")
    assert result.exit_code == 0, result.output
    before, after = weights(llama_dir), weights(out)
    report = json.loads((out / "sparsify.json").read_text())
    assert report["calibration"] is None and report["pattern"] == "2:4" and report["base_model"] == str(llama_dir)
    assert len(report["targets"]) == 14 and report["total"]["sparsity"] == 0.5
    for name in report["targets"]:
        w, w0 = after[f"{name}.weight"], before[f"{name}.weight"]
        assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all(), name
        assert torch.equal(w != 0, nm_mask(w0.abs(), 2, 4)) and torch.equal(w, w0 * (w != 0))
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(before[key], after[key])


def test_magnitude_on_named_targets_of_a_bare_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse-enc"
    result = invoke(str(tiny_bert_dir), "-o", str(out), "--method", "magnitude", "--sparsity", "0.3",
                    "--targets", "query,value")
    assert result.exit_code == 0, result.output
    before, after = weights(tiny_bert_dir, causal=False), weights(out, causal=False)
    report = json.loads((out / "sparsify.json").read_text())
    assert report["targets"] == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    for key in before:
        w, w0 = after[key], before[key]
        if key.removesuffix(".weight") in report["targets"]:
            assert int((w == 0).sum()) == int(w.numel() * 0.3) and w.dtype == torch.float64
            assert torch.equal(w != 0, matrix_mask(w0.abs(), 0.3))
        else:
            assert torch.equal(w, w0), key


def test_existing_output_needs_force_and_is_left_untouched(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = (str(llama_dir), "-o", str(out), "--method", "magnitude", "--sparsity", "0.5")
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--output: {out} already exists; choose another path or pass --force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert invoke(*args, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "sparsify.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity: must be in (0, 1), got 1.5"),
    (["--method", "magnitude", "--sparsity", "0"], "--sparsity: must be in (0, 1), got 0.0"),
    (["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"],
     "--sparsity / --pattern: give exactly one of them"),
    (["--method", "magnitude"], "--sparsity / --pattern: give exactly one of them"),
    (["--method", "magnitude", "--pattern", "4:2"], "--pattern: expected n:m with integers 0 < n < m"),
    (["--method", "magnitude", "--pattern", "2-4"], "--pattern: expected n:m with integers 0 < n < m"),
    (["--method", "magnitude", "--pattern", "2:5"],
     "--pattern 2:5: model.layers.0.self_attn.q_proj has d_in = 32, not a multiple of 5"),
    (["--method", "wanda", "--sparsity", "0.5"], "--method wanda: needs calibration data"),
    (["--method", "magnitude", "--sparsity", "0.5", "--samples", "0"], "--samples: must be a positive integer, got 0"),
    (["--method", "magnitude", "--sparsity", "0.5", "--targets", "nope"], "--targets: 'nope' matches no Linear"),
    (["--method", "magnitude", "--sparsity", "0.5", "--targets", "q_proj("], "--targets: 'q_proj(' is neither"),
    (["--method", "sparsegpt", "--sparsity", "0.5"], "Invalid value for '--method'"),
], ids=["ratio-high", "ratio-zero", "both", "neither", "pattern-order", "pattern-syntax", "not-divisible",
        "wanda-bare", "samples", "targets", "targets-regex", "method"])
def test_bad_input_exits_2_with_one_line(llama_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "never"
    result = invoke(str(llama_dir), "-o", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output  # Typer's box wraps its own message
    assert "Traceback" not in result.output and not out.exists()


def test_output_overlapping_the_source_is_refused(llama_dir: Path, causal_recipe: Path) -> None:
    for source, out in ((str(llama_dir), llama_dir), (str(llama_dir), llama_dir / "sub"),
                        (str(causal_recipe), causal_recipe.parent)):
        result = invoke(source, "-o", str(out), "--method", "magnitude", "--sparsity", "0.5", "--force")
        assert result.exit_code == 2 and f"--output: {out} overlaps the source" in result.output, result.output
    assert (llama_dir / "config.json").is_file() and not (llama_dir / "sub").exists() and causal_recipe.is_file()
