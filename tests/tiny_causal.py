"""A tiny causal LM and its word-level ChatML tokenizer, built offline (no downloads), for the SFT format tests.

The tokenizer mimics SmolLM2's conventions at toy scale: `<|im_start|>` / `<|im_end|>` are single special ids,
`<|im_end|>` is both EOS and padding, no BOS is added, and the chat template is ChatML with a default system
message. Words are lower-cased, split on whitespace and punctuation; a newline is its own (non-special) added
token, so "\n" in prompts and templates keeps an id instead of vanishing as whitespace.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

IM_START, IM_END, UNK, NEWLINE = "<|im_start|>", "<|im_end|>", "<unk>", "\n"
SPECIAL = [UNK, IM_START, IM_END]
# Every word of the default (Alpaca) template, of the default system message and of the roles is in the vocabulary,
# so a rendered prompt holds no <unk>: the tests can tell each piece's ids apart.
WORDS = [
    # roles and the default system message
    "system", "user", "assistant", "you", "are", "helpful", ".",
    # the Alpaca template
    "below", "is", "an", "instruction", "that", "describes", "a", "task", ",", "paired", "with", "input",
    "provides", "further", "context", "write", "response", "appropriately", "completes", "the", "request", "###", ":",
    # data words
    "positive", "negative", "review", "sentiment", "movie", "film", "good", "bad", "great", "awful", "was", "what",
    "of", "this", "answer", "one", "word", "?", "it", "and", "not", "very", "classify", "hello", "thanks", "plot",
]
VOCAB_SIZE = 64  # the embedding size of the tiny model: every id must be below it

# SmolLM2's ChatML template, with a shorter default system message (all of its words are in WORDS).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_causal_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: specials 0-2 (<unk>, <|im_start|>, <|im_end|>), words from 3, "\\n" last."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+ ; whitespace (newlines too) is dropped
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)])
    # An added token is matched before pre-tokenization, so each "\n" becomes one id ("\n\n" two).
    backend.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    assert backend.get_vocab_size() <= VOCAB_SIZE, backend.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=IM_END, pad_token=IM_END,
                                   bos_token=None, chat_template=CHATML_TEMPLATE if chat_template else None)


def save_tiny_causal_model(directory: str | Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A seeded random tiny Llama (2 layers, hidden 32) and `tokenizer`, saved so Auto*.from_pretrained loads both."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
