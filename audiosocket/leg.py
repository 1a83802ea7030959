"""
One TCP connection from Asterisk is one call leg.

The leg decodes frames into its own bounded L{DeferredQueue}s (audio, and events: DTMF and
hangup) and plays outbound audio through the shared L{AudioClock}: one frame per tick,
speech when some is queued, silence otherwise. It never decides what to say; the code that
does (the flow) gets the leg once its UUID is known, through the factory's C{on_leg}.

Every bad-input case closes this one connection with a logged reason code, counted on the
factory; other legs never notice.
"""

from __future__ import annotations

import collections
import uuid as _uuid
from typing import Callable

from attrs import frozen
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import wire
from .clock import AudioClock, FrameStats

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


_SILENCE: dict[int, bytes] = {}


def silence_frame(rate: int) -> bytes:
    """The encoded 20 ms silence frame at C{rate}, built once per rate."""
    frame = _SILENCE.get(rate)
    if frame is None:
        frame = _SILENCE[rate] = wire.audio(bytes(wire.frame_bytes(rate)), rate)
    return frame


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
        self.closed = False
        self.close_reason: str | None = None
        self.hung_up_by: str | None = None
        self._decoder = wire.Decoder(max_audio_payload=factory.max_audio_payload)
        self._out: collections.deque[_Played] = collections.deque()
        self._hangup_requested = False
        self._hangup_sent = False
        self._closed_waiters: list[defer.Deferred] = []
        self._lost = False
        self._handshake_timer = None
        self._audio_started: float | None = None
        self._audio_waiters: list[defer.Deferred] = []
        self._audio_received_s = 0.0
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
        self._handshake_timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._handshake_expired
        )
        # Asterisk's AudioSocket() hangs up after 2 s with no audio either way, so the leg
        # is paced (silence until there is something to say) from the moment it connects.
        self.factory.clock.add(self)

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
        try:
            frames = self._decoder.feed(data)
        except wire.ProtocolError as e:
            self._frames(e.frames)
            self.abort(e.reason, str(e))
            return
        self._frames(frames)

    def _frames(self, frames):
        for frame in frames:
            if self.closed:
                return
            kind = frame.kind
            if kind in wire.AUDIO_KINDS:
                self._audio_frame(frame)
            elif kind == wire.Kind.UUID:
                self._uuid_frame(frame)
            elif kind == wire.Kind.DTMF:
                self._put_event(Dtmf(frame.payload.decode("ascii")))
            elif kind == wire.Kind.HANGUP:
                # Asterisk hangs up by closing TCP; a peer that says it first is honoured.
                self.hung_up_by = "peer"
                self._put_event(Hangup("peer", "hangup frame"))
                self.transport.loseConnection()

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
                self.log.info(
                    "leg {uuid} switched audio from {old} Hz to {new} Hz",
                    uuid=str(self.uuid),
                    old=self.rate,
                    new=rate,
                )
            self.rate = rate
        self.frames_in += 1
        now = self.factory.reactor.seconds()
        if self._audio_started is None:
            self._audio_started = now
            waiters, self._audio_waiters = self._audio_waiters, []
            for d in waiters:
                d.callback(rate)
        self._audio_received_s += len(payload) / (2.0 * rate)
        ahead = self._audio_received_s - (now - self._audio_started)
        if ahead > self.factory.flood_allowance_s:
            self.abort(
                "flood",
                "peer sent {:.1f} s of audio ahead of real time".format(ahead),
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
            self.abort("flood", "more than {} unread events".format(self.events.size))

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
        self.transport.loseConnection()

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
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
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
        write = self._write
        out = self._out
        sent = 0
        for _ in range(frames):
            if out:
                item = out[0]
                start = item.offset
                end = start + item.size
                write(item.header + item.pcm[start:end])
                if end >= len(item.pcm):
                    out.popleft()
                    item.done.callback(True)
                else:
                    item.offset = end
            elif self._hangup_requested:
                break
            else:
                write(silence_frame(self.rate))
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
        self.transport.loseConnection()


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

    @param on_leg: called with the leg once its UUID is known; raise L{Refused} to turn it
        away. It must not block.
    @ivar live: UUID → leg for this port's connected legs.
    @ivar refused: reason code → count of legs closed for bad input or refusal.
    """

    log = Logger()
    protocol = AudioSocketProtocol
    noisy = False  # the extension logs its listening ports itself

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
        flood_allowance_s: float = 2.0,
        max_audio_payload: int = 16384,
        refused=None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.role = role
        self.clock = clock
        self.on_leg = on_leg
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.allowed_peers = tuple(allowed_peers or ())
        self.audio_queue_frames = audio_queue_frames
        self.event_queue_size = event_queue_size
        self.flood_allowance_s = flood_allowance_s
        self.max_audio_payload = max_audio_payload
        self.live: dict[_uuid.UUID, AudioSocketProtocol] = {}
        self.connections: set[AudioSocketProtocol] = set()
        self.refused = refused if refused is not None else collections.Counter()

    def count_refused(self, reason: str) -> None:
        self.refused[reason] += 1

    def buildProtocol(self, addr):
        if self.allowed_peers and not _peer_allowed(addr, self.allowed_peers):
            self.count_refused("peer_not_allowed")
            self.log.warn(
                "refusing {role} connection from {peer}: not in allowed_peers",
                role=self.role,
                peer=_addr(addr),
            )
            return None
        leg = self.protocol(self)
        self.connections.add(leg)
        leg.when_closed().addBoth(lambda _: self.connections.discard(leg))
        return leg


def _peer_allowed(addr, networks) -> bool:
    import ipaddress

    host = getattr(addr, "host", None)
    if host is None:  # unix sockets: local by construction
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks)
