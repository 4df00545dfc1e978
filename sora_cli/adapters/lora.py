"""LoRA (Hu et al., 2021), the in-tool baseline: h = W0 x + b + s · B A dropout(x); the layer every method builds on,
with the options every method shares: rank-stabilised scaling, and keeping a sparse base's zeros (LoRS)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sora_cli import quantization
from sora_cli.adapters import fused
from sora_cli.adapters.masked import masked_lowrank_linear
from sora_cli.adapters.method import Method


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update.

        h = W0 x + b + s · B (A · dropout(x))        A: (r, d_in)  B: (d_out, r)  s = alpha / r

    computed as h = W0 x + b + B (s · A dropout(x)): the scale is applied to the r-wide activations, and the
    sum is the accumulate of the last GEMM (addmm), so nothing d_out-wide is made twice. Without dropout, autocast
    or a dtype change (the usual float32 or float64 step), forward and backward are one autograd node (fused.py),
    which also accumulates the adapter's ∂x into the base's.

    `weight` and `bias` are the base layer's own parameters under their original names,
    so a base checkpoint loads into the adapted model without key remapping. A quantized base layer (bitsandbytes'
    4-bit or 8-bit) is kept whole as `base_layer` and computes W0 x + b itself; the adapter then stays float32 and
    its product runs in the base's compute dtype (QLoRA).

    Options every method shares: `rslora` (s = alpha / √r), and `keep_sparsity`: h = x ((W0 + B diag(s·…) A) ⊙ M)ᵀ
    + b with M = (W0 ≠ 0), through `masked_lowrank_linear` (`exact` picks its exact adapter gradients).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 keep_sparsity: bool = False, exact: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = quantization.compute_dtype(base)  # the adapter product's dtype (None: the input's)
        if quantization.is_quantized(base):
            self.base_layer = base  # frozen codes; W0 x + b computed by bitsandbytes
        else:
            self.weight = base.weight  # (d_out, d_in), frozen
            self.bias = base.bias  # (d_out,) or None, frozen
        # Adapters train in float32 even on a half-precision or quantized base (autocast handles the matmuls).
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        device = base.weight.device
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # fixed at creation; pruning never changes it
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True inside `adapters_disabled(model)`: the plain base layer
        self.keep_sparsity, self.exact = keep_sparsity, exact
        w0 = quantization.dense_weight(base)  # W0 is frozen: its zeros are counted once
        self.base_zeros = int(w0.numel() - torch.count_nonzero(w0))

    def rank_scale(self) -> torch.Tensor | float:
        """What multiplies each rank of A·x before B: s for LoRA (SoRA: s · g)."""
        return self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_sparsity and not self.disabled:
            return masked_lowrank_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale_vector(),
                                         self.exact)
        if not self.disabled and self.fusable(x):
            return fused.lowrank_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.rank_scale())
        h = self.base_layer(x) if self.quantized else F.linear(x, self.weight, self.bias)  # (..., d_out)
        if self.disabled:
            return h
        a: torch.Tensor = self.lora_A
        b: torch.Tensor = self.lora_B
        scale = self.rank_scale()
        if self.compute_dtype is not None and self.compute_dtype != a.dtype:  # QLoRA: the product in compute dtype
            a, b, scale = a.to(self.compute_dtype), b.to(self.compute_dtype), _cast(scale, self.compute_dtype)
        z = F.linear(self.dropout(x).to(a.dtype), a) * scale  # (..., r)
        if z.dtype != h.dtype:  # half-precision base (or compute dtype) without autocast: the adapter's own dtype
            return h + F.linear(z, b).to(h.dtype)
        # h + z Bᵀ in one GEMM with accumulate: no (..., d_out) temporaries for the scale and the sum
        return torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, self.r), b.t()).view(h.shape)

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether forward and backward can be fused.py's one node: a dense base, no dropout, one dtype, no autocast."""
        return not self.quantized and isinstance(self.dropout, nn.Identity) and fused.applies(x, self.weight,
                                                                                              self.lora_A)

    @property
    def quantized(self) -> bool:
        return "base_layer" in self._modules

    def scale_vector(self) -> torch.Tensor:
        """rank_scale() as an (r,) tensor: s repeated, or SoRA's s · g (with its grad)."""
        scale = self.rank_scale()
        if isinstance(scale, torch.Tensor):
            return scale
        return torch.full((self.r,), scale, dtype=self.lora_A.dtype, device=self.lora_A.device)

    def active_rank(self) -> int:
        return self.r

    def extra_repr(self) -> str:
        kept = f", keep_sparsity=True, grad={'exact' if self.exact else 'approx'}" if self.keep_sparsity else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}{kept}")


def _cast(scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor | float:
    return scale.to(dtype) if isinstance(scale, torch.Tensor) else scale


class LoRA(Method):
    name = "lora"
    layer = LoRALinear

    def make_layer(self, base: nn.Linear) -> nn.Module:
        return LoRALinear(base, self.adapter.r, self.adapter.alpha, self.adapter.dropout, **self.layer_options())

    def describe(self) -> dict[str, Any]:
        return {}
