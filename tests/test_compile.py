"""train.compile: a compiled run against the eager run on the same batches, its graph-break count, and the
one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sora_cli import compiled
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.recipe import load_recipe

from .conftest import events

runner = CliRunner()


def test_a_model_without_transformer_blocks_is_refused() -> None:
    from transformers import AlbertConfig, AlbertModel

    albert = AlbertModel(AlbertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=37, embedding_size=16))
    with pytest.raises(InputError, match=r"^train.compile: AlbertModel names no transformer blocks to compile "
                                         r"\(transformers' _no_split_modules\); remove train.compile$"):
        compiled.check(albert, torch.device("cpu"), quantized=False)


def test_a_compiled_sora_run_is_the_eager_run(causal_recipe: Any) -> None:
    """SoRA (proximal step on the gates) with gradient checkpointing, 6 steps over batches of changing length: the
    compiled blocks give the eager run's losses and adapter to float32 tolerance. Inductor fuses and reorders
    float32 arithmetic (a few units of 6e-8 per op); over 6 AdamW steps of lr 1e-2 that leaves ~1e-6 on the
    weights, and Adam's normalised steps keep it there (a gradient that differed in sign would show as 2e-2)."""
    sections: dict[str, Any] = {"train": {"max_steps": 6, "eval_every": 6, "save_every": 6, "log_every": 1,
                                          "gradient_checkpointing": True}}
    eager = load_recipe(causal_recipe("eager", **sections))
    train(eager)
    fast = load_recipe(causal_recipe("fast", **sections), ["train.compile=true"])
    result = train(fast)
    assert result.stats["compiled_blocks"] == 2 and result.stats["graph_breaks"] == 0
    a_run, b_run = Path(eager.train.output_dir), Path(fast.train.output_dir)
    [event] = events(b_run, "compile")
    assert (event["blocks"], event["graph_breaks"], event["eager_fallbacks"]) == (2, 0, 0)
    assert result.stats["eager_fallbacks"] == 0
    losses = [(a["loss"], b["loss"]) for a, b in zip(events(a_run, "train"), events(b_run, "train"), strict=True)]
    assert len(losses) == 6 and all(abs(a - b) < 1e-5 for a, b in losses), losses
    a, b = load_file(a_run / "final" / "adapter.safetensors"), load_file(b_run / "final" / "adapter.safetensors")
    assert a.keys() == b.keys()
    gaps = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(gaps.values()) < 2e-5, gaps
    gates = [k for k in a if k.endswith(".gate")]
    assert gates and all(torch.equal(a[k] == 0, b[k] == 0) for k in gates)  # the same ranks switched off
    assert json.loads((b_run / "final" / "adapter.json").read_text())["method"] == "sora"


def test_compile_is_refused_on_a_quantized_base(causal_recipe: Any) -> None:
    recipe = causal_recipe("q", model={"quantization": "nf4"}, train={"compile": True})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: train.compile: a bitsandbytes-quantized base does not compile (its 4-bit and 8-bit kernels are "
        "opaque to torch.compile); remove train.compile or model.quantization")


def test_compile_is_refused_without_a_cpp_compiler(causal_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    result = runner.invoke(app, ["train", str(causal_recipe("c", train={"compile": True}))])
    assert result.exit_code == 2
    assert "train.compile: torch.compile on CPU builds C++ kernels and no C++ " in result.output
    assert not (Path(load_recipe(causal_recipe("c")).train.output_dir)).exists()  # nothing written


def saved_by_autograd(model: Any) -> int:
    """Tensors autograd keeps for backward outside any checkpoint, in one forward; then the backward."""
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = model(input_ids=torch.tensor([[3, 5, 7, 9, 11]]), use_cache=False).logits
    out.sum().backward()
    return len(saved)


def test_compiled_blocks_are_checkpointed_from_outside(tiny_llama_dir: Path) -> None:
    """With checkpointing, autograd keeps (outside the checkpoints) only what enters each block: a fraction of
    what the compiled blocks keep without it; eval mode runs the class's own forward."""
    from transformers import AutoModelForCausalLM

    kept = {}
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        model.model.embed_tokens.weight.requires_grad_(True)  # something upstream needs a gradient
        compiled.compile_blocks(model, checkpointing)
        model.train()
        kept[checkpointing] = saved_by_autograd(model)
        assert model.model.embed_tokens.weight.grad is not None
    assert kept[True] < kept[False] / 2, kept
    model.eval()
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[3, 5]])).logits.shape == (1, 2, model.config.vocab_size)


@pytest.mark.parametrize("method", ["lora", "roselora", "lors"])
def test_every_method_compiles_without_a_graph_break(tiny_llama_dir: Path, method: str) -> None:
    """RoseLoRA's masks (from step 1: they change every step) and LoRS's recompute (its own autograd Function):
    4 steps over lengths 20–29, compiled against eager, with no graph break."""
    import contextlib
    import copy

    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from sora_cli.adapters import adapter_layers, get_method
    from sora_cli.adapters.inject import inject
    from sora_cli.engine import train_step
    from sora_cli.recipe import AdapterConfig, DataConfig, TrainConfig
    from sora_cli.tasks.causal_lm import CausalLMTask

    torch._dynamo.reset()
    counters.clear()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    extra: dict[str, Any] = {"density": 0.5, "sparsify_start": 0, "sparsify_end": 3} if method == "roselora" else {}
    task = CausalLMTask(DataConfig(train_file="x", task_type="causal_lm"))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for k in range(4):
        ids = torch.randint(3, 60, (4, 20 + 3 * k), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    losses = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base)
        adapter = get_method(AdapterConfig(method=method, r=4, alpha=8.0, **extra), TrainConfig(max_steps=4))
        torch.manual_seed(1)
        inject(model, adapter, ())
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.lora_B.normal_(0, 0.1)
        adapter.setup(model, 4, None)
        if mode == "compiled":
            compiled.compile_blocks(model)
        params, optimizer = [p for p in model.parameters() if p.requires_grad], adapter.optimizer(model)
        model.train()
        losses[mode] = [float(train_step(model, task, adapter, optimizer, [b], params, 1.0, contextlib.nullcontext(),
                                         k)[0]) for k, b in enumerate(batches)]
    assert compiled.graph_breaks() == 0, dict(counters["graph_break"])
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5, rel=0)


def test_a_recompile_limit_hit_is_counted_and_reported() -> None:
    """Past dynamo's recompile limit a function runs eagerly with no error: the run's summary must say so."""
    from sora_cli.render import stats_rows

    def scale(x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k  # each new Python int k is a new guard: a recompile

    fast = torch.compile(scale, backend="eager", dynamic=False)
    before = compiled.eager_fallbacks()
    with torch._dynamo.config.patch(recompile_limit=2):
        results = [fast(torch.ones(2), k) for k in range(5)]
    assert [float(r[0]) for r in results] == [0, 1, 2, 3, 4]  # still right, only slower
    hits = compiled.eager_fallbacks() - before
    assert hits >= 1
    rows = stats_rows({"compiled_blocks": 2, "graph_breaks": 0, "eager_fallbacks": hits})
    assert ("warning", f"torch.compile hit dynamo's recompile limit {hits} times: the blocks' later variants ran "
                       "eagerly (raise torch._dynamo.config.recompile_limit, or keep input shapes steady)") in rows
    assert not any(r[0] == "warning" for r in stats_rows({"compiled_blocks": 2, "graph_breaks": 0,
                                                          "eager_fallbacks": 0}))

