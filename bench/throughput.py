"""Training throughput on the causal quickstart's data: padded against packed batches, eager against compiled
blocks, sora's SoRA and LoRA against PEFT LoRA and the frozen floor.

    python bench/throughput.py            # SmolLM2-135M-Instruct, 64 training examples per pass, 3 repeats
    python bench/throughput.py --smoke    # CI: a tiny random Llama

Every contestant trains on the same examples (the first of the quickstart's seed-0 order), one pass over them per
repeat: padded, in batches of 8 padded to their longest (sora's default); packed, in rows of up to
data.max_length = 160 tokens (`data.packing`), 8 rows a step. Tokens/s counts the examples' own tokens (padding
excluded), so padded and packed divide the same number by their own time. Compiled: `train.compile`'s blocks
(compiled.py), their compilation in the warm-up pass, not timed. Each step is the engine's `train_step`
(speed_causal.py's contestants), interleaved, the order rotating and reversing every repeat. Where trl imports,
TRL's SFTTrainer with packing=True joins them on the same token ids (trl_contestant.py). Writes throughput.json
and throughput.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import speed_causal  # noqa: E402
import trl_contestant  # noqa: E402
from speed import interleaved  # noqa: E402

from sora_cli.data import TrainOrder  # noqa: E402
from sora_cli.packing import pack  # noqa: E402
from sora_cli.recipe import load_recipe  # noqa: E402

METHODS = ("peft-lora", "sora-lora", "sora-r8", "floor")
LABELS = {"trl": trl_contestant.LABEL}
COLUMNS = ["contestant", "batches", "blocks", "tokens / s", "speed-up over padded eager", "time / PEFT LoRA's",
           "time / floor's"]


def batches(smoke: bool, workdir: Path, n: int, sets: list[str]) -> tuple[Any, Any, list[str],
                                                                          dict[str, list[dict[str, Any]]], Any, Any]:
    """The recipe, base model, targets, the first `n` examples of the seed-0 order as padded batches and as packed
    rows, the examples themselves and the tokenizer."""
    r, task, base, tokenizer, targets, data = speed_causal.load(smoke, workdir, sets)
    examples = task.subset(data, TrainOrder(len(data), n, 0).indices(0)[1])
    size, pad = r.train.batch_size, tokenizer.pad_token_id
    padded = [task.collate(examples, list(range(i, min(i + size, n))), pad) for i in range(0, n, size)]
    rows = pack(examples.examples, r.data.max_length)
    packed = [task.collate(rows, list(range(i, min(i + size, len(rows)))), pad) for i in range(0, len(rows), size)]
    return r, base, targets, {"padded": padded, "packed": packed}, examples, tokenizer


def one_pass(step: Any, batches: list[dict[str, Any]]) -> Callable[[], float]:
    """Seconds for one step over each batch."""

    def run() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama (CI)")
    parser.add_argument("--examples", type=int, help="training examples per pass (default 64; smoke 16)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; smoke 2)")
    parser.add_argument("--no-compile", action="store_true", help="eager contestants only")
    parser.add_argument("--no-trl", action="store_true", help="leave out TRL's SFTTrainer (run when trl imports)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides, e.g. data.dataset=packaged:convention_speeches data.format=text")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    args = parser.parse_args(argv)
    n, repeats = args.examples or (16 if args.smoke else 64), args.repeats or (2 if args.smoke else 3)
    facts = common.machine(torch.device("cpu"))
    out = common.results_dir(args.out, facts, args.smoke)
    modes = ("eager",) if args.no_compile else ("eager", "compiled")
    # Every contestant compiles the same block code, and dynamo keeps one cache per code object: past its limit
    # (8 variants) a later contestant's "compiled" blocks would silently run eagerly. A run trains one model and
    # needs a few (the first block's input needs no gradient; a new length once).
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    with tempfile.TemporaryDirectory() as tmp:
        r, base, targets, shaped, examples, tokenizer = batches(args.smoke, Path(tmp), n, args.set)
        tokens = sum(examples.lengths)
        steps = {k: len(v) for k, v in shaped.items()}
        runs: dict[Any, Callable[[], float]] = {}
        for method in METHODS:
            for mode in modes:
                for kind, group in shaped.items():
                    step = speed_causal.contestant(method, r, base, targets, compile=mode == "compiled")
                    print(f"warm-up: {method}, {kind}, {mode}", flush=True)
                    one_pass(step, group)()  # compiles, allocates AdamW's state
                    runs[(method, kind, mode)] = one_pass(step, group)
        if not args.no_trl and trl_contestant.available():
            print("warm-up: TRL SFTTrainer, packed, eager", flush=True)
            trl = trl_contestant.TrlPass(base, tokenizer, targets, examples, r.data.max_length,
                                         r.train.batch_size, r.train.lr, Path(tmp))
            trl()
            runs[("trl", "packed", "eager")], steps["trl"] = trl, trl.clock.steps
            trl_tokens = sum(len(ids) for ids in trl.trainer.train_dataset["input_ids"])  # its packed rows'
            assert trl_tokens == tokens, (trl_tokens, tokens)  # TRL trains on exactly the same tokens
        times = interleaved(runs, repeats)
    table = rows(times, tokens, steps)
    return write(out, table, r, n, tokens, repeats, facts, argv)


def rows(times: dict[Any, list[float]], tokens: int, steps: dict[str, int]) -> list[dict[str, Any]]:
    """Per contestant: tokens/s (median pass), its speed-up over its own padded eager pass, and its time over PEFT
    LoRA's and the floor's on the same batches and blocks (medians of the per-pass ratios)."""

    def over(key: Any, ref: Any) -> float:
        return statistics.median(a / b for a, b in zip(times[key], times[ref], strict=True))

    out = []
    for key, t in times.items():
        method, kind, mode = key
        padded = (method, "padded", "eager")  # TRL runs packed only: no speed-up of its own to give
        out.append({"method": method, "label": LABELS.get(method) or speed_causal.LABELS[method], "batches": kind,
                    "blocks": mode, "steps_per_pass": steps["trl" if method == "trl" else kind],
                    "tokens_per_s": tokens / statistics.median(t),
                    "speedup": 1 / over(key, padded) if padded in times else None,
                    "time_vs_peft_lora": over(key, ("peft-lora", kind, mode)),
                    "time_vs_floor": over(key, ("floor", kind, mode)), "repeats_s": t})
    return out


def targets(table: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    by = {(x["method"], x["batches"], x["blocks"]): x for x in table}
    packed = by[("sora-r8", "packed", "eager")]["speedup"]
    sora, lora = (by[(m, "padded", "eager")]["time_vs_floor"] for m in ("sora-r8", "sora-lora"))
    peft = by[("peft-lora", "padded", "eager")]["time_vs_floor"]
    return [("packed ≥ 1.5 × padded tokens/s (SoRA, eager)", f"{packed:.2f}×", packed >= 1.5),
            ("SoRA step ≤ 1.2 × the frozen floor's (padded, eager)", f"{sora:.3f}×", sora <= 1.2),
            ("LoRA step ≤ 1.15 × the frozen floor's (padded, eager)", f"{lora:.3f}×", lora <= 1.15),
            ("SoRA and LoRA steps ≤ PEFT LoRA's (padded, eager)", f"{sora / peft:.3f}× and {lora / peft:.3f}×",
             sora <= peft and lora <= peft)]


def write(out: Path, table: list[dict[str, Any]], r: Any, n: int, tokens: int, repeats: int, facts: dict[str, Any],
          argv: list[str] | None) -> Path:
    checks = targets(table)
    command = "python bench/throughput.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "throughput.json", {"machine": facts, "model": r.model.name_or_path, "command": command,
                                               "examples": n, "tokens": tokens, "repeats": repeats, "rows": table,
                                               "targets": [{"target": t, "measured": v, "met": ok}
                                                           for t, v, ok in checks]})
    lines = [[x["label"], f"{x['batches']} ({x['steps_per_pass']} steps)", x["blocks"], f"{x['tokens_per_s']:,.0f}",
              "–" if x["speedup"] is None else f"{x['speedup']:.2f}×", f"{x['time_vs_peft_lora']:.3f}",
              f"{x['time_vs_floor']:.3f}"] for x in table]
    data = r.data.dataset or r.data.train_file
    data = "the causal quickstart's training data" if data == load_recipe(speed_causal.RECIPE).data.dataset else data
    text = (f"### Throughput: packing and compiled blocks\n\n{r.model.name_or_path}, {n} examples of "
            f"{data} ({tokens:,d} tokens): padded batches of {r.train.batch_size}, or packed "
            f"rows of up to {r.data.max_length} tokens, {r.train.batch_size} a step; all linears, r=8; {repeats} "
            f"interleaved passes. Machine: {facts['cpu']} ({facts['torch_threads']} threads); commit "
            f"{facts['commit']}; torch {facts['torch']}.\n\n`{command}`\n\n" + common.markdown_table(COLUMNS, lines)
            + "\n\nSpeed-up: the row's tokens/s over the same method's padded eager pass. Time ratios: the row's pass "
              "over PEFT LoRA's or the floor's on the same batches and blocks (so a step's time ratio); medians of the "
              "per-pass ratios. Tokens: the examples' own, padding excluded.\n\n" + common.target_lines(checks) + "\n")
    (out / "throughput.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
