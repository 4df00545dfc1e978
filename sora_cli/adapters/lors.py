"""LoRS (arXiv 2501.08582): LoRA on a sparse (pruned) base that keeps its zero pattern,

    h = x ((W0 + s · B A) ⊙ M)ᵀ + b        M = (W0 ≠ 0)

at LoRA's memory (the layer is LoRALinear with keep_sparsity; the Function in `masked.py` recomputes M and W_eff in
backward). `init: gradient` (the reference's, after LoRA-GA): A = the top-r right singular vectors of each target
weight's full (unmasked) gradient averaged over `init_samples` seeded training examples, B = 0. See METHODS.md "LoRS".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sora_cli.adapters.lora import LoRALinear
from sora_cli.adapters.method import Calibration, Method, adapter_layers
from sora_cli.errors import InputError
from sora_cli.precision import wide

KEEP_SPARSITY_EXPORT = ("the adapter keeps the base's zero pattern, (W0 + s·B·A) ⊙ M, and a standard LoRA adapter "
                        "cannot carry the mask M (PEFT would add B·A to every weight, zeros included)")


def weight_gradients(model: nn.Module, layers: dict[str, LoRALinear],
                     calibration: Calibration) -> dict[str, torch.Tensor]:
    """∂L/∂W0 of every layer, (d_out, d_in), unmasked, L the mean loss over every calibration example (or label
    token): each batch's summed loss is divided by the count over all batches (of every rank, under torchrun, whose
    gradients are then summed), as a training step divides."""
    world = calibration.world
    total = max(world.total(sum(calibration.count(b) for b in calibration.batches)), 1)
    weights = [m.weight for m in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in calibration.batches:
            with calibration.autocast:
                loss = calibration.loss_sum(model, batch) / total
            loss.backward()
        grads = [m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight) for m in layers.values()]
        for g in grads:  # one weight at a time: no second copy of every gradient at once
            world.sum_([g])
        return {name: wide(g.detach()) for name, g in zip(layers, grads)}
    finally:
        for w in weights:
            w.requires_grad_(False)
        model.zero_grad(set_to_none=True)  # the base's, the adapters' and the heads' grads of this pass


def top_right_singular(grad: torch.Tensor, r: int, name: str) -> torch.Tensor:
    """The top-r right singular vectors of grad (d_out, d_in), as rows (r, d_in): torch.svd_lowrank with
    q = min(4r, d_out, d_in) and 4 power iterations (its random start comes from the seeded generator)."""
    q = min(4 * r, *grad.shape)
    if r > q:
        raise InputError(f"adapter.r: {r} is above the size of {name} ({grad.shape[0]} x {grad.shape[1]}); "
                         f"init: gradient needs r <= {q}")
    _, _, v = torch.svd_lowrank(grad, q=q, niter=4)  # v: (d_in, q), columns by descending singular value
    return v[:, :r].t()


class LoRS(Method):
    name = "lors"
    layer = LoRALinear
    peft_export = KEEP_SPARSITY_EXPORT

    def make_layer(self, base: nn.Linear) -> nn.Module:
        a = self.adapter
        return LoRALinear(base, a.r, a.alpha, a.dropout, **self.layer_options())

    def calibration_samples(self) -> int:
        return int(self.adapter.init_samples or 0) if self.adapter.init == "gradient" else 0

    def setup(self, model: nn.Module, total_steps: int, calibration: Calibration | None) -> None:
        """init: gradient, given the calibration examples (None: A is left as it is, e.g. an edit's reset adapter)."""
        if self.adapter.init != "gradient" or calibration is None:
            return
        layers = dict(adapter_layers(model))
        device = next(iter(layers.values())).lora_A.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.train.seed)  # svd_lowrank's random start; training's own stream is untouched
            grads = weight_gradients(model, layers, calibration)
            with torch.no_grad():
                for name, m in layers.items():
                    m.lora_A.copy_(top_right_singular(grads[name], m.r, name))  # γ = 1
                    m.lora_B.zero_()

    def describe(self) -> dict[str, Any]:
        a = self.adapter
        return {"grad": a.grad, "init": a.init, "init_samples": a.init_samples}  # use_rslora: adapter.json's own
