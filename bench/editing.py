"""Knowledge editing side by side: LoRA (EasyEdit's LoRA editor settings), RoseLoRA (the reference's settings, and
the shipped recipe's) and SoRA, on the same packaged:country-edits requests with SmolLM2-135M-Instruct, single-edit
protocol, EasyEdit's teacher-forced metrics. Each contestant runs `sora train` on its recipe (in-process).

    python bench/editing.py --edits 50 --out bench/results/<date>-<machine>
    python bench/editing.py --smoke          # a tiny Llama and 3 edits: checks the script, measures nothing
    python bench/editing.py --from-json bench/results/<folder>/editing.json   # rewrite editing.md only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SORA_NULLS = ["adapter.density=null", "adapter.sparsify_start=null", "adapter.sparsify_end=null",
              "adapter.importance_beta=null", "adapter.mask_rule=null"]
# contestant -> (recipe, overrides, label)
CONTESTANTS: dict[str, tuple[str, list[str], str]] = {
    "lora": ("recipes/edit-lora.yaml", [], "LoRA (EasyEdit: lr 5e-3, 70 passes)"),
    "roselora-reference": ("recipes/edit-roselora.yaml", ["train.lr=5e-4", "adapter.clamp=3e-3"],
                           "RoseLoRA, reference (lr 5e-4, clamp 3e-3)"),
    "roselora": ("recipes/edit-roselora.yaml", [], "RoseLoRA, recipe (lr 2e-3, no clamp)"),
    "sora": ("recipes/edit-roselora.yaml", ["adapter.method=sora", *SORA_NULLS],
             "SoRA (λ 0.1; the RoseLoRA recipe's lr and passes)"),
}
METRICS = ("reliability", "generalization", "locality", "portability")


def smoke_overrides(tmp: Path) -> list[str]:
    """A tiny random Llama and 3 hand-made edits in its vocabulary (tests/tiny_causal.py), 4 passes."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

    model = save_tiny_causal_model(tmp / "tiny", tiny_causal_tokenizer())
    edits = [{"prompt": "the movie was", "target_new": "great", "rephrase_prompt": "this film was",
              "locality": {"nq": {"prompt": "what is the plot", "ground_truth": "awful"}}}] * 3
    (tmp / "edits.json").write_text(json.dumps(edits))
    return [f"model.name_or_path={model}", "model.gguf_file=null", f"data.train_file={tmp / 'edits.json'}",
            "data.dataset=null", "train.max_steps=4", "adapter.sparsify_end=3", "adapter.sparsify_start=1",
            "edit.stop_after=0"]


def run_contestant(key: str, n_edits: int, out: Path, extra: list[str]) -> dict[str, Any]:
    from sora_cli.editing.run import run_edits
    from sora_cli.recipe import load_recipe

    recipe_path, overrides, _ = CONTESTANTS[key]
    if not key.startswith("roselora"):  # the smoke overrides name RoseLoRA's schedule, which the others refuse
        extra = [o for o in extra if not o.startswith("adapter.sparsify")]
    overrides = [*overrides, f"data.max_train_samples={n_edits}", f"train.output_dir={out / key}", *extra]
    result = run_edits(load_recipe(ROOT / recipe_path, overrides), overwrite=True)
    return result.summary


def table(summaries: dict[str, dict[str, Any]], command: str, facts: dict[str, Any]) -> str:
    lora = summaries.get("lora", {}).get("changed_weights_per_edit") or None
    first = next(iter(summaries.values()))
    lines = ["### Knowledge editing", "",
             f"{first['base_model']}, the first {first['edits']} edits of {first['source']}, {first['mode']}-edit "
             f"protocol (a fresh adapter per edit), r=8 on q_proj and v_proj. Machine: {facts.get('cpu')} "
             f"({facts.get('torch_threads')} threads); commit {facts.get('commit')}.", "", f"`{command}`", "",
             "| contestant | " + " | ".join(METRICS) + " | base weights changed / edit | / LoRA's | s / edit |",
             "|---|" + "---|" * (len(METRICS) + 3)]
    for key, s in summaries.items():
        changed = s["changed_weights_per_edit"] or 0
        share = f"{changed / lora:.4f}" if lora else "–"
        lines.append(f"| {CONTESTANTS[key][2]} | " + " | ".join(f"{s['post'][m]:.3f}" if s["post"][m] is not None
                                                              else "–" for m in METRICS)
                     + f" | {changed:,.0f} ({100 * changed / s['adapted_base_weights']:.2f}%) | {share} | "
                     f"{s['seconds_per_edit']:.1f} |")
    lines += ["", f"Unedited model on the same probes: " + ", ".join(
        f"{m} {first['pre'][m]:.3f}" for m in METRICS if first["pre"][m] is not None)
              + f". {first['edits']} edits, {first['mode']} mode, protocol `{first['protocol']}`; the adapted modules "
              f"(q_proj, v_proj) hold {first['adapted_base_weights']:,d} base weights."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--contestants", nargs="+", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, help="also write editing.md and editing.json here")
    parser.add_argument("--from-json", type=Path, help="rewrite editing.md beside this editing.json; run nothing")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        text = table(data["summaries"], data["command"], data["machine"])
        (args.from_json.parent / "editing.md").write_text(text)
        print(text)
        return text
    command = f"python bench/editing.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    with tempfile.TemporaryDirectory() as tmp:
        extra = smoke_overrides(Path(tmp)) if args.smoke else []
        summaries = {key: run_contestant(key, 3 if args.smoke else args.edits, Path(tmp), extra)
                     for key in args.contestants}
    import common  # bench/common.py: the machine's facts (CPU, threads, commit)
    import torch

    facts = common.machine(torch.device("cpu"))
    text = table(summaries, command, facts)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "editing.md").write_text(text)
        (args.out / "editing.json").write_text(json.dumps({"command": command, "machine": facts,
                                                           "summaries": summaries}, indent=2) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
