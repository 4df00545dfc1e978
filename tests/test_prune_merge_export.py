"""prune / merge / PEFT export against the unpruned adapted model's outputs; inspect numbers by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from sora_cli.checkpoint import load_adapter
from sora_cli.cli import app
from sora_cli.adapters import SoRA
from sora_cli.engine import train
from sora_cli.merge import merge
from sora_cli.models import load_adapted, load_base
from sora_cli.prune import prune
from sora_cli.recipe import load_recipe
from sora_cli.report import inspect_adapter

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def ckpt(make_recipe) -> Path:
    """A trained tiny SoRA adapter with some gates exactly zero; one module's gates all zero."""
    recipe = load_recipe(make_recipe(train={"eval_every": None}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    tensors, meta = load_adapter(final)
    tensors["bert.pooler.dense.gate"] = torch.zeros(4)  # a whole module switched off
    meta["modules"]["bert.pooler.dense"]["active_rank"] = 0
    from sora_cli.checkpoint import save_adapter

    save_adapter(final, tensors, {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    return final


def batch(tokenizer) -> dict[str, torch.Tensor]:
    from .conftest import make_sentences

    return dict(tokenizer([t for t, _ in make_sentences(24, seed=11)], padding=True, return_tensors="pt"))


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits computed in float64 (the model is converted in place): comparisons then measure the
    math (a pruned rank, a float32-rounded merged weight), not how this CPU's float32 kernels sum."""
    with torch.no_grad():
        return model.to(torch.float64)(**inputs).logits


def test_prune_keeps_outputs_and_counts(ckpt: Path) -> None:
    tensors, meta = load_adapter(ckpt)
    pruned, pmeta = prune(tensors, meta)
    zero = sum(int((t == 0).sum()) for k, t in tensors.items() if k.endswith(".gate"))
    assert 4 < zero < 52
    assert tensors["bert.pooler.dense.gate"].shape == (4,)  # inputs untouched
    assert pmeta["modules"]["bert.pooler.dense"]["r"] == 0 and "bert.pooler.dense.lora_A" not in pruned
    expected = sum(int((tensors[f"{n}.gate"] != 0).sum()) * (m["d_in"] + m["d_out"] + 1)
                   for n, m in meta["modules"].items())
    adapter_keys = [k for k in pruned if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate")]
    assert sum(pruned[k].numel() for k in adapter_keys) == expected
    for name, m in pmeta["modules"].items():  # s unchanged; each module's update identical
        assert m["s"] == meta["modules"][name]["s"] and m["r_max"] == 4
        if m["r"]:
            torch.testing.assert_close(SoRA.delta(pruned, name, m), SoRA.delta(tensors, name, m), atol=1e-7, rtol=0)

    result = invoke("prune", str(ckpt))
    assert result.exit_code == 0, result.output
    out = ckpt.parent / "final-pruned"
    before = sum(m["r"] * (m["d_in"] + m["d_out"] + 1) for m in meta["modules"].values())
    assert f"adapter parameters {before:,d} -> {expected:,d}" in result.output
    full, tokenizer, _ = load_adapted(ckpt)
    small, _, _ = load_adapted(out)
    assert type(small.bert.pooler.dense) is nn.Linear  # no adapter left there
    inputs = batch(tokenizer)
    torch.testing.assert_close(logits(small, inputs), logits(full, inputs), atol=1e-10, rtol=0)  # same function


def test_merge_equals_adapted_model(ckpt: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    result = invoke("merge", str(ckpt), "-o", str(out))
    assert result.exit_code == 0, result.output
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k or k.endswith(".gate") for k in weights)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no adapter code involved
    adapted, tokenizer, _ = load_adapted(ckpt)
    inputs = batch(tokenizer)
    # The merged weights are rounded to float32 once (relative 2^-24 each); the adapted model is exact in float64.
    torch.testing.assert_close(logits(merged, inputs), logits(adapted, inputs), atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()


def test_merging_all_zero_gates_reproduces_the_base(ckpt: Path) -> None:
    tensors, meta = load_adapter(ckpt)
    for k in tensors:
        if k.endswith(".gate"):
            tensors[k] = torch.zeros_like(tensors[k])
    base, _ = load_base(ckpt, meta)
    state = base.state_dict()
    merged = merge(state, tensors, meta)
    for name in meta["modules"]:
        assert torch.equal(merged[f"{name}.weight"], state[f"{name}.weight"])
    assert torch.equal(merged["classifier.weight"], tensors["classifier.weight"])  # the trained head


def test_peft_round_trip(ckpt: Path, tmp_path: Path) -> None:
    import peft  # a test dependency: CI fails rather than skip this
    result = invoke("prune", str(ckpt), "-o", str(tmp_path / "pruned"), "--peft", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == config["alpha_pattern"]
    assert "bert.pooler.dense" not in config["target_modules"] and "gate" not in json.dumps(config)
    assert config["modules_to_save"] == ["classifier"]
    adapted, tokenizer, meta = load_adapted(ckpt)
    base, _ = load_base(ckpt, meta)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    inputs = batch(tokenizer)
    # The export folds s·B·diag(g) into lora_B in float32 (relative 2^-24 per weight); otherwise the same function.
    torch.testing.assert_close(logits(model, inputs), logits(adapted, inputs), atol=1e-5, rtol=0)
    assert invoke("merge", str(ckpt), "-o", str(tmp_path / "merged")).exit_code == 0
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = model.merge_and_unload().state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key].to(value.dtype), value, atol=1e-6, rtol=0)


def test_inspect_numbers_by_hand() -> None:
    tensors = {
        "enc.layer.0.attn.q.lora_A": torch.zeros(4, 10), "enc.layer.0.attn.q.lora_B": torch.zeros(6, 4),
        "enc.layer.0.attn.q.gate": torch.tensor([0.0, 0.5, -2.0, 0.25]),
        "enc.layer.1.attn.q.lora_A": torch.zeros(4, 10), "enc.layer.1.attn.q.lora_B": torch.zeros(6, 4),
        "enc.layer.1.attn.q.gate": torch.zeros(4),
    }
    module = {"r": 4, "s": 2.0, "d_in": 10, "d_out": 6}
    meta = {"method": "sora", "step": 9, "base_parameters": 1000,
            "modules": {"enc.layer.0.attn.q": dict(module, active_rank=3), "enc.layer.1.attn.q": dict(module)}}
    report = inspect_adapter(tensors, meta)
    first = report["modules"][0]
    assert first == {"module": "enc.layer.0.attn.q", "type": "attn.q", "layer": 0, "r_max": 4, "r": 4, "rank": 3,
                     "gate_l1": 2.75, "gate_min": 0.25, "gate_median": 0.5, "gate_max": 2.0,
                     "params": 4 * 17, "params_pruned": 3 * 17, "base_sparsity": None}
    assert report["modules"][1]["rank"] == 0 and report["modules"][1]["gate_median"] is None
    assert report["by_type"] == {"attn.q": {"modules": 2, "r_max": 8, "rank": 3}}
    assert report["by_layer"] == {"0": {"modules": 1, "r_max": 4, "rank": 3}, "1": {"modules": 1, "r_max": 4, "rank": 0}}
    assert report["summary"] == {"modules": 2, "modules_alive": 1, "r_max": 8, "r": 8, "rank": 3,
                                 "rank_kept_percent": 37.5, "params": 136, "params_pruned": 51,
                                 "base_parameters": 1000, "percent_of_base": 5.1, "base_sparsity": None}


def test_inspect_cli(ckpt: Path, tmp_path: Path) -> None:
    result = invoke("inspect", str(ckpt), "--sort", "rank")
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", str(ckpt), "--json").output)
    s = report["summary"]
    assert f"surviving rank {s['rank']} / 52" in result.output and "in 12 of 13 modules" in result.output
    assert "bert.encoder.layer.1.attention.self.query" in result.output and "by module type" in result.output
    assert report["by_layer"]["other"] == {"modules": 1, "r_max": 4, "rank": 0}  # the pooler
    pytest.importorskip("matplotlib")
    plot = tmp_path / "ranks.png"
    assert invoke("inspect", str(ckpt), "--plot", str(plot)).exit_code == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_inspect_plot_without_matplotlib(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = invoke("inspect", str(ckpt), "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_bad_input_is_one_line_and_writes_nothing(ckpt: Path, tmp_path: Path) -> None:
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    for command in (["inspect"], ["prune"], ["merge", "-o", str(tmp_path / "m")]):
        result = invoke(command[0], str(nothing), *command[1:])
        assert result.exit_code == 2 and "not a sora checkpoint (adapter.json is missing)" in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "nothing-pruned").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    for command in (["prune", "-o"], ["merge", "-o"]):
        result = invoke(command[0], str(ckpt), command[1], str(taken))
        assert result.exit_code == 2 and "already exists; choose another path or pass --force" in result.output
    assert list(taken.iterdir()) == []

    meta = json.loads((ckpt / "adapter.json").read_text())
    meta["base_model"] = str(tmp_path / "gone")
    (ckpt / "adapter.json").write_text(json.dumps(meta))
    result = invoke("merge", str(ckpt), "-o", str(tmp_path / "m"))
    assert result.exit_code == 2 and "cannot be loaded" in result.output and "pass --base" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()

    weights = ckpt / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    result = invoke("prune", str(ckpt))
    assert result.exit_code == 2 and "unreadable safetensors file" in result.output
    assert not (ckpt.parent / "final-pruned").exists()


def test_merge_refuses_another_base(ckpt: Path, tmp_path: Path) -> None:
    from transformers import BertModel

    from .conftest import NEGATIVE, NEUTRAL, POSITIVE, SPECIAL, tiny_bert_config

    other = tmp_path / "other-base"
    torch.manual_seed(123)
    BertModel(tiny_bert_config(len(SPECIAL + NEUTRAL + POSITIVE + NEGATIVE))).save_pretrained(other)
    meta = json.loads((ckpt / "adapter.json").read_text())
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(meta["base_model"]).save_pretrained(other)
    result = invoke("merge", str(ckpt), "--base", str(other), "-o", str(tmp_path / "m"))
    assert result.exit_code == 2 and "has other weights (fingerprint differs)" in result.output
    assert not (tmp_path / "m").exists()


def test_prune_on_a_real_minilm_checkpoint(tmp_path: Path) -> None:
    """The packaged MiniLM, a few steps with a fixed threshold so that about half the gates are zero."""
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    run = tmp_path / "minilm"
    result = invoke("train", str(recipe), "train.max_steps=6", "adapter.threshold=fixed", "adapter.sparse_lambda=0.1",
                    "data.max_train_samples=96", "data.max_eval_samples=32", "train.eval_every=null", "-o", str(run))
    assert result.exit_code == 0, result.output
    assert invoke("prune", str(run / "final")).exit_code == 0
    tensors, meta = load_adapter(run / "final")
    zero = sum(int((t == 0).sum()) for k, t in tensors.items() if k.endswith(".gate"))
    assert 0.2 < zero / 296 < 0.8
    full, tokenizer, _ = load_adapted(run / "final")
    small, _, _ = load_adapted(run / "final-pruned")
    pruned, _ = load_adapter(run / "final-pruned")
    surviving = sum(int((tensors[f"{n}.gate"] != 0).sum()) * (m["d_in"] + m["d_out"] + 1)
                    for n, m in meta["modules"].items())
    assert sum(t.numel() for k, t in pruned.items() if not k.startswith("classifier.")) == surviving
    inputs = dict(tokenizer(["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate."] * 4,
                            padding=True, return_tensors="pt"))
    torch.testing.assert_close(logits(small, inputs), logits(full, inputs), atol=1e-10, rtol=0)  # same function


def test_lora_checkpoint_inspect_prune_and_bf16_merge(make_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(make_recipe(adapter={"method": "lora", "sparse_lambda": None},
                                     train={"max_steps": 5, "eval_every": None}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    report = json.loads(invoke("inspect", str(final), "--json").output)
    assert report["summary"]["rank"] == report["summary"]["r_max"] == 52  # every rank survives
    # r·(d_in + d_out), no gate: per layer q k v o (32+32 each), FFN in and out (32+48 each); and the pooler
    assert report["summary"]["params"] == report["summary"]["params_pruned"] == 4 * (2 * (4 * 64 + 2 * 80) + 64)
    result = invoke("prune", str(final), "--peft", str(tmp_path / "peft"))
    assert result.exit_code == 0 and "adapter parameters 3,584 -> 3,584" in result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 13 and config["r"] == 4
    assert invoke("merge", str(final), "-o", str(tmp_path / "m"), "--dtype", "bfloat16").exit_code == 0
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert weights["classifier.weight"].dtype == torch.bfloat16


def test_a_pruned_checkpoint_merges_to_the_same_weights(ckpt: Path, tmp_path: Path) -> None:
    assert invoke("prune", str(ckpt), "-o", str(tmp_path / "pruned")).exit_code == 0
    assert invoke("merge", str(ckpt), "-o", str(tmp_path / "a")).exit_code == 0
    assert invoke("merge", str(tmp_path / "pruned"), "-o", str(tmp_path / "b")).exit_code == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_prune_paths_and_empty_export(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ckpt)
    assert invoke("prune", ".").exit_code == 0  # a sibling of the checkpoint, not inside it
    assert (ckpt.parent / "final-pruned" / "adapter.json").is_file() and not (ckpt / "-pruned").exists()
    same = tmp_path / "same"
    result = invoke("prune", str(ckpt), "-o", str(same), "--peft", str(same))
    assert result.exit_code == 2 and "overlaps --output" in result.output and not same.exists()
    result = invoke("prune", str(ckpt), "-o", str(ckpt / "inner"))
    assert result.exit_code == 2 and "overlaps the checkpoint" in result.output and not (ckpt / "inner").exists()
    tensors, meta = load_adapter(ckpt)
    for k in tensors:
        if k.endswith(".gate"):
            tensors[k] = torch.zeros_like(tensors[k])
    from sora_cli.checkpoint import save_adapter

    dead = tmp_path / "dead"
    dead.mkdir()
    save_adapter(dead, tensors, meta)
    result = invoke("prune", str(dead), "-o", str(tmp_path / "p"), "--peft", str(tmp_path / "peft"))
    assert result.exit_code == 2 and "no rank survives" in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "peft").exists()


def test_damaged_metadata_and_missing_tensors(ckpt: Path) -> None:
    meta = json.loads((ckpt / "adapter.json").read_text())
    (ckpt / "adapter.json").write_text(json.dumps({"format": "sora-adapter", "method": "sora"}))
    result = invoke("inspect", str(ckpt))
    assert result.exit_code == 2 and "adapter.json: incomplete, missing base_model" in result.output
    (ckpt / "adapter.json").write_text(json.dumps(meta))
    from safetensors.torch import save_file

    tensors = load_file(ckpt / "adapter.safetensors")
    del tensors["bert.encoder.layer.0.attention.self.query.lora_B"]
    save_file(tensors, ckpt / "adapter.safetensors")
    for command in ("inspect", "prune"):
        result = invoke(command, str(ckpt))
        assert result.exit_code == 2 and "tensors of bert.encoder.layer.0.attention.self.query are missing" \
            in result.output


def test_a_bf16_trained_adapter_merges_in_bf16(make_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(make_recipe(model={"dtype": "bfloat16"}, train={"max_steps": 4, "eval_every": None}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    assert json.loads((final / "adapter.json").read_text())["base_model_loading"]["dtype"] == "bfloat16"
    result = invoke("merge", str(final), "-o", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert weights["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.bfloat16  # --dtype auto
    model, _, _ = load_adapted(final)
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_merge_refuses_to_write_weights_that_overflow_the_saved_dtype(ckpt: Path, tmp_path: Path) -> None:
    """A finite adapter whose update passes float16's 65,504: not written (one line), where float32 holds it."""
    from sora_cli.checkpoint import save_adapter

    tensors, meta = load_adapter(ckpt)
    name = next(k for k in tensors if k.endswith("query.lora_B"))
    tensors[name] = tensors[name] * 0 + 1e9  # B = 1e9 everywhere: |ΔW| far above float16's range
    save_adapter(ckpt, tensors, {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    result = invoke("merge", str(ckpt), "--dtype", "float16", "-o", str(tmp_path / "m16"))
    module = name.removesuffix(".lora_B")
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: --output: not written: the merged {module}.weight holds non-finite values (NaN or infinity) in "
        "float16; merge into a wider --dtype"], result.output
    assert not (tmp_path / "m16").exists()
    assert invoke("merge", str(ckpt), "--dtype", "float32", "-o", str(tmp_path / "m32")).exit_code == 0
