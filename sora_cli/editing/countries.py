"""packaged:country-edits: counterfactual edits of country facts, built deterministically from countryinfo's data.

Nothing is downloaded or cached: the JSON files of the countryinfo package (1.0.1) are read directly, in file-name
order, and the same list comes out every time. See COUNTRY_EDITS_DOC for how the set is built.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from sora_cli.editing.requests import EditRequest, Probe
from sora_cli.errors import InputError

RELATIONS = ("capital", "region", "demonym")
# countryinfo's regions, as they read after "the continent of" (no "Polar" or empty region is kept)
REGIONS = {"Africa": "Africa", "Americas": "the Americas", "Asia": "Asia", "Europe": "Europe", "Oceania": "Oceania"}
# relation -> (the edit prompt, two rephrases); {name} is the country's name, verbatim (the edit's subject)
TEMPLATES = {
    "capital": ("The capital of {name} is", "The capital city of {name} is", "The seat of government of {name} is"),
    "region": ("{name} is located in the continent of", "{name} lies in the continent of",
               "The continent where {name} is located is"),
    "demonym": ("People from {name} are called", "The demonym of {name} is", "The word for a person from {name} is"),
}
# relation -> the one-hop prompt: the edited fact joined to another (true) fact of the same country
ONE_HOP = {
    "capital": "The capital of the country whose people are called {demonym} is",
    "region": "{city} is located in the continent of",
    "demonym": "People from the country whose capital is {capital} are called",
}
_UNCLEAN = "(),/"  # "Cocos (Keeling) Islands", "Antiguan,Barbudan", "Serbian/Montenegrin": not one clean value
# Names English puts "the" before ("the capital of the United States"); the subject stays the bare name, so it is
# found verbatim in every prompt (ROME-style editors locate the subject's tokens by string match)
_ARTICLE_PARTS = ("Republic", "United ", "States", "Islands", "Kingdom", "Isle of ")
_ARTICLE_NAMES = {"Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles"}

COUNTRY_EDITS_DOC = """\
`packaged:country-edits` is built from the `countryinfo` package's data files (1.0.1), read in file-name order; the \
only randomness is `random.Random(0)`, so the set is the same everywhere. Kept: entries with a name, capital, \
demonym, ISO alpha-3 code and a region among Africa, Americas, Asia, Europe, Oceania, without parentheses, commas \
or slashes, whose demonym is not just the name; of entries sharing a name, code, capital or demonym, only the most \
populous (France, not Réunion). That leaves 214 countries and territories, one edit each, the relation rotating over \
capital, region, demonym (72/71/71). The new answer is that relation's value of the next country, around a \
`Random(0)` shuffle, whose value differs. Prompts: \"The capital of France is\", \"France is located in the \
continent of\" (\"the Americas\"), \"People from France are called\", two rephrases each; the subject is the \
country's name. Locality: two other countries (not the answer's donor, no overlapping name), asked the edited \
relation and the next one, with their true values as the answers (locality scores the edited model's agreement \
with the unedited one on those answer tokens). Portability: one one-hop prompt, answered by the new value \
through another true fact of the edited country: \"The capital of the country whose people are called French \
is\", \"The city of Paris is located in the continent of\", \"People from the country whose capital is Paris are \
called\". The edits are then shuffled (same `Random(0)`): the first N (`limit`) mix relations and continents."""


@dataclass(frozen=True)
class Country:
    """The facts kept of one country (region as phrased in prompts: "the Americas")."""

    name: str  # countryinfo's name without a leading "The" ("Bahamas"): the edits' subject
    capital: str
    region: str
    demonym: str
    article: bool = False  # "the United States", "the Bahamas"

    def value(self, relation: str) -> str:
        return {"capital": self.capital, "region": self.region, "demonym": self.demonym}[relation]

    def prompt(self, template: str) -> str:
        """A template filled with the name (after "the" where English wants it), first letter capitalised."""
        text = template.format(name=f"the {self.name}" if self.article else self.name, demonym=self.demonym,
                               capital=self.capital, city=_city(self.capital))
        return text[:1].upper() + text[1:]


def country_edits(limit: int | None = None) -> list[EditRequest]:
    """The packaged edits (all of them, or the first `limit`), identical on every call."""
    if limit is not None and limit < 1:
        raise InputError(f"packaged:country-edits: limit must be a positive number of edits, got {limit}")
    countries = load_countries()
    rng = random.Random(0)
    ring = list(range(len(countries)))
    rng.shuffle(ring)  # the order donors and locality countries are drawn in, so neighbours are not alphabetical
    edits = [_edit(countries, ring, index, RELATIONS[index % len(RELATIONS)]) for index in range(len(countries))]
    rng.shuffle(edits)
    return edits if limit is None else edits[:limit]


def load_countries() -> list[Country]:
    """The clean countries of countryinfo's data, in file-name order (see COUNTRY_EDITS_DOC for the rules)."""
    candidates = [clean for record in _records() if (clean := _clean(record)) is not None]
    # The most populous of entries sharing any value keeps it (France over Réunion, India over the British Indian
    # Ocean Territory's "Indian"); ties go to file-name order. Then every capital / demonym names one country.
    ranked = sorted(range(len(candidates)), key=lambda index: (-candidates[index][1], index))
    claimed: set[tuple[str, str]] = set()
    kept = []
    for index in ranked:
        country, _, alpha3 = candidates[index]
        keys = {("name", country.name.casefold()), ("alpha3", alpha3), ("capital", country.capital.casefold()),
                ("demonym", country.demonym.casefold())}
        if not keys & claimed:
            claimed |= keys
            kept.append(index)
    return [candidates[index][0] for index in sorted(kept)]


def _records() -> list[dict[str, Any]]:
    """countryinfo's data/*.json, sorted by file name; the package's Python API is not used (slow, may change)."""
    try:
        from importlib.resources import files

        data = files("countryinfo") / "data"
        paths = sorted((path for path in data.iterdir() if path.name.endswith(".json")), key=lambda path: path.name)
    except ModuleNotFoundError as err:
        raise InputError("packaged:country-edits needs the countryinfo package: pip install --no-deps "
                         "countryinfo==1.0.1 (or pip install -e \".[edit]\")") from err
    records = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    return [record for record in records if isinstance(record, dict)]


def _clean(record: dict[str, Any]) -> tuple[Country, int, str] | None:
    """(country, population, ISO alpha-3) of a record with clean facts, or None."""
    fields = {key: record.get(key) for key in ("name", "capital", "region", "demonym")}
    iso = record.get("ISO")
    alpha3 = iso.get("alpha3") if isinstance(iso, dict) else None
    values = [*fields.values(), alpha3]
    if not all(isinstance(value, str) and value.strip() for value in values):
        return None  # missing, empty, or not one string (a capital may be a list)
    name, capital, region, demonym = (str(value).strip() for value in fields.values())
    if region not in REGIONS or demonym.casefold() == name.casefold():  # "Djibouti" is not a demonym
        return None
    if any(char in value for value in (name, capital, demonym) for char in _UNCLEAN):
        return None
    population = record.get("population")
    bare = name.removeprefix("The ")
    article = bare != name or bare in _ARTICLE_NAMES or any(part in bare for part in _ARTICLE_PARTS)
    return (Country(bare, capital, REGIONS[region], demonym, article),
            population if isinstance(population, int) else 0, str(alpha3).strip().upper())


def _edit(countries: list[Country], ring: list[int], index: int, relation: str) -> EditRequest:
    country = countries[index]
    position = ring.index(index)
    # The new answer: the first country after this one around the ring whose value differs (regions repeat).
    donor = next(other for other in _around(ring, position) if countries[other].value(relation) !=
                 country.value(relation))
    prompt, *rephrase = (country.prompt(template) for template in TEMPLATES[relation])
    target_new = countries[donor].value(relation)
    return EditRequest(prompt=prompt, target_new=target_new, ground_truth=country.value(relation),
                       subject=country.name, rephrase=tuple(rephrase),
                       locality=_locality(countries, ring, position + len(ring) // 2, (index, donor), relation),
                       portability=(Probe("one_hop", country.prompt(ONE_HOP[relation]), target_new),))


def _around(ring: list[int], position: int) -> list[int]:
    """The ring's countries after `position`, wrapping around, without the one at `position`."""
    return [ring[(position + step) % len(ring)] for step in range(1, len(ring))]


def _locality(countries: list[Country], ring: list[int], start: int, excluded: tuple[int, int],
              relation: str) -> tuple[Probe, ...]:
    """Two other countries, from across the ring: one asked the edited relation, one the next relation.

    Not the edited country, not the donor of the new answer, and no name overlapping the edited one's ("Niger" /
    "Nigeria", "Sudan" / "South Sudan"), so no locality prompt mentions the edited subject.
    """
    edited = countries[excluded[0]].name.casefold()
    others = [other for other in _around(ring, start % len(ring)) if other not in excluded
              and edited not in countries[other].name.casefold() and countries[other].name.casefold() not in edited]
    following = RELATIONS[(RELATIONS.index(relation) + 1) % len(RELATIONS)]
    return tuple(Probe("other_countries", countries[other].prompt(TEMPLATES[asked][0]),
                       countries[other].value(asked)) for other, asked in zip(others[:2], (relation, following)))


def _city(capital: str) -> str:
    # "City of San Marino" already says it is a city
    return capital if capital.startswith("City of ") else f"the city of {capital}"
