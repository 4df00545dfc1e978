"""bench/: the smoke mode of both scripts (every row and column written), the fairness of the comparison
(same batches, same head, same initial A), and the README's Results section regenerated from results."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import ddp  # noqa: E402
import publish  # noqa: E402
import quality  # noqa: E402
import speed  # noqa: E402
import speed_causal  # noqa: E402


@pytest.fixture(scope="module")
def quality_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    quality.main(["--smoke", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def speed_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speed")
    speed.main(["--smoke", "--out", str(out)])
    return out


def table_rows(markdown: str, header: list[str]) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(header) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quality_smoke_writes_every_row_and_column(quality_out: Path) -> None:
    data = json.loads((quality_out / "quality.json").read_text())
    assert list(data["rows"]) == list(quality.ROWS)
    assert len(data["runs"]) == 2 * len(quality.ROWS)
    for key, row in data["rows"].items():  # each row summarises its own two runs
        assert row["seeds"] == [0, 1], key
        mine = [r for r in data["runs"] if r["key"] == key]
        assert row["accuracy_mean"] == pytest.approx(statistics.fmean(r["accuracy"] for r in mine), abs=1e-12)
        assert row["train_seconds_mean"] == pytest.approx(statistics.fmean(r["train_seconds"] for r in mine))
    assert (quality_out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t["target"] for t in data["targets"]} >= {"SoRA r_max=8 accuracy ≥ PEFT AdaLoRA"}
    rows = table_rows((quality_out / "quality.md").read_text(), quality.COLUMNS)
    assert [r[0] for r in rows] == [data["rows"][k]["label"] for k in quality.ROWS]
    assert all(len(r) == len(quality.COLUMNS) and all(r) for r in rows)
    # LoRA r=8 on the tiny model's 13 Linears, r (d_in + d_out) each, PEFT's count and sora's alike: per layer
    # q, k, v, attention output (32 -> 32) and intermediate / output (32 <-> 64), twice, plus the pooler (32 -> 32).
    expected = 8 * ((32 + 32) * (4 * 2 + 1) + (32 + 64) * (2 * 2))
    rows = data["rows"]
    assert rows["peft-lora"]["inference_params_mean"] == rows["sora-lora"]["inference_params_mean"] == expected
    # SoRA adds one gate entry per rank; pruning only ever removes.
    assert data["rows"]["sora-r8"]["trainable_params"] == data["rows"]["sora-lora"]["trainable_params"] + 8 * 13
    assert data["rows"]["sora-r8"]["inference_params_mean"] == expected + 8 * 13  # unpruned: every rank is shipped
    # RoseLoRA at density 0.2 ships its non-zeros: per rank ⌈0.2 d_in⌉ of A's row and ⌈0.2 d_out⌉ of B's column
    # (9 modules 32 -> 32: 7 + 7; 4 modules 32 <-> 64: 7 + 13), the schedule having reached τ by step 5 of 6
    assert data["rows"]["roselora-d20"]["inference_params_mean"] == 8 * (9 * (7 + 7) + 4 * (7 + 13))


def test_quality_runs_are_kept_and_not_repeated(quality_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (quality_out / "runs.jsonl").read_text()
    quality.main(["--smoke", "--out", str(quality_out)])
    assert (quality_out / "runs.jsonl").read_text() == before  # every (method, seed) was done: none re-run
    assert "seed 0" not in capsys.readouterr().out


def test_the_comparison_is_fair(quality_out: Path) -> None:
    runs = json.loads((quality_out / "quality.json").read_text())["runs"]
    for seed in (0, 1):
        mine = [r for r in runs if r["seed"] == seed]
        # Every method saw the same batches in the same order, and started from the same head.
        assert len({r["batches_sha256"] for r in mine}) == 1
        assert len({r["initial_sha256"]["head"] for r in mine}) == 1
        # Every method with a plain LoRA A (PEFT LoRA, sora LoRA, SoRA r_max=8) started from the same A.
        a = {r["key"]: r["initial_sha256"]["lora_A"] for r in mine}
        assert a["peft-lora"] == a["sora-lora"] == a["sora-r8"] != a["sora-r16"]
        assert a["peft-adalora"] == ""  # AdaLoRA's A is its own (Gaussian, with E = 0): nothing to share
    by_seed = {r["seed"]: r for r in runs if r["key"] == "peft-lora"}
    assert by_seed[0]["batches_sha256"] != by_seed[1]["batches_sha256"]  # the hash does see the batches
    assert by_seed[0]["initial_sha256"]["head"] != by_seed[1]["initial_sha256"]["head"]


def test_fairness_hashes_match_the_tensors(tmp_path: Path) -> None:
    """The hashes the fairness test compares are over the real tensors: PEFT's head and A equal sora's."""
    s = common.settings(True)
    setup = common.load_setup(s, True, tmp_path)
    peft_lora, sora_lora = common.build("peft-lora", setup, s, 0), common.build("sora-lora", setup, s, 0)
    name = setup.targets[3]
    peft_layer = peft_lora.model.base_model.model.get_submodule(name)
    assert torch.equal(peft_layer.lora_A["default"].weight, sora_lora.model.get_submodule(name).lora_A)
    assert torch.equal(peft_layer.lora_B["default"].weight, torch.zeros_like(peft_layer.lora_B["default"].weight))
    head = setup.heads[0]
    peft_head = peft_lora.model.base_model.model.get_submodule(head).modules_to_save["default"]
    assert torch.equal(peft_head.weight, sora_lora.model.get_submodule(head).weight)
    assert peft_lora.trainable() == sora_lora.trainable()
    # The shared A has kaiming_uniform_(a=√5)'s range, U(-1/√d_in, 1/√d_in).
    a = common.reference_a(0, name, 64, peft_layer.in_features)
    bound = 1 / peft_layer.in_features ** 0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_pruned_sora_computes_what_it_computed_before(quality_out: Path) -> None:
    runs = json.loads((quality_out / "quality.json").read_text())["runs"]
    pruned = [r for r in runs if r["key"].endswith("-pruned")]
    assert len(pruned) == 4
    for r in pruned:
        assert r["max_logit_diff_vs_unpruned"] < 1e-5
        unpruned = next(u for u in runs if u["key"] == r["key"].removesuffix("-pruned") and u["seed"] == r["seed"])
        assert r["accuracy"] == unpruned["accuracy"]
        assert r["inference_params"] <= unpruned["inference_params"]


def test_speed_smoke_writes_every_row_and_column(speed_out: Path) -> None:
    data = json.loads((speed_out / "speed.json").read_text())
    assert list(data["training"]) == list(speed.TRAINING)
    assert list(data["inference"]) == list(speed.INFERENCE)
    rows = data["training"]
    for row in rows.values():  # the reported numbers are the medians of the repeats they were timed from
        assert len(row["repeats_ms"]) == 2 and row["ms_per_step"] == pytest.approx(statistics.median(row["repeats_ms"]))
        assert row["memory_vs_peft_lora"] == pytest.approx(row["peak_mib"] / rows["peft-lora"]["peak_mib"])
    for key in ("sora-r8", "sora-lora"):  # ratios: the median of the per-repeat ratios, repeat by repeat
        for ref, column in (("peft-lora", "vs_peft_lora"), ("floor", "vs_floor")):
            pairs = zip(rows[key]["repeats_ms"], rows[ref]["repeats_ms"])
            assert rows[key][column] == pytest.approx(statistics.median(a / b for a, b in pairs)), (key, column)
    assert data["inference_setup"]["merged_vs_pruned_max_logit_diff"] < 1e-5  # merged = pruned, as functions
    assert 0 < data["inference_setup"]["pruned_rank"] < data["inference_setup"]["max_rank"]
    assert len(data["targets"]) == 3
    text = (speed_out / "speed.md").read_text()
    train = table_rows(text, speed.TRAIN_COLUMNS)
    infer = table_rows(text, speed.INFER_COLUMNS)
    assert [r[0] for r in train] == [data["training"][k]["label"] for k in speed.TRAINING]
    assert [r[0] for r in infer] == [data["inference"][k]["label"] for k in speed.INFERENCE]
    assert all(len(r) == len(speed.TRAIN_COLUMNS) and all(r) for r in train)
    assert all(len(r) == len(speed.INFER_COLUMNS) and all(r) for r in infer)


def test_publish_rewrites_only_the_results_section(quality_out: Path, speed_out: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for src in (quality_out / "quality.md", speed_out / "speed.md"):
        (results / src.name).write_text(src.read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{publish.START}\nold numbers\n{publish.END}\n\n## After\ntail\n")
    publish.main([str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "old numbers" not in text
    assert text.startswith("# x\n\n## Results\n\n" + publish.START)
    assert text.endswith(publish.END + "\n\n## After\ntail\n")
    assert "### Quality, parameters, training time" in text and "### Speed and memory" in text
    assert text.index("| PEFT LoRA r=8 |") < text.index("### Speed and memory")


def test_publish_refuses_a_readme_without_markers(tmp_path: Path, quality_out: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    with pytest.raises(SystemExit, match="needs exactly one pair of results markers"):
        publish.main([str(quality_out), "--readme", str(readme)])
    assert readme.read_text() == "# x\n"


def test_ddp_smoke_writes_every_row_and_column(tmp_path: Path) -> None:
    """bench/ddp.py launches torchrun with 1 and 2 processes; speed-ups are over the same contestant's 1-process
    median, the ratio to PEFT + DDP per repeat at the same process count."""
    out = ddp.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((out / "ddp.json").read_text())
    assert [r["processes"] for r in data["runs"]] == [1, 2] and data["runs"][1]["threads"] == 1
    one = {row["contestant"]: row for row in data["speed"] if row["processes"] == 1}
    for row in data["speed"]:
        run = data["runs"][row["processes"] - 1]
        assert row["ms_per_step"] == pytest.approx(1000 * statistics.median(run["times"][row["contestant"]]))
        assert row["speedup"] == pytest.approx(one[row["contestant"]]["ms_per_step"] / row["ms_per_step"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["processes"])
        assert row["examples_per_s"] == pytest.approx(16 / (row["ms_per_step"] / 1000))
    table = table_rows((out / "ddp.md").read_text(), ddp.COLUMNS)
    assert [r[0] for r in table] == list(ddp.CONTESTANTS.values()) * 2
    assert all(len(r) == len(ddp.COLUMNS) and all(r) for r in table)


def test_causal_speed_smoke_writes_every_row_and_column(tmp_path: Path) -> None:
    out = speed_causal.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((out / "speed_causal.json").read_text())
    rows = data["training"]
    assert list(rows) == list(speed_causal.LABELS)
    for key, row in rows.items():  # medians of the repeats; ratios per repeat; memory against PEFT's
        assert len(row["repeats_ms"]) == 2 and row["ms_per_step"] == pytest.approx(statistics.median(row["repeats_ms"]))
        pairs = zip(row["repeats_ms"], rows["peft-lora"]["repeats_ms"])
        assert row["vs_peft_lora"] == pytest.approx(statistics.median(a / b for a, b in pairs)), key
        assert row["memory_vs_peft_lora"] == pytest.approx(row["peak_mib"] / rows["peft-lora"]["peak_mib"])
    assert [t["target"] for t in data["targets"]] == ["sora LoRA step time ≤ 1.0 × PEFT LoRA's",
                                                      "SoRA step time ≤ 1.05 × sora LoRA's",
                                                      "SoRA step time ≤ 1.2 × the frozen floor's",
                                                      "sora LoRA step time ≤ 1.15 × the frozen floor's",
                                                      "SoRA step time ≤ PEFT LoRA's"]
    table = table_rows((out / "speed_causal.md").read_text(), speed_causal.COLUMNS)
    assert [r[0] for r in table] == list(speed_causal.LABELS.values())
    assert all(len(r) == len(speed_causal.COLUMNS) and all(r) for r in table)


def test_causal_ab_smoke(tmp_path: Path) -> None:
    import ab_causal

    text = ab_causal.main(["sora-lora", "sora-r8", "--smoke", "--steps", "1", "--repeats", "2", "--out", str(tmp_path)])
    rows = table_rows(text, ["contestant", "ms / step", "step / sora LoRA r=8", "repeats (ms)"])
    assert [r[0] for r in rows] == ["sora LoRA r=8", "sora SoRA r_max=8"]
    lora, sora = ([float(x) for x in r[3].split(", ")] for r in rows)
    # the table's own numbers, printed to 0.1 ms: its median and its per-repeat ratio, to that rounding
    assert len(sora) == 2 and float(rows[1][1]) == pytest.approx(statistics.median(sora), abs=0.6)
    # each repeat is printed to ±0.05 ms, so a ratio of two moves by up to 0.05/a + 0.05/b of itself (smoke steps
    # take a few ms: 2-3%), and the printed ratio by 0.0005
    spread = max(0.05 / a + 0.05 / b for a, b in zip(sora, lora, strict=True))
    assert float(rows[1][2]) == pytest.approx(statistics.median(a / b for a, b in zip(sora, lora)),
                                              rel=spread, abs=5e-4)
    assert (tmp_path / "ab-causal.md").read_text() == text


def test_editing_smoke(tmp_path: Path) -> None:
    import editing

    text = editing.main(["--smoke", "--contestants", "lora", "roselora", "--out", str(tmp_path)])
    header = ["contestant", *editing.METRICS, "base weights changed / edit", "/ LoRA's", "s / edit"]
    rows = table_rows(text, header)
    assert [r[0] for r in rows] == [editing.CONTESTANTS[k][2] for k in ("lora", "roselora")]
    data = json.loads((tmp_path / "editing.json").read_text())["summaries"]
    assert data["lora"]["protocol"] == "easyedit-teacher-forced" and data["lora"]["edits"] == 3
    # LoRA's B A is dense: every weight of the tiny model's q_proj (32 x 32) and v_proj (16 x 32), 2 layers
    assert data["lora"]["changed_weights_per_edit"] == data["lora"]["adapted_base_weights"] == 2 * (32 + 16) * 32
    share = data["roselora"]["changed_weights_per_edit"] / data["lora"]["changed_weights_per_edit"]
    assert rows[1][6] == f"{share:.4f}" and share < 0.1
    assert editing.main(["--from-json", str(tmp_path / "editing.json")]) == text  # the table from the JSON alone


def test_lors_smoke(tmp_path: Path) -> None:
    import lors

    out = lors.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((out / "lors.json").read_text())
    rows = {(r["key"], r["seq_len"]): r for r in data["speed"]["rows"]}
    assert set(rows) == {(key, n) for key in lors.CONTESTANTS for n in (16, 32)}
    for key, row in rows.items():
        assert all(row[c] > 0 for c in ("saved_bytes", "ms_per_step", "peak_mib")), key
        assert row["saved_vs_lora"] == pytest.approx(row["saved_bytes"] / rows["lora", key[1]]["saved_bytes"])
    for n in (16, 32):  # LoRS keeps no d_out x d_in tensor for backward; naive masking keeps W_eff and the mask
        assert rows["lors-approx", n]["saved_bytes"] < rows["naive-masked", n]["saved_bytes"]
    assert len(data["speed"]["checks"]) == 3 * 2
    quality = data["quality"]
    scored = {(r["base"], r["row"]): r for r in quality["rows"]}
    assert scored["dense", "dense"]["sparsity"] == 0
    for base in lors.BASES:
        sparse, lors_merged, lora_merged = (scored[base, k] for k in ("sparse", "lors", "lora"))
        assert sparse["sparsity"] == pytest.approx(0.5)  # Wanda 50% per row, and 2:4: half of the tiny model's linears
        assert (lors_merged["zeros"], lors_merged["weights"]) == (sparse["zeros"], sparse["weights"])
        assert lora_merged["sparsity"] < sparse["sparsity"]
        assert scored[base, "lora-repruned"]["zeros"] >= sparse["zeros"]
        assert quality["runs"][base]["lors"]["merge"]["zero_pattern_kept"]
        assert all(quality["runs"][base][kind]["seconds"] > 0 for kind in lors.TRAINED)
    text = (out / "lors.md").read_text()
    assert text.startswith(lors.HEADING)
    speed_table, quality_table = table_rows(text, lors.SPEED_COLUMNS), table_rows(text, lors.QUALITY_COLUMNS)
    assert [(r[0], r[1]) for r in speed_table] == [(lors.CONTESTANTS[k], str(n)) for n in (16, 32)
                                                  for k in lors.CONTESTANTS]
    assert len(quality_table) == 1 + len(lors.BASES) * (len(lors.ROWS) - 1)
    assert all(len(r) == len(lors.SPEED_COLUMNS) and all(r) for r in speed_table)
    assert all(len(r) == len(lors.QUALITY_COLUMNS) and all(r) for r in quality_table)
    (out / "lors.md").unlink()
    lors.main(["--from-json", str(out / "lors.json")])  # the tables from the JSON alone
    assert (out / "lors.md").read_text() == text


def test_memory_smoke_writes_every_row_and_column(tmp_path: Path) -> None:
    """bench/memory.py on a tiny Llama: every (base, contestant) row, the ratios from the rows' own numbers, the exact
    weight bytes equal to sora plan's, and the plan's peak beside each measured one."""
    import memory

    out = memory.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    rows = json.loads((out / "memory.json").read_text())["rows"]
    assert [(r["base"], r["key"]) for r in rows] == [(b, a) for b in memory.BASES for a in memory.ADAPTERS]
    by = {(r["base"], r["key"]): r for r in rows}
    for r in rows:
        peft, bf16 = by[(r["base"], "peft-lora")], by[("bfloat16", r["key"])]
        assert r["peak_vs_peft"] == pytest.approx(r["peak_mib"] / peft["peak_mib"])
        assert r["weights_vs_bf16"] == pytest.approx(r["weights_mib"] / bf16["weights_mib"])
        assert r["plan_vs_peak"] == pytest.approx(r["plan_mib"] / r["peak_mib"]) and r["plan_mib"] > 0
        assert len(r["step_s"]) == 1 and r["label_tokens"] >= 1
    for base in memory.BASES:  # the tensors sora loads are, byte for byte, what sora plan counts
        from sora_cli.plan import plan

        recipe = memory.recipe(tmp_path / "work" / "tiny-llama", base, "sora-sora", True, tmp_path / "work")
        assert by[(base, "sora-sora")]["weights_mib"] * memory.MIB == plan(recipe)["bytes"]["weights"]
    table = table_rows((out / "memory.md").read_text(), memory.COLUMNS)
    assert len(table) == 9 and all(len(r) == len(memory.COLUMNS) and all(r) for r in table)


def test_fsdp_smoke_measures_each_strategy_and_the_shards_are_the_plans(tmp_path: Path) -> None:
    """bench/fsdp.py on a tiny Llama: one process, DDP and FSDP2 on 2 processes, the ratios from the rows' own
    numbers; the bytes FSDP2 leaves one process are, exactly, `sora plan`'s shards plus what it keeps whole."""
    import fsdp

    from sora_cli.plan import plan

    out = fsdp.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    rows = {r["key"]: r for r in json.loads((out / "fsdp.json").read_text())["rows"]}
    assert list(rows) == list(fsdp.CONTESTANTS) and [r["processes"] for r in rows.values()] == [1, 2, 2]
    for r in rows.values():
        assert r["weights_vs_ddp"] == pytest.approx(r["weights_mib"] / rows["ddp"]["weights_mib"])
        assert r["plan_vs_peak"] == pytest.approx(r["plan_mib"] / r["peak_mib"]) and r["plan_mib"] > 0
        assert len(r["step_s"]) == 1 and len(r["peaks_mib"]) == r["processes"]
    model = tmp_path / "work" / "tiny-llama"
    sharded = plan(fsdp.bench_recipe(model, "fsdp", True, tmp_path / "work"), processes=2, strategy="fsdp")["bytes"]
    assert rows["fsdp"]["weights_mib"] * fsdp.memory.MIB == sharded["weights_shards"] + sharded["weights_whole"]
    whole = plan(fsdp.bench_recipe(model, "ddp", True, tmp_path / "work"), processes=2)["bytes"]["weights"]
    assert rows["ddp"]["weights_mib"] * fsdp.memory.MIB == whole == rows["single"]["weights_mib"] * fsdp.memory.MIB
    assert rows["fsdp"]["weights_vs_ddp"] < 0.55
    table = table_rows((out / "fsdp.md").read_text(), fsdp.COLUMNS)
    assert len(table) == 3 and all(len(r) == len(fsdp.COLUMNS) and all(r) for r in table)


def test_budget_smoke_writes_every_row_and_the_search(tmp_path: Path) -> None:
    """bench/budget.py on the tiny model: four contestants per budget, the targets on their budgets exactly, the
    λ search's runs counted and reused across budgets, every row's counts from its own runs."""
    import budget

    out = budget.main(["--smoke", "--budgets", "0.25", "0.5", "--out", str(tmp_path)])
    data = json.loads((out / "budget.json").read_text())
    rows = data["rows"]
    assert [r["key"].split("-")[0] for r in rows] == ["target", "lambda", "adalora", "lora"] * 2
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len({(r["key"], r["seed"]) for r in runs}) == len(runs)  # no run trained twice
    by_key = {r["key"]: r for r in runs}
    for row in rows:
        assert row["ranks"] == [by_key[row["key"]]["ranks"]]
        if row["key"].startswith(("target", "lora")):  # a target lands on its budget; uniform LoRA is the budget
            assert row["ranks"] == [row["budget_ranks"]]
        if row["search"] is not None:
            assert row["runs"] == len(row["search"]) and all(by_key[f"lambda-{lam:g}"]["ranks"] == n
                                                              for lam, n in row["search"])
            assert row["seconds_to_adapter"] == pytest.approx(sum(by_key[f"lambda-{lam:g}"]["train_seconds"]
                                                                  for lam, _ in row["search"]))
    table = table_rows((out / "budget.md").read_text(), budget.COLUMNS)
    assert len(table) == 8 and all(len(r) == len(budget.COLUMNS) and all(r) for r in table)


def test_budget_causal_smoke_scores_exact_match_and_steps_peft_unwrapped(tmp_path: Path) -> None:
    """bench/budget.py --causal on the tiny Llama: its own files, the λ search from the causal recipe's λ (4), every
    target on its budget, AdaLoRA's triplets on target_r, and the record's accuracy the exact match it scored."""
    import budget

    out = budget.main(["--causal", "--smoke", "--budgets", "0.5", "--out", str(tmp_path)])
    assert not (out / "budget.json").exists() and not (out / "runs.jsonl").exists()
    rows = json.loads((out / "budget-causal.json").read_text())["rows"]
    assert [r["key"] for r in rows][::2] == ["target-0.5", "adalora-4"] and rows[1]["search"][0][0] == 4.0
    total = 8 * 14  # 2 layers x 7 linears
    assert [r["ranks"] for r in rows if r["key"] in ("target-0.5", "adalora-4", "lora-4")] == [[total // 2]] * 3
    runs = [json.loads(line) for line in (out / "runs-causal.jsonl").read_text().splitlines()]
    assert all(r["accuracy"] == r["metrics"]["exact_match"] and 0 <= r["accuracy"] <= 1 for r in runs)
    assert all({"loss", "choice_accuracy"} <= set(r["metrics"]) for r in runs)
    lora = next(r for r in runs if r["key"] == "lora-4")
    per_rank = 2 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 48) * 3)  # q o, k v (2 kv heads of 8), gate up down
    assert lora["inference_params"] == 4 * per_rank == 3712
    text = (out / "budget-causal.md").read_text()
    assert text.startswith("### SoRA to a budget, causal LM") and "| exact match |" in text


def test_the_lambda_search_brackets_then_interpolates() -> None:
    import budget

    counts = {1.0: 200, 2.0: 160, 4.0: 120, 3.0: 138}  # a made-up count(λ), falling
    seen: list[float] = []

    def measure(lam: float) -> int:
        seen.append(lam)
        return counts[lam]

    # budget 140 (lands in [137.2, 140]): 1 → 200 and 2 → 160 too many, 4 → 120 too few; between 2 and 4 in log λ
    # at the count 138.6: log 2 + (log 4 − log 2) · (160 − 138.6) / 40 → 2.899, rounded 2.9; then 3.0 … is not asked
    counts[2.9] = 139
    assert budget.search(140, measure) == [(1.0, 200), (2.0, 160), (4.0, 120), (2.9, 139)]
    assert seen == [1.0, 2.0, 4.0, 2.9] and budget.best_found(budget.search(140, counts.__getitem__), 140) == (2.9, 139)


def test_throughput_smoke_packs_the_same_tokens_into_fewer_steps(tmp_path: Path) -> None:
    import throughput

    out = throughput.main(["--smoke", "--no-compile", "--examples", "16", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((out / "throughput.json").read_text())
    rows = {(r["method"], r["batches"]): r for r in data["rows"]}
    assert len(rows) == 9 and {r["blocks"] for r in data["rows"]} == {"eager"}
    trl = rows[("trl", "packed")]  # TRL packs the same token ids itself: 16 short examples fit one step of 8 rows
    assert trl["steps_per_pass"] == 1 and trl["speedup"] is None
    assert trl["tokens_per_s"] == pytest.approx(data["tokens"] / trl["repeats_s"][0])
    assert trl["time_vs_floor"] == pytest.approx(trl["repeats_s"][0] / rows[("floor", "packed")]["repeats_s"][0])
    for method in throughput.METHODS:
        padded, packed = rows[(method, "padded")], rows[(method, "packed")]
        assert padded["steps_per_pass"] == 2 and packed["steps_per_pass"] < 2  # 16 short examples fit 8 rows
        assert padded["tokens_per_s"] == pytest.approx(data["tokens"] / padded["repeats_s"][0])
        assert packed["speedup"] == pytest.approx(padded["repeats_s"][0] / packed["repeats_s"][0])
        assert rows[("floor", "packed")]["time_vs_floor"] == 1.0
    assert data["tokens"] > 16 * 5 and len(data["targets"]) == 4
    table = table_rows((out / "throughput.md").read_text(), throughput.COLUMNS)
    assert len(table) == 9 and all(len(r) == len(throughput.COLUMNS) and all(r) for r in table)


def test_profile_smoke_puts_the_adapters_work_where_it_ran(tmp_path: Path) -> None:
    import profile_causal

    out = profile_causal.main(["--smoke", "--steps", "1", "--out", str(tmp_path)])
    results = json.loads((out / "profile.json").read_text())["results"]
    assert list(results) == list(profile_causal.CONTESTANTS)
    for key, r in results.items():
        cells = r["cells"]
        assert r["outside_ms"] + sum(cells.values()) == pytest.approx(r["wall_ms"])
        adapters = [c for c in cells if c.endswith("adapter matmuls")]
        assert bool(adapters) == (key != "floor"), (key, adapters)  # the floor has no rank-8 operand
        if key != "floor":
            assert {"forward | adapter matmuls", "backward | adapter matmuls"} <= set(cells)
        # SoRA's proximal step runs in the method's hooks; LoRA's and PEFT's hooks do no work
        hooks = "method hooks | element-wise" in cells or "method hooks | other operators" in cells
        assert hooks == key.startswith("sora-r8"), (key, cells)
        # every adapted layer (14 in the tiny Llama) is one fused node, but in the unfused contestant
        fused = 14 if key in ("sora-lora", "sora-r8") else 0
        assert r["fused_backward_nodes_per_step"] == fused, key
        assert cells.get("optimizer | element-wise", 0) + cells.get("optimizer | other operators", 0) > 0
    import speed_causal

    header = ["phase: kind (ms / step)", *(speed_causal.LABELS[c] for c in results), "SoRA − floor", "LoRA − floor"]
    table = table_rows((out / "profile.md").read_text(), header)
    assert table[-1][0] == "**step (wall, profiled)**" and all(len(row) == len(header) for row in table)


def test_collapse_probe_smoke_measures_every_step(tmp_path: Path) -> None:
    import collapse_probe

    out = collapse_probe.main(["--smoke", "--steps", "4", "--seeds", "0", "--methods", "sora", "lora",
                               "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert [(r["run"], r["step"]) for r in rows] == [(m, s) for m in ("sora seed 0", "lora seed 0") for s in range(1, 5)]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 <= r["pooler_saturated"] <= 1 and r["classifier"] > 0
        assert -1 <= r["cls_cos"] <= 1 and r["cls_norm"] > 0
        assert ("g" in r) == r["run"].startswith("sora")
        # the warm-up's first LR is 0: B stays 0 for a step; at the second B leaves 0, so ΔW is its own change
        if r["step"] == 1:
            assert r["dW"] == r["dW_step"] == 0.0
        elif r["step"] == 2:
            assert r["dW"] > 0 and r["dW_step"] == pytest.approx(r["dW"])
        else:
            assert r["dW_step"] > 0
    assert "| sora seed 0 | 4 |" in (out / "probe.md").read_text()


def test_collapse_probe_mean_pairwise_cosine() -> None:
    """Rows (1, 0), (0, 1), (2, 0): pair cosines 0, 1, 0 each way: mean 2 / 6; identical rows: 1."""
    import collapse_probe

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    assert collapse_probe.mean_pairwise_cosine(x) == pytest.approx(1 / 3, abs=1e-15)
    assert collapse_probe.mean_pairwise_cosine(torch.tensor([[3.0, 4.0]] * 4)) == pytest.approx(1.0, abs=1e-15)


def test_collapse_probe_finds_the_return_to_chance() -> None:
    import collapse_probe

    level = math.log(2)
    rows = [{"step": i + 1, "loss": x} for i, x in enumerate([0.7] * 20 + [0.4] * 20 + [0.69] * 20)]
    assert collapse_probe.chance(rows, level) == 59  # (19 · 0.69 + 0.4) / 20 = 0.6755 > 0.97 ln 2 = 0.6723
    assert collapse_probe.chance([{"step": i + 1, "loss": 0.69} for i in range(60)], level) is None  # never learnt


def test_stability_smoke_runs_each_cell_once_and_tallies_it(tmp_path: Path) -> None:
    import stability

    argv = ["--smoke", "--datasets", "rotten_tomatoes", "--lrs", "1e-3", "--seeds", "0", "1", "--steps", "6",
            "--out", str(tmp_path)]
    out = stability.main(argv)
    runs = [json.loads(line) for line in (out / "stability-runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in stability.METHODS]
    for r in runs:
        assert r["steps"] == 6 and len(r["losses"]) == 1 and 0 <= r["accuracy"] <= 1  # one logged window of 6
        assert r["collapsed"] == (r["collapse_step"] is not None or r["constant"])
    summary = json.loads((out / "stability.json").read_text())
    cells = {(c["dataset"], c["lr"], c["method"]): c for c in summary["cells"]}
    share = summary["majority_share"]["rotten_tomatoes"]  # of the 64 test examples the smoke keeps
    assert 0.5 <= share <= 1 and (64 * share) == pytest.approx(round(64 * share))
    for method in stability.METHODS:
        mine = [r for r in runs if r["method"] == method]
        c = cells[("rotten_tomatoes", 1e-3, method)]
        assert (c["runs"], c["collapsed"]) == (2, sum(r["collapsed"] for r in mine))
        assert c["at_chance"] == sum(r["accuracy"] <= share + 0.01 for r in mine)
        assert c["accuracy_mean"] == pytest.approx(statistics.fmean(r["accuracy"] for r in mine))
    assert "| rotten_tomatoes | 0.001 |" in (out / "stability.md").read_text()
    stability.main(argv)  # finished runs are skipped
    assert len((out / "stability-runs.jsonl").read_text().splitlines()) == len(runs)
    variant = ["--methods", "sora", "--set", "adapter.gate_init=ones", "--tag", "gate-ones"]
    stability.main(["--smoke", "--datasets", "rotten_tomatoes", "--lrs", "1e-3", "--seeds", "0", "--steps", "6",
                    "--out", str(tmp_path), *variant])
    last = json.loads((out / "stability-runs.jsonl").read_text().splitlines()[-1])
    assert (last["method"], last["seed"], last["set"][-1]) == ("sora+gate-ones", 0, "adapter.gate_init=ones")
    header = (out / "stability.md").read_text().split("| dataset | lr |")[1].splitlines()[0]
    assert header == " SoRA | SoRA, gate-ones | sora LoRA | PEFT LoRA |"
    with pytest.raises(SystemExit):
        stability.main([*argv, "--set", "adapter.gate_init=ones"])  # a variant needs its --tag
    # --report trains nothing (not even the missing seed 2) and tabulates every finished run, variants included
    stability.main(["--smoke", "--report", "--seeds", "0", "1", "2", "--steps", "6", "--out", str(tmp_path)])
    assert len((out / "stability-runs.jsonl").read_text().splitlines()) == len(runs) + 1
    text = (out / "stability.md").read_text()
    assert f"`--report` tabulates the {len(runs) + 1} runs finished so far" in text and "SoRA, gate-ones" in text


def test_stability_targets_compare_rates_and_accuracy_per_cell() -> None:
    import stability

    def run(method: str, lr: float, seed: int, collapsed: bool, accuracy: float) -> dict[str, object]:
        return {"dataset": "rotten_tomatoes", "method": method, "lr": lr, "seed": seed, "collapsed": collapsed,
                "accuracy": accuracy}

    records = [run("sora", 2e-3, 0, False, 0.80), run("sora", 2e-3, 1, True, 0.58),
               run("lora", 2e-3, 0, False, 0.81), run("lora", 2e-3, 1, False, 0.80),
               run("sora", 1e-3, 0, False, 0.80), run("lora", 1e-3, 0, True, 0.42),
               run("sora", 5e-4, 0, False, 0.796), run("lora", 5e-4, 0, False, 0.80)]
    records += [{**run("sora", 2e-3, 0, False, 0.81), "method": "sora+mean-pool"},
                {**run("lora", 2e-3, 0, False, 0.80), "method": "lora+mean-pool"}]  # a variant: against its own
    found = stability.cells(records, {"rotten_tomatoes": 0.572})  # at chance: accuracy ≤ 0.582
    checks = {what: (value, ok) for what, value, ok in stability.targets(found, 2e-3)}
    assert checks == {
        "rotten_tomatoes, lr 0.0005: SoRA's collapse rate ≤ LoRA's": ("0/1 vs 0/1", True),
        "rotten_tomatoes, lr 0.0005: SoRA ends at chance no more often than LoRA": ("0/1 vs 0/1", True),
        "rotten_tomatoes, lr 0.0005: SoRA's accuracy ≥ LoRA's − 0.5 point": ("-0.40 points", True),
        "rotten_tomatoes, lr 0.001: SoRA's collapse rate ≤ LoRA's": ("0/1 vs 1/1", True),
        "rotten_tomatoes, lr 0.001: SoRA ends at chance no more often than LoRA": ("0/1 vs 1/1", True),
        "rotten_tomatoes, lr 0.002: SoRA's collapse rate ≤ LoRA's": ("1/2 vs 0/2", False),
        "rotten_tomatoes, lr 0.002: SoRA ends at chance no more often than LoRA": ("1/2 vs 0/2", False),
        "rotten_tomatoes, lr 0.002: SoRA (mean-pool)'s collapse rate ≤ LoRA (mean-pool)'s": ("0/1 vs 0/1", True),
        "rotten_tomatoes, lr 0.002: SoRA (mean-pool) ends at chance no more often than LoRA (mean-pool)":
            ("0/1 vs 0/1", True),
        "rotten_tomatoes, lr 0.002: SoRA (mean-pool)'s accuracy ≥ LoRA (mean-pool)'s − 0.5 point":
            ("+1.00 points", True),
        "rotten_tomatoes, lr 0.002: SoRA's accuracy ≥ LoRA's − 0.5 point": ("-11.50 points", False),
        "the quickstart as shipped (SoRA, lr 2e-3, Rotten Tomatoes) never collapses": ("1/2", False)}


def test_gate_survival_measures_against_hand_values() -> None:
    import gate_survival

    from sora_cli.recipe import load_recipe

    # the quickstart: warm-up 36 of 600 steps, Σ factor = (0 + … + 35)/36 + (564 + … + 1)/564 = 17.5 + 282.5 = 300
    assert gate_survival.total_pull(load_recipe(common.QUICKSTART)) == pytest.approx(1.0 * 2e-3 * 300, rel=1e-12)
    a = torch.tensor([0.1, 0.5, 0.9, 1.3, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 0.4, 0.3, 1.5], dtype=torch.float64)  # two ties at 0: average rank 0.5
    assert gate_survival.ranks(b).tolist() == [0.5, 0.5, 3.0, 2.0, 4.0]
    # ranks a: 0..4; b: 0.5, 0.5, 3, 2, 4; centred: (-2,-1,0,1,2) and (-1.5,-1.5,1,0,2): Σ = 3+1.5+0+0+4 = 8.5,
    # norms √10 and √(2.25+2.25+1+0+4) = √9.5
    assert gate_survival.spearman(a, b) == pytest.approx(8.5 / math.sqrt(10 * 9.5), rel=1e-12)
