"""train.strategy: fsdp on CPU (gloo, 2 processes): FSDP2 shards the frozen base, and the run is one process's run.

The sharded weights are all-gathered exactly (float32 in, float32 out), so FSDP2 differs from data parallelism in
nothing that reaches a number: its adapter equals DDP's bit for bit, and one process's within the float32
reordering of the two ranks' gradient halves. The comparisons with one process run in float64, where 1e-9 is far
above that reordering (~1e-15) and far below what a wrong step moves (~1e-2)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification

from sora_cli.checkpoint import load_adapter, load_training_state
from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.fsdp import transformer_blocks
from sora_cli.recipe import RecipeError, load_recipe
from sora_cli.strategy import assemble
from tests.conftest import events, tiny_llama_config, write_jsonl, write_recipe
from tests.test_ddp import (
    assert_same_losses,
    assert_same_tensors,
    bert_dir,  # noqa: F401 (a fixture)
    bert_recipe,
    causal_recipe,
    kill_rank_1_after,
    ok,
    one_process,
    tensors,
    torchrun,
)
from tests.tiny_causal import WORDS

FSDP = {"strategy": "fsdp"}


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """114 records of 1 to 6 answer words: 91 train (batches of 5 leave 1 example at each epoch's end, so rank 1
    runs a placeholder), 11 dev (one rank predicts one example more than the other) and 12 test."""
    rng = random.Random(5)
    words = [w for w in WORDS if w.isalpha()]
    rows = [{"instruction": "write", "input": " ".join(rng.sample(words, rng.randint(1, 4))),
             "output": " ".join(rng.sample(words, rng.randint(1, 6)))} for _ in range(114)]
    return write_jsonl(tmp_path_factory.mktemp("odd") / "odd.jsonl", rows)


def llama_recipe(tmp_path: Path, llama: Path, data: Path, adapter: dict[str, Any], **train: Any) -> Path:
    recipe = causal_recipe(tmp_path / "r.yaml", llama, data, adapter=adapter, model={"dtype": "float64"},
                           train={"batch_size": 5, "max_steps": 20, "eval_every": 10, "save_every": 10, **train})
    return write_recipe(recipe, yaml.safe_load(recipe.read_text()), {"data": {"exact_match": True,
                                                                             "max_new_tokens": 3}})


# ---------------------------------------------------------------------------------------------
# Without processes


def test_blocks_are_the_repeated_layers_and_a_model_without_them_is_refused() -> None:
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(tiny_llama_config())
    assert transformer_blocks(llama) == list(llama.model.layers)
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32))
    assert transformer_blocks(bert) == list(bert.bert.encoder.layer)  # BertEmbeddings, also named, stays in the root
    albert = AlbertForSequenceClassification(AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=16,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(InputError, match="AlbertForSequenceClassification names no transformer blocks to shard"):
        transformer_blocks(albert)


def test_padded_rows_of_a_rank_are_dropped() -> None:
    """Under FSDP2 a rank one example short predicts its first example again: that row is not the split's."""
    import numpy as np

    parts: list[tuple[list[int], Any]] = [([0, 2], {"x": np.array([10.0, 12.0])}),
                                          ([1], {"x": np.array([11.0, 11.0])})]
    assert assemble(parts, 3)["x"].tolist() == [10.0, 11.0, 12.0]


@pytest.mark.parametrize(("sections", "message"), [
    ({"adapter": {"method": "lors"}}, "adapter.method: lors with keep_sparsity needs each base weight whole"),
    ({"model": {"quantization": "int8"}}, "model.quantization: int8 under FSDP2"),
    ({"edit": {"mode": "single"}}, "train.strategy: fsdp, but knowledge editing gives each process its own requests"),
    ({"train": {"fsdp_cpu_offload": True, "device": "cpu"}}, "train.fsdp_cpu_offload: the run is on the CPU already"),
    ({"train": {"strategy": "ddp", "fsdp_cpu_offload": True}},
     "train.fsdp_cpu_offload: only applies to train.strategy: fsdp, not ddp"),
])
def test_what_fsdp_cannot_shard_is_refused_by_the_recipe(sections: dict[str, Any], message: str, tmp_path: Path,
                                                          tiny_llama_dir: Path, odd_file: Path) -> None:
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, odd_file, train=FSDP)
    write_recipe(recipe, yaml.safe_load(recipe.read_text()), sections)
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(recipe)


def test_a_model_without_blocks_is_one_line_exit_2(tmp_path: Path, bert_dir: Path,  # noqa: F811
                                                   tiny_csv: Path) -> None:
    """ALBERT shares one layer's weights across depth and names no blocks: both ranks refuse it before sharding."""
    from transformers import AlbertModel

    albert = tmp_path / "albert"
    vocab = len((bert_dir / "vocab.txt").read_text().split())
    AlbertModel(AlbertConfig(vocab_size=vocab, embedding_size=8, hidden_size=16, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(albert)
    for f in bert_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, albert / f.name)
    recipe = bert_recipe(tmp_path / "r.yaml", albert, tiny_csv, train=FSDP)
    p = torchrun(["train", str(recipe), "-o", str(tmp_path / "run")])
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr
    assert [line for line in p.stderr.splitlines() if "error:" in line] == [
        "error: train.strategy: fsdp shards a model block by block, but AlbertForSequenceClassification names no "
        "transformer blocks to shard (transformers' _no_split_modules); use strategy: ddp"], p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_fsdp_without_torchrun_is_one_line_exit_2(tmp_path: Path, tiny_llama_dir: Path, odd_file: Path) -> None:
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, odd_file, train=FSDP)
    p = subprocess.run([sys.executable, "-m", "sora_cli", "train", str(recipe), "-o", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert [line for line in p.stderr.splitlines() if line.strip()] == [
        "error: train.strategy: fsdp shards the model over torchrun's processes, but this is one process; launch it "
        "with torchrun --nproc_per_node=N (N >= 2), or use strategy: auto"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Two sharded processes against one


@pytest.mark.parametrize("method", ["lora", "roselora"])
def test_causal_methods_sharded_match_one_process(method: str, tmp_path: Path, tiny_llama_dir: Path,
                                                  odd_file: Path) -> None:
    """Llama, answers of unequal length, a placeholder micro-batch at each epoch's end, dev and test splits of odd
    size, greedy generation (exact match): the losses, adapter, RoseLoRA's surviving entries and every metric
    are one process's; gradient checkpointing under FSDP2 (the sharded run only) changes nothing."""
    adapter: dict[str, Any] = {"method": method}
    if method == "roselora":
        adapter.update(density=0.5, sparsify_start=4, sparsify_end=12)
    recipe = llama_recipe(tmp_path, tiny_llama_dir, odd_file, adapter)
    one = one_process(recipe, tmp_path / "one")
    two = tmp_path / "two"
    p = ok(torchrun(["train", str(recipe), "-o", str(two), "train.strategy=fsdp",
                     "train.gradient_checkpointing=true"]))
    assert "91 train / 11 dev / 12 test examples; 20 steps on cpu (fsdp over 2 processes)" in p.stdout
    assert_same_losses(one, two)
    assert_same_tensors(one / "final", two / "final", atol=1e-9)
    if method == "roselora":
        ta, tb = tensors(one / "final"), tensors(two / "final")
        assert all(torch.equal(ta[k] == 0, tb[k] == 0) for k in ta)
        assert sum(int((v == 0).sum()) for v in ta.values()) > 0
    for kind in ("eval", "test"):
        for a, b in zip(events(one, kind), events(two, kind), strict=True):
            assert a.keys() == b.keys() and a["exact_match"] == b["exact_match"]
            assert all(b[k] == pytest.approx(a[k], rel=1e-9) for k in a if isinstance(a[k], float))


def ddp_and_fsdp(recipe: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The recipe under DDP and under FSDP2 (2 processes each): the adapter, every logged loss and every evaluation
    equal bit for bit. Returns the two run directories."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    ok(torchrun(["train", str(recipe), "-o", str(ddp)]))
    ok(torchrun(["train", str(recipe), "-o", str(fsdp), "train.strategy=fsdp"]))
    ta, tb = tensors(ddp / "final"), tensors(fsdp / "final")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [e["loss"] for e in events(ddp, "train")] == [e["loss"] for e in events(fsdp, "train")]
    assert events(ddp, "eval") == events(fsdp, "eval")
    return ddp, fsdp


def test_sora_sharded_equals_ddp_bit_for_bit_and_one_process(tmp_path: Path, bert_dir: Path,  # noqa: F811
                                                             tiny_csv: Path) -> None:
    """BERT + SoRA (the encoder's layers sharded, the classifier head trained whole), float32: FSDP2's adapter and
    every logged loss equal DDP's bit for bit; the same gates are zero as in one process."""
    recipe = bert_recipe(tmp_path / "r.yaml", bert_dir, tiny_csv)
    one = one_process(recipe, tmp_path / "one")
    _, fsdp = ddp_and_fsdp(recipe, tmp_path)
    zero = {k: (v == 0).tolist() for k, v in tensors(one / "final").items() if k.endswith("gate")}
    assert zero == {k: (v == 0).tolist() for k, v in tensors(fsdp / "final").items() if k.endswith("gate")}
    assert 0 < sum(sum(z) for z in zero.values()) < 52
    assert_same_tensors(one / "final", fsdp / "final")  # float32: the reordering of the two halves' sums


def test_a_4bit_base_sharded_equals_ddp_bit_for_bit(tmp_path: Path, tiny_llama_dir: Path, odd_file: Path) -> None:
    """FSDP-QLoRA: the NF4 codes (uint8 storage) are sharded and all-gathered like any weight, and bitsandbytes finds
    their quantization state on the layer: the adapter equals DDP's on the same 4-bit base bit for bit, and one
    process's within float32 reordering (6 steps: ~1e-6)."""
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, odd_file, model={"quantization": "nf4"},
                           train={"batch_size": 6, "max_steps": 6, "eval_every": 3, "save_every": 3})
    one = one_process(recipe, tmp_path / "one")
    _, fsdp = ddp_and_fsdp(recipe, tmp_path)
    assert_same_tensors(one / "final", fsdp / "final", atol=1e-5)
    _, meta = load_adapter(fsdp / "final")
    assert meta["base_model_loading"]["quantization"]["type"] == "nf4"


# ---------------------------------------------------------------------------------------------
# Checkpoints across strategies, failures


def cut_at(run: Path, step: int, into: Path) -> Path:
    """A copy of a finished run as it stood after the checkpoint of `step` (later checkpoints, best/, final/ gone)."""
    shutil.copytree(run, into)
    for later in (into / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    for name in ("final", "best"):
        shutil.rmtree(into / name, ignore_errors=True)
    return into


def test_saved_under_fsdp_resumes_under_one_process_and_ddp_and_back(tmp_path: Path, tiny_llama_dir: Path,
                                                                     odd_file: Path) -> None:
    """The checkpoint is the same file whatever wrote it: a sharded run's step-10 resumes in one process and under
    DDP, and one process's step-10 under FSDP2, each ending where the uninterrupted run ends (float64)."""
    recipe = llama_recipe(tmp_path, tiny_llama_dir, odd_file, {"method": "sora", "sparse_lambda": 5.0})
    full = tmp_path / "full"
    ok(torchrun(["train", str(recipe), "-o", str(full), "train.strategy=fsdp"]))
    state, meta = load_training_state(full / "checkpoints" / "step-10")
    assert meta["rng"]["ranks"] == 2
    one = train(load_recipe(recipe, [f"train.output_dir={cut_at(full, 10, tmp_path / 'to-one')}"]), resume=True)
    assert one.resumed_from == 10
    ok(torchrun(["train", str(recipe), "-o", str(cut_at(full, 10, tmp_path / "to-ddp")), "--resume"]))
    single = one_process(recipe, tmp_path / "single")
    ok(torchrun(["train", str(recipe), "-o", str(cut_at(single, 10, tmp_path / "to-fsdp")), "--resume",
                 "train.strategy=fsdp"]))
    for run in ("to-one", "to-ddp", "to-fsdp"):
        assert_same_tensors(full / "final", tmp_path / run / "final", atol=1e-9)
        assert_same_losses(full, tmp_path / run)
    for cmd in (["inspect", str(full / "final")], ["prune", str(full / "final"), "-o", str(tmp_path / "pruned")]):
        ok(subprocess.run([sys.executable, "-m", "sora_cli", *cmd], capture_output=True, text=True))


def test_a_killed_rank_stops_the_sharded_launch_with_checkpoints_whole(tmp_path: Path, tiny_llama_dir: Path,
                                                                      odd_file: Path) -> None:
    """Rank 1 killed mid-run: rank 0, waiting in a collective for it, stops with one line and no traceback, the
    launch fails, and every checkpoint left is whole (a sharded run's resume: the test above)."""
    recipe = llama_recipe(tmp_path, tiny_llama_dir, odd_file, {"method": "lora"}, max_steps=200, save_every=5,
                          eval_every=100, log_every=5)
    cut = tmp_path / "cut"
    launch, err = kill_rank_1_after(["train", str(recipe), "-o", str(cut), "train.strategy=fsdp"],
                                    cut / "checkpoints" / "step-10")
    assert launch.returncode != 0 and not (cut / "final").exists()
    ours = err.split("Sending process")[0]  # what follows is torchrun's own report of the killed process
    assert [line for line in ours.splitlines() if "error" in line.lower() or "Traceback" in line] == [
        "error: another process of this torchrun launch stopped (its error is above); continue the run with "
        "--resume"], err[-3000:]
    for ckpt in (cut / "checkpoints").glob("step-*"):
        load_adapter(ckpt)
        load_training_state(ckpt)
    step = max(int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*"))
    assert 10 <= step < 200
    json.loads((cut / "metrics.jsonl").read_text().splitlines()[-1])  # the log's last line is whole


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_blocks_under_torchrun_are_the_eager_run(strategy: str, tmp_path: Path, tiny_llama_dir: Path,
                                                          odd_file: Path) -> None:
    """train.compile under torchrun: DDP's gradient sums and FSDP2's all-gather and reduce-scatter hooks run around
    the compiled blocks (FSDP2's per-block hooks stay outside the graph). Float32 SoRA, 6 steps with a placeholder
    micro-batch: the losses and adapter are one eager process's to the tolerance test_compile.py argues (inductor's
    float32 reordering), no block breaks its graph, and the same ranks switch off. The weights' tolerance is wider than
    one compiled process's (test_compile.py): the ranks also sum their gradients in another order, and Adam's
    normalised step turns a gradient's relative error into up to lr × that error on entries whose gradient is small
    (measured: 2.1e-5 on an Intel Xeon, under 2e-5 on an AMD EPYC). 1e-4 is 1% of lr = 1e-2; a missed reduction or
    a gradient of the wrong sign moves an entry by ~lr, 100× more."""
    recipe = causal_recipe(tmp_path / "r.yaml", tiny_llama_dir, odd_file,
                           adapter={"method": "sora", "sparse_lambda": 0.5},
                           train={"batch_size": 5, "max_steps": 6, "eval_every": 6, "save_every": 6})
    eager = one_process(recipe, tmp_path / "eager")
    fast = tmp_path / "fast"
    p = ok(torchrun(["train", str(recipe), "-o", str(fast), f"train.strategy={strategy}", "train.compile=true"]))
    assert f"({strategy} over 2 processes)" in p.stdout
    [event] = events(fast, "compile")
    assert (event["blocks"], event["graph_breaks"]) == (2, 0)
    losses = [(a["loss"], b["loss"]) for a, b in zip(events(eager, "train"), events(fast, "train"), strict=True)]
    assert len(losses) == 6 and all(abs(a - b) < 1e-5 for a, b in losses), losses
    a, b = tensors(eager / "final"), tensors(fast / "final")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    gates = [k for k in a if k.endswith(".gate")]
    assert gates and all(torch.equal(a[k] == 0, b[k] == 0) for k in gates)
