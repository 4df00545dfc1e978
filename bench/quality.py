"""Quality, parameters and training time: PEFT LoRA and AdaLoRA against sora's LoRA, SoRA and RoseLoRA, side by side.

    python bench/quality.py                      # the full run: 5 methods x 3 seeds, quickstart model and data
    python bench/quality.py --seeds 0 --steps 200 # a shorter look
    python bench/quality.py --smoke               # CI: tiny random BERT, 2 seeds x 6 steps, under a minute

Every method trains on the same batches in the same order with the same seeds, head, target modules, LR
schedule, clipping and AdamW, stepped by sora's own `engine.train_step` (see bench/common.py). SoRA is then
pruned (`sora_cli.prune.prune`) and evaluated again. Finished runs are kept in runs.jsonl and skipped when the
command is run again (`--fresh` starts over), so seeds can be added later. Writes quality.json and quality.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from sora_cli.adapters import adapter_layers  # noqa: E402
from sora_cli.errors import SoraError  # noqa: E402
from sora_cli.report import pyplot  # noqa: E402

PRUNED = {"sora-r8": "sora-r8-pruned", "sora-r16": "sora-r16-pruned"}
ROWS = ("peft-lora", "peft-adalora", "sora-lora", "sora-r8", "sora-r8-pruned", "sora-r16", "sora-r16-pruned",
        *common.ROSELORA)
COLUMNS = ["method", "lr", "accuracy", "trainable params", "inference params", "inference / PEFT LoRA",
           "train time (s)", "time / AdaLoRA"]


def inference_parameters(c: common.Contestant) -> int:
    """The adapter as shipped unmerged, head excluded: LoRA r(d_in + d_out); SoRA r(d_in + d_out + 1) (A, B and
    the gate: every rank before pruning, the surviving ones after); AdaLoRA k(d_in + d_out + 1) with k the
    triplets its final budget kept (E != 0: PEFT saves its rank pattern and loads only those); RoseLoRA the
    non-zero entries of A and B (what a sparse format stores; as a dense LoRA it ships r(d_in + d_out))."""
    if c.key == "peft-lora":
        return sum(p.numel() for n, p in c.model.named_parameters() if "lora_A" in n or "lora_B" in n)
    if c.key == "peft-adalora":
        total = 0
        for module in c.model.modules():
            if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
                kept = int((module.lora_E["default"] != 0).sum())
                total += kept * (module.in_features + module.out_features + 1)
        return total
    if c.key in common.ROSELORA:  # stored sparse: its non-zero entries of A and B
        return sum(int(torch.count_nonzero(t)) for _, m in adapter_layers(c.model) for t in (m.lora_A, m.lora_B))
    return sora_parameters(c.model, gate=c.key.startswith("sora-r"))


def sora_parameters(model: torch.nn.Module, gate: bool) -> int:
    """Σ over sora's adapted layers of r (d_in + d_out), plus r gate entries for SoRA."""
    return sum(m.r * (m.in_features + m.out_features + gate) for _, m in adapter_layers(model))


def run_one(key: str, setup: common.Setup, s: common.Settings, seed: int) -> list[dict[str, Any]]:
    c = common.build(key, setup, s, seed)
    record = {"key": key, "label": c.label, "split": setup.split, "seed": seed, "lr": c.lr, "steps": s.steps,
              "trainable_params": c.trainable(), "initial_sha256": common.initial_hashes(c)}
    record.update(common.train(c, setup, s, seed))
    record["accuracy"], logits = common.held_out_accuracy(c.model, setup)
    record["inference_params"] = inference_parameters(c)
    records = [record]
    if key in PRUNED:
        t0 = time.perf_counter()
        model = common.adapter_copies(c, setup, seed)["pruned"]
        prune_seconds = time.perf_counter() - t0
        accuracy, pruned_logits = common.held_out_accuracy(model, setup)
        ranks = [m.r for _, m in adapter_layers(model)]
        records.append({**record, "key": PRUNED[key], "label": c.label + ", pruned", "accuracy": accuracy,
                        "inference_params": sora_parameters(model, gate=True),
                        "train_seconds": record["train_seconds"] + prune_seconds, "surviving_rank": sum(ranks),
                        "max_logit_diff_vs_unpruned": float((pruned_logits - logits).abs().max())})
    return records


def unpruned_as_shipped(records: list[dict[str, Any]], head_params: int) -> list[dict[str, Any]]:
    """Unpruned SoRA ships every rank: all it trained but the head. (Records written before this function
    counted only the surviving ranks there; the pruned row holds that count.)"""
    return [{**r, "inference_params": r["trainable_params"] - head_params} if r["key"] in PRUNED else r
            for r in records]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for key in ROWS:
        mine = [r for r in records if r["key"] == key]
        if not mine:
            continue
        acc = [r["accuracy"] for r in mine]
        rows[key] = {"label": mine[0]["label"], "lr": mine[0]["lr"], "seeds": [r["seed"] for r in mine],
                     "accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "trainable_params": mine[0]["trainable_params"],
                     "inference_params_mean": statistics.fmean(r["inference_params"] for r in mine),
                     "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine)}
    return rows


def targets(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The issue's targets that this table can answer: (target, measured, met)."""
    out = []
    if {"peft-lora", "peft-adalora", "sora-r8-pruned"} <= set(rows):
        lora, ada, sora = rows["peft-lora"], rows["peft-adalora"], rows["sora-r8-pruned"]
        gap = 100 * (sora["accuracy_mean"] - lora["accuracy_mean"])
        out.append(("SoRA r_max=8 accuracy ≥ PEFT LoRA − 0.3 points", f"{gap:+.2f} points", gap >= -0.3))
        gap_ada = 100 * (sora["accuracy_mean"] - ada["accuracy_mean"])
        out.append(("SoRA r_max=8 accuracy ≥ PEFT AdaLoRA", f"{gap_ada:+.2f} points", gap_ada >= 0))
        share = sora["inference_params_mean"] / lora["inference_params_mean"]
        out.append(("SoRA r_max=8 inference params ≤ 70% of LoRA's", f"{100 * share:.1f}%", share <= 0.7))
        t = rows["sora-r8"]["train_seconds_mean"] / ada["train_seconds_mean"]
        out.append(("SoRA total training time ≤ 0.7 × PEFT AdaLoRA's", f"{t:.2f}×", t <= 0.7))
    return out


def markdown(rows: dict[str, dict[str, Any]], s: common.Settings, setup_text: str, split: str,
             facts: dict[str, Any], command: str) -> str:
    lora = rows.get("peft-lora", {}).get("inference_params_mean")
    ada = rows.get("peft-adalora", {}).get("train_seconds_mean")
    table = []
    for key, r in rows.items():
        n = len(r["seeds"])
        table.append([r["label"], f"{r['lr']:g}", f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} (n={n})",
                      f"{r['trainable_params']:,d}", f"{r['inference_params_mean']:,.0f}",
                      f"{r['inference_params_mean'] / lora:.2f}" if lora else "–",
                      f"{r['train_seconds_mean']:.1f}", f"{r['train_seconds_mean'] / ada:.2f}" if ada else "–"])
    checks = "\n".join(f"- {'met' if ok else '**missed**'}: {what} — measured {value}"
                       for what, value, ok in targets(rows))
    return (f"### Quality, parameters, training time\n\n"
            f"{setup_text}; {s.steps} steps of {s.batch_size}, max_length {s.max_length}, linear LR with "
            f"{s.warmup_ratio:g} warm-up, seeds {', '.join(map(str, s.seeds))}. Machine: {facts['cpu']} "
            f"({facts['torch_threads']} threads, {facts['device']}{', ' + facts['gpu'] if 'gpu' in facts else ''}); "
            f"commit {facts['commit']}; torch {facts['torch']}, transformers {facts.get('transformers')}, "
            f"peft {facts.get('peft')}.\n\n`{command}`\n\n"
            + common.markdown_table(COLUMNS, table)
            + f"\n\nAccuracy on the {split} split in %, mean ± std over seeds. Inference params: the adapter as shipped unmerged, head "
              "(trained by every method alike) excluded. Train time: the training loop only, evaluation excluded.\n"
            + (f"\n{checks}\n" if checks else ""))


def plot(rows: dict[str, dict[str, Any]], split: str, path: Path) -> None:
    """Held-out accuracy (mean ± std) against adapter parameters at inference, one point per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, r in rows.items():
        ax.errorbar(r["inference_params_mean"], 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"], fmt="o",
                    capsize=3, label=r["label"], mfc="white" if key.endswith("-pruned") else None)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters at inference")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 seeds x 6 steps (CI)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--methods", nargs="+", choices=common.QUALITY, default=list(common.QUALITY))
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="e.g. peft-lora=1e-3")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="the split scored: dev to choose settings (e.g. --lr) without looking at test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<date>-<machine>)")
    parser.add_argument("--fresh", action="store_true", help="forget the finished runs in the results folder")
    args = parser.parse_args(argv)
    lrs = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr)}
    s = common.settings(args.smoke, tuple(args.seeds) if args.seeds else None, args.steps, lrs)
    device = torch.device(args.device)
    facts = common.machine(device)
    out = common.results_dir(args.out, facts, args.smoke)
    log = out / "runs.jsonl"
    if args.fresh and log.exists():
        log.unlink()
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        setup = common.load_setup(s, args.smoke, Path(tmp), args.device, args.split)
        base = setup.base(s.seeds[0])
        head_params = sum(p.numel() for h in setup.heads for p in base.get_submodule(h).parameters())
        print(f"{setup.description}; {len(setup.targets)} target modules; {s.steps} steps; seeds {s.seeds}", flush=True)
        for seed in s.seeds:
            for key in args.methods:
                if any(r["key"] == key and r["seed"] == seed and r["steps"] == s.steps and r["lr"] == s.lrs[key]
                       and r["split"] == args.split for r in done):
                    continue
                for record in run_one(key, setup, s, seed):
                    done.append(record)
                    with open(log, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(f"seed {seed}  {record['label']:<28} acc {record['accuracy']:.4f}  "
                          f"params {record['inference_params']:>9,d}  {record['train_seconds']:7.1f} s", flush=True)
            setup._bases.pop(seed, None)
    current = [r for r in done if r["seed"] in s.seeds and r["steps"] == s.steps and r["split"] == args.split
               and r["lr"] == s.lrs[r["key"].removesuffix("-pruned")]
               and r["key"].removesuffix("-pruned") in args.methods]
    current = unpruned_as_shipped(current, head_params)
    rows = summarize(current)
    command = "python bench/quality.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    common.write_json(out / "quality.json", {"machine": facts, "setup": setup.description, "command": command,
                                            "split": args.split, "steps": s.steps, "batch_size": s.batch_size, "seeds": list(s.seeds),
                                            "rows": rows, "runs": current,
                                            "targets": [{"target": t, "measured": v, "met": ok}
                                                        for t, v, ok in targets(rows)]})
    text = markdown(rows, s, setup.description, args.split, facts, command)
    (out / "quality.md").write_text(text)
    try:
        plot(rows, args.split, out / "quality.png")
    except SoraError as e:  # matplotlib is optional (the `bench` extra has it)
        print(f"no quality.png: {e}")
    print(text)
    return out


if __name__ == "__main__":
    main()
