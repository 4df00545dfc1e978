"""model.pooling: mean (sora_cli/pooling.py): the pooled sentence against the formula, padding, the checks."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.evaluate import evaluate_checkpoint
from sora_cli.merge import merge_checkpoint
from sora_cli.models import load_adapted
from sora_cli.pooling import MeanPooler, use_mean
from sora_cli.prune import prune_checkpoint
from sora_cli.recipe import load_recipe

from .conftest import tiny_bert_config, tiny_llama_config

CLS_COS, MEAN_COS = 0.719324, 0.206063  # measured in float64: the classifier inputs' mean pairwise cosine


def tiny_classifier() -> torch.nn.Module:
    """A random tiny BERT classifier in float64 (eval mode: no dropout), mean-pooled."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(40, num_labels=3)).double().eval()
    use_mean(model, "tiny")
    return model


def test_mean_pooled_logits_match_the_formula() -> None:
    """logits = C · tanh(W_p · m + b_p) + c with m the masked mean of the last layer's states, by hand in float64."""
    model = tiny_classifier()
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (2, 5, 32)
        means = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])  # the second row's 3 tokens only
        pooler, head = model.bert.pooler, model.classifier
        expected = torch.tanh(means @ pooler.dense.weight.T + pooler.dense.bias) @ head.weight.T + head.bias
    assert isinstance(pooler, MeanPooler)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    # the first-token pooler gives other logits: the swap is what changed them
    cls = torch.tanh(hidden[:, 0] @ pooler.dense.weight.T + pooler.dense.bias) @ head.weight.T + head.bias
    assert (logits - cls).abs().max() > 1e-3


def test_padding_does_not_move_a_sentence() -> None:
    """A sentence's logits alone equal its logits beside a longer one (padded), whether the base model is called
    with the mask by keyword (the classifier) or by position."""
    model = tiny_classifier()
    alone = torch.tensor([[2, 5, 6, 3]])
    batch = torch.tensor([[2, 5, 6, 3, 0, 0, 0], [2, 8, 9, 10, 11, 12, 3]])
    mask = (batch != 0).long()
    with torch.no_grad():
        one = model(input_ids=alone).logits[0]  # no mask: every position a token
        padded = model(input_ids=batch, attention_mask=mask).logits[0]
        by_position = model.bert(batch, mask).pooler_output[0]
        by_keyword = model.bert(input_ids=batch, attention_mask=mask).pooler_output[0]
    torch.testing.assert_close(padded, one, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)


def test_mean_pooling_needs_a_bert_style_pooler() -> None:
    from transformers import LlamaForCausalLM

    with pytest.raises(InputError, match=r"^model\.pooling: mean needs a BERT-style sequence classifier .* "
                                         r"'tiny-llama' loads as LlamaForCausalLM"):
        use_mean(LlamaForCausalLM(tiny_llama_config()), "tiny-llama")


@pytest.mark.parametrize("method", ["sora", "lora"])
def test_a_mean_pooled_run_trains_reloads_mean_pooled_and_stays_inside_sora(make_recipe, tmp_path: Path,
                                                                            method: str) -> None:
    """Trained with model.pooling: mean, SoRA and LoRA both learn the tiny task; the checkpoint records the pooling,
    every reload pools the mean (sora eval gives the run's own test scores), and a PEFT export refuses, since
    transformers' classifiers read [CLS] (merge writes a sentence-transformers folder: the next test)."""
    adapter = {"method": method, "sparse_lambda": 5.0 if method == "sora" else None}
    recipe = load_recipe(make_recipe("mean", model={"pooling": "mean"}, adapter=adapter,
                                     train={"max_steps": 20, "eval_every": 20}))
    result = train(recipe)
    assert result.test["accuracy"] >= 0.9, result.test
    final = result.output_dir / "final"
    model, _, meta = load_adapted(final)
    assert meta["base_model_loading"]["pooling"] == "mean" and isinstance(model.bert.pooler, MeanPooler)
    assert evaluate_checkpoint(final, [])["metrics"] == pytest.approx(result.test, abs=1e-9)
    with pytest.raises(InputError, match=r"^--peft: it was trained with model\.pooling: mean.*; use sora merge for a "
                                         r"sentence-transformers model that pools the mean instead$"):
        prune_checkpoint(final, tmp_path / "pruned", peft=tmp_path / "peft")
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "peft").exists()


def test_a_mean_pooled_merge_loads_in_sentence_transformers_with_the_runs_logits(make_recipe, tmp_path: Path) -> None:
    """sora merge of a mean-pooled SoRA run writes a sentence-transformers folder whose encode() gives the adapted
    model's logits (float32: two paths through the same float32 weights agree to ~1e-6), and whose root folder is a
    plain transformers BertModel giving the same logits by hand: mean pool, the pooler's dense + tanh, the
    classifier. Truncation is the run's data.max_length (16 here)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    from typer.testing import CliRunner

    from sora_cli.cli import app

    recipe = load_recipe(make_recipe("mean-merge", model={"pooling": "mean"}, train={"max_steps": 20}))
    final = train(recipe).output_dir / "final"
    result = CliRunner().invoke(app, ["merge", str(final), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "a sentence-transformers model" in result.output and ".encode(texts) gives the logits" in result.output
    report = json.loads((tmp_path / "merged" / "sora_merge.json").read_text())
    assert report["format"] == "sentence-transformers" and report["modules_merged"] > 0
    texts = ["the movie was good and the plot was great", "awful", "it was very bad " * 8]  # the last: truncated
    model, tokenizer, _ = load_adapted(final)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits  # (3, 2)
        st = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
        found = st.encode(texts, convert_to_tensor=True)
        bert = AutoModel.from_pretrained(tmp_path / "merged").eval()
        enc = AutoTokenizer.from_pretrained(tmp_path / "merged")(texts, padding=True, truncation=True,
                                                                  max_length=16, return_tensors="pt")
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (bert(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
        dense, head = (load_file(tmp_path / "merged" / d / "model.safetensors") for d in ("2_Dense", "3_Dense"))
        by_hand = torch.tanh(mean @ dense["linear.weight"].T + dense["linear.bias"]) @ head["linear.weight"].T
    assert st.max_seq_length == 16 and tuple(found.shape) == (3, 2)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(by_hand + head["linear.bias"], expected, rtol=0, atol=1e-5)
    assert (expected[:, 1] - expected[:, 0]).abs().max() > 1e-3  # a trained head: the match is not of constants
    # a checkpoint moved out of its run directory has no recipe to read: truncation at the model's 64 positions
    shutil.copytree(final, tmp_path / "moved")
    merge_checkpoint(tmp_path / "moved", tmp_path / "merged-moved")
    assert json.loads((tmp_path / "merged-moved" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64


def test_what_a_checkpoint_declares_and_the_collapse_tip(tmp_path: Path) -> None:
    """modules.json -> its Pooling module's config: the packaged MiniLM declares mean pooling, so a collapse warning
    on it with the [CLS] head suggests model.pooling: mean; a plain checkpoint, a [CLS] one or mean already chosen
    add nothing."""
    from sora_cli.models import resolve_model_path
    from sora_cli.pooling import collapse_tip, declared

    minilm = resolve_model_path("packaged:all-MiniLM-L6-v2")
    assert declared(minilm) == "mean"
    assert collapse_tip(minilm, "cls") == (", or model.pooling: mean (this checkpoint was trained on the mean of its "
                                           "token states, not [CLS])")
    assert collapse_tip(minilm, "mean") == ""
    (tmp_path / "pool").mkdir()
    (tmp_path / "modules.json").write_text('[{"path": "pool", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "pool" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert declared(str(tmp_path)) == "cls" and collapse_tip(str(tmp_path), "cls") == ""
    assert declared(str(tmp_path / "pool")) is None and declared("sentence-transformers/all-MiniLM-L6-v2") is None


def test_the_quickstart_checkpoint_tells_sentences_apart_by_the_mean_not_cls() -> None:
    """The cause model.pooling: mean removes (README "Reliability"): on the packaged all-MiniLM-L6-v2, trained by
    sentence-transformers with mean pooling, the classifier's input for 32 different reviews (float64, eval mode,
    before any training) points nearly alike when pooled from [CLS] (mean pairwise cosine 0.72) and apart when pooled
    from the mean of the token states (0.21)."""
    from sora_cli.corpora import rotten_tomatoes_columns
    from sora_cli.models import load_model
    from sora_cli.recipe import ModelConfig, load_recipe
    from sora_cli.tasks import get_task

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from collapse_probe import mean_pairwise_cosine

    task = get_task(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml").data)
    task.load_data()
    found = {}
    for pooling in ("cls", "mean"):
        torch.manual_seed(0)  # the fresh classifier's draw; the pooler is the checkpoint's
        cfg = ModelConfig(name_or_path="packaged:all-MiniLM-L6-v2", dtype="float64", pooling=pooling)
        model, tokenizer = load_model(cfg, task)
        batch = tokenizer(rotten_tomatoes_columns()["text"][:32], padding=True, return_tensors="pt")
        with torch.no_grad():
            found[pooling] = mean_pairwise_cosine(model.eval().bert(**batch).pooler_output)
    assert found == pytest.approx({"cls": CLS_COS, "mean": MEAN_COS}, abs=1e-6)


def test_sora_train_refuses_mean_pooling_for_a_causal_lm(causal_recipe, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sora_cli.cli import app

    result = CliRunner().invoke(app, ["train", str(causal_recipe("mean")), "model.pooling=mean"])
    assert result.exit_code != 0
    assert "model.pooling: mean needs a BERT-style sequence classifier" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs" / "mean" / "checkpoints").exists()
