"""RoseLoRA: the importance EMA, the density schedule and both mask rules against hand-worked values; a tiny run's
supports; exact resume mid-schedule."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sora_cli.adapters.lora import LoRALinear
from sora_cli.adapters.roselora import RoseLoRA, budget, density_at, keep_mask, window
from sora_cli.engine import train
from sora_cli.errors import RecipeError
from sora_cli.recipe import AdapterConfig, TrainConfig, load_recipe

ROSE = {"method": "roselora", "sparse_lambda": None, "density": 0.25, "sparsify_start": 4, "sparsify_end": 16}


def test_density_schedule_hand_worked() -> None:
    # τ = 0.1, t_i = 2, t_f = 6: 1 up to t_i; mid-way (t = 4) 0.1 + 0.9 · 0.5³ = 0.2125; τ from t_f on
    values = [density_at(t, 0.1, 2, 6) for t in range(8)]
    assert values[:3] == [1.0, 1.0, 1.0]
    assert values[3] == pytest.approx(0.1 + 0.9 * 0.75**3, abs=1e-15)
    assert values[4] == pytest.approx(0.2125, abs=1e-15)
    assert values[6:] == [0.1, 0.1]
    assert (window(3, 25), window(0.12, 25), window(0.8, 25), window(0, 25)) == (3, 3, 20, 0)


def test_budget_rounds_like_exact_arithmetic() -> None:
    # ⌈0.05 · 20⌉ = 1 although 0.05 · 20 is 1.0000000000000002 in binary floating point; at least one entry
    assert [budget(0.05, 20), budget(0.4, 5), budget(0.4, 4), budget(0.01, 10), budget(1.0, 7)] == [1, 2, 2, 1, 7]


def test_budget_mask_rows_and_columns_ties_by_lowest_index() -> None:
    imp = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5],   # a three-way tie for 2 places: indices 1 and 2
                        [0.0, 0.0, 0.0, 0.0, 0.0]])  # all tied (no signal yet): the two lowest indices
    assert keep_mask(imp, 0.4, 1, "budget").tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    b_imp = torch.tensor([[0.3, 0.0], [0.1, 0.2], [0.3, 0.2], [0.9, 0.1]])  # (d_out 4, r 2): per column, 2 kept
    assert keep_mask(b_imp, 0.4, 0, "budget").tolist() == [[1, 0], [0, 1], [0, 1], [1, 0]]


def test_reference_mask_keeps_one_more_plus_ties() -> None:
    imp = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5],   # k = int(5 · 0.6) = 3, thr = 3rd smallest = 0.5: keeps 3
                        [0.0, 0.0, 0.0, 0.0, 0.0],   # thr = 0: masks nothing
                        [0.5, 0.4, 0.3, 0.2, 0.1]])  # keeps d − k + 1 = 3 = one more than ⌈0.4 · 5⌉
    assert keep_mask(imp, 0.4, 1, "reference").tolist() == [[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert keep_mask(imp, 0.9, 1, "reference").tolist() == [[1] * 5] * 3  # k = int(5 · 0.1) = 0: no kthvalue


def _method(**kw: float | str) -> tuple[RoseLoRA, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(5, 4, dtype=torch.float64), r=2, alpha=2))
    method = RoseLoRA(AdapterConfig(method="roselora", **kw), TrainConfig())  # type: ignore[arg-type]
    method.setup(model, 10, None)
    return method, model


def test_importance_ema_and_masking_step() -> None:
    method, model = _method(density=0.4, sparsify_start=0, sparsify_end=1, importance_beta=0.8, clamp=0.3)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.arange(8, dtype=torch.float64).reshape(4, 2) / 10 - 0.35)
    a0 = layer.lora_A.detach().clone()
    g1, g2 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    layer.lora_A.grad, layer.lora_B.grad = g1, torch.ones(4, 2, dtype=torch.float64)
    method.after_backward(model, 0)  # first step: Ī = I
    assert torch.equal(method.importance["0.lora_A"], (a0 * g1).abs())
    layer.lora_A.grad = g2
    method.after_backward(model, 1)  # Ī = 0.8 Ī + 0.2 I
    expected = 0.8 * (a0 * g1).abs() + 0.2 * (a0 * g2).abs()
    assert torch.allclose(method.importance["0.lora_A"], expected, rtol=0, atol=1e-15)
    stats = method.after_step(model, torch.optim.SGD(model.parameters(), lr=0.0), 1)  # t ≥ t_f: τ = 0.4
    assert stats == {"density": 0.4}
    keep = keep_mask(expected, 0.4, 1, "budget")
    assert torch.equal(layer.lora_A.detach(), (a0 * keep).clamp(-0.3, 0.3))
    assert torch.count_nonzero(layer.lora_A, dim=1).tolist() == [2, 2]
    assert torch.count_nonzero(layer.lora_B, dim=0).tolist() == [2, 2]
    assert layer.lora_B.abs().max().item() == 0.3  # clamped


def test_window_order_is_checked() -> None:
    with pytest.raises(Exception, match=r"adapter.sparsify_end: step 5 of 10 does not come after"):
        _method(sparsify_start=0.5, sparsify_end=5)


def test_recipe_checks_roselora_fields(make_recipe) -> None:
    with pytest.raises(RecipeError, match=r"adapter.density: must be in \(0, 1\], got 0"):
        load_recipe(make_recipe(adapter={**ROSE, "density": 0}))
    with pytest.raises(RecipeError) as e:
        load_recipe(make_recipe(adapter={**ROSE, "sparsify_end": 2.5, "gate_lr": 0.1}))
    text = str(e.value)
    assert "adapter.sparsify_end: give a step (an integer) or a fraction of training below 1, got 2.5" in text
    assert "adapter.gate_lr: only applies to method sora, not roselora; remove it" in text
    with pytest.raises(RecipeError, match="adapter.clamp: only applies to method roselora, not lora"):
        load_recipe(make_recipe(adapter={"method": "lora", "sparse_lambda": None, "clamp": 0.1}))


def _supports(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith("lora_A")})
    return {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in names}


def test_tiny_run_keeps_the_budget_and_the_product_support(make_recipe) -> None:
    recipe = load_recipe(make_recipe(adapter=ROSE, model={"dtype": "float64"}, train={"max_steps": 20}))
    result = train(recipe)
    tensors = load_file(Path(recipe.train.output_dir) / "final" / "adapter.safetensors")
    for name, (a, b) in _supports(tensors).items():
        assert torch.count_nonzero(a, dim=1).tolist() == [math.ceil(0.25 * a.shape[1])] * 4, name
        assert torch.count_nonzero(b, dim=0).tolist() == [math.ceil(0.25 * b.shape[0])] * 4, name
        product = ((b != 0).double() @ (a != 0).double()) > 0  # the support that B A can have
        assert torch.equal(b @ a != 0, product), name
    assert result.stats["adapter_nnz"] == sum(int(torch.count_nonzero(t)) for k, t in tensors.items()
                                              if ".lora_" in k)


def test_resume_mid_schedule_is_bit_identical(make_recipe) -> None:
    sections = {"adapter": ROSE, "train": {"max_steps": 20, "save_every": 5, "keep_last": 5}}
    full = load_recipe(make_recipe("full", **sections))
    train(full)
    part = load_recipe(make_recipe("part", **sections))
    train(part)
    run = Path(part.train.output_dir)
    for name in ("checkpoints/step-15", "checkpoints/step-20", "final", "best"):
        shutil.rmtree(run / name, ignore_errors=True)  # killed after step 10: inside the cubic window 4 .. 16
    assert "method.bert.encoder.layer.0.attention.self.query.lora_A" in load_file(
        run / "checkpoints" / "step-10" / "training_state.safetensors")
    assert train(part, resume=True).resumed_from == 10
    a = load_file(Path(full.train.output_dir) / "final" / "adapter.safetensors")
    b = load_file(run / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
