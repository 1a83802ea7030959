# -*- test-case-name: tests.test_leg,tests.test_leg_tcp,tests.test_listen,tests.test_session -*-
"""
One TCP connection from Asterisk is one call leg.

The leg decodes frames into its own bounded L{DeferredQueue}s (audio, and events: DTMF and
hangup) and plays outbound audio through the shared L{AudioClock}: one frame per tick,
speech when some is queued, silence otherwise. It never decides what to say; the code that
does (the flow) gets the leg once its UUID is known, through the factory's C{on_leg}.

Input is bounded everywhere, so one peer can neither stall nor flood the others: events a
second per leg, bytes buffered for a peer that does not read, connections per port and per
peer address, connections still in their handshake, audio ahead of real time, the sample
rates a peer may choose and how often it may switch. Hitting a bound closes that ONE
connection with a logged reason code, counted on the factory (C{refused}, exported by
L{audiosocket.metrics} as C{audiosocket_refused_connections_total{reason}}); no other leg
notices. The bounds and their reason codes (defaults from C{[limits]} in the config):

  - C{max_connections_per_port} (200): accepted connections open on one port →
    C{too_many_connections}, closed at accept, before any byte is read.
  - C{max_connections_per_peer} (400): connections from one address over every port of
    the manager → C{too_many_from_peer}. Asterisk is one peer carrying every call, so this
    must cover the whole call capacity (two legs a call, plus turned-away calls).
  - C{max_handshakes_per_port} (64): connections that have not sent their UUID yet →
    C{too_many_handshakes}; such a connection is not paced by the clock (it costs no tick)
    and is closed after C{handshake_timeout} (C{handshake_timeout}).
  - C{events_per_s}, C{event_burst} (20/s, 40): a token bucket of keypad (DTMF) frames →
    C{event_flood}. A person presses at most ~10 keys a second. The decoder is driven one
    frame at a time, so a read of 400 KB of DTMF frames costs C{event_burst} frames of
    work before the leg closes, not 100,000.
  - C{audio_burst_s} (2 s): a token bucket of audio received ahead of real time, refilled
    at one second per second up to its capacity: a peer silent for a minute may not then
    send a minute at once → C{audio_flood}.
  - C{max_unsent_kb}, C{slow_reader_s} (64 KiB, 5 s): the leg is a streaming producer on
    its transport; when more than C{max_unsent_kb} wait to be sent Twisted pauses it, and
    a paused leg writes nothing (its playout waits). Paused longer than C{slow_reader_s} →
    C{slow_reader}, and the connection is aborted rather than left flushing to a peer that
    does not read.
  - C{rates} (8000 … 48000): the audio kinds a peer may send; another kind →
    C{rate_not_allowed}, refused at its 3-byte header.
  - C{max_rate_switches} (5): changes of audio kind in one leg. The first is logged; the
    rest are only counted (a line a frame for a peer alternating kinds would flood the
    log); one more closes the leg → C{rate_flapping}.

Malformed input (first frame not a UUID, unknown kind, …) closes the leg the same way with
the decoder's reason code (L{audiosocket.wire}).
"""

from __future__ import annotations

import collections
import uuid as _uuid
from typing import Callable, Iterable

from attrs import frozen
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import wire
from .clock import AudioClock, FrameStats
from .peers import peer_allowed
from .reactors import default_reactor

VISITOR = "visitor"
RESIDENT = "resident"


@frozen
class Dtmf:
    digit: str


@frozen
class Hangup:
    """The leg ended. C{by} is "peer" (Asterisk closed TCP), "server" or "error"."""

    by: str
    reason: str = ""


class Refused(Exception):
    """
    Raised by an C{on_leg} handler to turn a leg away (reason code, message).
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


class _Played:
    """One queued piece of outbound audio and the Deferred told when it has played."""

    __slots__ = ("pcm", "offset", "rate", "header", "size", "done")

    def __init__(self, pcm: bytes, rate: int, done: defer.Deferred):
        size = wire.frame_bytes(rate)
        remainder = len(pcm) % size
        if remainder:
            pcm = pcm + bytes(size - remainder)
        self.pcm = pcm
        self.offset = 0
        self.rate = rate
        self.size = size
        self.header = wire.HEADER.pack(wire.audio_kind(rate), size)
        self.done = done


class TokenBucket:
    """
    C{rate} tokens a second, up to C{capacity}; starts full. Tokens do not accrue beyond
    the capacity, so time spent idle never buys more than one burst.
    """

    __slots__ = ("rate", "capacity", "tokens", "at")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.at = now

    def take(self, amount: float, now: float) -> bool:
        """Take C{amount} tokens at time C{now}; C{False} (and nothing taken) if short."""
        tokens = self.tokens + (now - self.at) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.at = now
        if tokens + 1e-9 < amount:
            self.tokens = tokens
            return False
        self.tokens = tokens - amount
        return True


#: Audio rates a peer may use by default: every AudioSocket kind up to 48 kHz.
DEFAULT_RATES = (8000, 12000, 16000, 24000, 32000, 44100, 48000)


_SILENCE: dict[int, bytes] = {}


def silence_frame(rate: int) -> bytes:
    """The encoded 20 ms silence frame at C{rate}, built once per rate."""
    frame = _SILENCE.get(rate)
    if frame is None:
        frame = _SILENCE[rate] = wire.audio(bytes(wire.frame_bytes(rate)), rate)
    return frame


@implementer(IPushProducer)
class AudioSocketProtocol(Protocol):
    """
    One call leg. Public surface for the flow:

      - C{uuid}, C{role}, C{rate} (sample rate the peer uses; replies use the same kind)
      - C{audio}: L{DeferredQueue} of inbound PCM frames (bytes) at C{rate}
      - C{events}: L{DeferredQueue} of L{Dtmf} and L{Hangup}
      - C{play(pcm)}, C{stop_playback()}, C{hangup()}, C{when_closed()}
    """

    log = Logger()

    def __init__(self, factory: "LegFactory"):
        self.factory = factory
        self.role = factory.role
        self.uuid: _uuid.UUID | None = None
        self.rate = 8000
        self.peer = None
        self.port = None
        self.audio = defer.DeferredQueue(size=factory.audio_queue_frames)
        self.events = defer.DeferredQueue(size=factory.event_queue_size)
        self.stats = FrameStats()
        self.audio_dropped = 0
        self.frames_in = 0
        #: The last audio frame received and sent (references, kept for the level meter).
        self.last_in: bytes = b""
        self.last_out: bytes = b""
        self.closed = False
        self.close_reason: str | None = None
        self.hung_up_by: str | None = None
        self._decoder = wire.Decoder(
            max_audio_payload=factory.max_audio_payload, rates=factory.rates
        )
        now = factory.reactor.seconds()
        self._event_bucket = TokenBucket(factory.events_per_s, factory.event_burst, now)
        self._audio_bucket: TokenBucket | None = None  # from the first audio frame
        self.rate_switches = 0
        self._producing = False  # registered as the transport's producer
        self._paused = False
        self._slow_timer = None
        self._out: collections.deque[_Played] = collections.deque()
        self._hangup_requested = False
        self._hangup_sent = False
        self._closed_waiters: list[defer.Deferred] = []
        self._lost = False
        self._handshake_timer = None
        self._audio_started: float | None = None
        self._audio_waiters: list[defer.Deferred] = []
        self._socket = None
        self._last_audio_kind = -1
        self._last_audio_size = -1

    # ------------------------------------------------------------ connection

    def connectionMade(self):
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            # Frames must leave whole and at once: Asterisk hangs up when a frame's
            # payload arrives in pieces more than ~5 ms apart.
            transport.setTcpNoDelay(True)
        self._socket = direct_socket(transport)
        self.peer = transport.getPeer()
        self.port = getattr(transport.getHost(), "port", None)
        if hasattr(transport, "registerProducer"):
            # Twisted pauses the leg once more than max_unsent_kb wait to be sent.
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = self.factory.max_unsent_kb * 1024
            transport.registerProducer(self, True)
            self._producing = True
        self._handshake_timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._handshake_expired
        )
        # Not paced until its UUID arrives (Asterisk sends it at once): a connection that
        # never identifies itself costs no clock tick.

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self) -> None:
        """The transport holds more than C{max_unsent_kb}: write nothing until it drains."""
        self._paused = True
        if self._slow_timer is None and not self.closed:
            self._slow_timer = self.factory.reactor.callLater(
                self.factory.slow_reader_s, self._slow_reader
            )

    def resumeProducing(self) -> None:
        self._paused = False
        if self._slow_timer is not None:
            if self._slow_timer.active():
                self._slow_timer.cancel()
            self._slow_timer = None

    def stopProducing(self) -> None:
        # The connection is going away; connectionLost does the cleaning up.
        pass

    def _slow_reader(self) -> None:
        self._slow_timer = None
        self.abort(
            "slow_reader",
            "peer read nothing for {} s with {} KiB unsent".format(
                self.factory.slow_reader_s, self.factory.max_unsent_kb
            ),
        )

    # ------------------------------------------------------------ inbound

    def dataReceived(self, data: bytes):
        if self.closed or self._hangup_sent:
            return
        # The usual read: exactly one audio frame of the size the last one had, nothing
        # buffered. Handled without the decoder's buffer and Frame (same checks: the kind
        # and length match a frame the decoder already accepted).
        if (
            len(data) == self._last_audio_size
            and data[0] == self._last_audio_kind
            and not self._decoder.buffered
            and (data[1] << 8 | data[2]) == len(data) - wire.HEADER_SIZE
        ):
            self._audio(data[0], data[wire.HEADER_SIZE :])
            return
        # One frame decoded at a time: once a bound closes the leg, the rest of this read
        # is never decoded (a 64 KiB read can hold 16,000 keypad frames).
        frames = self._decoder.frames(data)
        try:
            for frame in frames:
                self._frame(frame)
                if self.closed:
                    break
        except wire.ProtocolError as e:
            self.abort(e.reason, str(e))
        finally:
            frames.close()

    def _frame(self, frame: wire.Frame) -> None:
        kind = frame.kind
        if kind in wire.AUDIO_KINDS:
            self._audio_frame(frame)
        elif kind == wire.Kind.UUID:
            self._uuid_frame(frame)
        elif kind == wire.Kind.DTMF:
            if not self._event_bucket.take(1, self.factory.reactor.seconds()):
                self.abort(
                    "event_flood",
                    "more than {} keypad events at once, or {} a second".format(
                        self.factory.event_burst, self.factory.events_per_s
                    ),
                )
                return
            self._put_event(Dtmf(frame.payload.decode("ascii")))
        elif kind == wire.Kind.HANGUP:
            # Asterisk hangs up by closing TCP; a peer that says it first is honoured.
            self.hung_up_by = "peer"
            self._put_event(Hangup("peer", "hangup frame"))
            self._close_transport(flush=True)

    def _uuid_frame(self, frame: wire.Frame):
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        uuid = wire.parse_uuid(frame)
        factory = self.factory
        if uuid in factory.live:
            self.abort(
                "uuid_in_use",
                "UUID {} already has a live leg on this port".format(uuid),
            )
            return
        self.uuid = uuid
        factory.live[uuid] = self
        factory.handshaking.discard(self)
        # Asterisk's AudioSocket() hangs up after 2 s with no audio either way, so the leg
        # is paced (silence until there is something to say) from its UUID on.
        factory.clock.add(self)
        self.log.info(
            "{role} leg {uuid} connected from {peer} on port {port}",
            role=self.role,
            uuid=str(uuid),
            peer=_addr(self.peer),
            port=self.port,
        )
        try:
            factory.on_leg(self)
        except Refused as e:
            self.abort(e.reason, str(e))
        except Exception:
            self.log.failure("handler failed for leg {uuid}", uuid=str(uuid))
            self.abort("handler_error", "internal error starting the call")

    def _audio_frame(self, frame: wire.Frame):
        self._last_audio_kind = frame.kind
        self._last_audio_size = wire.HEADER_SIZE + len(frame.payload)
        self._audio(frame.kind, frame.payload)

    def _audio(self, kind: int, payload: bytes):
        rate = wire.RATE_OF_KIND[kind]
        if rate != self.rate:
            if self.frames_in:
                self.rate_switches += 1
                if self.rate_switches > self.factory.max_rate_switches:
                    self.abort(
                        "rate_flapping",
                        "audio kind changed {} times".format(self.rate_switches),
                    )
                    return
                if self.rate_switches == 1:
                    # Only the first: a peer alternating kinds would log a line a frame.
                    self.log.info(
                        "leg {uuid} switched audio from {old} Hz to {new} Hz",
                        uuid=str(self.uuid),
                        old=self.rate,
                        new=rate,
                    )
            self.rate = rate
        self.frames_in += 1
        self.last_in = payload
        now = self.factory.reactor.seconds()
        bucket = self._audio_bucket
        if bucket is None:
            self._audio_started = now
            bucket = self._audio_bucket = TokenBucket(1.0, self.factory.audio_burst_s, now)
            waiters, self._audio_waiters = self._audio_waiters, []
            for d in waiters:
                d.callback(rate)
        if not bucket.take(len(payload) / (2.0 * rate), now):
            self.abort(
                "audio_flood",
                "peer sent more than {} s of audio ahead of real time".format(
                    self.factory.audio_burst_s
                ),
            )
            return
        queue = self.audio
        if len(queue.pending) >= queue.size:
            # Nobody is listening fast enough (or at all, in keypad-only steps): keep the
            # newest audio, which is what an endpointer wants when it starts listening.
            del queue.pending[0]
            self.audio_dropped += 1
        queue.put(payload)

    def _put_event(self, event):
        try:
            self.events.put(event)
        except defer.QueueOverflow:
            self.abort("event_flood", "more than {} unread events".format(self.events.size))

    def _handshake_expired(self):
        self._handshake_timer = None
        self.abort(
            "handshake_timeout",
            "no UUID frame within {} s".format(self.factory.handshake_timeout),
        )

    def abort(self, reason: str, message: str) -> None:
        """Close this leg because of bad input or a refusal; logged and counted."""
        if self.closed:
            return
        self.close_reason = reason
        self.hung_up_by = "error"
        self.factory.count_refused(reason)
        self.log.warn(
            "closing {role} leg {uuid} from {peer} on port {port}: {message} [{reason}]",
            role=self.role,
            uuid=str(self.uuid) if self.uuid else "-",
            peer=_addr(self.peer),
            port=self.port,
            message=message,
            reason=reason,
        )
        self._stop_everything()
        self._close_transport()

    def _close_transport(self, flush: bool = False) -> None:
        """
        Close the connection. A refusal (C{flush} false) aborts it when bytes are still
        waiting to be sent: a peer that does not read must not keep the connection, and
        the bytes, alive. A hangup flushes them (the goodbye must play); the flow bounds
        how long that may take.
        """
        transport = self.transport
        if self._producing:
            # A registered producer keeps loseConnection waiting for it forever.
            self._producing = False
            transport.unregisterProducer()
        if not flush and _unsent(transport):
            transport.abortConnection()
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone):
        if not self.closed and not self._hangup_sent:
            try:
                self._decoder.finish()
            except wire.ProtocolError as e:
                self.factory.count_refused(e.reason)
                self.close_reason = e.reason
                self.log.warn(
                    "{role} leg {uuid} closed mid-frame: {message}",
                    role=self.role,
                    uuid=str(self.uuid) if self.uuid else "-",
                    message=str(e),
                )
        by = self.hung_up_by or ("server" if self._hangup_sent else "peer")
        self.hung_up_by = by
        self._stop_everything()
        if self.uuid is not None and self.factory.live.get(self.uuid) is self:
            del self.factory.live[self.uuid]
        self._lost = True
        try:
            # Wakes a flow waiting on events; a full queue means nobody reads it anyway.
            self.events.put(Hangup(by, self.close_reason or ""))
        except defer.QueueOverflow:
            pass
        for d in list(self.audio.waiting):
            d.cancel()
        self.log.info(
            "{role} leg {uuid} ended (hung up by {by}), {frames} frames sent",
            ext=self.factory.ext,
            role=self.role,
            uuid=str(self.uuid) if self.uuid else "-",
            by=by,
            frames=self.stats.frames,
        )
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(self)

    def _stop_everything(self):
        self.closed = True
        self.factory.clock.remove(self)
        self._decoder.discard()
        for name in ("_handshake_timer", "_slow_timer"):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)
        self._drop_playback()

    # ------------------------------------------------------------ outbound

    def play(self, pcm: bytes, rate: int | None = None) -> defer.Deferred:
        """
        Queue C{pcm} (s16le mono at C{rate}, default the leg's rate) for playout.

        @return: a Deferred firing C{True} once its last frame has been sent, or C{False}
            if it was dropped (L{stop_playback}, hangup of the leg).
        """
        if self.closed or self._hangup_requested:
            return defer.succeed(False)
        if not pcm:
            return defer.succeed(True)
        d = defer.Deferred()
        self._out.append(_Played(pcm, rate or self.rate, d))
        return d

    @property
    def playing(self) -> bool:
        return bool(self._out)

    @property
    def queued_seconds(self) -> float:
        return sum((len(p.pcm) - p.offset) / (2.0 * p.rate) for p in self._out)

    def stop_playback(self) -> int:
        """Drop all queued outbound audio (barge-in). Returns the frames dropped."""
        return self._drop_playback()

    def _drop_playback(self) -> int:
        # Detach the queue before telling anyone: a callback may queue new audio at once
        # (the goodbye after a barge-in), and that must not be dropped with the old.
        items, self._out = self._out, collections.deque()
        dropped = 0
        for item in items:
            dropped += (len(item.pcm) - item.offset) // item.size
        for item in items:
            item.done.callback(False)
        return dropped

    def hangup(self) -> defer.Deferred:
        """
        Send the hangup frame once everything queued has played, then close.

        @return: a Deferred firing when the connection is gone.
        """
        d = self.when_closed()
        if not self.closed:
            self._hangup_requested = True
        return d

    def when_audio(self) -> defer.Deferred:
        """
        A Deferred firing with the peer's sample rate once its first audio frame has arrived
        (at once if it already has): the flow waits for it, briefly, before its first prompt,
        so the greeting goes out in the audio kind the peer uses.
        """
        if self._audio_started is not None:
            return defer.succeed(self.rate)
        d = defer.Deferred(lambda d: self._audio_waiters.remove(d))
        self._audio_waiters.append(d)
        return d

    def when_closed(self) -> defer.Deferred:
        """A Deferred firing with this leg once its connection is gone."""
        if self._lost:
            return defer.succeed(self)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    def _write(self, data: bytes) -> None:
        write_now(self.transport, self._socket, data)

    def tick(self, frames: int, now: float) -> None:
        """Called by the clock: write C{frames} frames (speech if queued, else silence)."""
        if self._paused:
            return  # the peer is not reading: no more bytes for it (see pauseProducing)
        write = self._write
        out = self._out
        sent = 0
        for _ in range(frames):
            if out:
                item = out[0]
                start = item.offset
                end = start + item.size
                frame = item.header + item.pcm[start:end]
                write(frame)
                self.last_out = frame
                if end >= len(item.pcm):
                    out.popleft()
                    item.done.callback(True)
                else:
                    item.offset = end
            elif self._hangup_requested:
                break
            else:
                self.last_out = silence = silence_frame(self.rate)
                write(silence)
            sent += 1
        if sent:
            self.stats.sent(sent, now)
        if self._hangup_requested and not out:
            # Everything queued has played (possibly on this very tick): hang up now.
            self._send_hangup()

    def _send_hangup(self):
        self._hangup_sent = True
        self.hung_up_by = "server"
        self.factory.clock.remove(self)
        self.transport.write(wire.HANGUP_FRAME)
        self._close_transport(flush=True)


def write_now(transport, sock, data: bytes) -> None:
    """
    Send one frame now if C{transport} has nothing buffered, else queue it behind what is
    (order is kept either way). Twisted's C{write} only buffers and registers the socket for
    writing; the send happens on the next reactor iteration, costing two epoll_ctl calls and
    a dispatch per frame. The clock writes one small frame per leg every 20 ms, so a direct
    send is most of the per-leg cost saved. C{sock} is L{direct_socket}'s answer (C{None}:
    always Twisted's buffered write).
    """
    if sock is not None:
        t = transport
        if (
            not t._tempDataLen
            and t.offset == len(t.dataBuffer)
            and t.connected
            and not t.disconnecting
            and not t._writeDisconnected
        ):
            try:
                sent = sock.send(data)
            except OSError:
                # Would block, interrupted, or broken: Twisted's write queues the rest and
                # finds a broken connection its own way.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def _unsent(transport) -> int:
    """Bytes a Twisted TCP transport holds that it has not sent yet (0 for others)."""
    data = getattr(transport, "dataBuffer", None)
    if not isinstance(data, bytes):
        return 0
    return len(data) - transport.offset + transport._tempDataLen


def direct_socket(transport):
    """
    The socket of a plain (not TLS) Twisted TCP transport, which L{AudioSocketProtocol._write}
    may send on directly; C{None} for anything else (test transports, TLS, UNIX).
    """
    from twisted.internet import tcp

    if (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and hasattr(transport, "_tempDataLen")
        and hasattr(transport, "_writeDisconnected")
    ):
        return transport.socket
    return None


def _addr(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return "{}:{}".format(host, port) if host is not None else str(address)


class LegFactory(Factory):
    """
    Builds the legs of one listening port (an extension's AI or return port).

    The bounds (see the module docstring) are keyword arguments named like their
    C{[limits]} config keys.

    @param on_leg: called with the leg once its UUID is known; raise L{Refused} to turn it
        away. It must not block.
    @param peers: address → connections open from it, shared by every factory of one
        extension manager (so C{max_connections_per_peer} spans all its ports).
    @ivar live: UUID → leg for this port's connected legs.
    @ivar handshaking: legs connected that have not sent their UUID yet.
    @ivar refused: reason code → count of legs closed for bad input or refusal.
    """

    log = Logger()
    protocol = AudioSocketProtocol
    noisy = False  # the extension logs its listening ports itself

    #: The id of the extension this port serves, named in the legs' log events (set by
    #: L{audiosocket.extension.ExtensionService}).
    ext: int | None = None

    def __init__(
        self,
        role: str,
        clock: AudioClock,
        on_leg: Callable[[AudioSocketProtocol], None],
        *,
        reactor=None,
        handshake_timeout: float = 5.0,
        allowed_peers=None,
        audio_queue_frames: int = 250,
        event_queue_size: int = 64,
        max_audio_payload: int = 16384,
        max_connections_per_port: int = 200,
        max_connections_per_peer: int = 400,
        max_handshakes_per_port: int = 64,
        events_per_s: float = 20.0,
        event_burst: int = 40,
        audio_burst_s: float = 2.0,
        max_unsent_kb: int = 64,
        slow_reader_s: float = 5.0,
        rates: Iterable[int] = DEFAULT_RATES,
        max_rate_switches: int = 5,
        refused=None,
        peers=None,
    ):
        reactor = default_reactor(reactor)
        self.role = role
        self.clock = clock
        self.on_leg = on_leg
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.allowed_peers = tuple(allowed_peers or ())
        self.audio_queue_frames = audio_queue_frames
        self.event_queue_size = event_queue_size
        self.max_audio_payload = max_audio_payload
        self.max_connections_per_port = max_connections_per_port
        self.max_connections_per_peer = max_connections_per_peer
        self.max_handshakes_per_port = max_handshakes_per_port
        self.events_per_s = events_per_s
        self.event_burst = event_burst
        self.audio_burst_s = audio_burst_s
        self.max_unsent_kb = max_unsent_kb
        self.slow_reader_s = slow_reader_s
        self.rates = frozenset(rates)
        self.max_rate_switches = max_rate_switches
        self.live: dict[_uuid.UUID, AudioSocketProtocol] = {}
        self.connections: set[AudioSocketProtocol] = set()
        self.handshaking: set[AudioSocketProtocol] = set()
        self.refused = refused if refused is not None else collections.Counter()
        self.peers = peers if peers is not None else collections.Counter()
        self._quiet: dict[str, list] = {}  # reason → [last logged at, refusals not logged]

    def count_refused(self, reason: str) -> None:
        self.refused[reason] += 1

    def _within_limits(self, addr) -> bool:
        """
        Admit a connection from C{addr} under the per-port, per-peer and handshake bounds,
        or count and log its refusal (the caller then closes it at accept).
        """
        if len(self.connections) >= self.max_connections_per_port:
            reason, limit = "too_many_connections", self.max_connections_per_port
        elif len(self.handshaking) >= self.max_handshakes_per_port:
            reason, limit = "too_many_handshakes", self.max_handshakes_per_port
        elif (
            getattr(addr, "host", None) is not None
            and self.peers[addr.host] >= self.max_connections_per_peer
        ):
            reason, limit = "too_many_from_peer", self.max_connections_per_peer
        else:
            return True
        self.count_refused(reason)
        # A connection flood must not become a log flood: one line a second per reason.
        now = self.reactor.seconds()
        quiet = self._quiet.setdefault(reason, [None, 0])
        if quiet[0] is not None and now - quiet[0] < 1.0:
            quiet[1] += 1
            return False
        self.log.warn(
            "refusing {role} connection from {peer}: limit of {limit} reached [{reason}]"
            " ({unlogged} more refused since the last line)",
            role=self.role,
            peer=_addr(addr),
            limit=limit,
            reason=reason,
            unlogged=quiet[1],
        )
        quiet[0], quiet[1] = now, 0
        return False

    def _track(self, leg: AudioSocketProtocol, addr) -> None:
        self.connections.add(leg)
        self.handshaking.add(leg)
        host = getattr(addr, "host", None)
        if host is not None:
            self.peers[host] += 1

        def gone(_):
            self.connections.discard(leg)
            self.handshaking.discard(leg)
            if host is not None:
                self.peers[host] -= 1
                if self.peers[host] <= 0:
                    del self.peers[host]

        leg.when_closed().addBoth(gone)

    def buildProtocol(self, addr):
        if self.allowed_peers and not _peer_allowed(addr, self.allowed_peers):
            self.count_refused("peer_not_allowed")
            self.log.warn(
                "refusing {role} connection from {peer}: not in allowed_peers",
                role=self.role,
                peer=_addr(addr),
            )
            return None
        if not self._within_limits(addr):
            return None
        leg = self.protocol(self)
        self._track(leg, addr)
        return leg


def _peer_allowed(addr, networks) -> bool:
    # The rule lives in audiosocket.peers (shared with the config): IPv4-mapped peers on a
    # "::" listener and IPv6 zone ids are normalised there.
    return peer_allowed(getattr(addr, "host", None), networks)
