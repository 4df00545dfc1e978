"""How many base weights a live adapter changes, counted in the base dtype after the cast: the method's own ΔW
rule and merge's own count, so an edit's number is the one `sora merge` would report."""

from __future__ import annotations

import torch
from torch import nn

from sora_cli import quantization
from sora_cli.adapters import Method, adapter_layers
from sora_cli.engine import module_meta
from sora_cli.merge import merge_weight
from sora_cli.rundir import trainable_tensors


@torch.no_grad()
def changed_weights(model: nn.Module, method: type[Method]) -> dict[str, int]:
    """Totals over the model's adapted layers (ΔW from `method.delta`, as adapter.json would record them)."""
    tensors, metas = trainable_tensors(model), module_meta(model)
    changed = rounded = total = 0
    for name, layer in adapter_layers(model):
        delta = method.delta(tensors, name, metas[name])
        w0 = quantization.dense_weight(layer)  # (d_out, d_in); a quantized base's as `merge --into dequantized` sees it
        _, counts = merge_weight(w0, delta, keep_zeros=layer.keep_sparsity)
        changed, rounded = changed + counts["changed"], rounded + counts["rounded_away"]
        total += w0.numel()
    return {"changed_weights": changed, "rounded_away": rounded, "adapted_base_weights": total}
