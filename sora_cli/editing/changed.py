"""How many base weights a live adapter changes, counted in the base dtype after the cast (merge's own rule)."""

from __future__ import annotations

import torch
from torch import nn

from sora_cli.adapters import adapter_layers
from sora_cli.merge import merge_weight


@torch.no_grad()
def changed_weights(model: nn.Module) -> dict[str, int]:
    """Totals over the model's adapted layers: ΔW = B (rank_scale · A) of each (LoRA: s; SoRA: s · g)."""
    changed = rounded = total = 0
    for _, m in adapter_layers(model):
        scale = m.rank_scale()
        scale = scale[:, None] if isinstance(scale, torch.Tensor) else scale  # (r, 1): one factor per rank
        _, counts = merge_weight(m.weight, m.lora_B @ (m.lora_A * scale))  # ΔW: (d_out, d_in)
        changed, rounded = changed + counts["changed"], rounded + counts["rounded_away"]
        total += m.weight.numel()
    return {"changed_weights": changed, "rounded_away": rounded, "adapted_base_weights": total}
