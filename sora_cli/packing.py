"""Packed training rows (`data.packing`): several causal-LM examples concatenated into one row of at most
`data.max_length` tokens, each attending only to itself.

The plan is made once, before training, by best-fit decreasing (TRL's default packing strategy): examples longest
first (ties by index), each into the row with the least room that still fits it, or a new row. It depends only on
the token lengths, so it is the same on every process and every resume; the engine's `TrainOrder` then shuffles the
rows per epoch like examples, so an epoch is every row once and `--resume` needs nothing but the step.

A row's tensors carry no attention mask: `position_ids` restart at 0 for each example, and transformers (its
`masking_utils`, for eager and SDPA; the varlen path for flash attention) makes the attention block-diagonal
causal from where positions restart. The first token of each example has no label (unpacked, nothing predicts it;
packed, the previous example's last token would). So a packed step's loss and gradients are the unpacked step's
on the same examples: same positions, same attention, same labelled tokens, and the engine divides by the
labelled tokens either way. `check_model` proves it on the model itself before the first step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sora_cli.errors import InputError
from sora_cli.tasks.formats import IGNORE_INDEX, Encoded


def plan_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Example indices per row, best-fit decreasing; every index exactly once, each row's lengths sum ≤ max_length.
    An example longer than max_length (the encoder truncates, so none is) gets a row of its own."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at < len(room):
            free, row = room.pop(at)
            rows[row].append(i)
            bisect.insort(room, (free - lengths[i], row))
        else:
            rows.append([i])
            bisect.insort(room, (max(max_length - lengths[i], 0), len(rows) - 1))
    return [sorted(r) for r in rows]


@dataclass
class PackedData:
    """The training split as packed rows: `examples` (formats.Encoded) and `rows`, example indices per row. Its
    length and indices are rows', so the engine's batch order, epochs and resume work on rows unchanged."""

    examples: list[Encoded]
    rows: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row."""
        return [sum(len(self.examples[i].input_ids) for i in row) for row in self.rows]

    def example_count(self, rows: Sequence[int]) -> int:
        return sum(len(self.rows[r]) for r in rows)

    def unpacked(self, rows: Sequence[int]) -> list[Encoded]:
        """The examples of these rows, in row order (evaluation of a training sample stays unpacked)."""
        return [self.examples[i] for r in rows for i in self.rows[r]]


def pack(examples: list[Encoded], max_length: int) -> PackedData:
    return PackedData(examples, plan_rows([len(e.input_ids) for e in examples], max_length))


def collate_rows(data: PackedData, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids, position_ids and labels of these rows, right-padded to the longest: positions restart
    at 0 with each example (and with the padding, a segment of its own), no label on any example's first token
    or on the padding. No attention_mask: transformers builds the block-diagonal causal mask from the positions."""
    length = max(sum(len(data.examples[i].input_ids) for i in data.rows[r]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        at = 0
        for i in data.rows[r]:
            e = data.examples[i]
            n = len(e.input_ids)
            input_ids[b, at: at + n] = torch.tensor(e.input_ids)
            labels[b, at + 1: at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            positions[b, at: at + n] = torch.arange(n)
            at += n
        positions[b, at:] = torch.arange(length - at)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


@torch.no_grad()
def check_model(model: Any) -> None:
    """Refuse packing where the model's attention would let packed examples see each other: two short sequences
    run packed in one row and each alone must give the same hidden states."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        first, second = torch.tensor([[3, 5, 7, 9]], device=device), torch.tensor([[4, 6, 8]], device=device)
        alone = model.base_model(input_ids=second, use_cache=False).last_hidden_state[0].float()
        packed = model.base_model(input_ids=torch.cat([first, second], 1), use_cache=False,
                                  position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device))
        together = packed.last_hidden_state[0, 4:].float()
    finally:
        model.train(was_training)
    # float32: the two paths differ by summation order only; half precision by its rounding. Attending across the
    # examples instead moves the hidden states by a large fraction of their size.
    tolerance = 1e-3 if packed.last_hidden_state.dtype in (torch.float32, torch.float64) else 5e-2
    if not torch.allclose(together, alone, rtol=0, atol=tolerance * float(alone.abs().max().clamp(min=1e-6))):
        raise InputError(f"data.packing: {type(model).__name__}'s attention does not keep packed examples apart "
                         "(its attention implementation ignores position_ids that restart); set data.packing: false")
