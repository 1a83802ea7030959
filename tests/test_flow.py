"""
Tests for the doorman flow (L{audiosocket.flow.call}) and the session registry, every branch
of a keypad call driven in exact time: real legs, registry, flow and audio clock on
StringTransports and a task.Clock (see L{flowkit}).
"""

from __future__ import annotations

import uuid

import attrs
import pytest

from audiosocket import wire
from audiosocket.dialer import DialFailed
from audiosocket.flow.prompts import announcement
from audiosocket.leg import VISITOR
from flowkit import EXTENSION, Bench, FakeExtensionService, start_call


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.stop()


def answer(bench, visitor):
    """The dialer was asked to ring; the resident's leg arrives with the dial's leg UUID."""
    bench.until(lambda: bench.dialer.requests)
    bench.advance(1.0)
    resident = bench.resident_for(visitor)
    return resident


def test_authorized_by_keypad(bench):
    """
    101# → the resident is dialed with the directory's dial string, joins with the same UUID,
    presses 1 → both legs hear their goodbye, each gets a hangup frame after audio, and the
    record reads authorized with apartment and resident.
    """
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(bench.ended)
    (record,) = bench.records
    assert record["outcome"] == "authorized"
    assert record["facts"]["apartment"] == "101"
    assert record["facts"]["resident"] == "Ana Souza"
    assert record["decision_input"] == "dtmf:1"
    assert record["uuid"] == str(visitor.leg.uuid)
    (request,) = bench.dialer.requests
    assert request.dial == "SIP/1101"
    assert request.uuid == str(visitor.leg.uuid)
    assert request.audiosocket == "10.0.0.2:8081"
    assert request.return_extension == "1002"
    assert bench.heard(visitor, "authorized")
    assert bench.heard(resident, "resident_authorized")
    assert visitor.hangup_after_audio and resident.hangup_after_audio
    assert record["timings"]["to_resident_s"] < record["timings"]["to_decision_s"]


def test_resident_hears_the_announcement(bench):
    """The resident is told which apartment, then asked 1 or 2."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    expected = announcement(bench.prompts, "101", None, None)
    assert bench.tts.label(expected) in resident.heard
    resident.press("2")
    bench.until(bench.ended)


def test_denied_by_keypad(bench):
    """2 denies: the visitor hears the denial; the record says denied."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("2")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "denied"
    assert bench.heard(visitor, "denied")
    assert bench.heard(resident, "resident_denied")


def test_denied_by_keypad_is_recorded_as_the_key(bench):
    """A 2 after the question is the answer taken: the record's evidence is the key."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("2")
    bench.until(bench.ended)
    assert bench.records[0]["decision_input"] == "dtmf:2"


def test_key_during_the_announcement_is_discarded(bench):
    """
    A 1 pressed while the announcement plays neither cuts it nor answers: the resident hears
    the announcement and the question whole, and only a key after the question counts.
    """
    bench.tts.frames = 50  # a one-second announcement
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    said = bench.tts.label(announcement(bench.prompts, "101", None, None))
    bench.until(lambda: said in resident.heard)
    resident.press("1")
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    assert resident.counts[said] == 50
    assert resident.counts[bench.text("ask_decision_keypad")] == 50
    assert bench.registry.describe_all()[0]["outcome"] is None
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert (record["outcome"], record["decision_input"]) == ("denied", "timeout")


def test_key_during_the_question_is_discarded(bench):
    """A 1 pressed over the question itself is not the answer either; a 1 after it is."""
    bench.tts.frames = 50
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.heard(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    assert resident.counts[bench.text("ask_decision_keypad")] == 50
    bench.advance(1.0)
    assert len(bench.records) == 0
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_silence_counts_as_denied(bench):
    """No answer within decision_timeout_s is a denial, recorded as such."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "denied"
    assert record["decision_input"] == "timeout"


def test_unclear_key_is_asked_again(bench):
    """A key other than 1 or 2 re-asks; a later 1 still authorizes."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("7")
    bench.until(lambda: bench.asked(resident, "decision_again"))
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_unclear_answers_are_bounded(bench):
    """After max_retries unclear answers the call ends without a decision (never a yes)."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    for _ in range(3):
        resident.press("9")
        bench.advance(3)
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "no_decision"
    assert bench.heard(visitor, "no_decision")


def test_unknown_apartment_asked_again_then_call_ends(bench):
    """An apartment not in the directory is asked again (bounded), then the visitor is told."""
    visitor = start_call(bench, "999#")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    visitor.press("998#")
    bench.advance(5)
    visitor.press("997#")
    bench.until(bench.ended)
    record = bench.records[0]
    assert record["outcome"] == "unknown_apartment"
    assert bench.heard(visitor, "unknown_apartment_final")
    assert bench.dialer.requests == []
    assert visitor.hangup_after_audio


def test_unknown_apartment_is_not_read_back(bench):
    """"Não encontrei esse apartamento": the number the visitor typed is never synthesized."""
    visitor = start_call(bench, "999#")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    assert not [t for t in bench.tts.texts if "999" in t]
    visitor.drop()
    bench.until(bench.ended)


def test_too_many_digits_are_not_understood_and_not_read_back(bench):
    """
    More digits than max_digits (8) make the entry invalid: the visitor hears "não entendi"
    and is asked again, no digit of it is synthesized, and the call goes on with 101#.
    """
    visitor = start_call(bench, "123456789#")
    bench.until(lambda: bench.heard(visitor, "not_understood"))
    bench.until(lambda: bench.heard(visitor, "ask_apartment_keypad"))
    assert not bench.heard(visitor, "unknown_apartment")
    assert not [t for t in bench.tts.texts if "1234" in t]
    visitor.press("101#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "101"
    visitor.drop()
    bench.until(bench.ended)


def test_max_digits_is_still_an_entry(bench):
    """Exactly max_digits digits are an apartment number like any other (here not found)."""
    visitor = start_call(bench, "12345678#")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    assert not bench.heard(visitor, "not_understood")
    visitor.drop()
    bench.until(bench.ended)


def test_max_digits_is_configurable():
    """[flow] max_digits = 3: four digits are already too many."""
    bench = Bench(max_digits=3)
    try:
        visitor = start_call(bench, "1011#")
        bench.until(lambda: bench.heard(visitor, "not_understood"))
        assert bench.dialer.requests == []
        visitor.drop()
        bench.until(bench.ended)
    finally:
        bench.stop()


def test_overflowing_entry_ends_after_a_pause(bench):
    """Too many digits without #: the entry still ends dtmf_timeout_s after the last key."""
    visitor = start_call(bench, "1" * 40)
    bench.until(lambda: bench.heard(visitor, "not_understood"), max_s=20)
    visitor.drop()
    bench.until(bench.ended)


def test_star_after_too_many_digits_starts_afresh(bench):
    """* clears an overflowing entry too: what follows it counts."""
    visitor = start_call(bench, "1234567890*101#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "101"
    assert not bench.heard(visitor, "not_understood")
    visitor.drop()
    bench.until(bench.ended)


def test_second_try_finds_the_apartment(bench):
    """A wrong number then a right one goes on to the resident."""
    visitor = start_call(bench, "999#")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    visitor.press("102#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].dial == "SIP/1102"
    visitor.drop()
    bench.until(bench.ended)


def test_digits_end_after_pause(bench):
    """Without #, the digits typed are taken dtmf_timeout_s after the last key."""
    visitor = start_call(bench, "501")
    bench.advance(2.5)
    assert bench.dialer.requests == []
    bench.until(lambda: bench.dialer.requests, max_s=5)
    assert bench.dialer.requests[0].apartment == "501"
    visitor.drop()
    bench.until(bench.ended)


def test_star_clears_the_digits(bench):
    """* throws away what was typed so far."""
    visitor = start_call(bench, "99*101#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "101"
    visitor.drop()
    bench.until(bench.ended)


def test_key_press_cuts_the_greeting(bench):
    """A visitor who types during the greeting does not have to hear it out."""
    bench.tts.frames = 100  # a 2 s greeting
    visitor = bench.connect()
    bench.advance(0.2)
    visitor.press("1")
    bench.advance(1.0)
    greeting = bench.tts.labels[bench.tts.texts[0]]
    assert 5 <= visitor.counts[greeting] <= 12
    visitor.drop()
    bench.until(bench.ended)


def test_greeting_plays_whole_without_keys(bench):
    """The same greeting, untouched, plays every frame."""
    bench.tts.frames = 100
    visitor = bench.connect()
    bench.advance(3.0)
    greeting = bench.tts.labels[bench.tts.texts[0]]
    assert visitor.counts[greeting] == 100
    visitor.drop()
    bench.until(bench.ended)


def test_no_answer_after_all_attempts(bench):
    """Nobody answers: attempts × ring timeout, then the visitor is told; the wait message plays."""
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=120)
    record = bench.records[0]
    assert record["outcome"] == "no_answer"
    assert record["attempts"] == 2
    assert len(bench.dialer.requests) == 2
    assert [f["reason"] for f in record["dial_failures"]] == ["no_answer", "no_answer"]
    assert bench.heard(visitor, "still_calling")
    assert bench.heard(visitor, "no_answer", apartment="101")


def test_dial_failure_moves_to_next_attempt_at_once(bench):
    """A busy line reported by the dialer ends that attempt without waiting out the ring."""
    bench.dialer.script = [DialFailed("busy", "line busy"), DialFailed("busy", "line busy")]
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "no_answer"
    assert [f["reason"] for f in record["dial_failures"]] == ["busy", "busy"]
    # Clock time: two busy answers end long before two 30 s ring timeouts would.
    assert record["timings"]["total_s"] < 20
    assert not bench.heard(visitor, "still_calling")


def test_late_answer_to_an_earlier_attempt_is_refused(bench):
    """
    Once an attempt is over its leg UUID is revoked: a resident leg answering the first
    attempt while the second rings is refused (unknown_uuid); the second attempt's own leg
    UUID still joins and decides.
    """
    visitor = start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == 2, max_s=60)
    first, second = (uuid.UUID(r.leg_uuid) for r in bench.dialer.requests)
    late = bench.connect("resident", first)
    assert late.leg.closed and late.leg.close_reason == "unknown_uuid"
    resident = bench.connect("resident", second)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"
    assert bench.records[0]["resident_leg_uuid"] == str(second)


def test_visitor_hangs_up_while_ringing(bench):
    """The visitor leaving while it rings ends the call as abandoned; the ringing stops."""
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    visitor.drop()
    bench.until(bench.ended, max_s=5)
    assert bench.records[0]["outcome"] == "abandoned"
    assert bench.records[0]["ended_by"] == "visitor"
    assert bench.leftovers() == []


def test_visitor_hangup_frame_while_ringing(bench):
    """
    A visitor whose PBX sends the 0x00 hangup frame (instead of closing TCP) while it rings:
    the call ends at once as abandoned by the visitor, and the server closes the connection.
    """
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    visitor.leg.dataReceived(wire.hangup())
    bench.until(bench.ended, max_s=5)
    assert bench.records[0]["outcome"] == "abandoned"
    assert bench.records[0]["ended_by"] == "visitor"
    assert visitor.lost
    assert bench.leftovers() == []


def test_visitor_hangs_up_while_resident_decides(bench):
    """The resident is told the visitor left, then hung up after hearing it."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    visitor.drop()
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "abandoned"
    assert bench.heard(resident, "visitor_left")
    assert resident.hangup_after_audio


def test_resident_hangs_up_before_deciding(bench):
    """Counted as no decision; the visitor is told."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.drop()
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "no_decision"
    assert bench.heard(visitor, "no_decision")
    assert visitor.hangup_after_audio


def test_over_max_calls_hears_busy(bench):
    """Over max_calls a new visitor hears "linhas ocupadas" and is hung up; the first call goes on."""
    bench.registry.max_calls = 1
    first = start_call(bench)
    second = bench.connect()
    bench.until(lambda: second.got_hangup)
    assert bench.heard(second, "busy")
    assert second.hangup_after_audio
    assert not first.leg.closed
    assert [r["outcome"] for r in bench.records] == ["busy"]
    first.drop()
    bench.until(lambda: len(bench.records) == 2)


def test_extension_limit_turns_visitors_away(bench):
    """A per-extension max_calls applies on top of the global one."""
    bench.service.extension = bench.service.extension.__class__(
        **{**bench.service.extension.to_dict(), "max_calls": 1}
    )
    first = start_call(bench)
    second = bench.connect()
    bench.until(lambda: second.got_hangup)
    assert bench.records[0]["outcome"] == "busy"
    first.drop()
    bench.until(lambda: len(bench.records) == 2)


def test_resident_leg_not_originated_is_refused(bench):
    """
    A resident leg with a UUID we did not dial is closed; so is one presenting the visitor's
    session UUID (before any dial, too); no session is touched.
    """
    visitor = start_call(bench, keys="")
    stranger = bench.connect("resident", uuid.uuid4())
    assert stranger.leg.closed and stranger.leg.close_reason == "unknown_uuid"
    early = bench.connect("resident", visitor.leg.uuid)
    assert early.leg.closed and early.leg.close_reason == "unknown_uuid"
    assert bench.registry.sessions[visitor.leg.uuid].resident is None
    visitor.drop()
    bench.until(bench.ended)


def test_second_visitor_leg_with_same_uuid_is_refused(bench):
    """A UUID already in a call cannot open a second visitor leg."""
    visitor = start_call(bench)
    again = bench.connect(uuid=visitor.leg.uuid)
    assert again.leg.close_reason == "uuid_in_use"
    assert not visitor.leg.closed
    visitor.drop()
    bench.until(bench.ended)


def test_second_resident_leg_is_refused(bench):
    """Once the resident joined, another resident leg with its UUID is refused."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.advance(0.1)
    again = bench.connect("resident", resident.leg.uuid)
    assert again.leg.closed and again.leg.close_reason == "uuid_in_use"
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_max_call_time_while_ringing(bench):
    """A call still ringing when max_call_s passes is ended with the time-up message."""
    bench.registry.max_call_s = 20
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=60)
    record = bench.records[0]
    assert record["ended_by"] == "max_call"
    assert record["outcome"] == "abandoned"
    assert bench.heard(visitor, "max_call")
    assert visitor.hangup_after_audio


def test_operator_hangup(bench):
    """POST …/hangup: both legs hear a short goodbye, then the hangup frame."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    done = bench.registry.hangup(str(visitor.leg.uuid))
    bench.until(bench.ended)
    assert done.called
    record = bench.records[0]
    assert record["ended_by"] == "operator"
    assert record["outcome"] == "no_decision"
    assert bench.heard(visitor, "hangup") and bench.heard(resident, "hangup")
    assert visitor.hangup_after_audio and resident.hangup_after_audio


def test_hangup_unknown_session(bench):
    """Hanging up a UUID that is not a call raises KeyError (the API's 404)."""
    with pytest.raises(KeyError):
        bench.registry.hangup(str(uuid.uuid4()))
    with pytest.raises(KeyError):
        bench.registry.hangup("not-a-uuid")


def test_nothing_remains_after_a_call(bench):
    """When a session ends: no registry entry, no DelayedCall, no queue waiter, no clock entry."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(bench.ended)
    bench.advance(0.1)
    assert len(bench.registry) == 0
    assert bench.leftovers() == []
    assert len(bench.clock) == 0
    for peer in (visitor, resident):
        assert peer.leg.events.waiting == []
        assert peer.leg.audio.waiting == []


def test_synthesis_failure_does_not_end_the_call(bench):
    """With the synthesizer broken the keypad flow still completes."""
    bench.tts.fail = True
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    resident = bench.resident_for(visitor)
    bench.advance(0.5)
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"


def test_session_is_visible_while_in_progress(bench):
    """The registry describes a call in progress: state, legs, facts."""
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    (described,) = bench.registry.describe_all()
    assert described["uuid"] == str(visitor.leg.uuid)
    assert described["state"] == "dialing"
    assert described["facts"]["apartment"] == "101"
    assert described["legs"]["visitor"]["frames_out"] > 0
    assert bench.registry.describe(str(visitor.leg.uuid)) == bench.registry.describe_all()[0]
    visitor.drop()
    bench.until(bench.ended)


def test_ten_concurrent_sessions_stay_apart(bench):
    """Ten calls at once: each resident hears its own apartment, each record its own facts."""
    apartments = ["101", "102", "501"] * 3 + ["101"]
    visitors = [start_call(bench, a + "#") for a in apartments]
    bench.until(lambda: len(bench.dialer.requests) == 10)
    by_uuid = {r.uuid: r for r in bench.dialer.requests}
    residents = [bench.resident_for(v) for v in visitors]
    for v, a in zip(visitors, apartments):
        assert by_uuid[str(v.leg.uuid)].apartment == a
    bench.until(lambda: all(bench.asked(r, "ask_decision_keypad") for r in residents))
    for i, r in enumerate(residents):
        r.press("1" if i % 2 == 0 else "2")
    bench.until(lambda: len(bench.records) == 10)
    records = {r["uuid"]: r for r in bench.records}
    for i, (v, r, a) in enumerate(zip(visitors, residents, apartments)):
        record = records[str(v.leg.uuid)]
        assert record["facts"]["apartment"] == a
        assert record["outcome"] == ("authorized" if i % 2 == 0 else "denied")
        expected = announcement(bench.prompts, a, None, None)
        assert bench.tts.label(expected) in r.heard
        others = {announcement(bench.prompts, x, None, None) for x in set(apartments) - {a}}
        assert not any(bench.tts.label(t) in r.heard for t in others)


def test_greeting_uses_the_peers_audio_kind(bench):
    """A leg that sends 16 kHz audio (kind 0x12) hears its greeting in 16 kHz frames."""
    from audiosocket import wire

    visitor = bench.connect()
    visitor.leg.dataReceived(wire.audio(bytes(640), 16000))
    data = b""
    for _ in range(10):
        bench.reactor.advance(0.02)
        visitor.leg.dataReceived(wire.audio(bytes(640), 16000))
        data += visitor.transport.value()
        visitor.transport.clear()
    kinds = {f.kind for f in wire.Decoder(expect_uuid=False).feed(data)}
    assert kinds == {wire.audio_kind(16000)}
    visitor.drop()
    bench.until(bench.ended)


def test_greeting_waits_only_briefly_for_audio(bench):
    """A peer that sends no audio still hears the greeting, 100 ms after connecting."""
    visitor = bench.connect()
    bench.advance(0.2)
    assert visitor.heard
    visitor.drop()
    bench.until(bench.ended)


def test_condominium_limit_turns_visitors_away(bench):
    """
    A condominium's max_calls (its Site, as a config reload sets it) counts the calls of all
    its extensions: with max_calls = 1, a call on a second extension of the same
    condominium is turned away while the first is in progress; once it ends, calls go in.
    """
    bench.site = attrs.evolve(bench.site, max_calls=1)
    other = bench._factory(
        VISITOR,
        service=FakeExtensionService(attrs.evolve(EXTENSION, id=8, ai_port=8090, return_port=8091)),
    )
    first = start_call(bench)
    second = bench.connect(factory=other)
    bench.until(lambda: second.got_hangup)
    assert bench.heard(second, "busy")
    assert bench.records[0]["outcome"] == "busy"
    assert not first.leg.closed
    first.drop()
    bench.until(lambda: len(bench.records) == 2)
    third = bench.connect(factory=other)
    bench.advance(1.0)
    assert not third.got_hangup and len(bench.registry) == 1
    third.drop()
    bench.until(lambda: len(bench.records) == 3)


def test_condominium_limit_leaves_other_condominiums_alone(bench):
    """
    Each condominium counts only its own calls: with max_calls = 1 for both, a call in
    progress in condominium 1 does not turn away one to condominium 2.
    """
    bench.site = attrs.evolve(bench.site, max_calls=1)
    elsewhere = bench._factory(
        VISITOR,
        service=FakeExtensionService(attrs.evolve(EXTENSION, id=9, condominium_id=2)),
    )
    first = start_call(bench)
    second = bench.connect(factory=elsewhere)
    bench.advance(1.0)
    assert not second.got_hangup
    assert len(bench.registry) == 2
    first.drop()
    second.drop()
    bench.until(lambda: len(bench.records) == 2)
    assert "busy" not in [r["outcome"] for r in bench.records]


# ---------------------------------------------------------------- near numbers by keypad


def test_near_number_typed_is_confirmed_with_1(bench):
    """
    51# is one digit short of 501: the visitor hears "Apartamento 501, correto?", presses 1,
    and 501 is called.
    """
    visitor = start_call(bench, "51#")
    bench.until(lambda: bench.asked(visitor, "confirm_apartment", apartment="501"))
    assert bench.dialer.requests == []
    visitor.press("1")
    bench.until(lambda: bench.dialer.requests)
    (request,) = bench.dialer.requests
    assert request.apartment == "501"
    assert request.dial == "SIP/1501"
    visitor.drop()
    bench.until(bench.ended)
    assert bench.records[0]["facts"]["apartment"] == "501"


def test_near_number_typed_is_denied_with_2(bench):
    """
    51#, "Apartamento 501, correto?", 2: nobody is called, the visitor is told the apartment
    was not found and asked again (without the number read back).
    """
    visitor = start_call(bench, "51#")
    bench.until(lambda: bench.asked(visitor, "confirm_apartment", apartment="501"))
    visitor.press("2")
    bench.until(lambda: bench.heard(visitor, "unknown_apartment"))
    bench.advance(2.0)
    assert bench.dialer.requests == []
    visitor.drop()
    bench.until(bench.ended)
    assert bench.records[0]["facts"].get("apartment") is None


def test_near_number_typed_is_confirmed_by_saying_sim():
    """51#, "Apartamento 501, correto?", the visitor says "sim": 501 is called."""
    b = Bench(voice=True)
    try:
        visitor = start_call(b, "51#")
        b.until(lambda: b.asked(visitor, "confirm_apartment", apartment="501"))
        b.say(visitor, "sim")
        b.until(lambda: b.dialer.requests)
        (request,) = b.dialer.requests
        assert request.apartment == "501"
        visitor.drop()
        b.until(b.ended)
    finally:
        b.stop()


def test_hangup_during_goodbye_lets_it_play_out(bench):
    """An operator hangup (or the time limit) arriving during the goodbyes does not cut them."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(lambda: bench.heard(visitor, "authorized"))
    bench.until(lambda: bench.heard(visitor, "goodbye"))
    bench.registry.hangup(str(visitor.leg.uuid))
    bench.until(bench.ended)
    record = bench.records[0]
    assert record["outcome"] == "authorized" and record["ended_by"] == "server"
    assert bench.heard(resident, "resident_authorized")
    assert visitor.hangup_after_audio and resident.hangup_after_audio


def test_visitor_hanging_up_while_ringing_cancels_the_dial(bench):
    """
    The visitor leaving while the resident's phone rings makes the flow cancel that dial by
    its leg UUID (so the PBX stops ringing), once.
    """
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    (request,) = bench.dialer.requests
    assert bench.dialer.cancels == []
    visitor.drop()
    bench.until(bench.ended, max_s=5)
    assert bench.dialer.cancels == [request.leg_uuid]


def test_an_attempt_timing_out_is_cancelled_before_the_next(bench):
    """
    Attempt 1's ring window passes: its dial is cancelled before attempt 2 is dialed, and
    attempt 2's when it passes too.
    """
    cancelled_at_dial = []
    bench.dialer.on_dial = lambda request: cancelled_at_dial.append(list(bench.dialer.cancels))
    start_call(bench)
    bench.until(bench.ended, max_s=120)
    first, second = bench.dialer.requests
    assert cancelled_at_dial == [[], [first.leg_uuid]]
    assert bench.dialer.cancels == [first.leg_uuid, second.leg_uuid]


def test_a_failed_attempt_is_cancelled_too(bench):
    """A dial the dialer reported busy is cancelled all the same (cancel is idempotent)."""
    bench.dialer.script = [DialFailed("busy", "line busy"), DialFailed("busy", "line busy")]
    start_call(bench)
    bench.until(bench.ended, max_s=30)
    assert bench.dialer.cancels == [r.leg_uuid for r in bench.dialer.requests]


def test_the_attempt_the_resident_joins_is_not_cancelled(bench):
    """The dial whose leg joined is never cancelled, during the call or after it."""
    visitor = start_call(bench)
    resident = answer(bench, visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "authorized"
    assert bench.dialer.cancels == []


def test_call_ended_from_outside_while_ringing_cancels_the_dial(bench):
    """Max call time passing while it rings cancels the outstanding dial."""
    bench.registry.max_call_s = 20
    start_call(bench)
    bench.until(bench.ended, max_s=60)
    assert bench.records[0]["ended_by"] == "max_call"
    assert bench.dialer.cancels == [bench.dialer.requests[-1].leg_uuid]


def test_a_dialer_cancel_that_fails_does_not_fail_the_call(bench):
    """A dialer whose cancel raises is logged; the call still ends as it would."""

    def broken(leg_uuid):
        raise RuntimeError("PBX gone")

    bench.dialer.cancel = broken
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    visitor.drop()
    bench.until(bench.ended, max_s=5)
    assert bench.records[0]["outcome"] == "abandoned"
    assert bench.leftovers() == []


def test_when_started_fires_with_the_next_call(bench):
    """
    registry.when_started() fires with the session of the next call to start (turned-away
    ones too), and at once for a UUID already in progress.
    """
    first = bench.registry.when_started()
    assert not first.called
    visitor = bench.connect()
    assert first.result is bench.registry.sessions[visitor.leg.uuid]
    assert bench.registry.when_started(visitor.leg.uuid).result is first.result
    other = uuid.uuid4()
    waiting = bench.registry.when_started(other)
    bench.connect()
    assert not waiting.called
    bench.connect(uuid=other)
    assert waiting.result.uuid == other
    for peer in bench.peers:
        peer.drop()
    bench.until(lambda: len(bench.records) == 3)


def test_a_call_closed_unfinished_raises_nothing(bench):
    """
    A call's coroutine closed while it waits (its Deferred dropped unfired, as at interpreter
    exit) ends quietly: nothing is awaited any more, so Python does not report "coroutine
    ignored GeneratorExit".
    """
    from twisted.internet import defer

    coroutines = []

    def run_flow(session):
        coroutines.append(bench.flow._run(session))
        return defer.Deferred.fromCoroutine(coroutines[-1])

    bench.registry._run_flow = run_flow
    start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    coroutines[0].close()  # raised RuntimeError before
