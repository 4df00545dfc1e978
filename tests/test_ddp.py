"""torchrun data parallelism on CPU (gloo, 2 processes): the same adapter, losses, gates, masks and edits as one
process; rank 0 alone writes; a killed rank stops the launch and the run resumes with 1 or 2 processes; a bad input
gives one line. The collectives themselves are checked in 2 spawned processes.

Every model here has no dropout, so one process and two differ only by the order of float32 sums (the all-reduce
adds the two halves of a batch's gradient; one process adds the examples in one pass): atol 1e-6 on tensors that
move by ~1e-2 per step."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sora_cli.checkpoint import load_adapter, load_training_state
from sora_cli.dist import World
from sora_cli.engine import train
from sora_cli.recipe import load_recipe
from tests.conftest import events, write_jsonl, write_recipe
from tests.test_edit import EDITS
from tests.tiny_causal import WORDS

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "sora_cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter.safetensors")


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    assert worst <= atol, f"{a} and {b} differ by {worst:.3g}"


def assert_same_losses(a: Path, b: Path) -> None:
    la, lb = events(a, "train"), events(b, "train")
    assert [e["step"] for e in la] == [e["step"] for e in lb] and la
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-9), (x["step"], x["loss"], y["loss"])


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Fixtures: a dropout-free tiny BERT, a tiny Llama, answers of unequal lengths


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny BERT without dropout (its config's 0.1 would draw other masks on rank 1)."""
    out = tmp_path_factory.mktemp("bert-no-dropout") / "bert"
    shutil.copytree(tiny_bert_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def uneven_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Answers of 1 to 6 words: the two halves of a batch hold different numbers of label tokens."""
    rng = random.Random(4)
    words = [w for w in WORDS if w.isalpha()]
    rows = [{"instruction": "write", "input": " ".join(rng.sample(words, rng.randint(1, 4))),
             "output": " ".join(rng.sample(words, rng.randint(1, 6)))} for _ in range(120)]
    return write_jsonl(tmp_path_factory.mktemp("uneven") / "uneven.jsonl", rows)


def bert_recipe(path: Path, bert: Path, data: Path, **sections: dict[str, Any]) -> Path:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(bert)},
        "adapter": {"method": "sora", "r": 4, "alpha": 8, "sparse_lambda": 5.0},
        "data": {"train_file": str(data), "max_length": 16},
        "train": {"lr": 1e-2, "batch_size": 15, "grad_accum": 2, "max_steps": 20, "log_every": 1,
                  "eval_every": 10, "save_every": 10, "seed": 7, "output_dir": str(path.parent / "unused")},
    }
    return write_recipe(path, recipe, sections)


def causal_recipe(path: Path, llama: Path, data: Path, **sections: dict[str, Any]) -> Path:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(llama)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train_file": str(data), "task_type": "causal_lm", "max_length": 48, "exact_match": False},
        "train": {"lr": 1e-2, "batch_size": 7, "max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4,
                  "seed": 3, "output_dir": str(path.parent / "unused")},
    }
    return write_recipe(path, recipe, sections)


def one_process(recipe: Path, out: Path, **kw: Any) -> Path:
    loaded = load_recipe(recipe, [f"train.output_dir={out}"])
    train(loaded, **kw)
    return out


# ---------------------------------------------------------------------------------------------
# Without processes


def test_each_rank_takes_a_contiguous_slice_of_the_global_batch() -> None:
    items = list(range(7))
    assert [World(r, 2).part(items) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [World(r, 3).part(items) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [World(r, 4).part([9, 8]) for r in range(4)] == [[9], [8], [], []]  # fewer items than ranks


# ---------------------------------------------------------------------------------------------
# The collectives, in two spawned processes


def _collectives(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from sora_cli import dist as sd
    from sora_cli.errors import SharedError, SoraError

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    w = World(rank, 2)
    found: dict[str, Any] = {}
    # gradients: rank 1 saw no example (grads None); a parameter no rank touched stays None
    a, b, untouched = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(3))
    if rank == 0:
        a.grad, b.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    else:
        b.grad = torch.full((3,), 2.0, dtype=torch.float64)
    loss = w.sum_gradients([a, b, untouched], torch.tensor(0.25 * (rank + 1), dtype=torch.float64))
    found["grads"] = [a.grad.tolist(), b.grad.tolist(), untouched.grad]
    found["loss"] = float(loss)
    found["total"] = w.total(rank + 5)
    found["map"] = w.map(list(range(5)), lambda mine: [10 * i + rank for i in mine])
    try:
        w.check_same({"x": torch.tensor([1.0, float(rank)])}, "step 3")
    except SoraError as e:
        found["check_same"] = str(e)

    def fail_on_1() -> int:
        if rank == 1:
            raise SoraError("disk full")
        return 7

    try:
        sd.agree(fail_on_1, world=w)
    except SoraError as e:
        found["agree"] = [type(e).__name__, str(e), e.exit_code]

    def fail_on_main() -> int:
        raise sd.InputError("bad file")

    try:
        sd.on_main(fail_on_main, world=w)
    except SoraError as e:
        found["on_main"] = [type(e).__name__, str(e), e.exit_code, isinstance(e, SharedError)]
    Path(out, f"{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def test_collectives_sum_gather_and_carry_failures(tmp_path: Path) -> None:
    mp.spawn(_collectives, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["grads"] == [[1.0, 2.0, 3.0], [3.0, 3.0, 3.0], None]
        assert r["loss"] == 0.75 and r["total"] == 11
        assert r["map"] == [0, 11, 20, 31, 40]  # rank 0 mapped items 0, 2, 4; rank 1 items 1, 3
        assert "rank(s) 1 hold different adapter tensors than rank 0" in r["check_same"]
    # the failure of rank 1 reaches rank 0 (which prints it, naming the rank); rank 1 stays quiet
    assert r0["agree"] == ["SharedError", "rank 1: disk full", 1] and r1["agree"][0] == "SharedError"
    assert r0["on_main"] == ["InputError", "bad file", 2, False]
    assert r1["on_main"] == ["SharedError", "bad file", 2, True]


# ---------------------------------------------------------------------------------------------
# Two processes against one


def test_sora_on_two_processes_matches_one(tmp_path: Path, bert_dir: Path, tiny_csv: Path) -> None:
    """BERT + SoRA, a global batch of 15 (8 + 7 examples), 2 micro-batches per step: the same losses at every step,
    adapter, zero gates and dev metrics; rank 0 alone writes; the checkpoint keeps rank 1's RNG."""
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv)
    one = one_process(recipe, tmp_path / "one")
    two = tmp_path / "two"
    p = ok(torchrun(["train", str(recipe), "-o", str(two)]))
    assert p.stdout.count("sora train") == 1  # one summary: only rank 0 prints
    assert_same_losses(one, two)
    assert_same_tensors(one / "final", two / "final")
    gates_one = {k: (v == 0).tolist() for k, v in tensors(one / "final").items() if k.endswith("gate")}
    gates_two = {k: (v == 0).tolist() for k, v in tensors(two / "final").items() if k.endswith("gate")}
    zero = sum(sum(z) for z in gates_one.values())
    assert gates_one == gates_two and 0 < zero < 52  # some ranks off, not all
    assert events(one, "eval") == events(two, "eval")
    assert files(one) == files(two)
    state, meta = load_training_state(two / "checkpoints" / "step-20")
    assert meta["rng"]["ranks"] == 2 and "rng.rank1.torch" in state
    assert not torch.equal(state["rng.rank1.torch"], state["rng.torch"])  # rank 1 draws its own stream


def test_two_processes_equal_one_with_the_same_micro_batches_bit_for_bit(tmp_path: Path, bert_dir: Path,
                                                                         tiny_csv: Path) -> None:
    """What differs from one process is only how the batch is cut: 2 processes on a global batch of 16 are one
    process on 2 accumulated micro-batches of 8 (the same examples, padded alike; the two gradient halves summed,
    which commutes), so with one thread each the adapter, the gates and every logged loss are equal bit for bit."""
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv, train={"batch_size": 16, "grad_accum": 1})
    one = tmp_path / "one"
    ok(subprocess.run([sys.executable, "-m", "sora_cli", "train", str(recipe), "-o", str(one), "train.batch_size=8",
                       "train.grad_accum=2"], capture_output=True, text=True,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    two = tmp_path / "two"
    ok(torchrun(["train", str(recipe), "-o", str(two)]))
    ta, tb = tensors(one / "final"), tensors(two / "final")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [e["loss"] for e in events(one, "train")] == [e["loss"] for e in events(two, "train")]


def test_a_budget_on_two_processes_equals_one_bit_for_bit(tmp_path: Path, bert_dir: Path, tiny_csv: Path) -> None:
    """SoRA to a budget under torchrun: every rank reads the same count from the same reduced gates, so λ's path,
    the final cut and the adapter equal one process's on the same micro-batches, bit for bit; rank 0's training
    state holds the controller that every rank agreed on."""
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv, adapter={"sparse_lambda": None,
                                                                           "target": {"ranks": 20, "reach_at": 15}},
                         train={"batch_size": 16, "grad_accum": 1})
    one = tmp_path / "one"
    ok(subprocess.run([sys.executable, "-m", "sora_cli", "train", str(recipe), "-o", str(one), "train.batch_size=8",
                       "train.grad_accum=2"], capture_output=True, text=True,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    two = tmp_path / "two"
    ok(torchrun(["train", str(recipe), "-o", str(two)]))
    ta, tb = tensors(one / "final"), tensors(two / "final")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [e["lambda"] for e in events(one, "train")] == [e["lambda"] for e in events(two, "train")]
    budget = load_adapter(two / "final")[1]["method_config"]["budget"]
    assert budget == load_adapter(one / "final")[1]["method_config"]["budget"]
    assert budget["reached"] == 20 == sum(int(torch.count_nonzero(v)) for k, v in tb.items() if k.endswith("gate"))
    state, _ = load_training_state(two / "checkpoints" / "step-20")
    assert state["method.budget.trajectory"].shape == (15, 3) and state["method.budget.cut"].tolist() == [
        budget["final_cut"], budget["floor_restored"]]


@pytest.mark.parametrize("method", ["lora", "roselora", "lors"])
def test_causal_methods_on_two_processes_match_one(method: str, tmp_path: Path, tiny_llama_dir: Path,
                                                   uneven_file: Path) -> None:
    """Answers of unequal length (the ranks hold different label-token counts): the loss of every step equals one
    process's; RoseLoRA's masks and LoRS's gradient init and zero pattern come out the same."""
    adapter: dict[str, Any] = {"method": method}
    model = tiny_llama_dir
    if method == "roselora":
        adapter.update(density=0.5, sparsify_start=2, sparsify_end=6)
    if method == "lors":
        model = tmp_path / "sparse"
        ok(subprocess.run([sys.executable, "-m", "sora_cli", "sparsify", str(tiny_llama_dir), "-o", str(model),
                           "--method", "magnitude", "--sparsity", "0.5"], capture_output=True, text=True))
        adapter.update(init="gradient", init_samples=9)
    # LoRS's A = top singular vectors of the summed gradient: float32 reordering noise (1e-7) moves them by about
    # noise / singular-value gap (9e-6 measured here), so its run is compared in float64
    dtype = "float64" if method == "lors" else "float32"
    recipe = causal_recipe(tmp_path / "r.yaml", model, uneven_file, adapter=adapter, model={"dtype": dtype})
    one = one_process(recipe, tmp_path / "one")
    two = tmp_path / "two"
    ok(torchrun(["train", str(recipe), "-o", str(two)]))
    assert_same_losses(one, two)
    assert_same_tensors(one / "final", two / "final")
    if method == "roselora":  # the same entries of A and B survive
        ta, tb = tensors(one / "final"), tensors(two / "final")
        assert all(torch.equal(ta[k] == 0, tb[k] == 0) for k in ta)
        assert sum(int((v == 0).sum()) for v in ta.values()) > 0
    if method == "lors":
        _, meta = load_adapter(two / "final")
        assert all(m["base_zeros"] > 0 for m in meta["modules"].values())


def test_edits_on_two_processes_match_one(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """single mode: the ranks edit different requests; edits.jsonl holds them in order, equal to one process's."""
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))
    recipe = write_recipe(tmp_path / "e.yaml", {
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float64"},
        "adapter": {"method": "roselora", "r": 4, "alpha": 16, "density": 0.25, "sparsify_start": 2,
                    "sparsify_end": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(edits), "task_type": "edit", "max_length": 32},
        "train": {"lr": 5e-2, "batch_size": 1, "max_steps": 10, "lr_scheduler": "constant", "seed": 5},
        "edit": {"mode": "single"}}, {})
    ok(subprocess.run([sys.executable, "-m", "sora_cli", "train", str(recipe), "-o", str(tmp_path / "one")],
                      capture_output=True, text=True))
    ok(torchrun(["train", str(recipe), "-o", str(tmp_path / "two")]))
    lines = [[json.loads(x) for x in (tmp_path / run / "edits.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    assert [r["index"] for r in lines[1]] == [0, 1, 2]
    for a, b in zip(*lines):
        assert a["post"] == b["post"] and a["pre"] == b["pre"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[0]["post"] == summaries[1]["post"]


def test_wanda_calibration_shared_by_two_processes(tmp_path: Path, tiny_llama_dir: Path, uneven_file: Path) -> None:
    """sora sparsify under torchrun: each process calibrates on half the samples; the norms are summed before each
    block is pruned, so the zero pattern is one process's."""
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, uneven_file)
    cmd = ["sparsify", str(recipe), "--method", "wanda", "--sparsity", "0.5", "--samples", "9"]
    ok(subprocess.run([sys.executable, "-m", "sora_cli", *cmd, "-o", str(tmp_path / "one")], capture_output=True,
                      text=True))
    ok(torchrun([*cmd, "-o", str(tmp_path / "two")]))
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    linear = [k for k in a if k.endswith("proj.weight")]
    assert len(linear) == 14 and all(torch.equal(a[k] == 0, b[k] == 0) for k in linear)
    assert json.loads((tmp_path / "two" / "sparsify.json").read_text())["calibration"]["samples"] == 9


def test_magnitude_sparsify_under_torchrun_takes_any_samples_wanda_does_not(tmp_path: Path, tiny_llama_dir: Path,
                                                                         uneven_file: Path) -> None:
    """--samples is Wanda's: magnitude pruning reads none, so 2 processes prune with --samples 1 as one process does
    (it used to refuse fewer samples than processes); Wanda still refuses them in one line."""
    cmd = ["sparsify", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--samples", "1"]
    ok(subprocess.run([sys.executable, "-m", "sora_cli", *cmd, "-o", str(tmp_path / "one")], capture_output=True,
                      text=True))
    ok(torchrun([*cmd, "-o", str(tmp_path / "two")]))
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, uneven_file)
    p = torchrun(["sparsify", str(recipe), "--method", "wanda", "--sparsity", "0.5", "--samples", "1", "-o",
                  str(tmp_path / "wanda")])
    assert p.returncode != 0 and [line for line in p.stderr.splitlines() if "error:" in line] == [
        "error: --samples: 1 is fewer than the 2 processes sharing them; give at least 2"], p.stderr[-2000:]


def test_schedule_on_two_processes_matches_one(tmp_path: Path, bert_dir: Path, tiny_csv: Path) -> None:
    """sora schedule: every process trains each stage; rank 0 keeps the stages and the records, which match one
    process's (gates, memorization, generalization)."""
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv, train={"max_steps": 10, "grad_accum": 1},
                         schedule={"thresholds": [0.5, 20.0], "steps_per_stage": 5, "memorization_samples": 32})
    ok(subprocess.run([sys.executable, "-m", "sora_cli", "schedule", str(recipe), "-o", str(tmp_path / "one")],
                      capture_output=True, text=True))
    ok(torchrun(["schedule", str(recipe), "-o", str(tmp_path / "two")]))
    for k in (0, 1):
        assert_same_tensors(tmp_path / "one" / "stages" / str(k), tmp_path / "two" / "stages" / str(k))
    rows = [[json.loads(x) for x in (tmp_path / run / "schedule.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    keys = ("stage", "nonzero_gates", "memorization", "generalization")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert rows[0][1]["nonzero_gates"] < rows[0][0]["nonzero_gates"]  # the higher λ switched ranks off


# ---------------------------------------------------------------------------------------------
# Failures and resume


def workers(parent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes (its children)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            for item in env:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=")[1])] = int(proc.name)
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped, is not)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def kill_rank_1_after(args: list[str], exists: Path) -> tuple[subprocess.Popen[str], str]:
    """Launch `sora ARGS` on 2 processes, SIGKILL rank 1 once `exists` does, wait for the launch to end: (the launch,
    its stderr). Asserts that no worker outlives the launch (rank 0 must not be left waiting for rank 1)."""
    launch = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", "-m", "sora_cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not exists.is_dir() and launch.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    pids = workers(launch.pid)
    assert 1 in pids, "the run ended (or never started) before rank 1 could be killed"
    os.kill(pids[1], signal.SIGKILL)
    _, err = launch.communicate(timeout=120)
    assert alive([os.getpid()]) == [os.getpid()]  # the check can see a live process
    assert not alive(list(pids.values())), "a worker outlived its torchrun launch"
    return launch, err


def test_a_killed_rank_stops_every_rank_and_the_run_resumes_with_one_or_two(tmp_path: Path, bert_dir: Path,
                                                                            tiny_csv: Path) -> None:
    # float64: 60 steps of float32 reordering drift by ~1e-6; resume itself must add nothing
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv, model={"dtype": "float64"},
                         train={"max_steps": 60, "save_every": 5, "eval_every": 30, "grad_accum": 1, "log_every": 5})
    full = one_process(recipe, tmp_path / "full")
    cut = tmp_path / "cut"
    launch, _ = kill_rank_1_after(["train", str(recipe), "-o", str(cut)], cut / "checkpoints" / "step-10")
    assert launch.returncode != 0
    assert not (cut / "final").exists()
    for ckpt in (cut / "checkpoints").glob("step-*"):  # every checkpoint left is whole
        load_adapter(ckpt)
        load_training_state(ckpt)
    for n in (1, 2):
        run = tmp_path / f"resumed-{n}"
        shutil.copytree(cut, run)
        if n == 1:
            train(load_recipe(recipe, [f"train.output_dir={run}"]), resume=True)
        else:
            ok(torchrun(["train", str(recipe), "-o", str(run), "--resume"]))
        assert_same_tensors(full / "final", run / "final", atol=1e-12)
        assert_same_losses(full, run)


def test_a_bad_input_stops_every_rank_with_one_line(tmp_path: Path, bert_dir: Path, tiny_csv: Path) -> None:
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv, train={"batch_size": 1, "grad_accum": 1})
    p = torchrun(["train", str(recipe), "-o", str(tmp_path / "run")])
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if "error:" in line]
    assert lines == ["error: train.batch_size: 1 is the global batch, split across the 2 processes; give at least "
                     "2, or launch fewer processes"], p.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    p = torchrun(["train", str(recipe), "-o", str(tmp_path / "run"), "train.lr=fast"])  # before the group forms
    assert [line for line in p.stderr.splitlines() if "error:" in line] == \
        [f"error: {recipe}: train.lr: expected a finite number, got 'fast'"], p.stderr[-2000:]
