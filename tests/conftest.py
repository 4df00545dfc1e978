"""Tiny models built from configs and small generated data: no network, seconds per run."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "moving", "bright", "warm", "smart"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "flat", "messy", "cold", "stale", "silly"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "story", "cast", "was", "is", "very", "quite", "and", "but", "this"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is the majority sentiment of their words (learnable, deterministic)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        strong, weak = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = rng.sample(NEUTRAL, rng.randint(2, 6)) + rng.sample(strong, 2) + rng.sample(weak, rng.randint(0, 1))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, Any]], header: tuple[str, str] = ("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def tiny_bert_config(vocab_size: int, **kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=64, **kw)


def tiny_llama_config(**kw: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, **kw)


def pretrain_tiny_bert(vocab: Path, steps: int = 150) -> Any:
    """A tiny BERT with some sentiment features (like a real pre-trained encoder): full fine-tuning of a
    random one for a few seconds on other generated sentences; returns the encoder without its head.

    In float64 (and saved so): 150 float32 steps would give other weights on another CPU (AVX2 and AVX-512 GEMMs
    round differently), and every golden number downstream would move with them."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast(str(vocab), do_lower_case=True)  # `vocab` (v5) or `vocab_file` (v4)
    rows = make_sentences(320, seed=99)
    enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(SPECIAL + NEUTRAL + POSITIVE + NEGATIVE))).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=gen)
        model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx], labels=labels[idx]).loss.backward()
        opt.step()
        opt.zero_grad()
    return tokenizer, model.bert


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny "pre-trained" BERT encoder (no task head) with its word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + NEUTRAL + POSITIVE + NEGATIVE) + "\n")
    tokenizer, encoder = pretrain_tiny_bert(vocab)
    encoder.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (tests/tiny_causal.py) with its word-level chat tokenizer."""
    from .tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

    return save_tiny_causal_model(tmp_path_factory.mktemp("tiny-llama"), tiny_causal_tokenizer())


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", make_sentences(400, seed=1))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    """A run directory's metrics.jsonl events of one kind (train, eval, test ...)."""
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def write_recipe(path: Path, recipe: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    """`recipe` with each section updated by `sections`, written as YAML to `path`."""
    for key, values in sections.items():
        recipe.setdefault(key, {}).update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_bert_dir: Path, tiny_csv: Path):
    """Write a recipe for the tiny model + CSV, with section overrides; return its path."""

    def make(name: str = "recipe", **sections: dict[str, Any]) -> Path:
        recipe: dict[str, Any] = {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "adapter": {"method": "sora", "r": 4, "alpha": 8, "sparse_lambda": 5.0},
            "data": {"train_file": str(tiny_csv), "max_length": 16},
            "train": {"lr": 1e-2, "batch_size": 16, "max_steps": 30, "log_every": 5, "eval_every": 15,
                      "save_every": 10, "output_dir": str(tmp_path / "runs" / name), "seed": 7},
        }
        return write_recipe(tmp_path / f"{name}.yaml", recipe, sections)

    return make


# ---------------------------------------------------------------------------------------------
# Causal LM recipes (tests/tiny_causal.py's Llama)

FILLER = ["the", "movie", "film", "plot", "was", "very", "it", "and"]
INSTRUCTION = "classify the sentiment of this review"


def sentiment_records(n: int, seed: int) -> list[dict[str, str]]:
    """Alpaca records whose answer is the sentiment of the one strong word in the input (learnable)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = rng.sample(FILLER, rng.randint(2, 5)) + [rng.choice(["good", "great"] if y else ["bad", "awful"])]
        rng.shuffle(words)
        rows.append({"instruction": INSTRUCTION, "input": " ".join(words), "output": "positive" if y else "negative"})
    return rows


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("causal-data") / "sentiment.jsonl", sentiment_records(200, seed=1))


@pytest.fixture
def causal_recipe(tmp_path: Path, tiny_llama_dir: Path, alpaca_file: Path):
    """Write a causal-LM recipe for the tiny Llama + alpaca sentiment records, with section overrides; its path."""

    def make(name: str = "causal", **sections: dict[str, Any]) -> Path:
        recipe: dict[str, Any] = {
            "model": {"name_or_path": str(tiny_llama_dir)},
            "adapter": {"method": "sora", "r": 4, "alpha": 8, "sparse_lambda": 1.0},
            "data": {"train_file": str(alpaca_file), "task_type": "causal_lm", "max_length": 64,
                     "chat_template": True, "choices": ["positive", "negative"], "max_new_tokens": 3},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 12, "log_every": 4, "eval_every": 6,
                      "save_every": 4, "keep_last": 3, "output_dir": str(tmp_path / "runs" / name), "seed": 3},
        }
        return write_recipe(tmp_path / f"{name}.yaml", recipe, sections)

    return make


def killed_at_step_4_and_resumed(recipe: Any) -> Path:
    """Train `recipe` (12 steps, a checkpoint every 4), remove what steps 8 and 12 wrote, as if killed right after
    step 4's checkpoint, and resume: the run directory."""
    from sora_cli.engine import train

    train(recipe)
    run = Path(recipe.train.output_dir)
    for name in ("checkpoints/step-8", "checkpoints/step-12", "final", "best"):
        shutil.rmtree(run / name, ignore_errors=True)
    again = train(recipe, resume=True)
    assert (again.resumed_from, again.step) == (4, 12)
    return run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a failed run: every dependency of the suite is a test dependency (CI must not go green
    because something it should check was not there)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped: the suite counts a skip as a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
