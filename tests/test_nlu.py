"""
Tests for L{audiosocket.flow.nlu}: facts from what the visitor says, the resident's decision,
and Portuguese number words.
"""

import json

import pytest

from audiosocket.flow.directory import Directory
from audiosocket.flow.nlu import (
    ENTREGA,
    SERVICO,
    VISITA,
    Decision,
    Facts,
    classify_decision,
    classify_dtmf,
    extract_facts,
    spoken_number,
)

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

RESIDENT_ANSWERS = [
    # authorised
    ("sim", A),
    ("Sim.", A),
    ("pode", A),
    ("pode subir", A),
    ("pode entrar", A),
    ("autorizo", A),
    ("libera", A),
    ("pode liberar", A),
    ("claro", A),
    ("tá bom", A),
    ("ok", A),
    ("beleza", A),
    ("manda subir", A),
    ("deixa entrar", A),
    ("não tem problema, pode subir", A),
    ("não tem problema", A),
    ("por que não", A),
    ("claro que sim", A),
    ("com certeza", A),
    ("sim sim, pode mandar subir", A),
    ("isso, pode liberar", A),
    ("tô esperando sim, pode subir", A),
    ("Sim, é meu amigo", A),
    ("autorizo sim", A),
    ("pode, pode sim", A),
    ("é o rapaz da net? pode subir", A),
    ("quem é? ah tá, pode subir", A),
    ("pode subir, não tem problema nenhum", A),
    ("SIM PODE SUBIR", A),
    # denied
    ("não", D),
    ("nao", D),
    ("Não.", D),
    ("negativo", D),
    ("não autorizo", D),
    ("não libera", D),
    ("não pode", D),
    ("pode não", D),
    ("não, assim não", D),
    ("nem pensar", D),
    ("de jeito nenhum", D),
    ("não conheço", D),
    ("manda embora", D),
    ("não deixa", D),
    ("claro que não", D),
    ("pode mandar embora", D),
    ("não estou esperando ninguém", D),
    ("autorizo não", D),
    ("pode subir não", D),
    ("agora não, estou ocupado", D),
    ("não, obrigado", D),
    ("nunca vi", D),
    ("não é pra subir", D),
    ("quem é? não conheço ninguém com esse nome", D),
    # asks who it is / to repeat
    ("quem é?", W),
    ("quem?", W),
    ("o quê?", W),
    ("como?", W),
    ("qual o nome?", W),
    ("repete", W),
    ("não entendi", W),
    ("ahn?", W),
    ("não, quem é?", W),
    ("não sei quem é", W),
    ("o que ele quer?", W),
    ("pode repetir o nome?", W),
    ("sim? quem é?", W),
    # unclear
    ("", U),
    ("   ", U),
    ("assim", U),
    ("hmm deixa eu ver", U),
    ("sei lá", U),
    ("não, pode subir", U),
    ("sim, não", U),
    ("alô alô", U),
    ("pede pra esperar um pouco", U),
]  # fmt: skip


def test_answer_table_is_large_enough():
    """The resident table keeps at least 40 cases."""
    assert len(RESIDENT_ANSWERS) >= 40


@pytest.mark.parametrize("text, decision", [pytest.param(t, d, id=t or "<empty>") for t, d in RESIDENT_ANSWERS])
def test_classify_decision(text, decision):
    """Each answer of the resident is classified as expected."""
    assert classify_decision(text) is decision


def test_words_not_substrings():
    """"assim" contains "sim" and must not authorise: matching is on whole words."""
    assert classify_decision("assim") is Decision.UNCLEAR
    assert classify_decision("não, assim não") is Decision.DENIED


@pytest.mark.parametrize(
    "digit, decision",
    [("1", A), ("2", D), ("3", U), ("#", U), ("*", U), ("", U), (" 1 ", A), ("12", U)],
)
def test_classify_dtmf(digit, decision):
    """On the keypad 1 authorises, 2 refuses and anything else is unclear."""
    assert classify_dtmf(digit) is decision


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
