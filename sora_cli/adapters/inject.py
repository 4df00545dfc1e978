"""Find the target `nn.Linear` modules, replace them with the method's layer, freeze the rest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sora_cli import quantization
from sora_cli.adapters.method import Method
from sora_cli.errors import CheckpointError, InputError

# Output heads: never adapted by `all-linear`, and the default `modules_to_save` (PEFT's choice too).
HEAD_NAMES = ("classifier", "score", "lm_head")


# Set by models.load_model: the modules whose weights the base checkpoint did not have (newly initialised by
# transformers, e.g. DeBERTa-v3's pooler). Frozen they would stay random and unsaved, so no checkpoint could be
# evaluated again: the default modules_to_save trains them with the task head.
_FRESH = "_sora_fresh_modules"


def mark_fresh(model: nn.Module, fresh_keys: list[str]) -> None:
    """Record the outermost modules, in model order, holding parameters that transformers initialised instead of
    loading (missing, or re-sized under ignore_mismatched_sizes); a tied copy of a loaded parameter is not fresh."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {p.data_ptr() for n, p in params.items() if n not in fresh_keys and not p.is_meta}
    owners = {k.rpartition(".")[0] for k in fresh_keys
              if k in params and (params[k].is_meta or params[k].data_ptr() not in loaded)}
    names = [n for n, _ in model.named_modules() if n in owners]  # model order; "" (a top-level parameter) dropped
    object.__setattr__(model, _FRESH, [n for n in names if not inside(n, [m for m in names if m != n])])


def fresh_modules(model: nn.Module) -> list[str]:
    """The modules that mark_fresh recorded (none for a model built in code)."""
    return list(getattr(model, _FRESH, []))


@dataclass(frozen=True)
class Injection:
    targets: list[str]  # full names of the adapted Linear modules, in model order
    modules_to_save: list[str]  # full names of the trained (not adapted) modules


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _compact(names: list[str]) -> str:
    """Linear module names with layer indices folded (`encoder.layer.N.attention.self.query`)."""
    seen: dict[str, None] = {}
    for n in names:
        seen[re.sub(r"\.\d+\.", ".N.", n)] = None
    return ", ".join(seen)


def inside(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def select_targets(model: nn.Module, target_modules: str | tuple[str, ...], heads: list[str]) -> list[str]:
    names = linear_names(model)
    if target_modules == "all-linear":  # every Linear outside the heads (RoBERTa's head holds two)
        output_heads = [n for n in names if n.split(".")[-1] in HEAD_NAMES]
        chosen = [n for n in names if not inside(n, heads + output_heads)]
        missing = "'all-linear'"
    elif isinstance(target_modules, str):
        chosen = [n for n in names if re.fullmatch(target_modules, n)]
        missing = f"'{target_modules}'"
    else:
        chosen = [n for n in names if any(_matches(n, s) for s in target_modules)]
        missing = ", ".join(repr(s) for s in target_modules if not any(_matches(n, s) for n in names))
    if not chosen or (missing and not isinstance(target_modules, str)):
        raise InputError(f"adapter.target_modules: {missing} matches no Linear module; "
                         f"the model's Linear modules are: {_compact(names)}")
    return chosen


def select_heads(model: nn.Module, modules_to_save: tuple[str, ...] | None,
                 task_heads: tuple[str, ...] = HEAD_NAMES[:2]) -> list[str]:
    """The trained (not adapted) modules: modules_to_save, else the task's new head (none for a causal LM, whose
    output layer is pre-trained) and every module the base checkpoint did not initialise."""
    names = [n for n, _ in model.named_modules() if n]
    fresh = fresh_modules(model)
    if modules_to_save is None:
        if not task_heads:
            return fresh
        found = [n for n in names if n.split(".")[-1] in task_heads and _params(model, n)] + fresh
        if not found:
            raise InputError("adapter.modules_to_save: this model has no 'classifier' or 'score' head to train; "
                             "name its task head, e.g. modules_to_save: [classification_head]; top-level modules: "
                             + ", ".join(n for n in names if "." not in n))
        found = sorted(set(found), key=names.index)
        return [n for n in found if not inside(n, [c for c in found if c != n])]
    chosen: list[str] = []
    for suffix in modules_to_save:
        found = [n for n in names if _matches(n, suffix)]
        if not found:
            raise InputError(f"adapter.modules_to_save: {suffix!r} matches no module of the model; "
                             f"top-level modules are: {', '.join(n for n in names if '.' not in n)}")
        # Keep only outermost matches (a module and its children are trained as one).
        chosen += [n for n in found if not any(n.startswith(c + ".") for c in chosen)]
    left = [n for n in fresh if not inside(n, chosen)]
    if left:
        raise InputError(f"adapter.modules_to_save: {left[0]} is not in the base checkpoint (newly initialised), so "
                         "frozen it would stay random and no checkpoint could restore it; add it to modules_to_save "
                         "(or leave modules_to_save unset)")
    return chosen


def _params(model: nn.Module, name: str) -> list[nn.Parameter]:
    return list(model.get_submodule(name).parameters())


def inject(model: nn.Module, method: Method, task_heads: tuple[str, ...] = HEAD_NAMES[:2]) -> Injection:
    """Freeze the model, replace the target Linears by the method's layer, unfreeze modules_to_save."""
    cfg = method.adapter
    heads = select_heads(model, cfg.modules_to_save, task_heads)
    targets = select_targets(model, cfg.target_modules, heads)
    clash = [t for t in targets if inside(t, heads)]
    if clash and cfg.modules_to_save is None and inside(clash[0], fresh_modules(model)):
        raise InputError(f"adapter.target_modules: {clash[0]!r} is not in the base checkpoint (newly initialised), "
                         "so it trains in full with the task head; leave it out of target_modules")
    if clash:
        raise InputError(f"adapter.target_modules: {clash[0]!r} is also in adapter.modules_to_save; "
                         "a module is either adapted or trained in full, not both")
    coded = [f"{h}.{n}".rstrip(".") for h in heads for n, m in model.get_submodule(h).named_modules()
             if quantization.is_quantized(m)]
    if coded:
        raise InputError(f"adapter.modules_to_save: {coded[0]} is quantized (model.quantization), so it cannot be "
                         "trained in full; leave it out of modules_to_save, or adapt it with target_modules")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, method.make_layer(getattr(parent, child)))
    for name in heads:
        for p in _params(model, name):
            p.requires_grad_(True)
    return Injection(targets=targets, modules_to_save=heads)


def attach(model: nn.Module, method: type[Method], modules: dict[str, dict[str, Any]],
           tensors: dict[str, torch.Tensor], where: str, keep_sparsity: bool = False) -> None:
    """Rebuild a checkpoint's adapted layers (each module's own r and s, as recorded; keeping the base's zeros when
    the adapter was trained so) and load its tensors.

    A module recorded with r = 0 (pruned away) stays the plain base layer. Everything ends frozen.
    """
    for name, m in modules.items():
        if m["r"] == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear) or (base.in_features, base.out_features) != (m["d_in"], m["d_out"]):
            raise CheckpointError(f"{where}: module {name} of the base model is not a Linear of shape "
                                  f"{m['d_in']} -> {m['d_out']}; is this the base the adapter was trained on?")
        layer = method.layer(base, m["r"], m["s"] * m["r"], keep_sparsity=keep_sparsity)
        layer.scaling = m["s"]  # exactly as recorded, not re-derived from alpha / r
        setattr(parent, child, layer)
    params = dict(model.named_parameters())
    adapter_keys = {n for n in params if n.rsplit(".", 1)[-1] in method.rank_dims}
    missing = sorted(adapter_keys - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing from the adapter file; the checkpoint is "
                              "damaged")
    with torch.no_grad():
        for key, value in tensors.items():
            if key not in params or params[key].shape != value.shape:
                raise CheckpointError(f"{where}: tensor {key} {tuple(value.shape)} has no place in the model; "
                                      "is this the base the adapter was trained on?")
            params[key].copy_(value)
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, from tensor shapes (a 4-bit weight's from its quantized shape)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(quantization.numel(p) for p in model.parameters())
    return trainable, total
