"""Supervised fine-tuning formats: instruction / chat / plain-text records -> token ids with response-only labels.

Pure (lists of ints, no torch): what TRL's SFTTrainer and LLaMA-Factory do before batching. Record columns, by
format (the names are FormatFields' defaults and can be renamed):

    alpaca             instruction, output, input (optional: missing, null or "" = no input)
    prompt_completion  prompt, completion
    chat               messages: [{"role": "system" | "user" | "assistant", "content": "..."}, ...]
    text               text

The default alpaca prompt (Stanford Alpaca's template; used unless data.chat_template is set). Without an input:

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:
    {output}<eos>

With an input (the first paragraph is one line, wrapped here):

    Below is an instruction that describes a task, paired with an input that provides further context.
    Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}<eos>

The prompt ends with "### Response:" and a newline; the response follows it, then the tokenizer's EOS token.
prompt_completion puts the completion right after the prompt (no separator), then EOS. With data.chat_template,
both become a user turn (alpaca: instruction, a newline and the input) and an assistant turn rendered by the
tokenizer's chat template, like chat records; the template's end-of-turn markup then ends the response.

Labels: -100 (no loss) on the prompt, the response's token ids on the response (its EOS or end-of-turn markup
included, so the model learns to stop); with train_on_prompt every token is labelled; text is labelled throughout.
Chat: loss on every assistant turn, not on the system prompt, the user turns or the template's assistant header.

Length: a sequence longer than max_length keeps its (last) response whole and loses its oldest tokens (the start of
the prompt, or of the conversation); a record whose last response alone is longer than max_length is dropped
(encode_record returns None). text is cut on the right instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sora_cli.errors import InputError

FORMATS = ("alpaca", "prompt_completion", "chat", "text")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label of a token without loss (ignore_index of torch's cross_entropy)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Segment = tuple[list[int], bool]  # token ids, and whether they are response tokens (labelled)


@dataclass(frozen=True)
class FormatFields:
    """Column names of each format (configurable by the recipe)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"

    def required(self) -> dict[str, tuple[str, ...]]:
        """Format -> the columns it needs, in detection order (alpaca's input is optional)."""
        return {"alpaca": (self.instruction, self.output), "prompt_completion": (self.prompt, self.completion),
                "chat": (self.messages,), "text": (self.text,)}


@dataclass(frozen=True)
class Encoded:
    """One example. input_ids and labels have the same length; prompt_ids is a prefix of input_ids."""

    input_ids: list[int]  # prompt + response tokens: the whole training sequence
    labels: list[int]  # the token id where there is loss, IGNORE_INDEX elsewhere
    prompt_ids: list[int]  # what a model is given to generate the (last) response: for generation-based eval
    reference: str  # the (last) response text, verbatim, for exact match ("" for text)


def detect_format(columns: list[str], fields: FormatFields, source: str = "data") -> str:
    """The first format (in FORMATS order) whose columns are all present (`source` names the data in errors)."""
    for fmt, needed in fields.required().items():
        if all(name in columns for name in needed):
            return fmt
    needs = "; ".join(f"{fmt} needs {' + '.join(needed)}" for fmt, needed in fields.required().items())
    found = ", ".join(columns) if columns else "none"
    raise InputError(f"{source}: no known format in the columns found ({found}): {needs} (alpaca's {fields.input} "
                     "is optional); rename the columns, or set the field names and data.format in the recipe")


def default_prompt(instruction: str, input: str) -> str:
    """Stanford Alpaca's prompt (see the module docstring); an empty input selects the variant without it."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def encode_record(record: dict[str, Any], fmt: str, tokenizer: Any, *, fields: FormatFields, chat_template: bool,
                  train_on_prompt: bool, max_length: int, where: str) -> Encoded | None:
    """Token ids and labels of one record; None = dropped (its last response alone is longer than max_length).

    `where` (e.g. 'data/train.jsonl record 12') starts every error message.
    """
    if fmt not in FORMATS:
        raise InputError(f"data.format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "text":
        text = _string(record, fields.text, _needs(fmt, fields), where, blank="empty text")
        return _encode_text(text, tokenizer, max_length, where)
    if fmt == "chat":
        _require_template(tokenizer, f"{where}: data.format: chat needs the tokenizer's chat template and this "
                          "tokenizer has none; use a model whose tokenizer has a chat template, or convert the data "
                          "to alpaca or prompt_completion and leave data.chat_template off")
        messages = _messages(record, fields.messages, where)
    else:
        prompt, user, response = _prompt_response(record, fmt, fields, where)
        if not chat_template:
            # The prompt gets the tokenizer's own special tokens (a BOS once, at the start); the response none.
            segments = [(_encode(tokenizer, prompt, special=True), False),
                        (_encode(tokenizer, response, special=False) + [_eos_id(tokenizer, where)], True)]
            return _assemble(segments, train_on_prompt, max_length, response)
        _require_template(tokenizer, f"{where}: data.chat_template is on but the tokenizer has no chat template; "
                          "turn it off (plain prompts: the default alpaca template, or the prompt as is) or use a "
                          "model whose tokenizer has one")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    segments = _chat_segments(messages, tokenizer, fields.messages, where)
    return _assemble(segments, train_on_prompt, max_length, messages[-1]["content"])


def _prompt_response(record: dict[str, Any], fmt: str, fields: FormatFields, where: str) -> tuple[str, str, str]:
    """alpaca / prompt_completion -> (prompt without a chat template, user message with one, response)."""
    needs = _needs(fmt, fields)
    if fmt == "alpaca":
        instruction = _string(record, fields.instruction, needs, where)
        extra = _optional_string(record, fields.input, where)
        response = _string(record, fields.output, needs, where, blank="empty response")
        user = f"{instruction}\n{extra}" if extra else instruction  # LLaMA-Factory's join
        return default_prompt(instruction, extra), user, response
    prompt = _string(record, fields.prompt, needs, where)
    return prompt, prompt, _string(record, fields.completion, needs, where, blank="empty response")


# ---------------------------------------------------------------------------------------------
# Token ids and labels


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def _eos_id(tokenizer: Any, where: str) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise InputError(f"{where}: the tokenizer has no EOS token (eos_token), needed to end each response; use a "
                         "model whose tokenizer defines one")
    return int(eos)


def _encode_text(text: str, tokenizer: Any, max_length: int, where: str) -> Encoded:
    """Plain text: loss on every token, EOS appended, cut on the right."""
    ids = (_encode(tokenizer, text, special=True) + [_eos_id(tokenizer, where)])[:max_length]
    return Encoded(input_ids=ids, labels=list(ids), prompt_ids=[], reference="")


def _assemble(segments: list[Segment], train_on_prompt: bool, max_length: int, reference: str) -> Encoded | None:
    """Concatenate prompt / response segments (the last one is the last response) and cut to max_length.

    The oldest tokens go first, whatever their label; None if the last response alone does not fit, or if
    nothing labelled is left.
    """
    last = segments[-1][0]
    if len(last) > max_length:
        return None
    input_ids = [token for ids, _ in segments for token in ids]
    labels = [token if labelled or train_on_prompt else IGNORE_INDEX for ids, labelled in segments for token in ids]
    cut = max(0, len(input_ids) - max_length)
    input_ids, labels = input_ids[cut:], labels[cut:]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(input_ids=input_ids, labels=labels, prompt_ids=input_ids[:len(input_ids) - len(last)],
                   reference=reference)


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any, name: str, where: str) -> list[Segment]:
    """Prompt and assistant segments of a conversation, cut from the rendered text of its prefixes.

    For assistant turn i: prompt = render(messages[:i], generation prompt) minus what came before (system prompt,
    user turns, the assistant header); answer = render(messages[:i+1]) minus that (content + end-of-turn markup).
    Each segment is tokenized alone, without special tokens (the template holds its own markup).
    """
    segments: list[Segment] = []
    done = ""  # the text already cut into segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, name, where)
        full = _render(tokenizer, messages[:i + 1], False, name, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InputError(f"{where}: the chat template is not prefix-stable for this record (rendering "
                             f"{name}[:{i + 1}] does not extend the render of the turns before it), so the "
                             "assistant turns cannot be told apart; use another model, or alpaca / "
                             "prompt_completion data without data.chat_template")
        segments.append((_encode(tokenizer, prompt[len(done):], special=False), False))
        segments.append((_encode(tokenizer, full[len(prompt):], special=False), True))
        done = full
    return segments


def _require_template(tokenizer: Any, message: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(message)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, name: str, where: str) -> str:
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as e:  # the template's own message says what it rejects
        raise InputError(f"{where}: the tokenizer's chat template rejected {name}: {e}") from None
    if not isinstance(text, str):
        raise InputError(f"{where}: the tokenizer's chat template rendered {type(text).__name__}, not text")
    return text


# ---------------------------------------------------------------------------------------------
# Record fields


def _needs(fmt: str, fields: FormatFields) -> str:
    """What a record of `fmt` must hold, for error messages."""
    optional = f" (+ {fields.input}, optional)" if fmt == "alpaca" else ""
    article = "an" if fmt[0] in "aeiou" else "a"
    return f"{article} {fmt} record needs {' + '.join(fields.required()[fmt])}{optional}"


def _string(record: dict[str, Any], name: str, needs: str, where: str, blank: str | None = None) -> str:
    """A required string field; `needs` says what the record needs; `blank` names the error if it is blank."""
    value = record.get(name)
    if value is None:
        raise InputError(f"{where}: missing field {name!r} (absent or null); {needs}")
    if not isinstance(value, str):
        raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}; write it as text")
    if blank and not value.strip():
        raise InputError(f"{where}: {blank}: field {name!r} is empty or whitespace; fill it in or drop the record")
    return value


def _optional_string(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: field {name!r} must be a string (or absent), got {type(value).__name__}")
    return value


def _messages(record: dict[str, Any], name: str, where: str) -> list[dict[str, str]]:
    """The conversation as [{role, content}] (other keys dropped); it must end with a non-empty assistant turn."""
    value = record.get(name)
    if value is None:
        raise InputError(f"{where}: missing field {name!r} (absent or null); a chat record needs a list of "
                         "{role, content} messages")
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} messages, got "
                         f"{'an empty list' if value == [] else type(value).__name__}")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: field {name}[{j}] must be a {{role, content}} message with string values, "
                             f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: field {name}[{j}].role is {m['role']!r}; use one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[0]["role"] == "assistant":
        raise InputError(f"{where}: field {name}[0] is an assistant turn; a conversation starts with a system or "
                         "user message (the prompt)")
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: field {name} must end with an assistant turn (the response to learn), the last "
                         f"is {messages[-1]['role']!r}; drop the turns after the last answer")
    if not messages[-1]["content"].strip():
        raise InputError(f"{where}: empty response: field {name}[{len(messages) - 1}].content (the last assistant "
                         "turn) is empty or whitespace; fill it in or drop the record")
    return messages
