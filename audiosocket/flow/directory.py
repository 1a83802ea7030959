"""
The condominium's residents directory, and fuzzy matching against it.

The file format is the original system's: a JSON list of
C{{"apartment_number": "101", "residents": ["Ana Souza"], "voip_number": "SIP/1101"}}, or an
object C{{"apartments": [...]}} holding that list. Residents may be a single string.

A resident may also have a phone of their own: an item of C{residents} is a name (reached at
the apartment's C{voip_number}) or C{{"name": "Ana Souza", "phone": "PJSIP/ana"}}. Dial strings
(C{voip_number} and C{phone}) may not contain a comma, a CR or a LF: they end up in an AMI
header and in the dialplan's C{Dial()} arguments, where a comma would start another argument
and a line break another header. L{Apartment.targets} lists the distinct phones of a unit, the
named resident's first, for the C{sequential} and C{parallel} dial strategies.

Apartments are found by number, exactly (after normalising "0101", "ap 101", "apto. 101" to
"101") or "near" (one digit off, one digit extra or missing: a likely mishearing, which the flow
confirms back). A condominium with blocks or towers writes the block into the number ("B101" or
"101B"): L{Directory.apartment_in_block} finds "bloco B, 101" there, and plain "101" elsewhere.
Residents are found by name with rapidfuzz over accent-folded, lower-cased names so that "jose"
finds "José Carlos"; L{Directory.find_residents} lists every apartment a name may mean, for the
flow to confirm the likeliest ("É para Fernanda Souza, do 201?").

Pure Python: the only I/O is reading the JSON file in L{Directory.load}.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from os import PathLike, fspath
from typing import Any

from attrs import evolve, field, frozen
from rapidfuzz import fuzz, process
from rapidfuzz.distance import Levenshtein


def normalize(text: str) -> str:
    """
    Fold C{text} for comparison: accents removed (NFKD, combining marks dropped), lower-cased,
    whitespace collapsed. C{"  José  Conceição "} becomes C{"jose conceicao"}.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(folded.casefold().split())


class DirectoryError(ValueError):
    """
    The directory file (or the data given to L{Directory}) is unusable. The message names the
    file, the entry index and the field; they are also kept as attributes.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        index: int | None = None,
        field: str | None = None,
    ):
        where = [path or "<directory>"]
        if index is not None:
            where.append(f"entry {index}")
        if field is not None:
            where.append(field)
        super().__init__(": ".join(where + [message]))
        self.path = path
        self.index = index
        self.field = field
        self.message = message


# "apto. 101", "ap 101", "apartamento nº 101", "unidade 101", "casa 3": the prefix goes.
_UNIT_PREFIX = re.compile(
    r"^(?:apartamento|apart|apto|apt|ap|unidade|casa)(?![a-z])\.?\s*"
    r"(?:(?:numero|n|no)(?![a-z])\.?\s*)?"
)
# What may separate the parts of a number as typed or spoken: "12-B", "1 0 1", "101#".
_NUMBER_NOISE = re.compile(r"[\s.\-/#*º°]+")
# Digits with an optional letter suffix ("101", "12B") or a short letter prefix ("A101").
_NUMBER = re.compile(r"[0-9]+[a-z]{0,2}|[a-z]{1,2}[0-9]+")


def normalize_number(value: str | int) -> str | None:
    """
    The canonical form of an apartment number, or C{None} if C{value} is not one.

    Prefixes ("ap", "apto.", "apartamento") and separators go, leading zeros go, letters are
    upper-cased: C{"apto. 0101"} and C{101} both become C{"101"}; C{"12-b"} becomes C{"12B"}.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = _UNIT_PREFIX.sub("", normalize(value))
    text = _NUMBER_NOISE.sub("", text)
    if not _NUMBER.fullmatch(text):
        return None
    if text[0].isdigit():
        # Leading zeros go ("0101" is "101"), but "0" stays "0" and "0A" keeps its zero.
        stripped = text.lstrip("0")
        if not stripped or not stripped[0].isdigit():
            stripped = "0" + stripped
        text = stripped
    return text.upper()


@frozen
class Apartment:
    """
    One apartment: its canonical C{number}, who lives there, and the C{dial} string (the
    original's C{voip_number}) that the dialer uses to ring it.
    """

    number: str
    residents: tuple[str, ...] = field(converter=tuple)
    dial: str
    #: C{(name, dial string)} for each resident with a phone of their own.
    phones: tuple[tuple[str, str], ...] = field(default=(), converter=tuple)

    def phone_of(self, resident: str | None) -> str:
        """Where C{resident} is reached: their own phone, else the apartment's C{dial}."""
        for name, phone in self.phones:
            if name == resident:
                return phone
        return self.dial

    def targets(self, first: str | None = None) -> list[tuple[str | None, str]]:
        """
        Every distinct phone of the unit as C{(resident, dial string)}, C{first}'s phone (the
        resident the visitor named) first, then in the directory's order; the apartment's
        C{dial} is named by the first resident reached there (C{None} when nobody is listed).
        """
        order = list(self.residents)
        if first in order:
            order.remove(first)
            order.insert(0, first)
        seen: dict[str, str | None] = {}
        for name in order:
            seen.setdefault(self.phone_of(name), name)
        if not seen:
            seen[self.dial] = None
        return [(name, dial) for dial, name in seen.items()]


@frozen
class Match:
    """
    The result of a directory look-up. C{resident} is C{None} for a look-up by number;
    C{score} is 0..100. C{exact} is C{False} when the flow should confirm back: a near
    apartment number ("apartamento 101, correto?"), or a name that matched only approximately
    ("tais" for "Thaís"; every spoken word found in the name is exact).
    """

    apartment: Apartment
    resident: str | None
    score: float
    exact: bool


# Words that do not tell one person from another: particles inside names and forms of address
# the visitor may put in front of them ("dona Maria", "seu José", "Dr. Paulo").
_NAME_NOISE = frozenset(
    "da de do das dos e dona seu sr sra srta senhor senhora doutor doutora dr dra".split()
)
_NON_LETTER = re.compile(r"[^a-z0-9 ]+")


def _name_key(name: str) -> str:
    words = _NON_LETTER.sub(" ", normalize(name)).split()
    return " ".join(w for w in words if w not in _NAME_NOISE)


def _name_score(query: str, choice: str, **_kwargs: Any) -> float:
    """
    How well C{query} names the person C{choice} (both already L{_name_key}ed), 0..100.

    The best of:
      - C{token_set_ratio}: a query whose words are all in the name scores 100, so a first
        name alone ("jose") or a surname alone ("souza") finds "José Carlos Souza";
      - plain C{ratio} against each run of the name's words as long as the query: a slightly
        misheard word ("tais" for "thais") still scores high.

    Not C{WRatio}: its partial matching scores "ana" at 90 against "mariana", which would make
    every short first name ambiguous.
    """
    if not query or not choice:
        return 0.0
    best = fuzz.token_set_ratio(query, choice)
    q_words = query.split()
    c_words = choice.split()
    span = len(q_words)
    for start in range(0, max(1, len(c_words) - span + 1)):
        candidate = " ".join(c_words[start : start + span])
        best = max(best, fuzz.ratio(query, candidate))
    return best


class Directory:
    """
    The apartments of one condominium, looked up by number or by resident name.
    """

    # Two candidates closer than this (in score points) in different apartments are a tie:
    # the visitor must say which apartment.
    AMBIGUITY_MARGIN = 5.0

    def __init__(self, apartments: Iterable[Apartment] = ()):
        self._apartments: dict[str, Apartment] = {}
        for apartment in apartments:
            key = normalize_number(apartment.number)
            if key is None:
                raise DirectoryError(f"not an apartment number: {apartment.number!r}")
            if key in self._apartments:
                raise DirectoryError(f"duplicate apartment number {key!r}")
            self._apartments[key] = evolve(apartment, number=key)
        # (key, apartment, resident) for every resident, for find_resident.
        self._people = [
            (_name_key(resident), apartment, resident)
            for apartment in self._apartments.values()
            for resident in apartment.residents
        ]

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Directory:
        """
        Read a directory file. Raises L{DirectoryError} naming the file (and the entry and field)
        if it cannot be read or is not in the expected format.
        """
        name = fspath(path)
        try:
            with open(name, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise DirectoryError(f"cannot read: {e.strerror or e}", name) from e
        except UnicodeDecodeError as e:
            raise DirectoryError(f"not UTF-8 text: {e.reason}", name) from e
        except json.JSONDecodeError as e:
            raise DirectoryError(
                f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", name
            ) from e
        return cls.from_data(data, name)

    @classmethod
    def from_data(cls, data: Any, path: str | None = None) -> Directory:
        """
        Build a directory from already-parsed JSON (C{path} only names the source in errors).
        """
        if isinstance(data, dict):
            if "apartments" not in data:
                raise DirectoryError('expected a list, or an object with "apartments"', path)
            data = data["apartments"]
            if not isinstance(data, list):
                raise DirectoryError('"apartments" must be a list', path, field="apartments")
        elif not isinstance(data, list):
            raise DirectoryError(
                f"expected a list of apartments, not {type(data).__name__}", path
            )
        apartments: list[Apartment] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(data):
            apartment = _parse_entry(entry, path, index)
            if apartment.number in seen:
                first = seen[apartment.number]
                raise DirectoryError(
                    f"duplicate apartment {apartment.number!r} (first at entry {first})",
                    path,
                    index,
                    "apartment_number",
                )
            seen[apartment.number] = index
            apartments.append(apartment)
        return cls(apartments)

    def __len__(self) -> int:
        return len(self._apartments)

    def __iter__(self) -> Iterator[Apartment]:
        return iter(self._apartments.values())

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, (str, int)):
            return False
        return self.apartment(number) is not None

    def __repr__(self) -> str:
        return f"<Directory {len(self)} apartments>"

    def apartment(self, number: str | int) -> Apartment | None:
        """
        The apartment with exactly this number ("0101", "ap 101" and "apto. 101" all mean
        "101"), or C{None}.
        """
        key = normalize_number(number)
        if key is None:
            return None
        return self._apartments.get(key)

    def apartment_in_block(self, number: str | int, block: str | None) -> Apartment | None:
        """
        The apartment C{number} of block C{block} ("bloco B, 101"): the directory's "B101"
        or "101B" when it writes lettered blocks into its numbers, else plain C{number} (a
        block the directory does not write changes nothing), or C{None}.
        """
        key = normalize_number(number)
        if key is None:
            return None
        tag = normalize(block or "").upper()
        if tag.isalpha() and len(tag) <= 2:
            for candidate in (tag + key, key + tag):
                found = self._apartments.get(candidate)
                if found is not None:
                    return found
        return self._apartments.get(key)

    def find_apartment(self, text_or_number: str | int, near: bool = True) -> Match | None:
        """
        Find an apartment by number: exactly first; else, if C{near}, the single apartment whose
        number is one edit away (one digit different, extra or missing: "1001" or "11" for
        "101"), returned with C{exact=False} so the flow confirms it. Two or more near
        candidates are ambiguous: C{None}.
        """
        key = normalize_number(text_or_number)
        if key is None:
            return None
        found = self._apartments.get(key)
        if found is not None:
            return Match(found, None, 100.0, True)
        if not near:
            return None
        candidates = [
            apartment
            for number, apartment in self._apartments.items()
            if Levenshtein.distance(key, number) == 1
        ]
        if len(candidates) != 1:
            return None
        (apartment,) = candidates
        score = Levenshtein.normalized_similarity(key, apartment.number) * 100
        return Match(apartment, None, score, False)

    def find_resident(
        self,
        name: str,
        apartment: Apartment | str | int | None = None,
        threshold: float = 80,
    ) -> Match | None:
        """
        The resident best named by C{name}, scoring at least C{threshold} (0..100), or C{None}.

        Names are compared accent-folded and lower-cased, without particles ("da", "dos") and
        forms of address ("dona", "seu"); a first name or a surname alone matches the whole name.
        With C{apartment}, only its residents are candidates (an unknown apartment: C{None}).
        When the best candidates of two different apartments score within
        L{AMBIGUITY_MARGIN} of each other ("Carlos" in 101 and in 202), the answer is C{None}:
        the flow must ask for the apartment. Ties inside one apartment return its first match.
        """
        query = _name_key(name)
        if not query:
            return None
        people = self._people
        if apartment is not None:
            if not isinstance(apartment, Apartment):
                apartment = self.apartment(apartment)
                if apartment is None:
                    return None
            people = [p for p in people if p[1].number == apartment.number]
        if not people:
            return None
        results = process.extract(
            query,
            [key for key, _, _ in people],
            scorer=_name_score,
            processor=None,
            score_cutoff=threshold,
            limit=None,
        )
        if not results:
            return None
        _, best_score, best_index = results[0]
        best_apartment = people[best_index][1]
        for _, score, index in results[1:]:
            if best_score - score >= self.AMBIGUITY_MARGIN:
                break
            if people[index][1].number != best_apartment.number:
                return None
        return Match(best_apartment, people[best_index][2], float(best_score), best_score >= 100)


    def find_residents(self, name: str, threshold: float = 80) -> list[Match]:
        """
        Every apartment where someone is named by C{name} (scoring at least C{threshold}), best
        first, one L{Match} per apartment (its best-named resident). C{exact} is as for
        L{find_resident}; whether the first is I{the} answer is the caller's to judge (see
        L{AMBIGUITY_MARGIN}).
        """
        query = _name_key(name)
        if not query or not self._people:
            return []
        results = process.extract(
            query,
            [key for key, _, _ in self._people],
            scorer=_name_score,
            processor=None,
            score_cutoff=threshold,
            limit=None,
        )
        matches: list[Match] = []
        seen: set[str] = set()
        for _, score, index in results:
            _, apartment, resident = self._people[index]
            if apartment.number in seen:
                continue
            seen.add(apartment.number)
            matches.append(Match(apartment, resident, float(score), score >= 100))
        return matches


def _parse_entry(entry: Any, path: str | None, index: int) -> Apartment:
    if not isinstance(entry, dict):
        raise DirectoryError(
            f"must be an object, not {type(entry).__name__}", path, index
        )

    def need(name: str) -> Any:
        if name not in entry:
            raise DirectoryError("missing", path, index, name)
        return entry[name]

    raw_number = need("apartment_number")
    if isinstance(raw_number, bool) or not isinstance(raw_number, (str, int)):
        raise DirectoryError(
            f"must be a string or an integer, not {type(raw_number).__name__}",
            path,
            index,
            "apartment_number",
        )
    number = normalize_number(raw_number)
    if number is None:
        raise DirectoryError(
            f"not an apartment number: {raw_number!r}", path, index, "apartment_number"
        )

    raw_residents = need("residents")
    if isinstance(raw_residents, str):
        raw_residents = [raw_residents]
    if not isinstance(raw_residents, list):
        raise DirectoryError(
            f"must be a list of names or a name, not {type(raw_residents).__name__}",
            path,
            index,
            "residents",
        )
    residents = []
    phones = []
    for position, resident in enumerate(raw_residents):
        phone = None
        if isinstance(resident, dict):
            unknown = sorted(set(resident) - {"name", "phone"})
            if unknown:
                raise DirectoryError(
                    f"item {position}: unknown key {unknown[0]!r} (known: name, phone)",
                    path,
                    index,
                    "residents",
                )
            phone = _dial_string(
                resident.get("phone"), path, index, f"residents[{position}].phone"
            )
            resident = resident.get("name")
        if not isinstance(resident, str) or not resident.strip():
            raise DirectoryError(
                f"item {position} must be a non-empty name", path, index, "residents"
            )
        name = " ".join(resident.split())
        residents.append(name)
        if phone is not None:
            phones.append((name, phone))

    dial = _dial_string(need("voip_number"), path, index, "voip_number")
    return Apartment(
        number=number, residents=tuple(residents), dial=dial, phones=tuple(phones)
    )


def _dial_string(value: Any, path: str | None, index: int, name: str) -> str:
    """A dial string: non-empty, with no comma, CR or LF (see the module docstring)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a bare extension number
    if not isinstance(value, str) or not value.strip():
        raise DirectoryError("must be a non-empty dial string", path, index, name)
    if any(c in value for c in ",\r\n"):
        raise DirectoryError(
            "a dial string must not contain a comma or a line break", path, index, name
        )
    return value.strip()
