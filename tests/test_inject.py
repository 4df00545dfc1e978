"""Injection on tiny BERT and Llama configs: exactly the expected modules, frozen base, unchanged names."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForSequenceClassification

from sora_cli.adapters import LoRALinear, SoRALinear, get_method
from sora_cli.adapters.inject import count_parameters, inject
from sora_cli.errors import InputError
from sora_cli.recipe import AdapterConfig, TrainConfig

from .conftest import tiny_bert_config, tiny_llama_config

BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(40))


def llama() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_llama_config(pad_token_id=0))


def run(model: torch.nn.Module, **adapter: object):
    return inject(model, get_method(AdapterConfig(**adapter), TrainConfig()))  # type: ignore[arg-type]


def test_all_linear_on_bert() -> None:
    model = bert()
    result = run(model, target_modules="all-linear")
    expected = [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in BERT_LAYER] + ["bert.pooler.dense"]
    assert result.targets == expected
    assert result.modules_to_save == ["classifier"]
    assert all(isinstance(model.get_submodule(n), SoRALinear) for n in expected)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"{t}.{p}" for t in expected for p in ("lora_A", "lora_B", "gate")]
                               + ["classifier.weight", "classifier.bias"])


def test_suffixes_and_regex_on_bert() -> None:
    result = run(bert(), target_modules=("query", "value"), method="lora")
    assert result.targets == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    result = run(bert(), target_modules=r".*layer\.1\..*dense")
    assert result.targets == ["bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
                              "bert.encoder.layer.1.output.dense"]


def test_llama_targets_and_score_head() -> None:
    model = llama()
    result = run(model, target_modules=("q_proj", "v_proj"), method="lora")
    assert result.targets == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert result.modules_to_save == ["score"]
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is LoRALinear
    result = run(llama(), target_modules="all-linear")
    assert len(result.targets) == 2 * 7 and "score" not in result.targets


def test_zero_matches_lists_the_linear_modules() -> None:
    with pytest.raises(InputError) as e:
        run(llama(), target_modules=("query",))
    msg = str(e.value)
    assert msg.startswith("adapter.target_modules: 'query' matches no Linear module")
    assert "model.layers.N.self_attn.q_proj" in msg and "model.layers.N.mlp.down_proj" in msg
    with pytest.raises(InputError, match=re.escape(r"adapter.target_modules: 'nothing\.here' matches no Linear")):
        run(bert(), target_modules=r"nothing\.here")
    with pytest.raises(InputError, match="adapter.modules_to_save: 'head' matches no module"):
        run(bert(), modules_to_save=("head",))


def test_adapted_model_loads_base_state_dict_without_remapping() -> None:
    base = bert()
    state = base.state_dict()
    model = bert()
    run(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate") for k in missing)
    x = torch.randint(5, 40, (2, 7))
    model.eval()
    base.eval()
    torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)  # B = 0: same function


def test_parameter_counts() -> None:
    model = bert()
    total_before = sum(p.numel() for p in model.parameters())
    run(model, r=4)
    trainable, total = count_parameters(model)
    adapters = sum(4 * (m.in_features + m.out_features + 1) for m in model.modules() if isinstance(m, SoRALinear))
    assert trainable == adapters + 32 * 2 + 2  # + classifier
    assert total == total_before + adapters


def test_all_linear_leaves_a_two_layer_head_alone() -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=48))
    result = run(model)
    assert result.modules_to_save == ["classifier"]  # classifier.dense and classifier.out_proj, trained in full
    assert not any(t.startswith("classifier") for t in result.targets) and len(result.targets) == 6
    result = run(bert(), modules_to_save=("pooler", "classifier"))
    assert result.modules_to_save == ["bert.pooler", "classifier"] and "bert.pooler.dense" not in result.targets


def test_a_model_without_a_known_head_needs_modules_to_save() -> None:
    from transformers import BertModel

    with pytest.raises(InputError, match="adapter.modules_to_save: this model has no 'classifier' or 'score' head"):
        run(BertModel(tiny_bert_config(40)))


def test_mark_fresh_finds_the_modules_a_checkpoint_lacked() -> None:
    """transformers' missing keys become modules in model order; a tied copy of a loaded weight is not fresh; the
    default heads then take them with the task head, and leaving one out explicitly is refused."""
    from transformers import LlamaForCausalLM

    from sora_cli.adapters.inject import fresh_modules, mark_fresh

    model = bert()
    mark_fresh(model, ["classifier.bias", "bert.pooler.dense.weight", "classifier.weight", "bert.pooler.dense.bias"])
    assert fresh_modules(model) == ["bert.pooler.dense", "classifier"]
    result = run(model)
    assert result.modules_to_save == ["bert.pooler.dense", "classifier"] and "bert.pooler.dense" not in result.targets
    with pytest.raises(InputError, match="adapter.modules_to_save: bert.pooler.dense is not in the base checkpoint"):
        run(model, modules_to_save=("classifier",))
    with pytest.raises(InputError, match="adapter.target_modules: 'bert.pooler.dense' is not in the base checkpoint "
                                         r"\(newly initialised\), so it trains in full with the task head"):
        run(model, target_modules=("dense",))

    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    mark_fresh(tied, ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"])
    assert fresh_modules(tied) == ["model.layers.0.mlp.up_proj"]
