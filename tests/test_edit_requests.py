"""Edit requests: every accepted file format parses to a hand-built EditRequest; malformed input gives one exact line;
packaged:country-edits is deterministic, clean, and matches countryinfo's data on a hand-checked record.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from sora_cli.editing.countries import COUNTRY_EDITS_DOC, TEMPLATES, Country, _locality, country_edits
from sora_cli.editing.requests import HINT, EditRequest, Probe, load_requests, requests_from_records
from sora_cli.errors import InputError

# ---------------------------------------------------------------------------------------------
# One record per format, and the request each must give

EASYEDIT: dict[str, Any] = {
    "subject": "France", "prompt": "  The capital of France is ", "target_new": ["Rome"], "ground_truth": "Paris",
    "rephrase_prompt": ["France's capital is", "The capital city of France is"],
    "locality": {"Relation_Specificity": {"prompt": ["The currency of France is", "France borders"],
                                          "ground_truth": ["euro", ["Spain", "Kingdom of Spain"]]}},
    "portability": {"Reasoning": [{"prompt": "The country of the capital of France is",
                                   "ground_truth": [["Italy", "Italian Republic"]]}],
                    "Subject_Aliasing": {"prompt": ["The capital of the French Republic is", "Paris's country has"],
                                         "ground_truth": " Rome "}},
}
EASYEDIT_REQUEST = EditRequest(
    prompt="The capital of France is", target_new="Rome", ground_truth="Paris", subject="France",
    rephrase=("France's capital is", "The capital city of France is"),
    locality=(Probe("Relation_Specificity", "The currency of France is", "euro"),
              Probe("Relation_Specificity", "France borders", "Spain")),
    portability=(Probe("Reasoning", "The country of the capital of France is", "Italy"),
                 Probe("Subject_Aliasing", "The capital of the French Republic is", "Rome"),
                 Probe("Subject_Aliasing", "Paris's country has", "Rome")))

FLAT: dict[str, Any] = {
    "prompt": "Who is the president of the US?", "target_new": "Joe Biden", "ground_truth": ["Donald Trump"],
    "rephrase_prompts": "Who leads the US?", "locality_prompt": "Who wrote Hamlet?",
    "locality_ground_truth": "William Shakespeare",
    "portability_prompt": ["Who is the wife of the US president?", "Where was the US president born?"],
    "portability_ground_truth": ["Jill Biden", "Scranton"],
}
FLAT_REQUEST = EditRequest(
    prompt="Who is the president of the US?", target_new="Joe Biden", ground_truth="Donald Trump", subject=None,
    rephrase=("Who leads the US?",), locality=(Probe("locality", "Who wrote Hamlet?", "William Shakespeare"),),
    portability=(Probe("portability", "Who is the wife of the US president?", "Jill Biden"),
                 Probe("portability", "Where was the US president born?", "Scranton")))

ZSRE: dict[str, Any] = {
    "subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?", "pred": "Aspidoceratidae",
    "rephrase": "What family are Epaspidoceras?", "alt": "Noctuidae", "answers": ["Aspidoceratidae"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
    "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
}
ZSRE_REQUEST = EditRequest(
    prompt="Which family does Epaspidoceras belong to?", target_new="Noctuidae", ground_truth="Aspidoceratidae",
    subject="Epaspidoceras", rephrase=("What family are Epaspidoceras?",),
    locality=(Probe("locality", "nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving"),),
    portability=())

PARAPHRASES = ("Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
               "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke")
COUNTERFACT: dict[str, Any] = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
    "paraphrase_prompts": list(PARAPHRASES),
    "neighborhood_prompts": ["The mother tongue of Léon Blum is",
                             {"prompt": "The native language of Dante Alighieri is", "target": "Italian"},
                             {"prompt": "The native language of Montesquieu is"}],  # no target: the true object
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
COUNTERFACT_REQUEST = EditRequest(
    prompt="The mother tongue of Danielle Darrieux is", target_new="English", ground_truth="French",
    subject="Danielle Darrieux", rephrase=PARAPHRASES,
    locality=(Probe("neighborhood", "The mother tongue of Léon Blum is", "French"),
              Probe("neighborhood", "The native language of Dante Alighieri is", "Italian"),
              Probe("neighborhood", "The native language of Montesquieu is", "French")),
    portability=())

CASES = {"easyedit": (EASYEDIT, EASYEDIT_REQUEST), "easyedit_flat": (FLAT, FLAT_REQUEST),
         "zsre": (ZSRE, ZSRE_REQUEST), "counterfact": (COUNTERFACT, COUNTERFACT_REQUEST)}


def write_list(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_lines(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_format_parses_to_the_hand_built_request(tmp_path: Path, case: str) -> None:
    record, expected = CASES[case]
    as_list = load_requests(write_list(tmp_path / "edits.json", [record, record]))
    as_lines = load_requests(write_lines(tmp_path / "edits.jsonl", [record, record]))
    lines_named_json = load_requests(write_lines(tmp_path / "lines.json", [record]))  # JSON lines in a .json file
    one_object = load_requests(write_list(tmp_path / "one.json", record))  # a single object: one record
    assert as_list == as_lines == [expected, expected]
    assert lines_named_json == one_object == [expected]
    assert requests_from_records([record], "inline") == [expected]


def test_mixed_formats_in_one_file_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in (ZSRE, COUNTERFACT)).replace("\n", "\n\n") + "\n")
    assert load_requests(path) == [ZSRE_REQUEST, COUNTERFACT_REQUEST]


def test_optional_fields_absent_or_null() -> None:
    minimal = [{"prompt": "A", "target_new": "B", "ground_truth": None, "subject": None, "locality": {}},
               {"src": "Q?", "alt": "x", "answers": []}]
    assert requests_from_records(minimal, "f") == [EditRequest("A", "B", None, None, (), (), ()),
                                                   EditRequest("Q?", "x", None, None, (), (), ())]


# ---------------------------------------------------------------------------------------------
# Malformed input: one exact line, naming the file, the record and the field

BAD_RECORDS = [
    ({"prompt": "The capital of France is", "target_new": 42}, "field 'target_new' must be a non-empty string, got 42"),
    ({"prompt": "The capital of France is"}, "field 'target_new' is missing"),
    ({"prompt": "   ", "target_new": "Rome"}, "field 'prompt' must be a non-empty string, got \"   \""),
    ("The capital of France is Rome", "expected a JSON object, got a string \"The capital of France is Rome\""),
    ({"question": "Q", "answer": "A"}, "unrecognised format (keys: answer, question); expected EasyEdit (prompt, "
                                       "target_new), ZsRE (src, alt) or CounterFact (requested_rewrite)"),
    ({"src": "Q?", "alt": "x", "loc": "nq question: who"}, "field 'loc_ans' is missing"),
    ({"requested_rewrite": {"prompt": "{} speaks", "subject": "S", "target_new": {"id": "Q1"},
                            "target_true": {"str": "French"}}}, "field 'requested_rewrite.target_new.str' is missing"),
    ({"requested_rewrite": {"prompt": "S speaks", "subject": "S", "target_new": "English", "target_true": "French"}},
     "field 'requested_rewrite.prompt' must contain {} where the subject goes, got \"S speaks\""),
    ({"prompt": "P", "target_new": "T", "locality": {"Relation_Specificity": {"prompt": ["a", "b"],
                                                                              "ground_truth": ["x", "y", "z"]}}},
     "field 'locality.Relation_Specificity.ground_truth' must give one answer per prompt (2) or one string for all, "
     "got 3 answers"),
    ({"prompt": "P", "target_new": "T", "portability": {"Reasoning": [{"prompt": "q", "ground_truth": 7}]}},
     "field 'portability.Reasoning[0].ground_truth' must be a non-empty string, got 7"),
    ({"prompt": "P", "target_new": "T", "locality_prompt": "q"}, "field 'locality_ground_truth' is missing"),
    ({"prompt": "P", "target_new": "T", "rephrase_prompt": ["ok", ""]},
     "field 'rephrase_prompt[1]' must be a non-empty string, got \"\""),
]


@pytest.mark.parametrize("record, problem", BAD_RECORDS)
def test_a_bad_record_names_file_record_and_field(tmp_path: Path, record: Any, problem: str) -> None:
    path = write_list(tmp_path / "edits.json", [EASYEDIT, ZSRE, COUNTERFACT, record])
    with pytest.raises(InputError) as caught:
        load_requests(path)
    line = 1 + len(json.dumps([EASYEDIT, ZSRE, COUNTERFACT], indent=2).splitlines()[:-1])  # the 4th item's line
    assert str(caught.value) == f"{path}: line {line} (list index 3): {problem}; {HINT}"
    assert caught.value.exit_code == 2


def test_the_hint_and_the_spec_example() -> None:
    with pytest.raises(InputError) as caught:
        requests_from_records([ZSRE, ZSRE, ZSRE, {"prompt": "P", "target_new": 42}], "edits.json")
    assert str(caught.value) == ("edits.json: record 3: field 'target_new' must be a non-empty string, got 42; see "
                                 "README \"Knowledge editing\" for the accepted formats")


def test_a_broken_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(ZSRE) + "\n\n" + '{"src": "a" "alt": "b"}\n' + json.dumps(ZSRE) + "\n")
    with pytest.raises(InputError) as caught:
        load_requests(path)
    assert str(caught.value) == (f"{path}: line 3 is not valid JSON (Expecting ',' delimiter at column 13); write one "
                                 "JSON record per line")
    # the same lines in a .json file are read as JSON lines too, and the line is named the same way
    named_json = path.rename(tmp_path / "edits.json")
    with pytest.raises(InputError, match=r"edits\.json: line 3 is not valid JSON"):
        load_requests(named_json)


def test_file_level_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"src": "a", "alt": "b"},\n  {"src": "a" "alt": "b"}\n]\n')
    empty_list = write_list(tmp_path / "empty_list.json", [])
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "edits.csv").write_text("src,alt\n")
    write_list(tmp_path / "scalar.json", "text")
    expected = {
        tmp_path / "missing.json": "no such file; give the path of a .json or .jsonl file of edit requests",
        broken: "not valid JSON (Expecting ',' delimiter at line 3, column 15); the file must hold a JSON list of "
                "records, or one JSON record per line",
        empty_list: f"no records (the file is empty); {HINT}",
        tmp_path / "empty.jsonl": f"no records (the file is empty); {HINT}",
        tmp_path / "empty.json": f"no records (the file is empty); {HINT}",
        tmp_path / "edits.csv": f"expected a .json or .jsonl file of edit requests; {HINT}",
        tmp_path / "scalar.json": f"the file holds a string; it must hold a JSON list of records; {HINT}",
    }
    for path, problem in expected.items():
        with pytest.raises(InputError) as caught:
            load_requests(path)
        assert str(caught.value) == f"{path}: {problem}"
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# packaged:country-edits

COUNTRY_COUNT = 214  # countryinfo 1.0.1, after the filters in COUNTRY_EDITS_DOC


def relation_of(edit: EditRequest) -> str:
    for relation, templates in TEMPLATES.items():
        if any(edit.prompt.lower() == template.format(name=name).lower()
               for template in templates[:1] for name in (edit.subject, f"the {edit.subject}")):
            return relation
    raise AssertionError(f"no template gives {edit.prompt!r}")


def country_json(file_name: str) -> dict[str, Any]:
    return json.loads((files("countryinfo") / "data" / file_name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def edits() -> list[EditRequest]:
    return country_edits()


def test_country_edits_are_deterministic_and_counted(edits: list[EditRequest]) -> None:
    assert country_edits() == edits
    assert len(edits) == COUNTRY_COUNT
    assert f"{COUNTRY_COUNT} countries" in COUNTRY_EDITS_DOC
    assert Counter(relation_of(edit) for edit in edits) == {"capital": 72, "region": 71, "demonym": 71}
    assert "(72/71/71)" in COUNTRY_EDITS_DOC
    assert len({edit.subject for edit in edits}) == COUNTRY_COUNT  # one edit per country


def test_country_edits_are_clean(edits: list[EditRequest]) -> None:
    for edit in edits:
        assert edit.subject and edit.ground_truth and edit.target_new != edit.ground_truth
        assert len(edit.rephrase) == 2 and len(edit.locality) == 2 and len(edit.portability) == 1
        assert all(edit.subject in prompt for prompt in (edit.prompt, *edit.rephrase))  # found verbatim by editors
        for probe in edit.locality:
            assert probe.key == "other_countries" and edit.subject.casefold() not in probe.prompt.casefold()
        assert edit.portability[0].key == "one_hop" and edit.portability[0].target == edit.target_new
        prompts = [edit.prompt, *edit.rephrase, *(probe.prompt for probe in edit.locality + edit.portability)]
        assert all(len(prompt.split()) < 20 and prompt == prompt.strip() for prompt in prompts)


def test_country_edits_limit(edits: list[EditRequest]) -> None:
    first = country_edits(limit=12)
    assert first == edits[:12]
    assert len({relation_of(edit) for edit in first}) == 3  # the shuffle mixes relations
    assert [edit.subject for edit in first[:6]] == ["South Georgia", "Botswana", "Nepal", "Thailand", "Bulgaria",
                                                    "Cameroon"]  # Random(0)'s order, not file-name order
    assert country_edits(limit=10_000) == edits
    with pytest.raises(InputError, match="limit must be a positive number of edits, got 0"):
        country_edits(limit=0)


def test_country_edits_hand_checked_france(edits: list[EditRequest]) -> None:
    # Checked by hand against countryinfo's france.json (capital Paris, demonym French), estonia.json (capital
    # Tallinn), japan.json (capital Tokyo) and micronesia_federated_states_of.json (region Oceania).
    france = next(edit for edit in edits if edit.subject == "France")
    assert france == EditRequest(
        prompt="The capital of France is", target_new="Tallinn", ground_truth="Paris", subject="France",
        rephrase=("The capital city of France is", "The seat of government of France is"),
        locality=(Probe("other_countries", "The capital of Japan is", "Tokyo"),
                  Probe("other_countries", "The Federated States of Micronesia is located in the continent of",
                        "Oceania")),
        portability=(Probe("one_hop", "The capital of the country whose people are called French is", "Tallinn"),))
    assert (country_json("france.json")["capital"], country_json("france.json")["demonym"]) == ("Paris", "French")
    assert country_json("estonia.json")["capital"] == "Tallinn"
    assert country_json("japan.json")["capital"] == "Tokyo"
    assert country_json("micronesia_federated_states_of.json")["region"] == "Oceania"


def test_locality_skips_the_edited_the_donor_and_overlapping_names() -> None:
    # countryinfo's own order never puts "Niger" next to "Nigeria" in a locality draw: check the rule directly
    names = ["Niger", "Nigeria", "Chad", "Mali", "Guinea", "Equatorial Guinea", "Benin", "Togo"]
    countries = [Country(name, f"{name} City", "Africa", f"{name}an") for name in names]
    probes = _locality(countries, list(range(len(names))), 0, (0, 2), "capital")
    assert probes == (Probe("other_countries", "The capital of Mali is", "Mali City"),
                      Probe("other_countries", "Guinea is located in the continent of", "Africa"))
    probes = _locality(countries, list(range(len(names))), 3, (4, 6), "demonym")  # Guinea; donor Benin
    assert probes == (Probe("other_countries", "People from Togo are called", "Togoan"),
                      Probe("other_countries", "The capital of Niger is", "Niger City"))


def test_country_edits_without_countryinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "countryinfo", None)  # import countryinfo -> ModuleNotFoundError
    with pytest.raises(InputError) as caught:
        country_edits()
    assert str(caught.value) == ("packaged:country-edits needs the countryinfo package: pip install --no-deps "
                                 "countryinfo==1.0.1 (or pip install -e \".[edit]\")")
