"""Regenerate README.md's "Results" section from results folders.

    python bench/publish.py bench/results/<date>-<machine> [more folders ...]

Replaces everything between the two markers below with each folder's tables (TABLES, whichever exist), each folder
headed by its name. The rest of the README is left as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- bench results: start (bench/publish.py writes this part) -->"
END = "<!-- bench results: end -->"
REPO = Path(__file__).resolve().parent.parent


TABLES = ("quality.md", "speed.md", "speed_causal.md", "editing.md", "lors.md", "ddp.md", "memory.md", "fsdp.md",
          "budget.md", "budget-causal.md", "throughput.md", "profile.md", "probe.md", "stability.md")


def section(*folders: Path) -> str:
    return f"{START}\n" + "\n".join(folder_section(f) for f in folders) + END


def folder_section(results: Path) -> str:
    parts = [results / name for name in TABLES if (results / name).is_file()]
    if not parts:
        raise SystemExit(f"{results}: has none of {', '.join(TABLES)}; run one of the benches in bench/")
    try:
        where = results.resolve().relative_to(REPO)
    except ValueError:
        where = results
    body = "\n".join(p.read_text().strip() + "\n" for p in parts)
    return f"From `{where}/` (JSON beside the tables).\n\n{body}"


def publish(results: list[Path], readme: Path) -> None:
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one pair of results markers, {START!r} then {END!r}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(head + section(*results) + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    publish(args.results, args.readme)
    print(f"{args.readme}: Results section now shows {', '.join(map(str, args.results))}", file=sys.stderr)


if __name__ == "__main__":
    main()
