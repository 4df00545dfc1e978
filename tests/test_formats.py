"""SFT formats: exact token ids and response-only labels, truncation, format detection and bad-record errors.

Expectations are built by hand from the tiny word-level tokenizer: each piece (prompt, response, chat markup) is
tokenized on its own and concatenated, so a label off by one token or a missing EOS shows as a list difference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors

from sora_cli.errors import InputError
from sora_cli.tasks.formats import (
    FORMATS,
    IGNORE_INDEX,
    Encoded,
    FormatFields,
    default_prompt,
    detect_format,
    encode_record,
)

from .tiny_causal import IM_END, VOCAB_SIZE, save_tiny_causal_model, tiny_causal_tokenizer

TOK = tiny_causal_tokenizer()
PLAIN_TOK = tiny_causal_tokenizer(chat_template=False)
EOS = TOK.eos_token_id
WHERE = "data/train.jsonl record 3"

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is the sentiment of this review?\n\n### Response:\n"
)
INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is the sentiment of this review?\n\n### Input:\nA great movie.\n\n### Response:\n"
)
INSTRUCTION, REVIEW = "What is the sentiment of this review?", "A great movie."


def ids(text: str) -> list[int]:
    """The tiny tokenizer adds no special tokens, so this is also what add_special_tokens=True gives."""
    return list(TOK.encode(text, add_special_tokens=False))


def encode(record: dict[str, Any], fmt: str, tokenizer: Any = TOK, **kw: Any) -> Encoded | None:
    options: dict[str, Any] = {"fields": FormatFields(), "chat_template": False, "train_on_prompt": False,
                               "max_length": 256, "where": WHERE}
    return encode_record(record, fmt, tokenizer, **(options | kw))


def must(encoded: Encoded | None) -> Encoded:
    assert encoded is not None
    return encoded


def masked(prompt: list[int], response: list[int]) -> list[int]:
    return [IGNORE_INDEX] * len(prompt) + response


@pytest.fixture(scope="module")
def bos_tokenizer() -> Any:
    """The tiny tokenizer with a BOS (<s>) that add_special_tokens=True puts first, like Llama's."""
    tokenizer = tiny_causal_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The tiny tokenizer and model


def test_tiny_tokenizer_keeps_newlines_and_markup_as_single_ids() -> None:
    newline = TOK.convert_tokens_to_ids("\n")
    assert ids("a\n\nmovie") == [TOK.convert_tokens_to_ids("a"), newline, newline, TOK.convert_tokens_to_ids("movie")]
    assert ids("<|im_start|>user\n") == [TOK.convert_tokens_to_ids("<|im_start|>"), TOK.convert_tokens_to_ids("user"),
                                         newline]
    assert TOK.eos_token == TOK.pad_token == IM_END and TOK.bos_token is None
    assert TOK.encode("good", add_special_tokens=True) == ids("good")  # no BOS, like SmolLM2
    # Every word of the default template and of the ChatML markup is in the vocabulary.
    rendered = TOK.apply_chat_template([{"role": "user", "content": INPUT_PROMPT}], tokenize=False)
    assert TOK.unk_token_id not in ids(rendered) and max(ids(rendered)) < VOCAB_SIZE
    assert PLAIN_TOK.chat_template is None


def test_saved_tiny_model_and_tokenizer_load_offline(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_tiny_causal_model(tmp_path / "tiny", TOK)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert tokenizer.chat_template == TOK.chat_template and tokenizer.eos_token_id == EOS
    messages = [{"role": "user", "content": "good movie?"}, {"role": "assistant", "content": "positive"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == TOK.apply_chat_template(messages, tokenize=False)
    assert tokenizer.encode(NO_INPUT_PROMPT) == TOK.encode(NO_INPUT_PROMPT)
    assert model.config.vocab_size == VOCAB_SIZE and not model.config.tie_word_embeddings
    example = must(encode({"messages": messages}, "chat"))
    loss = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Formats


def test_default_prompt_is_stanford_alpaca() -> None:
    assert default_prompt(INSTRUCTION, "") == NO_INPUT_PROMPT
    assert default_prompt(INSTRUCTION, REVIEW) == INPUT_PROMPT


@pytest.mark.parametrize("extra", [{}, {"input": None}, {"input": ""}])
def test_alpaca_without_input(extra: dict[str, Any]) -> None:
    out = must(encode({"instruction": INSTRUCTION, "output": "positive"} | extra, "alpaca"))
    prompt, response = ids(NO_INPUT_PROMPT), ids("positive") + [EOS]
    assert out.input_ids == prompt + response
    assert out.labels == masked(prompt, response)
    assert out.prompt_ids == prompt and out.reference == "positive"
    assert TOK.unk_token_id not in out.input_ids


def test_alpaca_with_input() -> None:
    out = must(encode({"instruction": INSTRUCTION, "input": REVIEW, "output": "positive"}, "alpaca"))
    prompt, response = ids(INPUT_PROMPT), ids("positive") + [EOS]
    assert out.input_ids == prompt + response and out.labels == masked(prompt, response)
    assert out.prompt_ids == prompt and out.reference == "positive"


def test_prompt_completion_follows_the_prompt_verbatim() -> None:
    record = {"prompt": "review: a good film\nsentiment:", "completion": " positive"}
    out = must(encode(record, "prompt_completion"))
    prompt, response = ids("review: a good film\nsentiment:"), ids(" positive") + [EOS]
    assert out.input_ids == prompt + response and out.labels == masked(prompt, response)
    assert out.prompt_ids == prompt and out.reference == " positive"


def test_bos_once_at_the_start_and_none_with_chat_templates(bos_tokenizer: Any) -> None:
    bos = bos_tokenizer.bos_token_id
    out = must(encode({"prompt": "good film?", "completion": "positive"}, "prompt_completion", bos_tokenizer))
    assert out.input_ids == [bos] + ids("good film?") + ids("positive") + [EOS]
    assert out.labels == [IGNORE_INDEX] * 4 + ids("positive") + [EOS]
    text = must(encode({"text": "a good film"}, "text", bos_tokenizer))
    assert text.input_ids == [bos] + ids("a good film") + [EOS]
    chat = must(encode({"prompt": "good film?", "completion": "positive"}, "prompt_completion", bos_tokenizer,
                       chat_template=True))
    assert bos not in chat.input_ids


CHAT = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "What is this?"},
    {"role": "assistant", "content": "A movie."},
    {"role": "user", "content": "Was it good?"},
    {"role": "assistant", "content": "Great"},
]
# The ChatML text of CHAT, cut where the labels switch on and off.
CHAT_PROMPT_1 = ("<|im_start|>system\nAnswer with one word.<|im_end|>\n"
                 "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
CHAT_ANSWER_1 = "A movie.<|im_end|>\n"
CHAT_PROMPT_2 = "<|im_start|>user\nWas it good?<|im_end|>\n<|im_start|>assistant\n"
CHAT_ANSWER_2 = "Great<|im_end|>\n"


def test_chat_labels_every_assistant_turn_and_nothing_else() -> None:
    out = must(encode({"messages": CHAT}, "chat"))
    p1, a1, p2, a2 = ids(CHAT_PROMPT_1), ids(CHAT_ANSWER_1), ids(CHAT_PROMPT_2), ids(CHAT_ANSWER_2)
    assert out.input_ids == p1 + a1 + p2 + a2
    assert out.labels == masked(p1, a1) + masked(p2, a2)
    assert out.prompt_ids == p1 + a1 + p2 and out.reference == "Great"
    # Cutting the text into segments changes nothing for this tokenizer: same ids as the template's own.
    assert out.input_ids == TOK.apply_chat_template(CHAT, tokenize=True)["input_ids"]


def test_chat_default_system_prompt_is_not_labelled() -> None:
    out = must(encode({"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
                       "extra": 1}, "chat"))
    prompt = ids("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                 "<|im_start|>assistant\n")
    assert out.input_ids == prompt + ids("Hi<|im_end|>\n") and out.labels == masked(prompt, ids("Hi<|im_end|>\n"))


def test_alpaca_with_the_chat_template() -> None:
    out = must(encode({"instruction": INSTRUCTION, "input": REVIEW, "output": "positive"}, "alpaca",
                      chat_template=True))
    prompt = ids("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 f"<|im_start|>user\n{INSTRUCTION}\n{REVIEW}<|im_end|>\n<|im_start|>assistant\n")
    response = ids("positive<|im_end|>\n")  # the template's end of turn ends the response: no extra EOS
    assert out.input_ids == prompt + response and out.labels == masked(prompt, response)
    assert out.prompt_ids == prompt and out.reference == "positive"


def test_train_on_prompt_labels_every_token() -> None:
    alpaca = must(encode({"instruction": INSTRUCTION, "output": "positive"}, "alpaca", train_on_prompt=True))
    assert alpaca.labels == alpaca.input_ids == ids(NO_INPUT_PROMPT) + ids("positive") + [EOS]
    chat = must(encode({"messages": CHAT}, "chat", train_on_prompt=True))
    assert chat.labels == chat.input_ids == ids(CHAT_PROMPT_1 + CHAT_ANSWER_1 + CHAT_PROMPT_2 + CHAT_ANSWER_2)


def test_text_is_labelled_throughout_and_cut_on_the_right() -> None:
    out = must(encode({"text": "This film was great. Very good plot."}, "text"))
    expected = ids("This film was great. Very good plot.") + [EOS]
    assert out.input_ids == out.labels == expected
    assert out.prompt_ids == [] and out.reference == ""
    short = must(encode({"text": "This film was great. Very good plot."}, "text", max_length=4))
    assert short.input_ids == short.labels == expected[:4]


# ---------------------------------------------------------------------------------------------
# Length


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left() -> None:
    record = {"instruction": INSTRUCTION, "input": REVIEW, "output": "very good"}
    full = must(encode(record, "alpaca"))
    response = ids("very good") + [EOS]
    cut = must(encode(record, "alpaca", max_length=len(full.input_ids) - 5))
    assert cut.input_ids == full.input_ids[5:] and cut.labels == full.labels[5:]
    assert cut.input_ids[-len(response):] == response and cut.labels[-len(response):] == response
    assert cut.prompt_ids == full.prompt_ids[5:]
    exact = must(encode(record, "alpaca", max_length=len(response)))  # the response alone: no prompt left
    assert exact.input_ids == exact.labels == response and exact.prompt_ids == []


def test_a_response_longer_than_max_length_drops_the_record() -> None:
    record = {"instruction": INSTRUCTION, "output": "very good"}
    assert encode(record, "alpaca", max_length=len(ids("very good"))) is None  # + EOS does not fit
    assert encode(record, "alpaca", max_length=len(ids("very good")) + 1) is not None
    assert encode({"messages": CHAT}, "chat", max_length=len(ids(CHAT_ANSWER_2)) - 1) is None


def test_chat_truncation_cuts_the_conversation_as_a_whole() -> None:
    full = must(encode({"messages": CHAT}, "chat"))
    keep = len(ids(CHAT_PROMPT_2 + CHAT_ANSWER_2)) + 2  # the last 2 tokens of the first answer survive
    out = must(encode({"messages": CHAT}, "chat", max_length=keep))
    assert out.input_ids == full.input_ids[-keep:] and out.labels == full.labels[-keep:]
    assert out.labels[:2] == ids(CHAT_ANSWER_1)[-2:]  # what is left of a cut answer keeps its labels
    assert out.prompt_ids == out.input_ids[:-len(ids(CHAT_ANSWER_2))]


# ---------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(("columns", "fmt"), [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["prompt", "completion", "id"], "prompt_completion"),
    (["messages"], "chat"),
    (["text", "label"], "text"),
    (["text", "instruction", "output"], "alpaca"),  # the first match in FORMATS order
])
def test_detect_format(columns: list[str], fmt: str) -> None:
    assert detect_format(columns, FormatFields()) == fmt


def test_detect_format_with_renamed_fields_and_the_error_listing_columns() -> None:
    fields = FormatFields(prompt="question", completion="answer")
    assert detect_format(["question", "answer"], fields) == "prompt_completion"
    with pytest.raises(InputError, match=r"columns found \(question, reply\)") as e:
        detect_format(["question", "reply"], fields)
    for needs in ("alpaca needs instruction + output", "prompt_completion needs question + answer",
                  "chat needs messages", "text needs text"):
        assert needs in str(e.value)
    assert set(FORMATS) == {"alpaca", "prompt_completion", "chat", "text"}


# ---------------------------------------------------------------------------------------------
# Bad records


@pytest.mark.parametrize(("fmt", "record", "match"), [
    ("alpaca", {"instruction": INSTRUCTION}, "missing field 'output'"),
    ("alpaca", {"output": "positive", "input": REVIEW}, "missing field 'instruction'"),
    ("alpaca", {"instruction": INSTRUCTION, "output": None}, "missing field 'output'"),
    ("alpaca", {"instruction": INSTRUCTION, "output": 1}, "field 'output' must be a string, got int"),
    ("alpaca", {"instruction": INSTRUCTION, "input": ["a"], "output": "positive"}, "field 'input' must be a string"),
    ("alpaca", {"instruction": INSTRUCTION, "output": " \n"}, "empty response: field 'output'"),
    ("prompt_completion", {"prompt": "good film?"}, "missing field 'completion'"),
    ("prompt_completion", {"prompt": ["good"], "completion": "positive"}, "field 'prompt' must be a string"),
    ("prompt_completion", {"prompt": "good film?", "completion": ""}, "empty response: field 'completion'"),
    ("text", {"label": 1}, "missing field 'text'"),
    ("text", {"text": 3.5}, "field 'text' must be a string, got float"),
    ("text", {"text": "  "}, "empty text: field 'text'"),
    ("chat", {"text": "hello"}, "missing field 'messages'"),
    ("chat", {"messages": "hello"}, "field 'messages' must be a non-empty list .* got str"),
    ("chat", {"messages": []}, "field 'messages' must be a non-empty list .* got an empty list"),
    ("chat", {"messages": ["hello"]}, r"field messages\[0\] must be a \{role, content\} message"),
    ("chat", {"messages": [{"role": "user"}]}, r"field messages\[0\] must be a \{role, content\} message"),
    ("chat", {"messages": [{"role": "user", "content": 1}]}, r"field messages\[0\] must be a \{role, content\}"),
    ("chat", {"messages": [{"role": "bot", "content": "hi"}]}, r"field messages\[0\]\.role is 'bot'"),
    ("chat", {"messages": CHAT[:4]}, "field messages must end with an assistant turn .* the last is 'user'"),
    ("chat", {"messages": CHAT[2:3]}, r"field messages\[0\] is an assistant turn"),
    ("chat", {"messages": [*CHAT[:4], {"role": "assistant", "content": " "}]},
     r"empty response: field messages\[4\]\.content"),
])
def test_bad_records_name_the_record_and_the_field(fmt: str, record: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": .*" + match):
        encode(record, fmt)


def test_renamed_fields_are_named_in_errors() -> None:
    fields = FormatFields(instruction="question", output="answer")
    with pytest.raises(InputError, match=re.escape(WHERE) + ": missing field 'answer'.*needs question \\+ answer"):
        encode({"question": "what?"}, "alpaca", fields=fields)


def test_a_tokenizer_without_a_chat_template() -> None:
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": data.format: chat .* has none"):
        encode({"messages": CHAT}, "chat", PLAIN_TOK)
    record = {"instruction": INSTRUCTION, "output": "positive"}
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": data.chat_template .* no chat template"):
        encode(record, "alpaca", PLAIN_TOK, chat_template=True)
    assert must(encode(record, "alpaca", PLAIN_TOK)).input_ids == ids(NO_INPUT_PROMPT) + ids("positive") + [EOS]


def test_templates_that_are_not_prefix_stable_or_fail_are_input_errors() -> None:
    unstable = tiny_causal_tokenizer()  # the last message loses its end-of-turn markup: not a prefix of the next
    unstable.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                              "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": the chat template is not prefix-stable"):
        encode({"messages": CHAT}, "chat", unstable)
    strict = tiny_causal_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": .*chat template rejected messages: roles must"):
        encode({"messages": CHAT}, "chat", strict)


def test_unknown_format_and_missing_eos() -> None:
    with pytest.raises(InputError, match="unknown format 'sharegpt'"):
        encode({"conversations": []}, "sharegpt")
    no_eos = tiny_causal_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(InputError, match="^" + re.escape(WHERE) + ": the tokenizer has no EOS token"):
        encode({"text": "good"}, "text", no_eos)
