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
