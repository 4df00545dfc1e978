"""Run directories and checkpoints: safetensors + JSON, written atomically; never any pickle

    <run>/recipe.yaml  metrics.jsonl
    <run>/checkpoints/step-N/  adapter.safetensors  adapter.json  training_state.safetensors  training_state.json
    <run>/final/  <run>/best/  adapter.safetensors  adapter.json

A directory appears under its final name only by `rename` after every file in it was
fsync'ed, so a killed run never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sora_cli.errors import CheckpointError, SoraError, disk_full, full_disk

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
STATE_TENSORS = "training_state.safetensors"
STATE_META = "training_state.json"
FORMAT = "sora-adapter"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")
REQUIRED_META = ("method", "base_model", "task", "target_modules", "modules_to_save", "modules", "step")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(target: Path) -> Path:
    return target.parent / f".tmp-{target.name}"


def _old(target: Path) -> Path:
    return target.parent / f".old-{target.name}"


def _gone(target: Path) -> Path:
    return target.parent / f".del-{target.name}"


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill never leaves it half-deleted under its own name: it is renamed to `.del-X`
    first, and `recover` finishes a removal that a kill cut short."""
    if not path.is_dir():
        return
    gone = _gone(path)
    shutil.rmtree(gone, ignore_errors=True)
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def recover(directory: Path) -> None:
    """Tidy what a killed writer left in `directory`: drop `.tmp-*` and `.del-*`; put back a `.old-X` whose X is
    gone."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif p.name.startswith(".old-"):
            target = directory / p.name.removeprefix(".old-")
            if target.exists():
                shutil.rmtree(p)
            else:
                os.rename(p, target)  # killed between the two renames of a replacement


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it takes `target`'s name by rename.

    Replacing an existing `target` takes two renames (target -> .old-X, tmp -> target); a kill
    between them is undone by `recover`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _tmp(target), _old(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):  # files and folders at any depth (a sentence-transformers merge has subfolders)
            _fsync(f)
        _fsync(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        if disk_full(e):  # the half-written copy goes; `target` as it was before stays
            raise full_disk(target, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        if disk_full(e):
            raise full_disk(path, e) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any] | list[Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Adapter files


def save_adapter(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """adapter.safetensors and adapter.json in `directory`; refused (nothing written) if a tensor holds a NaN or an
    infinity: no checkpoint, best/, final/, stage or pruned adapter is ever saved with one."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise SoraError(f"adapter not saved: {bad} holds non-finite values (NaN or infinity)")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / ADAPTER_WEIGHTS)
    write_json(directory / ADAPTER_META, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})


def load_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint directory, with a clear error for anything wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    meta_path, weights_path = directory / ADAPTER_META, directory / ADAPTER_WEIGHTS
    if not meta_path.is_file() and (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory}: a PEFT adapter directory (adapter_config.json), not a sora checkpoint; "
                              "give the run's checkpoint it came from (e.g. runs/NAME/final), or load it with PEFT")
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: not a sora checkpoint ({p.name} is missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: not a sora adapter file (format {found!r})")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: incomplete, missing {', '.join(missing)}; the checkpoint is damaged")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({e}); the checkpoint is damaged") from None
    for name, m in meta["modules"].items():
        needed = [f"{name}.{k}" for k in ("lora_A", "lora_B") if m.get("r")]
        if any(k not in tensors for k in needed):
            raise CheckpointError(f"{weights_path}: tensors of {name} are missing; the checkpoint is damaged")
        _check_shapes(weights_path, tensors, name, m)
    return tensors, meta


def _check_shapes(weights_path: Path, tensors: dict[str, torch.Tensor], name: str, module: dict[str, Any]) -> None:
    """lora_A (r, d_in) and lora_B (d_out, r), as adapter.json records the module."""
    if not module.get("r") or "d_in" not in module or "d_out" not in module:
        return
    for key, shape in (("lora_A", (module["r"], module["d_in"])), ("lora_B", (module["d_out"], module["r"]))):
        found = tuple(tensors[f"{name}.{key}"].shape)
        if found != shape:
            raise CheckpointError(f"{weights_path}: {name}.{key} has shape {list(found)}, but adapter.json records "
                                  f"{list(shape)} (r, d_in, d_out); the checkpoint is damaged")


# ---------------------------------------------------------------------------------------------
# Training state (optimizer, RNG, counters) for exact resume


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def process_rng() -> dict[str, torch.Tensor]:
    """This process's torch generator (and its CUDA device's, once CUDA is in use): what a torchrun rank other than 0
    saves of its RNG, so that its dropout continues exactly on --resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_to_files(ranks: Sequence[dict[str, torch.Tensor]] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rank 0's (the only process's) generators as `rng.*`; those of ranks 1.. (`ranks[1:]`) as `rng.rank<k>.*`."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, state in enumerate(ranks[1:], start=1):
        tensors.update({f"rng.rank{k}.{name}": value for name, value in state.items()})
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss], "ranks": max(len(ranks), 1)}


def rng_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int = 0) -> bool:
    """Restore this process's generators; False when the checkpoint has none for `rank` (it was saved by fewer
    processes), which leaves them as they are."""
    if rank > 0:
        mine = {k.removeprefix(f"rng.rank{rank}."): v for k, v in tensors.items() if k.startswith(f"rng.rank{rank}.")}
        if "torch" not in mine:
            return False
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
        return True
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    return True


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, counters: dict[str, Any],
                        method_state: dict[str, torch.Tensor] | None = None,
                        ranks: Sequence[dict[str, torch.Tensor]] = ()) -> None:
    """Optimizer, RNGs (every torchrun rank's: `ranks`, gathered by rank 0), the loop's counters and the method's
    running statistics (`method.<name>` tensors)."""
    opt_tensors, opt_meta = optimizer_to_files(optimizer)
    rng_tensors, rng_meta = rng_to_files(ranks)
    method = {f"method.{k}": v for k, v in (method_state or {}).items()}
    save_file({k: v.contiguous().cpu() for k, v in {**opt_tensors, **rng_tensors, **method}.items()},
              directory / STATE_TENSORS)
    write_json(directory / STATE_META, {"counters": counters, "optimizer": opt_meta, "rng": rng_meta})


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_file(directory / STATE_TENSORS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_TENSORS}: training state unreadable ({e})") from None
    try:
        meta = json.loads((directory / STATE_META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_META}: training state unreadable ({e})") from None
    missing = [k for k in ("counters", "optimizer", "rng") if k not in meta]
    if missing or "rng.torch" not in tensors:
        raise CheckpointError(f"{directory / STATE_META}: training state incomplete (missing {missing or 'rng'})")
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# Run directory


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first (temporary `.tmp-*` directories are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def remove_old_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in step_checkpoints(run_dir)[:-keep_last]:
        remove_dir(path)
