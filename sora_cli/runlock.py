"""One writer per run directory: an exclusive lock on `<run>/.lock`, held for the whole run.

The lock is the kernel's (`fcntl.flock`), so it goes with its process: a run killed by any signal, or on a machine
that rebooted, leaves a lock file that nobody holds, and the next run takes it over. The file says who holds it
(process, host, since when), for the one line that refuses a second writer. On NFS, Linux maps flock to the
server's byte-range locks, so two machines sharing a run directory see each other's lock too.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from sora_cli.errors import InputError

LOCK = ".lock"


class RunLock:
    """A held lock on a run directory; `release` (or the process's end) lets it go."""

    def __init__(self, fd: int, path: Path, created: bool = False):
        self.fd, self.path, self.created = fd, path, created

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.release()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Release, and remove the run directory again if taking the lock created it and nothing else was written
        there (a run that fails before writing leaves no directory behind)."""
        self.release()
        folder = self.path.parent
        if self.created and [p.name for p in folder.iterdir()] == [LOCK]:
            self.path.unlink(missing_ok=True)
            folder.rmdir()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = -1


def lock_run(out: Path) -> RunLock:
    """Take `out`'s lock (creating `out` if needed), or raise InputError naming the live process that holds it."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = take(path, out)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return RunLock(fd, path, created)


def take(path: Path, out: Path) -> int:
    """A descriptor of `path` holding its flock, or InputError naming the live process that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"train.output_dir: {out} is in use by {holder(path)}; wait for that run to end, or choose "
                         "another --output-dir") from None
    return fd


def check_unlocked(out: Path) -> None:
    """Raise InputError if a live process holds `out`'s lock (before a run loads anything); writes nothing."""
    path = out / LOCK
    if path.is_file():
        os.close(take(path, out))


def holder(path: Path) -> str:
    """Who the lock file says holds it: "process 123 on host (since 2026-12-06T23:00:00+00:00)"."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    return "another process"
