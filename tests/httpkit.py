"""
A real local HTTP server speaking a provider's API, for the provider tests: it records each
request (path, headers, body) and answers as the test scripted, including never (L{HANG});
and L{Tracking}, a factory wrapper that tells when every server-side connection has closed.
"""

from __future__ import annotations
import json
import attrs
import numpy as np
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from audiosocket import audio
from audiosocket.speech.stt import STTError

TIMEOUT_S = 5


@attrs.frozen
class Seen:
    """One request the fake API received."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


@attrs.frozen
class Reply:
    code: int = 200
    body: bytes = b""
    content_type: str = "application/json"


#: Never answer: the request stays open until the client gives up.
HANG = object()


class _API(Resource):
    isLeaf = True

    def __init__(self, fake: FakeAPI):
        super().__init__()
        self._fake = fake

    def render_POST(self, request):
        self._fake.seen.append(
            Seen(
                method=request.method.decode(),
                path=request.uri.decode(),
                headers={
                    k.decode().lower(): v[-1].decode("latin-1")
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                body=request.content.read(),
            )
        )
        reply = self._fake.reply
        if reply is HANG:
            d = request.notifyFinish()
            self._fake.abandoned.append(d)
            d.addErrback(lambda _: None)
            return NOT_DONE_YET
        request.setResponseCode(reply.code)
        request.setHeader(b"content-type", reply.content_type.encode())
        return reply.body


class _Channel(HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        self.site.connections.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.site.connections.discard(self)
        if not self.site.connections:
            waiters, self.site.idle_waiters = self.site.idle_waiters, []
            for d in waiters:
                d.callback(None)


class _Site(Site):
    protocol = _Channel

    def __init__(self, resource):
        super().__init__(resource)
        self.connections: set = set()
        self.idle_waiters: list[Deferred] = []

    def idle(self) -> Deferred:
        if not self.connections:
            return succeed(None)
        d = Deferred()
        self.idle_waiters.append(d)
        return d


class _ClientTracker:
    """
    Makes treq clients (no persistent connections) whose connections it counts, so a test
    can wait for the client side of every connection to be closed too.
    """

    def __init__(self):
        self.open: set = set()
        self._waiters: list[Deferred] = []

    def http(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        return HTTPClient(Agent.usingEndpointFactory(reactor, self, pool=pool))

    def endpointForURI(self, uri):
        return _TrackedEndpoint(
            TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port), self
        )

    def opened(self, protocol) -> None:
        self.open.add(protocol)

    def closed(self, protocol) -> None:
        self.open.discard(protocol)
        if not self.open:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def idle(self) -> Deferred:
        if not self.open:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d


class _TrackedEndpoint:
    def __init__(self, endpoint, tracker: _ClientTracker):
        self._endpoint = endpoint
        self._tracker = tracker

    def connect(self, factory):
        tracker = self._tracker
        build = factory.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            lost = protocol.connectionLost

            def connectionLost(reason):
                try:
                    lost(reason)
                finally:
                    tracker.closed(protocol)

            protocol.connectionLost = connectionLost
            tracker.opened(protocol)
            return protocol

        factory.buildProtocol = buildProtocol
        return self._endpoint.connect(factory)


class FakeAPI:
    """
    A provider's API on 127.0.0.1: C{reply} is what every POST gets (a L{Reply}, or
    L{HANG}); C{seen} the requests received; C{url} the base URL; C{http} a treq client
    without persistent connections (so nothing stays open after a test).
    """

    def __init__(self):
        self.reply = Reply(200, b"{}")
        self.seen: list[Seen] = []
        self.abandoned: list[Deferred] = []
        self.site = _Site(_API(self))
        self.port = None
        self.clients = _ClientTracker()
        self.http = self.clients.http()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def answer(self, code: int = 200, body=b"", content_type: str = "application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.reply = Reply(code, body, content_type)

    async def start(self):
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.site)

    async def stop(self):
        await self.clients.idle().addTimeout(TIMEOUT_S, reactor)
        await self.site.idle().addTimeout(TIMEOUT_S, reactor)
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def api():
    fake = FakeAPI()
    await fake.start()
    yield fake
    await fake.stop()


async def refused_url() -> str:
    """A base URL nothing listens on (a port just freed)."""
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(Resource()))
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


def within(d: Deferred) -> Deferred:
    return d.addTimeout(TIMEOUT_S, reactor)


def on_its_own(d: Deferred) -> Deferred:
    """
    C{d}'s result, waited for at most TIMEOUT_S B{without} cancelling C{d}: for testing that
    a provider's own deadline fires and cleans up (else the test fails with a TimeoutError
    and the leak check).
    """
    shield = Deferred()

    def relay(result):
        if not shield.called:
            shield.callback(result)

    d.addBoth(relay)
    return shield.addTimeout(TIMEOUT_S, reactor)


async def failure_of(d: Deferred, kind=STTError, wait=within):
    with pytest.raises(kind) as info:
        await wait(d)
    return info.value


def tone(rate: int, ms: int = 200) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return audio.array_to_pcm(0.5 * np.sin(2 * np.pi * 440 * t))


class Tracking(WrappingFactory):
    """Knows when every server-side connection has closed."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._waiters = []

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def all_closed(self):
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d
