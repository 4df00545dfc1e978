"""A quantized base under the adapters (QLoRA, arXiv 2305.14314): bitsandbytes' 4-bit (NF4 / FP4) and 8-bit linears.

Loading decides it (`models.load_model`); nothing else asks whether the base is quantized but the two places that
need the dense matrix W0 (d_out, d_in): merge and the fingerprint, through `dense_weight`. The adapter layers call the
quantized module itself for W0 x (see adapters/lora.py).

    4-bit: W0 ≈ q · absmax_block     q ∈ the 16 NF4 (or FP4) levels, one absmax per 64 weights (blocks of a row-major
           flattening); double quantization stores the absmaxes in 8 bits with one float32 scale per 256 of them
    8-bit: W0 ≈ CB · SCB / 127       CB int8 (d_out, d_in), SCB (d_out,) the absmax of each row

A checkpoint's `base_model_loading.quantization` records the settings, so `sora eval` loads the base exactly as it
was trained, and `roundtrip` re-creates the trained weights from the full-precision checkpoint (merge checks them).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from sora_cli.errors import InputError
from sora_cli.recipe import ModelConfig

BLOCKSIZE = 64  # bitsandbytes' (and transformers') 4-bit block: one absmax per 64 weights
INSTALL = "pip install bitsandbytes==0.50.2 (or pip install -e \".[quantization]\")"


def bitsandbytes() -> Any:
    """The bitsandbytes module (a clear error without it; see `require_bitsandbytes`)."""
    require_bitsandbytes()
    import bitsandbytes as bnb

    return bnb


def require_bitsandbytes() -> None:
    """A clear error without bitsandbytes. Its CPU backend, on CPUs with AVX512-BF16, tries to fetch an optional
    inference kernel from the hub at import and logs a warning when it cannot (offline): that kernel serves only the
    repacked inference path, which `settle` turns off, so the warning is silenced."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"model.quantization: a quantized base needs the bitsandbytes package: {INSTALL}")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_config(cfg: ModelConfig, keep: list[str] | None = None) -> Any:
    """transformers' BitsAndBytesConfig for the recipe's `model.quantization` (resolved: see recipe._resolve_model);
    `keep`: the modules left in full precision (None: transformers' own choice, see `kept_modules`)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_use_double_quant=bool(cfg.double_quantization),
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype or "float32"),
                              llm_int8_skip_modules=keep)


def kept_modules(model_class: Any, config: Any, heads: tuple[str, ...], trust_remote_code: bool = False) -> list[str]:
    """The modules a quantized load leaves in full precision: transformers' own choice (the output embedding, what is
    tied to it, the model's last module), read off the model built on the meta device (no memory), and the task's
    heads, which train in full. Naming any module to transformers drops its own choice, so both are given; its
    choice alone misses a classifier whose last parameter is its bias (`classifier.bias`)."""
    with torch.device("meta"):
        shell = model_class.from_config(config, trust_remote_code=trust_remote_code)
    return sorted(set(output_modules(shell)) | set(heads))


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes linear (4-bit or 8-bit), whose `weight` holds codes, not W0."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """What a 4-bit module's matmuls run in (None for any other module: the input's dtype)."""
    return getattr(module, "compute_dtype", None) if type(module).__name__ == "Linear4bit" else None


def numel(p: torch.Tensor) -> int:
    """The weights a parameter stands for: a 4-bit parameter packs two (its quant state knows the shape)."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes these tensors hold: each storage once (tied weights, views), a 4-bit weight's quantization statistics
    (absmax, level map; with double quantization the absmax codes' own absmax, map and offset) included."""
    storages: dict[int, int] = {}
    for t in tensors:
        state = getattr(t, "quant_state", None)
        stats = [] if state is None else [state.absmax, state.code] + (
            [state.offset, state.state2.absmax, state.state2.code] if state.nested else [])
        for x in [t, *stats]:
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(storages.values())


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W0 (d_out, d_in) of a linear layer (or of an adapted layer's quantized `base_layer`): its weight, or a
    quantized layer's dequantized codes (a new tensor)."""
    module = module._modules.get("base_layer") or module
    kind = type(module).__name__
    weight: Any = module.weight
    if kind == "Linear4bit":
        return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Linear8bitLt":
        state: Any = module.state
        scb = weight.SCB if weight.SCB is not None else state.SCB  # bitsandbytes moves SCB to the state on first use
        return weight.data.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127)
    return weight


def quantized_linear(base: nn.Linear, cfg: ModelConfig) -> nn.Module:
    """A bitsandbytes linear holding `base`'s weight quantized as transformers' loader does (on base's device)."""
    bnb = bitsandbytes()

    bias = base.bias is not None
    layer: nn.Module
    if cfg.quantization == "int8":
        layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(base.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias,
                                  compute_dtype=getattr(torch, cfg.compute_dtype or "float32"),
                                  compress_statistics=bool(cfg.double_quantization), quant_type=cfg.quantization)
        layer.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, blocksize=BLOCKSIZE,
                                         compress_statistics=bool(cfg.double_quantization),
                                         quant_type=cfg.quantization, module=layer)
    if bias:
        layer.bias = nn.Parameter(base.bias.data.clone(), requires_grad=False)
    settle(layer)
    return layer.to(base.weight.device)  # quantizes here


def quantize_linears(model: nn.Module, cfg: ModelConfig, keep: list[str]) -> list[str]:
    """Replace every plain nn.Linear but those in (or under) `keep` by its quantized layer, in place: for a base that
    transformers cannot quantize while loading (a GGUF file, dequantised to float first). Returns the names."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not any(n == k or n.startswith(k + ".") for k in keep)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, quantized_linear(getattr(owner, child), cfg))
    return names


def output_modules(model: Any) -> list[str]:
    """What transformers' loader leaves in full precision: the output embedding (lm_head) and what is tied to it."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(get_keys_to_not_convert(model))


def settle(model: nn.Module) -> None:
    """After a quantized load: norm weights in float32 (they are tiny, and QLoRA keeps them so), each norm returning
    its input's dtype, so that a bfloat16 model's hidden states stay bfloat16 (a float32 weight would promote the
    residual stream, and every block's activations, to float32); and no CPU repacking of the 4-bit codes. On CPUs with
    AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at the first forward without gradients and then
    computes in bfloat16: evaluation would differ from training and from one CPU to another, and the repacked codes
    no longer dequantize."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            object.__setattr__(module, "support_avx512bf16_for_cpu", False)
        elif is_norm(module) and any(p.dtype != torch.float32 for p in module.parameters()):
            module.to(torch.float32)
            module.register_forward_hook(_as_input)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm and their kin): a leaf whose class name says so."""
    return "norm" in type(module).__name__.lower() and not any(True for _ in module.children())


def _as_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """A float32 norm's output in its input's dtype (the norm computed in float32 and rounded once)."""
    if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        return output.to(args[0].dtype)
    return output


def roundtrip(weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """W0 as the quantized base holds it: `weight` quantized as loading does, then dequantized (float, d_out x d_in)."""
    fake = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fake.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return dense_weight(quantized_linear(fake, cfg))


def recorded(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's record of its base's quantization (adapter.json; None: a full-precision base)."""
    found: dict[str, Any] | None = meta.get("base_model_loading", {}).get("quantization")
    return found


def describe(cfg: ModelConfig) -> dict[str, Any] | None:
    """adapter.json's record of the quantization (None: a full-precision base)."""
    if cfg.quantization is None:
        return None
    if cfg.quantization == "int8":
        return {"type": "int8", "bits": 8}
    return {"type": cfg.quantization, "bits": 4, "double_quantization": bool(cfg.double_quantization),
            "compute_dtype": cfg.compute_dtype, "blocksize": BLOCKSIZE}
