"""Adapter methods: one file each (the layer, its per-step hooks, its rules for prune / merge / export / inspect)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sora_cli.adapters.lora import LoRA, LoRALinear
from sora_cli.adapters.lors import LoRS
from sora_cli.adapters.method import Method, adapter_layers, adapters_disabled
from sora_cli.adapters.roselora import RoseLoRA
from sora_cli.adapters.sora import SoRA, SoRALinear
from sora_cli.errors import CheckpointError

if TYPE_CHECKING:
    from sora_cli.recipe import AdapterConfig, TrainConfig

METHODS: dict[str, type[Method]] = {"lora": LoRA, "sora": SoRA, "roselora": RoseLoRA, "lors": LoRS}


def get_method(adapter: AdapterConfig, train: TrainConfig) -> Method:
    return METHODS[adapter.method](adapter, train)


def method_class(name: str, where: str = "adapter.json") -> type[Method]:
    """The method a checkpoint records, with a clear error for one this version does not know."""
    if name not in METHODS:
        raise CheckpointError(f"{where}: unknown adapter method {name!r}; this sora knows {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "LoRA", "LoRALinear", "LoRS", "Method", "RoseLoRA", "SoRA", "SoRALinear", "adapter_layers",
           "adapters_disabled", "get_method", "method_class"]
