"""
Tests for reaching a person (L{audiosocket.flow.call}): several residents per unit with
phones of their own (the directory's format), the C{sequential} and C{parallel} dial
strategies, and the hand-off to a human operator, every branch driven in exact time on the
flow bench (L{flowkit}).
"""

from __future__ import annotations

import uuid

import attrs
import pytest
from twisted.internet import defer

from audiosocket.config import OperatorConfig
from audiosocket.dialer import DialFailed, HandoffFailed
from audiosocket import session as S
from audiosocket.flow import call as flow_call
from audiosocket.flow.directory import Apartment, Directory, DirectoryError
from audiosocket.flow.nlu import asks_for_person
from audiosocket.leg import RESIDENT
from flowkit import Bench, ScriptedDialer, start_call

#: 101: Ana and Carlos with phones of their own, Bia at the apartment's phone.
UNIT = Directory(
    [
        Apartment(
            "101",
            ("Ana Souza", "Carlos Souza", "Bia Souza"),
            "SIP/1101",
            phones=(("Ana Souza", "SIP/ana"), ("Carlos Souza", "SIP/carlos")),
        ),
        Apartment("102", ("João Pereira",), "SIP/1102"),
    ]
)
OPERATOR = "PJSIP/portaria"


#: The scripted dialer takes hand-offs (C{handoff_result}: None, an exception or "never").
HandoffDialer = ScriptedDialer


def make_bench(strategy="unit", operator=None, voice=False, **flow):
    bench = Bench(dialer=HandoffDialer(), voice=voice, **flow)
    bench.site = attrs.evolve(
        bench.site, directory=UNIT, strategy=strategy, operator=operator or OperatorConfig()
    )
    return bench


@pytest.fixture
def benches():
    made = []

    def make(*args, **kwargs):
        bench = make_bench(*args, **kwargs)
        made.append(bench)
        return bench

    yield make
    for bench in made:
        bench.stop()


def join(bench, request):
    """The PBX connects the answered call of C{request} to the return port."""
    return bench.connect(RESIDENT, uuid.UUID(request.leg_uuid))


def decide(bench, resident, key="1"):
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press(key)
    bench.until(bench.ended)
    return bench.records[0]


# --- the directory ----------------------------------------------------------------------------


def test_directory_residents_with_phones():
    """A resident item may be {"name", "phone"}; plain names stay valid beside them."""
    directory = Directory.from_data(
        [
            {
                "apartment_number": "101",
                "residents": ["Bia", {"name": "Ana", "phone": "PJSIP/ana"}],
                "voip_number": "SIP/1101",
            }
        ]
    )
    apartment = directory.apartment("101")
    assert apartment.residents == ("Bia", "Ana")
    assert apartment.phone_of("Ana") == "PJSIP/ana"
    assert apartment.phone_of("Bia") == "SIP/1101"


def test_targets_named_resident_first_and_distinct():
    """targets() lists each phone once, the named resident's first, then in order."""
    apartment = UNIT.apartment("101")
    assert apartment.targets("Bia Souza") == [
        ("Bia Souza", "SIP/1101"),
        ("Ana Souza", "SIP/ana"),
        ("Carlos Souza", "SIP/carlos"),
    ]
    assert apartment.targets(None)[0] == ("Ana Souza", "SIP/ana")
    shared = Apartment("7", ("A", "B"), "SIP/7")
    assert shared.targets(None) == [("A", "SIP/7")]


@pytest.mark.parametrize(
    "resident, words",
    [
        ({"name": "Ana", "phone": "SIP/a,30"}, "comma"),
        ({"name": "Ana", "phone": "SIP/a\r\nAction: Hangup"}, "line break"),
        ({"name": "Ana", "phone": ""}, "non-empty"),
        ({"name": "Ana", "fone": "SIP/a"}, "unknown key 'fone'"),
        ({"phone": "SIP/a"}, "non-empty name"),
    ],
)
def test_directory_refuses_bad_resident_phones(resident, words):
    """A resident's phone must be a dial string without commas or line breaks."""
    data = [{"apartment_number": "1", "residents": [resident], "voip_number": "SIP/1"}]
    with pytest.raises(DirectoryError, match=words):
        Directory.from_data(data)


def test_directory_refuses_voip_number_with_comma():
    """The apartment's own dial string is held to the same rule."""
    data = [{"apartment_number": "1", "residents": ["A"], "voip_number": "SIP/1,,tT"}]
    with pytest.raises(DirectoryError, match="voip_number"):
        Directory.from_data(data)


# --- strategies -------------------------------------------------------------------------------


def test_unit_strategy_rings_the_apartment_only(benches):
    """unit (the default): one dial, the apartment's voip_number, as before."""
    bench = benches()
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    (request,) = bench.dialer.requests
    assert request.dial == "SIP/1101"
    record = decide(bench, join(bench, request))
    assert record["outcome"] == "authorized"
    assert record["reach"]["strategy"] == "unit"
    assert record["reach"]["dials"] == [
        {"attempt": 1, "resident": "Ana Souza", "dial": "SIP/1101", "result": "answered"}
    ]
    assert visitor.got_hangup


def test_sequential_busy_moves_on_at_once(benches):
    """
    sequential: the first phone busy → the next is dialed at once (a fresh leg UUID), the
    visitor hears "chamando outro morador", and the second resident decides.
    """
    bench = benches("sequential")
    bench.dialer.script = [DialFailed("busy", "line busy")]
    visitor = start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == 2, max_s=5)
    first, second = bench.dialer.requests
    assert (first.dial, second.dial) == ("SIP/ana", "SIP/carlos")
    assert first.leg_uuid != second.leg_uuid
    assert second.resident == "Carlos Souza"
    record = decide(bench, join(bench, second))
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Carlos Souza"
    assert [d["result"] for d in record["reach"]["dials"]] == ["busy", "answered"]
    assert bench.heard(visitor, "calling_next")
    assert first.leg_uuid in bench.dialer.cancels


def test_sequential_no_answer_rings_each_for_the_ring_timeout(benches):
    """Nobody answers: each phone rings ring_timeout_s, every attempt goes round them all."""
    bench = benches("sequential", attempts=1, ring_timeout_s=10)
    start_call(bench)
    bench.until(bench.ended, max_s=120)
    record = bench.records[0]
    assert record["outcome"] == "no_answer"
    assert [r.dial for r in bench.dialer.requests] == ["SIP/ana", "SIP/carlos", "SIP/1101"]
    assert [d["result"] for d in record["reach"]["dials"]] == ["no_answer"] * 3
    # Three windows of 10 s + the grace, not one.
    assert record["timings"]["total_s"] > 30


def test_sequential_named_resident_first(benches):
    """The resident the visitor named is tried first."""
    bench = benches("sequential", voice=True)
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, "Quero falar com a Bia Souza do apartamento 101")
    bench.until(lambda: bench.dialer.requests, max_s=30)
    assert bench.dialer.requests[0].dial == "SIP/1101"
    assert bench.dialer.requests[0].resident == "Bia Souza"
    visitor.drop()
    bench.until(bench.ended)


def test_parallel_first_to_answer_decides_others_cancelled(benches):
    """
    parallel: every phone rings at once, each with its own leg UUID; the second answers first
    and decides; the others are cancelled at that moment.
    """
    bench = benches("parallel")
    start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == 3, max_s=5)
    requests = bench.dialer.requests
    assert len({r.leg_uuid for r in requests}) == 3
    assert [r.dial for r in requests] == ["SIP/ana", "SIP/carlos", "SIP/1101"]
    resident = join(bench, requests[1])
    bench.advance(0.02)
    assert set(bench.dialer.cancels) == {requests[0].leg_uuid, requests[2].leg_uuid}
    record = decide(bench, resident)
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Carlos Souza"
    results = {d["resident"]: d["result"] for d in record["reach"]["dials"]}
    assert results == {"Carlos Souza": "answered", "Ana Souza": "cancelled", "Bia Souza": "cancelled"}


# --- a late answer in parallel ----------------------------------------------------------------


def parallel_answered(bench):
    """A parallel call whose second phone (Carlos) answered; returns (requests, resident)."""
    before = len(bench.dialer.requests)
    start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == before + 3, max_s=5)
    requests = bench.dialer.requests[before:]
    resident = join(bench, requests[1])
    bench.advance(0.02)
    return requests, resident


def test_parallel_late_answer_is_told_and_hung_up(benches):
    """
    parallel: Carlos answers first; Ana's phone, answered in the race, connects with its own
    leg UUID: it hears "outro morador já atendeu" once and then the hangup frame, within
    LATE_MAX_S, and nothing else (no announcement, no question). It is not refused (no
    refusal counted), and the record lists Ana's dial as late.
    """
    bench = benches("parallel")
    requests, resident = parallel_answered(bench)
    late = join(bench, requests[0])
    assert not late.leg.closed
    session = next(iter(bench.registry.sessions.values()))
    assert session.resident is resident.leg and session.late_legs == [late.leg]
    bench.until(lambda: late.lost, max_s=S.LATE_MAX_S)
    assert late.heard == [bench.text("late_answer")]
    assert late.hangup_after_audio is True
    assert not bench.heard(late, "ask_decision_keypad")
    assert sum(bench.ret.refused.values()) == 0
    record = decide(bench, resident)
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Carlos Souza"
    results = {d["resident"]: d["result"] for d in record["reach"]["dials"]}
    assert results == {"Carlos Souza": "answered", "Ana Souza": "late", "Bia Souza": "cancelled"}
    assert sum(bench.ret.refused.values()) == 0


def test_parallel_late_answer_cannot_decide(benches):
    """
    A late leg's keys go nowhere: Ana presses 1 while and after hearing "outro morador já
    atendeu"; the call's decision is Carlos's (2: denied), and only Carlos was asked.
    """
    bench = benches("parallel")
    requests, resident = parallel_answered(bench)
    late = join(bench, requests[0])
    late.press("1")
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    late.press("1#")
    resident.press("2")
    bench.until(bench.ended)
    record = bench.records[0]
    assert record["outcome"] == "denied"
    assert record["decision_input"] == "dtmf:2"
    assert record["resident_leg_uuid"] == requests[1].leg_uuid
    assert late.heard == [bench.text("late_answer")]


def test_parallel_late_leg_uuid_is_single_use(benches):
    """
    The same late leg UUID presented twice: the first hears late_answer, the second leg
    (once the first is gone) is refused (unknown_uuid) and hears nothing.
    """
    bench = benches("parallel")
    requests, resident = parallel_answered(bench)
    first = join(bench, requests[0])
    bench.until(lambda: first.lost, max_s=S.LATE_MAX_S)
    assert first.heard == [bench.text("late_answer")] and first.leg.close_reason is None
    again = join(bench, requests[0])
    assert again.leg.closed and again.leg.close_reason == "unknown_uuid"
    assert bench.ret.refused["unknown_uuid"] == 1
    decide(bench, resident)


def test_parallel_late_path_admits_no_other_uuid(benches):
    """
    While a call has late leg UUIDs, a leg UUID of another call that has ended and a UUID
    never issued are refused (unknown_uuid), as is the visitor's session UUID.
    """
    bench = benches("parallel")
    visitor = start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == 3, max_s=5)
    old = list(bench.dialer.requests)
    visitor.drop()
    bench.until(bench.ended)
    requests, resident = parallel_answered(bench)
    assert not {r.leg_uuid for r in requests} & {r.leg_uuid for r in old}
    session = next(iter(bench.registry.sessions.values()))
    for leg_uuid in [uuid.UUID(old[0].leg_uuid), uuid.uuid4(), session.uuid]:
        refused = bench.connect(RESIDENT, leg_uuid)
        assert refused.leg.closed and refused.leg.close_reason == "unknown_uuid"
    assert bench.ret.refused["unknown_uuid"] == 3
    assert session.late_legs == []
    resident.press("2")
    bench.until(lambda: len(bench.records) == 2)


def test_parallel_late_answer_after_the_call_is_refused(benches):
    """
    Once the call is over, its late leg UUIDs are gone with it: Bia's phone connecting
    then is refused (unknown_uuid), and no route or DelayedCall is left.
    """
    bench = benches("parallel")
    requests, resident = parallel_answered(bench)
    record = decide(bench, resident)
    assert record["outcome"] == "authorized"
    assert bench.registry.leg_uuids == {}
    assert bench.leftovers() == []
    late = join(bench, requests[2])
    assert late.leg.closed and late.leg.close_reason == "unknown_uuid"


def test_parallel_late_answer_still_open_closes_with_the_call(benches):
    """
    A late leg joining as the call ends (the resident decides at once) is closed with the
    call at the latest: no leg, route or DelayedCall is left.
    """
    bench = benches("parallel")
    requests, resident = parallel_answered(bench)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    late = join(bench, requests[0])
    resident.press("1")
    bench.until(bench.ended)
    assert late.lost
    assert bench.records[0]["outcome"] == "authorized"
    assert bench.registry.leg_uuids == {}
    assert bench.leftovers() == []


def test_parallel_all_fail_ends_the_attempt_at_once(benches):
    """Every phone busy: the attempt is over at once, without waiting out the ring."""
    bench = benches("parallel", attempts=1)
    bench.dialer.script = [DialFailed("busy", "b")] * 3
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "no_answer"
    assert [d["result"] for d in record["reach"]["dials"]] == ["busy"] * 3
    assert record["timings"]["total_s"] < 20
    assert bench.heard(visitor, "no_answer", apartment="101")


def test_parallel_one_fails_others_still_ring(benches):
    """One phone failing does not end the attempt while another still rings."""
    bench = benches("parallel")
    bench.dialer.script = [DialFailed("congestion", "c")]
    start_call(bench)
    bench.until(lambda: len(bench.dialer.requests) == 3, max_s=5)
    bench.advance(5.0)
    record = decide(bench, join(bench, bench.dialer.requests[2]))
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Bia Souza"


# --- the operator -----------------------------------------------------------------------------


def operator(**choices):
    return OperatorConfig(dial=OPERATOR, **choices)


def test_keypad_0_transfers(benches):
    """0# at the apartment question: "vou transferir", the hand-off, then the hangup frame."""
    bench = benches(operator=operator())
    visitor = start_call(bench, "0#")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "keypad_0"
    assert record["reach"]["handoff"]["result"] == "ok"
    assert bench.dialer.handoffs == [(str(visitor.leg.uuid), "transfer", OPERATOR)]
    assert bench.heard(visitor, "transferring")
    assert not bench.heard(visitor, "goodbye")
    assert visitor.hangup_after_audio
    assert not bench.dialer.requests


def test_keypad_0_without_operator_is_an_apartment(benches):
    """Without an operator, 0 is only an (unknown) apartment number."""
    bench = benches()
    visitor = start_call(bench, "0#")
    bench.advance(1.0)
    assert bench.heard(visitor, "unknown_apartment")
    visitor.drop()
    bench.until(bench.ended)
    assert not bench.dialer.handoffs


def test_keypad_0_while_ringing_transfers_and_cancels(benches):
    """0 while the resident's phone rings: the dial is cancelled and the call transferred."""
    bench = benches(operator=operator())
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    bench.advance(2.0)
    visitor.press("0")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "keypad_0"
    assert bench.dialer.cancels == [bench.dialer.requests[0].leg_uuid]
    assert record["reach"]["dials"][0]["result"] == "cancelled"


def test_asking_for_a_person_transfers(benches):
    """ "Quero falar com o porteiro" → the operator."""
    bench = benches(operator=operator(), voice=True)
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, "Boa tarde, quero falar com o porteiro")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "asked"


def test_asking_for_a_person_at_a_confirmation_transfers(benches):
    """Asked "É para ...?", the visitor answers "quero falar com uma pessoa": the operator."""
    bench = benches(operator=operator(), voice=True)
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, "Quero falar com a Ana Sousa")
    bench.until(lambda: bench.heard(visitor, "confirm_resident", resident="Ana Souza", apartment="101"))
    bench.say(visitor, "quero falar com uma pessoa")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "asked"


def test_recognition_failing_twice_transfers(benches):
    """Two answers without an apartment or a resident → the operator."""
    bench = benches(operator=operator(), voice=True)
    visitor = bench.connect()
    bench.advance(0.5)
    bench.say(visitor, "Boa tarde, é uma entrega")
    bench.until(lambda: bench.heard(visitor, "ask_apartment"))
    bench.say(visitor, "é uma entrega mesmo")
    bench.until(bench.ended, max_s=60)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "recognition_failed"


def test_no_answer_goes_to_operator_when_configured(benches):
    """on_no_answer = "operator": nobody answered → transferred, reason no_answer."""
    bench = benches(operator=operator(on_no_answer="operator"), attempts=1)
    bench.dialer.script = [DialFailed("busy", "b")]
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "no_answer"
    assert not bench.heard(visitor, "no_answer", apartment="101")


def test_no_answer_says_goodbye_by_default(benches):
    """With an operator but on_no_answer = "goodbye": the old ending."""
    bench = benches(operator=operator(), attempts=1)
    bench.dialer.script = [DialFailed("busy", "b")]
    visitor = start_call(bench)
    bench.until(bench.ended, max_s=30)
    assert bench.records[0]["outcome"] == "no_answer"
    assert bench.heard(visitor, "no_answer", apartment="101")
    assert not bench.dialer.handoffs


def test_unknown_apartment_goes_to_operator_when_configured(benches):
    """on_unknown_apartment = "operator": the apartment never found → transferred."""
    bench = benches(operator=operator(on_unknown_apartment="operator"), max_retries=0)
    visitor = start_call(bench, "999#")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "unknown_apartment"
    assert not bench.heard(visitor, "unknown_apartment_final")


def test_handoff_failure_is_told_and_recorded(benches):
    """The PBX refuses the hand-off: the visitor hears so; outcome transfer_failed."""
    bench = benches(operator=operator())
    bench.dialer.handoff_result = HandoffFailed("Permission denied")
    visitor = start_call(bench, "0#")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transfer_failed"
    assert record["reach"]["handoff"]["result"] == "failed"
    assert "Permission denied" in record["reach"]["handoff"]["error"]
    assert bench.heard(visitor, "transfer_failed")
    assert visitor.hangup_after_audio


def test_handoff_timeout_is_bounded(benches):
    """A hand-off never acknowledged: given up after HANDOFF_TIMEOUT_S, then goodbye."""
    bench = benches(operator=operator())
    bench.dialer.handoff_result = "never"
    visitor = start_call(bench, "0#")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "transfer_failed"
    assert record["reach"]["handoff"]["error"] == "no answer within {} s".format(
        flow_call.HANDOFF_TIMEOUT_S
    )
    assert bench.heard(visitor, "transfer_failed")
    assert not bench.leftovers()


def test_handoff_completes_before_the_hangup_frame(benches):
    """The hangup frame is sent only once the hand-off has been acknowledged."""
    bench = benches(operator=operator())
    pending = defer.Deferred()
    bench.dialer.handoff = lambda *args: pending
    visitor = start_call(bench, "0#")
    bench.advance(2.0)  # "vou transferir" has played; the hand-off is within its bound
    assert bench.heard(visitor, "transferring")
    assert not visitor.got_hangup
    pending.callback(None)
    bench.until(bench.ended, max_s=10)
    assert visitor.got_hangup
    assert bench.records[0]["outcome"] == "transferred"


# --- asking for a person (nlu) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, asks",
    [
        ("quero falar com o porteiro", True),
        ("Atendente, por favor", True),
        ("preciso falar com uma pessoa", True),
        ("tem um ser humano aí?", True),
        ("estou na portaria", False),
        ("não quero atendente", False),
        ("apartamento 101", False),
        ("entrega para a Ana", False),
    ],
)
def test_asks_for_person(text, asks):
    """asks_for_person finds a request for a human, not the word portaria alone."""
    assert asks_for_person(text) is asks
