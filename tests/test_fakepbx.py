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
