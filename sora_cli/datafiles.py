"""Local data files read once line by line before `datasets` loads them, so that a malformed record is named by its
file and line (JSON / JSONL: the decoder's line and column; CSV / TSV: the row's line, the header being line 1)
instead of a library's "An error occurred while generating the dataset".

Checked: text that is not UTF-8; a JSONL line that is not JSON or not an object; a JSON file that does not parse;
a CSV row whose field count differs from the header's; for a classifier or a regressor (whose labels come from
`data.label_field`), a record whose label is missing or empty. What a record means to its task (an alpaca record
without `output`, a label that is not a class) is the task's to say.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sora_cli.errors import InputError

FIX = "fix or remove that record"


def check_file(key: str, path: Path, kind: str, label_field: str | None) -> list[int] | None:
    """Raise InputError at the first malformed record of `path` (data.`key`, read as `kind`: csv, tsv, json);
    `label_field`: the field every record must fill (None: no label is required).

    Returns the 1-based line where each record starts, in the order `datasets` reads them (blank lines hold no
    record), or None where records have no line of their own (a JSON file that is not a list of records)."""
    where = f"data.{key}: {path}"
    if kind in ("csv", "tsv"):
        return check_table(where, path, "\t" if kind == "tsv" else ",", label_field)
    if kind == "json" and path.suffix.lower() == ".jsonl":
        lines = []
        for index, (number, record) in enumerate(json_lines(where, path)):
            if index == 0 and label_field not in record:
                label_field = None  # the first record says whether records carry the label (a test file may not)
            check_label(f"{where}, line {number}", record, label_field)
            lines.append(number)
        return lines
    if kind == "json":
        return check_json(where, path, label_field)
    return None  # parquet: no lines


def text_lines(where: str, path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}, line {number}, byte {e.start + 1}: not UTF-8 text; save the file as "
                                 "UTF-8") from None


def json_lines(where: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line of a JSONL file."""
    for number, line in text_lines(where, path):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # one line: the decoder's column is the line's
        except json.JSONDecodeError as e:
            raise InputError(f"{where}, line {number}, column {e.colno}: not valid JSON ({e.msg}); {FIX}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}, line {number}: expected a JSON object (one record a line), got "
                             f"{type(record).__name__}; {FIX}")
        yield number, record


def check_json(where: str, path: Path, label_field: str | None) -> list[int] | None:
    """A JSON file: it parses; a top-level list of records each fills the label. Returns each record's first line
    (None: the file is not a list)."""
    text = "".join(line for _, line in text_lines(where, path))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        return None
    lines = element_lines(text)
    if not (value and isinstance(value[0], dict) and label_field in value[0]):
        label_field = None  # as for JSONL: the first record says whether records carry the label
    for number, record in zip(lines, value, strict=True):
        if not isinstance(record, dict):
            raise InputError(f"{where}, line {number}: expected a JSON object, got {type(record).__name__}; {FIX}")
        check_label(f"{where}, line {number}", record, label_field)
    return lines


def element_lines(text: str) -> list[int]:
    """The 1-based line on which each element of `text`'s top-level JSON array starts (`text` parses as one)."""
    decoder = json.JSONDecoder()
    at = _skip_space(text, _skip_space(text, 0) + 1)  # past "[": the first element, or "]"
    lines: list[int] = []
    line, counted = 1, 0
    while text[at] != "]":
        line, counted = line + text.count("\n", counted, at), at
        lines.append(line)
        _, at = decoder.raw_decode(text, at)
        at = _skip_space(text, at)
        if text[at] == ",":
            at = _skip_space(text, at + 1)
    return lines


def _skip_space(text: str, at: int) -> int:
    """The index of the first character at or after `at` that is not JSON whitespace."""
    while at < len(text) and text[at] in " \t\n\r":
        at += 1
    return at


def check_table(where: str, path: Path, delimiter: str, label_field: str | None) -> list[int]:
    """A CSV / TSV file: a header, every row as many fields as it, the label column filled. Returns the line each
    row starts on (the header is line 1; a quoted field may span lines)."""
    lines = (line for _, line in text_lines(where, path))
    reader = csv.reader(lines, delimiter=delimiter)
    starts: list[int] = []
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{where}: the file is empty; the first line must name the columns")
        column = header.index(label_field) if label_field in header else None
        start = reader.line_num + 1
        for row in reader:
            number, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{where}, line {number}: {len(row)} fields, but the header has "
                                 f"{len(header)}; quote fields that hold the delimiter, or {FIX}")
            if column is not None and not row[column].strip():
                raise InputError(f"{where}, line {number}: the {label_field} field is empty; give every "
                                 f"row a label, or remove the row")
            starts.append(number)
    except csv.Error as e:
        raise InputError(f"{where}, line {reader.line_num}: not valid CSV ({e}); {FIX}") from None
    return starts


def check_label(where: str, record: dict[str, Any], label_field: str | None) -> None:
    if label_field is None:
        return
    value = record.get(label_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        missing = "has no" if label_field not in record else "has an empty"
        raise InputError(f"{where}: the record {missing} {label_field} field; give every record a label, or "
                         "remove it")
