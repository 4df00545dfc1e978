"""Layers against the dense formula h = x (W0 + s·B diag(g) A)ᵀ + b."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sora_cli.adapters import LoRALinear, SoRALinear


def _randomize(layer: LoRALinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if isinstance(layer, SoRALinear):
            layer.gate.copy_(torch.randn(layer.gate.shape, generator=g))
            layer.gate[0] = 0.0  # one rank switched off


@pytest.mark.parametrize(("d_in", "d_out", "r", "bias"), [(16, 24, 4, True), (32, 8, 1, False), (7, 13, 6, True)])
def test_sora_layer_equals_dense_formula(d_in: int, d_out: int, r: int, bias: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = SoRALinear(base, r=r, alpha=2.0 * r + 1, gate_init="normal")
    _randomize(layer, seed=1)
    x = torch.randn(3, 5, d_in)
    s = (2.0 * r + 1) / r
    w = base.weight + s * layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A
    expected = x @ w.T + (base.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("d_in", "d_out", "r"), [(16, 24, 4), (9, 5, 3)])
def test_lora_layer_equals_dense_formula(d_in: int, d_out: int, r: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    layer = LoRALinear(base, r=r, alpha=8.0)
    _randomize(layer, seed=2)
    x = torch.randn(4, d_in)
    expected = x @ (base.weight + (8.0 / r) * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_dense_formulas() -> None:
    """The fused forward (scale on the r-wide activations, sum in addmm) has the dense formula's gradients."""
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = SoRALinear(base, r=3, alpha=5.0)
    _randomize(layer, seed=3)
    x = torch.randn(2, 4, 10, requires_grad=True)
    layer(x).square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.gate)]
    a, b, g = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.gate))
    x2 = x.detach().clone().requires_grad_()
    (x2 @ (base.weight + (5.0 / 3) * b @ torch.diag(g) @ a).T + base.bias).square().sum().backward()
    for mine, ref in zip(got, (x2.grad, a.grad, b.grad, g.grad)):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(10,), (7, 10)])
def test_any_leading_shape_and_a_half_precision_base(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = SoRALinear(base, r=3, alpha=6.0)
    _randomize(layer, seed=4)
    x = torch.randn(shape)
    w = base.weight + 2.0 * layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, atol=1e-5, rtol=1e-5)
    half = SoRALinear(nn.Linear(10, 6).to(torch.bfloat16), r=3, alpha=6.0)  # adapter float32, base bf16
    _randomize(half, seed=4)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], 6)
    w = half.weight.float() + 2.0 * half.lora_B @ torch.diag(half.gate) @ half.lora_A
    torch.testing.assert_close(out.float(), x.to(torch.bfloat16).float() @ w.T + half.bias.float(), atol=0.1, rtol=0.02)


def test_zero_gates_give_the_base_output_exactly() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = SoRALinear(base, r=4, alpha=8.0)
    _randomize(layer, seed=3)
    with torch.no_grad():
        layer.gate.zero_()
    x = torch.randn(6, 12)
    assert torch.equal(layer(x), base(x))
    assert layer.active_rank() == 0


def test_fresh_adapter_is_the_identity_and_keeps_base_names() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = SoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(6, 12)
    assert torch.equal(layer(x), base(x))  # B = 0 at init
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B", "gate"]
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4) and layer.gate.shape == (4,)
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2


def test_gate_init_modes() -> None:
    torch.manual_seed(0)
    ones = SoRALinear(nn.Linear(4, 4), r=64, alpha=1.0, gate_init="ones")
    assert torch.equal(ones.gate, torch.ones(64))
    normal = SoRALinear(nn.Linear(4, 4), r=4096, alpha=1.0, gate_init="normal")
    g = normal.gate.detach()
    assert abs(float(g.mean())) < 0.06 and abs(float(g.std()) - 1) < 0.06


def test_dropout_only_touches_the_adapter_path() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=2, alpha=2.0, dropout=0.5)
    _randomize(layer, seed=4)
    x = torch.randn(3, 8)
    layer.eval()
    expected = x @ (base.weight + layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(1)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.manual_seed(1)
    expected_train = base(x) + (x * mask) @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected_train, atol=1e-5, rtol=1e-5)
