"""data.packing: the row plan by hand, packed against unpacked loss and gradients in float64, the model check,
a packed run's resume, and the recipe's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sora_cli.adapters import SoRA, adapter_layers
from sora_cli.adapters.inject import inject
from sora_cli.cli import app
from sora_cli.engine import train
from sora_cli.errors import InputError
from sora_cli.packing import check_model, collate_rows, pack, plan_rows
from sora_cli.recipe import AdapterConfig, DataConfig, TrainConfig, load_recipe
from sora_cli.tasks.causal_lm import CausalLMTask
from sora_cli.tasks.formats import IGNORE_INDEX, Encoded

from .conftest import events, killed_at_step_4_and_resumed, sentiment_records

runner = CliRunner()


def test_best_fit_decreasing_by_hand() -> None:
    # longest first: 6 opens row 0 (room 2), 5 row 1 (room 3), 4 fits neither (row 2, room 4), 3 fits row 1 exactly
    # (the least room that fits), 2 fits row 0 exactly
    assert plan_rows([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    assert plan_rows([4, 4, 4], 8) == [[0, 1], [2]]  # ties: lower index first
    assert plan_rows([9, 1], 8) == [[0], [1]]  # too long for a row (the encoder prevents it): a row of its own


def test_the_plan_covers_every_example_once_within_the_length() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (500,), generator=gen).tolist()
    rows = plan_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # nearly full rows
    assert plan_rows(lengths, 64) == rows  # lengths alone decide it


def test_a_packed_row_restarts_positions_and_drops_each_first_label() -> None:
    examples = [Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3], [1], ""), Encoded([4, 5], [4, 5], [], ""),
                Encoded([6], [6], [], "")]
    data = pack(examples, 5)  # rows: [0, 1] (5 tokens), [2]
    assert data.rows == [[0, 1], [2]] and len(data) == 2 and data.lengths == [5, 1]
    batch = collate_rows(data, [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[6, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 5, [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert "attention_mask" not in batch and data.example_count([0, 1]) == 3


def tiny_float64(directory: Path, attention: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation=attention)
    return model, AutoTokenizer.from_pretrained(directory)


def loss_and_grads(model: Any, task: CausalLMTask, batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = task.loss_sum(model, batch) / task.count(batch)  # the engine's normalisation: per labelled token
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fmt", ["alpaca", "text"])
def test_a_packed_step_is_the_unpacked_step(tiny_llama_dir: Path, attention: str, fmt: str) -> None:
    """Same examples, float64: the loss and every adapter gradient agree to 1e-10 (text: every token labelled, so
    a first token that kept its label would be predicted from the previous example and show). transformers' eager
    attention takes its softmax in float32 whatever the model's dtype, so rows of other lengths round differently
    there: 1e-7 (float32's 6e-8 unit roundoff on the attention weights)."""
    model, tok = tiny_float64(tiny_llama_dir, attention)
    torch.manual_seed(0)
    inject(model, SoRA(AdapterConfig(method="sora", r=4, alpha=8.0, sparse_lambda=0.1), TrainConfig()), ())
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)  # B = 0 would leave A without gradient
    records = sentiment_records(12, seed=4)
    if fmt == "text":
        records = [{"text": r["input"] + " so it is " + r["output"]} for r in records]
    config = DataConfig(train_file="x.jsonl", task_type="causal_lm", format=fmt, chat_template=fmt == "alpaca",
                        packing=True)
    task = CausalLMTask(config)
    task.records, task.places = {"train": records}, {"train": [f"record {i}" for i in range(12)]}
    packed = task.encode(tok, 96).train
    assert len(packed) < 12 and sorted(i for r in packed.rows for i in r) == list(range(12))
    unpacked = task.subset(packed, list(range(len(packed))))  # the same examples, in row order
    a = loss_and_grads(model, task, task.collate(unpacked, list(range(12)), tok.pad_token_id))
    b = loss_and_grads(model, task, task.collate(packed, list(range(len(packed))), tok.pad_token_id))
    tolerance = 1e-10 if attention == "sdpa" else 1e-7
    assert a[0] == pytest.approx(b[0], abs=tolerance, rel=0)
    assert len(a[1]) == 3 * 14 and any(float(g.abs().max()) > 1e-3 for g in a[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(gb, ga, atol=tolerance, rtol=0)


def test_a_model_that_ignores_restarting_positions_is_refused(tiny_llama_dir: Path) -> None:
    model, _ = tiny_float64(tiny_llama_dir, "sdpa")
    check_model(model)  # transformers' Llama keeps packed examples apart
    decoder = model.base_model
    forward = decoder.forward
    decoder.forward = lambda *a, **kw: forward(*a, **{k: v for k, v in kw.items() if k != "position_ids"})
    with pytest.raises(InputError, match=r"^data.packing: LlamaForCausalLM's attention does not keep packed examples "
                                         r"apart .*; set data.packing: false$"):
        check_model(model)


def test_packing_is_refused_outside_causal_lm(make_recipe: Any) -> None:
    result = runner.invoke(app, ["train", str(make_recipe(data={"packing": True}))])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith(
        "data.packing: only applies to data.task_type: causal_lm; remove it or set the task type")


def test_a_packed_run_resumes_mid_epoch_bit_for_bit(causal_recipe: Any) -> None:
    """160 training examples of 32–35 tokens packed 3 or 4 to a row of 128, 4 rows a step: an epoch is 13 steps
    where unpacked it is 40, and a run killed after step 4's checkpoint (mid-epoch) and resumed ends with the
    uninterrupted run's adapter."""
    sections = {"model": {"dtype": "float64"}, "data": {"packing": True, "max_length": 128},
                "train": {"batch_size": 4}}
    full = load_recipe(causal_recipe("full", **sections))
    train(full)
    run = Path(full.train.output_dir)
    packed = events(run, "train")
    assert packed[-1]["epoch"] == round(12 / 13, 4) and all(e["tokens_per_s"] > 0 for e in packed)
    resumed = killed_at_step_4_and_resumed(load_recipe(causal_recipe("part", **sections)))
    a, b = load_file(run / "final" / "adapter.safetensors"), load_file(resumed / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_schedule_counts_packed_rows(causal_recipe: Any) -> None:
    """Stage lengths in epochs step over rows: the plan's count (the tokenizer only) is the engine's."""
    from sora_cli import schedule
    from sora_cli.engine import prepare

    packed = load_recipe(causal_recipe("p", data={"packing": True, "max_length": 128}))
    rows = schedule.train_size(packed)
    run = prepare(packed, Path(packed.train.output_dir), total_steps=1)
    assert rows == len(run.data.train) and run.data.train.example_count(range(rows)) == 160
    assert 160 / 4 <= rows <= 160 / 3 + 1  # 3 or 4 examples of 32–35 tokens a row of 128
    assert schedule.train_size(load_recipe(causal_recipe("u"))) == 160
