"""How a run is spread over torchrun's processes: the one object the engine asks, at a few named points.

    load      every rank builds the run; a failure on any rank stops all of them there
    main      rank 0 alone reads the run directory; every rank gets what it read
    prepare   place the model: move it to the device (one process, DDP), or shard its frozen base (FSDP2) first;
              then every rank starts from rank 0's trainable tensors and draws its own dropout masks
    batch     this rank's slice of a global micro-batch
    call      run the model (a task's loss, its predictions): under FSDP2 through the root of the sharded model
    reduce    Σ over the ranks of the step's count, and of the adapters' gradients and loss (before a method's hooks)
    evaluate  each rank predicts its share of a split; every rank scores the gathered rows
    decide    rank 0's decision (a new best, an early stop) on every rank
    save      check that the ranks hold the same adapter, gather their RNG states; rank 0 writes

Three strategies. One process: every point is the plain operation. `ddp` (data-parallel): every process holds the
whole model; the adapters' summed gradients are all-reduced once per optimizer step. `fsdp`: FSDP2's `fully_shard`
shards the frozen base over the processes (each transformer block, then the root), all-gathering each block's
weights for its forward and backward; the adapters (and any head trained in full) are not sharded: they stay whole
on every rank (`ignored_params`) and are reduced exactly as under `ddp`. So SoRA's proximal step, RoseLoRA's
per-row and per-column top-k and every gate or mask see whole tensors, the same code as one process, and a
checkpoint is the same file whatever the strategy. The adapters are ≤ 1-2% of a model's parameters; their
weights, gradients and optimizer state are what every rank keeps whole (see `sora plan --strategy fsdp`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from sora_cli.dist import SINGLE, World, agree, on_main
from sora_cli.errors import InputError
from sora_cli.recipe import TrainConfig

T = TypeVar("T")
Rows = dict[str, np.ndarray]


class Strategy:
    """One process, or data-parallel (`ddp`) over torchrun's processes: the collectives of `World`, which are
    no-ops in one process, so a single process runs exactly the code it always ran."""

    name: ClassVar[str] = "ddp"

    def __init__(self, world: World = SINGLE):
        self.world = world

    @property
    def label(self) -> str:
        """How the run is spread, for the start-of-run line."""
        return "one process" if self.world.size == 1 else f"{self.name} over {self.world.size} processes"

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 alone)."""
        return self.world.main

    def check(self, model: nn.Module) -> None:
        """Raise (an InputError) if the strategy cannot spread this model; before anything collective."""

    def load(self, fn: Callable[..., T], *args: Any) -> T:
        return agree(fn, *args, world=self.world)

    def main(self, fn: Callable[..., T], *args: Any) -> T:
        return on_main(fn, *args, world=self.world)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Place the model on its device (the optimizer holds the same parameter objects afterwards)."""
        model.to(device)

    def synchronise(self, params: Sequence[nn.Parameter], seed: int) -> None:
        """Every rank starts from rank 0's trainable tensors (as DDP does), and ranks 1.. draw their own dropout
        masks from here on. Nothing in one process."""
        if self.world.size == 1:
            return
        self.world.broadcast_(params)
        if not self.world.main:
            torch.manual_seed(rank_seed(seed, self.world.rank))

    def batch(self, items: Sequence[T]) -> tuple[list[T], bool]:
        """(this rank's slice of a global micro-batch, whether it is a placeholder): a rank whose slice is empty
        skips the micro-batch (it has nothing to compute)."""
        return self.world.part(items), False

    def call(self, model: nn.Module, fn: Callable[..., T], *args: Any) -> T:
        """`fn(model, *args)`: a task's loss or predictions."""
        return fn(model, *args)

    def total(self, value: int) -> int:
        return self.world.total(value)

    def reduce(self, params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        return self.world.sum_gradients(params, loss)

    def evaluate(self, task: Any, model: nn.Module, data: Any, ctx: Any) -> dict[str, float]:
        """The task's metrics on `data`. Under torchrun each rank predicts every world.size-th example of the
        length-sorted order (so all ranks pad alike and finish together); the rows are gathered and every rank
        scores the whole split, so all of them hold the same metrics."""
        w = self.world
        if w.size == 1:
            return task.score(self.call(model, task.predict, data, ctx))
        mine = shares(data.lengths, w.size)[w.rank]
        parts = w.gather((mine, self.call(model, task.predict, task.subset(data, mine), ctx) if mine else None))
        return task.score(assemble(parts, len(data)))

    def decide(self, value: T) -> T:
        return self.world.share(value)

    def save(self, directory: Path, tensors: dict[str, torch.Tensor], gather_rng: bool,
             write: Callable[[list[dict[str, torch.Tensor]]], None]) -> None:
        """Raise unless every rank holds these `tensors` (the adapter and the method's state); gather every rank's
        RNG state when `gather_rng`; rank 0 calls `write(the ranks' RNG states)`."""
        from sora_cli.checkpoint import process_rng

        self.world.check_same(tensors, str(directory))
        ranks = self.world.gather(process_rng()) if gather_rng and self.world.size > 1 else []
        if self.world.main:
            write(ranks)


ONE = Strategy()


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of torchrun rank `rank` > 0 from the start of training: its own dropout draws (rank 0 keeps
    the one-process stream, so one process is exactly what it always was)."""
    return seed * 1_000_003 + rank


def shares(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Each rank's examples of a split: every size-th of the length-sorted order (so the ranks pad alike)."""
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [by_length[r::size] for r in range(size)]


def assemble(parts: list[tuple[list[int], Rows | None]], n: int) -> Rows:
    """One split's rows from each rank's (example positions, rows of those examples)."""
    filled = [(at, rows) for at, rows in parts if rows is not None]
    out = {key: np.empty((n, *value.shape[1:]), dtype=value.dtype) for key, value in filled[0][1].items()}
    for at, rows in filled:
        for key, value in rows.items():
            out[key][at] = value[: len(at)]
    return out


def choose(cfg: TrainConfig, world: World) -> Strategy:
    """The strategy `train.strategy` names for this launch (`auto`, `ddp`: data-parallel under torchrun)."""
    if cfg.strategy == "fsdp":
        if world.size == 1:
            raise InputError("train.strategy: fsdp shards the model over torchrun's processes, but this is one "
                             "process; launch it with torchrun --nproc_per_node=N (N >= 2), or use strategy: auto")
        from sora_cli.fsdp import FullyShard

        return FullyShard(world, bf16=cfg.precision == "bf16", cpu_offload=cfg.fsdp_cpu_offload)
    return Strategy(world)
