"""The one distributed seam: a `sora train` under torchrun reaches dist.py only to join the launch, to read which
world it is in, and to leave it; everything else distributed (loading together, rank-0 reads, sharding, batch
slices, gradient sums, sharded evaluation, decisions, checkpoints) goes through the Strategy object.

Measured, not assumed: the two processes run the CLI with a profile hook that records every function of dist.py
entered from code outside the seam (dist.py, strategy.py, fsdp.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from tests.test_ddp import causal_recipe

SEAM = ("sora_cli/dist.py", "sora_cli/strategy.py", "sora_cli/fsdp.py")


def _walk(rank: int, port: int, recipe: str, out: str, record: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sora_cli.cli import app

    entries: set[tuple[str, str]] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.endswith("sora_cli/dist.py"):
            return
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        if not caller.endswith(SEAM):
            entries.add((frame.f_code.co_qualname, caller.split("sora_cli/")[-1]))

    sys.setprofile(profile)
    try:
        app(["train", recipe, "-o", out], standalone_mode=False)
    finally:
        sys.setprofile(None)
    Path(record, f"{rank}.json").write_text(json.dumps(sorted(entries)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_training_run_enters_dist_only_to_join_find_and_leave_the_world(strategy: str, tmp_path: Path,
                                                                         tiny_llama_dir: Path,
                                                                         alpaca_file: Path) -> None:
    """SoRA with dev and test evaluation (greedy generation), checkpoints, best/ and final/: 3 entries into dist.py
    (the CLI's start and stop, the engine's current). Before the seam (commit 129ba84) this walk found 15: the engine
    and evaluation entered it at 12 (on_main, agree, current, World.part, total, sum_gradients, share, broadcast_,
    check_same, gather twice, main), the CLI at 3."""
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, alpaca_file, adapter={"method": "sora"},
                           train={"strategy": strategy, "batch_size": 4, "max_steps": 4, "eval_every": 2,
                                  "save_every": 2})
    recipe.write_text(recipe.read_text().replace("exact_match: false", "exact_match: true"))
    mp.spawn(_walk, args=(free_port(), str(recipe), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    assert (tmp_path / "run" / "final" / "adapter.json").is_file()
    for rank in (0, 1):
        entries = {tuple(e) for e in json.loads((tmp_path / f"{rank}.json").read_text())}
        assert entries == {("start", "cli.py"), ("stop", "cli.py"), ("current", "engine.py")}, (rank, entries)
