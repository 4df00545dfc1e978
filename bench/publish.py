"""Regenerate README.md's "Results" section from one results folder.

    python bench/publish.py bench/results/<date>-<machine>

Replaces everything between the two markers below with the folder's quality.md and speed.md (whichever
exist), headed by the folder's name. The rest of the README is left as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- bench results: start (bench/publish.py writes this part) -->"
END = "<!-- bench results: end -->"
REPO = Path(__file__).resolve().parent.parent


def section(results: Path) -> str:
    parts = [results / name for name in ("quality.md", "speed.md") if (results / name).is_file()]
    if not parts:
        raise SystemExit(f"{results}: has neither quality.md nor speed.md; run bench/quality.py or bench/speed.py")
    try:
        where = results.resolve().relative_to(REPO)
    except ValueError:
        where = results
    body = "\n".join(p.read_text().strip() + "\n" for p in parts)
    return f"{START}\nFrom `{where}/` (JSON beside the tables).\n\n{body}{END}"


def publish(results: Path, readme: Path) -> None:
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one pair of results markers, {START!r} then {END!r}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(head + section(results) + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    publish(args.results, args.readme)
    print(f"{args.readme}: Results section now shows {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
