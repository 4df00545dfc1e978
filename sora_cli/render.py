"""Everything the user sees: rich tables, progress and one-line errors. Nothing else imports rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One red line per line of the message (a recipe's problems come one per line)."""
    lines = message.splitlines() or [""]
    err_console.print(f"[bold red]error:[/] {lines[0]}", markup=True, soft_wrap=True)
    for line in lines[1:]:
        err_console.print(f"[red]{line}[/]", markup=True, soft_wrap=True)


def note(message: str) -> None:
    console.print(message, soft_wrap=True, markup=False)


def trainable_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


class TrainProgress:
    """A live bar: step, loss, learning rate, active ranks (SoRA's ranks switching off as it trains)."""

    def __init__(self, total: int, start: int = 0):
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float | None = None, lr: float | None = None,
               active: tuple[int, int] | None = None) -> None:
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if active is not None:
            parts.append(f"ranks {active[0]}/{active[1]}")
        self.progress.update(self.task, completed=step, **({"stats": "  ".join(parts)} if parts else {}))

    def log(self, message: str) -> None:
        self.progress.console.print(message, soft_wrap=True, markup=False)


def metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_summary(rows: list[tuple[str, str]], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
