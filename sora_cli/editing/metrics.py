"""Knowledge-editing metrics, computed as EasyEdit computes them (teacher forcing, not generation).

Feed `prompt + " " + target`; at every target token k take the argmax of the logits at position k − 1. A probe's
score is the fraction of its target tokens predicted correctly (reliability, generalization, portability); locality
is the fraction of positions where the edited model's argmax equals the *unedited* model's (agreement, not
accuracy against the locality answer). Scores are averaged per edit first, then over edits.

Padding never changes a prediction: rows are padded on either side with explicit position ids, so a batched row is
the same computation as the sequence alone (EasyEdit pads on the left without position ids, which shifts positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from sora_cli.tasks.causal_lm import lm_head

PROTOCOL = "easyedit-teacher-forced"  # stored beside every number: not comparable with generation-based scores

Pair = tuple[list[int], list[int]]  # (prompt ids, target ids)


def padded(sequences: Sequence[list[int]], pad_id: int, side: Literal["left", "right"],
           device: torch.device) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Model inputs for (B, T) padded rows with position ids that skip the padding, and each row's offset."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    offsets = [length - len(s) if side == "left" else 0 for s in sequences]
    for row, (s, off) in enumerate(zip(sequences, offsets)):
        ids[row, off: off + len(s)] = torch.tensor(s)
        mask[row, off: off + len(s)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return {k: v.to(device) for k, v in inputs.items()}, offsets


@torch.inference_mode()
def predict(model: Any, pairs: Sequence[Pair], pad_id: int, device: torch.device, batch_size: int = 32,
            side: Literal["left", "right"] = "right") -> list[list[int]]:
    """The argmax token at each target position of each (prompt, target) pair, teacher forced."""
    out: list[list[int]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        inputs, offsets = padded([p + t for p, t in chunk], pad_id, side, device)
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        for row, ((p, t), off) in enumerate(zip(chunk, offsets)):
            at = torch.arange(len(t), device=hidden.device) + off + len(p) - 1  # position k − 1 predicts token k
            out.append(lm_head(model, hidden[row, at]).argmax(-1).tolist())
    return out


def token_accuracy(predicted: list[int], target: list[int]) -> float:
    """Fraction of target tokens predicted (EasyEdit's per-probe `np.mean(np.equal(pred, label))`)."""
    return sum(a == b for a, b in zip(predicted, target)) / max(len(target), 1)


def agreement(after: list[int], before: list[int]) -> float:
    """Locality of one probe: where the edited model's argmax equals the unedited model's."""
    return sum(a == b for a, b in zip(after, before)) / max(len(before), 1)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
