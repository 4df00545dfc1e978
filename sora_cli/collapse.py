"""Noticing a collapsed run: the training loss back at the level of a constant predictor after it was clearly
below it, or a model that answers every example the same.

The chance level is the loss of the best constant predictor on the training labels: the entropy of the label
frequencies for a classifier (ln C when balanced), the labels' variance for a regressor (MSE around their mean).
A causal LM has no such level (its constant predictor depends on the text), so only its predictions are checked.

`LossWatch` reads the loss of each logged window (metrics.jsonl's train events, `train.log_every` steps each):

- *clearly below*: a window's loss at most `BELOW` × chance; a slow start that never gets there is not a collapse;
- *back at chance*: a window's loss at least `BACK` × chance; a collapse is `WINDOWS` such windows in a row after
  the loss was clearly below. A noisy plateau that touches the chance level now and then resets the count.

The step reported is the first step of the first of those windows: where the collapse began.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

BELOW = 0.8  # clearly below: ≤ 80% of the chance loss (ln 2 = 0.693 → 0.555)
BACK = 0.95  # back at chance: ≥ 95% of it (0.658)
WINDOWS = 5  # logged windows in a row at chance (50 steps at log_every 10)


def label_entropy(labels: Sequence[int]) -> float:
    """The cross-entropy of the best constant predictor: −Σ p_c ln p_c over the label frequencies (nats)."""
    counts = Counter(labels)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def label_variance(labels: Sequence[float]) -> float:
    """The MSE of the best constant predictor (the mean): the labels' variance."""
    mean = sum(labels) / len(labels)
    return sum((y - mean) ** 2 for y in labels) / len(labels)


@dataclass
class Collapse:
    step: int  # the first step of the first window back at chance: where the collapse began
    loss: float  # the last window's loss
    chance: float

    def message(self, what_to_try: str) -> str:
        return (f"the training loss has been back at the chance level or above since step {self.step} "
                f"({self.loss:.3f}; a constant prediction scores {self.chance:.3f}), after it was clearly below "
                f"it: the run has collapsed; {what_to_try}")


@dataclass
class LossWatch:
    chance: float
    was_below: bool = False
    run_start: int | None = None  # the first step of the current run of windows at chance
    run_length: int = 0
    fired: bool = False

    def update(self, first: int, loss: float) -> Collapse | None:
        """The window from step `first` on had mean loss `loss`: a Collapse the first time the rule holds, else
        None."""
        if self.chance <= 0 or not math.isfinite(loss) or self.fired:
            return None
        if loss <= BELOW * self.chance:
            self.was_below = True
        if self.was_below and loss >= BACK * self.chance:
            self.run_start = first if self.run_length == 0 else self.run_start
            self.run_length += 1
        else:
            self.run_start, self.run_length = None, 0
        if self.run_length >= WINDOWS and self.run_start is not None:
            self.fired = True
            return Collapse(self.run_start, loss, self.chance)
        return None


def constant(predictions: Sequence[object]) -> bool:
    """Whether every prediction is the same (a class id, an answer text): a constant predictor."""
    return len(predictions) > 1 and len(set(predictions)) == 1
