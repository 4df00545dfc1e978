"""Soft-threshold, the reference step, LR schedules and one full optimizer + proximal step by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sora_cli.adapters import SoRALinear, get_method
from sora_cli.optim import build_optimizer, lr_factor, proximal_step, reference_threshold_, set_lr, soft_threshold_
from sora_cli.recipe import AdapterConfig, TrainConfig


def test_soft_threshold_hand_values() -> None:
    v = torch.tensor([0.5, -0.15, 0.25, -0.3, 0.05, 0.0, -0.1])
    soft_threshold_(v, 0.1)
    torch.testing.assert_close(v, torch.tensor([0.4, -0.05, 0.15, -0.2, 0.0, 0.0, 0.0]))
    assert v[4] == 0 and v[6] == 0  # exactly zero, not tiny


def test_reference_threshold_hand_values() -> None:
    # v[v > λ] -= λ; v[v < -λ] += λ; v[|v| < λ] = 0 with λ = 0.1: |v| < 2λ -> 0, else v - sign(v)·λ;
    # |v| == λ is left as it is (neither shrunk nor cut), as in the reference code
    v = torch.tensor([0.5, -0.15, 0.25, -0.3, 0.05, 0.19, -0.21, 0.1, -0.1])
    reference_threshold_(v, 0.1)
    torch.testing.assert_close(v, torch.tensor([0.4, 0.0, 0.15, -0.2, 0.0, 0.0, -0.11, 0.1, -0.1]))
    g = torch.tensor([0.5, 0.15, -0.05])
    assert proximal_step([g], "reference", lam=0.1, lr=0.01) == 0.1  # λ itself, not λ·lr
    torch.testing.assert_close(g, torch.tensor([0.4, 0.0, 0.0]))


@pytest.mark.parametrize(("mode", "tau"), [("scaled", 0.5 * 0.2), ("fixed", 0.5)])
def test_proximal_step_threshold(mode: str, tau: float) -> None:
    g = torch.tensor([1.0, -0.05, 0.3, -2.0])
    used = proximal_step([g], mode, lam=0.5, lr=0.2)
    assert used == pytest.approx(tau)
    expected = torch.sign(torch.tensor([1.0, -0.05, 0.3, -2.0])) * (torch.tensor([1.0, 0.05, 0.3, 2.0]) - tau).clamp(min=0)
    torch.testing.assert_close(g, expected)


def test_lr_schedules_hand_values() -> None:
    # 10 steps, 2 warmup (transformers' formulas): warmup 0, 0.5; then linear decay from 1 over 8 steps.
    assert [lr_factor(s, 10, 2, "linear") for s in range(4)] == [0.0, 0.5, 1.0, 0.875]
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(0.125)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(7, 10, 2, "constant") == 1.0


def test_optimizer_groups() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from sora_cli.adapters.inject import inject

    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=24))
    method = get_method(AdapterConfig(gate_lr=0.05), TrainConfig(lr=0.01, weight_decay=0.1))
    inject(model, method)
    opt = build_optimizer(model, method.param_groups(model), 0.01, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in groups["gate"]["params"]} == {"gate"}
    assert groups["gate"]["weight_decay"] == 0.0 and groups["gate"]["lr"] == 0.05
    assert sorted(names[id(p)] for p in groups["main_no_decay"]["params"]) == ["classifier.bias"]
    assert groups["main"]["weight_decay"] == 0.1
    assert len(groups["main"]["params"]) == 2 * 7 + 1  # A and B of 7 adapted Linears + classifier.weight
    set_lr(opt, 0.5)
    assert groups["gate"]["lr"] == 0.025 and groups["main"]["lr"] == 0.005


def test_one_adamw_and_proximal_step_by_hand() -> None:
    """Step 1 of AdamW moves each entry by lr·grad/(|grad|+eps) (bias-corrected), then S_{λ·lr}."""
    layer = SoRALinear(nn.Linear(2, 2), r=3, alpha=3.0)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.02, -0.5, 1.0]))
    model = nn.Sequential(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    layer.gate.requires_grad_(True)
    method = get_method(AdapterConfig(sparse_lambda=0.3, threshold="scaled"), TrainConfig(lr=0.1))
    opt = build_optimizer(model, method.param_groups(model), 0.1, 0.0)
    layer.gate.grad = torch.tensor([-1.0, 2.0, 0.0])
    opt.step()
    stats = method.after_step(model, opt, 0)
    # AdamW: gate - 0.1·sign(grad) (grad 0 -> no move); then soft-threshold with τ = 0.3·0.1 = 0.03
    # [0.12, -0.6, 1.0] -> [0.09, -0.57, 0.97]
    torch.testing.assert_close(layer.gate.detach(), torch.tensor([0.09, -0.57, 0.97]), atol=1e-6, rtol=0)
    assert stats["threshold"] == pytest.approx(0.03)


def test_threshold_uses_the_gate_groups_lr() -> None:
    layer = SoRALinear(nn.Linear(2, 2), r=2, alpha=2.0)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1.0, -1.0]))
    model = nn.Sequential(layer)
    method = get_method(AdapterConfig(sparse_lambda=2.0, gate_lr=0.05), TrainConfig(lr=0.001))
    opt = build_optimizer(model, method.param_groups(model), 0.001, 0.0)
    set_lr(opt, 0.5)  # schedule at half: gate lr 0.025, main lr 0.0005
    stats = method.after_step(model, opt, 0)
    assert stats["threshold"] == pytest.approx(2.0 * 0.025)
    torch.testing.assert_close(layer.gate.detach(), torch.tensor([0.95, -0.95]))


def test_l1_loss_weight_adds_the_mean_absolute_gate() -> None:
    layers = [SoRALinear(nn.Linear(3, 3), r=2, alpha=2.0) for _ in range(2)]
    with torch.no_grad():
        layers[0].gate.copy_(torch.tensor([0.5, -1.0]))
        layers[1].gate.copy_(torch.tensor([0.0, 2.5]))
    model = nn.Sequential(*layers)
    loss = get_method(AdapterConfig(l1_loss_weight=0.2), TrainConfig()).extra_loss(model)
    assert float(loss.detach()) == pytest.approx(0.2 * 4.0 / 4)  # 0.2 · Σ|g| / numel
    loss.backward()
    torch.testing.assert_close(layers[0].gate.grad, torch.tensor([0.05, -0.05]))  # 0.2/4 · sign(g)
    assert get_method(AdapterConfig(), TrainConfig()).extra_loss(model) is None  # default 0: nothing added
