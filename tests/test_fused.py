"""The fused adapted linear (adapters/fused.py) against autograd's graph of the same formula, in float64, and when
LoRALinear takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sora_cli.adapters.fused import lowrank_linear
from sora_cli.adapters.lora import LoRALinear
from sora_cli.adapters.sora import SoRALinear

D_IN, D_OUT, R = 7, 5, 3


def tensors(bias: bool, tensor_scale: bool, x_grad: bool = True) -> dict[str, torch.Tensor | float]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    return {"x": rand(2, 4, D_IN, grad=x_grad), "w0": rand(D_OUT, D_IN, grad=False),
            "bias": rand(D_OUT, grad=False) if bias else None, "a": rand(R, D_IN), "b": rand(D_OUT, R),
            "scale": rand(R) if tensor_scale else 1.75}


def dense(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
          scale: torch.Tensor | float) -> torch.Tensor:
    """The formula written out: x W0ᵀ + b + x (B diag(s) A)ᵀ."""
    s = scale if isinstance(scale, torch.Tensor) else torch.full((R,), scale, dtype=torch.float64)
    return F.linear(x, w0, bias) + x @ (b @ torch.diag(s) @ a).t()


def grads(out: torch.Tensor, inputs: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view(out.shape)  # a non-uniform ∂h
    found = torch.autograd.grad((out * weight).sum(), list(leaves.values()))
    return dict(zip(leaves, found, strict=True))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tensor_scale", [True, False], ids=["sora-scale", "lora-scale"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-needs-grad", "first-layer"])
def test_fused_is_the_dense_formula_and_its_gradients(bias: bool, tensor_scale: bool, x_grad: bool) -> None:
    inputs = tensors(bias, tensor_scale, x_grad)
    fused_out, ref_out = lowrank_linear(**inputs), dense(**inputs)  # type: ignore[arg-type]
    torch.testing.assert_close(fused_out, ref_out, rtol=0, atol=1e-12)
    got, want = grads(fused_out, inputs), grads(ref_out, inputs)
    assert got.keys() == want.keys() and ("x" in got) == x_grad and ("scale" in got) == tensor_scale
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12, msg=k)


def test_fused_passes_gradcheck_with_every_input_differentiable() -> None:
    inputs = tensors(bias=True, tensor_scale=True)
    args = [v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for v in inputs.values()]
    assert torch.autograd.gradcheck(lowrank_linear, args)  # W0 and the bias too (never trained, still right)


def layer(cls: type[LoRALinear], dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> LoRALinear:
    torch.manual_seed(0)
    made = cls(nn.Linear(D_IN, D_OUT).to(dtype), r=R, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        made.lora_B.normal_()
    return made


@pytest.mark.parametrize("cls", [LoRALinear, SoRALinear])
def test_the_layer_takes_the_fused_node_where_it_applies(cls: type[LoRALinear]) -> None:
    x = torch.randn(2, 4, D_IN, dtype=torch.float64, requires_grad=True)
    m = layer(cls)
    out = m(x)
    assert type(out.grad_fn).__name__ == "LowRankLinearBackward"
    s = m.rank_scale()
    torch.testing.assert_close(out, dense(x, m.weight, m.bias, m.lora_A, m.lora_B, s), rtol=0, atol=1e-12)
    assert type(layer(cls, dropout=0.1)(x).grad_fn).__name__ != "LowRankLinearBackward"  # dropout: autograd's graph
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast changes the matmuls' dtype: autograd's graph
        assert type(layer(cls, dtype=torch.float32)(x.float()).grad_fn).__name__ != "LowRankLinearBackward"
    m.disabled = True
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=0, atol=0)
