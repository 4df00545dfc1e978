"""model.pooling: mean (sora_cli/pooling.py): the pooled sentence against the formula, padding, the checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.evaluate import evaluate_checkpoint
from sora_cli.merge import merge_checkpoint
from sora_cli.models import load_adapted
from sora_cli.pooling import MeanPooler, use_mean
from sora_cli.prune import prune_checkpoint
from sora_cli.recipe import load_recipe

from .conftest import tiny_bert_config, tiny_llama_config


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


def test_a_mean_pooled_run_reloads_mean_pooled_and_stays_inside_sora(make_recipe, tmp_path: Path) -> None:
    """Trained with model.pooling: mean, the checkpoint records it, every reload pools the mean (sora eval gives the
    run's own test scores), and merge / a PEFT export refuse, since transformers' classifiers read [CLS]."""
    recipe = load_recipe(make_recipe("mean", model={"pooling": "mean"}, train={"max_steps": 10, "eval_every": 10}))
    result = train(recipe)
    final = result.output_dir / "final"
    model, _, meta = load_adapted(final)
    assert meta["base_model_loading"]["pooling"] == "mean" and isinstance(model.bert.pooler, MeanPooler)
    assert evaluate_checkpoint(final, [])["metrics"] == pytest.approx(result.test, abs=1e-9)
    with pytest.raises(InputError, match=r"not merged: it was trained with model\.pooling: mean"):
        merge_checkpoint(final, tmp_path / "merged")
    with pytest.raises(InputError, match=r"^--peft: it was trained with model\.pooling: mean"):
        prune_checkpoint(final, tmp_path / "pruned", peft=tmp_path / "peft")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "pruned").exists()


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
