"""Knowledge-edit requests, read from the file formats people use for them.

A file is a JSON list of records (.json) or one record per line (.jsonl; a .json file that is not one JSON value
is read as JSON lines too). The format is detected per record, by its keys:

    EasyEdit     prompt, target_new [, ground_truth, subject, rephrase_prompt(s), locality, portability,
                 locality_prompt + locality_ground_truth, portability_prompt + portability_ground_truth]
    ZsRE         src, alt [, answers, subject, rephrase, loc + loc_ans]          (MEND / ROME's zsRE files)
    CounterFact  requested_rewrite [, paraphrase_prompts, neighborhood_prompts]  (ROME's counterfact.json)

EasyEdit's locality / portability are {key: {"prompt": ..., "ground_truth": ...}} (a list of prompts pairs with a
list of answers, or one string answer applies to them all) or, as in KnowEdit's files, {key: [{"prompt": ...,
"ground_truth": ...}, ...]}. Wherever an answer may be a list (EasyEdit's one-element lists, KnowEdit's lists of
aliases), its first element is the answer. Every prompt and answer is stripped of surrounding whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sora_cli.datafiles import element_lines
from sora_cli.errors import InputError

HINT = 'see README "Knowledge editing" for the accepted formats'
FORMAT_KEYS = "EasyEdit (prompt, target_new), ZsRE (src, alt) or CounterFact (requested_rewrite)"
_MISSING: Any = object()  # a field that is not in the record (None is a value: JSON null)


@dataclass(frozen=True)
class Probe:
    """A prompt scored against an answer (portability: the answer; locality: the unedited model's own argmax)."""

    key: str  # the group: EasyEdit's dict key ("Relation_Specificity"), "neighborhood" (CounterFact), "locality"...
    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model, with the prompts that measure how well it took and what it disturbed."""

    prompt: str  # "The capital of France is"
    target_new: str  # the new answer: "Rome"
    ground_truth: str | None  # the old answer, if known
    subject: str | None
    rephrase: tuple[str, ...]  # generalization prompts, scored against target_new
    locality: tuple[Probe, ...]
    portability: tuple[Probe, ...]


def load_requests(path: str | Path) -> list[EditRequest]:
    """The edit requests of a .json or .jsonl file; InputError (one line) on anything malformed."""
    return located_requests(path)[0]


def located_requests(path: str | Path) -> tuple[list[EditRequest], list[str]]:
    """The edit requests of a file and where each is in it ("edits.jsonl: line 21"), for later errors."""
    where = str(path)
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{where}: no such file; give the path of a .json or .jsonl file of edit requests")
    if file.suffix.lower() not in (".json", ".jsonl"):
        raise InputError(f"{where}: expected a .json or .jsonl file of edit requests; {HINT}")
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is not JSON
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from err
    located = _json_lines(text, where) if file.suffix.lower() == ".jsonl" else _json_document(text, where)
    places = [place for place, _ in located]
    return requests_from_records([record for _, record in located], where, places), [f"{where}: {p}" for p in places]


def requests_from_records(records: list[Any], where: str, places: list[str] | None = None) -> list[EditRequest]:
    """Parse already-loaded records; `where` (a file name) starts every error message, then the record's place in
    it (`places[i]`, default 'record i', 0-based)."""
    if not records:
        raise InputError(f"{where}: no records (the file is empty); {HINT}")
    places = places or [f"record {i}" for i in range(len(records))]
    return [_request(_Record(where, place, record)) for place, record in zip(places, records, strict=True)]


# ---------------------------------------------------------------------------------------------
# Files


def _json_document(text: str, where: str) -> list[tuple[str, Any]]:
    """(place, record) of a .json file: one JSON list (or a single record), else JSON lines if its first line is a
    JSON value."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A pretty-printed list fails on its first line ("["); a JSON lines file parses there: report the
        # error the way the user wrote the file.
        if _first_line_parses(text):
            return _json_lines(text, where)
        raise InputError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); the file "
                         "must hold a JSON list of records, or one JSON record per line") from err
    if isinstance(data, dict):
        return [("record 0", data)]
    if not isinstance(data, list):
        raise InputError(f"{where}: the file holds {_kind(data)}; it must hold a JSON list of records; {HINT}")
    return [(f"line {line} (list index {i})", record)
            for i, (line, record) in enumerate(zip(element_lines(text), data, strict=True))]


def _first_line_parses(text: str) -> bool:
    first = next(line for line in text.split("\n") if line.strip())
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _json_lines(text: str, where: str) -> list[tuple[str, Any]]:
    """(place, record): one JSON value per line; blank lines are skipped. Split on \\n only: JSON strings may hold
    U+2028."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: line {number} is not valid JSON ({err.msg} at column {err.colno}); write "
                             "one JSON record per line") from err
    return records


# ---------------------------------------------------------------------------------------------
# Records


def _request(record: _Record) -> EditRequest:
    data = record.data
    if not isinstance(data, dict):
        raise record.error(f"expected a JSON object, got {_kind(data)} {_show(data)}")
    if "requested_rewrite" in data:
        return _counterfact(record, data)
    if "prompt" in data or "target_new" in data:  # one of the two: report the other as missing
        return _easyedit(record, data)
    if "src" in data or "alt" in data:
        return _zsre(record, data)
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise record.error(f"unrecognised format (keys: {keys}); expected {FORMAT_KEYS}")


def _easyedit(record: _Record, data: dict[str, Any]) -> EditRequest:
    rephrase = (record.texts("rephrase_prompt", data.get("rephrase_prompt"))
                + record.texts("rephrase_prompts", data.get("rephrase_prompts")))
    groups = {name: _easyedit_probes(record, data, name) for name in ("locality", "portability")}
    return EditRequest(prompt=record.text("prompt", data.get("prompt", _MISSING)),
                       target_new=record.answer("target_new", data.get("target_new", _MISSING)),
                       ground_truth=record.optional("ground_truth", data.get("ground_truth"), answer=True),
                       subject=record.optional("subject", data.get("subject")), rephrase=rephrase,
                       locality=groups["locality"], portability=groups["portability"])


def _easyedit_probes(record: _Record, data: dict[str, Any], name: str) -> tuple[Probe, ...]:
    """The dict-style groups, then the flat fields (files may carry both)."""
    flat = record.flat_probes(name, data.get(f"{name}_prompt", _MISSING), data.get(f"{name}_ground_truth", _MISSING))
    return record.probe_groups(name, data.get(name)) + flat


def _zsre(record: _Record, data: dict[str, Any]) -> EditRequest:
    answers = data.get("answers")
    locality: tuple[Probe, ...] = ()
    if data.get("loc") is not None:
        locality = (Probe("locality", record.text("loc", data["loc"]), record.answer("loc_ans", data.get(
            "loc_ans", _MISSING))),)
    return EditRequest(prompt=record.text("src", data.get("src", _MISSING)),
                       target_new=record.answer("alt", data.get("alt", _MISSING)),
                       ground_truth=record.answer("answers", answers) if answers not in (None, []) else None,
                       subject=record.optional("subject", data.get("subject")),
                       rephrase=record.texts("rephrase", data.get("rephrase")), locality=locality,
                       portability=_zsre_portability(record, data.get("portability")))


def _zsre_portability(record: _Record, value: Any) -> tuple[Probe, ...]:
    """EasyEdit's zsre_mend_eval_portability_gpt4.json adds {"New Question": ..., "New Answer": ...}."""
    if not isinstance(value, dict) or "New Question" not in value:
        return ()
    return (Probe("portability", record.text("portability.New Question", value["New Question"]),
                  record.answer("portability.New Answer", value.get("New Answer", _MISSING))),)


def _counterfact(record: _Record, data: dict[str, Any]) -> EditRequest:
    rewrite = data["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise record.error(f"field 'requested_rewrite' must be an object, got {_show(rewrite)}")
    subject = record.text("requested_rewrite.subject", rewrite.get("subject", _MISSING))
    template = record.text("requested_rewrite.prompt", rewrite.get("prompt", _MISSING))
    if "{}" not in template:
        raise record.error(f"field 'requested_rewrite.prompt' must contain {{}} where the subject goes, got "
                           f"{_show(template)}")
    true = _cf_object(record, "target_true", rewrite.get("target_true", _MISSING))
    neighbours = data.get("neighborhood_prompts") or []
    if not isinstance(neighbours, list):
        raise record.error(f"field 'neighborhood_prompts' must be a list, got {_show(neighbours)}")
    return EditRequest(prompt=template.replace("{}", subject),
                       target_new=_cf_object(record, "target_new", rewrite.get("target_new", _MISSING)),
                       ground_truth=true, subject=subject,
                       rephrase=record.texts("paraphrase_prompts", data.get("paraphrase_prompts")),
                       locality=tuple(_neighbour(record, index, item, true) for index, item in enumerate(neighbours)),
                       portability=())


def _cf_object(record: _Record, name: str, value: Any) -> str:
    """CounterFact's {"str": "English", "id": "Q1860"}; a plain string is taken as is."""
    if isinstance(value, dict):
        return record.text(f"requested_rewrite.{name}.str", value.get("str", _MISSING))
    return record.text(f"requested_rewrite.{name}", value)


def _neighbour(record: _Record, index: int, item: Any, true: str) -> Probe:
    """A string (its answer is the edited subject's true object: CounterFact's neighbours share it) or a dict."""
    name = f"neighborhood_prompts[{index}]"
    if isinstance(item, dict):
        target = item.get("target")
        return Probe("neighborhood", record.text(f"{name}.prompt", item.get("prompt", _MISSING)),
                     true if target is None else record.text(f"{name}.target", target))
    return Probe("neighborhood", record.text(name, item), true)


# ---------------------------------------------------------------------------------------------
# Fields


class _Record:
    """One record and where it is: every field check raises InputError naming the file, the record and the field."""

    def __init__(self, where: str, place: str, data: Any):
        self.where, self.place, self.data = where, place, data

    def error(self, problem: str) -> InputError:
        # one line, even when a key of the record holds a newline
        return InputError(f"{self.where}: {self.place}: {problem}; {HINT}".replace("\n", "\\n"))

    def text(self, name: str, value: Any) -> str:
        """A required non-empty string, stripped."""
        if value is _MISSING:
            raise self.error(f"field '{name}' is missing")
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"field '{name}' must be a non-empty string, got {_show(value)}")
        return value.strip()

    def answer(self, name: str, value: Any) -> str:
        """A string, or a (nested) list whose first element is one: one-element lists, lists of aliases."""
        first = value
        while isinstance(first, list) and first:
            first = first[0]
        if first is _MISSING:
            raise self.error(f"field '{name}' is missing")
        if not isinstance(first, str) or not first.strip():
            raise self.error(f"field '{name}' must be a non-empty string, got {_show(value)}")
        return first.strip()

    def optional(self, name: str, value: Any, *, answer: bool = False) -> str | None:
        """None when absent or null; else checked like a required field."""
        if value is None:
            return None
        return self.answer(name, value) if answer else self.text(name, value)

    def texts(self, name: str, value: Any) -> tuple[str, ...]:
        """Absent / null: (); one string; or a list of strings."""
        if value is None:
            return ()
        if isinstance(value, str):
            return (self.text(name, value),)
        if not isinstance(value, list):
            raise self.error(f"field '{name}' must be a string or a list of strings, got {_show(value)}")
        return tuple(self.text(f"{name}[{index}]", item) for index, item in enumerate(value))

    def probe_groups(self, name: str, value: Any) -> tuple[Probe, ...]:
        """EasyEdit's {key: {"prompt", "ground_truth"}} or KnowEdit's {key: [{"prompt", "ground_truth"}, ...]}."""
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.error(f"field '{name}' must be an object {{key: {{\"prompt\": ..., \"ground_truth\": ...}}}}, "
                             f"got {_show(value)}")
        probes: list[Probe] = []
        for key, group in value.items():
            entries = group if isinstance(group, list) else [group]
            for index, entry in enumerate(entries):
                label = f"{name}.{key}[{index}]" if isinstance(group, list) else f"{name}.{key}"
                if not isinstance(entry, dict):
                    raise self.error(f"field '{label}' must be an object {{\"prompt\": ..., \"ground_truth\": ...}}, "
                                     f"got {_show(entry)}")
                probes += self.pairs(str(key), (f"{label}.prompt", entry.get("prompt", _MISSING)),
                                     (f"{label}.ground_truth", entry.get("ground_truth", _MISSING)))
        return tuple(probes)

    def flat_probes(self, name: str, prompts: Any, answers: Any) -> tuple[Probe, ...]:
        """EasyEdit's flat locality_prompt / locality_ground_truth (and portability_...): the group is `name`."""
        if prompts is _MISSING and answers is _MISSING:
            return ()
        return tuple(self.pairs(name, (f"{name}_prompt", prompts), (f"{name}_ground_truth", answers)))

    def pairs(self, key: str, prompts: tuple[str, Any], answers: tuple[str, Any]) -> list[Probe]:
        """Prompt(s) and answer(s) -> probes: lists pair element-wise, one string answer goes with every prompt."""
        (prompt_name, prompt_value), (answer_name, answer_value) = prompts, answers
        if isinstance(prompt_value, list):
            if not prompt_value:
                raise self.error(f"field '{prompt_name}' must be a string or a non-empty list of strings, got []")
            texts = [self.text(f"{prompt_name}[{index}]", item) for index, item in enumerate(prompt_value)]
        else:
            texts = [self.text(prompt_name, prompt_value)]
            answer_value = [answer_value]  # one prompt: the whole value (a string, aliases...) is its answer
        if isinstance(answer_value, str):
            answer_value = [answer_value] * len(texts)
        if not isinstance(answer_value, list) or len(answer_value) != len(texts):
            got = f"{len(answer_value)} answers" if isinstance(answer_value, list) else _show(answer_value)
            raise self.error(f"field '{answer_name}' must give one answer per prompt ({len(texts)}) or one string "
                             f"for all, got {got}")
        suffix = len(texts) > 1 or isinstance(prompt_value, list)
        return [Probe(key, text, self.answer(f"{answer_name}[{index}]" if suffix else answer_name, answer))
                for index, (text, answer) in enumerate(zip(texts, answer_value))]


def _show(value: Any) -> str:
    """A value as JSON, cut short: error messages stay on one line."""
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
