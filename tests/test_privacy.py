"""
Nothing a caller typed or said is read back or kept verbatim by default: the log says what
kind of input came and how it ended ("visitor said 12 word(s)", "resident authorized
(voice)"), the call record keeps "voice" or "dtmf:1", and no prompt speaks the visitor's
digits or words back. C{[privacy] log_speech} / C{record_speech} turn transcripts on.

Flow tests run on the L{flowkit} bench (exact time, no sockets); the last test drives the real
server over TCP with real espeak-ng synthesis.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from audiosocket.callclient import CallOptions, place_call
from audiosocket.config import PrivacyConfig
from audiosocket.speech import factory
from audiosocket.speech.tts import EspeakTTS
from flowkit import Bench
from test_service import config_for, free_ports, started, stopped

PEDRO = "Oi, sou o Pedro da Silva, vim entregar uma encomenda para a Ana do 101"


@contextlib.contextmanager
def logged():
    """The text of every log event emitted inside the block."""
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def voice_bench(**privacy) -> Bench:
    return Bench(voice=True, privacy=PrivacyConfig(**privacy))


def authorized_by_voice(bench: Bench) -> None:
    """Pedro asks for Ana of 101 by voice; the resident says "pode subir"."""
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, PEDRO)
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    bench.say(resident, "pode subir")
    bench.until(bench.ended)


@pytest.fixture
def bench():
    b = voice_bench()
    yield b
    b.stop()


def test_default_logs_carry_no_words(bench):
    """By default the log counts the visitor's words and names the resident's input "voice"."""
    with logged() as lines:
        authorized_by_voice(bench)
    text = "\n".join(lines)
    assert "visitor said 15 word(s)" in text
    assert "resident authorized (voice)" in text
    assert "Pedro" not in text and "encomenda" not in text
    assert "pode subir" not in text


def test_default_record_keeps_only_the_kind_of_input(bench):
    """The record's decision_input is "voice", not the resident's words."""
    authorized_by_voice(bench)
    assert bench.records[0]["outcome"] == "authorized"
    assert bench.records[0]["decision_input"] == "voice"


def test_no_decision_record_keeps_only_the_kind_of_input(bench):
    """Unclear answers up to the end: the record says "voice", not what was mumbled."""
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, PEDRO)
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision"))
    for _ in range(3):
        bench.say(resident, "hmm talvez")
        bench.advance(4.0)
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "no_decision"
    assert bench.records[0]["decision_input"] == "voice"


def test_log_speech_logs_transcripts():
    """[privacy] log_speech = true: the words are logged (for debugging), the record unchanged."""
    bench = voice_bench(log_speech=True)
    try:
        with logged() as lines:
            authorized_by_voice(bench)
    finally:
        bench.stop()
    text = "\n".join(lines)
    assert "visitor said " + repr(PEDRO) in text
    assert "resident authorized (voice:pode subir)" in text
    assert bench.records[0]["decision_input"] == "voice"


def test_record_speech_keeps_the_residents_words():
    """[privacy] record_speech = true: the record keeps "voice:<words>", the log does not."""
    bench = voice_bench(record_speech=True)
    try:
        with logged() as lines:
            authorized_by_voice(bench)
    finally:
        bench.stop()
    assert bench.records[0]["decision_input"] == "voice:pode subir"
    assert "pode subir" not in "\n".join(lines)


def test_keypad_evidence_is_logged_as_the_key():
    """A key is not speech: "dtmf:1" is logged and recorded as it is."""
    bench = Bench()
    try:
        with logged() as lines:
            visitor = bench.connect()
            bench.advance(0.1)
            visitor.press("101#")
            bench.until(lambda: bench.dialer.requests)
            bench.advance(1.0)
            resident = bench.resident_for(visitor)
            bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
            resident.press("1")
            bench.until(bench.ended)
    finally:
        bench.stop()
    assert "resident authorized (dtmf:1)" in "\n".join(lines)
    assert bench.records[0]["decision_input"] == "dtmf:1"


def test_spoken_unknown_apartment_is_not_read_back(bench):
    """"Apartamento 999" by voice: "não encontrei esse apartamento", no 999 synthesized."""
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, "sou o Pedro, vim visitar o apartamento 999")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    assert not [t for t in bench.tts.texts if "999" in t]
    visitor.drop()
    bench.until(bench.ended)


def test_synthesis_failure_log_has_no_text(bench):
    """A prompt that cannot be synthesized is logged by its length, not its words."""
    bench.tts.fail = True
    with logged() as lines:
        visitor = bench.connect()
        bench.advance(1.0)
        visitor.drop()
        bench.until(bench.ended)
    text = "\n".join(lines)
    assert "cannot synthesize a prompt of" in text
    assert "Apoena" not in text


# --- the real server over TCP ------------------------------------------------------------


async def recorded(svc, within_s: float = 10.0) -> list:
    """The store's call records, once there is one (the server finishes after the hang-up)."""
    for _ in range(int(within_s / 0.1)):
        calls = await svc.store.recent_calls(10)
        if calls:
            return calls
        await deferLater(reactor, 0.1, lambda: None)
    return []


class SpyEspeak(EspeakTTS):
    """The real espeak-ng provider, noting every text it is asked to synthesize."""

    texts: list[str] = []

    def synthesize(self, text, rate):
        SpyEspeak.texts.append(text)
        return super().synthesize(text, rate)


@pytest_twisted.ensureDeferred
async def test_long_keypad_entry_over_tcp_is_never_synthesized(redis_server, tmp_path, monkeypatch):
    """
    The attack: a visitor types 29 digits and # (30 keys) on the real server. The entry is
    refused as "não entendi" without a digit of it reaching the synthesizer (before, the
    "not found" prompt read all of them back: 200 000 digits held espeak for 3.5 s and made
    117 MB of audio), and the call goes on: 101# then reaches the dialer.
    """
    SpyEspeak.texts = []
    monkeypatch.setattr(factory, "EspeakTTS", SpyEspeak)
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    digits = "12345678901234567890123456789"
    try:
        report = await defer.Deferred.fromCoroutine(
            place_call(
                CallOptions(
                    host="127.0.0.1",
                    port=ai,
                    dtmf=[(1.0, digits + "#"), (12.0, "101#")],
                    hangup_after=18.0,
                ),
                reactor,
            )
        ).addTimeout(60, reactor)
        calls = await recorded(svc)
    finally:
        await stopped(svc)
    assert report.error is None
    assert report.dtmf_sent == 34
    assert SpyEspeak.texts, "the spy saw no synthesis"
    assert not [t for t in SpyEspeak.texts if "12345" in t]
    assert svc.config.flow.max_digits == 8
    (record,) = calls
    assert record["facts"]["apartment"] == "101"  # the call went on to the resident


def test_service_shares_only_fixed_prompts_with_redis(tmp_path):
    """
    The server lets its Redis TTS cache keep the fixed prompts and the greeting actually
    spoken, and never a per-call text: an announcement or a detail naming the visitor.
    """
    from audiosocket.flow.prompts import announcement, greeting
    from audiosocket.service import makeService

    ai, ret = free_ports(2)
    svc = makeService(config_for("/nonexistent.sock", tmp_path, ai, ret), reactor=reactor)
    site = svc.sites[1]
    prompts = site.prompts
    assert svc.shared_text(greeting(prompts, site.greeting))
    assert svc.shared_text(prompts.say("not_understood"))
    assert svc.shared_text(prompts.say("unknown_apartment"))
    assert not svc.shared_text(announcement(prompts, "101", "Pedro da Silva", "entrega"))
    detail = prompts.say(
        "who_detail", visitor="Pedro da Silva", purpose=" para uma visita", resident="Ana Souza"
    )
    assert not svc.shared_text(detail)


def test_llm_answer_errors_do_not_quote_the_visitor():
    """A model's bad answer is logged by what is wrong with it, not by the words it echoed."""
    from audiosocket.flow.understand import LlmError, facts_from_answer

    for answer in (
        {"apartment": "Pedro da Silva"},
        {"intent": "Pedro da Silva"},
        {"visitor_name": ["Pedro da Silva"]},
    ):
        with pytest.raises(LlmError) as info:
            facts_from_answer(answer, None)
        assert "Pedro" not in str(info.value)


def test_an_absurd_visitor_name_is_not_announced():
    """A "name" longer than any real one (a transcript) is not read to the resident."""
    from audiosocket.flow.prompts import MAX_NAME_CHARS, Prompts, announcement

    prompts = Prompts()
    long_name = "Pedro " * (MAX_NAME_CHARS // 6 + 1)
    text = announcement(prompts, "101", long_name, None)
    assert "Pedro" not in text
    assert text == announcement(prompts, "101", None, None)
    assert "Pedro da Silva" in announcement(prompts, "101", "Pedro da Silva", None)
