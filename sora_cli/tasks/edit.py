"""Knowledge editing (data.task_type: edit): rewrite facts in a causal LM, scored as EasyEdit scores them.

The data are edit requests (`editing/requests.py`: EasyEdit, ZsRE or CounterFact files, or packaged:country-edits).
An edit trains on `prompt + " " + target_new` with the loss on the target's tokens only (EasyEdit's LoRA editor);
the tokens of `prompt` alone are the prompt, the rest of the joint tokenization is the target. Loss, batches and the
model class are the causal LM's; the protocol (`editing/run.py`) decides which requests go into which adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from sora_cli.editing.requests import EditRequest, located_requests
from sora_cli.errors import InputError
from sora_cli.recipe import DataConfig
from sora_cli.tasks.causal_lm import CausalData, CausalLMTask
from sora_cli.tasks.formats import IGNORE_INDEX, Encoded
from sora_cli.tasks.task import EncodedSplits

PACKAGED_EDITS = "packaged:country-edits"


def split_ids(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) as EasyEdit splits them: the joint tokens of `prompt + " " + target`, of which
    the first len(tokens of `prompt`) are the prompt (special tokens such as a BOS count as the prompt's)."""
    full = tokenizer(f"{prompt} {target}")["input_ids"]
    n = len(tokenizer(prompt)["input_ids"])
    return list(full[:n]), list(full[n:])


def edit_example(tokenizer: Any, request: EditRequest, max_length: int, where: str) -> Encoded:
    """The training example of one request: loss on target_new's tokens only; the prompt is cut from the left."""
    prompt, target = split_ids(tokenizer, request.prompt, request.target_new)
    if not target:
        raise InputError(f"{where}: target_new {request.target_new!r} adds no token after the prompt; fix the record")
    if len(target) >= max_length:
        raise InputError(f"{where}: target_new is {len(target)} tokens, data.max_length is {max_length}; "
                         "raise data.max_length")
    prompt = prompt[-(max_length - len(target)):]
    return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target, prompt, request.target_new)


class EditTask(CausalLMTask):
    name = "edit"
    scores_base = False  # the editing protocol scores the unedited model itself (pre-edit numbers, locality)

    def __init__(self, data: DataConfig):
        super().__init__(data)
        self.requests: list[EditRequest] = []
        self.request_places: list[str] = []  # where each request is in its file (error messages)

    def load_data(self) -> None:
        if self.data.train_file is not None:
            self.requests, self.request_places = located_requests(self.data.train_file)
        else:
            from sora_cli.editing.countries import country_edits

            self.requests = country_edits()
            self.request_places = [f"{PACKAGED_EDITS} record {i}" for i in range(len(self.requests))]
        if self.data.max_train_samples is not None:  # the first N requests
            self.requests = self.requests[: self.data.max_train_samples]
            self.request_places = self.request_places[: self.data.max_train_samples]

    def source(self) -> str:
        return self.data.train_file or PACKAGED_EDITS

    def train_size(self) -> int:
        return len(self.requests)

    def fingerprint(self) -> str:
        text = json.dumps([asdict(r) for r in self.requests], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def encode(self, tokenizer: Any, max_length: int) -> EncodedSplits:
        """Every request's training example, in file order (dev and test: none; the protocol scores the edits)."""
        examples = [edit_example(tokenizer, r, max_length, where)
                    for r, where in zip(self.requests, self.request_places, strict=True)]
        return EncodedSplits(CausalData(examples), None, None)

    def metric(self, metric_for_best: str | None) -> str:
        if metric_for_best is not None:
            raise InputError("train.metric_for_best: an edit task keeps no best checkpoint; remove it")
        return "reliability"

    def meta(self) -> dict[str, Any]:
        return {"type": "edit", "source": self.source(), "edits": len(self.requests)}
