"""Prune: cut the ranks whose gate is zero (METHODS.md "Prune"). `prune` is a pure function over
adapter tensors; `prune_checkpoint` is the command around it (checks, then files).

    keep = {i : |g_i| > eps}   A' = A[keep, :]   B' = B[:, keep]   g' = g[keep]   s unchanged

With eps = 0 the pruned adapter computes exactly the same function (float reordering only).
A module with nothing left keeps an entry with r = 0 and no tensors: it is the plain base layer.
A LoRA adapter has no gates: every rank survives and prune only copies it (useful with --peft).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sora_cli import pooling
from sora_cli.adapters import method_class
from sora_cli.adapters.lors import KEEP_SPARSITY_EXPORT
from sora_cli.checkpoint import atomic_dir, load_adapter, save_adapter
from sora_cli.errors import InputError, SoraError
from sora_cli.models import resolve_model_path


def prune(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
          eps: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return pruned (tensors, meta); the inputs are left as they were."""
    out = dict(tensors)
    new_meta = copy.deepcopy(meta)
    method = method_class(meta["method"])
    for name, m in new_meta["modules"].items():
        m.setdefault("r_max", m["r"])
        if m["r"] == 0:  # gone already
            continue
        keep = method.surviving(tensors, name, m, eps)  # (k,), ascending: the ranks keep their order
        for key, dim in method.rank_dims.items():  # A (k, d_in), B (d_out, k), a gate (k,)
            value = out.pop(f"{name}.{key}")
            if len(keep):
                out[f"{name}.{key}"] = value.index_select(dim, keep).contiguous()
        m["r"] = m["active_rank"] = len(keep)
    new_meta["pruned"] = {"eps": eps, "from_step": meta.get("step")}
    return out, new_meta


def _peft_base(base_model: str) -> str:
    """base_model_name_or_path for PEFT: a packaged model's directory (PEFT knows no `packaged:` names)."""
    try:
        return resolve_model_path(base_model)
    except SoraError as e:
        raise InputError(f"--peft: the base model {base_model} is not installed here, so adapter_config.json cannot "
                         f"name its location ({e})") from None


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def prune_checkpoint(ckpt: Path, out: Path, eps: float = 0.0, peft: Path | None = None,
                     force: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """`sora prune`: check every path, then write the pruned checkpoint (and the PEFT export).

    Returns the inspect reports before and after. Nothing is written when any check fails.
    """
    from sora_cli.export import write_peft
    from sora_cli.report import inspect_adapter

    if eps < 0:
        raise InputError(f"--eps: must be >= 0, got {eps}")
    tensors, meta = load_adapter(ckpt)
    for target, flag in [(out, "--output")] + ([(peft, "--peft")] if peft is not None else []):
        if _overlap(target, ckpt):
            raise InputError(f"{flag}: {target} overlaps the checkpoint {ckpt}; choose a path beside it")
        if target.exists() and not force:
            raise InputError(f"{flag}: {target} already exists; choose another path or pass --force")
        if target.parent.exists() and not target.parent.is_dir():
            raise InputError(f"{flag}: {target.parent} is not a directory")
    if peft is not None and _overlap(peft, out):
        raise InputError(f"--peft: {peft} overlaps --output {out}; give two separate directories")
    pruned, pruned_meta = prune(tensors, meta, eps)
    reason = KEEP_SPARSITY_EXPORT if meta.get("keep_sparsity") else method_class(meta["method"]).peft_export
    mean_pooled = pooling.recorded(meta) == "mean"
    reason = reason or (pooling.NOT_PORTABLE if mean_pooled else None)
    if peft is not None and reason:
        merged = "a sentence-transformers model that pools the mean" if mean_pooled else "a plain model"
        raise InputError(f"--peft: {reason}; use sora merge for {merged} instead")
    if peft is not None and not any(m["r"] for m in pruned_meta["modules"].values()):
        raise InputError(f"--peft: no rank survives in {ckpt}, so there is no LoRA adapter to export; "
                         "the base model with the trained head is the whole model (see sora merge)")
    base = _peft_base(meta["base_model"]) if peft is not None else ""  # before anything is written
    with atomic_dir(out) as tmp:
        save_adapter(tmp, pruned, pruned_meta)
    if peft is not None:
        write_peft(peft, pruned, pruned_meta, base)
    return inspect_adapter(tensors, meta), inspect_adapter(pruned, pruned_meta)
