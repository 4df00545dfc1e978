"""The `sora` command. Each command parses its arguments, calls one function, renders the result."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sora_cli import __version__, render
from sora_cli.errors import SoraError, disk_full, full_disk

app = typer.Typer(
    name="sora",
    help="Fine-tune pre-trained transformers with sparse low-rank adapters (SoRA, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
# Seconds a quiet rank waits before it exits: torchrun stops the whole launch at the first exit, and a silent rank that
# left first could take rank 0 down before it printed the error (seen on a loaded 2-core machine).
QUIET_EXIT_GRACE_S = 10.0
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _run(fn: Callable[[], T], debug: bool) -> T:
    """Call `fn`; turn failures into one red line and an exit code (2: bad input, 1: failed run). Under torchrun
    rank 0 prints the errors about the input, which every process meets alike (one met by another process alone
    reaches rank 0 through dist.agree and names that rank); another rank prints only a failure of its own (a bug,
    an out-of-memory), naming itself."""
    from sora_cli import dist

    try:
        return fn()
    except SoraError as e:  # every process read the same input: rank 0 alone says what was wrong with it
        _report(str(e), e, debug, quiet=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if dist.rank() == 0:
            render.error("interrupted; continue the run with --resume")
        raise typer.Exit(130) from None
    except Exception as e:  # a bug or an environment failure: short by default, everything with --debug
        if disk_full(e):  # an append to metrics.jsonl, a cache: one line, not a traceback's last words
            _report(str(full_disk(getattr(e, "filename", None) or "a file", e)), e, debug, quiet=False)
        elif dist.peer_failure(e):  # another process stopped first and printed why
            _report("another process of this torchrun launch stopped (its error is above); continue the run with "
                    "--resume", e, debug, quiet=True)
        else:
            _report(f"{type(e).__name__}: {e} (run again with --debug for the traceback)", e, debug, quiet=False)
        raise typer.Exit(1) from None
    finally:
        dist.stop()


def _report(message: str, e: BaseException, debug: bool, quiet: bool) -> None:
    """Print one failure. `quiet`: on ranks other than 0 the failure is rank 0's to report."""
    from sora_cli import dist

    if dist.rank() != 0:
        if quiet:  # rank 0 prints it, then exits, and torchrun ends this wait
            time.sleep(QUIET_EXIT_GRACE_S)
            return
        message = f"rank {dist.rank()}: {message}"
    if debug:
        traceback.print_exc()
    render.error(message)


def _join(device: str) -> None:
    """Join the other processes of a torchrun launch (nothing without one); only rank 0 draws and prints."""
    from sora_cli import dist

    if dist.start(device).rank != 0:
        render.console.quiet = True


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
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's latest complete "
                                                          "checkpoint.")] = False,
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
        _join(loaded.train.device)
        if loaded.edit is not None:  # knowledge editing: its own protocol over the same engine
            from sora_cli.editing.run import run_edits

            return run_edits(loaded, resume=resume, overwrite=overwrite)
        return run_training(loaded, resume=resume, overwrite=overwrite)

    result = _run(go, debug)
    if hasattr(result, "summary"):  # an edit run (editing.run.EditResult)
        render.edit_summary(result.summary, str(result.output_dir))
        return
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
    if result.base_test:
        rows.append(("test (base model)", render.metrics_text(result.base_test)))
    rows += render.constant_rows({"final/": (result.dev, result.test), "best/": (result.best_dev, result.best_test)})
    rows += render.stats_rows(result.stats)
    rows.append(("final adapter", str(result.output_dir / "final")))
    rows.append(("time", f"{result.seconds:.1f} s"))
    render.run_summary(rows, title="sora train")


@app.command("schedule")
def schedule_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe with a schedule section.", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. schedule.num=6.",
                                                          show_default=False)] = None,
    from_ckpt: Annotated[Path | None, typer.Option("--from", help="Start from this checkpoint (it is "
                                                                  "stage 0).")] = None,
    plan_only: Annotated[bool, typer.Option("--plan", help="Print the stages and an estimated time; "
                                                           "train nothing.")] = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Schedule directory "
                                                    "(default: train.output_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue where the schedule stopped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing schedule directory.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: memorization and generalization against "
                                                             "surviving parameters.")] = None,
    debug: DebugOption = False,
) -> None:
    """The sparsifying scheduler: stages of rising λ, each recording memorization and generalization."""
    from sora_cli import dist, schedule
    from sora_cli.recipe import load_recipe

    def load() -> Any:
        loaded = load_recipe(recipe, overrides or [])
        if output_dir is not None:
            loaded = dataclasses.replace(loaded, train=dataclasses.replace(loaded.train, output_dir=str(output_dir)))
        return loaded

    loaded = _run(load, debug)
    out = Path(loaded.train.output_dir)
    if plan_only:
        def make_plan() -> tuple[list[Any], float]:
            stages = schedule.plan(loaded, schedule.train_size(loaded), from_checkpoint=from_ckpt is not None)
            return stages, schedule.estimate_step_seconds(loaded)

        stages, seconds = _run(make_plan, debug)
        render.schedule_plan(stages, seconds)
        return
    records: list[dict[str, Any]] = []

    def go() -> None:
        if plot is not None:
            schedule.check_plot(plot)
        _join(loaded.train.device)
        for record in schedule.run(loaded, out, from_ckpt=from_ckpt, resume=resume, overwrite=overwrite):
            records.append(record)
            render.schedule_table(records)
        if plot is not None and dist.current().main:  # before _run leaves the process group
            schedule.plot(records, plot)

    _run(go, debug)
    render.note(f"schedule: {out / 'schedule.csv'}" + (f"; plot: {plot}" if plot else ""))


class SortBy(str, Enum):
    name = "name"
    rank = "rank"


class MergeDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class MergeInto(str, Enum):
    full = "full"
    dequantized = "dequantized"


CkptArgument = Annotated[Path, typer.Argument(help="Checkpoint directory (e.g. runs/quickstart/final).",
                                              show_default=False)]


@app.command("inspect")
def inspect_command(
    ckpt: CkptArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON (stable keys).")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: rank heatmap and |g| histogram.")] = None,
    sort: Annotated[SortBy, typer.Option("--sort", help="Order of the module rows.")] = SortBy.name,
    debug: DebugOption = False,
) -> None:
    """Per-module surviving ranks and gate magnitudes, by module type and by layer."""
    from sora_cli.checkpoint import load_adapter
    from sora_cli.report import inspect_adapter
    from sora_cli.report import plot as draw

    def go() -> dict[str, Any]:
        tensors, meta = load_adapter(ckpt)
        report = inspect_adapter(tensors, meta)
        if plot is not None:
            draw(report, tensors, plot)
        return report

    report = _run(go, debug)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render.inspect_tables(report, sort.value)
        if plot is not None:
            render.note(f"plot: {plot}")


@app.command("prune")
def prune_command(
    ckpt: CkptArgument,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Pruned checkpoint "
                                                                       "(default: <ckpt>-pruned).")] = None,
    eps: Annotated[float, typer.Option("--eps", help="Keep ranks with |g| > eps (0: exactly the same outputs).")] = 0.0,
    peft: Annotated[Path | None, typer.Option("--peft", help="Also write a standard PEFT LoRA adapter here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output directories.")] = False,
    debug: DebugOption = False,
) -> None:
    """Cut the ranks whose gate is zero: a smaller adapter with the same outputs."""
    from sora_cli.prune import prune_checkpoint

    sibling = ckpt if ckpt.name not in ("", "..") else ckpt.resolve()  # `prune .` must not write inside it
    out = output or sibling.parent / f"{sibling.name}-pruned"

    def go() -> tuple[dict[str, Any], dict[str, Any]]:
        return prune_checkpoint(ckpt, out, eps=eps, peft=peft, force=force)

    before, after = _run(go, debug)
    render.prune_summary(before, after, str(out), str(peft) if peft else None)


@app.command("merge")
def merge_command(
    ckpt: CkptArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged model: transformers (a "
                                         "sentence-transformers folder for a model.pooling: mean run).",
                                         show_default=False)],
    base: Annotated[str | None, typer.Option("--base", help="Base model (default: the one the checkpoint "
                                                            "records).")] = None,
    dtype: Annotated[MergeDtype, typer.Option("--dtype", help="Weights dtype of the merged model "
                                                              "(auto: the base's).")] = MergeDtype.auto,
    into: Annotated[MergeInto, typer.Option("--into", help="For a run on a quantized base: full merges into the "
                                            "full-precision weights it was quantized from (what you deploy); "
                                            "dequantized into the quantized weights it trained on, dequantized "
                                            "(reports their quantization error).")] = MergeInto.full,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    debug: DebugOption = False,
) -> None:
    """Fold the adapter into the base weights: an ordinary transformers model (a sentence-transformers one for a
    mean-pooled run), no adapter code needed."""
    from sora_cli.merge import MERGE_REPORT, merge_checkpoint

    def go() -> dict[str, Any]:
        return merge_checkpoint(ckpt, output, base=base, dtype=dtype.value, force=force, into=into.value)

    report = _run(go, debug)
    render.note(f"merged {report['modules_merged']} adapted modules into the base weights: {output}")
    if report["format"] == "sentence-transformers":
        render.note("a sentence-transformers model (the run pooled the mean of the token states, which no transformers "
                    f"classifier does): SentenceTransformer({str(output)!r}).encode(texts) gives the logits")
    render.merge_summary(report, str(output / MERGE_REPORT))


class EvalSplit(str, Enum):
    dev = "dev"
    test = "test"


@app.command("eval")
def eval_command(
    ckpt: CkptArgument,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides of the run's recipe, e.g. data.max_eval_samples=100 train.eval_batch_size=32.",
        show_default=False)] = None,
    split: Annotated[EvalSplit | None, typer.Option("--split", help="Split of the run's data (default: test).",
                                                    show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Evaluate every record of this file instead "
                                                             "(the recipe's columns and format).")] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the untouched base model (adapters off; a "
                                                      "classifier keeps the trained head).")] = False,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="The recipe the checkpoint was trained with "
                                                                 "(default: recipe.yaml of its run).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (stable keys).")] = False,
    debug: DebugOption = False,
) -> None:
    """Score a checkpoint on its run's test (or dev) split, or on a data file; writes nothing."""
    import contextlib
    import sys

    from sora_cli.errors import InputError
    from sora_cli.evaluate import evaluate_checkpoint

    def go() -> dict[str, Any]:
        if data is not None and split is not None:
            raise InputError("--split: not with --data, which evaluates every record of the file")
        # With --json stdout carries the JSON alone: notes printed while evaluating (dropped examples) go to stderr.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            return evaluate_checkpoint(ckpt, overrides or [], split=(split or EvalSplit.test).value, data_file=data,
                                       base=base, recipe_path=recipe)

    report = _run(go, debug)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render.eval_table(report)


class SparsifyMethod(str, Enum):
    magnitude = "magnitude"
    wanda = "wanda"


@app.command("sparsify")
def sparsify_command(
    source: Annotated[str, typer.Argument(help="A recipe (.yaml: its model, and its data for wanda) or a model "
                                               "(directory, hub id, packaged:NAME).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the sparse transformers model.",
                                         show_default=False)],
    method: Annotated[SparsifyMethod, typer.Option("--method", help="magnitude: |W|, no data; wanda: |W|·‖X‖ on "
                                                                    "the recipe's data.", show_default=False)],
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Unstructured: the share of weights to zero, "
                                                                      "in (0, 1).", show_default=False)] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="Keep n of every m consecutive inputs of a row "
                                                                  "(n:m), e.g. 2:4.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration examples (wanda), drawn from the recipe's "
                                                           "training data.")] = 128,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the calibration draw (default: train.seed).",
                                             show_default=False)] = None,
    targets: Annotated[str, typer.Option("--targets", help="Linear modules to prune: all-linear (all but the "
                                                           "output heads), suffixes (q_proj,v_proj) or a regex.")
                       ] = "all-linear",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    debug: DebugOption = False,
) -> None:
    """Prune a base model (magnitude or Wanda; unstructured or n:m): a sparse base for LoRS, an ordinary model dir."""
    from sora_cli.sparsify import SPARSIFY_REPORT, sparsify

    def go() -> dict[str, Any]:
        _join("cpu")  # pruning runs on the CPU: under torchrun the processes share Wanda's calibration over gloo
        return sparsify(source, output, method.value, sparsity=sparsity, pattern=pattern, samples=samples, seed=seed,
                        targets=targets, force=force)

    report = _run(go, debug)
    render.sparsify_table(report)
    render.note(f"sparse model: {output}; report: {output / SPARSIFY_REPORT}")


@app.command("plan")
def plan_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides, e.g. model.quantization=nf4 train.batch_size=4.", show_default=False)] = None,
    processes: Annotated[int, typer.Option("--processes", help="Processes (torchrun's nproc_per_node × nodes): "
                                                               "each takes 1/N of the batch.")] = 1,
    strategy: Annotated[str | None, typer.Option("--strategy", help="ddp: each process holds the whole model; fsdp: "
                                                 "FSDP2 shards the base (default: train.strategy).",
                                                 show_default=False)] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory per process (GPU), e.g. 24GiB, 80GB, "
                                                                "16000MiB: say whether it fits, and what to change "
                                                                "if not.", show_default=False)] = None,
    label_tokens: Annotated[int | None, typer.Option("--label-tokens", help="Labelled tokens per example of a "
                                                     "causal LM (default: every position, the upper bound).",
                                                     show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (stable keys).")] = False,
    debug: DebugOption = False,
) -> None:
    """Memory per process before anything trains: parameters, weights, gradients, optimizer states, activations
    and the peak, from the model's config alone (no weights read)."""
    from sora_cli.errors import InputError
    from sora_cli.plan import parse_size, plan
    from sora_cli.recipe import load_recipe

    def go() -> dict[str, Any]:
        limit = parse_size(memory) if memory is not None else None
        if strategy not in (None, "ddp", "fsdp"):
            raise InputError(f"--strategy: {strategy!r} is not a strategy; use ddp or fsdp")
        return plan(load_recipe(recipe, overrides or []), processes=processes, memory=limit,
                    label_tokens=label_tokens, strategy=strategy)

    report = _run(go, debug)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render.plan_table(report)


def main() -> None:
    """The `sora` command. A usage error (a missing argument, an unknown option, a value outside a choice) is one
    line and exit 2, like every other bad input, instead of click's boxed usage text."""
    try:
        code = app(prog_name="sora", standalone_mode=False)
    except typer.Abort:
        sys.exit(1)
    except typer.exceptions.TyperException as e:  # typer's click: UsageError, BadParameter, NoSuchOption ...
        context = getattr(e, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        message = " ".join(str(getattr(e, "format_message", e.__str__)()).split()).replace("Value error, ", "")
        render.error(message + hint)
        sys.exit(int(getattr(e, "exit_code", 2)))
    leave(code if isinstance(code, int) else 0)


def leave(code: int) -> None:
    """Exit with `code`. A process of a torchrun launch skips the interpreter's teardown (os._exit once its output
    is flushed; the process group is gone and every file closed by then): the C++ threads of torch.distributed
    freed during that teardown abort the process now and then ("terminate called without an active exception",
    exit -6) after its work is done and saved, which turned a finished run into a failed launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
