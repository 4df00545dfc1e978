"""LoRS and keep_sparsity: the masked low-rank Function against the dense formula, gradcheck and LoRA; what it saves
for backward; bf16 autocast; gradient initialisation; training, resume, merge, prune and inspect on a sparse tiny
Llama (the base's zero pattern kept exactly, and LoRA's merge shown to fill it)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from sora_cli.adapters import LoRALinear, SoRALinear
from sora_cli.adapters.lors import weight_gradients
from sora_cli.adapters.masked import masked_lowrank_linear
from sora_cli.cli import app
from sora_cli.engine import prepare, train
from sora_cli.errors import RecipeError
from sora_cli.recipe import load_recipe

from .conftest import write_jsonl, write_recipe
from .test_causal_lm import sentiment_records
from .tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

runner = CliRunner()
D_IN, D_OUT, R, S = 6, 5, 3, 0.75


def sparse_linear(seed: int = 0, dtype: torch.dtype = torch.float64, sparsity: float = 0.5) -> nn.Linear:
    """A Linear (D_IN -> D_OUT) whose weight has its smallest |w| per row zeroed."""
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT).to(dtype)
    with torch.no_grad():
        k = int(D_IN * sparsity)
        drop = lin.weight.abs().argsort(dim=1)[:, :k]
        lin.weight.scatter_(1, drop, 0.0)
    return lin


def factors(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, D_IN, generator=g, dtype=dtype)
    b = torch.randn(D_OUT, R, generator=g, dtype=dtype)
    scale = torch.randn(R, generator=g, dtype=dtype)  # s · gate (SoRA), any per-rank scale
    return a, b, scale


def test_forward_is_the_dense_formula_and_keeps_the_zeros() -> None:
    lin = sparse_linear()
    a, b, g = factors()
    x = torch.randn(2, 4, D_IN, dtype=torch.float64)
    mask = lin.weight != 0
    w_eff = (lin.weight + b @ torch.diag(g) @ a) * mask
    expected = x @ w_eff.t() + lin.bias
    torch.testing.assert_close(masked_lowrank_linear(x, lin.weight, lin.bias, a, b, g), expected, rtol=0, atol=1e-12)
    # an input along a zeroed weight's column moves nothing through that weight: row 0's zeros are really zero
    zero_col = int(torch.nonzero(~mask[0])[0])
    e = torch.zeros(1, D_IN, dtype=torch.float64)
    e[0, zero_col] = 1.0
    h = masked_lowrank_linear(e, lin.weight.detach(), None, a, b, g)
    assert float(h[0, 0]) == 0.0 and float((b @ torch.diag(g) @ a)[0, zero_col]) != 0.0


def test_exact_gradients_pass_gradcheck() -> None:
    lin = sparse_linear()
    a, b, g = (t.requires_grad_(True) for t in factors())
    x = torch.randn(3, D_IN, dtype=torch.float64, requires_grad=True)
    bias = lin.bias.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return masked_lowrank_linear(x, lin.weight.detach(), bias, a, b, g, exact=True)

    assert torch.autograd.gradcheck(f, (x, bias, a, b, g), eps=1e-6, atol=1e-8)


def _grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(upstream)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert x.grad is not None
    return {"out": out.detach(), "x": x.grad, **grads}


@pytest.mark.parametrize("layer_class", [LoRALinear, SoRALinear])
def test_approx_on_a_dense_base_is_lora(layer_class: type[LoRALinear]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(torch.float64)
    plain, kept = layer_class(base, R, 2.0), layer_class(base, R, 2.0, keep_sparsity=True)
    kept.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.lora_B.normal_()
        kept.lora_B.copy_(plain.lora_B)
    for p in (plain.weight, plain.bias):
        p.requires_grad_(False)
    x, up = torch.randn(2, 4, D_IN, dtype=torch.float64), torch.randn(2, 4, D_OUT, dtype=torch.float64)
    ours, theirs = _grads(kept, x, up), _grads(plain, x, up)
    assert ours.keys() == theirs.keys() and {"lora_A", "lora_B"} <= ours.keys()
    assert ("gate" in ours) == (layer_class is SoRALinear)
    for key in ours:  # the same function and gradients, float64 reordering only
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-12)


def test_approx_and_exact_differ_by_the_masked_out_terms_only() -> None:
    lin = sparse_linear()
    a0, b0, g0 = factors()
    x, up = torch.randn(7, D_IN, dtype=torch.float64), torch.randn(7, D_OUT, dtype=torch.float64)
    grads = {}
    for exact in (False, True):
        a, b, g = (t.clone().requires_grad_(True) for t in (a0, b0, g0))
        masked_lowrank_linear(x, lin.weight, lin.bias, a, b, g, exact=exact).backward(up)
        grads[exact] = (a.grad, b.grad, g.grad)
    full = up.t() @ x  # Gᵀ X (d_out, d_in)
    out = full * (lin.weight == 0)  # its masked-out part: what approx keeps and exact drops
    da, db, dg = (grads[False][i] - grads[True][i] for i in range(3))
    torch.testing.assert_close(da, torch.diag(g0) @ b0.t() @ out, rtol=0, atol=1e-12)
    torch.testing.assert_close(db, out @ a0.t() @ torch.diag(g0), rtol=0, atol=1e-12)
    torch.testing.assert_close(dg, ((b0.t() @ out) * a0).sum(1), rtol=0, atol=1e-12)
    assert float(da.abs().max()) > 1e-3  # the mask really changes them


def _saved(fn: Any) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return saved


@pytest.mark.parametrize("exact", [False, True])
def test_nothing_weight_sized_is_saved_but_the_base_weight(exact: bool) -> None:
    lin = sparse_linear(dtype=torch.float32)
    a, b, g = (t.float().requires_grad_(True) for t in factors())
    x = torch.randn(8, D_IN, requires_grad=True)
    w = lin.weight.detach()

    def big(saved: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for t in saved if t.numel() == w.numel() and t.data_ptr() != w.data_ptr()]  # d_out·d_in

    ours = _saved(lambda: masked_lowrank_linear(x, w, None, a, b, g, exact=exact))
    assert any(t.data_ptr() == w.data_ptr() for t in ours)  # the hooks do see what the Function saves
    assert big(ours) == []
    naive = _saved(lambda: F.linear(x, (w + b @ torch.diag(g) @ a) * (w != 0)))  # what masked baselines do
    assert len(big(naive)) >= 2  # W_eff and the mask


def test_bf16_autocast_runs_and_is_close_to_float32() -> None:
    lin = sparse_linear(dtype=torch.float32)
    a, b, g = (t.float() for t in factors())
    x = torch.randn(4, D_IN)
    results = {}
    for on in (False, True):
        ps = [t.clone().requires_grad_(True) for t in (a, b, g)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            h = masked_lowrank_linear(x, lin.weight, lin.bias, *ps)
        h.float().sum().backward()
        results[on] = (h, [p.grad for p in ps])
    h16, grads16 = results[True]
    assert h16.dtype == torch.bfloat16 and all(gr.dtype == torch.float32 for gr in grads16)
    torch.testing.assert_close(h16.float(), results[False][0], rtol=2e-2, atol=5e-2)  # bf16: 8 significant bits
    for g16, g32 in zip(grads16, results[False][1], strict=True):
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# A sparse tiny Llama: train, resume, merge, prune, inspect


@pytest.fixture(scope="module")
def sparse_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with half of every projection row zeroed by magnitude (embeddings, norms, head untouched)."""
    from transformers import AutoModelForCausalLM

    directory = save_tiny_causal_model(tmp_path_factory.mktemp("tiny-llama"), tiny_causal_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                drop = m.weight.abs().argsort(dim=1)[:, : m.in_features // 2]
                m.weight.scatter_(1, drop, 0.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def lors_recipe(tmp_path: Path, sparse_llama: Path):
    data = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_records(120, seed=1))

    def make(name: str = "lors", **sections: dict[str, Any]) -> Path:
        recipe: dict[str, Any] = {
            "model": {"name_or_path": str(sparse_llama), "dtype": "float64"},
            "adapter": {"method": "lors", "r": 4, "alpha": 8},
            "data": {"train_file": str(data), "task_type": "causal_lm", "max_length": 64, "chat_template": True,
                     "max_new_tokens": 2, "exact_match": False},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 8, "log_every": 4, "eval_every": None,
                      "save_every": 4, "keep_last": 3, "output_dir": str(tmp_path / "runs" / name), "seed": 3},
        }
        return write_recipe(tmp_path / f"{name}.yaml", recipe, sections)

    return make


def _zeros(directory: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(directory / "model.safetensors")
    return {k: v == 0 for k, v in tensors.items() if k.endswith("proj.weight")}


def test_lors_trains_and_merges_with_the_base_zero_pattern(lors_recipe, sparse_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sora_cli.models import load_adapted

    recipe = load_recipe(lors_recipe(adapter={"use_rslora": True}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    meta = json.loads((final / "adapter.json").read_text())
    assert meta["keep_sparsity"] is True and meta["method_config"]["grad"] == "approx"
    first = meta["modules"]["model.layers.0.self_attn.q_proj"]
    assert first["s"] == 8 / math.sqrt(4) and first["base_zeros"] == 32 * 16  # use_rslora; half of 32 x 32
    result = runner.invoke(app, ["merge", str(final), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "the base's zero pattern is kept exactly" in " ".join(result.output.split())
    report = json.loads((tmp_path / "merged" / "sora_merge.json").read_text())
    assert report["zero_pattern_kept"] and report["total"]["zeros_after"] == report["total"]["zeros_before"] > 0
    assert report["total"]["changed"] == report["total"]["weights"] - report["total"]["zeros_before"]
    base, merged = _zeros(sparse_llama), _zeros(tmp_path / "merged")
    assert base.keys() == merged.keys() and len(base) == 14
    assert all(torch.equal(base[k], merged[k]) for k in base)
    adapted, tok, _ = load_adapted(final)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    batch = tok(["the film was great", "the plot was very bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, rtol=0, atol=1e-10)


def test_lora_on_the_same_base_fills_the_zeros(lors_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(lors_recipe("lora", adapter={"method": "lora"}, train={"save_every": None}))
    train(recipe)
    result = runner.invoke(app, ["merge", str(Path(recipe.train.output_dir) / "final"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m" / "sora_merge.json").read_text())
    assert not report["zero_pattern_kept"] and report["total"]["zeros_after"] < report["total"]["zeros_before"]
    assert "the base's zero pattern is NOT kept" in " ".join(result.output.split())


def test_sora_gates_on_a_sparse_base_prune_merge_and_refuse_peft(lors_recipe, sparse_llama: Path,
                                                                   tmp_path: Path) -> None:
    from sora_cli.models import load_adapted

    recipe = load_recipe(lors_recipe("sora", adapter={"method": "sora", "keep_sparsity": True, "sparse_lambda": 4.0},
                                     train={"save_every": None, "max_steps": 12}))
    result = train(recipe)
    assert 0 < result.stats["zero_gates"] < result.stats["total_gates"]
    final = Path(recipe.train.output_dir) / "final"
    pruned = tmp_path / "pruned"
    out = runner.invoke(app, ["prune", str(final), "-o", str(pruned), "--peft", str(tmp_path / "peft")])
    assert out.exit_code == 2 and not pruned.exists() and not (tmp_path / "peft").exists()
    assert "--peft: the adapter keeps the base's zero pattern" in out.output and "sora merge" in out.output
    assert runner.invoke(app, ["prune", str(final), "-o", str(pruned)]).exit_code == 0
    a, tok, _ = load_adapted(final)
    b, _, pmeta = load_adapted(pruned)
    assert pmeta["keep_sparsity"] and sum(m["r"] for m in pmeta["modules"].values()) < 14 * 4
    batch = tok(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, rtol=0, atol=1e-12)
    assert runner.invoke(app, ["merge", str(pruned), "-o", str(tmp_path / "merged")]).exit_code == 0
    base, merged = _zeros(sparse_llama), _zeros(tmp_path / "merged")
    assert all(torch.equal(base[k], merged[k]) for k in base)
    shown = runner.invoke(app, ["inspect", str(pruned)])
    assert shown.exit_code == 0 and "base sparsity" in shown.output
    assert "base sparsity of the adapted weights 50.00%; the adapter keeps its zeros" in " ".join(shown.output.split())


def test_gradient_init_is_the_top_singular_vectors_of_the_mean_gradient(lors_recipe) -> None:
    recipe = load_recipe(lors_recipe(adapter={"init": "gradient", "init_samples": 20}))
    run = prepare(recipe, Path(recipe.train.output_dir))
    layers = {n: m for n, m in run.model.named_modules() if isinstance(m, LoRALinear)}
    assert all(not m.lora_B.any() for m in layers.values())
    # the mean gradient by hand: the same 20 examples (train.seed's draw), one sum over all of them, / label tokens
    chosen = torch.randperm(len(run.data.train), generator=torch.Generator().manual_seed(3))[:20].tolist()
    batch = run.task.collate(run.data.train, chosen, run.tokenizer.pad_token_id)
    for m in layers.values():
        m.weight.requires_grad_(True)
    (run.task.loss_sum(run.model, batch) / run.task.count(batch)).backward()
    for m in layers.values():
        grad = m.weight.grad
        assert grad is not None
        _, _, vh = torch.linalg.svd(grad)  # exact SVD, float64
        top = vh[:4]  # (r, d_in)
        # the same subspace: projections onto A's rows and onto the top-4 right singular vectors agree
        torch.testing.assert_close(m.lora_A.t() @ m.lora_A, top.t() @ top, rtol=0, atol=1e-6)
    again = prepare(recipe, Path(recipe.train.output_dir))
    for name, m in dict(again.model.named_modules()).items():
        if isinstance(m, LoRALinear):
            assert torch.equal(m.lora_A, layers[name].lora_A)  # deterministic under the seed


def test_weight_gradients_average_over_all_calibration_examples(lors_recipe) -> None:
    from sora_cli.adapters.method import Calibration

    recipe = load_recipe(lors_recipe())
    run = prepare(recipe, Path(recipe.train.output_dir))
    layers = {n: m for n, m in run.model.named_modules() if isinstance(m, LoRALinear)}
    pad = run.tokenizer.pad_token_id
    batches = [run.task.collate(run.data.train, idx, pad) for idx in ([0, 1, 2], [3, 4])]
    got = weight_gradients(run.model, layers, Calibration(batches, run.task.loss_sum, run.task.count,
                                                          run.ctx.autocast))
    assert all(not m.weight.requires_grad and m.weight.grad is None for m in layers.values())
    whole = run.task.collate(run.data.train, [0, 1, 2, 3, 4], pad)
    for m in layers.values():
        m.weight.requires_grad_(True)
    (run.task.loss_sum(run.model, whole) / run.task.count(whole)).backward()
    for name, m in layers.items():
        assert m.weight.grad is not None
        torch.testing.assert_close(got[name], m.weight.grad, rtol=0, atol=1e-12)


def test_lors_resume_is_bit_identical(lors_recipe) -> None:
    full = load_recipe(lors_recipe("full", adapter={"init": "gradient", "init_samples": 16, "grad": "exact"}))
    train(full)
    part = load_recipe(lors_recipe("part", adapter={"init": "gradient", "init_samples": 16, "grad": "exact"}))
    train(part)
    resumed = Path(part.train.output_dir)
    for name in ("checkpoints/step-8", "final"):
        shutil.rmtree(resumed / name, ignore_errors=True)
    again = train(part, resume=True)
    assert (again.resumed_from, again.step) == (4, 8)
    a = load_file(Path(full.train.output_dir) / "final" / "adapter.safetensors")
    b = load_file(resumed / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "lors", "keep_sparsity": False}, "adapter.keep_sparsity: method lors always keeps"),
    ({"method": "lora", "grad": "exact"}, "adapter.grad: only applies with adapter.keep_sparsity: true"),
    ({"method": "lors", "dropout": 0.1}, "adapter.dropout: 0.1 cannot apply with keep_sparsity"),
    ({"method": "sora", "init": "gradient"}, "adapter.init: only applies to method lors, not sora"),
    ({"method": "lors", "init_samples": 0}, "adapter.init_samples: must be positive, got 0"),
])
def test_bad_lors_settings(lors_recipe, adapter: dict[str, Any], expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(lors_recipe(adapter=adapter))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
