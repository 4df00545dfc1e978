"""Adapter methods: one file each (the layer and its per-step hooks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sora_cli.adapters.lora import LoRA, LoRALinear
from sora_cli.adapters.method import Method
from sora_cli.adapters.sora import SoRA, SoRALinear

if TYPE_CHECKING:
    from sora_cli.recipe import AdapterConfig, TrainConfig

METHODS: dict[str, type[Method]] = {"lora": LoRA, "sora": SoRA}
LAYERS: dict[str, type[LoRALinear]] = {"lora": LoRALinear, "sora": SoRALinear}


def get_method(adapter: AdapterConfig, train: TrainConfig) -> Method:
    return METHODS[adapter.method](adapter, train)


__all__ = ["LAYERS", "METHODS", "LoRA", "LoRALinear", "Method", "SoRA", "SoRALinear", "get_method"]
