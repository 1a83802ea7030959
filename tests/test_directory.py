"""
Tests for L{audiosocket.flow.directory}: loading the original's file format, its errors, and
matching apartments and residents.
"""

import json

import pytest

from audiosocket.flow.directory import (
    Apartment,
    Directory,
    DirectoryError,
    Match,
    normalize,
    normalize_number,
)

ENTRIES = [
    {"apartment_number": "101", "residents": ["Ana Souza", "Carlos Souza"], "voip_number": "SIP/1101"},
    {"apartment_number": "102", "residents": ["José Carlos Pereira"], "voip_number": "SIP/1102"},
    {"apartment_number": "202", "residents": ["Mariana Lima", "Thaís Oliveira"], "voip_number": "SIP/1202"},
    {"apartment_number": "501", "residents": "Pedro da Silva", "voip_number": "SIP/1501"},
    {"apartment_number": "1201", "residents": ["Maria das Graças Nogueira"], "voip_number": "PJSIP/2201"},
    {"apartment_number": "704", "residents": ["Carlos Mendes"], "voip_number": "SIP/1704"},
]  # fmt: skip


def write(tmp_path, data, name="apartments.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def directory(tmp_path):
    return Directory.load(write(tmp_path, ENTRIES))


# -- loading ---------------------------------------------------------------------------------


def test_load_list(directory):
    """The original's format, a JSON list of apartments, loads every apartment."""
    assert len(directory) == len(ENTRIES)
    assert directory.apartment("101") == Apartment("101", ("Ana Souza", "Carlos Souza"), "SIP/1101")


def test_load_object_with_apartments(tmp_path):
    """An object holding the list under "apartments" loads the same as the bare list."""
    wrapped = Directory.load(write(tmp_path, {"apartments": ENTRIES}))
    bare = Directory.load(write(tmp_path, ENTRIES, "bare.json"))
    assert list(wrapped) == list(bare)


def test_residents_as_one_string(directory):
    """A resident given as a single string is a one-person tuple, not a tuple of letters."""
    assert directory.apartment("501").residents == ("Pedro da Silva",)


def test_number_and_dial_as_integers(tmp_path):
    """Numbers written as JSON integers (apartment 12, extension 2012) are read as strings."""
    d = Directory.load(
        write(tmp_path, [{"apartment_number": 12, "residents": [], "voip_number": 2012}])
    )
    assert d.apartment("12") == Apartment("12", (), "2012")


def test_numbers_are_canonical(tmp_path):
    """An apartment written "0101" in the file is apartment "101"."""
    d = Directory.load(
        write(tmp_path, [{"apartment_number": "0101", "residents": "Ana", "voip_number": "SIP/1"}])
    )
    assert [a.number for a in d] == ["101"]


def test_iteration_keeps_file_order(directory):
    """Iterating a directory yields its apartments in the file's order."""
    assert [a.number for a in directory] == [e["apartment_number"] for e in ENTRIES]


def test_contains(directory):
    """C{in} tells whether an apartment number (in any accepted spelling) exists."""
    assert "ap 0101" in directory
    assert "999" not in directory
    assert None not in directory


def test_build_from_apartments():
    """A directory can be built from L{Apartment}s directly."""
    d = Directory([Apartment("7", ("Rui",), "SIP/7")])
    assert d.apartment("07").residents == ("Rui",)


def test_build_rejects_duplicates():
    """Two L{Apartment}s with the same number are refused."""
    with pytest.raises(DirectoryError, match="duplicate"):
        Directory([Apartment("7", (), "SIP/7"), Apartment("07", (), "SIP/8")])


@pytest.mark.parametrize(
    "data, index, field, words",
    [
        ([ENTRIES[0], {"residents": [], "voip_number": "SIP/1"}], 1, "apartment_number", "missing"),
        ([{"apartment_number": "1", "voip_number": "SIP/1"}], 0, "residents", "missing"),
        ([{"apartment_number": "1", "residents": []}], 0, "voip_number", "missing"),
        ([ENTRIES[0], ENTRIES[1], dict(ENTRIES[0])], 2, "apartment_number", "duplicate"),
        ([ENTRIES[0], {**ENTRIES[1], "apartment_number": "0101"}], 1, "apartment_number", "duplicate"),
        ([{**ENTRIES[0], "apartment_number": ["101"]}], 0, "apartment_number", "string or an integer"),
        ([{**ENTRIES[0], "apartment_number": True}], 0, "apartment_number", "string or an integer"),
        ([{**ENTRIES[0], "apartment_number": "térreo"}], 0, "apartment_number", "not an apartment"),
        ([{**ENTRIES[0], "residents": {"name": "Ana"}}], 0, "residents", "list of names"),
        ([{**ENTRIES[0], "residents": ["Ana", 3]}], 0, "residents", "item 1"),
        ([{**ENTRIES[0], "residents": ["  "]}], 0, "residents", "item 0"),
        ([{**ENTRIES[0], "voip_number": ""}], 0, "voip_number", "non-empty"),
        ([{**ENTRIES[0], "voip_number": None}], 0, "voip_number", "non-empty"),
        ([ENTRIES[0], "102"], 1, None, "must be an object"),
    ],
)  # fmt: skip
def test_bad_entries_name_file_index_and_field(tmp_path, data, index, field, words):
    """Each kind of bad entry is refused with the file, the entry index and the field named."""
    path = write(tmp_path, data)
    with pytest.raises(DirectoryError) as info:
        Directory.load(path)
    error = info.value
    assert (error.path, error.index, error.field) == (str(path), index, field)
    message = str(error)
    assert str(path) in message
    assert f"entry {index}" in message
    if field is not None:
        assert field in message
    assert words in message


@pytest.mark.parametrize(
    "data, words",
    [
        ("not a list", "expected a list"),
        ({"residents": []}, '"apartments"'),
        ({"apartments": {"101": {}}}, '"apartments" must be a list'),
    ],
)
def test_bad_top_level(tmp_path, data, words):
    """A file whose top level is not a list (or an object with one) is refused, naming it."""
    path = write(tmp_path, data)
    with pytest.raises(DirectoryError, match=words) as info:
        Directory.load(path)
    assert str(path) in str(info.value)


def test_invalid_json(tmp_path):
    """Broken JSON is refused with the file and the line of the error."""
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"apartment_number": "101",\n]', encoding="utf-8")
    with pytest.raises(DirectoryError, match=r"broken\.json: invalid JSON at line 3"):
        Directory.load(path)


def test_missing_file(tmp_path):
    """A file that does not exist is a L{DirectoryError} naming it, not a bare OSError."""
    path = tmp_path / "nope.json"
    with pytest.raises(DirectoryError, match="nope.json: cannot read"):
        Directory.load(path)


def test_directory_error_is_value_error():
    """L{DirectoryError} is a C{ValueError}, so config loading can treat it as bad input."""
    assert issubclass(DirectoryError, ValueError)


# -- normalising -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, folded",
    [
        ("José", "jose"),
        ("  Maria  das   Graças ", "maria das gracas"),
        ("CONCEIÇÃO", "conceicao"),
        ("Thaís Müller", "thais muller"),
    ],
)
def test_normalize(text, folded):
    """L{normalize} drops accents, lower-cases and collapses whitespace."""
    assert normalize(text) == folded


@pytest.mark.parametrize(
    "spelling, number",
    [
        ("101", "101"),
        ("0101", "101"),
        (" 101 ", "101"),
        (101, "101"),
        ("ap 101", "101"),
        ("ap101", "101"),
        ("Ap. 101", "101"),
        ("apto. 101", "101"),
        ("APTO 0101", "101"),
        ("apartamento 101", "101"),
        ("apartamento nº 101", "101"),
        ("1 0 1", "101"),
        ("101#", "101"),
        ("12-b", "12B"),
        ("0", "0"),
        ("", None),
        ("apto", None),
        ("quero o 101", None),
        (True, None),
        (None, None),
    ],
)
def test_normalize_number(spelling, number):
    """Apartment numbers lose prefixes, separators and leading zeros; non-numbers are None."""
    assert normalize_number(spelling) == number


@pytest.mark.parametrize("spelling", ["101", "0101", "ap 101", "apto. 101", "Apartamento 101", 101])
def test_apartment_exact(directory, spelling):
    """L{Directory.apartment} finds "101" however it is spelled."""
    assert directory.apartment(spelling).number == "101"


def test_apartment_unknown(directory):
    """L{Directory.apartment} is exact: a number one digit off is not found."""
    assert directory.apartment("1001") is None
    assert directory.apartment("bloco") is None


# -- finding apartments ----------------------------------------------------------------------


def test_find_apartment_exact(directory):
    """An existing number is an exact match with score 100."""
    match = directory.find_apartment("apto 0501")
    assert match == Match(directory.apartment("501"), None, 100.0, True)


@pytest.mark.parametrize(
    "said, found",
    [
        ("5011", "501"),  # one digit extra
        ("51", "501"),  # one digit missing
        ("714", "704"),  # one digit different
        ("12001", "1201"),
    ],
)
def test_find_apartment_near_is_flagged(directory, said, found):
    """A single apartment one digit away is found but flagged C{exact=False}, to confirm."""
    match = directory.find_apartment(said)
    assert match is not None
    assert match.apartment.number == found
    assert match.exact is False
    assert 0 < match.score < 100


@pytest.mark.parametrize("said", ["103", "1001", "1202"])
def test_find_apartment_ambiguous_near(directory, said):
    """Two apartments one digit away (103: 101 and 102) is ambiguous: no match."""
    assert directory.find_apartment(said) is None


def test_find_apartment_far(directory):
    """A number two or more digits away from every apartment matches nothing."""
    assert directory.find_apartment("999") is None


def test_find_apartment_near_disabled(directory):
    """With C{near=False} only exact numbers match."""
    assert directory.find_apartment("5011", near=False) is None
    assert directory.find_apartment("501", near=False).exact is True


def test_find_apartment_not_a_number(directory):
    """Text that is not an apartment number matches nothing (rather than raising)."""
    assert directory.find_apartment("boa tarde") is None


# -- finding residents -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "said, resident, apartment",
    [
        ("Ana Souza", "Ana Souza", "101"),
        ("ana", "Ana Souza", "101"),  # first name only; not "Mariana"
        ("jose", "José Carlos Pereira", "102"),  # accents ignored
        ("JOSÉ CARLOS", "José Carlos Pereira", "102"),
        ("pereira", "José Carlos Pereira", "102"),  # surname only
        ("thais", "Thaís Oliveira", "202"),
        ("tais", "Thaís Oliveira", "202"),  # misheard spelling
        ("ana sousa", "Ana Souza", "101"),
        ("pedro silva", "Pedro da Silva", "501"),  # particles ignored
        ("dona maria", "Maria das Graças Nogueira", "1201"),  # forms of address ignored
        ("Graças", "Maria das Graças Nogueira", "1201"),
        ("mariana", "Mariana Lima", "202"),
        ("maria", "Maria das Graças Nogueira", "1201"),  # not "Mariana"
    ],
)
def test_find_resident(directory, said, resident, apartment):
    """Residents are found by accent-folded, partial or slightly misheard names."""
    match = directory.find_resident(said)
    assert match is not None
    assert (match.resident, match.apartment.number) == (resident, apartment)


def test_find_resident_score_and_exactness(directory):
    """A name whose words are all in the resident's is exact; a misheard one is not."""
    exact = directory.find_resident("jose")
    near = directory.find_resident("tais")
    assert (exact.score, exact.exact) == (100.0, True)
    assert 80 <= near.score < 100
    assert near.exact is False


def test_find_resident_threshold(directory):
    """A match below the threshold is no match; lowering the threshold admits it."""
    assert directory.find_resident("tais", threshold=95) is None
    assert directory.find_resident("tais", threshold=85).resident == "Thaís Oliveira"


def test_find_resident_unknown(directory):
    """A name like no resident's matches nothing."""
    assert directory.find_resident("Joaquim Barbosa") is None
    assert directory.find_resident("") is None
    assert directory.find_resident("dona") is None


def test_find_resident_ambiguous_across_apartments(directory):
    """"Carlos" lives in 101, 102 and 704: without an apartment, no guess."""
    assert directory.find_resident("carlos") is None


def test_find_resident_restricted_to_apartment(directory):
    """With an apartment the ambiguity goes: "Carlos" in 704 is Carlos Mendes."""
    match = directory.find_resident("carlos", apartment="704")
    assert (match.resident, match.apartment.number) == ("Carlos Mendes", "704")
    match = directory.find_resident("carlos", apartment=directory.apartment("102"))
    assert match.resident == "José Carlos Pereira"


def test_find_resident_same_apartment_tie(directory):
    """"Souza" names two people of the same apartment: the apartment is certain, so it matches."""
    match = directory.find_resident("souza")
    assert match.apartment.number == "101"
    assert match.resident in ("Ana Souza", "Carlos Souza")


def test_find_resident_not_in_apartment(directory):
    """Restricted to an apartment where nobody has the name, there is no match."""
    assert directory.find_resident("ana", apartment="704") is None


def test_find_resident_unknown_apartment(directory):
    """Restricted to an apartment that does not exist, there is no match."""
    assert directory.find_resident("ana", apartment="999") is None


# -- every apartment a name may mean; blocks written into numbers ------------------------------


def test_find_residents_lists_every_apartment(directory):
    """"Carlos" lives in 101, 102 and 704: one match per apartment, exact ones first."""
    matches = directory.find_residents("carlos")
    assert sorted(m.apartment.number for m in matches) == ["101", "102", "704"]
    assert all(m.exact for m in matches)
    assert {m.resident for m in matches} == {"Carlos Souza", "José Carlos Pereira", "Carlos Mendes"}


def test_find_residents_one_per_apartment(directory):
    """"Souza": both residents of 101 match; 101 is listed once."""
    matches = directory.find_residents("souza")
    assert [m.apartment.number for m in matches] == ["101"]


def test_find_residents_approximate_is_not_exact(directory):
    """A misheard name is found, marked not exact (the flow confirms it)."""
    (match,) = directory.find_residents("tais")
    assert (match.resident, match.exact) == ("Thaís Oliveira", False)


def test_find_residents_nobody(directory):
    """An unknown name, or no name at all, finds nothing."""
    assert directory.find_residents("Joaquim Barbosa") == []
    assert directory.find_residents("") == []
    assert directory.find_residents("dona") == []


def test_apartment_in_block():
    """"Bloco B, 12" is "B12" or "12B" when the directory writes it so; else the plain number."""
    d = Directory.from_data(
        [
            {"apartment_number": "B12", "residents": ["Roberto Nunes"], "voip_number": "SIP/2012"},
            {"apartment_number": "12A", "residents": ["Ana Lima"], "voip_number": "SIP/1012"},
            {"apartment_number": "101", "residents": ["Carlos Souza"], "voip_number": "SIP/1101"},
        ]
    )  # fmt: skip
    assert d.apartment_in_block("12", "B").number == "B12"
    assert d.apartment_in_block("12", "b").number == "B12"
    assert d.apartment_in_block("12", "A").number == "12A"
    assert d.apartment_in_block("101", "C").number == "101"  # a block the directory lacks
    assert d.apartment_in_block("101", None).number == "101"
    assert d.apartment_in_block("12", None) is None
    assert d.apartment_in_block("12", "C") is None
    assert d.apartment_in_block("x", "B") is None


def test_apartment_in_numbered_block_is_the_plain_number():
    """A numbered tower is not glued to the number ("torre 2, 101" is not "2101")."""
    d = Directory.from_data(
        [
            {"apartment_number": "2101", "residents": ["Ana Lima"], "voip_number": "SIP/2101"},
            {"apartment_number": "101", "residents": ["Carlos Souza"], "voip_number": "SIP/1101"},
        ]
    )  # fmt: skip
    assert d.apartment_in_block("101", "2").number == "101"
