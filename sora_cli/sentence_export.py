"""A mean-pooled classifier (`model.pooling: mean`) as a sentence-transformers folder: what `sora merge` writes for
such a run, since no transformers sequence classifier pools the mean (sora_cli/pooling.py).

The merged model's forward, logits = C · tanh(W_p · m + b_p) + c with m the masked mean of the last layer's states,
is exactly a sentence-transformers pipeline of four modules, so `SentenceTransformer(folder).encode(texts)` returns
the logits (sentence-transformers' own loader; sora is not needed to use the model):

    ""          Transformer  the merged base model (BertModel: config.json, model.safetensors) and the tokenizer
    1_Pooling   Pooling      mean of the token states over the attention mask
    2_Dense     Dense        the pooler: W_p, b_p, its activation (tanh)      (d -> d)
    3_Dense     Dense        the classifier: C, c, no activation              (d -> num_labels)

The root folder alone is a plain transformers `BertModel` (its config keeps the label names, id2label, where the
data had them), so the model is usable without sentence-transformers too: mean-pool `last_hidden_state`, then the
two dense layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from sora_cli.checkpoint import write_json
from sora_cli.errors import InputError

DENSE_WEIGHTS = "model.safetensors"  # sentence-transformers' Dense: {linear.weight, linear.bias}


def module_path(module: nn.Module) -> str:
    """The import path sentence-transformers reads an activation from, e.g. torch.nn.modules.activation.Tanh."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def dense_layers(model: Any, name: str) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """(pooler dense, pooler activation, classifier) of a mean-pooled BERT-style classifier."""
    pooler, head = model.base_model.pooler, getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or not isinstance(pooler.dense, nn.Linear):
        raise InputError(f"{name}: not merged: its head ({type(head).__name__}) is not one linear layer after the "
                         "pooler, so it has no sentence-transformers form; evaluate it with sora eval")
    return pooler.dense, pooler.activation, head


def write_dense(directory: Path, linear: nn.Linear, activation: nn.Module | None) -> None:
    """One sentence-transformers Dense module: its config and weights (d_out, d_in), (d_out,)."""
    directory.mkdir()
    write_json(directory / "config.json", {
        "in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None,
        "activation_function": module_path(activation or nn.Identity())})
    weights = {"linear.weight": linear.weight.detach().contiguous()}
    if linear.bias is not None:
        weights["linear.bias"] = linear.bias.detach().contiguous()
    save_file(weights, directory / DENSE_WEIGHTS)


def write_sentence_transformers(directory: Path, model: Any, tokenizer: Any, max_length: int | None,
                                name: str) -> None:
    """The merged, mean-pooled `model` as a sentence-transformers folder in `directory` (which exists, empty).
    `max_length`: the token length it was trained and evaluated with (truncation); None for the longest the model
    takes (its positions, or the tokenizer's limit where lower)."""
    dense, activation, head = dense_layers(model, name)
    base = model.base_model
    base.save_pretrained(directory)  # the BertModel; its pooler's weights stay (unused; loads without a warning)
    tokenizer.save_pretrained(directory)
    write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
    longest = min(tokenizer.model_max_length, getattr(base.config, "max_position_embeddings", 1 << 30))
    write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_length or longest,
                                                         "do_lower_case": False})
    (directory / "1_Pooling").mkdir()
    write_json(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dense.in_features, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    write_dense(directory / "2_Dense", dense, activation)
    write_dense(directory / "3_Dense", head, None)
