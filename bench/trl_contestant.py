"""TRL's SFTTrainer with `packing=True` (PEFT LoRA inside) as a throughput contestant: what a TRL user runs.

It is given the very token ids and labels sora trains on (a pre-tokenized dataset: TRL keeps `input_ids` and
`labels` as they are), so both see the same tokens; TRL then packs them itself (best-fit decreasing, rows of up to
`max_length`, `position_ids` restarting per example, padding-free batches) and computes transformers' own loss
(the LM head at every position). Float32, no gradient checkpointing, AdamW at a constant LR, no logging or saving,
as the other contestants. A pass is one `trainer.train()` over the examples; its time is the sum of the steps'
times (from `on_step_begin` to `on_step_end`), so the trainer's set-up before the first step is not counted.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, TrainerCallback

LABEL = "TRL SFTTrainer packing=True, PEFT LoRA r=8"


def available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


class StepClock(TrainerCallback):
    """The seconds inside the trainer's training steps, and their count."""

    def __init__(self) -> None:
        self.seconds, self.steps, self._t0 = 0.0, 0, 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1


class TrlPass:
    """`run()`: seconds of one pass of TRL's training steps over the examples (sora's encoded CausalData)."""

    def __init__(self, base: PreTrainedModel, tokenizer: Any, targets: list[str], examples: Any, max_length: int,
                 batch_size: int, lr: float, workdir: Path):
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples.examples]
        config = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=batch_size,
                           max_length=max_length, packing=True, packing_strategy="bfd", learning_rate=lr,
                           lr_scheduler_type="constant", warmup_steps=0, num_train_epochs=1, max_grad_norm=1.0,
                           weight_decay=0.0, optim="adamw_torch", gradient_checkpointing=False, bf16=False,
                           fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                           dataloader_num_workers=0, shuffle_dataset=False, seed=0, disable_tqdm=True)
        self.clock = StepClock()
        peft = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
        self.trainer = SFTTrainer(model=copy.deepcopy(base), args=config, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, peft_config=peft, callbacks=[self.clock])

    def __call__(self) -> float:
        before = self.clock.seconds
        self.trainer.train()
        return float(self.clock.seconds - before)
