"""Merge: fold the adapter into the base weights (METHODS.md "Merge"). Pure, over state dicts.

    W' = W0 + ΔW     ΔW from the method's rule (SoRA: s · B diag(g) A), in float32 (float64 for a float64 base),
                     cast back to the base's dtype; a sparsity-keeping adapter (LoRS): W' = (W0 + ΔW) ⊙ (W0 ≠ 0)

and how many base weights that changed, counted after the cast: a small update can round away (bfloat16).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sora_cli import pooling, quantization
from sora_cli.adapters import method_class
from sora_cli.adapters.inject import inside
from sora_cli.checkpoint import atomic_dir, load_adapter, write_json
from sora_cli.errors import InputError, SoraError
from sora_cli.precision import wide_dtype
from sora_cli.report import SPARSE_BASE_SHARE
from sora_cli.sentence_export import write_sentence_transformers

MERGE_REPORT = "sora_merge.json"  # beside the merged model: per-module counts of changed / rounded-away weights


def head_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained heads (`modules_to_save`) among a checkpoint's tensors."""
    heads = meta.get("modules_to_save", [])
    return {k: v for k, v in tensors.items() if inside(k, heads)}


def merge_weight(w0: torch.Tensor, delta: torch.Tensor, saved: torch.dtype | None = None,
                 keep_zeros: bool = False) -> tuple[torch.Tensor, dict[str, int]]:
    """W' = (W0 in float32 or wider + ΔW) cast back to W0's dtype — with `keep_zeros` (a sparsity-keeping adapter)
    W' = (W0 + ΔW) ⊙ (W0 ≠ 0) — and what of ΔW survived, counted in `saved` (the dtype the merged model is written
    in; default W0's), weight by weight (d_out, d_in):

        changed = #(W' != W0)     rounded_away = #(ΔW != 0 and W' == W0)     changed + rounded_away = #(ΔW != 0)
        zeros_before = #(W0 == 0)     zeros_after = #(W' == 0)     kept_rounded_to_zero = #(W0 != 0 and W' == 0)

    e.g. in bfloat16 (8 significant bits) an update of 1e-4 on a weight of about 1 rounds away. With keep_zeros, ΔW
    counts only where W0 ≠ 0, and W' has W0's zero pattern exactly unless kept_rounded_to_zero > 0."""
    wide = wide_dtype(w0.dtype)  # float32, or float64 for a float64 base (exact checks)
    base_zero = w0 == 0  # (d_out, d_in) bool
    if keep_zeros:
        delta = delta.masked_fill(base_zero, 0)
    merged = (w0.to(wide) + delta).to(w0.dtype)
    new, old = (merged, w0) if saved is None else (merged.to(saved), w0.to(saved))
    same = new == old
    nonzero, new_zero = delta != 0, new == 0
    counts = {"weights": w0.numel(), "nonzero_delta": int(nonzero.sum()), "changed": int((~same).sum()),
              "rounded_away": int((nonzero & same).sum()), "zeros_before": int(base_zero.sum()),
              "zeros_after": int(new_zero.sum()), "kept_rounded_to_zero": int((new_zero & ~base_zero).sum())}
    return merged, counts


def merge_counted(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  saved: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
    """`merge`, and `merge_weight`'s counts per merged module (modules with rank 0 are not merged, not counted)."""
    merged = dict(base)
    counts: dict[str, dict[str, int]] = {}
    method = method_class(meta["method"])
    keep = bool(meta.get("keep_sparsity"))
    for name, m in meta["modules"].items():
        if m["r"] == 0:
            continue
        w0 = base[f"{name}.weight"]
        merged[f"{name}.weight"], counts[name] = merge_weight(w0, method.delta(tensors, name, m), saved, keep)
    for key, value in head_tensors(tensors, meta).items():
        merged[key] = value.to(base[key].dtype) if key in base else value
    return merged, counts


def merge(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
          meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A new state dict: every adapted module's weight merged, trained heads copied in; no adapter keys."""
    return merge_counted(base, tensors, meta)[0]


def totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    keys = ("weights", "nonzero_delta", "changed", "rounded_away", "zeros_before", "zeros_after",
            "kept_rounded_to_zero")
    return {k: sum(c[k] for c in counts.values()) for k in keys}


def _saved_dtype(model: Any, counts: dict[str, dict[str, int]]) -> str:
    """The dtype the merged weights are written (and counted) in, e.g. `bfloat16`."""
    first = next(iter(counts), None)
    weight = model.get_submodule(first).weight if first is not None else next(model.parameters())
    return str(weight.dtype).removeprefix("torch.")


def merge_checkpoint(ckpt: Path, output: Path, base: str | None = None, dtype: str = "auto",
                     force: bool = False, into: str = "full") -> dict[str, Any]:
    """`sora merge`: the base as it was trained (checked by fingerprint), merged, saved with its tokenizer
    as a plain transformers model (a mean-pooled run, model.pooling: mean, as a sentence-transformers folder:
    sora_cli/sentence_export.py); `dtype` auto keeps the base's. Beside the model, `sora_merge.json` holds the
    counts of changed and rounded-away weights per module (counted in the saved dtype). Returns that report.

    A run on a quantized base merges into the full-precision weights it was quantized from (`into` full: what one
    deploys), or into its quantized weights dequantized (`into` dequantized: exactly the function trained), and
    reports the quantization error ‖Q(W) − W‖_F / ‖W‖_F of each adapted weight either way."""
    from sora_cli.models import load_base, load_full_precision

    if output.exists() and not force:
        raise InputError(f"--output: {output} already exists; choose another path or pass --force")
    tensors, meta = load_adapter(ckpt)
    mean_pooled = pooling.recorded(meta) == "mean"
    quantized = quantization.recorded(meta)
    if into == "dequantized" and not quantized:
        raise InputError(f"--into: dequantized applies to a run on a quantized base (model.quantization); {ckpt} was "
                         "trained on full-precision weights, so merge it with --into full")
    model: Any
    errors: dict[str, dict[str, float]] = {}
    if quantized:
        model, tokenizer, errors = load_full_precision(ckpt, meta, base, dequantize=into == "dequantized")
    else:
        model, tokenizer = load_base(ckpt, meta, base)
    saved = None if dtype == "auto" else getattr(torch, dtype)
    merged, counts = merge_counted(model.state_dict(), tensors, meta, saved)
    model.load_state_dict(merged)
    if saved is not None:
        model.to(saved)
    bad = next((k for k in counts if not bool(torch.isfinite(model.get_parameter(f"{k}.weight")).all())), None)
    if bad is not None:  # a finite adapter can still overflow the saved dtype (float16's 65,504)
        raise SoraError(f"--output: not written: the merged {bad}.weight holds non-finite values (NaN or infinity) "
                        f"in {_saved_dtype(model, counts)}; merge into a wider --dtype")
    total = totals(counts)
    report = {"checkpoint": str(ckpt), "method": meta["method"], "modules_merged": len(counts),
              "dtype": _saved_dtype(model, counts), "keep_sparsity": bool(meta.get("keep_sparsity")),
              # a quantized base's zeros are its rounding's (NF4 has a zero level), not a pruned pattern
              "sparse_base": not quantized and total["zeros_before"] >= SPARSE_BASE_SHARE * total["weights"],
              # the merged weights' zeros are exactly the base's (a sparsity-keeping merge promises it)
              "zero_pattern_kept": total["zeros_after"] == total["zeros_before"] and not total["kept_rounded_to_zero"],
              # mean-pooled (model.pooling: mean): no transformers classifier pools the mean, sentence-transformers does
              "format": "sentence-transformers" if mean_pooled else "transformers",
              "total": total, "modules": counts}
    if quantized:
        report["quantization"] = {**quantized, "merged_into": into, "error": quantization_error(errors)}
    with atomic_dir(output) as tmp:
        if mean_pooled:
            write_sentence_transformers(tmp, model, tokenizer, trained_length(ckpt), str(ckpt))
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MERGE_REPORT, report)
    return report


def trained_length(ckpt: Path) -> int | None:
    """data.max_length of the run's recipe (the truncation the model was trained and evaluated with), None when the
    checkpoint has left its run directory."""
    from sora_cli.evaluate import find_recipe
    from sora_cli.recipe import load_recipe

    try:
        return load_recipe(find_recipe(ckpt)).data.max_length
    except InputError:
        return None


def quantization_error(errors: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The relative Frobenius error ‖Q(W) − W‖_F / ‖W‖_F of all adapted weights together and of each, and the largest
    entry's, from `load_full_precision`'s per-module norms."""
    err = math.sqrt(sum(e["error_norm"] ** 2 for e in errors.values()))
    norm = math.sqrt(sum(e["weight_norm"] ** 2 for e in errors.values()))
    return {"relative": err / norm if norm else 0.0,
            "max_abs": max((e["max_abs_error"] for e in errors.values()), default=0.0),
            "modules": {n: {"relative": e["error_norm"] / e["weight_norm"] if e["weight_norm"] else 0.0,
                            "max_abs": e["max_abs_error"]} for n, e in errors.items()}}
