"""Tests for L{audiosocket.fakepbx}: the dialer's webhook that plays Asterisk's part."""

import io

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
