"""Faults injected into real `sora` processes (issue 23, part 4).

- kill -9 at drawn write points (tests/kill_at.py counts every write a command makes under its output, then a
  process is killed just before the N-th) during a training run's checkpoint saves, `merge`, `prune`, `sparsify`
  and a knowledge-editing run: every target left on disk is absent or whole and loadable, and running again
  (`--resume` for the runs) ends where the uninterrupted run ended;
- a disk that fills during a save (a file-size limit, RLIMIT_FSIZE): one line, the previous checkpoint intact,
  `--resume` continues;
- a damaged training state: one line naming the file.

The points are drawn with a fixed seed, SORA_FAULT_POINTS of them per command (default 2: one rename or removal,
one other write, the first being where a writer that is not atomic fails); SORA_FAULT_POINTS=0
kills at every point (run by hand: the closing note of issue 23 quotes it).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sora_cli.checkpoint import load_adapter, load_training_state, step_checkpoints
from tests.conftest import sentiment_records, write_jsonl
from tests.test_edit import EDITS

KILL_AT = Path(__file__).with_name("kill_at.py")
POINTS = int(os.environ.get("SORA_FAULT_POINTS", "2"))


ENV = {**os.environ, "PYTHONPATH": str(KILL_AT.parent.parent)}  # this checkout's sora_cli, installed or not


def sora(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sora_cli", *args], capture_output=True, text=True, timeout=600,
                          env=ENV, **kw)


def killed_at(n: int, under: Path, args: list[str], count: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KILL_AT), str(n), str(under), str(count), *args],
                          capture_output=True, text=True, timeout=600, env=ENV)


def write_points(under: Path, args: list[str], tmp: Path) -> list[str]:
    """Run the command to the end under the counter; the name of each write it made under `under`, in order."""
    count = tmp / "count.txt"
    p = killed_at(0, under, args, count)
    assert p.returncode == 0, p.stderr[-3000:]
    return list(json.loads(count.read_text()))


# The writes whose interruption a non-atomic writer gets wrong: a rename or a removal half done.
MOVES = {"rename", "replace", "rmtree", "unlink", "remove", "rmdir"}


def drawn(writes: list[str], seed: int) -> list[int]:
    """Kill points (1-based): SORA_FAULT_POINTS of them, drawn with `seed` among the renames and removals and among
    the other writes in turn; every point when SORA_FAULT_POINTS=0."""
    points = list(range(1, len(writes) + 1))
    rng = random.Random(seed)
    pools = [rng.sample(g, len(g)) for g in ([i for i in points if writes[i - 1] in MOVES],
                                             [i for i in points if writes[i - 1] not in MOVES])]
    interleaved = [i for pair in itertools.zip_longest(*pools) for i in pair if i is not None]
    chosen = points if POINTS == 0 else sorted(interleaved[:POINTS])
    print(f"{len(writes)} write points; killed at {chosen}")  # shown with -s (the sweep's numbers)
    return chosen


def recipe(d: Path, model: Path, data: dict[str, Any], **sections: dict[str, Any]) -> Path:
    r: dict[str, Any] = {
        "model": {"name_or_path": str(model), "dtype": "float64"},
        "adapter": {"method": "sora", "r": 2, "sparse_lambda": 1.0},
        "data": {"task_type": "causal_lm", "max_length": 48, **data},
        "train": {"max_steps": 6, "batch_size": 4, "save_every": 2, "keep_last": 2, "output_dir": str(d / "run"),
                  "seed": 3},
    }
    for key, values in sections.items():
        r.setdefault(key, {}).update(values)
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, _ = load_adapter(a)
    tb, _ = load_adapter(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def assert_run_whole(run: Path) -> None:
    """Every checkpoint a kill left is readable: step checkpoints with their training state, best/ and final/."""
    for _, ckpt in step_checkpoints(run):
        load_adapter(ckpt)
        load_training_state(ckpt)
    for name in ("best", "final"):
        if (run / name).exists():
            load_adapter(run / name)


def visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[Path, Path, list[str]]:
    """The uninterrupted run (its recipe, its directory) and its writes."""
    d = tmp_path_factory.mktemp("faults-reference")
    data = write_jsonl(d / "train.jsonl", sentiment_records(40, seed=1))
    path = recipe(d, tiny_llama_dir, {"train_file": str(data)})
    return path, d / "run", write_points(d / "run", ["train", str(path)], d)


# ---------------------------------------------------------------------------------------------
# kill -9


def test_kill_during_training_saves(trained: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    reference_recipe, reference, writes = trained
    assert len(writes) > 20 and "rename" in writes  # step checkpoints, final/, the logs: kills inside the saves
    for n in drawn(writes, seed=1):
        d = tmp_path / f"kill-{n}"
        d.mkdir()
        path = d / "recipe.yaml"
        text = reference_recipe.read_text().replace(str(reference), str(d / "run"))
        path.write_text(text)
        p = killed_at(n, d / "run", ["train", str(path)], d / "count.txt")
        assert p.returncode == -9, (n, p.stderr[-2000:])
        if (d / "run").exists():
            assert_run_whole(d / "run")
        resumed = sora("train", str(path), "--resume")
        assert resumed.returncode == 0, (n, resumed.stderr[-2000:])
        assert_same_adapter(d / "run" / "final", reference / "final")  # resume is exact: the same end


@pytest.mark.parametrize("command", ["merge", "prune", "sparsify"])
def test_kill_during_an_output_write(command: str, trained: tuple[Path, Path, list[str]], tiny_llama_dir: Path,
                                     tmp_path: Path) -> None:
    final = trained[1] / "final"
    source = {"merge": [str(final)], "prune": [str(final)], "sparsify": [str(tiny_llama_dir)]}[command]
    options = {"merge": [], "prune": [], "sparsify": ["--method", "magnitude", "--sparsity", "0.5"]}[command]
    compare = compare_models if command != "prune" else assert_same_adapter

    def args(d: Path) -> list[str]:
        return [command, *source, "-o", str(d / "out"), *options]

    (tmp_path / "ref").mkdir()
    writes = write_points(tmp_path / "ref", args(tmp_path / "ref"), tmp_path)
    for n in drawn(writes, seed=2):
        d = tmp_path / f"kill-{n}"
        d.mkdir()
        p = killed_at(n, d, args(d), d.parent / "count.txt")
        assert p.returncode == -9, (n, p.stderr[-2000:])
        assert visible(d) in ([], ["out"]), visible(d)
        if (d / "out").exists():  # whole: the same as the uninterrupted command's
            compare(d / "out", tmp_path / "ref" / "out")
        again = sora(*args(d), "--force")
        assert again.returncode == 0, (n, again.stderr[-2000:])
        compare(d / "out", tmp_path / "ref" / "out")


def compare_models(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert wa.keys() == wb.keys() and wa and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "config.json").is_file() and (a / "tokenizer_config.json").is_file()


def test_kill_during_an_editing_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))

    def make(d: Path) -> Path:
        path = recipe(d, tiny_llama_dir, {"train_file": str(edits), "task_type": "edit", "max_length": 32},
                      adapter={"method": "roselora", "r": 4, "alpha": 16, "density": 0.25, "sparse_lambda": None,
                               "target_modules": ["q_proj", "v_proj"]},
                      train={"lr": 5e-2, "batch_size": 1, "max_steps": 4, "lr_scheduler": "constant"},
                      edit={"mode": "single"})
        r = yaml.safe_load(path.read_text())
        del r["train"]["save_every"], r["train"]["keep_last"]  # an editing run keeps no step checkpoints
        path.write_text(yaml.safe_dump(r))
        return path

    (tmp_path / "ref").mkdir()
    writes = write_points(tmp_path / "ref" / "run", ["train", str(make(tmp_path / "ref"))], tmp_path)
    expected = scores(tmp_path / "ref" / "run")
    for n in drawn(writes, seed=3):
        d = tmp_path / f"kill-{n}"
        d.mkdir()
        p = killed_at(n, d / "run", ["train", str(make(d))], d / "count.txt")
        assert p.returncode == -9, (n, p.stderr[-2000:])
        if (d / "run" / "edits.jsonl").exists():  # every line whole
            [json.loads(line) for line in (d / "run" / "edits.jsonl").read_text().splitlines()]
        resumed = sora("train", str(make(d)), "--resume")
        assert resumed.returncode == 0, (n, resumed.stderr[-2000:])
        assert scores(d / "run") == expected


def scores(run: Path) -> list[dict[str, Any]]:
    """Each edit's numbers (its time aside)."""
    lines = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "second" not in k and "time" not in k} for r in lines]


# ---------------------------------------------------------------------------------------------
# A full disk, a damaged training state


def limited(size: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def stopped_at_step_2(reference_recipe: Path, reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(recipe, run) of a 4-step run as if it had stopped after saving step 2; its end is kept in
    tmp_path/uninterrupted."""
    path = tmp_path / "recipe.yaml"
    path.write_text(reference_recipe.read_text().replace(str(reference), str(tmp_path / "run"))
                    .replace("max_steps: 6", "max_steps: 4").replace("keep_last: 2", "keep_last: 5"))
    first = sora("train", str(path))
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    shutil.move(run / "final", tmp_path / "uninterrupted")
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "best", ignore_errors=True)
    return path, run


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(trained: tuple[Path, Path, list[str]],
                                                              tmp_path: Path) -> None:
    path, run = stopped_at_step_2(trained[0], trained[1], tmp_path)
    step2 = run / "checkpoints" / "step-2"
    before = {p.name: p.read_bytes() for p in step2.iterdir()}
    limit = (step2 / "adapter.safetensors").stat().st_size // 2  # no checkpoint fits; the log lines do
    assert (run / "metrics.jsonl").stat().st_size < limit // 2
    full = sora("train", str(path), "--resume", preexec_fn=limited(limit))
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 1, full.stderr[-2000:]
    assert len(lines) == 1 and "not written, the disk is full (file too large)" in lines[0], lines
    assert lines[0].startswith(f"error: {run}/"), lines  # the checkpoint (best/ or step-4) it could not write
    assert {p.name: p.read_bytes() for p in step2.iterdir()} == before  # the previous checkpoint, untouched
    assert [s for s, _ in step_checkpoints(run)] == [2] and not (run / "final").exists()  # nothing partial
    resumed = sora("train", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_adapter(run / "final", tmp_path / "uninterrupted")


@pytest.mark.parametrize("damage", ["truncated", "not-json"])
def test_a_damaged_training_state_is_named(damage: str, trained: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    path, run = stopped_at_step_2(trained[0], trained[1], tmp_path)
    state = run / "checkpoints" / "step-2"
    if damage == "truncated":
        target = next(state.glob("training_state*.safetensors"))
        target.write_bytes(target.read_bytes()[:100])
    else:
        target = next(state.glob("training_state*.json"))
        target.write_text("{cut")
    p = sora("train", str(path), "--resume")
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], lines
    assert "no readable checkpoint to resume from" in lines[0] and "start over with --overwrite" in lines[0]
