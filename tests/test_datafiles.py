"""A malformed record in a local data file is named by its file and line, through the real CLI: exit 2, one line,
no run directory. The cases are the ones a user met (issue 23): a JSONL line that is not JSON, a CSV row with an
empty label, and their neighbours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_sentences, sentiment_records, write_recipe

Case = tuple[str, str, str, str]  # (name, file name, content, the error line after "error: data.train_file: PATH")


def jsonl(rows: list[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def csv_rows(rows: list[tuple[str, str]]) -> str:
    return "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)


RECORDS = sentiment_records(21, seed=2)
SENTENCES = [(t, str(y)) for t, y in make_sentences(51, seed=3)]
CAUSAL: list[Case] = [
    ("jsonl-not-json", "a.jsonl", jsonl([*RECORDS[:20], '{"instruction": "classify", "output": "positive"']),
     ", line 21, column 49: not valid JSON (Expecting ',' delimiter); fix or remove that record"),
    ("jsonl-not-an-object", "a.jsonl", jsonl([*RECORDS[:5], "[1, 2]", *RECORDS[5:]]),
     ", line 6: expected a JSON object (one record a line), got list; fix or remove that record"),
    ("json-broken", "a.json", json.dumps(RECORDS[:3], indent=1)[:-3],
     ", line 16, column 2: not valid JSON (Expecting ',' delimiter)"),
    ("not-utf8", "a.jsonl", "", ", line 3, byte 25: not UTF-8 text; save the file as UTF-8"),
]
CLASSIFICATION: list[Case] = [
    ("csv-empty-label", "a.csv", csv_rows(SENTENCES[:40] + [(SENTENCES[40][0], "")] + SENTENCES[41:]),
     ", line 42: the label field is empty; give every row a label, or remove the row"),
    ("csv-extra-field", "a.csv", csv_rows(SENTENCES[:9] + [("a, b", "1")] + SENTENCES[9:]),
     ", line 11: 3 fields, but the header has 2; quote fields that hold the delimiter, or fix or remove that record"),
    ("jsonl-missing-label", "a.jsonl",
     jsonl([{"text": t, "label": int(y)} for t, y in SENTENCES[:30]] + [{"text": "no label here"}]),
     ", line 31: the record has no label field; give every record a label, or remove it"),
]


def run(tmp_path: Path, model: Path, data: Path, causal: bool) -> subprocess.CompletedProcess[str]:
    recipe: dict[str, Any] = {"model": {"name_or_path": str(model)}, "adapter": {"method": "lora", "r": 2},
                              "data": {"train_file": str(data), "max_length": 32},
                              "train": {"max_steps": 1, "output_dir": str(tmp_path / "run")}}
    if causal:
        recipe["data"]["task_type"] = "causal_lm"
    path = write_recipe(tmp_path / "r.yaml", recipe, {})
    return subprocess.run([sys.executable, "-m", "sora_cli", "train", str(path)], capture_output=True, text=True)


def check(p: subprocess.CompletedProcess[str], data: Path, tail: str, tmp_path: Path) -> None:
    assert p.returncode == 2, p.stderr[-2000:]
    assert [line for line in p.stderr.splitlines() if line.strip()] == [f"error: data.train_file: {data}{tail}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_a_causal_file_names_the_bad_line(case: Case, tmp_path: Path, tiny_llama_dir: Path) -> None:
    name, file, content, tail = case
    data = tmp_path / file
    if name == "not-utf8":  # Latin-1 "é" in line 3's answer
        lines = jsonl(RECORDS[:5]).splitlines(keepends=True)
        lines[2] = lines[2].replace('"output": "', '"output": "caf\u00e9 ')
        data.write_bytes("".join(lines[:2]).encode() + lines[2].encode("latin-1") + "".join(lines[3:]).encode())
        tail = f", line 3, byte {lines[2].encode('latin-1').index(bytes([0xE9])) + 1}: not UTF-8 text; save the " \
               "file as UTF-8"
    else:
        data.write_text(content)
    check(run(tmp_path, tiny_llama_dir, data, causal=True), data, tail, tmp_path)


@pytest.mark.parametrize("case", CLASSIFICATION, ids=[c[0] for c in CLASSIFICATION])
def test_a_classification_file_names_the_bad_line(case: Case, tmp_path: Path, tiny_bert_dir: Path) -> None:
    _, file, content, tail = case
    data = tmp_path / file
    data.write_text(content)
    check(run(tmp_path, tiny_bert_dir, data, causal=False), data, tail, tmp_path)
