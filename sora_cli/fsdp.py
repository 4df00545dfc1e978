"""`train.strategy: fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the frozen base over the processes.

Units: each transformer block (the classes transformers names in `_no_split_modules` that sit in a ModuleList:
Llama's decoder layers, BERT's encoder layers), then a root that holds the whole model and owns what is left (the
embeddings, the final norm, the output head). Each unit's weights are all-gathered for its forward and again for
its backward, and freed after; a process keeps 1/N of them between uses. The adapters, and any head trained in
full, are `ignored_params`: whole on every rank and reduced by the engine as under `ddp` (strategy.py says why).

The root is `Entry`, whose forward runs a function of the model: a task reads the model's pieces (its backbone,
then its head on the labelled positions only), which would bypass the hooks of a root wrapped around the model
itself. Running the whole function inside the root's forward all-gathers the root's weights once around it, and
for training registers FSDP2's end-of-backward work on the loss it returns.

`MixedPrecisionPolicy`: under train.precision: bf16 the blocks' weights are all-gathered and computed in bf16 (their
float32 shards stay); `fsdp_cpu_offload` keeps the shards in CPU memory between uses (CUDA only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from sora_cli import blocks
from sora_cli.dist import World
from sora_cli.errors import InputError
from sora_cli.strategy import Strategy, assemble, shares

T = TypeVar("T")


class Entry(nn.Module):
    """The root unit: `Entry(model)(fn, *args)` is `fn(model, *args)` inside the root's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class FullyShard(Strategy):
    name = "fsdp"

    def __init__(self, world: World, bf16: bool = False, cpu_offload: bool = False):
        super().__init__(world)
        self.bf16, self.cpu_offload = bf16, cpu_offload
        self.root: Entry | None = None

    def check(self, model: nn.Module) -> None:
        transformer_blocks(model)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Shard every block, then the root; the shards go to `device` (or stay in CPU memory with offload), the
        adapters (unsharded) to `device`. The optimizer keeps the adapters' parameter objects."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        blocks = transformer_blocks(model)
        adapters = {p for p in model.parameters() if p.requires_grad}
        for p in adapters:  # ignored parameters are not FSDP2's to move
            p.data = p.data.to(device)
        mesh = init_device_mesh(device.type, (self.world.size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else None, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload,
                        ignored_params=adapters & set(block.parameters()))
        root = Entry(model)
        # the root's inputs are a function and its arguments (integer ids, labels): nothing to cast
        fully_shard(root, mesh=mesh, mp_policy=MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype,
                                                                    cast_forward_inputs=False),
                    offload_policy=offload, ignored_params=adapters)
        self.root = root

    def batch(self, items: Sequence[T]) -> tuple[list[T], bool]:
        """Every rank runs every micro-batch (each forward all-gathers the blocks' weights with the others): a
        rank whose slice is empty runs the micro-batch's first example as a placeholder, weighted 0."""
        mine = self.world.part(items)
        return (mine, False) if mine else (list(items[:1]), True)

    def call(self, model: nn.Module, fn: Callable[..., T], *args: Any) -> T:
        if self.root is None or self.root.model is not model:
            raise RuntimeError("FullyShard.call: the model was not prepared by this strategy")
        return self.root(fn, *args)

    def evaluate(self, task: Any, model: nn.Module, data: Any, ctx: Any) -> dict[str, float]:
        """As under ddp, but every rank predicts as many examples (a rank one short repeats its first, whose row is
        dropped), so all run the same forwards; generation steps until every rank is done."""
        w = self.world
        lists = shares(data.lengths, w.size)
        mine, n = lists[w.rank], max(len(x) for x in lists)
        padded = mine + (mine or lists[0])[:1] * (n - len(mine))
        # generation keeps stepping until every rank is done (each step all-gathers with the others)
        rows = self.call(model, task.predict, task.subset(data, padded), dataclasses.replace(ctx, synced=True))
        return task.score(assemble(w.gather((mine, rows)), len(data)))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards (blocks.py); a model without them is refused."""
    found = blocks.transformer_blocks(model)
    if not found:
        raise InputError(f"train.strategy: fsdp shards a model block by block, but {type(model).__name__} names no "
                         "transformer blocks to shard (transformers' _no_split_modules); use strategy: ddp")
    return found
