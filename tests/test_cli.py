"""The `sora` command through Typer's runner: exit codes, key output lines, nothing written on bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sora_cli import __version__
from sora_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"sora {__version__}"


def test_python_dash_m() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sora_cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"sora {__version__}"


def test_train_end_to_end(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "cli-run"
    result = invoke("train", str(make_recipe()), "train.max_steps=12", "adapter.r=2", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("trainable params: ") and "|| trainable%: " in line for line in lines)
    assert "sora on 13 modules, r=2;" in result.output and "12 steps on cpu" in result.output
    assert "surviving ranks" in result.output and "zero gates" in result.output and "test (final)" in result.output
    assert (out / "final" / "adapter.safetensors").is_file()
    again = invoke("train", str(make_recipe()), "train.max_steps=12", "adapter.r=2", "--output-dir", str(out),
                   "--resume")
    assert again.exit_code == 0 and "already complete" in again.output


def test_bad_recipe_exits_2_with_field_and_creates_nothing(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = invoke("train", str(make_recipe()), "adapter.r=-3", "train.lr=abc", "--output-dir", str(out))
    assert result.exit_code == 2
    assert "2 problems" in result.output
    assert "adapter.r: must be positive, got -3" in result.output
    assert "train.lr: expected a finite number, got 'abc'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_recipe_and_missing_model(make_recipe, tmp_path: Path) -> None:
    result = invoke("train", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2 and "absent.yaml: recipe file not found" in result.output
    out = tmp_path / "no-model"
    result = invoke("train", str(make_recipe()), f"model.name_or_path={tmp_path / 'nowhere'}", "-o", str(out))
    assert result.exit_code == 2 and "model.name_or_path: could not load" in result.output
    assert not out.exists()


def test_existing_run_dir_exits_2(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("train", str(make_recipe()), "-o", str(out))
    assert result.exit_code == 2 and "is not empty and holds no sora run" in result.output
    for flag in ("--overwrite", "--resume"):  # neither deletes nor writes into a directory that is not a run
        result = invoke("train", str(make_recipe()), "-o", str(out), flag)
        assert result.exit_code == 2 and "holds no sora run (no recipe.yaml)" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_debug_shows_the_traceback(make_recipe, tmp_path: Path) -> None:
    result = invoke("train", str(make_recipe()), "data.text_fields=[nope]", "-o", str(tmp_path / "d"), "--debug")
    assert result.exit_code == 2 and "Traceback" in result.output
    assert "data.text_fields: 'nope' not in the data" in result.output


def test_quickstart_recipe_on_the_packaged_model(tmp_path: Path) -> None:
    """The README's recipe, cut to a few steps: the real MiniLM and Rotten Tomatoes, offline."""
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    assert recipe.read_text().startswith("# sora train recipes/quickstart.yaml\n")
    result = invoke("train", str(recipe), "train.max_steps=6", "data.max_train_samples=96", "data.max_eval_samples=64",
                    "train.eval_every=null", "-o", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    # 37 adapted Linears (36 in the encoder + the pooler), r=8: Σ 8·(d_in + d_out + 1) + the classifier head
    assert "trainable params: 338,986 || all params: 23,052,202 || trainable%: 1.4705" in result.output
    assert "96 train / 64 dev / 64 test examples; 6 steps on cpu" in result.output


def test_runtime_failure_exits_1_without_traceback(make_recipe, monkeypatch) -> None:
    import sora_cli.engine

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sora_cli.engine, "train", boom)
    result = invoke("train", str(make_recipe()))
    assert result.exit_code == 1
    assert result.output.strip() == ("error: RuntimeError: CUDA out of memory (run again with --debug for the "
                                     "traceback)")
