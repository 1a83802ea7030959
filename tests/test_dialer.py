"""
Tests for L{audiosocket.dialer}: the request, the log dialer, the HTTP webhook dialer against
a real local twisted.web server, and the AMI client — its framing on a StringTransport and the
whole dialer against a scripted Asterisk Manager on real TCP.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from audiosocket.config import AmiConfig, DialerConfig
from audiosocket.dialer import (
    AmiDialer,
    AmiProtocol,
    DialFailed,
    DialRequest,
    HandoffFailed,
    HttpDialer,
    IDialer,
    LogDialer,
    make_dialer,
)

TIMEOUT_S = 5
UUID = "5e0b3f6c-9d0a-4c39-8f43-2b7c7d6f1a10"
LEG_UUID = "0f1e2d3c-4b5a-4697-8877-665544332211"
SECRET = "s3cr3t-do-not-log"


def request(**kw) -> DialRequest:
    fields = dict(
        uuid=UUID,
        leg_uuid=LEG_UUID,
        dial="PJSIP/501",
        apartment="501",
        resident="Maria Souza",
        extension_id=1,
        return_extension="1002",
        audiosocket="127.0.0.1:8081",
        timeout_s=30.0,
    )
    fields.update(kw)
    return DialRequest(**fields)


def log_text(events) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


# -- request -------------------------------------------------------------------------------


def test_request_to_dict_has_exactly_the_contract_keys():
    """C{to_dict} gives the dialer contract's JSON object, key for key, leg_uuid included."""
    assert request().to_dict() == {
        "uuid": UUID,
        "leg_uuid": LEG_UUID,
        "dial": "PJSIP/501",
        "apartment": "501",
        "resident": "Maria Souza",
        "extension_id": 1,
        "return_extension": "1002",
        "audiosocket": "127.0.0.1:8081",
        "timeout_s": 30.0,
    }


@pytest.mark.parametrize(
    "field, match",
    [
        pytest.param({"uuid": "not-a-uuid"}, "uuid", id="uuid-not-a-uuid"),
        pytest.param(
            {"leg_uuid": "not-a-uuid"}, "leg_uuid: must be a UUID", id="leg-uuid-not-a-uuid"
        ),
        pytest.param(
            {"leg_uuid": UUID + "\nAction: Logoff"},
            "leg_uuid: must not contain a line break",
            id="leg-uuid-line-break",
        ),
        pytest.param(
            {"dial": "PJSIP/501\r\nAction: Logoff"},
            "dial: must not contain a line break",
            id="dial-line-break",
        ),
        pytest.param({"audiosocket": "127.0.0.1"}, "audiosocket", id="audiosocket-no-port"),
        pytest.param({"timeout_s": 0}, "timeout_s", id="timeout-not-positive"),
    ],
)
def test_request_refuses_a_malformed_field(field, match):
    """
    A malformed field is refused naming it: AudioSocket needs a real UUID; a line break in
    the dial string would inject AMI headers; C{audiosocket} must be C{host:port}; the ring
    timeout must be positive.
    """
    with pytest.raises(ValueError, match=match):
        request(**field)


def test_dial_failed_refuses_unknown_reasons():
    """A L{DialFailed} reason is one of the documented ones."""
    with pytest.raises(ValueError, match="unknown dial failure reason"):
        DialFailed("sleepy", "x")


# -- log -----------------------------------------------------------------------------------


def test_log_dialer_provides_idialer():
    """L{LogDialer} provides L{IDialer}."""
    assert verifyObject(IDialer, LogDialer())


def test_log_dialer_fires_at_once_and_logs_the_request_fields():
    """The log dialer fires L{None} at once and logs every request field."""
    with capturedLogs() as events:
        d = LogDialer().dial(request())
    assert d.called and d.result is None
    [event] = [e for e in events if e.get("dial") == "PJSIP/501"]
    for key, value in request().to_dict().items():
        assert event[key] == value
    assert "would dial PJSIP/501" in log_text([event])
    # An operator trying the server by hand needs the leg UUID to play the resident's leg.
    assert LEG_UUID in log_text([event])


# -- http ----------------------------------------------------------------------------------


class Webhook(Resource):
    """A fake dialer webhook: records requests, answers with a set status or never."""

    isLeaf = True

    def __init__(self, code=202, answer=True):
        super().__init__()
        self.code = code
        self.answer = answer
        self.bodies = []
        self.headers = []
        self.stalled = []
        self.stalling = DeferredQueue()  # each request left unanswered, as it arrives

    def render_POST(self, req):
        self.bodies.append(req.content.read())
        self.headers.append(req.requestHeaders.getRawHeaders(b"content-type"))
        if not self.answer:
            self.stalled.append(req)
            self.stalling.put(req)
            return NOT_DONE_YET
        req.setResponseCode(self.code)
        return b"{}"


class TrackingSite(Site):
    """A Site whose server-side connections can be awaited until closed."""

    def __init__(self, resource):
        super().__init__(resource)
        self.lost = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        closed = Deferred()
        self.lost.append(closed)
        original = protocol.connectionLost

        def connectionLost(reason):
            original(reason)
            closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol


@pytest_twisted.async_yield_fixture
async def webhook_server():
    """Start a real HTTP server on 127.0.0.1:0; yield (resource, site, url)."""
    servers = []

    async def start(resource):
        site = TrackingSite(resource)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        servers.append((port, site))
        return site, "http://127.0.0.1:{}/dial".format(port.getHost().port)

    clients_before = http_clients()
    yield start
    for port, site in servers:
        await defer.gatherResults(site.lost).addTimeout(TIMEOUT_S, reactor)
        await port.stopListening()
    await clients_closed(clients_before).addTimeout(TIMEOUT_S, reactor)


def http_clients():
    return {s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, tcp.Client)}


def clients_closed(before):
    """
    Fire once the client side of every new connection has closed too: the server side
    closes first, and the client reads the EOF in a later reactor turn.
    """

    async def wait():
        while http_clients() - before:
            await deferLater(0)

    return Deferred.fromCoroutine(wait())


def test_http_dialer_provides_idialer():
    """L{HttpDialer} provides L{IDialer}."""
    assert verifyObject(IDialer, HttpDialer("http://127.0.0.1:1/x"))


def test_http_dialer_refuses_a_non_http_url():
    """A URL that is not http(s) is refused naming it."""
    with pytest.raises(ValueError, match="ftp://x"):
        HttpDialer("ftp://x/y")


@pytest_twisted.ensureDeferred
async def test_http_dialer_posts_the_request_json_and_succeeds_on_2xx(webhook_server):
    """A 2xx answer fires L{None}; the body POSTed is exactly the request's JSON."""
    webhook = Webhook(code=202)
    site, url = await webhook_server(webhook)
    result = await HttpDialer(url).dial(request()).addTimeout(TIMEOUT_S, reactor)
    assert result is None
    [body] = webhook.bodies
    assert json.loads(body) == request().to_dict()
    assert json.loads(body)["leg_uuid"] == LEG_UUID
    [[content_type]] = webhook.headers
    assert content_type.startswith(b"application/json")


@pytest.mark.parametrize("code, reason", [(500, "error"), (404, "rejected")])
@pytest_twisted.ensureDeferred
async def test_http_dialer_failure_names_the_status(webhook_server, code, reason):
    """A 5xx answer is a failed attempt, a 4xx a refused request; the message names the
    status."""
    site, url = await webhook_server(Webhook(code=code))
    failure = await dial_failure(HttpDialer(url).dial(request()))
    assert failure.reason == reason
    assert "HTTP {}".format(code) in failure.message


@pytest_twisted.ensureDeferred
async def test_http_dialer_times_out_when_the_server_never_answers(webhook_server):
    """A webhook that never answers is a C{timeout} failure after C{timeout_s}."""
    webhook = Webhook(answer=False)
    site, url = await webhook_server(webhook)
    failure = await dial_failure(HttpDialer(url, timeout_s=0.2).dial(request()))
    assert failure.reason == "timeout"
    assert len(webhook.stalled) == 1


@pytest_twisted.ensureDeferred
async def test_http_dialer_connection_refused_is_unreachable():
    """Nothing listening on the webhook's port is an C{unreachable} failure."""
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    dialer = HttpDialer("http://127.0.0.1:{}/dial".format(number))
    failure = await dial_failure(dialer.dial(request()))
    assert failure.reason == "unreachable"


@pytest_twisted.ensureDeferred
async def test_http_dialer_cancel_is_a_cancel(webhook_server):
    """Cancelling the dial aborts the request and fails with CancelledError, no reason."""
    webhook = Webhook(answer=False)
    site, url = await webhook_server(webhook)
    d = HttpDialer(url).dial(request())
    await webhook.stalling.get().addTimeout(TIMEOUT_S, reactor)
    await cancel(d)


def deferLater(seconds):
    from twisted.internet.task import deferLater as _later

    return _later(reactor, seconds)


async def dial_failure(d) -> DialFailed:
    """The L{DialFailed} that the dial C{d} fails with, within C{TIMEOUT_S}."""
    with pytest.raises(DialFailed) as info:
        await d.addTimeout(TIMEOUT_S, reactor)
    return info.value


async def cancel(d) -> None:
    """Cancel the dial C{d}, which must then fail with CancelledError."""
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d


# -- AMI framing (StringTransport) -----------------------------------------------------------


def connected_protocol():
    protocol = AmiProtocol(action_ids=("id-{}".format(n) for n in range(1, 100)))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_ami_protocol_reads_the_banner():
    """The first line is the banner; C{ready} fires with it."""
    protocol, _ = connected_protocol()
    protocol.dataReceived(b"Asterisk Call Manager/5.0.4\r\n")
    assert protocol.banner == "Asterisk Call Manager/5.0.4"
    assert protocol.ready.result == "Asterisk Call Manager/5.0.4"


def test_ami_protocol_disconnects_on_a_foreign_banner():
    """A peer that is not an AMI is dropped."""
    protocol, transport = connected_protocol()
    protocol.ready.addErrback(lambda f: None)
    protocol.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert transport.disconnecting


def test_ami_protocol_writes_an_action_as_one_block():
    """An action is written whole: C{Action}, C{ActionID}, headers in order, empty line."""
    protocol, transport = connected_protocol()
    protocol.send_action("Ping", [("Variable", "A=1"), ("Variable", "B=2")])
    assert transport.value() == (
        b"Action: Ping\r\nActionID: id-1\r\nVariable: A=1\r\nVariable: B=2\r\n\r\n"
    )


def test_ami_protocol_refuses_line_breaks_in_header_values():
    """A header value with a line break is refused before anything is written."""
    protocol, transport = connected_protocol()
    with pytest.raises(ValueError, match="line break"):
        protocol.send_action("Ping", [("X", "a\r\nAction: Logoff")])
    assert transport.value() == b""


@pytest.mark.parametrize("value", ["A=1,B=2", "A=1\rB", "A=1\nB"])
def test_ami_protocol_refuses_commas_and_line_breaks_in_variable_values(value):
    """
    A Variable value with a comma (Asterisk would split it into more channel variables) or a
    line break (a new header) is refused before anything is written.
    """
    protocol, transport = connected_protocol()
    with pytest.raises(ValueError, match="AMI header Variable must not contain"):
        protocol.send_action("Originate", [("Variable", value)])
    assert transport.value() == b""


def test_ami_protocol_routes_a_multi_line_response_by_action_id():
    """A multi-line response block reaches the action with its ActionID, keys lower-cased."""
    protocol, _ = connected_protocol()
    protocol.dataReceived(b"Asterisk Call Manager/5.0.4\r\n")
    first = protocol.send_action("Ping", [])
    second = protocol.send_action("Ping", [])
    protocol.dataReceived(
        b"Response: Success\r\nActionID: id-2\r\nPing: Pong\r\nTimestamp: 1.0\r\n\r\n"
    )
    assert not first.called
    assert second.result == {
        "response": "Success",
        "actionid": "id-2",
        "ping": "Pong",
        "timestamp": "1.0",
    }


def test_ami_protocol_reassembles_split_packets():
    """A message split across reads at any byte is parsed the same."""
    protocol, _ = connected_protocol()
    events = []
    protocol.on_event = events.append
    data = (
        b"Asterisk Call Manager/5.0.4\r\n"
        b"Event: OriginateResponse\r\nActionID: id-9\r\nResponse: Failure\r\nReason: 5\r\n\r\n"
    )
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])
    assert events == [
        {"event": "OriginateResponse", "actionid": "id-9", "response": "Failure", "reason": "5"}
    ]


def test_ami_protocol_ignores_unknown_events_and_stray_responses():
    """Events go to C{on_event}; a response for no pending action is dropped quietly."""
    protocol, _ = connected_protocol()
    events = []
    protocol.on_event = events.append
    pending = protocol.send_action("Ping", [])
    protocol.dataReceived(
        b"Asterisk Call Manager/5.0.4\r\n"
        b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n"
        b"Response: Success\r\nActionID: nobody\r\n\r\n"
    )
    assert [e["event"] for e in events] == ["FullyBooted"]
    assert not pending.called


def test_ami_protocol_fails_pending_actions_on_connection_lost():
    """Actions still waiting when the connection ends fail with its reason."""
    protocol, _ = connected_protocol()
    protocol.dataReceived(b"Asterisk Call Manager/5.0.4\r\n")
    pending = protocol.send_action("Ping", [])
    failures = []
    pending.addErrback(failures.append)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert failures and failures[0].check(ConnectionDone)


def action_ids(transport) -> list[bytes]:
    """The ActionIDs of the actions written on C{transport}, in order."""
    return [
        line.split(b": ")[1] for line in transport.value().split(b"\r\n")
        if line.startswith(b"ActionID")
    ]


def logged_in_on_clock():
    """An AmiDialer on a MemoryReactorClock, fed a logged-in connection over a
    StringTransport."""
    clock = MemoryReactorClock()
    dialer = AmiDialer("127.0.0.1", 5038, "audiosocket", SECRET, reactor=clock)
    protocol, transport = logged_in(dialer)
    return clock, dialer, protocol, transport


def logged_in(dialer):
    """A new AMI connection for C{dialer} over a StringTransport, logged in; returns its
    protocol and transport."""
    protocol = dialer.factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"Asterisk Call Manager/5.0.4\r\n")
    [login_id] = action_ids(transport)
    transport.clear()
    protocol.dataReceived(b"Response: Success\r\nActionID: " + login_id + b"\r\n\r\n")
    return protocol, transport


def test_ami_dialer_gives_up_when_no_originate_response_ever_comes():
    """With no OriginateResponse, the dial fails C{timeout} a grace after the ring timeout."""
    clock, dialer, protocol, transport = logged_in_on_clock()
    assert dialer.ready
    failures = []
    dialer.dial(request(timeout_s=30)).addErrback(failures.append)
    clock.advance(30 + AmiDialer.GRACE_S - 0.1)
    assert not failures
    clock.advance(0.2)
    [failure] = failures
    assert failure.value.reason == "timeout"
    assert dialer.pending == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "field", [{"audiosocket": "127.0.0.1,X=1:8081"}, {"audiosocket": "a,b:8081"}]
)
def test_ami_dialer_refuses_a_comma_in_a_variable_before_sending(field):
    """
    A request whose channel variable would carry a comma fails C{rejected} at once: no
    Originate is written, no attempt or timer is kept.
    """
    clock, dialer, protocol, transport = logged_in_on_clock()
    failures = []
    dialer.dial(request(**field)).addErrback(failures.append)
    [failure] = failures
    assert failure.value.reason == "rejected"
    assert "comma" in failure.value.message
    assert transport.value() == b""
    assert dialer.pending == 0
    assert clock.getDelayedCalls() == []


def test_ami_dialer_event_before_the_queued_response_still_counts():
    """An OriginateResponse arriving before the action's own response settles the dial;
    the late response is then ignored."""
    clock, dialer, protocol, transport = logged_in_on_clock()
    results = []
    dialer.dial(request()).addBoth(results.append)
    action_id = action_ids(transport)[0]
    protocol.dataReceived(
        b"Event: OriginateResponse\r\nActionID: " + action_id
        + b"\r\nResponse: Failure\r\nReason: 8\r\n\r\n"
        + b"Response: Success\r\nActionID: " + action_id + b"\r\n\r\n"
    )
    [result] = results
    assert result.value.reason == "congestion"
    assert clock.getDelayedCalls() == []


# -- AMI dialer against a scripted Asterisk Manager (real TCP) -------------------------------


class FakeAsteriskProtocol(LineReceiver):
    """Speaks the server side of AMI: banner, Login, and hands other actions to the test."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.block = []
        self.closed = Deferred()
        self.factory.connections.append(self)
        self.sendLine(b"Asterisk Call Manager/5.0.4")

    def lineReceived(self, line):
        if line:
            key, _, value = line.decode().partition(": ")
            self.block.append((key, value))
            return
        action, self.block = self.block, []
        fields = dict(action)
        if fields["Action"] == "Login":
            self.factory.logins.append(action)
            self.factory.login_attempts.put(action)
            ok = fields.get("Secret") == self.factory.secret
            self.send(
                Response="Success" if ok else "Error",
                ActionID=fields["ActionID"],
                Message="Authentication accepted" if ok else "Authentication failed",
            )
            if ok:
                self.factory.logged_in.put(self)
            return
        self.factory.actions.put((self, action))

    def send(self, **headers):
        self.transport.write(
            "".join("{}: {}\r\n".format(k, v) for k, v in headers.items()).encode() + b"\r\n"
        )

    def connectionLost(self, reason):
        self.closed.callback(None)


class FakeAsterisk(Factory):
    protocol = FakeAsteriskProtocol

    def __init__(self, secret=SECRET):
        self.secret = secret
        self.connections = []
        self.logins = []
        self.login_attempts = DeferredQueue()
        self.logged_in = DeferredQueue()
        self.actions = DeferredQueue()


@pytest_twisted.async_yield_fixture
async def asterisk():
    """A scripted AMI server on 127.0.0.1:0 and an AmiDialer for it (started)."""
    made = []

    async def start(secret=SECRET, dialer_secret=SECRET):
        server = FakeAsterisk(secret)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(server)
        dialer = AmiDialer(
            "127.0.0.1",
            port.getHost().port,
            "audiosocket",
            dialer_secret,
            context="audiosocket-resident",
            retry_policy=lambda failures: 0.01 * failures,
        )
        made.append((port, server, dialer))
        dialer.startService()
        return server, dialer

    yield start
    for port, server, dialer in made:
        await dialer.stopService()
        await defer.gatherResults([c.closed for c in server.connections]).addTimeout(
            TIMEOUT_S, reactor
        )
        await port.stopListening()


async def get(queue):
    return await queue.get().addTimeout(TIMEOUT_S, reactor)


async def ready(asterisk):
    """A scripted AMI server and a dialer logged in to it."""
    server, dialer = await asterisk()
    await dialer.when_ready().addTimeout(TIMEOUT_S, reactor)
    return server, dialer


async def originate(asterisk, **kw):
    """
    Dial C{request(**kw)} with a dialer logged in to a scripted AMI server; once the server
    has the Originate, return the dialer, the dial, the server's connection and the action.
    """
    server, dialer = await ready(asterisk)
    d = dialer.dial(request(**kw))
    peer, action = await get(server.actions)
    return dialer, d, peer, action


@pytest_twisted.ensureDeferred
async def test_ami_dialer_logs_in_with_call_events(asterisk):
    """On connect the dialer logs in with its username, secret and C{Events: call}."""
    server, dialer = await ready(asterisk)
    assert verifyObject(IDialer, dialer)
    [login] = server.logins
    fields = dict(login)
    assert [k for k, _ in login] == ["Action", "ActionID", "Username", "Secret", "Events"]
    assert fields["Username"] == "audiosocket"
    assert fields["Secret"] == SECRET
    assert fields["Events"] == "call"
    assert dialer.ready
    assert dialer.when_ready().called


@pytest_twisted.ensureDeferred
async def test_ami_dialer_sends_every_originate_field(asterisk):
    """Originate carries Channel, Context, Exten, Priority, Async, Timeout, CallerID and the
    Variables, one C{Variable:} line each: AUDIOSOCKET_UUID is the dial's leg UUID (what the
    dialplan's AudioSocket() presents), the session UUID only goes in AUDIOSOCKET_SESSION."""
    dialer, d, _, action = await originate(asterisk, timeout_s=25.5)
    fields = dict(action)
    assert fields["Action"] == "Originate"
    # Its own channel uniqueid (for cancel), never the leg UUID (a credential).
    assert LEG_UUID not in fields["ChannelId"] and UUID not in fields["ChannelId"]
    assert fields["ActionID"]
    assert [(k, v) for k, v in action if k not in ("Action", "ActionID")] == [
        ("Channel", "PJSIP/501"),
        ("Context", "audiosocket-resident"),
        ("Exten", "s"),
        ("Priority", "1"),
        ("Async", "true"),
        ("Timeout", "25500"),
        ("CallerID", "1002"),
        ("ChannelId", fields["ChannelId"]),
        ("OtherChannelId", fields["ChannelId"] + "-2"),
        ("Variable", "AUDIOSOCKET_UUID=" + LEG_UUID),
        ("Variable", "AUDIOSOCKET_HOST=127.0.0.1:8081"),
        ("Variable", "AUDIOSOCKET_SESSION=" + UUID),
    ]
    await cancel(d)


@pytest_twisted.ensureDeferred
async def test_ami_dialer_fires_on_originate_response_success(asterisk):
    """
    Queued, then C{OriginateResponse: Success} for that ActionID: the dial fires None. A
    failure event for another ActionID, arriving on the same connection before it, does not
    settle this dial.
    """
    dialer, d, peer, action = await originate(asterisk)
    action_id = dict(action)["ActionID"]
    peer.send(Response="Success", ActionID=action_id, Message="Originate successfully queued")
    # Another dial's failure, read first: were it taken for this dial, d would fail busy.
    peer.send(Event="OriginateResponse", ActionID="someone-else", Response="Failure", Reason="5")
    assert not d.called
    peer.send(
        Event="OriginateResponse",
        Privilege="call,all",
        ActionID=action_id,
        Response="Success",
        Channel="PJSIP/501-00000001",
        Reason="4",
    )
    assert await d.addTimeout(TIMEOUT_S, reactor) is None
    assert dialer.pending == 0


@pytest_twisted.ensureDeferred
async def test_ami_dialer_busy_originate_response_fails_busy(asterisk):
    """C{OriginateResponse: Failure} with Reason 5 is a C{busy} failure."""
    dialer, d, peer, action = await originate(asterisk)
    action_id = dict(action)["ActionID"]
    peer.send(Response="Success", ActionID=action_id, Message="Originate successfully queued")
    peer.send(Event="OriginateResponse", ActionID=action_id, Response="Failure", Reason="5")
    assert (await dial_failure(d)).reason == "busy"
    assert dialer.pending == 0


@pytest.mark.parametrize(
    "code, reason",
    [("0", "unreachable"), ("1", "no_answer"), ("3", "no_answer"), ("8", "congestion"),
     ("2", "error")],
)
@pytest_twisted.ensureDeferred
async def test_ami_dialer_maps_originate_reason_codes(asterisk, code, reason):
    """Asterisk's Reason codes map to the documented failure reasons."""
    dialer, d, peer, action = await originate(asterisk)
    peer.send(Event="OriginateResponse", ActionID=dict(action)["ActionID"],
              Response="Failure", Reason=code)
    failure = await dial_failure(d)
    assert failure.reason == reason
    assert "reason {}".format(code) in failure.message


@pytest_twisted.ensureDeferred
async def test_ami_dialer_response_error_is_rejected_at_once(asterisk):
    """C{Response: Error} to the Originate action fails the dial as C{rejected} at once."""
    dialer, d, peer, action = await originate(asterisk)
    peer.send(Response="Error", ActionID=dict(action)["ActionID"],
              Message="Extension does not exist.")
    failure = await dial_failure(d)
    assert failure.reason == "rejected"
    assert "Extension does not exist." in failure.message


@pytest_twisted.ensureDeferred
async def test_ami_dialer_not_logged_in_fails_unreachable_at_once():
    """A dial before the dialer is connected fails C{unreachable} at once, without queuing."""
    dialer = AmiDialer("127.0.0.1", 5038, "audiosocket", SECRET)
    d = dialer.dial(request())
    assert d.called
    assert (await dial_failure(d)).reason == "unreachable"


@pytest_twisted.ensureDeferred
async def test_ami_dialer_connection_lost_fails_the_pending_originate(asterisk):
    """The connection dropping while an originate waits fails it C{unreachable}."""
    dialer, d, peer, action = await originate(asterisk)
    peer.send(Response="Success", ActionID=dict(action)["ActionID"], Message="queued")
    peer.transport.loseConnection()
    assert (await dial_failure(d)).reason == "unreachable"
    assert dialer.pending == 0


@pytest_twisted.ensureDeferred
async def test_ami_dialer_reconnects_and_logs_in_again(asterisk):
    """When the server drops the connection, the dialer reconnects and logs in again."""
    server, dialer = await asterisk()
    first = await get(server.logged_in)
    first.transport.loseConnection()
    await first.closed.addTimeout(TIMEOUT_S, reactor)
    second = await get(server.logged_in)
    assert second is not first
    assert len(server.logins) == 2
    await dialer.when_ready().addTimeout(TIMEOUT_S, reactor)
    d = dialer.dial(request())
    peer, _ = await get(server.actions)
    assert peer is second
    await cancel(d)


@pytest_twisted.ensureDeferred
async def test_ami_dialer_login_failure_is_logged_without_secret_and_retried(asterisk):
    """A refused login is logged clearly, never with the secret, and retried with backoff."""
    with capturedLogs() as events:
        server, dialer = await asterisk(secret="other", dialer_secret=SECRET)
        for _ in range(3):
            await get(server.login_attempts)
        assert not dialer.ready
        assert (await dial_failure(dialer.dial(request()))).reason == "unreachable"
    text = log_text(events)
    assert "AMI login as audiosocket to 127.0.0.1" in text
    assert "refused: Authentication failed" in text
    assert SECRET not in text
    # The retry delay grows with consecutive login failures.
    delays = [e["delay"] for e in events if "delay" in e and "attempt" in e]
    assert delays[:2] == sorted(delays[:2]) and delays[1] > delays[0]


@pytest_twisted.ensureDeferred
async def test_ami_dialer_cancel_forgets_the_attempt(asterisk):
    """Cancelling a pending dial forgets it and its guard timer; a late event is ignored."""
    dialer, d, peer, action = await originate(asterisk)
    with capturedLogs() as events:
        await cancel(d)
        assert dialer.pending == 0
        peer.send(Event="OriginateResponse", ActionID=dict(action)["ActionID"],
                  Response="Success", Reason="4")
        # A second dial on the same connection, answered after the late event: it settles
        # only once the late event has been read, so this proves the late event was read
        # and left the connection and the dialer working.
        again = dialer.dial(request())
        same, action2 = await get(peer.factory.actions)
        assert same is peer
        peer.send(Event="OriginateResponse", ActionID=dict(action2)["ActionID"],
                  Response="Success", Reason="4")
        assert await again.addTimeout(TIMEOUT_S, reactor) is None
    assert dialer.ready and dialer.pending == 0
    assert not [e for e in events if e.get("log_failure") is not None]
    assert not [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]


# -- make_dialer ------------------------------------------------------------------------------


def test_make_dialer_log():
    """C{kind = "log"} builds a L{LogDialer}."""
    assert isinstance(make_dialer(DialerConfig(), {}.get), LogDialer)


def test_make_dialer_http():
    """C{kind = "http"} builds an L{HttpDialer} for the configured URL."""
    dialer = make_dialer(DialerConfig(kind="http", url="https://pbx.example/dial"), {}.get)
    assert isinstance(dialer, HttpDialer)


def test_make_dialer_ami_reads_the_secret_from_the_named_variable():
    """C{kind = "ami"} builds an L{AmiDialer} whose secret comes from C{secret_env}."""
    config = DialerConfig(kind="ami", ami=AmiConfig(secret_env="MY_AMI", context="ctx"))
    dialer = make_dialer(config, {"MY_AMI": SECRET}.get)
    assert isinstance(dialer, AmiDialer)
    assert dialer.context == "ctx"
    assert SECRET not in repr(dialer)


def test_make_dialer_ami_without_secret_names_the_variable():
    """A missing AMI secret is an error naming the environment variable."""
    with pytest.raises(ValueError, match="AMI_SECRET is not set"):
        make_dialer(DialerConfig(kind="ami"), {}.get)


# -- cancel ------------------------------------------------------------------------------------


def test_log_dialer_logs_the_cancel():
    """The log dialer's cancel logs the leg UUID and fires None."""
    with capturedLogs() as events:
        d = LogDialer().cancel(LEG_UUID)
    assert d.called and d.result is None
    assert "cancel dial: leg {}".format(LEG_UUID) in log_text(events)


@pytest_twisted.ensureDeferred
async def test_http_dialer_cancel_posts_the_cancel_event_once(webhook_server):
    """
    Cancelling a dialed leg POSTs C{{"event": "cancel", "uuid", "leg_uuid"}} to the same URL;
    a second cancel, and a cancel of a leg never dialed, POST nothing.
    """
    webhook = Webhook(code=200)
    site, url = await webhook_server(webhook)
    dialer = HttpDialer(url)
    await dialer.dial(request()).addTimeout(TIMEOUT_S, reactor)
    assert await dialer.cancel(LEG_UUID).addTimeout(TIMEOUT_S, reactor) is None
    assert await dialer.cancel(LEG_UUID).addTimeout(TIMEOUT_S, reactor) is None
    assert await dialer.cancel(UUID).addTimeout(TIMEOUT_S, reactor) is None
    dial, cancel_body = [json.loads(b) for b in webhook.bodies]
    assert cancel_body == {"event": "cancel", "uuid": UUID, "leg_uuid": LEG_UUID}


@pytest_twisted.ensureDeferred
async def test_http_dialer_cancel_failure_is_logged_never_raised(webhook_server):
    """A webhook answering the cancel with HTTP 500 is logged; the cancel fires None."""
    webhook = Webhook(code=500)
    site, url = await webhook_server(webhook)
    dialer = HttpDialer(url)
    await dial_failure(dialer.dial(request()))  # the webhook failed the dial; cancel anyway
    with capturedLogs() as events:
        assert await dialer.cancel(LEG_UUID).addTimeout(TIMEOUT_S, reactor) is None
    assert len(webhook.bodies) == 2
    assert "webhook cancel of leg {} (session {}) failed".format(LEG_UUID, UUID) in log_text(
        events
    )


def originated_on_clock(**kw):
    """A dial sent on L{logged_in_on_clock}; returns its parts and the Originate's fields."""
    clock, dialer, protocol, transport = logged_in_on_clock()
    results = []
    dialer.dial(request(**kw)).addBoth(results.append)
    fields = written_actions(transport)[-1]
    transport.clear()
    return clock, dialer, protocol, transport, fields


def written_actions(transport) -> list[dict]:
    """The actions written on C{transport}, as dicts of their headers."""
    blocks = transport.value().decode().split("\r\n\r\n")
    return [
        dict(line.split(": ", 1) for line in block.split("\r\n"))
        for block in blocks if block
    ]


def answer(protocol, **headers):
    protocol.dataReceived(
        "".join("{}: {}\r\n".format(k, v) for k, v in headers.items()).encode() + b"\r\n"
    )


def test_ami_dialer_cancel_hangs_up_the_originated_channel_once():
    """
    Cancel while it rings: a C{Hangup} naming the Originate's own C{ChannelId} (the channel
    Asterisk made for it) is sent; once Asterisk confirms, a second cancel sends nothing.
    """
    clock, dialer, protocol, transport, originate = originated_on_clock()
    channel_id = originate["ChannelId"]
    answer(protocol, Event="Newchannel", Channel="Local/501@phones-00000001;1",
           Uniqueid=channel_id)
    d = dialer.cancel(LEG_UUID)
    [hangup] = written_actions(transport)
    assert hangup["Action"] == "Hangup" and hangup["Channel"] == channel_id
    assert not d.called
    answer(protocol, Response="Success", ActionID=hangup["ActionID"], Message="Channel Hungup")
    assert d.called and d.result is None
    transport.clear()
    assert dialer.cancel(LEG_UUID).called
    assert transport.value() == b""


def test_ami_dialer_cancel_before_the_channel_exists_hangs_it_up_once_created():
    """
    Cancel before Asterisk created the channel (C{No such channel}): the Hangup is sent
    again when its C{Newchannel} event arrives.
    """
    clock, dialer, protocol, transport, originate = originated_on_clock()
    channel_id = originate["ChannelId"]
    dialer.cancel(LEG_UUID)
    [first] = written_actions(transport)
    transport.clear()
    answer(protocol, Response="Error", ActionID=first["ActionID"], Message="No such channel")
    assert transport.value() == b""
    answer(protocol, Event="Newchannel", Channel="PJSIP/501-00000002", Uniqueid="other")
    assert transport.value() == b""
    answer(protocol, Event="Newchannel", Channel="PJSIP/501-00000003", Uniqueid=channel_id)
    [second] = written_actions(transport)
    assert second["Action"] == "Hangup" and second["Channel"] == channel_id


def test_ami_dialer_cancel_after_the_originate_failed_sends_nothing():
    """A channel whose OriginateResponse reported a failure is gone: cancel is a no-op."""
    clock, dialer, protocol, transport, originate = originated_on_clock()
    answer(protocol, Event="OriginateResponse", ActionID=originate["ActionID"],
           Response="Failure", Reason="3")
    d = dialer.cancel(LEG_UUID)
    assert d.called and d.result is None
    assert transport.value() == b""
    assert clock.getDelayedCalls() == []


def test_ami_dialer_cancel_of_an_answered_call_hangs_it_up():
    """
    Answered (OriginateResponse Success) but its leg never joined: cancel hangs it up.
    After the channel's own Hangup event, a cancel sends nothing.
    """
    clock, dialer, protocol, transport, originate = originated_on_clock()
    channel_id = originate["ChannelId"]
    answer(protocol, Event="Newchannel", Uniqueid=channel_id)
    answer(protocol, Event="OriginateResponse", ActionID=originate["ActionID"],
           Response="Success", Reason="4", Uniqueid=channel_id)
    dialer.cancel(LEG_UUID)
    [hangup] = written_actions(transport)
    assert hangup["Action"] == "Hangup" and hangup["Channel"] == channel_id
    # Another dial, whose channel hangs up by itself: nothing left to cancel.
    transport.clear()
    dialer.dial(request(leg_uuid="11111111-2222-4333-8444-555555555555"))
    other = written_actions(transport)[-1]
    answer(protocol, Event="Hangup", Uniqueid=other["ChannelId"], Cause="16")
    transport.clear()
    assert dialer.cancel("11111111-2222-4333-8444-555555555555").called
    assert transport.value() == b""


def test_ami_dialer_cancel_after_the_dial_deferred_was_cancelled_still_hangs_up():
    """
    The flow first cancels the dial's Deferred (forgetting the attempt), then cancels the
    dial: the Hangup is still sent, and a late OriginateResponse is harmless.
    """
    clock, dialer, protocol, transport = logged_in_on_clock()
    d = dialer.dial(request())
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    originate = written_actions(transport)[-1]
    transport.clear()
    d.cancel()
    assert dialer.pending == 0 and clock.getDelayedCalls() == []
    answer(protocol, Event="Newchannel", Uniqueid=originate["ChannelId"])
    dialer.cancel(LEG_UUID)
    [hangup] = written_actions(transport)
    assert hangup["Channel"] == originate["ChannelId"]
    answer(protocol, Event="OriginateResponse", ActionID=originate["ActionID"],
           Response="Failure", Reason="1")
    assert dialer.pending == 0


def test_ami_dialer_cancel_unknown_or_disconnected_never_fails():
    """An unknown leg is a no-op; with the AMI connection gone the cancel is logged."""
    clock, dialer, protocol, transport, originate = originated_on_clock()
    assert dialer.cancel(UUID).called
    assert transport.value() == b""
    protocol.connectionLost(Failure(ConnectionDone()))
    with capturedLogs() as events:
        d = dialer.cancel(LEG_UUID)
    assert d.called and d.result is None
    assert "cannot hang up channel {}".format(originate["ChannelId"]) in log_text(events)


@pytest_twisted.ensureDeferred
async def test_ami_dialer_cancel_sends_hangup_to_the_scripted_asterisk(asterisk):
    """
    Against a scripted Asterisk Manager on real TCP: after the Originate, cancel sends
    C{Action: Hangup} with C{Channel} = the Originate's C{ChannelId}, and fires once
    Asterisk answers it.
    """
    dialer, d, peer, action = await originate(asterisk)
    fields = dict(action)
    peer.send(Response="Success", ActionID=fields["ActionID"], Message="queued")
    peer.send(Event="Newchannel", Channel="PJSIP/501-00000001", Uniqueid=fields["ChannelId"])
    await cancel(d)
    done = dialer.cancel(LEG_UUID)
    peer2, hangup = await get(peer.factory.actions)
    assert peer2 is peer
    hangup = dict(hangup)
    assert hangup["Action"] == "Hangup"
    assert hangup["Channel"] == fields["ChannelId"]
    peer.send(Response="Success", ActionID=hangup["ActionID"], Message="Channel Hungup")
    assert await done.addTimeout(TIMEOUT_S, reactor) is None


def test_ami_dialer_hangup_refused_is_logged_as_an_error():
    """
    Asterisk refusing the Hangup (an AMI user without C{write = call}: C{Permission denied})
    is logged as an error naming the fix; the cancel still fires None.
    """
    clock, dialer, protocol, transport, originate = originated_on_clock()
    answer(protocol, Event="Newchannel", Uniqueid=originate["ChannelId"])
    with capturedLogs() as events:
        d = dialer.cancel(LEG_UUID)
        [hangup] = written_actions(transport)
        answer(protocol, Response="Error", ActionID=hangup["ActionID"],
               Message="Permission denied")
    assert d.called and d.result is None
    text = log_text(events)
    assert "AMI refused to hang up channel {}".format(originate["ChannelId"]) in text
    assert "write = call" in text
    assert [e for e in events if e["log_level"].name == "error"]


# -- hand-off ----------------------------------------------------------------------------------


def test_log_dialer_logs_the_handoff():
    """The log dialer's hand-off logs the call and the instruction, and fires None."""
    with capturedLogs() as events:
        d = LogDialer().handoff(UUID, "transfer", "PJSIP/portaria")
    assert d.called and d.result is None
    assert "handoff of call {}: transfer PJSIP/portaria".format(UUID) in log_text(events)


def test_log_dialer_keeps_gate_digits_out_of_the_log():
    """An "open" hand-off's digits (the building's gate code) are never logged."""
    with capturedLogs() as events:
        d = LogDialer().handoff(UUID, "open", "*8642#")
    assert d.called and d.result is None
    text = log_text(events)
    assert "handoff of call {}: open (gate digits)".format(UUID) in text
    assert "8642" not in text


def test_log_dialer_notify_logs_without_the_visitor_name():
    """notify() logs the apartment and pre-authorisation, not the visitor's name."""
    event = {"kind": "preauthorized", "uuid": UUID, "condominium_id": 1, "apartment": "101",
             "visitor_name": "Maria Faxineira", "preauth_id": "p1"}
    with capturedLogs() as events:
        d = LogDialer().notify(event)
    assert d.called and d.result is None
    text = log_text(events)
    assert "apartment 101" in text and "p1" in text and "Maria" not in text


@pytest_twisted.ensureDeferred
async def test_http_dialer_posts_notify_and_never_fails(webhook_server):
    """The http dialer POSTs {"event": "notify", ...}; a 500 is logged, not raised."""
    webhook = Webhook(code=200)
    site, url = await webhook_server(webhook)
    event = {"kind": "preauthorized", "uuid": UUID, "apartment": "101", "preauth_id": "p1"}
    assert await HttpDialer(url).notify(event).addTimeout(TIMEOUT_S, reactor) is None
    assert json.loads(webhook.bodies[0]) == {"event": "notify", **event}
    webhook.code = 500
    with capturedLogs() as events:
        assert await HttpDialer(url).notify(event).addTimeout(TIMEOUT_S, reactor) is None
    assert "webhook notify of call {} failed".format(UUID) in log_text(events)


@pytest.mark.parametrize(
    "action, argument, match",
    [
        ("dial", "PJSIP/x", "unknown hand-off action"),
        ("transfer", "PJSIP/x,30", "comma"),
        ("open", "1\r\nAction: Hangup", "line break"),
        ("transfer", "", "empty"),
    ],
)
def test_handoff_refuses_a_bad_instruction(action, argument, match):
    """A hand-off whose action is unknown or whose argument holds a comma or a line break is
    refused before anything is sent."""
    d = LogDialer().handoff(UUID, action, argument)
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(ValueError)
    assert match in str(failure[0].value)


@pytest_twisted.ensureDeferred
async def test_http_dialer_posts_the_transfer_event(webhook_server):
    """The http dialer POSTs C{{"event": "transfer", "uuid", "dial"}} ("open": "digits")."""
    webhook = Webhook(code=200)
    site, url = await webhook_server(webhook)
    dialer = HttpDialer(url)
    assert await dialer.handoff(UUID, "transfer", "PJSIP/portaria").addTimeout(
        TIMEOUT_S, reactor
    ) is None
    assert await dialer.handoff(UUID, "open", "1234").addTimeout(TIMEOUT_S, reactor) is None
    transfer, opening = [json.loads(b) for b in webhook.bodies]
    assert transfer == {"event": "transfer", "uuid": UUID, "dial": "PJSIP/portaria"}
    assert opening == {"event": "open", "uuid": UUID, "digits": "1234"}


@pytest_twisted.ensureDeferred
async def test_http_dialer_handoff_failure_fails(webhook_server):
    """A webhook answering the hand-off with HTTP 500 fails it with HandoffFailed."""
    site, url = await webhook_server(Webhook(code=500))
    with pytest.raises(HandoffFailed, match="HTTP 500"):
        await HttpDialer(url).handoff(UUID, "transfer", "PJSIP/p").addTimeout(TIMEOUT_S, reactor)


@pytest_twisted.ensureDeferred
async def test_ami_dialer_handoff_is_a_dbput(asterisk):
    """
    The AMI dialer's hand-off is C{DBPut} of C{transfer,<dial>} under family audiosocket, key
    the call's UUID; Asterisk's Success fires it None.
    """
    server, dialer = await ready(asterisk)
    d = dialer.handoff(UUID, "transfer", "PJSIP/portaria")
    peer, action = await get(server.actions)
    fields = dict(action)
    assert [(k, v) for k, v in action if k not in ("Action", "ActionID")] == [
        ("Family", "audiosocket"),
        ("Key", UUID),
        ("Val", "transfer,PJSIP/portaria"),
    ]
    assert fields["Action"] == "DBPut"
    peer.send(Response="Success", ActionID=fields["ActionID"], Message="Updated database successfully")
    assert await d.addTimeout(TIMEOUT_S, reactor) is None


@pytest_twisted.ensureDeferred
async def test_ami_dialer_handoff_permission_denied_fails(asterisk):
    """Without write = system Asterisk answers Permission denied: the hand-off fails, naming
    it."""
    server, dialer = await ready(asterisk)
    d = dialer.handoff(UUID, "open", "1234")
    peer, action = await get(server.actions)
    assert dict(action)["Val"] == "open,1234"
    peer.send(Response="Error", ActionID=dict(action)["ActionID"], Message="Permission denied")
    with pytest.raises(HandoffFailed, match="Permission denied"):
        await d.addTimeout(TIMEOUT_S, reactor)


@pytest_twisted.ensureDeferred
async def test_ami_dialer_handoff_not_connected_fails_at_once():
    """Not logged in: the hand-off fails at once."""
    dialer = AmiDialer("127.0.0.1", 1, "audiosocket", SECRET)
    with pytest.raises(HandoffFailed, match="not connected"):
        await dialer.handoff(UUID, "transfer", "PJSIP/p")
