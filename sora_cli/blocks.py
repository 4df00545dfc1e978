"""A model's transformer blocks: the units FSDP2 shards (fsdp.py) and torch.compile compiles (compiled.py)."""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes in transformers' `_no_split_modules` that are items of
    a ModuleList (the decoder or encoder layers; an embeddings class in that list is not a block). [] if none.
    A block FSDP2 has sharded is of a subclass (FSDPLlamaDecoderLayer of LlamaDecoderLayer): found by its bases."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for holder in model.modules() if isinstance(holder, nn.ModuleList)
            for m in holder if any(c.__name__ in names for c in type(m).__mro__)]
