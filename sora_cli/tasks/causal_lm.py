"""Causal-LM fine-tuning (instructions, chats, plain text) with the loss on the response only.

Records become token ids and labels in `formats.py`. The loss of a step is Σ cross-entropy over the labelled tokens
divided by the number of labelled tokens in the whole step (the engine divides): gradient accumulation changes
nothing. The LM head is applied only where a label exists (`selected_logits`): on a one-word answer after a
90-token prompt that is a few positions instead of all of them, and the vocabulary is the widest matrix of a small LM.

Evaluation (`evaluate`), all over response tokens:
- loss and perplexity (exp of the mean loss), teacher-forced token accuracy (argmax at each labelled position);
- exact match of greedy generation (batched, left-padded) against the reference, after `normalize_answer`;
- with data.choices, accuracy by the choices' summed log-likelihoods after the prompt (lm-evaluation-harness's
  `acc` for multiple choice); the reference must be one of the choices.

A collapsed LM (collapse.py) is marked `constant_predictor: 1`: every generated answer the same after normalisation,
every one a single token repeated ("the the the"), or the same choice picked for every example.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sora_cli import collapse, packing, render
from sora_cli.data import eval_order, load_raw, split_fractions, split_indices
from sora_cli.errors import InputError
from sora_cli.recipe import DataConfig
from sora_cli.tasks.formats import IGNORE_INDEX, Encoded, FormatFields, detect_format, encode_record
from sora_cli.tasks.task import EncodedSplits, EvalContext, Rows, Task

Records = list[dict[str, Any]]
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "choice_accuracy")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and the articles a / an / the, squeeze spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@dataclass
class CausalData:
    """An encoded split: its examples (formats.Encoded)."""

    examples: list[Encoded]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


def collate(data: CausalData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T_batch) input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    length = max(len(data.examples[i].input_ids) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        e = data.examples[i]
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def answer_id(normalized: str) -> int:
    """A normalised answer (`normalize_answer`'s) as a number (int64), so that answers gather across ranks with the
    other rows."""
    return int.from_bytes(hashlib.sha256(normalized.encode()).digest()[:8], "little", signed=True)


def left_padded(sequences: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """(B, T) prompts padded on the left, so that every row's next token is generated at the same position."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, length - len(s):] = torch.tensor(s)
        mask[row, length - len(s):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Where generation stops: the model's own end tokens (a chat model's end-of-turn among them) and the EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys([*ids, tokenizer.eos_token_id]))


def selected_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V), target ids (N,)) at the N positions whose next token is a target (!= IGNORE_INDEX).

    `targets` (B, T) is aligned with `input_ids` (the label of token t is targets[:, t]); the prediction for token t
    is read at position t - 1. The decoder runs once; the LM head only on the N selected positions. Packed rows
    (packing.py) give position_ids and no attention_mask.
    """
    # no KV cache: transformers would otherwise keep every block's keys and values until the forward returns
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, T, H)
    return labelled_logits(model, hidden, targets)


def labelled_logits(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V), target ids (N,)) from the decoder's hidden states (B, T, H) at the labelled positions."""
    shifted = targets[:, 1:]  # (B, T-1): what position t predicts
    keep = shifted != IGNORE_INDEX
    return lm_head(model, hidden[:, :-1][keep]), shifted[keep]  # (N, V), (N,)


def lm_head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) of hidden states (..., H), as the model's own forward makes them (the output scalings that
    transformers' causal LMs apply after the head: Granite's logits_scaling, Cohere's logit_scale, Gemma 2's cap)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "model_type", "").startswith("granite") and getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "model_type", "").startswith("cohere") and getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 squashes its logits; the loss must see what generation sees
        logits = cap * torch.tanh(logits / cap)
    return logits


class CausalLMTask(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    task_heads = ()  # the LM head is pre-trained: nothing is trained in full unless modules_to_save says so
    scores_base = True  # the zero-shot numbers on the same prompts, beside the fine-tuned ones

    def __init__(self, data: DataConfig):
        super().__init__(data)
        self.records: dict[str, Records] = {}
        self.places: dict[str, list[str]] = {}  # split -> where each record is in its file (error messages)
        self.format: str = data.format
        self.fields = FormatFields(prompt=data.prompt_field, completion=data.completion_field)

    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    # -- data

    def load_data(self) -> None:
        raw = load_raw(self.data)
        splits = {name: (_rows(columns), raw.places[name]) for name, columns in raw.columns.items()}
        source = (f"data.train_file: {self.data.train_file}" if self.data.train_file
                  else f"data.dataset: {self.data.dataset}")
        self.format = (detect_format(list(raw.columns["train"]), self.fields, source) if self.data.format == "auto"
                       else self.data.format)
        if "validation" not in splits:
            parts = split_indices(len(splits["train"][0]), split_fractions(self.data.split, "test" in splits),
                                  self.data.split_seed)
            rows, places = splits["train"]
            for name, part in zip(("train", "validation", "test"), parts, strict=False):
                splits[name] = ([rows[i] for i in part], [places[i] for i in part])
        caps = {"train": self.data.max_train_samples, "validation": self.data.max_eval_samples,
                "test": self.data.max_eval_samples}
        cut = {name: (rows[: caps[name]], places[: caps[name]]) if caps[name] else (rows, places)
               for name, (rows, places) in splits.items()}
        self.records = {name: rows for name, (rows, _) in cut.items()}
        self.places = {name: places for name, (_, places) in cut.items()}

    def train_size(self) -> int:
        return len(self.records["train"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.records["train"], sort_keys=True, default=str).encode()).hexdigest()

    def encode(self, tokenizer: Any, max_length: int) -> EncodedSplits:
        names = {"train": "train", "validation": "dev", "test": "test"}
        out = {name: self._encode_split(name, names[name], tokenizer, max_length) if name in self.records else None
               for name in names}
        train: CausalData | packing.PackedData | None = out["train"]
        if self.data.packing and isinstance(train, CausalData):
            train = packing.pack(train.examples, max_length)
        return EncodedSplits(train, out["validation"], out["test"])

    def _encode_split(self, split: str, label: str, tokenizer: Any, max_length: int) -> CausalData:
        data = CausalData([])
        evaluated = split != "train"  # scored over the response only, whatever train_on_prompt says
        for record, where in zip(self.records[split], self.places[split], strict=True):
            e = encode_record(record, self.format, tokenizer, fields=self.fields, chat_template=self.data.chat_template,
                              train_on_prompt=self.data.train_on_prompt and not evaluated, max_length=max_length,
                              where=where)
            if e is not None and evaluated:
                self._check_evaluable(e, where)
            if e is not None:
                data.examples.append(e)
        dropped = len(self.records[split]) - len(data)
        if dropped and not data.examples:
            raise InputError(f"data.max_length: every {label} example's response is longer than {max_length} "
                             "tokens; raise data.max_length")
        if dropped:
            render.note(f"dropped {dropped:,d} of {len(self.records[split]):,d} {label} examples whose response "
                        f"alone is longer than data.max_length={max_length}")
        return data

    def _check_evaluable(self, e: Encoded, where: str) -> None:
        """Generation and choice scoring start from the prompt: it must exist, and the reference be a choice."""
        if (self.generates or self.data.choices) and not e.prompt_ids:
            raise InputError(f"{where}: the prompt is empty (or cut away by data.max_length), so there is nothing "
                             "to generate or score choices from; fix the record or raise data.max_length")
        if self.data.choices and e.reference not in self.data.choices:
            raise InputError(f"{where}: the reference {e.reference!r} is not one of data.choices "
                             f"{list(self.data.choices)}; fix the record or data.choices")

    @property
    def generates(self) -> bool:
        """Whether evaluation generates and scores exact match (text records have no prompt / reference)."""
        return self.data.exact_match and self.format != "text"

    def collate(self, data: CausalData | packing.PackedData, indices: list[int],
                pad_id: int) -> dict[str, torch.Tensor]:
        if isinstance(data, packing.PackedData):
            return packing.collate_rows(data, indices, pad_id)
        return collate(data, indices, pad_id)

    def subset(self, data: CausalData | packing.PackedData, indices: list[int]) -> CausalData:
        """The examples at `indices` (of packed training rows: the rows' examples, unpacked, for evaluation)."""
        if isinstance(data, packing.PackedData):
            return CausalData(data.unpacked(indices))
        return CausalData([data.examples[i] for i in indices])

    def example_count(self, data: Any, indices: list[int]) -> int:
        return data.example_count(indices) if isinstance(data, packing.PackedData) else len(indices)

    # -- loss

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ cross-entropy over the labelled tokens; a packed batch (position_ids, no attention_mask) as well."""
        logits, targets = selected_logits(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                          batch.get("position_ids"))
        if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in float32 at least (float64 stays)
            logits = logits.float()
        return F.cross_entropy(logits, targets, reduction="sum")

    # -- evaluation

    @torch.inference_mode()
    def predict(self, model: Any, data: CausalData, ctx: EvalContext) -> Rows:
        """Per example, in the data's order: the response's summed token loss (float64), its tokens and the tokens
        predicted right (teacher-forced); with exact_match, whether the greedy answer matched; with choices, whether
        the likeliest choice is the reference."""
        n, pad = len(data), ctx.tokenizer.pad_token_id
        rows = {"loss": np.zeros(n), "correct": np.zeros(n), "tokens": np.zeros(n), "exact": np.zeros(n),
                "chosen": np.zeros(n), "answer": np.zeros(n, dtype=np.int64), "repeated": np.zeros(n),
                "pick": np.zeros(n)}
        single = self._single_token_choices(ctx.tokenizer)
        for indices in eval_order(data.lengths, ctx.batch_size):
            batch = {k: v.to(ctx.device) for k, v in collate(data, indices, pad).items()}
            examples = [data.examples[i] for i in indices]
            with ctx.autocast:  # one decoder pass: the response's logits, and the next-token logits after the prompt
                hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).last_hidden_state  # (B, T, H)
                logits, targets = labelled_logits(model, hidden, batch["labels"])  # (N, V), (N,)
            owner = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0].cpu()  # (N,): each target's row
            at = torch.tensor(indices)[owner].numpy()
            np.add.at(rows["loss"], at, F.cross_entropy(logits.float(), targets, reduction="none").double().cpu())
            np.add.at(rows["correct"], at, (logits.argmax(-1) == targets).double().cpu())
            np.add.at(rows["tokens"], at, 1.0)
            if self.generates:
                rows["exact"][indices], rows["answer"][indices], rows["repeated"][indices] = self._generate(
                    model, examples, ctx)
            if single is not None:  # one-token answers: their likelihoods are the next-token logits after the prompt
                ends = torch.tensor([len(e.prompt_ids) - 1 for e in examples], device=hidden.device)
                with ctx.autocast:
                    first = lm_head(model, hidden[torch.arange(len(examples), device=hidden.device), ends])  # (B, V)
                rows["pick"][indices] = first.float()[:, single].argmax(-1).cpu().numpy()
            elif self.data.choices:
                rows["pick"][indices] = self._choose(model, examples, ctx)
            if self.data.choices:
                names, picks = self.choice_names(), rows["pick"][indices]
                rows["chosen"][indices] = [names[int(k)] == e.reference for k, e in zip(picks, examples)]
        return rows

    def score(self, rows: Rows) -> dict[str, float]:
        tokens, n = max(float(rows["tokens"].sum()), 1.0), len(rows["tokens"])
        metrics = {"loss": float(rows["loss"].sum()) / tokens, "token_accuracy": float(rows["correct"].sum()) / tokens}
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
        if self.generates:
            metrics["exact_match"] = float(rows["exact"].sum()) / max(n, 1)
        if self.data.choices:
            metrics["choice_accuracy"] = float(rows["chosen"].sum()) / n
        if self.constant(rows):
            metrics["constant_predictor"] = 1.0
        return metrics

    def constant(self, rows: Rows) -> bool:
        """Whether the model answers every example alike: one generated answer (or a token repeated in each), or one
        choice."""
        if self.generates and (collapse.constant(rows["answer"].tolist()) or
                               (len(rows["repeated"]) > 1 and bool(rows["repeated"].all()))):
            return True
        return bool(self.data.choices) and collapse.constant(rows["pick"].tolist())

    def _generate(self, model: Any, examples: list[Encoded], ctx: EvalContext) -> tuple[list[bool], list[int],
                                                                                        list[bool]]:
        """Greedy generation from each prompt (batched, left-padded): per example, exact match after normalisation,
        the normalised answer's id (answer_id) and whether it is one token repeated."""
        tok, stops = ctx.tokenizer, stop_ids(model, ctx.tokenizer)
        inputs = left_padded([e.prompt_ids for e in examples], tok.pad_token_id, ctx.device)
        with ctx.autocast:
            out = model.generate(**inputs, max_new_tokens=self.data.max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=stops,
                                 temperature=None, top_p=None, top_k=None, synced_gpus=ctx.synced)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()  # (B, new tokens), padded after a row's stop
        answers = [normalize_answer(a) for a in tok.batch_decode(new, skip_special_tokens=True)]
        ends = set(stops) | {tok.pad_token_id}
        repeated = [len(ids) > 1 and len(set(ids)) == 1 for ids in ([t for t in row if t not in ends]
                                                                  for row in new.tolist())]
        return ([a == normalize_answer(e.reference) for a, e in zip(answers, examples)],
                [answer_id(a) for a in answers], repeated)

    def choice_names(self) -> list[str]:
        return list(self.data.choices or ())

    def _single_token_choices(self, tokenizer: Any) -> list[int] | None:
        """The token id of each choice when every choice is one token (the usual labels), else None."""
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in self.choice_names()]
        return [i[0] for i in ids] if ids and all(len(i) == 1 for i in ids) else None

    def _choose(self, model: nn.Module, examples: list[Encoded], ctx: EvalContext) -> list[int]:
        """The index of the choice with the highest summed log-likelihood after each prompt; one forward over B × C
        rows."""
        choices = self.choice_names()
        tok = ctx.tokenizer
        continuations = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        rows = [e.prompt_ids + c for e in examples for c in continuations]
        targets = [[IGNORE_INDEX] * len(e.prompt_ids) + c for e in examples for c in continuations]
        batch = collate(CausalData([Encoded(r, t, [], "") for r, t in zip(rows, targets)]),
                        list(range(len(rows))), tok.pad_token_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with ctx.autocast:
            logits, picked = selected_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logp = torch.log_softmax(logits.float(), -1).gather(1, picked[:, None]).squeeze(1)  # (N,)
        owner = torch.repeat_interleave(torch.tensor([len(c) for c in continuations] * len(examples)))
        scores = torch.zeros(len(rows), dtype=logp.dtype).index_add_(0, owner, logp.cpu()).view(len(examples), -1)
        return [int(s.argmax()) for s in scores]

    def metric(self, metric_for_best: str | None) -> str:
        if metric_for_best is not None and metric_for_best not in METRICS:
            raise InputError(f"train.metric_for_best: {metric_for_best!r} is not a causal_lm metric; use one of "
                             f"{', '.join(METRICS)}")
        if metric_for_best in ("exact_match", "choice_accuracy") and not (
                self.generates if metric_for_best == "exact_match" else self.data.choices):
            raise InputError(f"train.metric_for_best: {metric_for_best} is not computed with this data section "
                             "(exact match needs data.exact_match and a format with prompts; choice accuracy needs "
                             "data.choices); use loss or token_accuracy")
        return metric_for_best or "loss"

    def greater_is_better(self, metric: str) -> bool:
        return metric not in ("loss", "perplexity")

    # -- checkpoints

    def meta(self) -> dict[str, Any]:
        return {"type": "causal_lm", "format": self.format, "chat_template": self.data.chat_template,
                "train_on_prompt": self.data.train_on_prompt}

    @classmethod
    def from_meta(cls, block: dict[str, Any], data: DataConfig) -> CausalLMTask:
        return cls(data)


def _rows(columns: dict[str, list[Any]]) -> Records:
    """Column dict -> records (one dict per example)."""
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]
