"""
Tests for L{audiosocket.flow.nlu}: facts from what the visitor says, the resident's decision,
and Portuguese number words.
"""

import json
import unicodedata
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from audiosocket.flow.directory import Directory, normalize
from audiosocket.flow.nlu import (
    _GREETINGS,
    _YES_FILLERS,
    _YES_UNITS,
    ENTREGA,
    NEVER_YES,
    SERVICO,
    VISITA,
    Decision,
    Facts,
    answer_name,
    classify_decision,
    classify_dtmf,
    confirms,
    extract_facts,
    spoken_number,
)
from audiosocket.flow.understand import LlmNLU

# The api fixture is, as pytest means it, redefined by every test taking it.
# ruff: noqa: F811
from httpkit import HANG, api, on_its_own, refused_url, within  # noqa: F401 (api is a fixture)

A, D, W, U = Decision.AUTHORIZED, Decision.DENIED, Decision.WHO, Decision.UNCLEAR
E, S, V = ENTREGA, SERVICO, VISITA

# What a visitor says at the gate -> (intent, visitor name, apartment, resident name[, block]).
# Transcripts come with or without accents, capitals and punctuation.
VISITOR_UTTERANCES = [
    # deliveries
    ("oi boa tarde sou o pedro da silva vim entregar uma encomenda pra ana do cento e um", E, "Pedro da Silva", "101", "Ana"),
    ("Boa tarde, entrega para o apartamento 101", E, None, "101", None),
    ("Oi, é do iFood, pedido pro 302", E, None, "302", None),
    ("Delivery do Rappi para o apto 1201", E, None, "1201", None),
    ("Tenho uma encomenda dos Correios para a Ana Souza", E, None, None, "Ana Souza"),
    ("é sedex pro quinhentos e um", E, None, "501", None),
    ("Entregador do Mercado Livre, apartamento 45", E, None, "45", None),
    ("trouxe uma pizza pro 204", E, None, "204", None),
    ("vim entregar um pacote da Amazon pra dona Maria", E, None, None, "Maria"),
    ("Uber Eats, pedido da Mariana, apartamento 12", E, None, "12", "Mariana"),
    ("motoboy da farmácia, remédio pra dona Lúcia no oitocentos e um", E, None, "801", "Lúcia"),
    ("encomenda em nome de Carlos Souza", E, None, None, "Carlos Souza"),
    ("Oi, sou o João, vim entregar a comida do 1203", E, "João", "1203", None),
    ("oi tudo bem é o Carlos do ifood com um pedido pro cento e três", E, "Carlos", "103", None),
    ("ola boa tarde aqui quem fala e o joao vim trazer um pacote pra dona cleusa do trezentos e quatro", E, "Joao", "304", "Cleusa"),
    ("entrega pra Renata, apartamento um um zero um", E, None, "1101", "Renata"),
    ("tenho uma correspondência para o senhor Paulo Mendes", E, None, None, "Paulo Mendes"),
    ("oi é o Matheus vim entregar umas flores pra Aline do 55", E, "Matheus", "55", "Aline"),
    ("o seu Roberto do 902 encomendou uma pizza", E, None, "902", "Roberto"),
    ("entrega da Shopee para Juliana Costa", E, None, None, "Juliana Costa"),
    ("encomenda para o 7", E, None, "7", None),
    ("aqui é o Eduardo, trouxe o remédio da farmácia para a dona Célia no quarenta e dois", E, "Eduardo", "42", "Célia"),
    ("boa tarde é a Cristina, vim deixar a chave pra Sônia do 208", E, "Cristina", "208", "Sônia"),
    ("oi moço, tem uma entrega aqui pro seiscentos e doze", E, None, "612", None),
    ("é entrega, apartamento mil cento e um", E, None, "1101", None),
    ("rapaz do gás, vim trocar o botijão do 405", E, None, "405", None),
    ("a Fernanda pediu um lanche, é pro 1009", E, None, "1009", "Fernanda"),
    ("trouxe um presente para a Isabela, ela mora no 906", E, None, "906", "Isabela"),
    ("vim entregar uns documentos pro doutor Paulo do 1801", E, None, "1801", "Paulo"),
    ("boa tarde, a encomenda é pra Gisele Martins, casa 12", E, None, "12", "Gisele Martins"),
    ("Pedro Souza falando, trouxe uma encomenda da Amazon", E, "Pedro Souza", None, None),
    ("vim entregar duas pizzas no quinhentos e um", E, None, "501", None),
    ("duas caixas pro 1203", E, None, "1203", None),
    ("sedex 10 pro apartamento 1101", E, None, "1101", None),
    ("vim às 10 horas trazer as compras do 707", E, None, "707", None),
    ("entrega pro 101, meu telefone é 11 98765-4321", E, None, "101", None),
    ("é entrega dos correios para Maria das Graças Nogueira", E, None, None, "Maria das Graças Nogueira"),
    ("BOA TARDE É ENTREGA DO MERCADO LIVRE PRO APARTAMENTO 308", E, None, "308", None),
    # services
    ("sou o técnico da Vivo, vim instalar a internet no apartamento 702", S, None, "702", None),
    ("Bom dia, sou eletricista, vim consertar o chuveiro do 302", S, None, "302", None),
    ("vim fazer a manutenção do ar condicionado do apartamento 1101", S, None, "1101", None),
    ("É a diarista, vim fazer a faxina na casa da dona Rosa", S, None, None, "Rosa"),
    ("sou o encanador, tem um vazamento no 203", S, None, "203", None),
    ("Dedetização agendada para o apartamento 64", S, None, "64", None),
    ("aqui é o Marcos da Claro, técnico, pra instalação no 1502", S, "Marcos", "1502", None),
    ("sou pintor, vim fazer um orçamento pro seu Antônio do 401", S, None, "401", "Antônio"),
    ("sou eletricista vim consertar o chuveiro do apartamento dois zero um", S, None, "201", None),
    ("BOA TARDE SOU O MARCOS VIM FAZER A INSTALAÇÃO DA NET NO 1101", S, "Marcos", "1101", None),
    ("oi eu sou a Vanessa vim fazer faxina pra dona Regina", S, "Vanessa", None, "Regina"),
    ("é a babá da Clara, apartamento 1305", S, None, "1305", "Clara"),
    ("é o pessoal da mudança do apartamento 403", S, None, "403", None),
    ("sou o chaveiro, a moradora do 210 ficou trancada pra fora", S, None, "210", None),
    ("sou prestador de serviço, vim consertar o portão da casa 3", S, None, "3", None),
    ("olá, sou da Sabesp, vim fazer a leitura do hidrômetro", S, None, None, None),
    ("oi tudo bem, é o Wagner, técnico da Claro, apartamento 1503", S, "Wagner", "1503", None),
    ("me chamo Ricardo Alves Pereira Lima e vim fazer a faxina no 704", S, "Ricardo Alves Pereira", "704", None),
    # visits
    ("Boa noite, vim visitar minha mãe no 902", V, None, "902", None),
    ("sou amiga da Júlia, ela está me esperando", V, None, None, "Júlia"),
    ("meu nome é Rafael e vim ver a Camila do 303", V, "Rafael", "303", "Camila"),
    ("Oi, aqui é a Beatriz, vim falar com o Gustavo", V, "Beatriz", None, "Gustavo"),
    ("Sou o irmão do Felipe, apartamento quinhentos e dois", V, None, "502", "Felipe"),
    ("É o Pedro, a Ana tá me esperando", V, "Pedro", None, "Ana"),
    ("visita para a Patrícia no apto 1204", V, None, "1204", "Patrícia"),
    ("eu vim visitar o meu pai, o seu José, no 1002", V, None, "1002", "José"),
    ("sou a namorada do Lucas, 304", V, None, "304", "Lucas"),
    ("vim falar com a moradora do 506", V, None, "506", None),
    ("oi, a Larissa me chamou, apartamento cento e dez", V, None, "110", "Larissa"),
    ("me chamo Ricardo Alves e vim visitar a Helena no apartamento mil e duzentos", V, "Ricardo Alves", "1200", "Helena"),
    ("quem fala é a Sandra, vim ver minha irmã no duzentos e dez", V, "Sandra", "210", None),
    ("alô, Tiago falando, vim pro aniversário da Sofia", V, "Tiago", None, "Sofia"),
    ("vim buscar a Gabriela no 608", V, None, "608", "Gabriela"),
    ("sou o Diego, vim pro churrasco do Rodrigo no 1401", V, "Diego", "1401", "Rodrigo"),
    ("vim visitar o Henrique do 1107, sou primo dele", V, None, "1107", "Henrique"),
    ("oi boa noite vim ver meu namorado o Vitor no apartamento doze zero um", V, None, "1201", "Vitor"),
    ("meu nome é Leonardo, vim visitar minha avó, dona Iracema, no setecentos e onze", V, "Leonardo", "711", "Iracema"),
    ("vim fazer uma visita pra minha tia Neide", V, None, None, "Neide"),
    ("vim pro apartamento quatrocentos e trinta e dois ver o Otávio", V, None, "432", "Otávio"),
    ("sou eu, o Alberto, amigo do Sérgio", V, "Alberto", None, "Sérgio"),
    ("oi, o Caio está em casa? sou colega da faculdade", V, None, None, "Caio"),
    ("não vim entregar nada, vim visitar meu irmão Júnior", V, None, None, "Júnior"),
    ("oi é a Patrícia, amiga da Denise do trezentos e um", V, "Patrícia", "301", "Denise"),
    ("Boa noite, aqui é a Joana, vim visitar minha amiga Mariana no apartamento 1201", V, "Joana", "1201", "Mariana"),
    ("não sou entregador, sou amigo do Bruno", V, None, None, "Bruno"),
    ("meu nome é José Carlos, vou no apto 33 falar com a dona Maria", V, "José Carlos", "33", "Maria"),
    # intent only
    ("é entrega", E, None, None, None),
    ("vim visitar", V, None, None, None),
    ("é serviço", S, None, None, None),
    ("não é entrega, é visita", V, None, None, None),
    # name only
    ("sou o Fernando", None, "Fernando", None, None),
    ("meu nome é Ana Paula Ferreira", None, "Ana Paula Ferreira", None, None),
    ("aqui é o Zé", None, "Zé", None, None),
    ("me chamo Luís Henrique", None, "Luís Henrique", None, None),
    ("sou o pedro do 101", None, "Pedro", "101", None),
    # apartment only: digits, spoken, digit by digit
    ("apartamento 101", None, None, "101", None),
    ("apto 1201", None, None, "1201", None),
    ("ap. 33", None, None, "33", None),
    ("é no cento e dois", None, None, "102", None),
    ("quinhentos e um", None, None, "501", None),
    ("dois zero um", None, None, "201", None),
    ("um zero dois", None, None, "102", None),
    ("apartamento três meia", None, None, "36", None),
    ("mil e duzentos", None, None, "1200", None),
    ("duzentos e dez", None, None, "210", None),
    ("é pro apartamento duzentas e uma", None, None, "201", None),
    ("o 5", None, None, "5", None),
    ("apartamento 1 0 1", None, None, "101", None),
    ("o apartamento é o 1.201", None, None, "1201", None),
    # blocks and towers, kept apart from the apartment
    ("bloco B apartamento 12", None, None, "12", None, "B"),
    ("torre 2, apartamento 504", None, None, "504", None, "2"),
    ("apartamento 31 do bloco C", None, None, "31", None, "C"),
    ("bloco dois cento e um", None, None, "101", None, "2"),
    ("vim entregar no bloco a, apartamento 14", E, None, "14", None, "A"),
    ("torre 2 apartamento 504 encomenda para o seu João", E, None, "504", "João", "2"),
    ("aqui quem fala é o Roberto do bloco c, vim ver o Paulo no 23", V, "Roberto", "23", "Paulo", "C"),
    ("vim ver a Thaís do bloco B apartamento 12", V, None, "12", "Thaís", "B"),
    # nothing useful
    ("oi", None, None, None, None),
    ("bom dia", None, None, None, None),
    ("", None, None, None, None),
]  # fmt: skip


def _facts_param(case):
    text, intent, visitor, apartment, resident, *block = case
    expected = Facts(intent, visitor, apartment, resident, block[0] if block else None)
    return pytest.param(text, expected, id=text[:60] or "<empty>")


def test_table_is_large_enough():
    """The visitor table keeps at least 80 cases, so rule changes are checked widely."""
    assert len(VISITOR_UTTERANCES) >= 80


@pytest.mark.parametrize("text, expected", [_facts_param(c) for c in VISITOR_UTTERANCES])
def test_extract_facts(text, expected):
    """Each utterance yields exactly the expected facts (intent, names, apartment, block)."""
    assert extract_facts(text) == expected


# -- facts: specific rules -------------------------------------------------------------------


def test_accents_and_case_do_not_matter():
    """The same words with and without accents and capitals give the same facts (up to the
    spelling of the names, which is kept as said)."""
    a = extract_facts("Vim fazer a MANUTENÇÃO no apartamento cento e três")
    b = extract_facts("vim fazer a manutencao no apartamento cento e tres")
    assert a == b == Facts(SERVICO, None, "103", None)


def test_names_keep_the_spelling_said():
    """Names come back title-cased with their accents, particles in lower case."""
    facts = extract_facts("SOU A MARIA DAS GRAÇAS, VIM VER O JOSÉ")
    assert facts.visitor_name == "Maria das Graças"
    assert facts.resident_name == "José"


def test_phone_number_is_not_an_apartment():
    """A phone number (more than five digits) is never taken for an apartment."""
    assert extract_facts("meu celular é 98765-4321").apartment is None
    assert extract_facts("liga no 11987654321").apartment is None


def test_counted_number_is_not_an_apartment():
    """A small number that counts things ("2 caixas", "às 3 horas") is not an apartment."""
    assert extract_facts("trouxe 2 caixas").apartment is None
    assert extract_facts("vim às 3 horas").apartment is None
    assert extract_facts("trouxe uma encomenda").apartment is None


def test_block_is_not_the_apartment():
    """The number of a tower is the block, not the apartment."""
    assert extract_facts("torre 3") == Facts(block="3")


def test_visitor_name_is_not_the_resident():
    """"sou o Pedro da Silva do 101": the visitor's surname is not read as a resident."""
    facts = extract_facts("sou o Pedro da Silva do 101")
    assert (facts.visitor_name, facts.resident_name) == ("Pedro da Silva", None)


def test_visitor_name_has_at_most_three_words():
    """A long self-introduction keeps the first three name words."""
    facts = extract_facts("meu nome é Ana Beatriz Costa Ribeiro")
    assert facts.visitor_name == "Ana Beatriz Costa"


def test_lower_case_thing_after_ver_in_cased_text():
    """In text that capitalises names, "vim ver o conserto" names nobody."""
    assert extract_facts("Oi, vim ver o chuveiro do Carlos").resident_name is None


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "apartments.json"
    path.write_text(
        json.dumps(
            [
                {"apartment_number": "101", "residents": ["Ana Souza", "Carlos Souza"], "voip_number": "SIP/1101"},
                {"apartment_number": "304", "residents": ["Cleusa Ramos"], "voip_number": "SIP/1304"},
                {"apartment_number": "502", "residents": ["Ana Lima"], "voip_number": "SIP/1502"},
            ]
        ),  # fmt: skip
        encoding="utf-8",
    )
    return Directory.load(path)


def test_resident_matched_to_directory(directory):
    """With a directory the resident comes back as the directory spells the name."""
    facts = extract_facts(
        "ola aqui e o joao vim trazer um pacote pra dona cleusa do trezentos e quatro", directory
    )
    assert facts.resident_name == "Cleusa Ramos"


def test_resident_matched_within_apartment(directory):
    """"Ana" is ambiguous in the directory, but not within the apartment the visitor said."""
    assert extract_facts("entrega pra Ana do 502", directory).resident_name == "Ana Lima"
    assert extract_facts("entrega pra Ana do 101", directory).resident_name == "Ana Souza"


def test_resident_unknown_to_directory_kept_as_said(directory):
    """A name the directory does not know is kept as said, for the flow to question."""
    assert extract_facts("vim ver a Fabiana", directory).resident_name == "Fabiana"


# -- facts against a directory: tests/data/visitor_sentences.json ----------------------------

SENTENCES = json.loads(
    (Path(__file__).parent / "data" / "visitor_sentences.json").read_text("utf-8")
)
SENTENCE_DIRECTORY = Directory.from_data(SENTENCES["directory"])
FACT_NAMES = ("intent", "visitor_name", "apartment", "resident_name", "block")


def _expected(case) -> Facts:
    return Facts(**{name: case[name] for name in FACT_NAMES})


def test_sentence_table_is_large_and_varied():
    """At least 150 visitor sentences, every intent and every fact represented, no duplicate."""
    cases = SENTENCES["sentences"]
    assert len(cases) >= 150
    assert len({c["text"] for c in cases}) == len(cases)
    assert {c["intent"] for c in cases} == {ENTREGA, SERVICO, VISITA, None}
    for name in FACT_NAMES:
        assert sum(c[name] is not None for c in cases) >= 10, name
    # Speech-recognizer style: no capital and no punctuation at all.
    stt = [c for c in cases if c["text"] == c["text"].lower() and "," not in c["text"] and "." not in c["text"]]
    assert len(stt) >= 50


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c["text"][:60]) for c in SENTENCES["sentences"]]
)
def test_visitor_sentence_facts(case):
    """Each sentence yields exactly the expected facts, read against the table's directory."""
    assert extract_facts(case["text"], SENTENCE_DIRECTORY) == _expected(case)


def test_resident_named_for_sure_gives_the_apartment():
    """"Encomenda dos Correios pra Ana Beatriz Silva": one apartment has her; it is hers."""
    facts = extract_facts("Encomenda dos Correios pra Ana Beatriz Silva", SENTENCE_DIRECTORY)
    assert (facts.apartment, facts.resident_name) == ("203", "Ana Beatriz Silva")


def test_ambiguous_name_gives_no_apartment():
    """"Ana" lives in three apartments: no apartment, the name as said (the flow confirms)."""
    facts = extract_facts("tenho uma encomenda pra Ana", SENTENCE_DIRECTORY)
    assert (facts.apartment, facts.resident_name) == (None, "Ana")


def test_approximate_name_is_kept_as_said():
    """"Fernando" is near Fernanda Souza but not her: kept as said, no apartment guessed."""
    facts = extract_facts("entrega pra Fernando", SENTENCE_DIRECTORY)
    assert (facts.apartment, facts.resident_name) == (None, "Fernando")


def test_approximate_name_within_the_apartment_said():
    """Within the apartment said, an approximate name is its resident's."""
    facts = extract_facts("entrega pra Fernando, 201", SENTENCE_DIRECTORY)
    assert facts.resident_name == "Fernanda Souza"


def test_one_resident_apartment_fills_the_resident():
    """"Pacote da Amazon pro 302": its only resident is the one."""
    assert extract_facts("Pacote da Amazon pro 302", SENTENCE_DIRECTORY).resident_name == (
        "Rafael Rodrigues"
    )


def test_several_residents_and_nobody_named():
    """An apartment of several residents, nobody named: no resident guessed."""
    assert extract_facts("entrega pro 702", SENTENCE_DIRECTORY).resident_name is None


def test_name_after_the_apartment():
    """"Entrega pro cento e um, da Ana": the name after the apartment is the resident."""
    assert extract_facts("Entrega pro cento e um, da Ana").resident_name == "Ana"
    assert extract_facts("Entrega pro cento e um, da Ana", SENTENCE_DIRECTORY).resident_name == (
        "Ana Souza"
    )


def test_visitor_name_at_the_end():
    """"…, sou o pai dele, Roberto": the visitor; the resident stays Daniel."""
    facts = extract_facts("vim pegar o Daniel do quinhentos e um, sou o pai dele, Roberto")
    assert (facts.visitor_name, facts.resident_name, facts.apartment) == ("Roberto", "Daniel", "501")


def test_visitor_who_lives_there():
    """"Sou o Carlos do 101, esqueci a chave": Carlos lives in 101, so he is its resident."""
    facts = extract_facts("sou o Carlos do 101, esqueci a chave", SENTENCE_DIRECTORY)
    assert (facts.visitor_name, facts.resident_name) == ("Carlos", "Carlos Souza")


def test_deliverer_named_like_a_resident_is_not_the_resident():
    """A deliverer who shares a resident's first name is not taken for the resident."""
    facts = extract_facts("oi é o Paulo da Claro vim fazer a instalação no 401", SENTENCE_DIRECTORY)
    assert (facts.visitor_name, facts.resident_name) == ("Paulo", None)


def test_block_written_into_the_directory_number():
    """"Bloco B, apartamento 12" is the directory's B12; a block it does not write is ignored."""
    assert extract_facts("bloco b apartamento 12", SENTENCE_DIRECTORY).apartment == "B12"
    assert extract_facts("bloco b apartamento 101", SENTENCE_DIRECTORY).apartment == "101"


def test_stt_style_equals_written():
    """Lower case, no punctuation, numbers in words: the same facts as the written sentence."""
    written = extract_facts("Entrega para Lucas Pereira, apartamento 702.", SENTENCE_DIRECTORY)
    spoken = extract_facts("entrega para lucas pereira apartamento setecentos e dois", SENTENCE_DIRECTORY)
    assert written == spoken == Facts(ENTREGA, None, "702", "Lucas Pereira")


@pytest.mark.parametrize(
    "text, name",
    [
        ("Marcos Vieira", "Marcos Vieira"),
        ("sou o Pedro", "Pedro"),
        ("Pedro Santos, entrega", "Pedro Santos"),
        ("é entrega, aqui é a Ana", "Ana"),
        ("entrega", None),
        ("", None),
        ("olha eu vim aqui hoje de manhã e ninguém atendeu o interfone então voltei", None),
    ],
)
def test_answer_name(text, name):
    """The name in a short answer to "qual é o seu nome?", with or without "sou o"."""
    assert answer_name(text) == name


def test_facts_merge():
    """Merging keeps known facts and fills only the missing ones."""
    first = Facts(intent=ENTREGA, apartment="101")
    second = Facts(intent=VISITA, visitor_name="Pedro", apartment="202", block="B")
    assert first.merge(second) == Facts(ENTREGA, "Pedro", "101", None, "B")


def test_facts_missing():
    """C{missing} lists the required facts still unknown, in asking order."""
    assert Facts().missing == ("intent", "visitor_name", "apartment", "resident_name")
    assert Facts(ENTREGA, "Pedro", "101", "Ana").missing == ()
    assert Facts(apartment="101").missing == ("intent", "visitor_name", "resident_name")


# -- the resident's decision -----------------------------------------------------------------

DECISIONS = json.loads(
    (Path(__file__).parent / "data" / "resident_decisions.json").read_text("utf-8")
)
CATEGORIES = ("authorize", "must_not_authorize", "may_ask_again", "who", "deny")


def _cases(*categories):
    return [
        pytest.param(text, id="{}:{}".format(category, text or "<empty>"))
        for category in categories
        for text in DECISIONS[category]
    ]


def test_decision_table_is_large_and_consistent():
    """
    The table holds at least 400 replies, every category has some, and no reply (accents and
    case aside) sits in two categories.
    """
    where: dict[str, set[str]] = {}
    for category in CATEGORIES:
        for text in DECISIONS[category]:
            where.setdefault(normalize(text), set()).add(category)
    assert all(DECISIONS[c] for c in CATEGORIES)
    assert sum(len(DECISIONS[c]) for c in CATEGORIES) >= 400
    assert {t: c for t, c in where.items() if len(c) > 1} == {}


@pytest.mark.parametrize("text", _cases("must_not_authorize", "may_ask_again", "who", "deny"))
def test_not_a_plain_yes_never_authorizes(text):
    """No reply outside the table's plain yeses authorizes."""
    assert classify_decision(text) is not A


@pytest.mark.parametrize("text", _cases("authorize"))
def test_plain_yes_authorizes(text):
    """A plain yes, with fillers or a greeting around it, authorizes."""
    assert classify_decision(text) is A


@pytest.mark.parametrize("text", _cases("may_ask_again"))
def test_yes_that_is_not_plain_is_asked_again(text):
    """A yes with something else in it ("não tem problema", "ok") is asked again."""
    assert classify_decision(text) in (U, W)


@pytest.mark.parametrize("text", _cases("who"))
def test_who_is_it(text):
    """Asking who it is, or picking up without having heard ("Alô? Pode falar"), is WHO."""
    assert classify_decision(text) is W


@pytest.mark.parametrize("text", _cases("deny"))
def test_clear_refusal_is_denied(text):
    """A clear refusal, colloquial and post-negated ones included, is DENIED."""
    assert classify_decision(text) is D


def test_words_not_substrings():
    """"assim" contains "sim" and must not authorise: matching is on whole words."""
    assert classify_decision("assim") is Decision.UNCLEAR
    assert classify_decision("não, assim não") is Decision.DENIED


def test_yes_vocabulary_has_no_forbidden_word():
    """
    No word of the yes phrases, the fillers or the greetings is a negation, a question word,
    a deferral, a condition, a send-away, a sarcasm marker or a hedge.
    """
    vocabulary = {w for phrase in _YES_UNITS | _YES_FILLERS | _GREETINGS for w in phrase}
    assert vocabulary & NEVER_YES == set()
    assert {"nao", "num", "nem", "nada", "amanha", "se", "mas", "portaria", "embora"} <= NEVER_YES


@pytest.mark.parametrize(
    "bare, entry",
    [
        ("alô, sim", "alô, sim, pode subir"),
        ("alo sim", "alo pode subir"),
        ("oi, pode", "oi, pode entrar"),
        ("Oi pode", "Oi pode liberar"),
        ("opa, sim senhor", "opa, sim senhor, manda subir"),
    ],
)
def test_greeting_then_bare_yes_is_not_a_yes(bare, entry):
    """
    "Alô, sim" is how a phone is picked up (the "?" is easily lost in transcription): after a
    greeting only an entry verb ("alô, pode subir") authorizes.
    """
    assert classify_decision(bare) is not A
    assert classify_decision(entry) is A


@pytest.mark.parametrize(
    "text, confirmed",
    [
        ("sim", True),
        ("isso", True),
        ("Isso mesmo.", True),
        ("correto", True),
        ("exato", True),
        ("é esse", True),
        ("sim, isso", True),
        ("não", False),
        ("isso não", False),
        ("não é esse", False),
        ("correto?", False),
        ("é o quinhentos e dois", False),
        ("acho que sim", False),
        ("", False),
    ],
)
def test_confirms(text, confirmed):
    """The visitor confirms an apartment number read back only with a plain yes or "isso"."""
    assert confirms(text) is confirmed


@pytest.mark.parametrize(
    "digit, decision",
    [("1", A), ("2", D), ("3", U), ("#", U), ("*", U), ("", U), (" 1 ", A), ("12", U)],
)
def test_classify_dtmf(digit, decision):
    """On the keypad 1 authorises, 2 refuses and anything else is unclear."""
    assert classify_dtmf(digit) is decision


# Fragments that must keep any reply from authorizing, wherever they are put.
NEGATIONS = [
    "não", "nao", "num", "nem", "nunca", "jamais", "nada", "ninguém", "não não", "de jeito nenhum",
    "negativo", "nem pensar",
]  # fmt: skip
QUESTIONS = ["?", "quem é?", "né?", "como assim", "quem", "qual", "hein", "onde", "quando"]
DEFERRALS = [
    "amanhã", "amanha", "outro dia", "depois", "mais tarde", "outra hora", "semana que vem",
    "só amanhã", "depois das seis",
]  # fmt: skip
CONDITIONS = [
    "se for o João", "só se", "mas", "desde que seja rápido", "caso seja entrega", "se quiser",
    "mas só amanhã", "só se ele falar o nome", "porém", "somente",
]  # fmt: skip
OTHERS = [
    "deixa na portaria", "com o porteiro", "manda embora", "manda voltar", "pode desligar",
    "deixa pra lá", "pode esquecer", "e eu sou o Papa", "tá maluco", "só que não", "acho",
    "talvez", "sei lá", "pode ser",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", ", ", ". ", "! ", "... ", " - ", "… "]


def _fold_some(draw, text):
    """Random capitals and accents dropped, character by character."""
    out = []
    for ch in text:
        if draw(st.booleans()):
            ch = unicodedata.normalize("NFKD", ch)
            ch = "".join(c for c in ch if not unicodedata.combining(c))
        out.append(ch.upper() if draw(st.booleans()) else ch)
    return "".join(out)


@st.composite
def spoiled_yes(draw):
    """A plain yes from the table with a forbidden fragment put in at a random place."""
    words = draw(st.sampled_from(DECISIONS["authorize"])).split()
    fragment = draw(st.sampled_from(NEGATIONS + QUESTIONS + DEFERRALS + CONDITIONS + OTHERS))
    words.insert(draw(st.integers(0, len(words))), fragment)
    text = words[0]
    for word in words[1:]:
        text += draw(st.sampled_from(SEPARATORS)) + word
    text += draw(st.sampled_from(["", ".", "!", "?", "..."]))
    return _fold_some(draw, text)


@settings(max_examples=800, deadline=None)
@given(spoiled_yes())
def test_no_negation_question_deferral_or_condition_ever_authorizes(text):
    """
    Property: a yes phrase with a negation, a "?", a question word, a deferral, a condition,
    a send-away, sarcasm or a hedge anywhere in it, in any case, with or without accents and
    punctuation, never authorizes.
    """
    assert classify_decision(text) is not A


@st.composite
def plain_yes_as_transcribed(draw):
    """A plain yes from the table, spelt any way a recognizer might (case, accents, stops)."""
    text = draw(st.sampled_from(DECISIONS["authorize"]))
    text = text.rstrip(".!…") + draw(st.sampled_from(["", ".", "!", "...", "…"]))
    return _fold_some(draw, text)


@settings(max_examples=300, deadline=None)
@given(plain_yes_as_transcribed())
def test_plain_yes_survives_case_and_accents(text):
    """Property: a plain yes still authorizes whatever its capitals, accents and full stops."""
    assert classify_decision(text) is A


# -- numbers ---------------------------------------------------------------------------------

SPOKEN_NUMBERS = [
    ("zero", 0),
    ("um", 1),
    ("uma", 1),
    ("duas", 2),
    ("três", 3),
    ("dez", 10),
    ("quinze", 15),
    ("dezenove", 19),
    ("vinte", 20),
    ("vinte e um", 21),
    ("noventa e nove", 99),
    ("cem", 100),
    ("cento e um", 101),
    ("cento e dois", 102),
    ("cento e dez", 110),
    ("cento e vinte e três", 123),
    ("duzentos e dez", 210),
    ("duzentas e uma", 201),
    ("quinhentos e um", 501),
    ("novecentos e noventa e nove", 999),
    ("mil", 1000),
    ("mil e duzentos", 1200),
    ("mil duzentos e um", 1201),
    ("mil cento e um", 1101),
    ("dois mil e um", 2001),
    ("dois zero um", 201),
    ("um zero dois", 102),
    ("um um zero um", 1101),
    ("doze zero um", 1201),
    ("três meia", 36),
    ("meia meia meia", 666),
    ("Cento E Três", 103),
    ("", None),
    ("meia", None),
    ("e", None),
    ("cento e", None),
    ("e um", None),
    ("um e dois", None),
    ("cento e bolo", None),
    ("apartamento", None),
]  # fmt: skip


@pytest.mark.parametrize("words, number", SPOKEN_NUMBERS)
def test_spoken_number(words, number):
    """Portuguese number words, compositional or digit by digit, give their value."""
    assert spoken_number(words) == number


def test_spoken_number_accepts_word_lists():
    """C{spoken_number} takes a list of words as well as a string."""
    assert spoken_number(["quinhentos", "e", "dois"]) == 502


# -- the same table with nlu = "llm" and a model that fails: the rules answer -----------------

BROKEN_MODELS = {
    "http_500": (500, {"error": {"message": "overloaded"}}),
    "not_json": (200, b"<html>bad gateway</html>"),
    "prose": (200, {"choices": [{"message": {"content": "Claro! O visitante é o Pedro."}}]}),
    "ill_typed": (
        200,
        {"choices": [{"message": {"content": json.dumps({"intent": "assalto", "apartment": 7.5})}}]},
    ),
    "no_choices": (200, {"id": "x"}),
}


async def _table_through(nlu) -> list[str]:
    misses = []
    for case in SENTENCES["sentences"]:
        facts = await within(nlu.extract(case["text"], SENTENCE_DIRECTORY))
        if facts != _expected(case):
            misses.append(case["text"])
    return misses


@pytest.mark.parametrize("broken", sorted(BROKEN_MODELS))
@pytest_twisted.ensureDeferred
async def test_llm_that_fails_leaves_the_rules_answering(api, broken):
    """
    nlu = "llm" against a local OpenAI-compatible server that errs or answers garbage: every
    sentence of the table still gets the rules' (expected) facts, and every one fell back.
    """
    code, body = BROKEN_MODELS[broken]
    api.answer(code, body)
    nlu = LlmNLU(api.url + "/v1", model="m", timeout_s=5, http=api.http, reactor=reactor)
    assert await _table_through(nlu) == []
    assert (nlu.answered, nlu.fell_back) == (0, len(SENTENCES["sentences"]))
    assert len(api.seen) == len(SENTENCES["sentences"])


@pytest_twisted.ensureDeferred
async def test_llm_unreachable_leaves_the_rules_answering(api):
    """nlu = "llm" with nothing listening at its URL: the rules answer every sentence."""
    nlu = LlmNLU(await refused_url() + "/v1", model="m", timeout_s=5, http=api.http, reactor=reactor)
    assert await _table_through(nlu) == []
    assert nlu.fell_back == len(SENTENCES["sentences"])


@pytest_twisted.ensureDeferred
async def test_llm_that_hangs_leaves_the_rules_answering(api):
    """A model that never answers: after its timeout, the rules' facts (a few sentences)."""
    api.reply = HANG
    nlu = LlmNLU(api.url + "/v1", model="m", timeout_s=0.2, http=api.http, reactor=reactor)
    for case in SENTENCES["sentences"][:3]:
        facts = await on_its_own(nlu.extract(case["text"], SENTENCE_DIRECTORY))
        assert facts == _expected(case)
    for d in api.abandoned:
        await within(d)
