"""
A bench for the doorman flow: real legs, registry, flow and audio clock on StringTransports
and a task.Clock, so every branch of a call runs in exact time with no sockets.

What a leg heard is read back from its transport: the stand-in synthesizer gives each text
its own constant sample value, so each outbound frame names the prompt it belongs to.
"""

from __future__ import annotations

import struct
import uuid as _uuid

from attrs import define, field
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from audiosocket import wire
from audiosocket.clock import AudioClock
from audiosocket.config import FlowConfig, PrivacyConfig
from audiosocket.dialer import DialFailed, IDialer
from audiosocket.flow.call import DoormanFlow, Site
from audiosocket.flow.directory import Apartment, Directory
from audiosocket.flow.prompts import Prompts
from audiosocket.leg import RESIDENT, VISITOR, LegFactory
from audiosocket.model import Extension
from audiosocket.session import SessionRegistry
from audiosocket.flow.understand import RulesNLU
from audiosocket.listen import ListenSettings, Utterance
from audiosocket.speech.stt import ISTT, STTError
from audiosocket.speech.tts import ITTS

DIRECTORY = Directory(
    [
        Apartment("101", ("Ana Souza", "Carlos Souza"), "SIP/1101"),
        Apartment("102", ("João Pereira",), "SIP/1102"),
        Apartment("501", ("Gabriela Ribeiro",), "SIP/1501"),
    ]
)
EXTENSION = Extension(
    id=7,
    ai_extension="1001",
    ai_port=8080,
    return_extension="1002",
    return_port=8081,
    host="10.0.0.2",
    condominium_id=1,
)


@implementer(ITTS)
class LabelTTS:
    """Each distinct text becomes PCM of one constant sample value (its label), 0.2 s long."""

    name = "label"
    frames = 10

    def __init__(self):
        self.labels: dict[str, int] = {}
        self.texts: list[str] = []
        self.fail = False

    def label(self, text: str) -> int:
        if text not in self.labels:
            self.labels[text] = len(self.labels) + 1
            self.texts.append(text)
        return self.labels[text]

    def synthesize(self, text: str, rate: int):
        if self.fail:
            return defer.fail(RuntimeError("synthesizer broken"))
        value = self.label(text)
        samples = rate // 50 * self.frames
        return defer.succeed(struct.pack("<h", value) * samples)


@implementer(IDialer)
class ScriptedDialer:
    """Records requests; answers each with what C{script} says (None = accepted)."""

    name = "scripted"

    def __init__(self):
        self.requests = []
        self.script = []  # per attempt: None (accept) or a DialFailed
        self.on_dial = None
        self.cancels = []  # the leg UUIDs cancelled, in order
        self.handoffs = []  # (uuid, action, argument), in order
        #: What a hand-off gets: None (acknowledged), an exception, or "never".
        self.handoff_result = None
        self.notices = []  # the events of notify(), in order

    def cancel(self, leg_uuid):
        self.cancels.append(leg_uuid)
        return defer.succeed(None)

    def handoff(self, uuid, action, argument):
        self.handoffs.append((uuid, action, argument))
        if isinstance(self.handoff_result, Exception):
            return defer.fail(self.handoff_result)
        if self.handoff_result == "never":
            return defer.Deferred()
        return defer.succeed(None)

    def notify(self, event):
        self.notices.append(event)
        return defer.succeed(None)

    def dial(self, request):
        self.requests.append(request)
        outcome = self.script.pop(0) if self.script else None
        if self.on_dial is not None:
            self.on_dial(request)
        if isinstance(outcome, DialFailed):
            return defer.fail(outcome)
        return defer.succeed(None)


@implementer(ISTT)
class ScriptedSTT:
    """Speech "recognised" from a script: an utterance's PCM carries the index of its text."""

    name = "scripted"

    def __init__(self):
        self.texts: list[str] = []
        self.fail = False
        self.heard: list[str] = []

    def utterance(self, text: str, rate: int = 8000) -> Utterance:
        self.texts.append(text)
        pcm = struct.pack("<h", len(self.texts)) * (rate // 50)
        return Utterance(pcm=pcm, rate=rate, started_at=0.0, ended_at=0.5, reason="silence")

    def transcribe(self, pcm: bytes, rate: int):
        if self.fail:
            return defer.fail(STTError("connection", "recognizer down"))
        (index,) = struct.unpack_from("<h", pcm)
        text = self.texts[index - 1]
        self.heard.append(text)
        return defer.succeed(text)


class StubListener:
    """Stands in for the endpointer: the test hands utterances in directly."""

    def __init__(self, leg):
        self.leg = leg
        self.utterances = defer.DeferredQueue()
        self.running = False
        self.settings = ListenSettings()

    def start(self):
        self.running = True

    def stop(self):
        self.running = False
        for d in list(self.utterances.waiting):
            d.cancel()

    def flush(self):
        del self.utterances.pending[:]


@define
class FakeExtensionService:
    extension: Extension
    bound_return_port: int = 8081


@define(eq=False)
class Peer:
    """One connected leg and what it received."""

    leg: object
    transport: StringTransport
    heard: list = field(factory=list)  # labels of non-silent frames, in order
    frames: int = 0
    counts: dict = field(factory=dict)  # label → frames heard
    hangup_after_audio: bool | None = None
    lost: bool = False
    _decoder: wire.Decoder = field(factory=lambda: wire.Decoder(expect_uuid=False))

    def read(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        for frame in self._decoder.feed(data):
            if frame.kind == wire.Kind.HANGUP:
                self.hangup_after_audio = self.frames > 0
                continue
            self.frames += 1
            (value,) = struct.unpack_from("<h", frame.payload)
            if value:
                self.counts[value] = self.counts.get(value, 0) + 1
            if value and (not self.heard or self.heard[-1] != value):
                self.heard.append(value)

    @property
    def got_hangup(self) -> bool:
        return self.hangup_after_audio is not None

    def press(self, keys: str) -> None:
        for key in keys:
            self.leg.dataReceived(wire.dtmf(key))

    def drop(self) -> None:
        """The peer hangs up the way Asterisk does: by closing TCP."""
        self.transport.loseConnection()
        self.lost = True
        self.leg.connectionLost()


class Bench:
    def __init__(
        self, *, max_calls=100, dialer=None, flow=None, voice=False, privacy=None, **flow_overrides
    ):
        self.reactor = Clock()
        self.clock = AudioClock(reactor=self.reactor)
        self.clock.startService()
        self.tts = LabelTTS()
        self.dialer = dialer or ScriptedDialer()
        settings = dict(
            ring_timeout_s=30,
            attempts=2,
            max_call_s=180,
            dtmf_timeout_s=3.0,
            decision_timeout_s=10.0,
            max_retries=2,
            wait_message_interval_s=15.0,
        )
        settings.update(flow_overrides)
        self.config = FlowConfig(**settings)
        self.prompts = Prompts()
        self.site = Site(
            1,
            "Condomínio Apoena",
            "Condomínio Apoena, em que posso ajudar?",
            DIRECTORY,
            self.prompts,
            flow=self.config,
        )
        self.stt = ScriptedSTT() if voice else None
        self.listeners: dict = {}
        self.flow = flow or DoormanFlow(
            tts=self.tts,
            dialer=self.dialer,
            sites=lambda cid: self.site,
            reactor=self.reactor,
            stt=self.stt,
            nlu=RulesNLU() if voice else None,
            listener_for=self._listener if voice else None,
            privacy=privacy or PrivacyConfig(),
        )
        self.records = []
        self.registry = SessionRegistry(
            reactor=self.reactor,
            run_flow=self.flow.run,
            run_busy=self.flow.run_busy,
            max_calls=max_calls,
            max_call_s=self.config.max_call_s,
            on_end=lambda s: self.records.append(s.record()),
            # As the service wires it: the limit is the condominium's Site.max_calls (every
            # condominium id is served by the bench's one site, as in sites= above).
            condominium_limit=lambda cid: self.site.max_calls,
        )
        self.service = FakeExtensionService(EXTENSION)
        self.ai = self._factory(VISITOR)
        self.ret = self._factory(RESIDENT)
        self.peers: list[Peer] = []

    def _listener(self, leg, audio_config):
        listener = self.listeners[leg] = StubListener(leg)
        return listener

    def say(self, peer: "Peer", text: str) -> None:
        """The peer says C{text} (as its endpointer would deliver it)."""
        self.listeners[peer.leg].utterances.put(self.stt.utterance(text))

    def _factory(self, role, service=None, **options):
        service = service or self.service
        return LegFactory(
            role,
            self.clock,
            lambda leg: self.registry.on_leg(service, leg),
            reactor=self.reactor,
            **options,
        )

    def connect(self, role=VISITOR, uuid=None, *, factory=None, host="127.0.0.1") -> Peer | None:
        """
        A peer at C{host} connects to C{factory} (default: the AI or return port, by C{role})
        and sends its UUID; L{None} when the factory refuses the connection itself.
        """
        if factory is None:
            factory = self.ai if role == VISITOR else self.ret
        addr = IPv4Address("TCP", host, 40000 + len(self.peers))
        leg = factory.buildProtocol(addr)
        if leg is None:
            return None
        transport = StringTransport(peerAddress=addr)
        leg.makeConnection(transport)
        leg.dataReceived(wire.uuid_frame(uuid or _uuid.uuid4()))
        peer = Peer(leg, transport)
        self.peers.append(peer)
        return peer

    def leg_uuid_for(self, visitor: Peer) -> _uuid.UUID:
        """The leg UUID of the latest dial request made for C{visitor}'s call."""
        session = str(visitor.leg.uuid)
        requests = [r for r in self.dialer.requests if r.uuid == session]
        assert requests, "no dial request for call {}".format(session)
        return _uuid.UUID(requests[-1].leg_uuid)

    def resident_for(self, visitor: Peer) -> Peer:
        """The resident answers the latest dial for C{visitor}'s call, as the PBX would."""
        return self.connect(RESIDENT, self.leg_uuid_for(visitor))

    def text(self, name: str, **values) -> int:
        return self.tts.label(self.prompts.say(name, **values))

    def advance(self, seconds: float) -> None:
        for _ in range(int(round(seconds / 0.02))):
            self.reactor.advance(0.02)
            for peer in self.peers:
                peer.read()
                if peer.transport.disconnecting and not peer.lost:
                    # The server closed the connection: deliver what a real socket would.
                    peer.lost = True
                    peer.leg.connectionLost()

    def until(self, predicate, max_s: float = 600.0) -> None:
        steps = int(max_s / 0.02)
        for _ in range(steps):
            if predicate():
                return
            self.advance(0.02)
        raise AssertionError("condition not reached in {} s".format(max_s))

    def heard(self, peer: Peer, name: str, **values) -> bool:
        return self.text(name, **values) in peer.heard

    def asked(self, peer: Peer, name: str, **values) -> bool:
        """Whether C{peer} has heard the prompt C{name} out (the resident answers after it)."""
        return self.heard(peer, name, **values) and not peer.leg.playing

    def ended(self) -> bool:
        return len(self.registry) == 0 and len(self.records) > 0

    def leftovers(self) -> list:
        """DelayedCalls still pending other than the audio clock's own tick."""
        return [c for c in self.reactor.getDelayedCalls() if c.active() and "LoopingCall" not in repr(c.func)]

    def stop(self) -> None:
        self.clock.stopService()


def start_call(bench: Bench, keys: str = "101#") -> Peer:
    """A visitor calls and types C{keys} once the greeting has started."""
    visitor = bench.connect()
    bench.advance(0.1)
    visitor.press(keys)
    return visitor
