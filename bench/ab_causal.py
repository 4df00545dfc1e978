"""A focused interleaved A/B of a few causal-LM contestants (no memory children): more repeats for the ratios that
bench/speed_causal.py measures among seven contestants at once.

    python bench/ab_causal.py peft-lora sora-lora sora-r8 --repeats 6 --out bench/results/<date>-<machine>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed_causal  # noqa: E402
from speed import ratio  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contestants", nargs="+", choices=list(speed_causal.LABELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, help="also write ab-causal.md here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r, base, targets, batches = speed_causal.setup(args.smoke, Path(tmp), args.steps)
        times = speed_causal.time_steps(args.contestants, r, base, targets, batches, args.repeats)
    first = args.contestants[0]
    lines = [f"`python bench/ab_causal.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"| contestant | ms / step | step / {speed_causal.LABELS[first]} | repeats (ms) |", "|---|---|---|---|"]
    for key in args.contestants:
        lines.append(f"| {speed_causal.LABELS[key]} | {1000 * statistics.median(times[key]):.0f} | "
                     f"{ratio(times, key, first):.3f} | {', '.join(f'{1000 * t:.1f}' for t in times[key])} |")
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        (args.out / "ab-causal.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
