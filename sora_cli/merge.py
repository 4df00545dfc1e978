"""Merge: fold the adapter into the base weights (METHODS.md "Merge"). Pure, over state dicts.

    W' = W0 + ΔW     ΔW from the method's rule (SoRA: s · B diag(g) A), in float32, cast back to the base's dtype
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sora_cli.adapters import method_class
from sora_cli.adapters.inject import inside
from sora_cli.checkpoint import atomic_dir, load_adapter
from sora_cli.errors import InputError


def head_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained heads (`modules_to_save`) among a checkpoint's tensors."""
    heads = meta.get("modules_to_save", [])
    return {k: v for k, v in tensors.items() if inside(k, heads)}


def merge(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
          meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A new state dict: every adapted module's weight merged, trained heads copied in; no adapter keys."""
    merged = dict(base)
    method = method_class(meta["method"])
    for name, m in meta["modules"].items():
        if m["r"] == 0:
            continue
        w0 = base[f"{name}.weight"]
        merged[f"{name}.weight"] = (w0.float() + method.delta(tensors, name, m)).to(w0.dtype)
    for key, value in head_tensors(tensors, meta).items():
        merged[key] = value.to(base[key].dtype) if key in base else value
    return merged


def merge_checkpoint(ckpt: Path, output: Path, base: str | None = None, dtype: str = "auto",
                     force: bool = False) -> int:
    """`sora merge`: the base as it was trained (checked by fingerprint), merged, saved with its tokenizer
    as a plain transformers model; `dtype` auto keeps the base's. Returns the number of merged modules."""
    from sora_cli.models import load_base

    if output.exists() and not force:
        raise InputError(f"--output: {output} already exists; choose another path or pass --force")
    tensors, meta = load_adapter(ckpt)
    model: Any
    model, tokenizer = load_base(ckpt, meta, base)
    model.load_state_dict(merge(model.state_dict(), tensors, meta))
    if dtype != "auto":
        model.to(getattr(torch, dtype))
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return sum(1 for m in meta["modules"].values() if m["r"])
