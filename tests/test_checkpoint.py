"""Checkpoint files: atomic replacement, recovery after a kill, optimizer and RNG round trips, clear errors."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from sora_cli.checkpoint import (
    atomic_dir, load_adapter, load_training_state, optimizer_from_files, recover, remove_dir, rng_from_files,
    save_adapter, save_training_state, step_checkpoints,
)
from sora_cli.errors import CheckpointError


def test_atomic_dir_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_recover_after_a_kill_between_the_two_renames(tmp_path: Path) -> None:
    (tmp_path / ".old-best").mkdir()
    (tmp_path / ".old-best" / "adapter.json").write_text("{}")
    (tmp_path / ".tmp-final").mkdir()  # a half-written directory: dropped
    (tmp_path / ".old-final").mkdir()
    (tmp_path / "final").mkdir()  # the replacement had completed: the old copy is dropped
    recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]
    assert (tmp_path / "best" / "adapter.json").is_file()


def test_a_removal_cut_short_is_never_a_half_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "adapter.json").write_text("{}")
    remove_dir(run / "checkpoints" / "step-2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]
    # a kill during the removal: the directory already carries its .del- name, half its files gone
    os.rename(run / "checkpoints" / "step-4", run / "checkpoints" / ".del-step-4")
    assert step_checkpoints(run) == []  # never listed as a checkpoint
    recover(run / "checkpoints")
    assert list((run / "checkpoints").iterdir()) == []


def test_training_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1, "name": "main", "base_lr": 0.1}], betas=(0.8, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    random.seed(5)
    save_training_state(tmp_path, opt, {"step": 7})
    expected_torch, expected_py = torch.rand(4), random.random()
    tensors, meta = load_training_state(tmp_path)
    q = torch.nn.Parameter(p.detach().clone())
    fresh = torch.optim.AdamW([{"params": [q], "lr": 0.1, "name": "main", "base_lr": 0.1}])
    optimizer_from_files(fresh, tensors, meta["optimizer"])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9) and meta["counters"] == {"step": 7}
    assert torch.equal(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    rng_from_files(tensors, meta["rng"])
    assert torch.equal(torch.rand(4), expected_torch) and random.random() == expected_py


def test_adapter_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_adapter(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"not a sora checkpoint \(adapter.json is missing\)"):
        load_adapter(tmp_path)
    full = {"method": "lora", "base_model": "b", "task": {}, "target_modules": ["x"], "modules_to_save": [],
            "modules": {"x": {"r": 2, "s": 1.0, "d_in": 3, "d_out": 1}}, "step": 1}
    tensors = {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(1, 2)}
    save_adapter(tmp_path, tensors, full)
    tensors, meta = load_adapter(tmp_path)
    assert meta["format"] == "sora-adapter" and torch.equal(tensors["x.lora_A"], torch.ones(2, 3))
    (tmp_path / "adapter.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a sora adapter file"):
        load_adapter(tmp_path)
    (tmp_path / "adapter.json").write_text("{")
    with pytest.raises(CheckpointError, match="adapter.json: not valid JSON"):
        load_adapter(tmp_path)
    save_adapter(tmp_path, {"x.lora_A": torch.ones(2, 3)}, full)
    with pytest.raises(CheckpointError, match="tensors of x are missing"):
        load_adapter(tmp_path)
    save_adapter(tmp_path, {"x.lora_A": torch.ones(2, 3), "x.lora_B": torch.ones(1, 2)}, full)
    weights = tmp_path / "adapter.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 4)
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_adapter(tmp_path)
