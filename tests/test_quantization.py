"""A quantized base (model.quantization, QLoRA) on a tiny Llama: the 4-bit layer against the dense formula on the
dequantized weight, loading (what is quantized, what stays float32), SoRA's exact zeros and the PEFT round trip on
the 4-bit base, merge into the full-precision checkpoint and into the dequantized weights against the dense formula,
evaluation as trained, exact resume, and every refusal (one line, exit 2, nothing written).

bitsandbytes' CPU kernels dequantize a block (64 weights) and run an ordinary float32 matmul, so in float32 the
4-bit layer equals x W_dqᵀ to float32 rounding (checked against float64 below); nothing here depends on the CPU's
own kernels (its repacked bfloat16 inference path is switched off by `quantization.settle`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from sora_cli import quantization
from sora_cli.adapters import SoRALinear
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.models import load_adapted
from sora_cli.recipe import ModelConfig, load_recipe

from .conftest import events, write_recipe
from .test_edit import EDITS

runner = CliRunner()
NF4 = ModelConfig(name_or_path="x", quantization="nf4", double_quantization=True, compute_dtype="float32")


@pytest.fixture
def q_recipe(causal_recipe):
    """The causal tests' recipe (tiny Llama, alpaca sentiment records) on an NF4 base, with a λ that cuts ranks."""
    def make(name: str = "q", **sections: dict[str, Any]) -> Path:
        base = {"model": {"quantization": "nf4"}, "adapter": {"sparse_lambda": 20.0},
                "train": {"max_steps": 16, "eval_every": 8, "save_every": 8}}
        for key, values in sections.items():
            base.setdefault(key, {}).update(values)
        return causal_recipe(name, **base)

    return make


def quantized_linear(seed: int = 0, d_in: int = 96, d_out: int = 40,
                     cfg: ModelConfig = NF4) -> tuple[Any, torch.Tensor]:
    """(a bitsandbytes layer, its full-precision weight) with a bias; weights ~ N(0, 0.02) like a Llama's."""
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out)
    with torch.no_grad():
        dense.weight.normal_(0, 0.02)
    w = dense.weight.detach().clone()
    return quantization.quantized_linear(dense, cfg), w


# ---------------------------------------------------------------------------------------------
# The layer against the dense formula


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_a_4bit_sora_layer_is_the_dense_formula_on_the_dequantized_weight(kind: str) -> None:
    cfg = ModelConfig(name_or_path="x", quantization=kind, double_quantization=True, compute_dtype="float32")
    base, w = quantized_linear(cfg=cfg)
    w_dq = quantization.dense_weight(base)
    assert w_dq.shape == w.shape and not torch.equal(w_dq, w)  # 4 bits: not the float weight ...
    assert torch.equal(w_dq, quantization.roundtrip(w, cfg))  # ... but exactly its quantize-dequantize
    layer = SoRALinear(base, r=4, alpha=8)
    assert layer.quantized and layer.lora_A.dtype == torch.float32 and not hasattr(layer, "weight")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 96)
    s, g, a, b = 2.0, layer.gate.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    bias = base.bias.detach()
    dense = x.double() @ (w_dq.double() + s * b.double() @ torch.diag(g.double()) @ a.double()).T + bias.double()
    for mode in (layer.train, layer.eval):  # evaluation computes what training computes (no CPU repacking)
        mode()
        with torch.no_grad():
            out = layer(x)
        assert out.dtype == torch.float32
        # float32 sums of 96 + 4 products of O(1): a few 2^-24 relative; 1e-5 absolute is ample and 100x below
        # the quantization error itself (checked: the formula on the float weight is far off)
        torch.testing.assert_close(out.double(), dense, atol=1e-5, rtol=0)
    far = x.double() @ (w.double() + s * b.double() @ torch.diag(g.double()) @ a.double()).T + bias.double()
    assert (out.double() - far).abs().max() > 1e-3


def test_bfloat16_compute_runs_the_adapter_product_in_bfloat16_and_keeps_float32_parameters() -> None:
    cfg = ModelConfig(name_or_path="x", quantization="nf4", double_quantization=False, compute_dtype="bfloat16")
    base, _ = quantized_linear(cfg=cfg)
    layer = SoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 96)
    out = layer(x)
    out.sum().backward()
    assert out.dtype == torch.float32 and layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    with torch.no_grad():
        update = (out - base(x)).double()  # the adapter's part: s · B (g ⊙ A x)
    a, b, g = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.gate.detach().double()
    dense = 2.0 * (x.double() @ a.T * g) @ b.T
    # bfloat16 keeps 8 significant bits (relative 2^-9 per rounding, a handful of roundings on entries of O(1));
    # the same product in float32 would be off by ~1e-6 only
    err = float((update - dense).abs().max() / dense.abs().max())
    assert 1e-4 < err < 2e-2, err


def test_8bit_dense_weight_is_the_rowwise_absmax_formula() -> None:
    cfg = ModelConfig(name_or_path="x", quantization="int8")
    base, w = quantized_linear(cfg=cfg)
    # CB = round(127 · W / absmax_row), W_dq = CB · absmax_row / 127, from the float16 weight (bitsandbytes' input)
    w16 = w.to(torch.float16).float()
    absmax = w16.abs().amax(dim=1, keepdim=True)
    expected = torch.round(127 * w16 / absmax) * absmax / 127
    torch.testing.assert_close(quantization.dense_weight(base), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Loading


def test_quantized_loading_keeps_the_head_norms_and_adapters_in_float32(q_recipe) -> None:
    from sora_cli.engine import prepare

    recipe = load_recipe(q_recipe(model={"dtype": "bfloat16"}))
    assert recipe.model.double_quantization is True and recipe.model.compute_dtype == "float32"  # resolved
    run = prepare(recipe, Path(recipe.train.output_dir or ""))
    model = run.model
    layers = [m for m in model.modules() if isinstance(m, SoRALinear)]
    assert len(layers) == 14 and all(type(m.base_layer).__name__ == "Linear4bit" for m in layers)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16  # transformers' choice
    norms = [m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in run.params)
    # the count of the base is of weights, not of packed bytes: 14 linears of the tiny Llama hold 15,360
    assert run.facts["base_parameters"] == sum(p.numel() for p in tiny_float_model(recipe).parameters())


def tiny_float_model(recipe: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)


def test_a_base_quantized_after_loading_equals_transformers_quantized_loading(tiny_llama_dir: Path) -> None:
    """The GGUF path (transformers dequantises GGUF blocks to float and cannot quantize while loading them) quantizes
    after loading: it must hold the very weights transformers' own quantized loading holds."""
    from transformers import AutoModelForCausalLM

    quantization.require_bitsandbytes()
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    names = quantization.quantize_linears(ours, NF4, keep=quantization.output_modules(ours))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization.bnb_config(NF4))
    assert len(names) == 14 and "lm_head" not in names
    for name in names:
        assert torch.equal(quantization.dense_weight(ours.get_submodule(name)),
                           quantization.dense_weight(theirs.get_submodule(name))), name


# ---------------------------------------------------------------------------------------------
# Training, export, merge, evaluation


@pytest.fixture
def q_run(q_recipe) -> Path:
    recipe = load_recipe(q_recipe())
    train(recipe)
    return Path(recipe.train.output_dir or "")


def test_sora_on_a_4bit_base_cuts_gates_to_exact_zero_and_exports_to_peft_on_the_same_base(
        q_run: Path, tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    tensors = load_file(q_run / "final" / "adapter.safetensors")
    gates = torch.cat([v for k, v in tensors.items() if k.endswith(".gate")])
    assert 0 < int((gates == 0).sum()) < gates.numel()  # λ = 20 cut some ranks to exactly 0, not all
    meta = json.loads((q_run / "final" / "adapter.json").read_text())
    assert meta["base_model_loading"]["quantization"] == {"type": "nf4", "bits": 4, "double_quantization": True,
                                                          "compute_dtype": "float32", "blocksize": 64}
    result = runner.invoke(app, ["prune", str(q_run / "final"), "-o", str(tmp_path / "pruned"), "--peft",
                                 str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    adapted, tok, _ = load_adapted(q_run / "final")
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], quantization_config=quantization.bnb_config(NF4))
    quantization.settle(base)  # the same float32 kernels on every CPU (see the module docstring)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    batch = tok(["the film was great", "the plot was very bad and the movie awful"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        # the export folds s·B·diag(g) into lora_B in float32: relative 2^-24 per weight, the same function
        torch.testing.assert_close(theirs(**batch).logits, adapted(**batch).logits, atol=2e-5, rtol=0)


def test_merge_into_the_full_precision_and_the_dequantized_weights_is_the_dense_formula(
        q_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tensors = load_file(q_run / "final" / "adapter.safetensors")
    meta = json.loads((q_run / "final" / "adapter.json").read_text())
    full = AutoModelForCausalLM.from_pretrained(meta["base_model"])
    for into in ("full", "dequantized"):
        result = runner.invoke(app, ["merge", str(q_run / "final"), "-o", str(tmp_path / into), "--into", into])
        assert result.exit_code == 0, result.output
        said = "full-precision weights it was quantized from" if into == "full" else "dequantized nf4"
        assert said in result.output
        merged = load_file(tmp_path / into / "model.safetensors")
        report = json.loads((tmp_path / into / "sora_merge.json").read_text())
        errors, norms = 0.0, 0.0
        for name, m in meta["modules"].items():
            w = full.get_submodule(name).weight.detach()
            w0 = w if into == "full" else quantization.roundtrip(w, NF4)
            g = tensors[f"{name}.gate"]
            delta = m["s"] * (tensors[f"{name}.lora_B"] * g) @ tensors[f"{name}.lora_A"]  # s · B diag(g) A
            torch.testing.assert_close(merged[f"{name}.weight"], w0 + delta, atol=1e-7, rtol=0)
            errors += float((quantization.roundtrip(w, NF4) - w).norm()) ** 2
            norms += float(w.norm()) ** 2
            assert report["quantization"]["error"]["modules"][name]["relative"] == pytest.approx(
                float((quantization.roundtrip(w, NF4) - w).norm() / w.norm()), rel=1e-6)
        assert report["quantization"]["merged_into"] == into
        assert report["quantization"]["error"]["relative"] == pytest.approx(math.sqrt(errors / norms), rel=1e-6)
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # untouched, full precision
            assert torch.equal(merged[key], full.state_dict()[key])
    # the dequantized merge computes what the quantized run computes: its logits equal the adapted 4-bit model's
    adapted, tok, _ = load_adapted(q_run / "final")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    batch = tok(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, atol=2e-5, rtol=0)


def test_eval_of_a_quantized_run_scores_it_as_trained_and_inspect_names_the_quantization(q_run: Path) -> None:
    result = runner.invoke(app, ["eval", str(q_run / "final"), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output)["metrics"]
    trained = [e for e in events(q_run, "test") if e["checkpoint"] == "final"][-1]
    assert scored["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert scored["token_accuracy"] == trained["token_accuracy"]
    result = runner.invoke(app, ["inspect", str(q_run / "final")])
    assert result.exit_code == 0 and "4-bit nf4 (blocks of 64, double quantization), compute in float32" in \
        " ".join(result.output.split())
    assert "base sparsity" not in result.output  # NF4's zero level is rounding, not a pruned pattern


def test_a_quantized_run_resumes_exactly(q_run: Path, q_recipe) -> None:
    part = load_recipe(q_recipe("part"))
    train(part)
    resumed = Path(part.train.output_dir or "")
    for name in ("checkpoints/step-16", "final", "best"):
        shutil.rmtree(resumed / name, ignore_errors=True)  # as if killed right after step 8's checkpoint
    again = train(part, resume=True)
    assert (again.resumed_from, again.step) == (8, 16)
    a = load_file(q_run / "final" / "adapter.safetensors")
    b = load_file(resumed / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the field, exit 2, nothing written


def _refused(args: list[str], out: Path | None = None) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    if out is not None:
        assert not out.exists(), "a refused command must write nothing"
    return " ".join(result.output.split())


def test_bad_quantization_settings_are_one_line_each(q_recipe, tmp_path: Path) -> None:
    recipe = q_recipe()
    out = tmp_path / "runs" / "q"
    cases = {
        ("adapter.method=lors", "adapter.sparse_lambda=null"): "model.quantization: nf4 cannot keep a sparse base's "
                                                               "zero pattern exactly",
        ("adapter.keep_sparsity=true",): "model.quantization: nf4 cannot keep a sparse base's zero pattern",
        ("model.quantization=nf8",): "model.quantization: expected one of nf4, fp4, int8, got 'nf8'",
        ("model.quantization=null", "model.double_quantization=false"): "model.double_quantization: only applies to "
                                                                         "a 4-bit base",
        ("model.quantization=int8", "model.compute_dtype=bfloat16"): "model.compute_dtype: only applies to a 4-bit "
                                                                      "base (model.quantization: nf4 or fp4), got "
                                                                      "quantization int8",
        ("model.dtype=float64",): "model.dtype: float64 cannot hold a quantized base",
        ("adapter.modules_to_save=[lm_head, down_proj]",): "adapter.modules_to_save: model.layers.0.mlp.down_proj is "
                                                          "quantized (model.quantization)",
    }
    for overrides, message in cases.items():
        assert message in _refused(["train", str(recipe), *overrides], out), overrides


def test_quantization_without_bitsandbytes_is_one_line(q_recipe, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = quantization.importlib.util.find_spec
    monkeypatch.setattr(quantization.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    line = _refused(["train", str(q_recipe()), "train.max_steps=1"], tmp_path / "runs" / "q")
    assert "model.quantization: a quantized base needs the bitsandbytes package: pip install bitsandbytes" in line


def test_merge_into_dequantized_needs_a_quantized_run_and_sparsify_refuses_one(
        q_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(q_recipe("plain", model={"quantization": None}, train={"max_steps": 2, "eval_every": None,
                                                                                "save_every": None}))
    train(recipe)
    line = _refused(["merge", str(Path(recipe.train.output_dir or "") / "final"), "-o", str(tmp_path / "m"),
                     "--into", "dequantized"], tmp_path / "m")
    assert "--into: dequantized applies to a run on a quantized base" in line
    line = _refused(["sparsify", str(q_recipe()), "-o", str(tmp_path / "s"), "--method", "magnitude",
                     "--sparsity", "0.5"], tmp_path / "s")
    assert "model.quantization: sora sparsify prunes full-precision weights, not nf4 codes" in line


def test_a_knowledge_edit_on_a_4bit_base_counts_the_weights_it_changes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """RoseLoRA's headline use on a quantized LLM: the edit runs, and its count of changed base weights is taken
    against the dequantized W0 (what `merge --into dequantized` would change)."""
    from sora_cli.editing.run import run_edits

    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))
    recipe = write_recipe(tmp_path / "edit.yaml", {
        "model": {"name_or_path": str(tiny_llama_dir), "quantization": "nf4"},
        "adapter": {"method": "roselora", "r": 4, "alpha": 16, "density": 0.25, "sparsify_start": 2,
                    "sparsify_end": 12, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train_file": str(edits), "task_type": "edit", "max_length": 32},
        "train": {"lr": 5e-2, "batch_size": 1, "max_steps": 20, "lr_scheduler": "constant",
                  "output_dir": str(tmp_path / "runs" / "edit"), "seed": 5},
        "edit": {"mode": "single"}}, {})
    run_edits(load_recipe(recipe))
    lines = [json.loads(line) for line in (tmp_path / "runs" / "edit" / "edits.jsonl").read_text().splitlines()]
    for r in lines:  # q_proj (32 × 32) and v_proj (16 × 32) of 2 layers; ⌈0.25 · d⌉ entries per row / column
        assert r["adapted_base_weights"] == 2 * (32 * 32 + 16 * 32)
        assert 0 < r["changed_weights"] <= 2 * (8 * 8 + 4 * 8) * 4


def test_gradient_checkpointing_on_a_4bit_base_trains_the_same_adapter(q_recipe) -> None:
    runs = []
    for name, ckpt in (("plain", False), ("ckpt", True)):
        recipe = load_recipe(q_recipe(name, train={"max_steps": 4, "eval_every": None, "save_every": None,
                                                   "gradient_checkpointing": ckpt}))
        train(recipe)
        runs.append(load_file(Path(recipe.train.output_dir or "") / "final" / "adapter.safetensors"))
    a, b = runs
    assert a.keys() == b.keys()
    for key in a:  # recomputation repeats the same float32 kernels; summation order may differ by a few ulps
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.endswith("lora_B"))  # it trained


def test_a_classifier_on_a_4bit_encoder_keeps_its_head_in_full_precision(make_recipe) -> None:
    """transformers' own choice of what stays unquantized misses a classifier with a bias (its last parameter is
    `classifier.bias`): sora names the task head to it, so the head trains in full precision."""
    recipe = load_recipe(make_recipe("cls", model={"quantization": "nf4"},
                                     train={"max_steps": 4, "eval_every": None, "save_every": None}))
    result = train(recipe)
    assert result.test and result.stats["max_rank"] > 0
    model, _, meta = load_adapted(Path(recipe.train.output_dir or "") / "final")
    assert meta["modules_to_save"] == ["classifier"] and type(model.classifier) is nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"


def test_a_bfloat16_4bit_base_keeps_bfloat16_hidden_states_with_float32_norms(q_recipe) -> None:
    """Float32 norm weights must not promote a bfloat16 model's residual stream (and every activation) to float32,
    nor break its bfloat16 lm_head without autocast."""
    from sora_cli.engine import prepare

    recipe = load_recipe(q_recipe(model={"dtype": "bfloat16", "compute_dtype": "bfloat16"}))
    run = prepare(recipe, Path(recipe.train.output_dir or ""))
    model = run.model
    assert all(p.dtype == torch.float32 for p in model.model.norm.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, output_hidden_states=True)  # precision fp32: no autocast
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16} and out.logits.dtype == torch.bfloat16
    loss = run.task.loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in run.params)


def test_the_shipped_qlora_recipe_trains_on_the_packaged_gguf_and_merges_into_its_float_weights(
        tmp_path: Path) -> None:
    """recipes/quickstart-qlora.yaml offline: the packaged GGUF (dequantised to float by transformers, then quantized
    by sora) trains a step with its gates, and merges into the GGUF's float weights after the fingerprint check
    (their quantization equals what the run trained on)."""
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart-qlora.yaml"
    run = tmp_path / "qlora"
    result = runner.invoke(app, ["train", str(recipe), "train.max_steps=1", "data.max_train_samples=8",
                                 "data.max_eval_samples=2", "data.max_new_tokens=2", "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert "base 4-bit nf4 (blocks of 64, double quantization), compute in float32" in " ".join(result.output.split())
    meta = json.loads((run / "final" / "adapter.json").read_text())
    assert meta["base_model_loading"]["quantization"]["type"] == "nf4" and len(meta["modules"]) == 30 * 7
    result = runner.invoke(app, ["merge", str(run / "final"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "sora_merge.json").read_text())
    assert report["quantization"]["merged_into"] == "full" and 0.05 < report["quantization"]["error"]["relative"] < 0.15
