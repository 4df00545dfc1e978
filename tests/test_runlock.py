"""One writer per run directory: a second `sora train` on a directory a live run holds is refused in one line that
names the holder; the lock of a killed run is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sora_cli.errors import InputError
from sora_cli.recipe import load_recipe
from sora_cli.rundir import check_run_dir
from sora_cli.runlock import LOCK, check_unlocked, lock_run


def sora(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sora_cli", *args], capture_output=True, text=True, timeout=timeout)


def test_a_held_lock_refuses_others_and_a_released_one_is_free(tmp_path: Path, make_recipe: Any) -> None:
    out = tmp_path / "run"
    lock = lock_run(out)
    with pytest.raises(InputError, match=rf"^train.output_dir: {out} is in use by process {os.getpid()} on "
                                         rf"{socket.gethostname()} \(since .+\); wait for that run to end, or "
                                         "choose another --output-dir$"):
        lock_run(out)
    with pytest.raises(InputError, match="is in use by process"):
        check_unlocked(out)
    lock.release()
    check_unlocked(out)
    # a directory holding nothing but a lock is an empty one: a new run may start there
    assert check_run_dir(out, load_recipe(make_recipe()), resume=False, overwrite=False) is False


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path: Path, make_recipe: Any) -> None:
    recipe = make_recipe(train={"max_steps": 100_000, "save_every": 20, "eval_every": None, "log_every": 10})
    out = Path(load_recipe(recipe).train.output_dir or "")
    first = subprocess.Popen([sys.executable, "-m", "sora_cli", "train", str(recipe)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints").is_dir() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        recipe_text = (out / "recipe.yaml").read_text()
        for flag in ("--resume", "--overwrite"):  # --overwrite would have deleted a live run
            p = sora("train", str(recipe), flag, timeout=90)  # refused before loading: seconds
            assert p.returncode == 2
            lines = [line for line in p.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(
                f"error: train.output_dir: {out} is in use by process {first.pid} on {socket.gethostname()} "), lines
            assert (out / "recipe.yaml").read_text() == recipe_text and (out / "checkpoints").is_dir()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / LOCK).is_file()  # left by the killed run, held by nobody
    p = sora("train", str(recipe), "--overwrite", "train.max_steps=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "final").is_dir() and f'"pid": {first.pid}' not in (out / LOCK).read_text()


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path: Path, make_recipe: Any) -> None:
    """Taking the lock creates the run directory; a failure before the run writes anything removes it again (here:
    a schedule's starting checkpoint that does not exist), and a directory that was there before stays."""
    from sora_cli.engine import train
    from sora_cli.errors import SoraError

    recipe = load_recipe(make_recipe(train={"max_steps": 2}))
    out = Path(recipe.train.output_dir or "")
    with pytest.raises(SoraError, match="no-such-checkpoint"):
        train(recipe, init_from=tmp_path / "no-such-checkpoint")
    assert not out.exists()
    out.mkdir(parents=True)
    with pytest.raises(SoraError, match="no-such-checkpoint"):
        train(recipe, init_from=tmp_path / "no-such-checkpoint")
    assert out.is_dir()
