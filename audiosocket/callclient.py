# -*- test-case-name: tests.test_callclient -*-
"""
An AudioSocket client that behaves like Asterisk: the library behind C{audiosocket-call}
(whose command line is L{audiosocket.calltool}), and what the tests, the integration tests,
the fake PBX and the benchmarks drive servers with.

L{place_call} connects to an AudioSocket port, sends the call's UUID, then one audio frame
every 20 ms on an absolute schedule (a WAV, then silence) the way Asterisk does while the
caller's channel produces audio; it sends DTMF frames at given times, hangs up by closing
TCP, records what it hears and measures the gaps between the frames the server sends, into
a L{CallReport}. L{CallOptions} says what one call does. The load mode is L{place_calls}:
many calls (L{options_for_calls} spreads them round-robin over ports) paced by one shared
L{Pacer}, and L{aggregate} / L{aggregate_summary} report per call and overall the
received-gap p50/p99/max, the frames the server owed but did not send, protocol errors, who
hung up, and whether the generator kept its own time (C{valid}: a figure taken while it fell
behind does not count).

Timing figures are the client's own view. When the client itself falls behind (its 20 ms tick
fires late: L{CallReport.late_sends}), a gap it measures across that stall says more about the
client than about the server, so such gaps are left out of the gap statistics and counted in
L{CallReport.gaps_excluded} instead.
"""

from __future__ import annotations

import uuid as _uuid
import wave
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from attrs import asdict, define, evolve, field, frozen
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from audiosocket import wire
from audiosocket.leg import write_now
from audiosocket.reactors import default_reactor

FRAME_S = wire.FRAME_MS / 1000
#: Time between the digits of one C{--dtmf} entry.
DTMF_SPACING_S = 0.25
#: A received frame louder than this (RMS, dB relative to full scale) counts as speech.
SPEECH_DBFS = -45.0
SPEECH_RMS = 32768 * 10 ** (SPEECH_DBFS / 20)
#: After the client closes, how long the peer has to take the close before it is aborted.
CLOSE_GRACE_S = 2.0

#: Who ended the call, as L{CallReport.hung_up_by} says it.
HUNG_UP_BY = {
    "server": "hung up by the server (hangup frame)",
    "server-close": "server closed the connection without a hangup frame",
    "client": "hung up by the client",
    "protocol-error": "ended on a protocol error",
}


# ---------------------------------------------------------------- options


def _uuid_or_random(value: Any) -> str:
    if value is None:
        return str(_uuid.uuid4())
    if isinstance(value, _uuid.UUID):
        return str(value)
    try:
        return str(_uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"uuid: {value!r} is not a UUID") from None


def _optional_path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def dtmf_schedule(value: Iterable[tuple[float, str]]) -> tuple[tuple[float, str], ...]:
    schedule = []
    for at, digits in value:
        at = float(at)
        if at < 0:
            raise ValueError(f"dtmf: time {at} is negative")
        if not digits:
            raise ValueError(f"dtmf: no digits at {at} s")
        bad = [d for d in digits if d not in wire.DTMF_DIGITS]
        if bad:
            raise ValueError(f"dtmf: {bad[0]!r} is not a DTMF digit (0-9 * # A-D)")
        schedule.append((at, str(digits)))
    return tuple(schedule)


def _check_rate(instance, attribute, value) -> None:
    wire.audio_kind(value)  # ValueError names the rate


def _positive_or_none(instance, attribute, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name}: must be positive, not {value}")


def _not_negative(instance, attribute, value) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must not be negative, not {value}")


def _check_port(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port: must be an integer from 1 to 65535, not {value!r}")


@frozen
class CallOptions:
    """
    One call to place.

    @ivar uuid: the call's UUID; C{None} gives a random one, so the attribute is always set.
    @ivar wav: a WAV to stream (16-bit mono or stereo, any rate; resampled to C{rate}).
    @ivar wav_at: seconds after connecting at which the WAV starts (silence before).
    @ivar rate: the call's sample rate; it picks the audio frame kind (8000 → 0x10,
        16000 → 0x12).
    @ivar dtmf: C{(at_seconds, digits)} pairs; the digits of one entry go out
        L{DTMF_SPACING_S} apart, one DTMF frame each.
    @ivar record: write what the client hears to this WAV, at the rate the server sends.
    @ivar hangup_after: close TCP (Asterisk's way to hang up) after this many seconds.
    @ivar send_audio: stream audio (the WAV, then silence) every 20 ms, as Asterisk does
        while the channel produces audio; C{False} sends only the UUID and DTMF.
    @ivar keep_audio: keep the received PCM in the report; recording needs it, a long load
        run may not want it.
    """

    host: str
    port: int = field(validator=_check_port)
    uuid: str = field(default=None, converter=_uuid_or_random)
    wav: Path | None = field(default=None, converter=_optional_path)
    rate: int = field(default=8000, validator=_check_rate)
    dtmf: tuple[tuple[float, str], ...] = field(default=(), converter=dtmf_schedule)
    record: Path | None = field(default=None, converter=_optional_path)
    hangup_after: float | None = field(default=None, validator=_positive_or_none)
    send_audio: bool = True
    connect_timeout: float = field(default=5.0, validator=_positive_or_none)
    wav_at: float = field(default=0.0, validator=_not_negative)
    keep_audio: bool = True

    def __attrs_post_init__(self):
        if self.wav is not None and not self.send_audio:
            raise ValueError("wav: a WAV needs send_audio (it is streamed as audio frames)")


def load_wav(path: Path | str, rate: int) -> bytes:
    """
    Read a 16-bit PCM WAV (mono, or stereo mixed down) and return it as signed 16-bit
    little-endian mono PCM at C{rate} Hz.

    @raise ValueError: the file is not a WAV this client can stream.
    """
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, src_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            data = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a readable PCM WAV ({e})") from None
    if width != wire.SAMPLE_WIDTH:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is supported")
    if channels not in (1, 2):
        raise ValueError(f"{path}: {channels} channels; only mono or stereo is supported")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
    if channels == 2:
        samples = samples.reshape(-1, 2).mean(axis=1)
    if src_rate != rate and samples.size:
        samples = soxr.resample(samples, src_rate, rate)
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2")
    return pcm.tobytes()


def write_wav(path: Path | str, pcm: bytes, rate: int) -> None:
    """Write mono signed 16-bit PCM to a WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(wire.SAMPLE_WIDTH)
        w.setframerate(rate)
        w.writeframes(pcm)


def _rms(pcm: bytes) -> float:
    if not pcm.strip(b"\0"):
        # Silence, the bulk of a load run: no numpy round trip per frame.
        return 0.0
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


# ---------------------------------------------------------------- report


def _percentiles(gaps_ms: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not len(gaps_ms):
        return None, None, None
    p50, p99 = np.percentile(gaps_ms, [50, 99])
    return float(p50), float(p99), float(np.max(gaps_ms))


# The first np.percentile imports part of numpy lazily (~0.2 s cold): done now, not when
# the first call of a load run ends and every other call's 20 ms tick is waiting.
_percentiles([0.0, 1.0])


def _owed(duration: float, received: int) -> int:
    """Frames a server pacing at 50/s owed over C{duration} seconds, beyond C{received}."""
    return max(0, int(duration / FRAME_S + 1e-6) - received)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


@define
class CallReport:
    """
    What one call did and heard.

    @ivar hung_up_by: C{"server"} (hangup frame), C{"server-close"} (TCP closed without
        one), C{"client"} (hangup_after, or told to hang up), C{"protocol-error"}, or
        C{None} if the call never connected.
    @ivar gap_p50_ms: inter-arrival gaps of the server's audio frames (frames that arrive
        in one read share a time, so a burst shows as gaps of 0).
    @ivar gaps_excluded: gaps left out of the statistics because the client itself fell
        behind while they were measured.
    @ivar late_sends: frames the client sent late because its own tick fell behind; if
        not 0, the client was overloaded and its figures are suspect.
    @ivar arrivals_s: when each received audio frame arrived, in seconds after connecting
        (kept with the PCM, C{keep_audio}: frame I{i} of C{received_pcm} arrived at
        C{arrivals_s[i]}); what a turn-latency measurement needs.
    @ivar frames_owed: frames the server owed but did not send: one every 20 ms over the
        connected time, minus those received (a paced server owes 0, give or take one
        for the phase of its clock).
    """

    uuid: str
    connected: bool = False
    frames_received: int = 0
    audio_seconds: float = 0.0
    speech_seconds: float = 0.0
    first_speech_after: float | None = None
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    gap_max_ms: float | None = None
    frames_sent: int = 0
    late_sends: int = 0
    hung_up_by: str | None = None
    error: str | None = None
    duration: float = 0.0
    received_pcm: bytes = field(default=b"", repr=False)
    rate_received: int | None = None
    dtmf_sent: int = 0
    gaps_excluded: int = 0
    frames_owed: int = 0
    gaps_ms: list[float] = field(factory=list, repr=False)
    arrivals_s: list[float] = field(factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """The call connected and ended without an error."""
        return self.connected and self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe values, without the PCM and the raw gaps."""
        return asdict(
            self,
            filter=lambda attribute, value: (
                attribute.name not in ("received_pcm", "gaps_ms", "arrivals_s")
            ),
        )

    def summary(self) -> str:
        """One human-readable block."""
        if not self.connected:
            return f"call {self.uuid}: not connected: {self.error}"
        how = HUNG_UP_BY.get(self.hung_up_by, str(self.hung_up_by))
        lines = [f"call {self.uuid}: {how} after {self.duration:.2f} s"]
        lines.append(
            f"  sent   {self.frames_sent} audio frames ({self.late_sends} late),"
            f" {self.dtmf_sent} DTMF digits"
        )
        heard = f"  heard  {self.frames_received} frames, {self.audio_seconds:.2f} s of audio"
        if self.rate_received is not None:
            heard += f" at {self.rate_received} Hz"
        heard += f", {self.speech_seconds:.2f} s above {SPEECH_DBFS:.0f} dBFS"
        if self.first_speech_after is not None:
            heard += f", first after {self.first_speech_after:.2f} s"
        lines.append(heard)
        gaps = (
            f"  gaps   p50 {_ms(self.gap_p50_ms)}, p99 {_ms(self.gap_p99_ms)},"
            f" max {_ms(self.gap_max_ms)}"
        )
        if self.gaps_excluded:
            gaps += f" ({self.gaps_excluded} left out: the client fell behind)"
        lines.append(gaps)
        if self.frames_owed:
            lines.append(f"  owed   {self.frames_owed} frames the server did not send")
        if self.late_sends:
            lines.append("  note   the client fell behind its own 20 ms schedule")
        if self.error is not None:
            lines.append(f"  error  {self.error}")
        return "\n".join(lines)


# ---------------------------------------------------------------- pacing


class Pacer:
    """
    One 20 ms tick on an absolute schedule for many calls (the load generator's own
    L{AudioClock}): N calls cost one timer, not N, so the generator keeps real time with
    hundreds of legs. It runs only while it has calls, and measures its own lateness:
    a run whose pacer fell behind (L{late_ticks}) does not measure the server.

    @ivar late_ticks: ticks that ran more than one interval late (calls owed > 1 frame).
    @ivar late_at: when (reactor seconds, which are wall-clock seconds on a real reactor)
        each late tick ran, the first L{MAX_LATE_TIMES}: a benchmark judges its own
        measurement window with them.
    @ivar lateness: histogram (ms) of how late each tick ran against its schedule.
    """

    MAX_LATE_TIMES = 10000

    def __init__(self, reactor=None, interval: float = FRAME_S):
        from audiosocket.clock import Histogram

        self._reactor = default_reactor(reactor)
        self.interval = interval
        self._calls: dict[int, "CallProtocol"] = {}
        self._loop: LoopingCall | None = None
        self._ticks = 0
        self.late_ticks = 0
        self.late_at: list[float] = []
        self.lateness = Histogram()

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, call: "CallProtocol") -> None:
        self._calls[id(call)] = call
        if self._loop is None:
            self._ticks = 0
            loop = self._loop = LoopingCall.withCount(self._tick)
            loop.clock = self._reactor
            loop.start(self.interval, now=False)

    def remove(self, call: "CallProtocol") -> None:
        self._calls.pop(id(call), None)
        if not self._calls and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def _tick(self, count: int) -> None:
        now = self._reactor.seconds()
        self._ticks += count
        scheduled = self._loop.starttime + self._ticks * self.interval
        self.lateness.observe(max(0.0, (now - scheduled) * 1000.0))
        if count > 1:
            self.late_ticks += 1
            if len(self.late_at) < self.MAX_LATE_TIMES:
                self.late_at.append(now)
        for call in list(self._calls.values()):
            call._tick(count)

    def stats(self) -> dict[str, Any]:
        """The pacer's own timing, for the run's report."""
        return {
            "late_ticks": self.late_ticks,
            "tick_lateness_p99_ms": self.lateness.quantile(0.99),
            "tick_lateness_max_ms": round(self.lateness.max_ms, 2),
            "late_at": list(self.late_at),
        }


# ---------------------------------------------------------------- protocol


class CallProtocol(Protocol):
    """
    One call, from the Asterisk side of an AudioSocket connection.

    @ivar options: the L{CallOptions} of this call.
    """

    log = Logger()

    def __init__(
        self,
        options: CallOptions,
        reactor=None,
        outbound: bytes | None = None,
        pacer: Pacer | None = None,
    ):
        """
        @param outbound: the PCM to stream, already at the call's rate; by default the
            options' WAV is read here (L{place_calls} reads a shared WAV once).
        @param pacer: a L{Pacer} shared with other calls; by default the call paces
            itself with its own timer.
        """
        self.options = options
        self._pacer = pacer
        self._socket = None
        self._last_audio_kind = -1
        self._last_audio_size = -1
        self._reactor = default_reactor(reactor)
        if outbound is None and options.wav is not None:
            outbound = load_wav(options.wav, options.rate)
        self._outbound = outbound or b""
        self._frame_size = wire.frame_bytes(options.rate)
        self._silence = wire.audio(bytes(self._frame_size), options.rate)
        self._wav_start = round(options.wav_at / FRAME_S)
        self._decoder = wire.Decoder(expect_uuid=False)
        self._sender: LoopingCall | None = None
        self._timers: list = []
        self._abort = None
        self._waiters: list[Deferred[CallReport]] = []
        self._report: CallReport | None = None
        self._ending = False
        self._fell_behind = False
        self._last_arrival: float | None = None
        self._pcm: list[bytes] = []
        self._arrivals: list[float] = []

        self.connected_at: float | None = None
        self.ended_at: float | None = None
        self.frames_sent = 0
        self.late_sends = 0
        self.dtmf_sent = 0
        self.frames_received = 0
        self.audio_seconds = 0.0
        self.speech_seconds = 0.0
        self.first_speech_at: float | None = None
        self.gaps: list[float] = []
        self.gaps_excluded = 0
        self.rate_received: int | None = None
        self.hung_up_by: str | None = None
        self.error: str | None = None

    # -- life cycle

    def connectionMade(self):
        self.connected_at = self._reactor.seconds()
        from audiosocket.leg import direct_socket

        self._socket = direct_socket(self.transport)
        if ITCPTransport.providedBy(self.transport):
            # Asterisk hangs up on a frame whose pieces arrive >5 ms apart.
            self.transport.setTcpNoDelay(True)
        self.transport.write(wire.uuid_frame(self.options.uuid))
        self.log.info(
            "call {uuid} connected to {host}:{port}",
            uuid=self.options.uuid,
            host=self.options.host,
            port=self.options.port,
        )
        for at, digits in self.options.dtmf:
            for i, digit in enumerate(digits):
                self._later(at + i * DTMF_SPACING_S, self._send_dtmf, digit)
        if self.options.hangup_after is not None:
            self._later(self.options.hangup_after, self.hang_up)
        if self.options.send_audio and self._pacer is not None:
            self._tick(1)
            self._pacer.add(self)
        elif self.options.send_audio:
            sender = self._sender = LoopingCall.withCount(self._tick)
            sender.clock = self._reactor
            sender.start(FRAME_S, now=True).addErrback(self._sender_failed)

    def hang_up(self) -> None:
        """Hang up as Asterisk does: close TCP (it never sends a hangup frame)."""
        self._end("client", None)

    def when_finished(self) -> Deferred[CallReport]:
        """A Deferred that fires with the L{CallReport} once the connection is lost."""
        if self._report is not None:
            return succeed(self._report)
        d: Deferred[CallReport] = Deferred()
        self._waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone):
        self.ended_at = self._reactor.seconds()
        self._stop()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if not self._ending:
            self._ending = True
            try:
                self._decoder.finish()
            except wire.ProtocolError as e:
                self.hung_up_by, self.error = "protocol-error", str(e)
            else:
                self.hung_up_by = "server-close"
                if not reason.check(ConnectionDone):
                    self.error = f"connection lost: {reason.getErrorMessage()}"
        self.log.info(
            "call {uuid} ended: {hung_up_by} after {duration:.2f} s",
            uuid=self.options.uuid,
            hung_up_by=self.hung_up_by,
            duration=self.ended_at - self.connected_at,
        )
        report = self._report = self.report()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(report)

    def _end(self, by: str, error: str | None) -> None:
        if self._ending or self.transport is None:
            return
        self._ending = True
        self.hung_up_by, self.error = by, error
        self._stop()
        self.transport.loseConnection()
        self._abort = self._reactor.callLater(CLOSE_GRACE_S, self.transport.abortConnection)

    def _stop(self) -> None:
        if self._pacer is not None:
            self._pacer.remove(self)
        if self._sender is not None and self._sender.running:
            self._sender.stop()
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers.clear()

    def _later(self, delay: float, f, *args) -> None:
        self._timers.append(self._reactor.callLater(delay, f, *args))

    # -- sending

    def _tick(self, count: int) -> None:
        if self._ending:
            return
        if count > 1:
            # The reactor ran this tick late: send what is owed, no more, and remember
            # that the client's own timing was off.
            self.late_sends += count - 1
            self._fell_behind = True
        for _ in range(count):
            self._write(self._next_frame())

    def _write(self, data: bytes) -> None:
        # As the server's legs do: send at once when nothing is buffered, so a load run of
        # hundreds of calls keeps real time.
        write_now(self.transport, self._socket, data)

    def _next_frame(self) -> bytes:
        n = self.frames_sent - self._wav_start
        self.frames_sent += 1
        if n >= 0:
            start = n * self._frame_size
            if start < len(self._outbound):
                chunk = self._outbound[start : start + self._frame_size]
                if len(chunk) < self._frame_size:
                    chunk += bytes(self._frame_size - len(chunk))
                return wire.audio(chunk, self.options.rate)
        return self._silence

    def _send_dtmf(self, digit: str) -> None:
        self.transport.write(wire.dtmf(digit))
        self.dtmf_sent += 1

    def _sender_failed(self, failure: Failure) -> None:
        self.log.failure("call {uuid}: sending failed", failure, uuid=self.options.uuid)
        self._end("client", f"client error: {failure.getErrorMessage()}")

    # -- receiving

    def dataReceived(self, data: bytes):
        if self._ending:
            return
        now = self._reactor.seconds()
        if (
            len(data) == self._last_audio_size
            and data[0] == self._last_audio_kind
            and not self._decoder.buffered
            and (data[1] << 8 | data[2]) == len(data) - wire.HEADER_SIZE
        ):
            # The usual read in a load run: one audio frame like the last one, decoded
            # without the decoder's buffer (the same checks already passed for its kind
            # and size).
            behind, self._fell_behind = self._fell_behind, False
            self._audio_received(wire.Frame(data[0], data[wire.HEADER_SIZE :]), now, behind)
            return
        try:
            frames = self._decoder.feed(data)
        except wire.ProtocolError as e:
            self._protocol_error(str(e))
            return
        behind = self._fell_behind
        for frame in frames:
            if frame.is_audio:
                self._fell_behind = False
                self._audio_received(frame, now, behind)
            elif frame.kind == wire.Kind.HANGUP:
                self._end("server", None)
                return
            else:
                self._protocol_error(
                    f"server sent a frame of kind 0x{frame.kind:02x}; Asterisk hangs up"
                    " on any kind but hangup (0x00) and audio"
                )
                return

    def _audio_received(self, frame: wire.Frame, now: float, behind: bool) -> None:
        self._last_audio_kind = frame.kind
        self._last_audio_size = wire.HEADER_SIZE + len(frame.payload)
        if self._last_arrival is not None:
            if behind:
                self.gaps_excluded += 1
            else:
                self.gaps.append(now - self._last_arrival)
        self._last_arrival = now
        self.frames_received += 1
        if self.rate_received is None:
            self.rate_received = frame.rate
        seconds = len(frame.payload) / (wire.SAMPLE_WIDTH * frame.rate)
        self.audio_seconds += seconds
        if _rms(frame.payload) > SPEECH_RMS:
            self.speech_seconds += seconds
            if self.first_speech_at is None:
                self.first_speech_at = now
        if self.options.keep_audio or self.options.record is not None:
            self._pcm.append(frame.payload)
            self._arrivals.append(now - self.connected_at)

    def _protocol_error(self, message: str) -> None:
        self.log.warn(
            "call {uuid}: protocol error from the server: {message}",
            uuid=self.options.uuid,
            message=message,
        )
        self._end("protocol-error", message)

    # -- report

    def report(self) -> CallReport:
        """The call so far (complete once the connection is lost)."""
        gaps_ms = [g * 1000 for g in self.gaps]
        p50, p99, gap_max = _percentiles(gaps_ms)
        connected = self.connected_at is not None
        end = self.ended_at if self.ended_at is not None else self._reactor.seconds()
        first_speech = None
        if self.first_speech_at is not None and connected:
            first_speech = self.first_speech_at - self.connected_at
        return CallReport(
            uuid=self.options.uuid,
            connected=connected,
            frames_received=self.frames_received,
            audio_seconds=self.audio_seconds,
            speech_seconds=self.speech_seconds,
            first_speech_after=first_speech,
            gap_p50_ms=p50,
            gap_p99_ms=p99,
            gap_max_ms=gap_max,
            frames_sent=self.frames_sent,
            late_sends=self.late_sends,
            hung_up_by=self.hung_up_by,
            error=self.error,
            duration=end - self.connected_at if connected else 0.0,
            received_pcm=b"".join(self._pcm),
            rate_received=self.rate_received,
            dtmf_sent=self.dtmf_sent,
            gaps_excluded=self.gaps_excluded,
            frames_owed=_owed(end - self.connected_at, self.frames_received) if connected else 0,
            gaps_ms=gaps_ms,
            arrivals_s=list(self._arrivals),
        )


# ---------------------------------------------------------------- placing calls


class CallTracker:
    """
    The calls of one run, so that all of them can be hung up at once (the CLI does so on
    Ctrl-C, to still print what the calls measured).
    """

    def __init__(self):
        self.active: set[CallProtocol] = set()
        self.ramping: set[Deferred] = set()
        self.stopping = False

    def hang_up_all(self) -> Deferred:
        """
        Hang up every active call and place no more; fires once all their connections are
        lost.
        """
        self.stopping = True
        for start in list(self.ramping):
            start.cancel()
        waiting = []
        for protocol in list(self.active):
            waiting.append(protocol.when_finished())
            protocol.hang_up()
        return gatherResults(waiting)


async def place_call(
    options: CallOptions, reactor=None, *, tracker: CallTracker | None = None
) -> CallReport:
    """
    Place one call and return its report once the connection is fully lost.

    Connection failures, an unreadable WAV and an unwritable recording end up in
    L{CallReport.error} rather than raised, so a batch of calls always yields reports.
    """
    reactor = default_reactor(reactor)
    try:
        outbound = load_wav(options.wav, options.rate) if options.wav is not None else None
    except (OSError, ValueError) as e:
        return CallReport(uuid=options.uuid, error=f"cannot read the WAV: {e}")
    return await _place_call(options, reactor, outbound, tracker)


async def _place_call(options, reactor, outbound, tracker, pacer=None) -> CallReport:
    if tracker is not None and tracker.stopping:
        return CallReport(uuid=options.uuid, error="not placed: the run was stopped")
    protocol = CallProtocol(options, reactor, outbound, pacer)
    endpoint = HostnameEndpoint(
        reactor, options.host, options.port, timeout=options.connect_timeout
    )
    try:
        await connectProtocol(endpoint, protocol)
    except CancelledError:
        raise
    except Exception as e:
        CallProtocol.log.info(
            "call {uuid}: cannot connect to {host}:{port}: {error}",
            uuid=options.uuid,
            host=options.host,
            port=options.port,
            error=str(e),
        )
        return CallReport(uuid=options.uuid, error=f"cannot connect: {e}")
    if tracker is not None:
        tracker.active.add(protocol)
        if tracker.stopping:
            protocol.hang_up()
    try:
        try:
            report = await protocol.when_finished()
        except CancelledError:
            # Whoever gave up on the call still gets a clean socket: hang up, wait for it.
            protocol.hang_up()
            await protocol.when_finished()
            raise
    finally:
        if tracker is not None:
            tracker.active.discard(protocol)
    if options.record is not None:
        try:
            write_wav(options.record, report.received_pcm, report.rate_received or options.rate)
        except OSError as e:
            report.error = report.error or f"cannot write the recording: {e}"
    if not options.keep_audio:
        report.received_pcm = b""
        report.arrivals_s = []
    return report


async def place_calls(
    options_list: Iterable[CallOptions],
    ramp_s: float = 0.0,
    reactor=None,
    *,
    tracker: CallTracker | None = None,
    pacer: Pacer | None = None,
) -> list[CallReport]:
    """
    Place the calls concurrently, their starts spread evenly over C{ramp_s} seconds, and
    return their reports in the order given. A WAV shared by several calls is read once.

    @param pacer: one L{Pacer} for every call's 20 ms tick (what a load run wants: one
        timer for all the calls, and one measure of whether the generator kept up).
    """
    reactor = default_reactor(reactor)
    options_list = list(options_list)
    loaded: dict[tuple[Path, int], bytes | str] = {}
    for options in options_list:
        key = (options.wav, options.rate)
        if options.wav is not None and key not in loaded:
            try:
                loaded[key] = load_wav(options.wav, options.rate)
            except (OSError, ValueError) as e:
                loaded[key] = f"cannot read the WAV: {e}"

    async def one(options: CallOptions, delay: float) -> CallReport:
        outbound = loaded.get((options.wav, options.rate))
        if isinstance(outbound, str):
            return CallReport(uuid=options.uuid, error=outbound)
        if delay > 0:
            start = deferLater(reactor, delay, lambda: None)
            if tracker is not None:
                tracker.ramping.add(start)
            try:
                await start
            except CancelledError:
                if tracker is None or not tracker.stopping:
                    raise
            finally:
                if tracker is not None:
                    tracker.ramping.discard(start)
        return await _place_call(options, reactor, outbound, tracker, pacer)

    n = len(options_list)
    calls = [
        Deferred.fromCoroutine(one(options, ramp_s * i / n))
        for i, options in enumerate(options_list)
    ]
    # Wait for every call, even when one fails or all are cancelled: each call hangs up
    # and waits for its socket, and so must this.
    results = await DeferredList(calls, consumeErrors=True)
    for succeeded, result in results:
        if not succeeded:
            result.raiseException()
    return [report for _, report in results]


def options_for_calls(
    options: CallOptions, calls: int, ports: Sequence[int] | None = None
) -> list[CallOptions]:
    """
    The options of C{calls} concurrent calls made from one template: each with its own
    random UUID and, when recording, its own numbered file (C{out.wav} → C{out-001.wav}).

    @param ports: spread the calls over these ports, round-robin (call I{i} goes to
        C{ports[i % len(ports)]}); by default every call goes to the template's port.
    """
    if ports is not None and not len(ports):
        raise ValueError("ports: no port to call")
    if calls == 1 and not ports:
        return [options]
    result = []
    for i in range(1, calls + 1):
        record = options.record
        if record is not None:
            record = record.with_name(f"{record.stem}-{i:03d}{record.suffix}")
        port = ports[(i - 1) % len(ports)] if ports else options.port
        uuid = None if calls > 1 else options.uuid
        result.append(evolve(options, uuid=uuid, record=record, port=port))
    return result


def aggregate(reports: Sequence[CallReport], pacer: Pacer | None = None) -> dict[str, Any]:
    """
    Totals over many calls; gap percentiles are over every gap of every call.

    C{valid} is false when the generator itself fell behind (late sends, or late ticks of
    its L{Pacer}): its timing figures then measure the client, not the server, and do not
    count. C{worst_leg_gap_p99_ms} is the largest per-call p99.
    """
    gaps = [g for r in reports for g in r.gaps_ms]
    p50, p99, gap_max = _percentiles(gaps)
    leg_p99 = [r.gap_p99_ms for r in reports if r.gap_p99_ms is not None]
    late_sends = sum(r.late_sends for r in reports)
    client = pacer.stats() if pacer is not None else None
    valid = late_sends == 0 and (client is None or client["late_ticks"] == 0)
    return {
        "calls": len(reports),
        "connected": sum(r.connected for r in reports),
        "completed": sum(r.ok for r in reports),
        "errors": sum(r.error is not None for r in reports),
        "gap_p50_ms": p50,
        "gap_p99_ms": p99,
        "gap_max_ms": gap_max,
        "gaps": len(gaps),
        "gaps_excluded": sum(r.gaps_excluded for r in reports),
        "worst_leg_gap_p99_ms": max(leg_p99) if leg_p99 else None,
        "late_sends": late_sends,
        "frames_sent": sum(r.frames_sent for r in reports),
        "frames_received": sum(r.frames_received for r in reports),
        "frames_owed": sum(r.frames_owed for r in reports),
        "protocol_errors": sum(r.hung_up_by == "protocol-error" for r in reports),
        "hung_up_by": dict(Counter(r.hung_up_by for r in reports if r.hung_up_by)),
        "error_messages": dict(Counter(r.error for r in reports if r.error)),
        "client": client,
        "valid": valid,
    }


def aggregate_summary(totals: dict[str, Any]) -> str:
    """One human-readable block for the result of L{aggregate}."""
    lines = [
        f"{totals['calls']} calls: {totals['connected']} connected,"
        f" {totals['completed']} completed, {totals['errors']} with errors",
        f"  gaps   p50 {_ms(totals['gap_p50_ms'])}, p99 {_ms(totals['gap_p99_ms'])},"
        f" max {_ms(totals['gap_max_ms'])} over {totals['gaps']} gaps"
        f" ({totals['gaps_excluded']} left out: the client fell behind)",
        f"  worst  leg p99 {_ms(totals.get('worst_leg_gap_p99_ms'))}",
        f"  frames {totals['frames_sent']} sent ({totals['late_sends']} late),"
        f" {totals['frames_received']} received, {totals.get('frames_owed', 0)} owed"
        f" but not received, {totals.get('protocol_errors', 0)} protocol errors",
        "  ended  "
        + (", ".join(f"{k}: {v}" for k, v in sorted(totals["hung_up_by"].items())) or "-"),
    ]
    client = totals.get("client")
    if client is not None:
        lines.append(
            f"  client tick lateness p99 {_ms(client['tick_lateness_p99_ms'])},"
            f" max {_ms(client['tick_lateness_max_ms'])}, {client['late_ticks']} late ticks"
        )
    if not totals.get("valid", True):
        lines.append(
            "  INVALID: the generator fell behind its own 20 ms schedule;"
            " these figures measure the client, not the server"
        )
    for message, count in sorted(totals["error_messages"].items()):
        lines.append(f"  error  {count} × {message}")
    return "\n".join(lines)
