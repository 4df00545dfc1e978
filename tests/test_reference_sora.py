"""`threshold: reference` runs the reference code's optimizer arithmetic (METHODS.md, "SoRA — reproducing the
reference code"): its AdamW and its gates' SparseAdamW against hand-worked steps, the ε placement that tells them
from torch's AdamW, and a tiny run whose gates equal, at every step, a plain re-implementation of the equations.

The hand-worked values are float64; the float32 optimizer must land within 2 ulp of them: whether a CPU contracts
`m·β1 + (1−β1)·g` into one fused multiply-add decides the last bit, so no golden bit pattern holds on every CPU. The
bit-for-bit check is the tiny run against the re-implementation, which rounds exactly as the optimizer does."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_cli.engine import prepare, train, train_step
from sora_cli.optim import reference_factor, reference_lengths, set_lr
from sora_cli.recipe import load_recipe
from sora_cli.reference_adamw import REFERENCE_EPS, REFERENCE_GATE_EPS, ReferenceAdamW

B1, B2 = 0.9, 0.999
GRADS = [[0.1, -0.2], [0.3, 0.05], [-0.1, 0.2]]


def hand_steps(p: list[float], grads: list[list[float]], lr: float, wd: float, eps: float, gate: bool) -> list[float]:
    """The reference's update in float64, written out: m, v; c = lr·√(1−β2^t)/(1−β1^t); p −= c·m/(√v + ε); then
    (main groups) p −= lr·wd·p on the updated value; the gate update adds the decay to the same step instead."""
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        c = lr * math.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        for i, gi in enumerate(g):
            m[i] = B1 * m[i] + (1 - B1) * gi
            v[i] = B2 * v[i] + (1 - B2) * gi * gi
            u = -c * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] + u - lr * wd * p[i] if gate else (p[i] + u) * (1 - lr * wd)
    return p


def run_steps(p0: list[float], grads: list[list[float]], lr: float, wd: float, gate: bool,
              eps: float = REFERENCE_EPS) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = ReferenceAdamW([{"params": [p], "weight_decay": wd, "eps": eps, "gate": gate}], lr=lr)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return p.detach()


def assert_within_ulps(actual: torch.Tensor, expected: list[float], ulps: int = 2) -> None:
    want = torch.tensor(expected, dtype=torch.float64)
    spacing = torch.finfo(torch.float32).eps * want.abs()
    assert ((actual.double() - want).abs() <= ulps * spacing).all(), (actual.tolist(), expected)


def test_main_update_matches_the_hand_worked_steps_with_decay_after_the_update() -> None:
    p0 = [0.5, -0.25]
    got = run_steps(p0, GRADS, lr=1e-2, wd=0.1, gate=False)
    assert_within_ulps(got, hand_steps(list(p0), GRADS, 1e-2, 0.1, REFERENCE_EPS, gate=False))
    # decay before the update (p(1 − lr·wd) − c·m/(√v+ε), torch's order) lands elsewhere by far more than 2 ulp
    m1, v1 = 0.1 * 0.1, 0.001 * 0.01
    before = 0.5 * (1 - 1e-3) - 1e-2 * math.sqrt(1e-3) / 0.1 * m1 / (math.sqrt(v1) + REFERENCE_EPS)
    one = run_steps(p0, GRADS[:1], lr=1e-2, wd=0.1, gate=False)
    assert abs(float(one[0]) - before) > 1e-6


def test_gate_update_matches_the_hand_worked_steps() -> None:
    p0 = [1.5, -0.75]
    got = run_steps(p0, GRADS, lr=2e-2, wd=0.0, gate=True, eps=REFERENCE_GATE_EPS)
    assert_within_ulps(got, hand_steps(list(p0), GRADS, 2e-2, 0.0, REFERENCE_GATE_EPS, gate=True))


def test_epsilon_is_added_before_the_bias_correction() -> None:
    """A gradient of 1e-9: √v is 3e-11 next to ε = 1e-8, so where ε goes decides the step. The reference moves p by
    c·m/(√v₁ + ε) ≈ 0.00315·lr; torch's AdamW by m̂/(√v̂ + ε) = 1e-9/(1e-9 + 1e-8) ≈ 0.0909·lr."""
    lr = 1.0
    got = float(run_steps([0.0], [[1e-9]], lr=lr, wd=0.0, gate=False)[0])
    c = lr * math.sqrt(1 - B2) / (1 - B1)
    reference = -c * 1e-10 / (math.sqrt(1e-3) * 1e-9 + REFERENCE_EPS)
    assert got == pytest.approx(reference, rel=1e-6)
    p = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.AdamW([p], lr=lr, eps=REFERENCE_EPS, weight_decay=0.0)
    p.grad = torch.tensor([1e-9])
    torch_opt.step()
    assert float(p.detach()) == pytest.approx(-1e-9 / (1e-9 + 1e-8), rel=1e-5)
    assert float(p.detach()) / got == pytest.approx(28.84, rel=1e-3)  # torch's step is 29× the reference's


def reference_lr(base: float, step: int, n: int, warmup: int) -> float:
    """transformers' linear schedule as the reference steps it: t/w in warm-up, then max(0, (n − t)/(n − w))."""
    return base * (step / warmup if step < warmup else max(0.0, (n - step) / (n - warmup)))


def reference_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], state: dict[int, list],
                   lrs: tuple[float, float], wd: float, lam: float, l1: float, max_norm: float) -> None:
    """The reference's training step written out plainly: loss (mean cross-entropy + l1·Σ|g|/numel), backward,
    clip everything, AdamW on every non-gate tensor (decay on matrices), the gates' SparseAdamW, the threshold."""
    import torch.nn.functional as F

    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
    flat = torch.cat([g.reshape(-1) for g in gates])
    loss = F.cross_entropy(logits, labels, reduction="sum") / len(labels)
    loss.backward()
    (l1 * flat.abs().sum() / flat.numel()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    with torch.no_grad():
        for p in params:
            is_gate = any(p is g for g in gates)
            m, v, t = state.setdefault(id(p), [torch.zeros_like(p), torch.zeros_like(p), 0])
            t += 1
            state[id(p)][2] = t
            m.mul_(B1).add_(p.grad, alpha=1 - B1)
            v.mul_(B2).addcmul_(p.grad, p.grad, value=1 - B2)
            denom = v.sqrt().add_(REFERENCE_GATE_EPS if is_gate else REFERENCE_EPS)
            lr = lrs[1] if is_gate else lrs[0]
            c = lr * math.sqrt(1 - B2 ** t) / (1 - B1 ** t)
            if is_gate:
                p.add_(torch.div(m, denom) * (-c))
                p[p > lam] -= lam
                p[p < -lam] += lam
                p[p.abs() < lam] = 0.0
            else:
                p.addcdiv_(m, denom, value=-c)
                if p.ndim >= 2:
                    p.add_(p, alpha=-lr * wd)
            p.grad = None


def test_a_reference_run_follows_the_reference_equations_bit_for_bit(make_recipe) -> None:
    """8 steps, warm-up ratio 0.3: the main optimizer warms up for ceil(2.4) = 3 steps, the gates for int(2.4) = 2,
    each at its own LR; every trainable tensor equals the re-implementation's after every step."""
    lam, l1, lr, gate_lr, wd = 2e-2, 10.0, 1e-2, 2e-2, 0.1
    recipe = load_recipe(make_recipe(adapter={"threshold": "reference", "sparse_lambda": lam, "l1_loss_weight": l1,
                                              "gate_lr": gate_lr},
                                     train={"lr": lr, "weight_decay": wd, "max_grad_norm": 0.1, "max_steps": 8,
                                            "lr_scheduler": "linear", "warmup_ratio": 0.3}))
    run = prepare(recipe, Path(recipe.train.output_dir or ""))
    assert isinstance(run.optimizer, ReferenceAdamW)
    twin = copy.deepcopy(run.model)
    run.model.eval()  # no dropout: both models see the same function
    twin.eval()
    state: dict[int, list] = {}
    zero_seen = 0
    for step in range(8):
        (batch,), _, _, _ = run.micro_batches(step)
        set_lr(run.optimizer, run.lr_factor(step))  # what the engine's loop does before each step
        train_step(run.model, run.task, run.method, run.optimizer, [batch], run.params, 0.1, run.ctx.autocast, step)
        lrs = (reference_lr(lr, step, 8, 3), reference_lr(gate_lr, step, 8, 2))
        reference_step(twin, batch, state, lrs, wd, lam, l1, 0.1)
        ours = dict(run.model.named_parameters())
        for name, p in twin.named_parameters():
            if p.requires_grad:
                assert torch.equal(ours[name], p), (step, name)
        zero_seen = sum(int((p == 0).sum()) for n, p in twin.named_parameters() if n.endswith(".gate"))
    assert zero_seen > 0  # the threshold did switch gates off: the comparison covers it


def test_reference_lengths_follow_the_reference_scripts() -> None:
    """n = int(epochs·examples/batch); main warm-up ceil(ratio·n); gates int(epochs·examples/batch·ratio)."""
    # RTE as the reference runs it: 2,490 examples, batch 32, 50 epochs, ratio 0.06: 3890.625 steps
    assert reference_lengths(50.0, None, None, 0.06, 2490, 32) == (3890, 234, 233)
    assert reference_factor(0, 3890, 234) == 0.0 and reference_factor(117, 3890, 234) == 0.5
    assert reference_factor(3890, 3890, 234) == 0.0 and reference_factor(4000, 3890, 234) == 0.0
    assert reference_factor(1000, 3890, 234) == (3890 - 1000) / (3890 - 234)
    # the formula itself, not an equal one: (n − t)/(n − w) and 1 − (t − w)/(n − w) round apart here
    assert reference_factor(16, 17, 3) == 1 / 14 != 1 - 13 / 14


def test_default_modes_keep_torch_adamw_and_a_reference_run_resumes_exactly(make_recipe) -> None:
    recipe = load_recipe(make_recipe())
    assert isinstance(prepare(recipe, Path(recipe.train.output_dir or "")).optimizer, torch.optim.AdamW)
    ref = {"adapter": {"threshold": "reference", "sparse_lambda": 1e-2}, "train": {"max_steps": 20}}
    full, part = (load_recipe(make_recipe(name, **ref)) for name in ("full", "part"))
    train(full)
    train(part)
    run = Path(part.train.output_dir or "")
    for name in ("checkpoints/step-20", "final", "best"):
        shutil.rmtree(run / name)  # as if killed right after step 10's checkpoint
    assert train(part, resume=True).resumed_from == 10  # the optimizer's step counts and moments come back
    a, b = (load_file(Path(r.train.output_dir or "") / "final" / "adapter.safetensors") for r in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
