"""Run `sora ARGS` and SIGKILL it just before its N-th write under a directory (tests/test_faults.py).

    python tests/kill_at.py N UNDER COUNT_FILE ARGS...

A write is any file-system call that changes something under UNDER: opening a file to write, os.rename / replace /
unlink / mkdir / rmdir, shutil.rmtree, an fsync, safetensors' save_file, torch.save. N = 0 never kills: the run
finishes and COUNT_FILE gets the name of each write it made, in order (a JSON list), so a test can draw kill points
among them.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main() -> None:
    target, under, count_file, args = int(sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3], sys.argv[4:]
    seen: list[str] = []  # the name of each write so far

    def inside(path: Any) -> bool:
        if isinstance(path, int):  # a file descriptor: an fsync of something this run opened
            return True
        return isinstance(path, (str, Path)) and os.path.realpath(path).startswith(under)

    def watch(fn: Callable[..., Any], writes: Callable[..., bool]) -> Callable[..., Any]:
        def watched(*a: Any, **k: Any) -> Any:
            if writes(*a, **k):
                seen.append(fn.__name__)
                if len(seen) == target:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return watched

    def opens_to_write(file: Any, mode: str = "r", *a: Any, **k: Any) -> bool:
        return any(c in mode for c in "wax+") and inside(file)

    def first_path(path: Any, *a: Any, **k: Any) -> bool:
        return inside(path)

    def existing(path: Any, *a: Any, **k: Any) -> bool:  # removing what is not there changes nothing
        return inside(path) and os.path.lexists(path)

    def either_path(src: Any, dst: Any, *a: Any, **k: Any) -> bool:
        return inside(src) or inside(dst)

    def fsync_of(fd: Any) -> bool:
        return True

    io.open = builtins.open = watch(io.open, opens_to_write)
    os.rename, os.replace = watch(os.rename, either_path), watch(os.replace, either_path)
    os.unlink, os.remove = watch(os.unlink, existing), watch(os.remove, existing)
    os.mkdir, os.rmdir = watch(os.mkdir, first_path), watch(os.rmdir, existing)
    os.fsync = watch(os.fsync, fsync_of)
    shutil.rmtree = watch(shutil.rmtree, existing)

    import safetensors.torch
    import torch

    safetensors.torch.save_file = watch(safetensors.torch.save_file, lambda t, path, *a, **k: inside(path))
    torch.save = watch(torch.save, lambda obj, f, *a, **k: inside(f))

    from sora_cli.cli import main as sora

    sys.argv = ["sora", *args]
    try:
        sora()
    finally:
        Path(count_file).write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
