"""
Integration tests: the real service from L{makeService} on 127.0.0.1 — real TCP, a real
redis-server, real espeak-ng synthesis — called by the L{audiosocket.callclient} core as
Asterisk would, and for the two-leg call an HTTP dialer pointed at a real local web server
that connects the resident's leg the way Asterisk's dialplan would.
"""

from __future__ import annotations

import io
import json
import socket
import uuid

import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.web import resource, server

from audiosocket import wire
from audiosocket.callclient import CallOptions, place_call
from audiosocket.config import parse_config
from audiosocket.fakepbx import Webhook
from audiosocket.service import makeService
from ports import free_ports  # noqa: F401 (the other tests import it from here)

ETC = __import__("pathlib").Path(__file__).resolve().parent.parent / "etc"


async def until(predicate, seconds: float = 20.0, what: str = "condition"):
    """Poll the reactor every 50 ms until C{predicate()} is true; fail after C{seconds}."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("{} not reached in {} s".format(what, seconds))


#: A resident pressing 1 every few seconds: keys count only once the announcement and the
#: question have played, and a test does not know when that is.
PRESSES_1 = [(at, "1") for at in (1.0, 8.0, 12.0, 16.0, 20.0, 24.0)]


def config_for(redis_path: str, tmp_path, ai: int, ret: int, **sections) -> object:
    data = {
        "server": {"bind": "127.0.0.1", "state_dir": str(tmp_path / "var")},
        "api": {"endpoint": "tcp:0:interface=127.0.0.1"},
        "redis": {"url": "unix://" + redis_path},
        "flow": {"ring_timeout_s": 10, "attempts": 1},
        "condominiums": [
            {
                "id": 1,
                "name": "Condomínio Apoena",
                "greeting": "Condomínio Apoena, em que posso ajudar?",
                "directory": str(ETC / "apartments.json"),
            }
        ],
        "extensions": [
            {
                "id": 1,
                "ai_extension": "1001",
                "ai_port": ai,
                "return_extension": "1002",
                "return_port": ret,
                "host": "127.0.0.1",
                "condominium_id": 1,
            }
        ],
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, str(tmp_path / "audiosocket.toml"))


def webhook_dialer(port: int) -> dict:
    """A [dialer] section: the http dialer posting to a local web server (a L{Webhook} site)."""
    return {"kind": "http", "url": "http://127.0.0.1:{}/".format(port)}


def whisper_speech(port: int, **whisper) -> dict:
    """A [speech] section: STT by the whisper-compatible server on local C{port}, with more
    [speech.whisper] keys."""
    return {"stt": "whisper", "whisper": {"url": "http://127.0.0.1:{}/v1".format(port), **whisper}}


def call(port: int, seconds: float, host: str = "127.0.0.1", **options) -> defer.Deferred:
    """A call placed by the L{place_call} core to C{host}:C{port}, hung up after C{seconds};
    C{options} are more L{CallOptions}. Fires with its report."""
    return defer.Deferred.fromCoroutine(
        place_call(CallOptions(host=host, port=port, hangup_after=seconds, **options), reactor)
    )


async def started(config):
    svc = makeService(config, reactor=reactor)
    svc.startService()
    await svc.ready.addTimeout(20, reactor)
    return svc


def finished(svc, n: int = 1) -> defer.Deferred:
    """
    Fires once C{n} calls have ended on C{svc} and every call record is in the store: what a
    test awaits before reading records or counters, instead of waiting a while.
    """
    d = defer.Deferred()

    def check(_session=None):
        if svc.registry.finished >= n and not d.called:
            d.callback(None)

    svc.registry.add_observer(check)
    check()
    return d.addCallback(lambda _: svc.records.when_saved()).addTimeout(30, reactor)


async def stopped(svc):
    api = svc.api_port.getHost().port if svc.api_port is not None else None
    await defer.maybeDeferred(svc.stopService).addTimeout(20, reactor)
    if api is not None:
        await api_connections_closed(api).addTimeout(5, reactor)


def api_connections_closed(port: int) -> defer.Deferred:
    """
    Fires once no server-side connection on the API's C{port} is left. The API does not
    close the connections of its HTTP clients at stop: each client closes its own, and the
    server reads that EOF (or a TLS close) some reactor turns later. This waits turn by
    turn for that, with no sleep.
    """
    from twisted.internet import tcp
    from twisted.internet.task import deferLater

    def left():
        return [
            s
            for s in reactor.getReaders() + reactor.getWriters()
            if isinstance(s, tcp.Server) and s.getHost().port == port
        ]

    async def wait():
        while left():
            await deferLater(reactor, 0, lambda: None)

    return defer.Deferred.fromCoroutine(wait())


@pytest_twisted.ensureDeferred
async def test_greeting_arrives_as_speech(redis_server, tmp_path):
    """
    A call to the AI port hears the greeting: at least a second of non-silent 8 kHz speech,
    in frames of the 8 kHz kind, and the server keeps sending frames (silence) after it.
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        report = await call(ai, 5.0).addTimeout(20, reactor)
    finally:
        await stopped(svc)
    assert report.connected and report.error is None
    assert report.rate_received == 8000
    assert report.speech_seconds >= 1.0
    assert report.first_speech_after is not None  # how soon is a benchmark figure, not a test
    # 5 s of call: a frame every 20 ms from connect to hang-up, give or take a few.
    assert report.frames_received >= 0.9 * 5.0 * 50
    assert report.hung_up_by == "client"


@pytest_twisted.ensureDeferred
async def test_garbage_closes_only_that_connection(redis_server, tmp_path):
    """
    A connection that sends garbage is closed, while a good call on the same port, already
    in progress, is untouched: its leg stays open, nothing else is refused, and the call
    ends when its client hangs up (not the server), having received every frame the
    server sent.
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        good = call(ai, 3.0)
        session = await svc.registry.when_started().addTimeout(10, reactor)
        good_leg = session.visitor

        class Garbage(protocol.Protocol):
            def __init__(self):
                self.lost = defer.Deferred()

            def connectionMade(self):
                self.transport.write(b"GET / HTTP/1.1\r\n\r\n")

            def connectionLost(self, reason):
                self.lost.callback(None)

        bad = Garbage()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ai), bad)
        await bad.lost.addTimeout(5, reactor)
        # The garbage is gone; the good call is still in progress, its leg open.
        assert not good_leg.when_closed().called and good_leg.close_reason is None
        assert svc.registry.sessions.get(session.uuid) is session
        report = await good.addTimeout(20, reactor)
        await session.flow.addTimeout(10, reactor)
    finally:
        await stopped(svc)
    assert dict(+svc.manager.refused) == {"first_frame_not_uuid": 1}
    assert report.error is None
    assert report.hung_up_by == "client"
    assert good_leg.close_reason is None and good_leg.hung_up_by == "peer"
    # Every frame the server sent arrived (but the one in flight when the client hung up).
    assert good_leg.stats.frames - 1 <= report.frames_received <= good_leg.stats.frames


@pytest_twisted.ensureDeferred
async def test_two_leg_call_authorized_by_keypad(redis_server, tmp_path):
    """
    Visitor types 101#; the http dialer's webhook connects the resident with the dial's leg
    UUID, who presses 1: the record in Redis reads authorized with apartment and resident, and
    both clients got the hangup frame after hearing audio.
    """
    # The dialer's webhook, behaving like Asterisk: it connects the resident's leg to the
    # address given, with the leg UUID given; the resident presses 1 (PRESSES_1).
    phone = Webhook(reactor, dtmf=PRESSES_1, seconds=40, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(phone))
    url = "http://127.0.0.1:{}/dial".format(web.getHost().port)
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, dialer={"kind": "http", "url": url})
    svc = await started(config)
    try:
        visitor = await call(ai, 60, dtmf=[(1.0, "101#")]).addTimeout(60, reactor)
        (resident,) = await defer.gatherResults(phone.calls).addTimeout(30, reactor)
        await finished(svc)
        calls = await svc.store.recent_calls(10)
        api = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)
        response = await treq.get(api + "/api/calls?limit=5", persistent=False)
        listed = await response.json()
    finally:
        await stopped(svc)
        await web.stopListening()
    (request,) = phone.requests
    assert request["uuid"] == visitor.uuid
    assert resident.uuid == request["leg_uuid"] != visitor.uuid
    assert request["dial"] == "SIP/1101"
    assert request["audiosocket"] == "127.0.0.1:{}".format(ret)
    (record,) = calls
    assert record["uuid"] == visitor.uuid
    assert record["outcome"] == "authorized"
    assert record["facts"]["apartment"] == "101"
    assert record["facts"]["resident"] == "Ana Souza"
    assert record["decision_input"] == "dtmf:1"
    assert visitor.hung_up_by == "server" and resident.hung_up_by == "server"
    assert visitor.speech_seconds > 3 and resident.speech_seconds > 3
    assert response.code == 200
    assert listed["calls"][0]["uuid"] == visitor.uuid


class DialCapture(resource.Resource):
    """An HTTP dialer's webhook that only accepts and keeps each dial request."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = defer.DeferredQueue()

    def render_POST(self, request):
        self.requests.put(json.loads(request.content.read()))
        request.setHeader(b"content-type", b"application/json")
        return b'{"accepted": true}'


@pytest_twisted.ensureDeferred
async def test_forged_resident_leg_with_the_session_uuid_is_refused(redis_server, tmp_path):
    """
    The attack: the visitor picks the session UUID and types 101#; while the phone rings, a
    second connection to the return port presents that same UUID and presses 1. It is
    refused before it hears anything and the call is not authorized by it; the real
    resident, with the leg UUID from the dial request, then joins and decides.
    """
    capture = DialCapture()
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(capture))
    url = "http://127.0.0.1:{}/dial".format(web.getHost().port)
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, dialer={"kind": "http", "url": url})
    chosen = str(uuid.uuid4())  # the visitor's side decides this one
    svc = await started(config)
    try:
        visitor = call(ai, 60, uuid=chosen, dtmf=[(1.0, "101#")])
        request = await capture.requests.get().addTimeout(30, reactor)
        attacker = await call(ret, 5, uuid=chosen, dtmf=[(0.5, "1")]).addTimeout(10, reactor)
        # The forgery was refused at once, before it heard a word, counted as unknown_uuid.
        session = svc.registry.sessions.get(uuid.UUID(chosen))
        assert session is not None and session.resident is None
        assert attacker.hung_up_by == "server-close"
        assert attacker.speech_seconds == 0
        assert svc.manager.refused["unknown_uuid"] == 1
        # The real resident answers the dial: its leg presents the dial's leg UUID. Keys
        # count only once the announcement and the question have played, so 1 is pressed
        # every few seconds.
        resident = await call(ret, 60, uuid=request["leg_uuid"], dtmf=PRESSES_1).addTimeout(70, reactor)
        visitor = await visitor.addTimeout(70, reactor)
        await finished(svc)
        (record,) = await svc.store.recent_calls(1)
    finally:
        await stopped(svc)
        await web.stopListening()
    # The dial's leg UUID is a fresh one, and it is what admitted the real resident.
    assert request["uuid"] == chosen
    assert request["leg_uuid"] != chosen
    assert record["uuid"] == chosen
    assert record["resident_leg_uuid"] == request["leg_uuid"]
    assert record["outcome"] == "authorized"
    assert record["decision_input"] == "dtmf:1"
    assert resident.hung_up_by == "server" and resident.speech_seconds > 3
    assert visitor.hung_up_by == "server"


@pytest_twisted.ensureDeferred
async def test_resident_leg_with_unknown_uuid_is_refused(redis_server, tmp_path):
    """A leg on the return port with a UUID the server never dialed is closed at once."""
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        report = await call(ret, 5, uuid=str(uuid.uuid4())).addTimeout(10, reactor)
    finally:
        await stopped(svc)
    assert report.hung_up_by == "server-close"
    assert svc.manager.refused["unknown_uuid"] == 1


@pytest_twisted.ensureDeferred
async def test_ipv4_pbx_allowed_on_a_dual_stack_bind(redis_server, tmp_path):
    """
    With bind = "::" an IPv4 PBX reaches the AI port as ::ffff:127.0.0.1; allowed_peers names
    127.0.0.1, so its call is answered (the listener used to refuse it as peer_not_allowed).
    """
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path, tmp_path, ai, ret, server={"bind": "::", "allowed_peers": ["127.0.0.1"]}
    )
    svc = await started(config)
    try:
        report = await call(ai, 3.0).addTimeout(20, reactor)
    finally:
        await stopped(svc)
    assert svc.manager.refused["peer_not_allowed"] == 0
    assert report.hung_up_by == "client"
    assert report.speech_seconds >= 1.0


class Whisper(resource.Resource):
    """
    A local OpenAI-compatible transcription endpoint. It cannot really recognise speech, so it
    answers by the length of the WAV it is sent: the visitor's long sentence, or the
    resident's short "sim". The request itself is real (multipart, a WAV of the utterance).
    """

    isLeaf = True

    def __init__(self, long_text: str, short_text: str):
        super().__init__()
        self.long_text = long_text
        self.short_text = short_text
        self.durations = []

    def render_POST(self, request):
        import email.parser
        import email.policy
        import io
        import wave

        assert request.path == b"/v1/audio/transcriptions"
        head = b"Content-Type: " + request.getHeader("content-type").encode() + b"\r\n\r\n"
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            head + request.content.read()
        )
        parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
        assert parts["language"].get_content().strip() == "pt"
        with wave.open(io.BytesIO(parts["file"].get_content())) as w:
            seconds = w.getnframes() / w.getframerate()
        self.durations.append(seconds)
        text = self.long_text if seconds > 2.0 else self.short_text
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"text": text}).encode()


def spoken_wav(path, text: str, rate: int = 8000):
    from audiosocket import audio
    from audiosocket.callclient import write_wav
    from audiosocket.speech.espeak import EspeakEngine

    pcm, native = EspeakEngine().synthesize(text)
    write_wav(path, audio.resample(pcm, native, rate), rate)
    return path


@pytest_twisted.ensureDeferred
async def test_full_voice_call(redis_server, tmp_path):
    """
    By voice end to end: the visitor's spoken sentence is endpointed, sent to the
    whisper-compatible server and understood; the resident says "sim"; the record reads
    authorized with intent, name, apartment and resident.
    """
    sentence = "Oi, sou o Pedro da Silva, vim entregar uma encomenda para a Ana do 101"
    whisper = Whisper(sentence, "sim")
    stt_web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(whisper))
    # The resident answers by voice after the question.
    phone = Webhook(
        reactor, wav=spoken_wav(tmp_path / "sim.wav", "sim"), wav_at=16.0, seconds=60, out=io.StringIO()
    )
    dial_web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(phone))
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path,
        tmp_path,
        ai,
        ret,
        dialer=webhook_dialer(dial_web.getHost().port),
        speech=whisper_speech(stt_web.getHost().port),
    )
    visitor_wav = spoken_wav(tmp_path / "visitor.wav", sentence)
    svc = await started(config)
    try:
        # The visitor starts talking over the greeting (barge-in) and then waits.
        visitor = await call(ai, 60, wav=visitor_wav, wav_at=3.0).addTimeout(70, reactor)
        await defer.gatherResults(phone.calls).addTimeout(30, reactor)
        await finished(svc)
        (record,) = await svc.store.recent_calls(1)
    finally:
        await stopped(svc)
        await stt_web.stopListening()
        await dial_web.stopListening()
    assert record["outcome"] == "authorized", record
    assert record["facts"] == {
        "intent": "entrega",
        "visitor_name": "Pedro da Silva",
        "apartment": "101",
        "resident": "Ana Souza",
    }
    assert record["decision_input"] == "voice"
    assert visitor.hung_up_by == "server"
    assert phone.requests[0]["dial"] == "SIP/1101"


class WidebandPeer(protocol.Protocol):
    """A bare AudioSocket peer sending 16 kHz audio (kind 0x12); keeps every frame it gets."""

    def __init__(self):
        from twisted.internet.task import LoopingCall

        self.decoder = wire.Decoder(expect_uuid=False)
        self.frames = []
        self.lost = defer.Deferred()
        self.loop = LoopingCall(lambda: self.transport.write(wire.audio(bytes(640), 16000)))
        self._speech_wanted = None

    def _speech_frames(self) -> int:
        return sum(1 for f in self.frames if f.is_audio and any(f.payload))

    def speech(self, n: int) -> defer.Deferred:
        """Fires once C{n} non-silent audio frames have arrived."""
        d = defer.Deferred()
        self._speech_wanted = (n, d)
        self._check_speech()
        return d

    def _check_speech(self):
        if self._speech_wanted and self._speech_frames() >= self._speech_wanted[0]:
            (_, d), self._speech_wanted = self._speech_wanted, None
            d.callback(None)

    def connectionMade(self):
        self.transport.write(wire.uuid_frame(uuid.uuid4()) + wire.audio(bytes(640), 16000))
        self.loop.start(0.02, now=False)

    def dataReceived(self, data):
        self.frames.extend(self.decoder.feed(data))
        self._check_speech()

    def connectionLost(self, reason):
        if self.loop.running:
            self.loop.stop()
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_16khz_leg_is_answered_in_16khz(redis_server, tmp_path):
    """A leg sending 16 kHz audio (kind 0x12) hears the greeting in 16 kHz frames."""
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        peer = WidebandPeer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ai), peer)
        await peer.speech(50).addTimeout(20, reactor)  # a second of greeting
        peer.transport.loseConnection()
        await peer.lost.addTimeout(5, reactor)
    finally:
        await stopped(svc)
    speech = [f for f in peer.frames if f.is_audio and any(f.payload)]
    assert len(speech) >= 50  # at least a second of greeting
    assert {f.kind for f in speech} == {wire.audio_kind(16000)}
    assert all(len(f.payload) == 640 for f in speech)


class _HeldPreloadTTS:
    """A synthesizer whose preload of the fixed prompts completes when the test says so."""

    name = "held"

    def __init__(self):
        self.preloading = defer.Deferred()
        self.asked = defer.Deferred()
        self.texts = []

    def synthesize(self, text, rate):
        return defer.succeed(bytes(rate // 50 * 2))

    def preload(self, texts, rate):
        self.texts = list(texts)
        # Told on the next reactor turn, once the start-up that asked has gone on as far
        # as it can without the prompts.
        reactor.callLater(0, self.asked.callback, None)
        return self.preloading


async def _ready_with(tts, tmp_path):
    from audiosocket.store import MemoryStore

    ai, ret = free_ports(2)
    config = config_for("/nonexistent/redis.sock", tmp_path, ai, ret)
    svc = makeService(config, reactor=reactor, store=MemoryStore(), tts=tts)
    svc.startService()
    return svc


@pytest_twisted.ensureDeferred
async def test_ready_fires_only_once_the_prompts_are_preloaded(tmp_path):
    """
    ready waits for the fixed prompts (greeting included) to be synthesized: with the
    extensions and the API up but the preload still running, it has not fired.
    """
    tts = _HeldPreloadTTS()
    svc = await _ready_with(tts, tmp_path)
    try:
        await tts.asked.addTimeout(10, reactor)
        assert svc.api_port is not None and len(svc.manager.extensions) == 1
        assert any(t.startswith("Condomínio Apoena, em que posso ajudar?") for t in tts.texts)
        assert not svc.ready.called
        tts.preloading.callback(None)
        assert await svc.ready.addTimeout(5, reactor) is svc
    finally:
        await stopped(svc)


@pytest_twisted.ensureDeferred
async def test_ready_fires_when_the_preload_fails(tmp_path):
    """A preload failure is logged, not fatal: the server still becomes ready."""
    tts = _HeldPreloadTTS()
    svc = await _ready_with(tts, tmp_path)
    try:
        await tts.asked.addTimeout(10, reactor)
        tts.preloading.errback(RuntimeError("synthesizer down"))
        assert await svc.ready.addTimeout(10, reactor) is svc
    finally:
        await stopped(svc)


# ---------------------------------------------------------------- [server] keys reaching the listeners


class BarePeer(protocol.Protocol):
    """A raw TCP peer: sends C{first} on connect (a UUID frame, or nothing) and waits."""

    def __init__(self, first: bytes = b""):
        self.first = first
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.first:
            self.transport.write(self.first)

    def connectionLost(self, reason):
        self.lost.callback(None)


async def connect_from(source: str, port: int, peer: BarePeer) -> BarePeer:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    await connectProtocol(endpoint, peer)
    return peer


@pytest_twisted.ensureDeferred
async def test_allowed_peers_from_the_config_reach_the_listeners(redis_server, tmp_path):
    """
    [server] allowed_peers = ["127.0.0.2"]: a PBX connecting from 127.0.0.1 is refused as
    peer_not_allowed on both ports, one from 127.0.0.2 is answered.
    """
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, server={"allowed_peers": ["127.0.0.2"]})
    svc = await started(config)
    try:
        for port in (ai, ret):
            stranger = await connect_from("127.0.0.1", port, BarePeer(wire.uuid_frame(uuid.uuid4())))
            await stranger.lost.addTimeout(10, reactor)
        assert svc.manager.refused["peer_not_allowed"] == 2
        allowed = BarePeer(wire.uuid_frame(uuid.uuid4()))
        starting = svc.registry.when_started()
        await connect_from("127.0.0.2", ai, allowed)
        session = await starting.addTimeout(10, reactor)
        assert not allowed.lost.called
        allowed.transport.loseConnection()
        await allowed.lost.addTimeout(10, reactor)
        await session.flow.addTimeout(10, reactor)
    finally:
        await stopped(svc)
    assert svc.manager.refused["peer_not_allowed"] == 2


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_from_the_config_reaches_the_listeners(redis_server, tmp_path):
    """
    [server] handshake_timeout_s = 0.5: both ports' leg factories have it, and a peer that
    connects and never sends its UUID is closed as handshake_timeout.
    """
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, server={"handshake_timeout_s": 0.5})
    svc = await started(config)
    try:
        extension = svc.manager.get(1)
        assert extension.ai_factory.handshake_timeout == 0.5
        assert extension.return_factory.handshake_timeout == 0.5
        silent = await connect_from("127.0.0.1", ai, BarePeer())
        await silent.lost.addTimeout(10, reactor)
    finally:
        await stopped(svc)
    assert svc.manager.refused["handshake_timeout"] == 1


@pytest_twisted.ensureDeferred
async def test_port_fallback_around_a_port_really_in_use(redis_server, tmp_path):
    """
    With port_fallback on, an AI port already bound by another program (a real socket,
    "address in use") is replaced by the free port of the fallback range, and a call to
    that port is answered; the return port, free, is kept.
    """
    ai, ret, spare = free_ports(3)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ai))
    squatter.listen(1)
    try:
        config = config_for(
            redis_server.path,
            tmp_path,
            ai,
            ret,
            server={"port_fallback": True, "port_fallback_range": [spare, spare]},
        )
        svc = await started(config)
        try:
            extension = svc.manager.get(1)
            assert (extension.bound_ai_port, extension.bound_return_port) == (spare, ret)
            report = await call(spare, 1.0).addTimeout(20, reactor)
        finally:
            await stopped(svc)
    finally:
        squatter.close()
    assert report.connected and report.speech_seconds > 0


@pytest_twisted.ensureDeferred
async def test_a_port_really_in_use_without_fallback_fails_the_extension(redis_server, tmp_path):
    """Without port_fallback the same busy port leaves the extension failed, naming the port."""
    ai, ret = free_ports(2)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ai))
    squatter.listen(1)
    try:
        svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
        try:
            extension = svc.manager.get(1)
            status, error = extension.status, extension.error
        finally:
            await stopped(svc)
    finally:
        squatter.close()
    assert status == "failed"
    assert str(ai) in error
