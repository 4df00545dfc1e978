"""RoseLoRA through the checkpoint tools: `inspect`'s update support (nnz of A, B and B A, Proposition 1's bound,
the touched fraction) by hand and on a run; `merge`'s count of changed and rounded-away base weights (float64 run,
bfloat16 by hand); `prune --peft` round trip through PEFT with the zeros of A and B intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sora_cli.checkpoint import load_adapter, save_adapter
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.merge import MERGE_REPORT, merge_counted, merge_weight
from sora_cli.models import load_adapted, load_base
from sora_cli.recipe import load_recipe
from sora_cli.report import inspect_adapter

ROSE = {"method": "roselora", "sparse_lambda": None, "density": 0.25, "sparsify_start": 4, "sparsify_end": 16}
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def rose64(make_recipe) -> Path:
    """A tiny RoseLoRA run in float64 (20 steps, τ = 0.25 from step 16): its final checkpoint."""
    recipe = load_recipe(make_recipe(adapter=ROSE, model={"dtype": "float64"},
                                     train={"max_steps": 20, "eval_every": None}))
    train(recipe)
    return Path(recipe.train.output_dir) / "final"


def by_hand() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Three modules: a sparse one whose B A cancels in one entry, a dense one at the bound's cap, a pruned one."""
    tensors = {
        # A (2, 4): rows with 2 and 2 non-zeros; B (3, 2): columns with 1 and 2 non-zeros
        "enc.layer.0.q.lora_A": torch.tensor([[1.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 3.0]]),
        "enc.layer.0.q.lora_B": torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]),
        "enc.layer.1.q.lora_A": torch.ones(2, 2), "enc.layer.1.q.lora_B": torch.ones(2, 2),
    }
    modules = {"enc.layer.0.q": {"r": 2, "s": 2.0, "d_in": 4, "d_out": 3},
               "enc.layer.1.q": {"r": 2, "s": 0.5, "d_in": 2, "d_out": 2},
               "enc.layer.2.q": {"r": 0, "r_max": 2, "s": 2.0, "d_in": 4, "d_out": 3}}
    return tensors, modules


def test_inspect_support_by_hand() -> None:
    tensors, modules = by_hand()
    report = inspect_adapter(tensors, {"method": "roselora", "step": 3, "modules": modules})
    first, dense, pruned = report["support"]["modules"]
    # s·B A = 2·[[0, 0, 2, 3], [0, 0, 0, 0], [-1, 0, 0, 3]]: the (0, 0) entry cancels (1·1 + 1·(−1)), so
    # nnz(ΔW) = 4 below the bound Σ_i nnz(B[:, i])·nnz(A[i, :]) = 1·2 + 2·2 = 6
    assert first == {"module": "enc.layer.0.q", "nnz_A": 4, "numel_A": 8, "density_A": 0.5, "nnz_B": 3, "numel_B": 6,
                     "density_B": 0.5, "nnz_delta": 4, "bound": 6, "base_weights": 12, "touched_fraction": 4 / 12}
    # dense 2 × 2: Σ = 2·2 + 2·2 = 8, capped at d_out·d_in = 4
    assert (dense["nnz_delta"], dense["bound"], dense["touched_fraction"], dense["density_A"]) == (4, 4, 1.0, 1.0)
    assert pruned == {"module": "enc.layer.2.q", "nnz_A": 0, "numel_A": 0, "density_A": None, "nnz_B": 0,
                      "numel_B": 0, "density_B": None, "nnz_delta": 0, "bound": 0, "base_weights": 12,
                      "touched_fraction": 0.0}
    assert report["support"]["total"] == {"nnz_A": 8, "numel_A": 12, "nnz_B": 7, "numel_B": 10, "nnz_delta": 8,
                                          "bound": 10, "base_weights": 28, "density_A": 8 / 12, "density_B": 0.7,
                                          "touched_fraction": 8 / 28}
    assert report["summary"]["rank"] == 4  # the existing numbers are all still there
    lora = inspect_adapter(tensors, {"method": "lora", "step": 3, "modules": modules})
    assert "support" not in lora  # methods without sparse factors: the report is unchanged


def test_inspect_on_a_roselora_run(rose64: Path, tmp_path: Path) -> None:
    result = invoke("inspect", str(rose64))
    assert result.exit_code == 0, result.output
    assert "update support" in result.output and "nnz(ΔW)" in result.output
    report = json.loads(invoke("inspect", str(rose64), "--json").output)
    tensors, meta = load_adapter(rose64)
    rows = {r["module"]: r for r in report["support"]["modules"]}
    for name, m in meta["modules"].items():
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        row = rows[name]
        assert row["nnz_A"] == 4 * -(-m["d_in"] // 4) and row["nnz_B"] == 4 * -(-m["d_out"] // 4), name  # ⌈τ·d⌉ each
        assert row["nnz_delta"] == int(torch.count_nonzero(m["s"] * b @ a)) <= row["bound"], name
        assert row["touched_fraction"] == row["nnz_delta"] / (m["d_in"] * m["d_out"])
    total = report["support"]["total"]
    assert f"{total['nnz_delta']:,d}" in result.output and 0 < total["touched_fraction"] < 0.5
    pytest.importorskip("matplotlib")
    plot = tmp_path / "support.png"
    assert invoke("inspect", str(rose64), "--plot", str(plot)).exit_code == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def _direct_counts(ckpt: Path, merged_dir: Path, dtype: torch.dtype) -> tuple[dict[str, int], int]:
    """Changed weights per module, counted directly between the saved model and the base (both in `dtype`), and
    the number of ΔW entries != 0."""
    from sora_cli.adapters import RoseLoRA

    tensors, meta = load_adapter(ckpt)
    base, _ = load_base(ckpt, meta)
    saved = load_file(merged_dir / "model.safetensors")
    state = base.state_dict()
    changed = {n: int((saved[f"{n}.weight"] != state[f"{n}.weight"].to(dtype)).sum()) for n in meta["modules"]}
    nonzero = sum(int(torch.count_nonzero(RoseLoRA.delta(tensors, n, m))) for n, m in meta["modules"].items())
    return changed, nonzero


def test_merge_counts_changed_weights_on_a_float64_run(rose64: Path, tmp_path: Path) -> None:
    result = invoke("merge", str(rose64), "-o", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "m" / MERGE_REPORT).read_text())
    changed, nonzero = _direct_counts(rose64, tmp_path / "m", torch.float64)
    assert {n: c["changed"] for n, c in merged["modules"].items()} == changed
    support = json.loads(invoke("inspect", str(rose64), "--json").output)["support"]["total"]
    # in float64 nothing rounds away: every non-zero entry of ΔW (inspect's exact count) changed its weight
    assert merged["total"]["changed"] == sum(changed.values()) == nonzero == support["nnz_delta"]
    assert merged["total"]["rounded_away"] == 0 and merged["dtype"] == "float64"
    weights = merged["total"]["weights"]
    assert weights == support["base_weights"]
    assert (f"changed {nonzero:,d} of {weights:,d} base weights of the adapted modules "
            f"({100 * nonzero / weights:.2f}%), counted in float64; 0 non-zero updates rounded away") in result.output
    assert "hint:" not in result.output

    result = invoke("merge", str(rose64), "-o", str(tmp_path / "b"), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "b" / MERGE_REPORT).read_text())
    changed, _ = _direct_counts(rose64, tmp_path / "b", torch.bfloat16)
    t = merged["total"]
    assert {n: c["changed"] for n, c in merged["modules"].items()} == changed and t["changed"] == sum(changed.values())
    assert t["changed"] + t["rounded_away"] == nonzero and t["rounded_away"] > 0  # ~1e-3 updates on ~0.1 weights
    assert f"{t['rounded_away']:,d} non-zero updates rounded away" in result.output and "hint:" in result.output


def test_merge_counts_updates_rounded_away_in_bfloat16() -> None:
    # ΔW = 1 · B A = [[1, 1e-4, 1e-6, 0.5, 0], [1e-2, 1e-6, 1e-8, 5e-3, 0]]; bfloat16 keeps 8 significant bits, so
    # next to 1 its step is 2^-7 (2^-8 below 1): 1e-4 and 1e-6 vanish, 1e-2 and 5e-3 round up to 1 + 2^-7, and
    # 1e-8 on a weight of 0 stays (a bfloat16 has float32's exponent range)
    w0 = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 1, 1]], dtype=torch.bfloat16)
    tensors = {"lin.lora_A": torch.tensor([[1.0, 1e-4, 1e-6, 0.5, 0.0]]), "lin.lora_B": torch.tensor([[1.0], [1e-2]])}
    meta = {"method": "roselora", "modules": {"lin": {"r": 1, "s": 1.0, "d_in": 5, "d_out": 2}}}
    merged, counts = merge_counted({"lin.weight": w0}, tensors, meta)
    step = 2.0**-7
    expected = torch.tensor([[2.0, 1, 1, 1.5, 1], [1 + step, 1, 1e-8, 1 + step, 1]], dtype=torch.bfloat16)
    assert torch.equal(merged["lin.weight"], expected)
    # the base's one zero (row 2, column 3) takes the 1e-8: a plain merge fills it
    assert counts == {"lin": {"weights": 10, "nonzero_delta": 8, "changed": 5, "rounded_away": 3, "zeros_before": 1,
                              "zeros_after": 0, "kept_rounded_to_zero": 0}}
    # a float32 base keeps all 8 updates; saved as bfloat16 the same 3 round away
    w32 = w0.float()
    delta = tensors["lin.lora_B"] @ tensors["lin.lora_A"]
    assert merge_weight(w32, delta)[1] == {"weights": 10, "nonzero_delta": 8, "changed": 8, "rounded_away": 0,
                                           "zeros_before": 1, "zeros_after": 0, "kept_rounded_to_zero": 0}
    assert merge_weight(w32, delta, torch.bfloat16)[1] == counts["lin"]


def _zero_one_rank(ckpt: Path) -> tuple[str, str]:
    """Zero one A row of one module and one B column of another (a rank that adds nothing; prune must cut it)."""
    tensors, meta = load_adapter(ckpt)
    row, col = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"
    tensors[f"{row}.lora_A"][1] = 0.0
    tensors[f"{col}.lora_B"][:, 2] = 0.0
    save_adapter(ckpt, tensors, {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    return row, col


def test_peft_round_trip_keeps_the_zeros(rose64: Path, tmp_path: Path) -> None:
    import peft  # a test dependency: CI fails rather than skip this

    row, col = _zero_one_rank(rose64)
    result = invoke("prune", str(rose64), "-o", str(tmp_path / "pruned"), "--peft", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"][row] == config["rank_pattern"][col] == 3 and len(config["rank_pattern"]) == 13
    tensors, meta = load_adapter(rose64)
    exported = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for name, m in meta["modules"].items():
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        keep = (a.abs().amax(dim=1) > 0) & (b.abs().amax(dim=0) > 0)  # (r,)
        pa, pb = exported[f"base_model.model.{name}.lora_A.weight"], exported[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(pa == 0, a[keep] == 0) and torch.equal(pb == 0, b[:, keep] == 0), name
        assert torch.equal(pb.double(), (m["s"] * b[:, keep]).float().double()), name  # s folded into B, float32
    adapted, tokenizer, meta = load_adapted(rose64)
    base, _ = load_base(rose64, meta)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    from .conftest import make_sentences

    inputs = dict(tokenizer([t for t, _ in make_sentences(24, seed=11)], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ours, theirs = adapted.double()(**inputs).logits, model.double()(**inputs).logits
    # the export rounds A and s·B to float32 once (relative 2^-24 per entry; measured 7.5e-10 here), the rest is the
    # same float64 math
    torch.testing.assert_close(theirs, ours, atol=1e-8, rtol=0)
