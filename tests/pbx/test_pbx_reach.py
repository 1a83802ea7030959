"""
Reaching a person through a real Asterisk: several residents of a unit rung one after the
other or all at once, and the hand-off of the visitor's call to a human operator through the
project's own dialplan (AMI C{DBPut}, then C{DB_DELETE} and C{Dial()} after C{AudioSocket()}).

Each test asserts the call record and what the phones saw; times (the visitor's 0 to the
operator's phone ringing, a cancelled phone's hangup) are printed, never asserted.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from pbx.conftest import PROMPTS, extension, free_ports
from pbx.test_pbx_calls import EVENT_S, decide, ended, type_apartment, until

#: Short texts for the new prompts (the layer's calls last seconds).
REACH_PROMPTS = {
    **PROMPTS,
    "calling_next": "Outro morador.",
    "transferring": "Transferindo.",
    "transfer_failed": "Falhou. Até logo.",
    "late_answer": "Outro já atendeu.",
}
OPERATOR = "Local/777@pbx-phones/n"


def unit(number: str, *residents: tuple[str, str]) -> dict:
    """A directory row whose residents each have a phone of their own."""
    return {
        "apartment_number": number,
        "residents": [{"name": name, "phone": phone} for name, phone in residents],
        "voip_number": "Local/{}@pbx-phones/n".format(number),
    }


async def start(rig, rows=None, strategy="unit", operator=None, **flow):
    ai, ret = free_ports(2)
    condominium = {"dial": {"strategy": strategy}}
    if operator is not None:
        condominium["operator"] = operator
    await rig.start(
        [extension(1, "1001", ai, ret)],
        rows=rows,
        condominium=condominium,
        prompts=REACH_PROMPTS,
        **flow,
    )


def hangups(rig, prefix: str) -> list[float]:
    """Reactor times of the AMI Hangup events of channels named C{prefix}..., as they come."""
    times: list[float] = []

    def listen(message):
        if message.get("event", "").lower() == "hangup" and message.get("channel", "").startswith(
            prefix
        ):
            times.append(reactor.seconds())

    rig.ami.listeners.append(listen)
    return times


@pytest_twisted.ensureDeferred
async def test_sequential_first_busy_second_answers(rig):
    """
    sequential: the first resident's line is busy, so the second resident's phone is rung at
    once and its resident authorises; the record lists both legs and who decided.
    """
    rows = [unit("301", ("Ana", "Local/busy@pbx-phones/n"), ("Bia", "Local/302@pbx-phones/n"))]
    await start(rig, rows, strategy="sequential")
    bia = await rig.resident("302")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "301")
    await decide(rig, bia, "1")
    await ended(visitor, bia)
    (record,) = await rig.records(1)
    assert record["outcome"] == "authorized"
    assert record["reach"]["strategy"] == "sequential"
    assert [(d["resident"], d["result"]) for d in record["reach"]["dials"]] == [
        ("Ana", "busy"),
        ("Bia", "answered"),
    ]
    assert record["reach"]["decided_by"] == "Bia"
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_parallel_second_answers_first_is_cancelled(rig):
    """
    parallel: both phones ring at once; the second answers at once, the first would answer
    after 2 s of ringing. The first is cancelled (its Local channel hung up by the dialer's
    AMI Hangup) before it answers, so its phone never gets a channel nor audio; the one who
    answered decides.
    """
    rows = [unit("401", ("Primeiro", "Local/901@pbx-phones/n"), ("Segundo", "Local/402@pbx-phones/n"))]
    await start(rig, rows, strategy="parallel")
    first = await rig.resident("901")
    second = await rig.resident("402")
    first_hangups = hangups(rig, "Local/901@pbx-phones")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "401")
    await second.channel_seen.addTimeout(EVENT_S, reactor)
    answered_at = reactor.seconds()
    await until(lambda: first_hangups, what="the first phone's call cancelled")
    cancelled_after = first_hangups[0] - answered_at
    await decide(rig, second, "1")
    await ended(visitor, second)
    (record,) = await rig.records(1)
    print("\nparallel: the first phone's call hung up {:.3f} s after the second answered".format(
        cancelled_after))
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Segundo"
    results = {d["resident"]: d["result"] for d in record["reach"]["dials"]}
    assert results == {"Segundo": "answered", "Primeiro": "cancelled"}
    assert first.channel is None and first.arrivals == []
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_parallel_late_answer_hears_it_and_is_hung_up(rig):
    """
    parallel, with the PBX's cancel losing the race for sure: the test holds back the
    dialer's cancel (nothing is sent to Asterisk). The second phone answers at once and
    decides; the first answers 2 s later, and its call connects to the return port with its
    own leg UUID: it hears "outro já atendeu" (speech on its phone) and is hung up by the
    PBX when the server sends its hangup frame, before the call ends; the record lists it
    as late, the decision is the second's, and nothing is refused.
    """
    rows = [unit("401", ("Primeiro", "Local/901@pbx-phones/n"), ("Segundo", "Local/402@pbx-phones/n"))]
    await start(rig, rows, strategy="parallel")
    held = []

    def cancel(leg_uuid):
        held.append(leg_uuid)
        return defer.succeed(None)

    rig.svc.dialer.cancel = cancel
    first = await rig.resident("901")
    second = await rig.resident("402")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "401")
    await second.channel_seen.addTimeout(EVENT_S, reactor)
    answered_at = reactor.seconds()
    await first.channel_seen.addTimeout(EVENT_S, reactor)
    await until(lambda: any(first.loud), what="speech on the late phone")
    await first.hung_up.addTimeout(EVENT_S, reactor)
    late_s = reactor.seconds() - answered_at
    assert not visitor.hung_up.called and not second.hung_up.called
    await decide(rig, second, "2")
    await ended(visitor, second)
    (record,) = await rig.records(1)
    print("\nparallel: the late phone was hung up {:.3f} s after the first answer".format(late_s))
    assert len(held) == 1
    assert record["outcome"] == "denied"
    assert record["reach"]["decided_by"] == "Segundo"
    results = {d["resident"]: d["result"] for d in record["reach"]["dials"]}
    assert results == {"Segundo": "answered", "Primeiro": "late"}
    assert sum(rig.svc.manager.refused.values()) == 0
    assert rig.audiosocket_problems() == []


async def transferred_to(rig, visitor, operator):
    """The operator's phone rings and is bridged: RTP flows both ways for a second."""
    await operator.channel_seen.addTimeout(EVENT_S, reactor)
    await operator.answered.addTimeout(EVENT_S, reactor)
    bridged_at = reactor.seconds()
    await deferLater(reactor, 1.0, lambda: None)
    to_operator = sum(1 for t in operator.arrivals if t >= bridged_at)
    to_visitor = sum(1 for t in visitor.arrivals if t >= bridged_at)
    assert to_operator > 20, "the operator heard no RTP from the visitor"
    assert to_visitor > 20, "the visitor heard no RTP from the operator"
    await visitor.hangup(rig.ami)
    await ended(visitor, operator)


@pytest_twisted.ensureDeferred
async def test_keypad_0_transfers_to_the_operator(rig):
    """
    The visitor presses 0: "transferindo", the server's DBPut, its hangup frame; the
    project's dialplan reads the instruction and dials the operator, whose phone is bridged
    to the visitor (RTP arrives on both phones). The record reads transferred, keypad_0.
    """
    await start(rig, operator={"dial": OPERATOR})
    operator = await rig.resident("777")
    visitor = await rig.visitor("1001")
    await deferLater(reactor, 0.5, lambda: None)
    pressed_at = reactor.seconds()
    await visitor.press(rig.ami, "0#")
    await operator.channel_seen.addTimeout(EVENT_S, reactor)
    ringing_after = reactor.seconds() - pressed_at
    print("\noperator: the visitor's 0 to the operator's phone ringing: {:.3f} s".format(
        ringing_after))
    await transferred_to(rig, visitor, operator)
    (record,) = await rig.records(1)
    print("operator: of which the prompt and the DBPut (from the #): {} s".format(
        record["reach"]["handoff"]["handoff_s"]))
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "keypad_0"
    assert record["reach"]["handoff"]["result"] == "ok"
    # DB_DELETE took the instruction: nothing is left in AstDB.
    response = await rig.ami.action("DBGet", Family="audiosocket", Key=record["uuid"])
    assert response.get("response", "").lower() == "error"


@pytest_twisted.ensureDeferred
async def test_no_answer_goes_to_the_operator(rig):
    """on_no_answer = "operator": the resident's phone rings out, the operator takes the call."""
    await start(
        rig, operator={"dial": OPERATOR, "on_no_answer": "operator"}, attempts=1
    )
    operator = await rig.resident("777")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "202")
    await transferred_to(rig, visitor, operator)
    (record,) = await rig.records(1)
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "no_answer"
    assert record["dial_failures"] == [{"attempt": 1, "reason": "no_answer"}]
