"""The `sora` command. Each command parses its arguments, calls one function, renders the result."""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sora_cli import __version__, render
from sora_cli.errors import SoraError

app = typer.Typer(
    name="sora",
    help="Fine-tune pre-trained transformers with sparse low-rank adapters (SoRA, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _run(fn: Callable[[], T], debug: bool) -> T:
    """Call `fn`; turn failures into one red line and an exit code (2: bad input, 1: failed run)."""
    try:
        return fn()
    except SoraError as e:
        if debug:
            traceback.print_exc()
        render.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        render.error("interrupted; continue the run with --resume")
        raise typer.Exit(130) from None
    except Exception as e:  # a bug or an environment failure: short by default, everything with --debug
        if debug:
            traceback.print_exc()
        render.error(f"{type(e).__name__}: {e} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        print(f"sora {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune pre-trained transformers with sparse low-rank adapters (SoRA, LoRA)."""


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides, e.g. train.lr=5e-4 adapter.r=16 data.max_length=64.", show_default=False)] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Run directory "
                                                    "(default: train.output_dir, else runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train an adapter as the recipe says; write checkpoints, metrics and the final adapter."""

    def go() -> Any:
        from sora_cli.engine import train as run_training
        from sora_cli.recipe import load_recipe

        loaded = load_recipe(recipe, overrides or [])
        if output_dir is not None:  # a path, taken as given (never read as YAML)
            loaded = dataclasses.replace(loaded, train=dataclasses.replace(loaded.train, output_dir=str(output_dir)))
        return run_training(loaded, resume=resume, overwrite=overwrite)

    result = _run(go, debug)
    rows = [("run", str(result.output_dir)), ("steps", str(result.step))]
    if result.already_complete:
        rows.append(("status", "already complete; nothing to do"))
    if result.dev:
        rows.append(("dev (final)", render.metrics_text(result.dev)))
    if result.test:
        rows.append(("test (final)", render.metrics_text(result.test)))
    if result.best_dev and result.best_step is not None:
        rows.append((f"dev (best, step {result.best_step})", render.metrics_text(result.best_dev)))
    if result.best_test:
        rows.append((f"test (best, step {result.best_step})", render.metrics_text(result.best_test)))
    rows.append(("surviving ranks", f"{result.active_rank} / {result.max_rank}"))
    if result.total_gates:
        rows.append(("zero gates", f"{result.zero_gates} / {result.total_gates} "
                                   f"({100 * result.zero_gates / result.total_gates:.1f}%)"))
    rows.append(("final adapter", str(result.output_dir / "final")))
    rows.append(("time", f"{result.seconds:.1f} s"))
    render.run_summary(rows, title="sora train")


def main() -> None:
    app(prog_name="sora")
