"""How a BERT-style sequence classifier summarises a sentence (`model.pooling`).

transformers' BERT classifiers read the first token: pooled = tanh(W_p · h[CLS] + b_p), then the classifier. That is
what the checkpoint was pre-trained for in BERT itself, but a sentence-transformers checkpoint (all-MiniLM-L6-v2,
the quickstart's) was trained with the *mean* of its token states and its [CLS] state carries little of the
sentence: before training, the classifier's inputs for 32 different reviews have mean pairwise cosine 0.72 pooled
from [CLS] and 0.21 from the mean (tests/test_pooling.py). A classifier on [CLS] must first route the sentence into that
one token through the last layer, and at a high learning rate that route can be broken for good (the run sits at
the chance loss: issue 27, README "Reliability"). `mean` pools as the checkpoint was trained:

    pooled = tanh(W_p · m + b_p),   m = Σ_t mask_t · h_t / Σ_t mask_t      (h: the last layer's states, batch × seq × d)

keeping the pooler's dense layer (and its adapter), so parameter names, checkpoints and adapters are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sora_cli.errors import InputError


class MeanPooler(nn.Module):
    """A BERT pooler that reads the masked mean of the token states instead of the first token's."""

    def __init__(self, pooler: Any) -> None:
        super().__init__()
        self.dense: nn.Module = pooler.dense  # the checkpoint's (d, d) pooler weights; adapted like any Linear
        self.activation: nn.Module = pooler.activation
        self.mask: torch.Tensor | None = None  # (batch, seq) of the forward in flight; set by the base's pre-hook

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, seq, d) -> (batch, d)
        if self.mask is None:  # no mask given: every position is a token
            mean = hidden.mean(dim=1)
        else:
            mask = self.mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.activation(self.dense(mean))


def use_mean(model: nn.Module, name: str) -> None:
    """Swap the base model's first-token pooler for a MeanPooler fed each forward's attention mask (in place)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None)
    if base is None or pooler is None or not hasattr(pooler, "dense") or not hasattr(pooler, "activation"):
        raise InputError(f"model.pooling: mean needs a BERT-style sequence classifier (a pooler with a dense layer "
                         f"and an activation); {name!r} loads as {type(model).__name__}, which has none; leave "
                         "model.pooling: cls")
    mean = MeanPooler(pooler)
    base.pooler = mean

    def keep_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # BertModel.forward(input_ids, attention_mask, ...): by keyword from its classifiers, by position otherwise
        mean.mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)


# Why a mean-pooled run cannot leave sora as a PEFT adapter (sora merge writes it as a sentence-transformers model)
NOT_PORTABLE = ("it was trained with model.pooling: mean, which no transformers sequence classifier expresses (their "
                "poolers read the first token), so the adapter would predict differently there")


def recorded(meta: dict[str, Any]) -> Literal["cls", "mean"]:
    """The pooling an adapter checkpoint was trained with (cls for checkpoints older than model.pooling)."""
    return "mean" if meta.get("base_model_loading", {}).get("pooling") == "mean" else "cls"


def declared(directory: str) -> str | None:
    """`mean` when a local sentence-transformers checkpoint declares mean pooling (modules.json names a Pooling
    module whose config sets pooling_mode_mean_tokens), `cls` when it declares [CLS]; None otherwise (a plain
    transformers checkpoint, a hub id, unreadable files)."""
    try:
        modules = json.loads((Path(directory) / "modules.json").read_text())
        where = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((Path(directory) / where / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if config.get("pooling_mode_cls_token") else None


def collapse_tip(directory: str, chosen: str) -> str:
    """What a collapse warning adds about pooling: a [CLS] head on a checkpoint trained on the mean."""
    if chosen == "cls" and declared(directory) == "mean":
        return ", or model.pooling: mean (this checkpoint was trained on the mean of its token states, not [CLS])"
    return ""
