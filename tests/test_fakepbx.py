"""Tests for L{audiosocket.fakepbx}: the dialer's webhook that plays Asterisk's part."""

import io
import json
import uuid

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor

from audiosocket.fakepbx import Webhook


@pytest_twisted.ensureDeferred
async def test_bad_request_is_a_400_and_places_no_call():
    """A body that is not the dialer's request gets 400 with a JSON error; nothing is dialed."""
    hook = Webhook(reactor, out=io.StringIO())
    response = await StubTreq(hook).post("http://pbx/", data=b'{"uuid": "x"}')
    assert response.code == 400
    assert (await response.json())["error"] == "bad_request"
    assert hook.calls == [] and hook.requests == []


@pytest_twisted.ensureDeferred
async def test_resident_leg_connects_with_the_leg_uuid():
    """
    Like Asterisk's dialplan, the fake PBX connects the resident's leg with the request's
    leg_uuid (the dial's credential), not the visitor's session uuid.
    """
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from audiosocket import wire

    class ReturnPort(protocol.Protocol):
        """Keeps the first frame (the UUID) and hangs up."""

        def __init__(self):
            self.decoder = wire.Decoder()

        def dataReceived(self, data):
            for frame in self.decoder.feed(data):
                if frame.kind == wire.Kind.UUID and not heard.called:
                    heard.callback(wire.parse_uuid(frame))
                    self.transport.loseConnection()

    heard = defer.Deferred()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(ReturnPort)
    )
    session_uuid, leg_uuid = uuid.uuid4(), uuid.uuid4()
    out = io.StringIO()
    hook = Webhook(reactor, seconds=10, out=out)
    try:
        body = {
            "uuid": str(session_uuid),
            "leg_uuid": str(leg_uuid),
            "dial": "SIP/1101",
            "apartment": "101",
            "resident": "Ana Souza",
            "extension_id": 1,
            "return_extension": "1002",
            "audiosocket": "127.0.0.1:{}".format(port.getHost().port),
            "timeout_s": 30.0,
        }
        response = await StubTreq(hook).post("http://pbx/", data=json.dumps(body).encode())
        assert response.code == 200
        presented = await heard.addTimeout(10, reactor)
        await defer.gatherResults(hook.calls).addTimeout(10, reactor)
    finally:
        await port.stopListening()
    assert presented == leg_uuid
    assert str(leg_uuid) in out.getvalue()


def _body(port, leg_uuid):
    return {
        "uuid": str(uuid.uuid4()),
        "leg_uuid": str(leg_uuid),
        "dial": "SIP/1101",
        "apartment": "101",
        "resident": "Ana Souza",
        "extension_id": 1,
        "return_extension": "1002",
        "audiosocket": "127.0.0.1:{}".format(port),
        "timeout_s": 30.0,
    }


async def _return_port():
    """A return port that counts connections and keeps each one's UUID and close."""
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from audiosocket import wire

    seen = {"connections": 0, "uuids": defer.DeferredQueue(), "closed": defer.DeferredQueue()}

    class ReturnPort(protocol.Protocol):
        def connectionMade(self):
            seen["connections"] += 1
            self.decoder = wire.Decoder()

        def dataReceived(self, data):
            for frame in self.decoder.feed(data):
                if frame.kind == wire.Kind.UUID:
                    seen["uuids"].put(wire.parse_uuid(frame))

        def connectionLost(self, reason):
            seen["closed"].put(None)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(ReturnPort)
    )
    return port, seen


@pytest_twisted.ensureDeferred
async def test_cancel_while_ringing_never_connects():
    """
    A cancel for a leg still ringing (C{ring_s}) stops it: the resident never answers,
    nothing connects to the return port, and the call's Deferred fires L{None}.
    """
    port, seen = await _return_port()
    leg_uuid = uuid.uuid4()
    hook = Webhook(reactor, ring_s=5.0, out=io.StringIO())
    stub = StubTreq(hook)
    try:
        body = _body(port.getHost().port, leg_uuid)
        assert (await stub.post("http://pbx/", data=json.dumps(body).encode())).code == 200
        cancel = {"event": "cancel", "uuid": body["uuid"], "leg_uuid": str(leg_uuid)}
        response = await stub.post("http://pbx/", data=json.dumps(cancel).encode())
        assert response.code == 200
        (call,) = hook.calls
        assert await call.addTimeout(10, reactor) is None
    finally:
        await port.stopListening()
    assert seen["connections"] == 0
    assert hook.cancels == [cancel]


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_connected_leg_hangs_it_up():
    """A cancel for a leg already connected closes it (the resident's call is hung up)."""
    port, seen = await _return_port()
    leg_uuid = uuid.uuid4()
    hook = Webhook(reactor, seconds=60, out=io.StringIO())
    stub = StubTreq(hook)
    try:
        body = _body(port.getHost().port, leg_uuid)
        await stub.post("http://pbx/", data=json.dumps(body).encode())
        assert await seen["uuids"].get().addTimeout(10, reactor) == leg_uuid
        cancel = {"event": "cancel", "uuid": body["uuid"], "leg_uuid": str(leg_uuid)}
        assert (await stub.post("http://pbx/", data=json.dumps(cancel).encode())).code == 200
        (call,) = hook.calls
        report = await call.addTimeout(10, reactor)
        await seen["closed"].get().addTimeout(10, reactor)
    finally:
        await port.stopListening()
    assert report.hung_up_by == "client"


@pytest_twisted.ensureDeferred
async def test_cancel_of_an_unknown_leg_is_a_200():
    """Cancel is idempotent: a leg it never rang (or already cancelled) is answered 200."""
    hook = Webhook(reactor, out=io.StringIO())
    cancel = {"event": "cancel", "uuid": str(uuid.uuid4()), "leg_uuid": str(uuid.uuid4())}
    response = await StubTreq(hook).post("http://pbx/", data=json.dumps(cancel).encode())
    assert response.code == 200
    assert hook.calls == []


# -- several residents and the operator ----------------------------------------------------------


def test_phone_spec_parses_each_behaviour():
    """--phone SPEC items: busy, noanswer, ring:S, dtmf:S:DIGITS, seconds:S."""
    import pytest

    from audiosocket.fakepbx import PhoneSpec

    assert PhoneSpec.parse("busy").busy
    assert not PhoneSpec.parse("noanswer").answer
    spec = PhoneSpec.parse("ring:3,dtmf:2:1,seconds:20")
    assert (spec.ring_s, spec.dtmf, spec.seconds) == (3.0, ((2.0, "1"),), 20.0)
    for bad in ("ringing", "dtmf:2", "ring:x"):
        with pytest.raises(ValueError):
            PhoneSpec.parse(bad)


@pytest_twisted.ensureDeferred
async def test_busy_phone_fails_the_dial_as_busy():
    """A busy phone: HTTP 486 with reason busy, which the http dialer reports as busy."""
    import pytest

    from audiosocket.dialer import DialFailed, DialRequest, HttpDialer
    from audiosocket.fakepbx import PhoneSpec

    hook = Webhook(reactor, phones={"SIP/ana": PhoneSpec(busy=True)}, out=io.StringIO())
    dialer = HttpDialer("http://pbx/", treq_client=StubTreq(hook))
    body = _body(9, uuid.uuid4())
    body["dial"] = "SIP/ana"
    with pytest.raises(DialFailed) as info:
        await dialer.dial(DialRequest(**body))
    assert info.value.reason == "busy"
    assert hook.calls == []


@pytest_twisted.ensureDeferred
async def test_unanswered_phone_rings_until_the_timeout_and_never_connects():
    """noanswer: accepted, rings for the request's timeout_s, never connects."""
    from audiosocket.fakepbx import PhoneSpec

    port, seen = await _return_port()
    hook = Webhook(reactor, phones={"SIP/ana": PhoneSpec(answer=False)}, out=io.StringIO())
    try:
        body = _body(port.getHost().port, uuid.uuid4())
        body.update(dial="SIP/ana", timeout_s=0.2)
        response = await StubTreq(hook).post("http://pbx/", data=json.dumps(body).encode())
        assert response.code == 200
        (call,) = hook.calls
        assert await call.addTimeout(10, reactor) is None
    finally:
        await port.stopListening()
    assert seen["connections"] == 0


@pytest_twisted.ensureDeferred
async def test_operator_takes_the_transfer_event():
    """The transfer (and open) hand-off is answered 200 and kept; --refuse-handoff: 403."""
    import pytest

    from audiosocket.dialer import HandoffFailed, HttpDialer

    out = io.StringIO()
    hook = Webhook(reactor, out=out)
    call = str(uuid.uuid4())
    dialer = HttpDialer("http://pbx/", treq_client=StubTreq(hook))
    assert await dialer.handoff(call, "transfer", "PJSIP/portaria") is None
    assert hook.handoffs == [{"event": "transfer", "uuid": call, "dial": "PJSIP/portaria"}]
    assert "transferring call {} to the operator at PJSIP/portaria".format(call) in out.getvalue()
    refusing = Webhook(reactor, refuse_handoff=True, out=io.StringIO())
    dialer = HttpDialer("http://pbx/", treq_client=StubTreq(refusing))
    with pytest.raises(HandoffFailed):
        await dialer.handoff(call, "transfer", "PJSIP/portaria")
    assert refusing.handoffs == []


def _whole_call_config(redis_path, tmp_path, ai, ret, url, condominium):
    from audiosocket.config import parse_config

    directory = tmp_path / "apartments.json"
    directory.write_text(json.dumps([{
        "apartment_number": "101",
        "residents": [
            {"name": "Ana Souza", "phone": "SIP/ana"},
            {"name": "Carlos Souza", "phone": "SIP/carlos"},
        ],
        "voip_number": "SIP/1101",
    }]))
    data = {
        "server": {"bind": "127.0.0.1", "state_dir": str(tmp_path / "var")},
        "api": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "redis": {"url": "unix://" + redis_path},
        "flow": {"ring_timeout_s": 10, "attempts": 1, "dtmf_timeout_s": 1.0},
        "dialer": {"kind": "http", "url": url},
        "condominiums": [{"id": 1, "name": "Apoena", "directory": str(directory), **condominium}],
        "extensions": [{
            "id": 1, "ai_extension": "1001", "ai_port": ai, "return_extension": "1002",
            "return_port": ret, "host": "127.0.0.1", "condominium_id": 1,
        }],
    }
    return parse_config(data, str(tmp_path / "audiosocket.toml"))


@pytest_twisted.ensureDeferred
async def test_whole_sequential_call_without_a_pbx(redis_server, tmp_path):
    """
    A whole multi-resident call against the fake PBX: Ana's phone is busy, so Carlos's is
    rung at once; Carlos presses 1: authorized, decided by Carlos, both legs listed.
    """
    from test_service import PRESSES_1, call, finished, free_ports, started, stopped
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web import server

    from audiosocket.fakepbx import PhoneSpec

    phones = {"SIP/ana": PhoneSpec(busy=True), "SIP/carlos": PhoneSpec(dtmf=tuple(PRESSES_1))}
    hook = Webhook(reactor, phones=phones, seconds=40, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(hook))
    url = "http://127.0.0.1:{}/dial".format(web.getHost().port)
    ai, ret = free_ports(2)
    config = _whole_call_config(
        redis_server.path, tmp_path, ai, ret, url, {"dial": {"strategy": "sequential"}}
    )
    svc = await started(config)
    try:
        await call(ai, 60, dtmf=[(1.0, "101#")]).addTimeout(60, reactor)
        await defer.gatherResults(hook.calls).addTimeout(30, reactor)
        await finished(svc)
        (record,) = await svc.store.recent_calls(10)
    finally:
        await stopped(svc)
        await web.stopListening()
    assert [r["dial"] for r in hook.requests] == ["SIP/ana", "SIP/carlos"]
    assert record["outcome"] == "authorized"
    assert record["reach"]["decided_by"] == "Carlos Souza"
    assert [d["result"] for d in record["reach"]["dials"]] == ["busy", "answered"]


@pytest_twisted.ensureDeferred
async def test_whole_operator_call_without_a_pbx(redis_server, tmp_path):
    """The visitor presses 0: the fake PBX takes the transfer; the record reads transferred."""
    from test_service import call, finished, free_ports, started, stopped
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web import server

    hook = Webhook(reactor, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(hook))
    url = "http://127.0.0.1:{}/dial".format(web.getHost().port)
    ai, ret = free_ports(2)
    config = _whole_call_config(
        redis_server.path, tmp_path, ai, ret, url, {"operator": {"dial": "PJSIP/portaria"}}
    )
    svc = await started(config)
    try:
        visitor = await call(ai, 60, dtmf=[(1.0, "0#")]).addTimeout(60, reactor)
        await finished(svc)
        (record,) = await svc.store.recent_calls(10)
    finally:
        await stopped(svc)
        await web.stopListening()
    assert hook.handoffs == [{"event": "transfer", "uuid": visitor.uuid, "dial": "PJSIP/portaria"}]
    assert hook.requests == []
    assert record["outcome"] == "transferred"
    assert record["reach"]["handoff"]["reason"] == "keypad_0"
    assert visitor.hung_up_by == "server"
