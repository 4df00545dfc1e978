"""Errors the CLI turns into one red line and an exit code (no traceback unless --debug)."""

from __future__ import annotations

import errno


class SoraError(Exception):
    """A failure the user can act on. `exit_code` 1: the run failed; 2: the input was wrong."""

    exit_code = 1


class InputError(SoraError):
    """Bad input (a file, a path, an option): nothing was started or written."""

    exit_code = 2


class RecipeError(InputError):
    """Every problem found in a recipe, each as `field.path: what is wrong`."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            message = f"{source}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(message)


class DivergedError(SoraError):
    """Training produced a non-finite loss or gradient (train.on_nonfinite): the run stopped, nothing of it applied."""


class CollapseError(SoraError):
    """The training loss came back to the chance level (train.on_collapse: stop): the run stopped."""


class CheckpointError(SoraError):
    """A checkpoint or run directory that is missing, incomplete or inconsistent."""

    exit_code = 2


class SharedError(SoraError):
    """A failure on one process of a torchrun launch, carried to every other (dist.on_main, dist.agree): each stops
    with the same exit code, and only rank 0 prints it."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class DiskFullError(SoraError):
    """A write failed for want of space (ENOSPC, a quota, a file-size limit): what was being written is dropped,
    everything written before stays whole."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# safetensors (Rust) reports the same failures in its own words
_FULL_WORDS = {"No space left": "no space left on device", "StorageFull": "no space left on device",
               "File too large": "file too large", "FileTooLarge": "file too large",
               "Disk quota": "disk quota exceeded", "QuotaExceeded": "disk quota exceeded"}


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for want of space."""
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    return any(word in str(e) for word in _FULL_WORDS)


def full_disk(target: object, e: BaseException) -> DiskFullError:
    """The one line for a write of `target` that ran out of space."""
    text = str(e)
    why = next((said for word, said in _FULL_WORDS.items() if word in text), "no space left on device")
    return DiskFullError(f"{target}: not written, the disk is full ({why}); free space and run again (--resume "
                         "continues a training run from its last checkpoint, which is whole)")


def plural(n: int, noun: str) -> str:
    """`1 step`, `4 steps`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
