"""The adapted linear layer's forward and backward in one autograd node, for the common case (one dtype, no
autocast, no dropout, a dense base): h = x W0ᵀ + b + (s ⊙ x Aᵀ) Bᵀ.

Autograd's graph of that expression makes two d-wide passes that a hand-written backward does not need (measured
by bench/profile_causal.py on SmolLM2): the forward's `addmm(h, z, Bᵀ)` copies h (d_out wide) into a new output
before accumulating, and the backward adds the base's and the adapter's gradients of x (d_in wide) as two separate
tensors. Here the update is accumulated into h in place, and the adapter's ∂x into the base's:

    forward:   h = x W0ᵀ + b;  z = x Aᵀ (N, r);  h += (s ⊙ z) Bᵀ
    backward:  u = G B (N, r);  ∂x = G W0 + (s ⊙ u) A   (one buffer, accumulated)
               ∂A = (s ⊙ u)ᵀ x;  ∂B = Gᵀ (s ⊙ z);  ∂s = Σ_N u ⊙ z;  ∂b = Σ_N G;  ∂W0 = Gᵀ x (W0 is frozen: unused)

with G = ∂h (N, d_out) and x flattened to (N, d_in). Every product is the one autograd computes, in the same
dtype, so the values agree to float rounding (tests/test_fused.py, float64). Saved: x, z (N, r) and the
parameters themselves (FSDP2's gathered weight is saved as autograd would save it).

Layouts. The two products that read G for a rank-wide result are computed with r as the output's rows: u as
(Bᵀ Gᵀ)ᵀ and ∂B as ((s ⊙ z)ᵀ G)ᵀ, not G B and Gᵀ (s ⊙ z). Same sums; on CPU BLAS an (r, N) or (r, d_out) output
streams G along its rows, and measured 2.2–3× faster for r = 8, N = 760, d_out = 576–1536 (autograd computes ∂B
the slow way round, to give it B's own layout; the optimizer takes either).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class LowRankLinear(torch.autograd.Function):
    """forward(x, W0, bias, A, B, s) -> h; s is a float or an (r,) tensor (SoRA's s · g)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        xs = x.reshape(-1, x.shape[-1])  # (N, d_in)
        h = F.linear(xs, w0, bias)  # (N, d_out), a new tensor: safe to accumulate into
        z = xs @ a.t()  # (N, r)
        h.addmm_(z * scale, b.t())
        tensor = isinstance(scale, torch.Tensor)
        ctx.save_for_backward(xs, w0, a, b, z, scale if tensor else None)  # a tensor scale through autograd's saving
        ctx.scale, ctx.x_shape = None if tensor else scale, x.shape
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, w0, a, b, z, scale_t = ctx.saved_tensors
        scale = scale_t if scale_t is not None else ctx.scale
        need_x, need_w0, need_bias, need_a, need_b, need_s = ctx.needs_input_grad
        g = grad_h.reshape(-1, grad_h.shape[-1])  # (N, d_out)
        grad_x = grad_w0 = grad_bias = grad_a = grad_b = grad_s = None
        if need_x or need_a or need_s:
            u = (b.t() @ g.t()).t()  # (N, r), computed as (r, N): see "Layouts" above
            us = u * scale
            if need_x:
                grad_x = (g @ w0).addmm_(us, a).view(ctx.x_shape)  # the base's and the adapter's ∂x, one buffer
            if need_a:
                grad_a = us.t() @ xs
            if need_s:
                grad_s = (u * z).sum(0)
        if need_b:
            grad_b = ((z * scale).t() @ g).t()  # (d_out, r), computed as (r, d_out)
        if need_bias:
            grad_bias = g.sum(0)
        if need_w0:
            grad_w0 = g.t() @ xs
        return grad_x, grad_w0, grad_bias, grad_a, grad_b, grad_s


def lowrank_linear(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                   scale: torch.Tensor | float) -> torch.Tensor:
    """h = x W0ᵀ + b + (s ⊙ x Aᵀ) Bᵀ, one autograd node (see the module docstring)."""
    out: torch.Tensor = LowRankLinear.apply(x, w0, bias, a, b, scale)
    return out


def applies(x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the fused node computes what autograd's graph would: one dtype throughout and no autocast (which
    would change the matmuls' dtype)."""
    return x.dtype == w0.dtype == a.dtype and not torch.is_autocast_enabled(x.device.type)
