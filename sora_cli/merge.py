"""Merge: fold the adapter into the base weights (METHODS.md "Merge"). Pure, over state dicts.

    W' = W0 + s · B diag(g) A     computed in float32, cast back to the base weight's dtype
"""

from __future__ import annotations

from typing import Any

import torch


def folded_b(tensors: dict[str, torch.Tensor], name: str, s: float) -> torch.Tensor:
    """s · B diag(g) of one module, float32, (d_out, r); without a gate (LoRA), s · B."""
    b = tensors[f"{name}.lora_B"].float()
    gate = tensors.get(f"{name}.gate")
    return s * (b * gate.float() if gate is not None else b)  # diag(g) scales B's columns


def delta(tensors: dict[str, torch.Tensor], name: str, s: float) -> torch.Tensor:
    """s · B diag(g) A of one module, float32, (d_out, d_in)."""
    return folded_b(tensors, name, s) @ tensors[f"{name}.lora_A"].float()


def head_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained heads (`modules_to_save`) among a checkpoint's tensors."""
    heads = meta.get("modules_to_save", [])
    return {k: v for k, v in tensors.items() if any(k.startswith(h + ".") for h in heads)}


def merge(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
          meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A new state dict: every adapted module's weight merged, trained heads copied in; no adapter keys."""
    merged = dict(base)
    for name, m in meta["modules"].items():
        if m["r"] == 0:
            continue
        w0 = base[f"{name}.weight"]
        merged[f"{name}.weight"] = (w0.float() + delta(tensors, name, m["s"])).to(w0.dtype)
    for key, value in head_tensors(tensors, meta).items():
        merged[key] = value.to(base[key].dtype) if key in base else value
    return merged
