"""The torchrun world: which process this is, how a global batch is cut, and the few collectives the engine needs.

`torchrun --nproc_per_node=N -m sora_cli train recipe.yaml` starts N copies of the command; each reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment. `start` joins them into one process group (NCCL when this process
trains on CUDA, gloo on CPU); without torchrun (or with one process) nothing is initialised and `current()` is the
one-process world, whose collectives are no-ops, so a single process runs exactly the code it always ran.

The data-parallel contract: every process holds the same adapter, optimizer and method state; each takes its slice
of the same global batch; the summed gradients are all-reduced once per optimizer step, after which every process
takes the same step. Only rank 0 touches the run directory: it reads what a resume needs and `share`s it, and it
alone writes. `on_main` and `agree` carry a failure on any process to all of them, so no process is left waiting
in a collective for one that has stopped.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sora_cli.errors import InputError, SharedError, SoraError

T = TypeVar("T")
U = TypeVar("U")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a silent peer (torch's default)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (cuda:LOCAL_RANK under NCCL)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that reads and writes the run directory and draws the progress bar."""
        return self.rank == 0

    def part(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch: slices differ in size by at most one (the first ranks
        take the extra), and a rank may get none when the batch has fewer items than there are ranks."""
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start: start + base + (self.rank < extra)])

    def total(self, value: int) -> int:
        """Σ of `value` over every rank (an example or label-token count)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its Σ over every rank, in place: one all-reduce per dtype (the tensors are
        flattened into one buffer, so many small adapter gradients cost one collective, not one each)."""
        if self.size == 1:
            return
        for group in by_dtype(tensors):
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            dist.all_reduce(flat)
            at = 0
            for t in group:
                t.copy_(flat[at: at + t.numel()].view_as(t))
                at += t.numel()

    def sum_gradients(self, params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of every parameter's `.grad` and of `loss` (a 0-d float64 tensor), returned. A rank without a
        parameter's gradient (it had no examples this step) adds zeros; the gradient stays None only where no rank
        had one, so the optimizer skips exactly what one process would skip."""
        if self.size == 1:
            return loss
        present = torch.tensor([p.grad is not None for p in params] + [0], dtype=torch.float64, device=loss.device)
        present[-1] = loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.sum_([present, *grads])
        for p, g, seen in zip(params, grads, present.tolist()):
            p.grad = g if seen else None
        return present[-1]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def map(self, items: Sequence[T], fn: Callable[[list[T]], list[U]]) -> list[U]:
        """`fn` over every item (fn maps a list to a list of results), each rank taking every size-th item; every
        rank gets all the results, in the items' order."""
        if self.size == 1:
            return fn(list(items))
        mine = list(items[self.rank::self.size])
        parts = self.gather(fn(mine) if mine else [])
        out: list[Any] = [None] * len(items)
        for r, part in enumerate(parts):
            out[r::self.size] = part
        return out

    def share(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others pass anything, usually None)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place (the trainable tensors once at the start, as DDP does)."""
        if self.size == 1:
            return
        for t in tensors:
            buffer = t.detach().to(self.device)
            dist.broadcast(buffer, src=0)
            with torch.no_grad():
                t.copy_(buffer)

    def check_same(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Raise unless every rank holds bit-identical `tensors`: data parallelism's invariant, checked (not
        assumed) at every checkpoint, so a divergence is caught at the step it is saved, not found in a result."""
        if self.size == 1:
            return
        digests = self.gather(digest(tensors))
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            message = (f"{what}: rank(s) {', '.join(map(str, odd))} hold different adapter tensors than rank 0 "
                       "(the processes diverged; this is a bug: please report it with the recipe)")
            raise SoraError(message) if self.main else SharedError(message)


SINGLE = World()
_world = SINGLE


def by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes (flattened first: a 0-dim tensor, such as the budget's cut count, has no byte
    view)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of a torchrun launch stopped (gloo raises a
    plain RuntimeError)."""
    text = str(e)
    if not launched():
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "remote worker", "NCCL")))


def rank() -> int:
    """This process's rank in a torchrun launch (0 without torchrun), known before the group is joined."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def current() -> World:
    return _world


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> World:
    """Join the torchrun launch (once per process): the NCCL group for a CUDA run, each process on
    cuda:LOCAL_RANK; gloo for a CPU run. One process (or no torchrun): nothing to join."""
    global _world
    if not launched() or _world.size > 1:
        return _world
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda:"):
        raise InputError(f"train.device: {device} pins one GPU, but under torchrun each process takes "
                         "cuda:LOCAL_RANK; use auto or cuda")
    if device == "cuda" and not cuda:
        raise InputError("train.device: cuda requested but CUDA is not available; use auto or cpu")
    where = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    # CUDA tensors go over NCCL; pickled objects (metrics rows, RNG states, resume state) over gloo, on the CPU
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    _world = World(rank, size, local, where)
    return _world


def stop() -> None:
    """Leave the process group (at exit, after an error and on Ctrl-C alike)."""
    global _world
    if dist.is_available() and dist.is_initialized():
        # free what still holds the group (FSDP2's sharded modules and their device mesh, kept alive by reference
        # cycles) while it exists: destroyed afterwards, at exit, gloo aborts the process ("terminate called")
        gc.collect()
        dist.destroy_process_group()
    _world = SINGLE


def on_main(fn: Callable[..., T], *args: Any, world: World | None = None) -> T:
    """Run `fn` on rank 0 only (reads of the run directory) and give every rank its result; a failure there is
    raised on every rank (as a SharedError elsewhere, so that only rank 0 prints it)."""
    w = world or current()
    if w.size == 1:
        return fn(*args)
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if w.main:
        try:
            outcome = (True, fn(*args))
        except Exception as e:
            error, outcome = e, (False, summary(e))
    outcome = w.share(outcome)
    if error is not None:
        raise error
    ok, value = outcome
    if not ok:
        raise SharedError(*value)
    return value


def agree(fn: Callable[..., T], *args: Any, world: World | None = None) -> T:
    """Run `fn` on every rank; if it fails on any, raise on all of them (rank 0 prints the first failure, naming the
    rank when it was not rank 0), so a bad input seen by one process stops every process at the same point."""
    w = world or current()
    if w.size == 1:
        return fn(*args)
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn(*args)
    except Exception as e:
        error = e
    failures = w.gather(None if error is None else summary(error))
    first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
    if first is None:
        return result
    who, (message, code) = first
    if w.main and who == 0 and error is not None:
        raise error
    raise SharedError(message if who == 0 else f"rank {who}: {message}", code)


def summary(e: BaseException) -> tuple[str, int]:
    """(the line the CLI prints, the exit code) of a failure, to carry it to the other processes."""
    if isinstance(e, SoraError):
        return str(e), e.exit_code
    return f"{type(e).__name__}: {e}", 1
