"""The sparsity-keeping linear of LoRS (arXiv 2501.08582), for any low-rank method (METHODS.md "LoRS"):

    h = x W_effᵀ + b        W_eff = (W0 + B diag(g) A) ⊙ M        M = (W0 ≠ 0)

    x (..., d_in)   W0 (d_out, d_in)   A (r, d_in)   B (d_out, r)   g (r,): the per-rank scale (s, or SoRA's s·gate)

A custom autograd Function that saves only x, W0 (a reference to the frozen parameter, not a copy), A, B and g: the
mask is the base's own zeros and W_eff is rebuilt in backward, so nothing d_out × d_in is kept between forward and
backward (forward and backward each build one transient W_eff). Adapter gradients, G = ∂L/∂h over tokens (N, d_out):

    approx (the reference code's): the mask taken as identity, LoRA's factored order (nothing d_out × d_in)
        u = G B (N, r)   z = X Aᵀ (N, r)   ∂B = Gᵀ (z ⊙ g)   ∂A = (u ⊙ g)ᵀ X   ∂g = Σ_tokens u ⊙ z
    exact: through the mask, with G_W = (Gᵀ X) ⊙ M (transient, built after ∂x has freed W_eff)
        ∂B = G_W Aᵀ diag(g)   ∂A = diag(g) Bᵀ G_W   ∂g_i = Σ_jk (Bᵀ G_W)_ik A_ik
    both: ∂x = G W_eff, ∂b = Σ_tokens G; ∂W0 = Gᵀ X unmasked, only when W0 asks for it (LoRS's gradient init).

The reference drops s from ∂A and ∂B; keeping it (in g) gives LoRS on a dense base exactly LoRA's gradients.
Precision: W_eff is built in float32 (float64 for a float64 base), then cast to the matmul dtype (autocast's
bfloat16, or the input's); the adapter gradients are computed in the matmul dtype and returned in the parameters'.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from sora_cli.precision import wide_dtype


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type, enabled=False)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer's matmuls run in: autocast's dtype when autocast is on for x's device, else x's own."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def effective_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """(W0 + B diag(g) A) ⊙ (W0 ≠ 0), (d_out, d_in), summed in float32 or wider and returned in `dtype`."""
    wide = wide_dtype(w0.dtype)
    with _autocast_off(w0.device.type):
        w = torch.addmm(w0.to(wide), b.to(wide) * g.to(wide), a.to(wide))  # W0 + (B diag(g)) A: one new tensor
        w.masked_fill_(w0 == 0, 0)  # ⊙ M: the base's zeros, recomputed, never stored
    return w.to(dtype)


def approx_grads(gh: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂A, ∂B, ∂g) with the mask taken as identity: LoRA's factored gradients, nothing d_out × d_in.
    gh: (N, d_out), x: (N, d_in), both in the matmul dtype."""
    dt = gh.dtype
    u = (b.to(dt).t() @ gh.t()).t()  # (N, r), computed as (r, N): r as the output's rows (fused.py, "Layouts")
    z = x @ a.to(dt).t()  # (N, r)
    gs = g.to(dt)
    return (u * gs).t() @ x, ((z * gs).t() @ gh).t(), (u * z).sum(0)


def exact_grads(gh: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂A, ∂B, ∂g) through the mask, via the transient G_W = (Gᵀ X) ⊙ M (d_out, d_in) in float32 or wider."""
    wide = wide_dtype(w0.dtype)
    with _autocast_off(w0.device.type):
        gw = gh.t().to(wide) @ x.to(wide)  # (d_out, d_in)
        gw.masked_fill_(w0 == 0, 0)
        bt_gw = b.to(wide).t() @ gw  # (r, d_in)
        gs = g.to(wide)
        grad_b = (gw @ a.to(wide).t()) * gs  # (d_out, r)
    return gs[:, None] * bt_gw, grad_b, (bt_gw * a.to(wide)).sum(1)


class MaskedLowRankLinear(torch.autograd.Function):
    """forward(x, W0, bias, A, B, g, exact) -> h; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, g: torch.Tensor, exact: bool) -> torch.Tensor:
        dt = matmul_dtype(x)
        w = effective_weight(w0, a, b, g, dt)
        h = F.linear(x.to(dt), w, None if bias is None else bias.to(dt))
        ctx.save_for_backward(x, w0, a, b, g)  # never W_eff or M
        ctx.exact = exact
        ctx.bias_dtype = None if bias is None else bias.dtype
        return h

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w0, a, b, g = ctx.saved_tensors
        need_x, need_w0, need_bias, need_a, need_b, need_g, _ = ctx.needs_input_grad
        gh = grad_h.reshape(-1, grad_h.shape[-1])  # (N, d_out)
        xs = x.reshape(-1, x.shape[-1]).to(gh.dtype)  # (N, d_in)
        grad_x = grad_w0 = grad_bias = grad_a = grad_b = grad_g = None
        if need_x:  # the first adapted layer's input (frozen embeddings) needs none: no W_eff at all then
            grad_x = (gh @ effective_weight(w0, a, b, g, gh.dtype)).view(x.shape).to(x.dtype)
        if need_bias:
            grad_bias = gh.sum(0).to(ctx.bias_dtype)
        if need_w0:  # unmasked, for the gradient initialisation only (W0 is frozen in training)
            wide = wide_dtype(w0.dtype)
            grad_w0 = (gh.t().to(wide) @ xs.to(wide)).to(w0.dtype)
        if need_a or need_b or need_g:
            grads = exact_grads(gh, xs, w0, a, b, g) if ctx.exact else approx_grads(gh, xs, a, b, g)
            grad_a, grad_b, grad_g = (t.to(p.dtype) for t, p in zip(grads, (a, b, g), strict=True))
        return grad_x, grad_w0, grad_bias, grad_a, grad_b, grad_g, None


def masked_lowrank_linear(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, g: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """h = x ((W0 + B diag(g) A) ⊙ (W0 ≠ 0))ᵀ + b, with the memory and gradients described above."""
    out: torch.Tensor = MaskedLowRankLinear.apply(x, w0, bias, a, b, g, exact)
    return out
