"""
Calls through a real Asterisk: the project's own dialplan (etc/asterisk/extensions.conf), the
server's AMI dialer originating the resident's call, phones over UnicastRTP and keys pressed
as Asterisk receives them from a phone. Each test asserts the call record and what each leg's
phone saw; the RTP figures are reported in the terminal summary, never asserted.
"""

from __future__ import annotations


import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from pbx.conftest import extension, free_ports
from test_service_extensions import api_url, request

#: Generous bounds on events (not timing assertions): a call here lasts a few seconds.
EVENT_S = 60


async def until(predicate, timeout: float = EVENT_S, what: str = "condition"):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("{} not reached in {} s".format(what, timeout))


async def hears_speech(phone):
    """Wait until the phone has heard some speech from the server."""
    await phone.channel_seen.addTimeout(EVENT_S, reactor)
    await until(lambda: any(phone.loud), what="speech on " + phone.name)


async def asked(phone, quiet_s: float = 1.0):
    """
    Wait until the phone has heard speech and then C{quiet_s} of silence: the announcement
    and the question have played out (keys and words before that are not an answer).
    """
    await hears_speech(phone)
    packets = int(quiet_s / 0.02)
    await until(
        lambda: len(phone.loud) >= packets and not any(phone.loud[-packets:]),
        what="the question played out on " + phone.name,
    )


async def decide(rig, phone, digit: str):
    """The resident hears the question out and presses C{digit}."""
    await asked(phone)
    await phone.press(rig.ami, digit)


async def type_apartment(rig, visitor, apartment: str):
    await deferLater(reactor, 0.5, lambda: None)
    await visitor.press(rig.ami, apartment + "#")


async def ended(*phones):
    await defer.gatherResults([p.hung_up for p in phones]).addTimeout(EVENT_S, reactor)


@pytest_twisted.ensureDeferred
async def test_authorized(rig):
    """
    The visitor types 101#, the AMI dialer rings apartment 101 through the dialplan, the
    resident presses 1: the record reads authorized by dtmf:1, both phones heard speech and
    were hung up by the PBX when the server ended the call.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    resident = await rig.resident("101")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "101")
    await decide(rig, resident, "1")
    await ended(visitor, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "authorized"
    assert record["facts"]["apartment"] == "101"
    assert record["facts"]["resident"] == "Morador 101"
    assert record["decision_input"] == "dtmf:1"
    assert record["attempts"] == 1 and record["dial_failures"] == []
    assert record["ended_by"] == "server"
    assert visitor.hung_up_by == "pbx" and resident.hung_up_by == "pbx"
    assert any(visitor.loud) and any(resident.loud)
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_denied(rig):
    """The resident presses 2: the record reads denied by dtmf:2; the PBX hangs up both."""
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    resident = await rig.resident("102")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "102")
    await decide(rig, resident, "2")
    await ended(visitor, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "denied"
    assert record["facts"]["apartment"] == "102"
    assert record["decision_input"] == "dtmf:2"
    assert visitor.hung_up_by == "pbx" and resident.hung_up_by == "pbx"
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_resident_busy(rig):
    """
    The resident's line is busy (its Local channel runs Busy()): Asterisk's
    OriginateResponse fails with reason 5, the flow tries again, and the call ends as
    no_answer with both attempts recorded as busy.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "201")
    await ended(visitor)
    (record,) = await rig.records(1)
    assert record["outcome"] == "no_answer"
    assert record["attempts"] == 2
    assert record["dial_failures"] == [
        {"attempt": 1, "reason": "busy"},
        {"attempt": 2, "reason": "busy"},
    ]
    assert visitor.hung_up_by == "pbx" and any(visitor.loud)
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_no_answer(rig):
    """
    The resident's phone rings and nobody answers: each attempt ends after the ring timeout,
    the call ends as no_answer, and Asterisk is left with no ringing channel.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "202")
    await ended(visitor)
    (record,) = await rig.records(1)
    assert record["outcome"] == "no_answer"
    assert record["attempts"] == 2
    assert [f["reason"] for f in record["dial_failures"]] == ["no_answer", "no_answer"]
    assert visitor.hung_up_by == "pbx"
    left = None
    for _ in range(100):
        left = [c for c in await rig.channels() if "noanswer" in c]
        if not left:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert left == []
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_resident_hangs_up_before_deciding(rig):
    """
    The resident hangs up while the question plays: the call ends as no_decision, ended by
    the resident, and the visitor is told and hung up by the PBX.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    resident = await rig.resident("103")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "103")
    await hears_speech(resident)
    await resident.hangup(rig.ami)
    await ended(visitor, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "no_decision"
    assert record["ended_by"] == "resident"
    assert resident.hung_up_by == "phone" and visitor.hung_up_by == "pbx"
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_visitor_hangs_up_while_it_rings(rig):
    """
    The visitor hangs up while the resident's phone rings (it would answer 2 s after ringing
    starts): the call is recorded as abandoned by the visitor, and the server cancels the
    dial: the AMI dialer hangs up the channel it originated, so every channel of that dial
    (the Local pair ringing the phone) is soon gone from Asterisk, the phone never answers
    and no resident leg ever reaches the server.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)])
    resident = await rig.resident("901")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "901")
    # Ringing: the dialer's Local channel exists, the phone is not answered yet.
    await until(lambda: rig.local_channels("901@pbx-phones"), what="resident ringing")
    assert resident.channel is None
    await visitor.hangup(rig.ami)
    await ended(visitor)
    (record,) = await rig.records(1)
    assert record["outcome"] == "abandoned"
    assert record["ended_by"] == "visitor"
    # Asterisk's own view (core show channels, over AMI): the dial's channels are gone. Had
    # the ringing gone on, they would only go once the phone had answered (and its leg been
    # refused by the server).
    for _ in range(int(EVENT_S / 0.1)):
        if not [c for c in await rig.channels() if "901@pbx-phones" in c]:
            break
        await deferLater(reactor, 0.1, lambda: None)
    else:
        raise AssertionError("the ringing dial's channels are still in Asterisk")
    assert resident.channel is None  # the phone never answered: nothing Dial()ed it
    assert not [c for c in await rig.channels() if c.startswith(resident.prefix)]
    assert sum(rig.svc.manager.refused.values()) == 0  # no resident leg reached the server
    assert rig.svc.dialer.pending == 0
    assert rig.audiosocket_problems() == []


@pytest_twisted.ensureDeferred
async def test_ten_concurrent_calls_on_two_extensions(rig):
    """
    Ten visitors at once, alternating between two AI extensions, each calling a different
    apartment whose resident presses 1 or 2: ten records, each with its own extension,
    apartment and its own resident's key; every phone heard speech and was hung up by the
    PBX (no frame or fact crossed to another call).
    """
    a_ai, a_ret, b_ai, b_ret = free_ports(4)
    await rig.start([extension(1, "1001", a_ai, a_ret), extension(2, "1003", b_ai, b_ret)])
    plan = []
    for i in range(10):
        apartment = str(101 + i)
        ai_extension, ext_id = ("1001", 1) if i % 2 == 0 else ("1003", 2)
        digit = "1" if i % 3 else "2"
        plan.append((apartment, ai_extension, ext_id, digit))

    async def one(apartment, ai_extension, digit):
        resident = await rig.resident(apartment)
        visitor = await rig.visitor(ai_extension, "visitor " + apartment)
        await type_apartment(rig, visitor, apartment)
        await decide(rig, resident, digit)
        await ended(visitor, resident)
        return visitor, resident

    calls = []
    for apartment, ai_extension, _, digit in plan:
        calls.append(defer.Deferred.fromCoroutine(one(apartment, ai_extension, digit)))
        await deferLater(reactor, 0.2, lambda: None)
    legs = await defer.gatherResults(calls, consumeErrors=True).addTimeout(120, reactor)
    records = {r["facts"]["apartment"]: r for r in await rig.records(10)}
    assert sorted(records) == sorted(p[0] for p in plan)
    for apartment, _, ext_id, digit in plan:
        record = records[apartment]
        assert record["extension_id"] == ext_id, record
        assert record["facts"]["resident"] == "Morador " + apartment, record
        assert record["decision_input"] == "dtmf:" + digit, record
        assert record["outcome"] == ("authorized" if digit == "1" else "denied"), record
    assert len({r["uuid"] for r in records.values()}) == 10
    for visitor, resident in legs:
        assert visitor.hung_up_by == "pbx" and resident.hung_up_by == "pbx"
        assert any(visitor.loud) and any(resident.loud)
    assert rig.audiosocket_problems() == []


async def api(rig, method: str, path: str, body=None):
    return await request(method, api_url(rig.svc, path), body)


@pytest_twisted.ensureDeferred
async def test_extension_changed_while_a_call_runs(rig):
    """
    While a resident decides, the call's extension moves to new ports (PUT) and a second one
    is added (POST): the running call still ends authorized, the audio clock skipped no frame
    during the change, and new calls through the moved and the added extension both work
    (the resident legs come back on the new return ports).
    """
    ai, ret, new_ai, new_ret, b_ai, b_ret = free_ports(6)
    await rig.start([extension(1, "1001", ai, ret)])
    resident = await rig.resident("101")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "101")
    await hears_speech(resident)
    clock = rig.svc.clock
    skipped = clock.skipped_frames
    code, body = await api(rig, "PUT", "/api/extensions/1", extension(1, "1001", new_ai, new_ret))
    assert code == 200, body
    code, body = await api(rig, "POST", "/api/extensions", extension(2, "1003", b_ai, b_ret))
    assert code == 201, body
    # The change is applied; the live call did not lose a frame to it.
    assert clock.skipped_frames == skipped
    await decide(rig, resident, "1")
    await ended(visitor, resident)
    (first,) = await rig.records(1)
    assert first["outcome"] == "authorized" and first["extension_id"] == 1

    # The dialplan follows the API (as a deployment would with "dialplan set global").
    await rig.route("1001", new_ai)
    await rig.route("1003", b_ai)

    async def one(ai_extension, apartment):
        r = await rig.resident(apartment)
        v = await rig.visitor(ai_extension, "visitor " + apartment)
        await type_apartment(rig, v, apartment)
        await decide(rig, r, "1")
        await ended(v, r)

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(one("1001", "102")),
         defer.Deferred.fromCoroutine(one("1003", "103"))],
        consumeErrors=True,
    ).addTimeout(EVENT_S, reactor)
    records = {r["facts"]["apartment"]: r for r in await rig.records(3)}
    assert records["102"]["outcome"] == "authorized" and records["102"]["extension_id"] == 1
    assert records["103"]["outcome"] == "authorized" and records["103"]["extension_id"] == 2
    assert rig.audiosocket_problems() == []
