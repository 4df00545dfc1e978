"""Prune: cut the ranks whose gate is zero (METHODS.md "Prune"). Pure functions over adapter tensors.

    keep = {i : |g_i| > eps}   A' = A[keep, :]   B' = B[:, keep]   g' = g[keep]   s unchanged

With eps = 0 the pruned adapter computes exactly the same function (float reordering only).
A module with nothing left keeps an entry with r = 0 and no tensors: it is the plain base layer.
A LoRA adapter has no gates: every rank survives and prune only copies it (useful with --peft).
"""

from __future__ import annotations

import copy
from typing import Any

import torch



def prune(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
          eps: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return pruned (tensors, meta); the inputs are left as they were."""
    out = dict(tensors)
    new_meta = copy.deepcopy(meta)
    for name, m in new_meta["modules"].items():
        m.setdefault("r_max", m["r"])
        gate = tensors.get(f"{name}.gate")
        if m["r"] == 0 or gate is None:  # gone already, or LoRA: no gate, every rank survives
            continue
        keep = torch.nonzero(gate.abs() > eps).flatten()  # (k,), ascending: the ranks keep their order
        for key in ("lora_A", "lora_B", "gate"):
            del out[f"{name}.{key}"]
        if len(keep):
            out[f"{name}.lora_A"] = tensors[f"{name}.lora_A"][keep].contiguous()  # (k, d_in)
            out[f"{name}.lora_B"] = tensors[f"{name}.lora_B"][:, keep].contiguous()  # (d_out, k)
            out[f"{name}.gate"] = gate[keep].contiguous()  # (k,)
        m["r"] = m["active_rank"] = len(keep)
    new_meta["pruned"] = {"eps": eps, "from_step": meta.get("step")}
    return out, new_meta
