"""Everything the user sees: rich tables, progress and one-line errors. Nothing else imports rich."""

from __future__ import annotations

import math
import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # piped or captured output: rich's default of 80 columns would cut the tables


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

    def __init__(self, total: int, start: int = 0, label: str = "train"):
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
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
        if parts:
            self.progress.update(self.task, completed=step, stats="  ".join(parts))
        else:
            self.progress.update(self.task, completed=step)

    def log(self, message: str) -> None:
        self.progress.console.print(message, soft_wrap=True, markup=False)


def metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def stats_rows(stats: dict[str, int]) -> list[tuple[str, str]]:
    """Summary rows for a method's totals: surviving ranks; zero gates where the method has gates."""
    rows = [("surviving ranks", f"{stats.get('active_rank', 0)} / {stats.get('max_rank', 0)}")]
    if stats.get("total_gates"):
        zero, total = stats["zero_gates"], stats["total_gates"]
        rows.append(("zero gates", f"{zero} / {total} ({100 * zero / total:.1f}%)"))
    for unit in ("ranks", "params"):  # SoRA to a budget (adapter.target)
        if f"budget_{unit}" in stats:
            rows.append(("budget", f"{stats['budget_reached']:,d} of {stats[f'budget_{unit}']:,d} {unit}; the final "
                         f"cut took {stats['budget_cut']} ranks (smallest |g|)"))
    if "graph_breaks" in stats:  # train.compile
        rows.append(("compiled", f"{stats['compiled_blocks']} blocks, {stats['graph_breaks']} graph breaks"))
        if stats.get("eager_fallbacks"):
            rows.append(("warning", f"torch.compile hit dynamo's recompile limit {stats['eager_fallbacks']} times: "
                                    "the blocks' later variants ran eagerly (raise "
                                    "torch._dynamo.config.recompile_limit, or keep input shapes steady)"))
    if stats.get("adapter_numel"):  # RoseLoRA: the entries of A and B its masks kept
        nnz, numel = stats["adapter_nnz"], stats["adapter_numel"]
        rows.append(("adapter non-zeros", f"{nnz:,d} / {numel:,d} ({100 * nnz / numel:.1f}%)"))
    return rows


def constant_rows(checkpoints: dict[str, tuple[dict[str, float], ...]]) -> list[tuple[str, str]]:
    """A warning row for each checkpoint whose dev or test predictions were all the same (collapse.py)."""
    return [("warning", f"{name} gives every example the same prediction: a constant predictor")
            for name, splits in checkpoints.items() if any(m.get("constant_predictor") for m in splits)]


def run_summary(rows: list[tuple[str, str]], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def eval_table(report: dict[str, Any]) -> None:
    """`sora eval`'s report: what was evaluated on what, then one row per metric."""
    model = f"{report['method']} adapter" if report["model"] == "adapter" else "base (adapters off)"
    rows = [("checkpoint", f"{report['checkpoint']} (step {report['step']})"),
            ("model", f"{model}, {report['base_model']}"),
            ("split", f"{report['split']}: {report['examples']:,d} examples from {report['data']}")]
    rows += [(name, f"{value:.4f}") for name, value in report["metrics"].items()]
    run_summary(rows, title="sora eval")


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def inspect_tables(report: dict[str, Any], sort: str = "name") -> None:
    """Per-module table, then by module type and by layer, then the summary."""
    rows = report["modules"]
    rows = sorted(rows, key=lambda r: (-r["rank"], r["module"]) if sort == "rank" else r["module"])
    gated, sparse = report["gated"], report["sparse_base"] or report["keep_sparsity"]
    title = f"{report['method']} adapter, step {report['step']}" + (" (pruned)" if report["pruned"] else "")
    table = Table(title=title, title_justify="left")
    table.add_column("module", no_wrap=True, min_width=max((len(r["module"]) for r in rows), default=6))
    for col in ["r_max", "rank"] + (["|g|₁", "min |g|", "median |g|", "max |g|"] if gated else []) + [
            "params", "after prune"] + (["base sparsity"] if sparse else []):
        table.add_column(col, justify="right")
    for r in rows:
        gates = [_num(r["gate_l1"]), _num(r["gate_min"]), _num(r["gate_median"]), _num(r["gate_max"])] if gated else []
        table.add_row(r["module"], str(r["r_max"]), str(r["rank"]), *gates, f"{r['params']:,d}",
                      f"{r['params_pruned']:,d}", *([_percent(r["base_sparsity"])] if sparse else []))
    console.print(table)
    if "support" in report:  # sparse factors (RoseLoRA): which base weights the update touches
        console.print(support_table(report["support"], [r["module"] for r in rows]))
    for key, label in (("by_type", "module type"), ("by_layer", "layer")):
        console.print(_group_table(report[key], label))
    s = report["summary"]
    of_base = f" = {s['percent_of_base']:.3f}% of the base model's {s['base_parameters']:,d}" \
        if s["percent_of_base"] is not None else ""
    console.print(f"surviving rank {s['rank']} / {s['r_max']} ({s['rank_kept_percent']:.1f}%) in "
                  f"{s['modules_alive']} of {s['modules']} modules; adapter parameters {s['params']:,d} now, "
                  f"{s['params_pruned']:,d} after pruning{of_base}", markup=False, soft_wrap=True)
    if "budget" in report:
        b = report["budget"]
        console.print(budget_table(b))
        console.print(f"budget {b['budget']:,d} {b['unit']} by step {b['reach_at']}; reached {b['reached']:,d}; the "
                      f"final cut took {b['final_cut']} ranks (smallest |g|)", markup=False, soft_wrap=True)
    if report.get("quantization"):
        note(f"base: {report['base_model']}, {quantization_text(report['quantization'])}")
    if sparse:
        kept = ("the adapter keeps its zeros (keep_sparsity)" if report["keep_sparsity"] else
                "the adapter does not keep its zeros: a merge fills them (train with keep_sparsity or method lors)")
        note(f"base sparsity of the adapted weights {_percent(s['base_sparsity'])}; {kept}")


def budget_table(budget: dict[str, Any], points: int = 8) -> Table:
    """SoRA to a budget: λ and the surviving count at a few steps of the recorded trajectory (`inspect --plot`
    draws all of it), then the final cut."""
    unit, trail = budget["unit"], budget["path"]
    table = Table(title="SoRA to a budget: λ by step", title_justify="left")
    for col in ("step", "λ", unit):
        table.add_column(col, justify="right")
    every = max(1, math.ceil(len(trail) / points))
    shown = trail[::every] + ([trail[-1]] if trail and (len(trail) - 1) % every else [])
    for step, lam, count in shown:
        table.add_row(str(step), f"{lam:.4g}", f"{count:,d}")
    if budget["settled"]:
        table.add_row(f"{budget['reach_at']}, cut", "", f"{budget['reached']:,d}",
                      style="bold")
    return table


def quantization_text(q: dict[str, Any]) -> str:
    """adapter.json's quantization record in words: `4-bit nf4, double quantization, compute in bfloat16`."""
    if q["bits"] == 8:
        return "8-bit int8 (LLM.int8)"
    double = ", double quantization" if q.get("double_quantization") else ""
    return f"4-bit {q['type']} (blocks of {q.get('blocksize', 64)}{double}), compute in {q.get('compute_dtype')}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def support_table(support: dict[str, Any], order: list[str]) -> Table:
    """One row per module in `order` (the module table's), then the totals: nnz and density of A and B, the exact
    nnz(ΔW), Proposition 1's bound on it, and the share of the base matrix that ΔW touches."""
    caption = Text("bound: min(d_out·d_in, Σ_i nnz(B[:, i])·nnz(A[i, :])); touched: nnz(ΔW) / (d_out·d_in)")
    table = Table(title="update support", title_justify="left", caption=caption, caption_justify="left")
    table.add_column("module", no_wrap=True)
    for col in ("density A", "density B", "nnz(A)", "nnz(B)", "nnz(ΔW)", "bound", "touched"):
        table.add_column(col, justify="right")
    by_name = {r["module"]: r for r in support["modules"]}
    rows = [by_name[name] for name in order] + [dict(support["total"], module="total")]
    for i, r in enumerate(rows):
        table.add_row(r["module"], _percent(r["density_A"]), _percent(r["density_B"]), f"{r['nnz_A']:,d}",
                      f"{r['nnz_B']:,d}", f"{r['nnz_delta']:,d}", f"{r['bound']:,d}", _percent(r["touched_fraction"]),
                      end_section=i == len(rows) - 2, style="bold" if i == len(rows) - 1 else None)
    return table


def _group_table(groups: dict[str, dict[str, int]], label: str, after: dict[str, dict[str, int]] | None = None,
                 title: str | None = None) -> Table:
    table = Table(title=title or f"by {label}", title_justify="left")
    table.add_column(label)
    table.add_column("modules", justify="right")
    table.add_column("rank / r_max", justify="right")
    table.add_column("kept", justify="right")
    if after is not None:
        table.add_column("rank after", justify="right")
    for name, g in groups.items():
        row = [name, str(g["modules"]), f"{g['rank']} / {g['r_max']}",
               f"{100 * g['rank'] / g['r_max']:.0f}%" if g["r_max"] else "–"]
        if after is not None:
            row.append(str(after.get(name, {}).get("rank", 0)))
        table.add_row(*row)
    return table


def prune_summary(before: dict[str, Any], after: dict[str, Any], out: str, peft: str | None) -> None:
    b, a = before["summary"], after["summary"]
    console.print(_group_table(before["by_type"], "module type", after["by_type"], title="rank by module type"))
    console.print(f"adapter parameters {b['params']:,d} -> {a['params']:,d} "
                  f"({100 * a['params'] / b['params'] if b['params'] else 0:.1f}%); "
                  f"rank {b['r']} -> {a['r']}; modules with an adapter {b['modules_alive']} -> {a['modules_alive']}",
                  markup=False, soft_wrap=True)
    console.print(f"pruned checkpoint: {out}" + (f"\nPEFT adapter: {peft}" if peft else ""), markup=False)


def merge_summary(report: dict[str, Any], details: str) -> None:
    """Two lines at most: base weights changed (after the cast to the saved dtype), updates the cast rounded away;
    the per-module numbers are in `details` (sora_merge.json beside the model)."""
    t = report["total"]
    quantized = report.get("quantization")
    if quantized:
        error = quantized["error"]["relative"]
        if quantized["merged_into"] == "full":
            note(f"the run trained on an {quantized['type']} base: merged into the full-precision weights it was "
                 f"quantized from (the adapter saw their {quantized['type']} codes, {error:.2%} off in Frobenius norm)")
        else:
            note(f"merged into the dequantized {quantized['type']} weights the adapter trained on: they carry a "
                 f"quantization error of {error:.2%} (‖Q(W) − W‖_F / ‖W‖_F, largest entry "
                 f"{quantized['error']['max_abs']:.3g}) against the full-precision weights")
    share = f" ({100 * t['changed'] / t['weights']:.2f}%)" if t["weights"] else ""
    note(f"changed {t['changed']:,d} of {t['weights']:,d} base weights of the adapted modules{share}, counted in "
         f"{report['dtype']}; {t['rounded_away']:,d} non-zero updates rounded away by the cast; per module: {details}")
    if t["rounded_away"]:
        peft = not report["keep_sparsity"] and report["format"] == "transformers"  # what --peft can export
        keep = "sora eval CKPT" + (", or sora prune CKPT --peft DIR" if peft else "")
        note(f"hint: those updates are below the {report['dtype']} spacing of their weights, so the merged model "
             f"lacks them; the unmerged adapter keeps them ({keep})")
    if report["sparse_base"] or report["keep_sparsity"]:
        console.print(sparsity_table(report["modules"]))
        kept = "kept exactly" if report["zero_pattern_kept"] else "NOT kept"
        note(f"base sparsity {_percent(t['zeros_before'] / t['weights'])} -> merged "
             f"{_percent(t['zeros_after'] / t['weights'])}: the base's zero pattern is {kept}"
             + (f"; {t['kept_rounded_to_zero']:,d} kept weights rounded to zero in {report['dtype']}"
                if t["kept_rounded_to_zero"] else ""))


def sparsity_table(modules: dict[str, dict[str, int]]) -> Table:
    """Zeros of the adapted weights before and after the merge, by module type (q_proj, ...: every layer's)."""
    groups: dict[str, dict[str, int]] = {}
    for name, c in modules.items():
        g = groups.setdefault(name.rsplit(".", 1)[-1], {"weights": 0, "zeros_before": 0, "zeros_after": 0, "n": 0})
        for key in ("weights", "zeros_before", "zeros_after"):
            g[key] += c[key]
        g["n"] += 1
    table = Table(title="sparsity of the merged weights", title_justify="left")
    for column in ("module", "layers", "before", "after"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for kind, g in groups.items():
        table.add_row(kind, str(g["n"]), _percent(g["zeros_before"] / g["weights"]),
                      _percent(g["zeros_after"] / g["weights"]))
    return table


def schedule_plan(stages: list[Any], step_seconds: float) -> None:
    table = Table(title="sparsifying schedule (plan)", title_justify="left")
    budgets = any(s.budget is not None for s in stages)
    for col in ("stage", "budget" if budgets else "λ", "steps", "learning rate"):
        table.add_column(col, justify="right" if col != "learning rate" else "left")
    for s in stages:
        what = f"{100 * s.budget:g}% of the ranks" if s.budget is not None else f"{s.lam:g}"
        table.add_row(str(s.k), what, str(s.steps), s.lr)
    console.print(table)
    total = sum(s.steps for s in stages)
    console.print(f"{total} training steps at {step_seconds:.3f} s/step (measured): about "
                  f"{total * step_seconds / 60:.1f} min of training, plus evaluation after every stage",
                  markup=False)


def schedule_table(records: list[dict[str, Any]]) -> None:
    """The stage table so far (printed again, one row longer, after every stage)."""
    table = Table(title="sparsifying schedule", title_justify="left")
    budgets = any(r.get("budget") is not None for r in records)
    for col in ("stage", *(("budget",) if budgets else ()), "λ", "steps", "non-zero gates", "params", "memorization",
                "mem %", "generalization", "gen %", "test"):
        table.add_column(col, justify="right")
    for r in records:
        budget = (f"{100 * r['budget']:g}%" if r.get("budget") is not None else "–",) if budgets else ()
        table.add_row(str(r["stage"]), *budget, _num(r["lambda"], "g"), str(r["steps"]),
                      f"{r['nonzero_gates']} / {r['total_gates']}", f"{r['params']:,d}", _num(r["memorization"], ".4f"),
                      _num(r["memorization_pct"], ".1f"), _num(r["generalization"], ".4f"),
                      _num(r["generalization_pct"], ".1f"), _num(r["test"], ".4f"))
    console.print(table)


def edit_summary(summary: dict[str, Any], out: str) -> None:
    """`sora train` on an edit recipe: unedited and edited means per metric, and what the edits cost."""
    table = Table(title=f"sora edit: {summary['edits']} edits, {summary['mode']} mode, {summary['method']} "
                        f"({summary['protocol']})", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("unedited", justify="right")
    table.add_column("edited", justify="right")
    if "just_after" in summary:
        table.add_column("right after each edit", justify="right")
    for name, after in summary["post"].items():
        row = [name, _num(summary["pre"].get(name)), _num(after)]
        if "just_after" in summary:
            row.append(_num(summary["just_after"].get(name)))
        table.add_row(*row)
    console.print(table)
    per = "per edit" if summary["mode"] == "single" else "by the final adapter"
    changed, total = summary["changed_weights_per_edit"] or 0, summary["adapted_base_weights"]
    note(f"base weights changed {per}: {changed:,.0f} of {total:,d} in the adapted modules "
         f"({100 * changed / max(total, 1):.3f}%); {summary['seconds_per_edit']:.1f} s per edit")
    if summary["rounded_away_per_edit"]:
        note(f"hint: {summary['rounded_away_per_edit']:,.2f} non-zero updates per edit (mean) round away in the base "
             "dtype; a merged model would lack them")
    note(f"per-edit results: {out}/edits.jsonl; means: {out}/summary.json")


def sparsify_table(report: dict[str, Any]) -> None:
    """`sora sparsify`: one row per pruned module (shape, weights, zeros, sparsity), the total row, then one line
    with the rule and, for wanda, the calibration data."""
    rule = f"{100 * report['sparsity']:g}% unstructured" if "sparsity" in report else f"{report['pattern']} " \
        "(n:m keeps n of every m inputs)"
    table = Table(title=f"sora sparsify: {report['method']}, {rule}", title_justify="left")
    table.add_column("module", no_wrap=True)
    for col in ("shape", "weights", "zeros", "sparsity"):
        table.add_column(col, justify="right")
    rows = [dict(m, module=name) for name, m in report["modules"].items()] + [dict(report["total"], module="total")]
    for i, r in enumerate(rows):
        shape = " × ".join(str(d) for d in r["shape"]) if "shape" in r else ""
        table.add_row(r["module"], shape, f"{r['weights']:,d}", f"{r['zeros']:,d}", f"{100 * r['sparsity']:.2f}%",
                      end_section=i == len(rows) - 2, style="bold" if i == len(rows) - 1 else None)
    console.print(table)
    t, c = report["total"], report["calibration"]
    data = f"; calibrated on {c['samples']} samples ({c['tokens']:,d} tokens) of {c['data']}, seed {c['seed']}" \
        if c else ""
    note(f"total: {t['zeros']:,d} of {t['weights']:,d} weights zero ({100 * t['sparsity']:.2f}%) in "
         f"{len(report['modules'])} modules{data}")


def size_text(n: int | float) -> str:
    """Bytes in binary units: 812.0 MiB, 15.27 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def plan_table(report: dict[str, Any]) -> None:
    """`sora plan`: parameters and bytes per process (sora_cli/plan.py), the verdict against --memory, the advice."""
    b, p = report["bytes"], report["parameters"]
    labels = f", {report['label_tokens']:,d} labelled" if report["label_tokens"] is not None else ""
    kind = "FSDP2, the base sharded" if report["strategy"] == "fsdp" else "data parallel"
    processes = f"{report['processes']} processes ({kind})" if report["processes"] > 1 else "1 process"
    note(f"sora plan: {report['model']} ({report['architecture']}), {processes}; per process: micro-batch "
         f"{report['micro_batch']} × {report['max_length']} tokens{labels}, grad_accum {report['grad_accum']}, "
         f"precision {report['precision']}")
    rows = [("parameters: base", f"{p['base']:,d}"),
            ("parameters: adapted", f"{p['adapted']:,d} in {p['adapted_modules']} linears"),
            ("parameters: trainable", f"{p['trainable']:,d}")]
    rows += weight_rows(report)
    rows += [("gradients", size_text(b["gradients"])),
             ("optimizer states (AdamW)", size_text(b["optimizer_states"])),
             ("activations, no checkpointing", size_text(b["activations_without_checkpointing"])),
             ("activations, checkpointing", size_text(b["activations_with_checkpointing"])),
             (f"largest transient ({report['largest_transient'].replace('_', ' ')})", size_text(b["transient"]))]
    on = report["gradient_checkpointing"]
    peaks = [(f"peak, checkpointing off{'' if on else ' (recipe)'}", size_text(b["peak_without_checkpointing"])),
             (f"peak, checkpointing on{' (recipe)' if on else ''}", size_text(b["peak_with_checkpointing"]))]
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for i, (k, v) in enumerate(rows + peaks):
        table.add_row(k, v, end_section=i in (2, len(rows) - 1), style="bold" if "(recipe)" in k else None)
    console.print(table)
    plan_verdict(report)


def weight_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The base's weights: whole (quantized linears, the rest); or FSDP2's shard, what stays whole, the gathered
    units (and the offloaded shards, in CPU memory)."""
    b, quant = report["bytes"], report["quantization"]
    double = ", double quant" if report["double_quantization"] else ""
    what = f"{quant}{double} and {report['dtype']}" if quant else report["dtype"]
    if report["strategy"] == "fsdp":
        where = " in CPU memory (offload)" if report["fsdp_cpu_offload"] else ""
        return [(f"weights: 1/{report['processes']} shard ({what}){where}", size_text(b["weights_shards"])),
                ("weights: kept whole (quantization statistics, buffers)", size_text(b["weights_whole"])),
                ("weights: gathered to compute (root + 2 blocks)", size_text(b["weights_gathered"]))]
    rows = [(f"weights: quantized linears ({quant}{double})", size_text(b["weights_quantized_linears"]))]
    other = (f"weights: {'other' if quant else 'all'} ({report['dtype']})", size_text(b["weights_other"]))
    return [*(rows if quant else []), other]


def plan_verdict(report: dict[str, Any]) -> None:
    """Whether the peak fits in --memory and, if not, the advice: each change on top of the ones before."""
    if report["memory"] is None:
        return
    memory, peak = size_text(report["memory"]), report["bytes"]["peak"]
    if report["fits"]:
        note(f"fits in {memory} per process: peak {size_text(peak)} ({100 * peak / report['memory']:.0f}%)")
        return
    note(f"does not fit in {memory} per process: peak {size_text(peak)}; in order, each on top of the last:")
    for i, a in enumerate(report["advice"], 1):
        if a["peak"] is None:
            note(f"  {i}. {a['change']}")
        else:
            note(f"  {i}. {a['change']} ({' '.join(a['overrides'])}): peak {size_text(a['peak'])}, "
                 f"{'fits' if a['fits'] else 'does not fit'}")
