"""`train.compile`: torch.compile of the model's repeated blocks (decoder or encoder layers), adapters inside.

Per block, as torchtune compiles: every block of a model runs the same code, and torch.compile treats the
parameters of an nn.Module as inputs, so one graph serves them all and compile time does not grow with depth. The
adapters' extra tensors (SoRA's gate, RoseLoRA's masks) are parameters or buffers of the block, changed in place
by their optimizer steps, so the graph reads their current values and is not recompiled. A block in eval mode
runs eagerly: evaluation and generation (a new length every token) would otherwise compile graphs that training
never uses. With gradient checkpointing the compiled forward is checkpointed from outside (`compile_blocks`).

`graph_breaks()` reads torch's own counter, which the run summary reports: a break splits a block's graph and
runs the cut in Python every step.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sora_cli.blocks import transformer_blocks
from sora_cli.errors import InputError


def check(model: nn.Module, device: torch.device, quantized: bool) -> None:
    """Refuse, in one line, where compiling cannot work."""
    if quantized:
        raise InputError("train.compile: a bitsandbytes-quantized base does not compile (its 4-bit and 8-bit "
                         "kernels are opaque to torch.compile); remove train.compile or model.quantization")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise InputError("train.compile: torch.compile on CPU builds C++ kernels and no C++ compiler (g++, c++ or "
                         "clang++) is on PATH; install one or remove train.compile")
    if not transformer_blocks(model):
        raise InputError(f"train.compile: {type(model).__name__} names no transformer blocks to compile "
                         "(transformers' _no_split_modules); remove train.compile")


def compile_blocks(model: nn.Module, checkpointing: bool = False) -> int:
    """Compile every block's own forward for training (eval mode stays eager); returns how many blocks.

    transformers 5 puts activation checkpointing inside a layer's `forward` (a wrapper on the class): compiled
    as it is, the checkpoint would be traced too, and a context variable it mutates breaks the graph. So the
    class's own forward (under the wrapper) is compiled, and with `checkpointing` the compiled call is
    checkpointed here, outside the graph (non-reentrant, as engine.enable_checkpointing asks)."""
    found = transformer_blocks(model)
    for block in found:
        own = type(block).forward
        own = getattr(own, "__wrapped__", own)  # under transformers' checkpointing wrapper, if there is one
        block.forward = _by_mode(block, torch.compile(own), checkpointing)
    return len(found)


def _by_mode(block: nn.Module, fast: Callable[..., Any], checkpointing: bool) -> Callable[..., Any]:
    eager = block.forward  # the class's forward, bound (transformers' checkpointing wrapper included)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not block.training:
            return eager(*args, **kwargs)
        if checkpointing and torch.is_grad_enabled():
            return checkpoint(functools.partial(fast, block, **kwargs), *args, use_reentrant=False)
        return fast(block, *args, **kwargs)

    return forward


RECOMPILE_LIMIT = "Dynamo recompile limit exceeded"  # how torch 2.13 names it in dynamo's `unimplemented` counter


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def eager_fallbacks() -> int:
    """Times torch.compile gave up on a code object in this process so far because it hit dynamo's recompile limit
    (`torch._dynamo.config.recompile_limit` variants of one function): those calls, and later ones that would need
    another variant, run eagerly, and the speed-up silently goes with them."""
    from torch._dynamo.utils import counters

    return int(sum(n for reason, n in counters["unimplemented"].items() if reason.startswith(RECOMPILE_LIMIT)))

