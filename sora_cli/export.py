"""Export as a standard LoRA adapter in PEFT's layout (METHODS.md "Export"). Pure, no PEFT import.

For each module m with r_m > 0 (after pruning): lora_A.weight = A', lora_B.weight = B̃ with every scale folded in
(the method's rule; SoRA: s·B'·diag(g')), and lora_alpha = r_m so that PEFT's own scaling alpha/r is exactly 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sora_cli.adapters import method_class
from sora_cli.checkpoint import atomic_dir, write_json
from sora_cli.merge import head_tensors
from sora_cli.tasks import task_from_meta

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
SORA_METADATA = "sora_metadata.json"  # gates, λ, method settings: never in adapter_config.json


def to_peft(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
            base_model_name_or_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, adapter_config) of a (pruned) sora adapter as a PEFT LoRA adapter."""
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    method = method_class(meta["method"])
    for name, m in meta["modules"].items():
        if m["r"] == 0:
            continue  # a rank-0 module is an error in PEFT: it is simply not a target
        b, a = method.factors(tensors, name, m)  # (d_out, r) with every scale folded in, (r, d_in)
        weights[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()  # float32, PEFT's own dtype
        weights[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
        ranks[name] = m["r"]
    for key, value in head_tensors(tensors, meta).items():
        weights[f"base_model.model.{key}"] = value.contiguous()
    heads = meta.get("modules_to_save", [])
    r_max = max(ranks.values(), default=0)
    config = {
        "peft_type": "LORA",
        "task_type": task_from_meta(meta).peft_task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": meta.get("base_model_revision"),
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),  # alpha = rank: scaling 1, since s is folded into lora_B
        "target_modules": list(ranks),
        "modules_to_save": list(heads),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return weights, config


def write_peft(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               base_model_name_or_path: str) -> None:
    weights, config = to_peft(tensors, meta, base_model_name_or_path)
    sora = {"method": meta["method"], "method_config": meta.get("method_config"), "step": meta.get("step"),
            "gates": {n: gate.tolist() for n, m in meta["modules"].items()
                      if m["r"] and (gate := method_class(meta["method"]).gate_values(tensors, n)) is not None},
            "scaling": {n: m["s"] for n, m in meta["modules"].items()}, "metrics": meta.get("metrics", {})}
    with atomic_dir(directory) as tmp:
        save_file(weights, tmp / PEFT_WEIGHTS)
        write_json(tmp / PEFT_CONFIG, config)
        write_json(tmp / SORA_METADATA, sora)
