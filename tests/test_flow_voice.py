"""
Tests for the doorman flow by voice: utterances (as the endpointer delivers them) are
transcribed by a scripted recognizer and understood by the real rules NLU; the keypad stays
available and is the fallback when recognition fails.
"""

from __future__ import annotations

import pytest

from pathlib import Path

import attrs

from audiosocket.flow.directory import Directory
from audiosocket.flow.prompts import announcement
from flowkit import Bench

ETC = Path(__file__).resolve().parent.parent / "etc"

PEDRO = "Oi, sou o Pedro da Silva, vim entregar uma encomenda para a Ana do 101"


@pytest.fixture
def bench():
    b = Bench(voice=True)
    yield b
    b.stop()


def visitor_says(bench, text):
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, text)
    return visitor


def resident_joins(bench, visitor):
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    return resident


def test_one_sentence_gives_every_fact(bench):
    """
    "Sou o Pedro da Silva, vim entregar uma encomenda para a Ana do 101": the resident of 101
    is called and hears who and why; "pode subir" authorizes; the record has every fact.
    """
    visitor = visitor_says(bench, PEDRO)
    resident = resident_joins(bench, visitor)
    expected = announcement(bench.prompts, "101", "Pedro da Silva", "entrega")
    assert bench.tts.label(expected) in resident.heard
    bench.say(resident, "pode subir")
    bench.until(bench.ended)
    record = bench.records[0]
    assert record["outcome"] == "authorized"
    assert record["facts"] == {
        "intent": "entrega",
        "visitor_name": "Pedro da Silva",
        "apartment": "101",
        "resident": "Ana Souza",
    }
    assert record["decision_input"] == "voice"  # the words only with [privacy] record_speech
    assert bench.dialer.requests[0].resident == "Ana Souza"


def test_nao_assim_nao_is_denied(bench):
    """The original authorized "não, assim não" (it contains "sim"); here it is a denial."""
    visitor = visitor_says(bench, PEDRO)
    resident = resident_joins(bench, visitor)
    bench.say(resident, "não, assim não")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "denied"
    assert bench.records[0]["decision_input"] == "voice"
    assert bench.heard(visitor, "denied")


def test_who_is_it_gets_the_detail_then_asks_again(bench):
    """"Quem é?" is answered with who and why, then the question again."""
    visitor = visitor_says(bench, PEDRO)
    resident = resident_joins(bench, visitor)
    bench.say(resident, "quem é?")
    detail = bench.prompts.say(
        "who_detail", visitor="Pedro da Silva", purpose=" com uma entrega", resident="Ana Souza"
    )
    bench.until(lambda: bench.tts.label(detail) in resident.heard)
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    bench.say(resident, "sim")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_speech_during_the_announcement_is_discarded(bench):
    """
    The resident picks up and says "pode subir" over the announcement: it does not cut the
    announcement and is not the answer (the question had not been asked); silence after
    the question is a denial by timeout.
    """
    bench.tts.frames = 50
    visitor = visitor_says(bench, PEDRO)
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    said = bench.tts.label(announcement(bench.prompts, "101", "Pedro da Silva", "entrega"))
    bench.until(lambda: said in resident.heard)
    assert bench.listeners[resident.leg].settings.barge_in is False
    bench.say(resident, "pode subir")
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    assert resident.counts[said] == 50
    assert bench.listeners[resident.leg].settings.barge_in is True
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert (record["outcome"], record["decision_input"]) == ("denied", "timeout")
    assert "pode subir" not in bench.stt.heard


def test_speech_during_the_question_is_discarded(bench):
    """"Sim" said over the question is dropped; "sim" after it authorizes."""
    bench.tts.frames = 50
    visitor = visitor_says(bench, PEDRO)
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.heard(resident, "ask_decision"))
    bench.say(resident, "sim, pode subir")
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    bench.advance(1.0)
    assert bench.records == [] and bench.stt.heard == [PEDRO]
    bench.say(resident, "sim")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"
    assert bench.stt.heard == [PEDRO, "sim"]


def test_hello_go_ahead_after_the_question_is_asked_who(bench):
    """
    "Alô? Pode falar" after the question is someone who has not heard it: the detail and
    the question are said again, never an authorization.
    """
    visitor = visitor_says(bench, PEDRO)
    resident = resident_joins(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    bench.say(resident, "Alô? Pode falar")
    detail = bench.prompts.say(
        "who_detail", visitor="Pedro da Silva", purpose=" com uma entrega", resident="Ana Souza"
    )
    bench.until(lambda: bench.tts.label(detail) in resident.heard)
    bench.until(bench.ended, max_s=30)
    assert bench.records[0]["outcome"] == "denied"


@pytest.mark.parametrize("reply", ["Pode deixar na portaria", "Sim, mas só amanhã", "Num pode"])
def test_reply_that_is_not_a_plain_yes_never_authorizes(bench, reply):
    """Asked again (or refused), then ended without an authorization."""
    visitor = visitor_says(bench, PEDRO)
    resident = resident_joins(bench, visitor)

    def deciding():
        calls = bench.registry.describe_all()
        return bool(calls) and calls[0]["outcome"] is None

    replies = 0
    while deciding():
        # The resident gives the same reply each time a question has been heard out.
        bench.until(lambda: not resident.leg.playing or not deciding())
        if deciding():
            bench.say(resident, reply)
            replies += 1
            bench.advance(0.5)
    bench.until(bench.ended, max_s=60)
    assert bench.records[0]["outcome"] in ("denied", "no_decision")
    assert replies <= bench.config.max_retries + 1


def test_near_apartment_is_confirmed_by_voice(bench):
    """"Apartamento 51" is near 501: "isso" confirms it and 501 is called."""
    visitor = visitor_says(bench, "sou o Pedro da Silva, entrega para o apartamento 51")
    bench.until(lambda: bench.heard(visitor, "confirm_apartment", apartment="501"))
    bench.until(lambda: bench.asked(visitor, "confirm_apartment", apartment="501"))
    bench.say(visitor, "isso")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "501"
    visitor.drop()
    bench.until(bench.ended)


def test_near_apartment_not_confirmed_by_a_question(bench):
    """"Isso?" does not confirm: the apartment is not taken and nobody is called."""
    visitor = visitor_says(bench, "sou o Pedro da Silva, entrega para o apartamento 51")
    bench.until(lambda: bench.asked(visitor, "confirm_apartment", apartment="501"))
    bench.say(visitor, "isso?")
    bench.until(lambda: bench.heard(visitor, "ask_apartment"))
    assert bench.dialer.requests == []
    visitor.drop()
    bench.until(bench.ended)


def test_missing_apartment_is_asked_for(bench):
    """Only the purpose said: the apartment is asked for; "cento e um" is understood."""
    visitor = visitor_says(bench, "é uma entrega")
    bench.until(lambda: bench.heard(visitor, "ask_apartment"))
    bench.say(visitor, "cento e um")
    bench.until(lambda: bench.heard(visitor, "ask_name"))
    bench.say(visitor, "Marcos Vieira")
    bench.until(lambda: bench.dialer.requests)
    facts = bench.registry.describe_all()[0]["facts"]
    assert facts["apartment"] == "101"
    assert facts["intent"] == "entrega"
    assert facts["visitor_name"] == "Marcos Vieira"
    visitor.drop()
    bench.until(bench.ended)


def test_resident_name_alone_finds_the_apartment(bench):
    """"Quero falar com a Fernanda" finds apartment 201 through the directory."""
    bench.site = attrs.evolve(bench.site, directory=Directory.load(ETC / "apartments.json"))
    visitor = visitor_says(bench, "sou a Paula, quero falar com a Fernanda")
    bench.until(lambda: bench.dialer.requests, max_s=60)
    assert bench.dialer.requests[0].apartment == "201"
    visitor.drop()
    bench.until(bench.ended)


def test_recognition_failure_falls_back_to_the_keypad(bench):
    """With the recognizer down the visitor is invited to type, and the call goes on."""
    bench.stt.fail = True
    visitor = visitor_says(bench, PEDRO)
    bench.until(lambda: bench.heard(visitor, "use_keypad"))
    visitor.press("101#")
    bench.until(lambda: bench.dialer.requests)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad") or bench.asked(resident, "ask_decision"))
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_keypad_still_works_in_voice_mode(bench):
    """A visitor who types rather than speaks is served the same."""
    visitor = bench.connect()
    bench.advance(0.5)
    visitor.press("102#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "102"
    visitor.drop()
    bench.until(bench.ended)


def test_resident_silence_is_denied(bench):
    """Silence past the decision timeout is a denial, by voice too."""
    visitor = visitor_says(bench, PEDRO)
    resident_joins(bench, visitor)
    bench.until(bench.ended, max_s=40)
    assert bench.records[0]["outcome"] == "denied"
    assert bench.records[0]["decision_input"] == "timeout"


def test_greeting_can_be_protected_from_barge_in(bench):
    """With barge_in_greeting = false the greeting plays whole; barge-in is back after it."""
    bench.site = attrs.evolve(bench.site, audio=attrs.evolve(bench.site.audio, barge_in_greeting=False))
    bench.tts.frames = 50
    visitor = bench.connect()
    bench.advance(0.3)
    listener = bench.listeners[visitor.leg]
    assert visitor.leg.playing and listener.settings.barge_in is False
    bench.advance(1.0)
    assert not visitor.leg.playing and listener.settings.barge_in is True
    visitor.drop()
    bench.until(bench.ended)


def test_condominium_audio_overrides_reach_the_listener(tmp_path):
    """[condominiums.audio] settings are the ones the calls of that condominium listen with."""
    from audiosocket.config import parse_config
    from audiosocket.service import build_sites

    config = parse_config(
        {
            "audio": {"visitor_silence_ms": 700},
            "condominiums": [
                {"id": 1, "name": "A", "directory": str(ETC / "apartments.json"),
                 "audio": {"visitor_silence_ms": 1200, "barge_in": False}},
                {"id": 2, "name": "B", "directory": str(ETC / "apartments.json")},
            ],
        },
        tmp_path / "x.toml",
    )
    sites = build_sites(config)
    assert (sites[1].audio.visitor_silence_ms, sites[1].audio.barge_in) == (1200, False)
    assert (sites[2].audio.visitor_silence_ms, sites[2].audio.barge_in) == (700, True)


# -- understanding more from one sentence: fewer questions ------------------------------------

#: The bench's directory with a second "Ana" (in 502) and a Fernanda, for names that need
#: confirming.
TWO_ANAS = Directory.from_data(
    [
        {"apartment_number": "101", "residents": ["Ana Souza", "Carlos Souza"], "voip_number": "SIP/1101"},
        {"apartment_number": "102", "residents": ["João Pereira"], "voip_number": "SIP/1102"},
        {"apartment_number": "201", "residents": ["Fernanda Souza"], "voip_number": "SIP/1201"},
        {"apartment_number": "502", "residents": ["Ana Lima"], "voip_number": "SIP/1502"},
        {"apartment_number": "B12", "residents": ["Roberto Nunes"], "voip_number": "SIP/2012"},
    ]
)  # fmt: skip
VISITOR_QUESTIONS = (
    "ask_apartment", "ask_name", "ask_intent", "ask_name_intent", "not_understood",
    "unknown_apartment",
)  # fmt: skip


def questions_heard(bench, visitor) -> list[str]:
    """The visitor-side questions (and confirmations) the visitor has heard, by name."""
    names = [n for n in VISITOR_QUESTIONS if bench.heard(visitor, n)]
    labels = {bench.tts.labels.get(t): t for t in bench.tts.texts}
    names += [labels[v] for v in visitor.heard if labels.get(v, "").startswith(("É para", "Apartamento"))]
    return names


@pytest.fixture
def anas(bench):
    bench.site = attrs.evolve(bench.site, directory=TWO_ANAS)
    return bench


def test_resident_named_alone_is_not_asked_for_the_apartment(anas):
    """
    "Encomenda dos Correios pra Fernanda Souza, sou o Pedro": the directory knows where she
    lives; 201 is called with no question at all.
    """
    bench = anas
    visitor = visitor_says(bench, "Encomenda dos Correios pra Fernanda Souza, sou o Pedro")
    bench.until(lambda: bench.dialer.requests)
    request = bench.dialer.requests[0]
    assert (request.apartment, request.resident) == ("201", "Fernanda Souza")
    assert questions_heard(bench, visitor) == []
    visitor.drop()
    bench.until(bench.ended)


def test_single_resident_apartment_is_not_asked_for_whom(anas):
    """
    "Pacote da Amazon pro 102, aqui é o Pedro": 102 has one resident, who is the one the
    dial and the announcement name; nothing is asked.
    """
    bench = anas
    visitor = visitor_says(bench, "pacote da amazon pro cento e dois aqui é o pedro")
    resident = resident_joins(bench, visitor)
    assert bench.dialer.requests[0].resident == "João Pereira"
    assert questions_heard(bench, visitor) == []
    bench.say(resident, "pode subir")
    bench.until(bench.ended)
    assert bench.records[0]["facts"] == {
        "intent": "entrega", "visitor_name": "Pedro", "apartment": "102", "resident": "João Pereira",
    }  # fmt: skip


def test_name_after_the_apartment_and_block(anas):
    """"Entrega pro doze do bloco b, pro Roberto, sou a Ana": the directory's B12 is called."""
    bench = anas
    visitor = visitor_says(bench, "entrega pro doze do bloco b pro roberto sou a ana")
    bench.until(lambda: bench.dialer.requests)
    assert (bench.dialer.requests[0].apartment, bench.dialer.requests[0].resident) == ("B12", "Roberto Nunes")
    assert questions_heard(bench, visitor) == []
    visitor.drop()
    bench.until(bench.ended)


def test_ambiguous_name_confirmed_yes_calls_that_apartment(anas):
    """
    "Entrega pra Ana": two apartments have an Ana; the visitor is asked about the likeliest
    with the directory's name and number ("É para Ana Souza, do 101?"); "isso" calls 101.
    """
    bench = anas
    visitor = visitor_says(bench, "sou o Pedro, entrega pra ana")
    bench.until(lambda: bench.asked(visitor, "confirm_resident", resident="Ana Souza", apartment="101"))
    assert bench.dialer.requests == []
    bench.say(visitor, "isso")
    bench.until(lambda: bench.dialer.requests)
    assert (bench.dialer.requests[0].apartment, bench.dialer.requests[0].resident) == ("101", "Ana Souza")
    assert not bench.heard(visitor, "ask_apartment")
    visitor.drop()
    bench.until(bench.ended)


def test_ambiguous_name_confirmed_by_key_1(anas):
    """The confirmation takes key 1 as well as a spoken yes."""
    bench = anas
    visitor = visitor_says(bench, "sou o Pedro, entrega pra ana")
    bench.until(lambda: bench.asked(visitor, "confirm_resident", resident="Ana Souza", apartment="101"))
    visitor.press("1")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "101"
    visitor.drop()
    bench.until(bench.ended)


def test_ambiguous_name_denied_asks_for_the_apartment(anas):
    """
    "Não" to "É para Ana Souza, do 101?" asks for the apartment (not "não entendi");
    "quinhentos e dois" then calls Ana Lima's 502.
    """
    bench = anas
    visitor = visitor_says(bench, "sou o Pedro, entrega pra ana")
    bench.until(lambda: bench.asked(visitor, "confirm_resident", resident="Ana Souza", apartment="101"))
    bench.say(visitor, "não")
    bench.until(lambda: bench.asked(visitor, "ask_apartment"))
    assert bench.dialer.requests == []
    assert not bench.heard(visitor, "not_understood")
    bench.say(visitor, "quinhentos e dois")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "502"
    visitor.drop()
    bench.until(bench.ended)


def test_approximate_name_is_confirmed_with_the_directory_spelling(anas):
    """
    "Fernando" is close to the directory's Fernanda Souza, not the same: the visitor hears
    "É para Fernanda Souza, do 201?" — the directory's words; the words heard are never read
    back.
    """
    bench = anas
    visitor = visitor_says(bench, "sou o Pedro, entrega pra Fernando")
    bench.until(lambda: bench.asked(visitor, "confirm_resident", resident="Fernanda Souza", apartment="201"))
    assert not any("Fernando" in t for t in bench.tts.texts)
    bench.say(visitor, "sim")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "201"
    visitor.drop()
    bench.until(bench.ended)


def test_name_and_purpose_missing_are_one_question(anas):
    """
    Only the apartment said: name and purpose are asked in one question, and "Pedro Santos,
    entrega" answers both.
    """
    bench = anas
    visitor = visitor_says(bench, "cento e dois")
    bench.until(lambda: bench.asked(visitor, "ask_name_intent"))
    bench.say(visitor, "Pedro Santos, entrega")
    bench.until(lambda: bench.dialer.requests)
    facts = bench.registry.describe_all()[0]["facts"]
    assert (facts["visitor_name"], facts["intent"]) == ("Pedro Santos", "entrega")
    assert questions_heard(bench, visitor) == ["ask_name_intent"]
    visitor.drop()
    bench.until(bench.ended)


def test_only_the_missing_fact_is_asked(anas):
    """The name said, the purpose not: only "É uma visita, uma entrega ou um serviço?"."""
    bench = anas
    visitor = visitor_says(bench, "é o Pedro pro cento e dois")
    bench.until(lambda: bench.asked(visitor, "ask_intent"))
    bench.say(visitor, "visita")
    bench.until(lambda: bench.dialer.requests)
    assert questions_heard(bench, visitor) == ["ask_intent"]
    visitor.drop()
    bench.until(bench.ended)


def test_unknown_apartment_with_a_known_name_confirms_the_name(anas):
    """
    "Entrega pra Fernanda do 210": no 210, but Fernanda Souza lives in 201 — the visitor
    is asked "É para Fernanda Souza, do 201?" (the number heard is never read back).
    """
    bench = anas
    visitor = visitor_says(bench, "sou o Pedro, entrega pra Fernanda do 210")
    bench.until(lambda: bench.asked(visitor, "confirm_resident", resident="Fernanda Souza", apartment="201"))
    assert not any("210" in t for t in bench.tts.texts)
    bench.say(visitor, "isso mesmo")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "201"
    visitor.drop()
    bench.until(bench.ended)
