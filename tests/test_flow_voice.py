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
