"""
Tests for L{audiosocket.callclient}: the AudioSocket client that behaves like Asterisk.

Unit tests drive L{CallProtocol} with a L{StringTransport} and a L{Clock}; the integration
tests place real calls over loopback TCP to a small server defined here.
"""

from __future__ import annotations

import json
import uuid
import wave

import attrs
import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue, gatherResults
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from audiosocket import wire
from audiosocket.callclient import (
    CallOptions,
    CallProtocol,
    CallReport,
    CallTracker,
    Pacer,
    aggregate,
    aggregate_summary,
    load_wav,
    options_for_calls,
    place_call,
    place_calls,
)
from audiosocket.calltool import parse_args, parse_ports

UUID = "0b7c3b52-9a5e-4c37-9d7a-0123456789ab"
FRAME = 0.02


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A StringTransport that remembers TCP_NODELAY, as a TCP transport would take it."""

    no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


def connect(**kw) -> tuple[CallProtocol, TCPStringTransport, Clock]:
    kw.setdefault("uuid", UUID)
    options = CallOptions(host="127.0.0.1", port=8101, **kw)
    clock = Clock()
    protocol = CallProtocol(options, clock)
    transport = TCPStringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def at(clock: Clock, seconds: float) -> None:
    """
    Move the clock to C{seconds} after the start (just past it). Summing C{advance(0.02)}
    drifts, since 0.02 is not exact in binary, and would land a hair before a tick.
    """
    clock.advance(seconds + 1e-9 - clock.seconds())


def sent(transport: StringTransport) -> list[wire.Frame]:
    """Every frame the client wrote, decoded as a server would."""
    return wire.Decoder().feed(transport.value())


def audio_sent(transport: StringTransport) -> list[wire.Frame]:
    return [f for f in sent(transport) if f.is_audio]


def tone(n_samples: int, rate: int = 8000, amplitude: int = 8000, start: int = 0) -> bytes:
    t = (np.arange(n_samples) + start) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def write_test_wav(path, pcm: bytes, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def finish(protocol: CallProtocol, reason=ConnectionDone()) -> CallReport:
    reports = []
    protocol.when_finished().addCallback(reports.append)
    protocol.connectionLost(Failure(reason))
    return reports[0]


# ---------------------------------------------------------------- options


def test_options_random_uuid():
    """Without a UUID each call gets its own random one."""
    a = CallOptions(host="h", port=1)
    b = CallOptions(host="h", port=1)
    assert a.uuid != b.uuid
    assert uuid.UUID(a.uuid).version == 4


def test_options_refuse_bad_values():
    """A rate without an AudioSocket kind, a non-keypad digit or a bad UUID is refused."""
    with pytest.raises(ValueError):
        CallOptions(host="h", port=1, rate=11025)
    with pytest.raises(ValueError, match="DTMF digit"):
        CallOptions(host="h", port=1, dtmf=[(1.0, "12x")])
    with pytest.raises(ValueError, match="not a UUID"):
        CallOptions(host="h", port=1, uuid="nope")
    with pytest.raises(ValueError):
        CallOptions(host="h", port=0)


# ---------------------------------------------------------------- sending


def test_uuid_is_first_frame():
    """On connecting, the first (and at once the only non-audio) frame is the UUID."""
    protocol, transport, clock = connect()
    frames = sent(transport)
    assert frames[0].kind == wire.Kind.UUID
    assert str(wire.parse_uuid(frames[0])) == UUID


def test_sets_tcp_nodelay():
    """The client turns Nagle off, so a frame is not held back in pieces."""
    protocol, transport, clock = connect()
    assert transport.no_delay is True


def test_one_audio_frame_per_tick():
    """Exactly one 320-byte 8 kHz audio frame goes out at connect and every 20 ms after."""
    protocol, transport, clock = connect()
    assert len(audio_sent(transport)) == 1
    for n in range(1, 11):
        at(clock, n * FRAME)
        frames = audio_sent(transport)
        assert len(frames) == n + 1
    assert {(f.kind, len(f.payload)) for f in frames} == {(wire.Kind.AUDIO, 320)}
    assert protocol.frames_sent == 11
    assert protocol.late_sends == 0


def test_each_frame_is_one_write():
    """Every frame is written whole in one write, which Asterisk needs."""
    protocol, transport, clock = connect(dtmf=[(0.01, "5")])
    writes = []
    transport.write = writes.append
    at(clock, 0.1)
    assert writes
    for data in writes:
        frames = wire.Decoder(expect_uuid=False).feed(data)
        assert len(frames) == 1
        assert wire.encode(frames[0].kind, frames[0].payload) == data


def test_stall_sends_owed_frames_and_counts_late():
    """
    After a 70 ms stall the client sends the 3 frames owed at once (4 in all, as if on
    time) and counts the 2 that went out late.
    """
    protocol, transport, clock = connect()
    clock.advance(0.07)
    assert len(audio_sent(transport)) == 4
    assert protocol.late_sends == 2
    at(clock, 0.08)
    assert len(audio_sent(transport)) == 5
    assert protocol.late_sends == 2


def test_dtmf_at_scheduled_time():
    """Each digit of a DTMF entry is one frame, the first at its time, the next 250 ms on."""
    protocol, transport, clock = connect(dtmf=[(0.5, "1#")])

    def digits():
        return "".join(f.payload.decode() for f in sent(transport) if f.kind == wire.Kind.DTMF)

    at(clock, 0.49)
    assert digits() == ""
    at(clock, 0.5)
    assert digits() == "1"
    at(clock, 0.74)
    assert digits() == "1"
    at(clock, 0.75)
    assert digits() == "1#"
    assert protocol.dtmf_sent == 2


def test_wav_streamed_then_silence(tmp_path):
    """A WAV goes out frame by frame, its last frame padded with zeros, then silence."""
    pcm = tone(400)  # 50 ms: two whole frames and half of one
    path = tmp_path / "in.wav"
    write_test_wav(path, pcm, 8000)
    protocol, transport, clock = connect(wav=path)
    at(clock, 4 * FRAME)
    frames = audio_sent(transport)
    assert len(frames) == 5
    assert frames[0].payload == pcm[:320]
    assert frames[1].payload == pcm[320:640]
    assert frames[2].payload == pcm[640:] + bytes(160)
    assert frames[3].payload == frames[4].payload == bytes(320)


def test_wav_at_delays_the_wav(tmp_path):
    """With wav_at, silence goes out until the WAV's start time."""
    pcm = tone(320)
    path = tmp_path / "in.wav"
    write_test_wav(path, pcm, 8000)
    protocol, transport, clock = connect(wav=path, wav_at=0.04)
    at(clock, 3 * FRAME)
    payloads = [f.payload for f in audio_sent(transport)]
    assert payloads == [bytes(320), bytes(320), pcm[:320], pcm[320:]]


def test_load_wav_resamples_and_mixes_down(tmp_path):
    """A 16 kHz stereo WAV becomes 8 kHz mono at the same loudness."""
    mono = np.frombuffer(tone(16000, rate=16000), dtype="<i2")
    stereo = np.repeat(mono, 2)  # both channels the same
    path = tmp_path / "stereo.wav"
    write_test_wav(path, stereo.tobytes(), 16000, channels=2)
    pcm = np.frombuffer(load_wav(path, 8000), dtype="<i2").astype(float)
    assert len(pcm) == 8000
    rms = np.sqrt(np.mean(pcm[100:-100] ** 2))
    assert rms == pytest.approx(8000 / np.sqrt(2), rel=0.02)


def test_load_wav_refuses_8_bit(tmp_path):
    """Only 16-bit WAVs are streamed; others get an error naming the file."""
    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes(100))
    with pytest.raises(ValueError, match="8-bit"):
        load_wav(path, 8000)


def test_16k_call_sends_kind_0x12():
    """A 16 kHz call sends kind 0x12 frames of 640 bytes."""
    protocol, transport, clock = connect(rate=16000)
    at(clock, 2 * FRAME)
    frames = audio_sent(transport)
    assert len(frames) == 3
    assert {(f.kind, len(f.payload)) for f in frames} == {(0x12, 640)}


def test_no_audio_sends_only_uuid():
    """With send_audio off the client sends its UUID and nothing else."""
    protocol, transport, clock = connect(send_audio=False)
    at(clock, 1.0)
    assert [f.kind for f in sent(transport)] == [wire.Kind.UUID]


# ---------------------------------------------------------------- ending


def test_server_hangup_frame():
    """A hangup frame ends the call: hung_up_by "server", TCP closed, sending stopped."""
    protocol, transport, clock = connect()
    at(clock, FRAME)
    protocol.dataReceived(wire.hangup())
    assert transport.disconnecting
    count = len(audio_sent(transport))
    at(clock, 10 * FRAME)
    assert len(audio_sent(transport)) == count
    report = finish(protocol)
    assert (report.hung_up_by, report.error) == ("server", None)
    assert report.ok
    assert not clock.getDelayedCalls()


def test_server_close_without_hangup():
    """The server closing TCP without a hangup frame is reported as "server-close"."""
    protocol, transport, clock = connect()
    report = finish(protocol)
    assert (report.hung_up_by, report.error) == ("server-close", None)
    assert not clock.getDelayedCalls()


def test_unclean_close_is_an_error():
    """A connection lost uncleanly (reset) is a server-close with an error."""
    protocol, transport, clock = connect()
    report = finish(protocol, ConnectionLost("reset"))
    assert report.hung_up_by == "server-close"
    assert "connection lost" in report.error


def test_client_hangup_after():
    """With hangup_after the client closes TCP at that time: hung_up_by "client"."""
    protocol, transport, clock = connect(hangup_after=1.0)
    for n in range(1, 50):
        at(clock, n * FRAME)
    assert not transport.disconnecting
    at(clock, 1.0)
    assert transport.disconnecting
    report = finish(protocol)
    assert report.hung_up_by == "client"
    assert report.duration == pytest.approx(1.0)
    assert report.late_sends == 0


def test_close_aborted_if_peer_does_not_take_it():
    """If the connection is still open some time after the client closed it, it is aborted."""
    protocol, transport, clock = connect()
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    protocol.hang_up()
    at(clock, 5.0)
    assert aborted == [True]


def test_unknown_kind_is_protocol_error():
    """A frame of unknown kind from the server ends the call as a protocol error."""
    protocol, transport, clock = connect()
    protocol.dataReceived(wire.encode(0x42, b"xx"))
    assert transport.disconnecting
    report = finish(protocol)
    assert report.hung_up_by == "protocol-error"
    assert "unknown frame kind 0x42" in report.error
    assert not report.ok


def test_dtmf_from_server_is_protocol_error():
    """The server sending DTMF, which makes Asterisk hang up, is a protocol error."""
    protocol, transport, clock = connect()
    protocol.dataReceived(wire.dtmf("5"))
    report = finish(protocol)
    assert report.hung_up_by == "protocol-error"
    assert "0x03" in report.error


def test_truncated_frame_at_close_is_protocol_error():
    """The server closing inside a frame is a protocol error."""
    protocol, transport, clock = connect()
    protocol.dataReceived(wire.audio(bytes(320))[:100])
    report = finish(protocol)
    assert report.hung_up_by == "protocol-error"
    assert "inside a frame" in report.error


# ---------------------------------------------------------------- receiving


def test_received_audio_recorded_and_gaps():
    """
    Received PCM is kept in order; gaps are the times between frame arrivals (20 ms
    apart, then one 60 ms hole: the max gap is 60 ms).
    """
    protocol, transport, clock = connect(send_audio=False)
    chunks = [tone(160, start=160 * i) for i in range(6)]
    times = [0.1, 0.12, 0.14, 0.2, 0.22, 0.24]
    for t, pcm in zip(times, chunks):
        at(clock, t)
        protocol.dataReceived(wire.audio(pcm))
    report = finish(protocol)
    assert report.received_pcm == b"".join(chunks)
    assert report.frames_received == 6
    assert report.audio_seconds == pytest.approx(0.12)
    assert report.rate_received == 8000
    assert report.gap_max_ms == pytest.approx(60)
    assert report.gap_p50_ms == pytest.approx(20)
    assert len(report.gaps_ms) == 5


def test_frames_in_one_read_share_a_time():
    """Frames that arrive in one read share an arrival time: a burst shows as 0 ms gaps."""
    protocol, transport, clock = connect(send_audio=False)
    protocol.dataReceived(wire.audio(bytes(320)) * 3)
    report = finish(protocol)
    assert report.gaps_ms == [0.0, 0.0]
    assert report.gap_max_ms == 0.0


def test_frame_split_across_reads():
    """A frame split across reads is assembled and counted once."""
    protocol, transport, clock = connect(send_audio=False)
    data = wire.audio(tone(160))
    protocol.dataReceived(data[:7])
    protocol.dataReceived(data[7:])
    report = finish(protocol)
    assert report.frames_received == 1
    assert report.received_pcm == tone(160)


def test_gap_across_client_stall_is_left_out():
    """
    A gap measured across a stall of the client itself (its tick ran late) does not count
    in the gap statistics; it is counted as excluded.
    """
    protocol, transport, clock = connect()
    protocol.dataReceived(wire.audio(bytes(320)))
    at(clock, FRAME)
    protocol.dataReceived(wire.audio(bytes(320)))
    clock.advance(0.1)  # the client stalls: its tick fires 80 ms late
    protocol.dataReceived(wire.audio(bytes(320)) * 2)
    at(clock, 0.14)
    protocol.dataReceived(wire.audio(bytes(320)))
    report = finish(protocol)
    assert report.late_sends == 4
    assert report.gaps_excluded == 2
    assert report.gaps_ms == [pytest.approx(20), pytest.approx(20)]


def test_speech_detection():
    """Frames above -45 dBFS count as speech; the first one's time is reported."""
    protocol, transport, clock = connect(send_audio=False)
    quiet = (np.ones(160) * 50).astype("<i2").tobytes()  # about -56 dBFS
    at(clock, 0.1)
    protocol.dataReceived(wire.audio(quiet))
    at(clock, 0.3)
    protocol.dataReceived(wire.audio(tone(160)) + wire.audio(tone(160)))
    report = finish(protocol)
    assert report.speech_seconds == pytest.approx(0.04)
    assert report.first_speech_after == pytest.approx(0.3)


def test_received_16k_audio_rate():
    """The report's rate is the rate of the frames the server sent."""
    protocol, transport, clock = connect(send_audio=False)
    protocol.dataReceived(wire.audio(bytes(640), 16000))
    report = finish(protocol)
    assert report.rate_received == 16000
    assert report.audio_seconds == pytest.approx(0.02)


# ---------------------------------------------------------------- report


def test_report_dict_is_json_without_pcm():
    """to_dict is JSON-safe and leaves the PCM out; so does repr."""
    protocol, transport, clock = connect(send_audio=False)
    protocol.dataReceived(wire.audio(tone(160)) * 2)
    report = finish(protocol)
    data = report.to_dict()
    assert "received_pcm" not in data
    assert json.loads(json.dumps(data))["frames_received"] == 2
    assert "received_pcm" not in repr(report)


def test_summary_says_who_hung_up():
    """The summary names the call, who hung up and the errors."""
    protocol, transport, clock = connect()
    protocol.dataReceived(wire.encode(0x42, b""))
    text = finish(protocol).summary()
    assert UUID in text
    assert "protocol error" in text
    assert "unknown frame kind" in text


def test_aggregate():
    """aggregate counts calls, outcomes and late sends, and takes gaps over all calls."""
    reports = [
        CallReport(uuid="a", connected=True, hung_up_by="server", gaps_ms=[20.0, 20.0]),
        CallReport(uuid="b", connected=True, hung_up_by="server", gaps_ms=[60.0], late_sends=2),
        CallReport(uuid="c", error="cannot connect: refused"),
    ]
    totals = aggregate(reports)
    assert totals["calls"] == 3
    assert totals["connected"] == 2
    assert totals["completed"] == 2
    assert totals["errors"] == 1
    assert totals["gap_max_ms"] == 60.0
    assert totals["gap_p50_ms"] == 20.0
    assert totals["late_sends"] == 2
    assert totals["hung_up_by"] == {"server": 2}
    json.dumps(totals)
    assert "3 calls" in aggregate_summary(totals)


# ---------------------------------------------------------------- command line


def test_parse_args():
    """The command line becomes the call's options and the run's."""
    options, run = parse_args(
        [
            "127.0.0.1:8101",
            "--uuid",
            UUID,
            "--rate",
            "16000",
            "--dtmf",
            "2.5:101#",
            "--dtmf",
            "6:1",
            "--record",
            "out.wav",
            "--seconds",
            "10",
            "--json",
        ]
    )
    assert (options.host, options.port, options.uuid) == ("127.0.0.1", 8101, UUID)
    assert options.rate == 16000
    assert options.dtmf == ((2.5, "101#"), (6.0, "1"))
    assert str(options.record) == "out.wav"
    assert options.hangup_after == 10.0
    assert options.send_audio
    assert (run.calls, run.ramp_s, run.json) == (1, 0.0, True)


def test_parse_args_load_and_no_audio():
    """--calls, --ramp and --no-audio are read; IPv6 brackets are stripped."""
    options, run = parse_args(["[::1]:8101", "--calls", "20", "--ramp", "2", "--no-audio"])
    assert (options.host, options.port) == ("::1", 8101)
    assert not options.send_audio
    assert (run.calls, run.ramp_s) == (20, 2.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["nohost"],
        ["h:99999"],
        ["h:1", "--dtmf", "2.5"],
        ["h:1", "--dtmf", "x:1"],
        ["h:1", "--dtmf", "1:9z"],
        ["h:1", "--rate", "11025"],
        ["h:1", "--calls", "2", "--uuid", UUID],
        ["h:1", "--wav", "/nonexistent.wav"],
        ["h:1", "--uuid", "nope"],
    ],
)
def test_parse_args_refuses(argv, capsys):
    """A bad argument exits with status 2 and a message."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_options_for_calls():
    """Each of N calls gets its own UUID and its own numbered recording."""
    template = CallOptions(host="h", port=1, record="rec/out.wav")
    many = options_for_calls(template, 3)
    assert len({o.uuid for o in many}) == 3
    assert [str(o.record) for o in many] == [
        "rec/out-001.wav",
        "rec/out-002.wav",
        "rec/out-003.wav",
    ]
    assert options_for_calls(template, 1) == [template]


# ---------------------------------------------------------------- over TCP


class ToneServer(Protocol):
    """After the UUID, sends 25 tone frames (0.5 s) and a hangup frame, all at once."""

    def __init__(self):
        self.decoder = wire.Decoder()
        self.uuid = None
        self.frames: list[wire.Frame] = []
        self.lost: Deferred = Deferred()

    def dataReceived(self, data):
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if frame.kind == wire.Kind.UUID:
                self.uuid = str(wire.parse_uuid(frame))
                self.on_uuid()
                if getattr(self, "arrived", None) is not None:
                    self.arrived.put(self)
            self.on_frame(frame)

    def on_frame(self, frame):
        pass

    def on_uuid(self):
        pcm = tone(25 * 160)
        for i in range(25):
            self.transport.write(wire.audio(pcm[i * 320 : (i + 1) * 320]))
        self.transport.write(wire.hangup())

    def connectionLost(self, reason):
        self.lost.callback(None)


class DTMFServer(ToneServer):
    """Sends silence while listening; hangs up on '#'."""

    def on_uuid(self):
        self.transport.write(wire.audio(bytes(320)))

    def on_frame(self, frame):
        if frame.kind == wire.Kind.DTMF and frame.payload == b"#":
            self.transport.write(wire.hangup())


class Served(list):
    """The server-side protocols of L{serve}, and C{arrived}: each one once its UUID is in."""

    def __init__(self):
        super().__init__()
        self.arrived = DeferredQueue()


async def serve(protocol_class):
    protocols = Served()

    def build():
        protocol = protocol_class()
        protocol.arrived = protocols.arrived
        protocols.append(protocol)
        return protocol

    factory = Factory.forProtocol(build)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, protocols


async def shut(port, protocols):
    """Wait for the server side of every connection to close, then stop listening."""
    try:
        await gatherResults([p.lost for p in protocols]).addTimeout(5, reactor)
    finally:
        for p in protocols:
            p.transport.abortConnection()
        await port.stopListening()


def call(options) -> Deferred:
    return Deferred.fromCoroutine(place_call(options)).addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_place_call_over_tcp(tmp_path):
    """
    A real call: the server sees the client's UUID, the client hears 0.5 s of audio, then
    the server's hangup, and --record writes that audio to a WAV.
    """
    port, protocols = await serve(ToneServer)
    record = tmp_path / "heard.wav"
    options = CallOptions(host="127.0.0.1", port=port.getHost().port, uuid=UUID, record=record)
    try:
        report = await call(options)
    finally:
        await shut(port, protocols)
    assert protocols[0].uuid == UUID
    assert report.uuid == UUID
    assert report.connected
    assert report.hung_up_by == "server"
    assert report.error is None
    assert report.frames_received == 25
    assert report.audio_seconds == pytest.approx(0.5)
    assert report.speech_seconds == pytest.approx(0.5)
    with wave.open(str(record), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.readframes(w.getnframes()) == tone(25 * 160)


@pytest_twisted.ensureDeferred
async def test_dtmf_over_tcp():
    """Over real TCP the server gets whole audio frames and the DTMF digits in order."""
    port, protocols = await serve(DTMFServer)
    options = CallOptions(host="127.0.0.1", port=port.getHost().port, dtmf=[(0.05, "4#")])
    try:
        report = await call(options)
    finally:
        await shut(port, protocols)
    frames = protocols[0].frames
    digits = "".join(f.payload.decode() for f in frames if f.kind == wire.Kind.DTMF)
    assert digits == "4#"
    audio = [f for f in frames if f.is_audio]
    assert len(audio) >= 10
    assert {len(f.payload) for f in audio} == {320}
    assert report.hung_up_by == "server"
    assert report.dtmf_sent == 2


@pytest_twisted.ensureDeferred
async def test_client_hangup_over_tcp():
    """With hangup_after the client closes TCP itself and the server sees the call end."""
    port, protocols = await serve(DTMFServer)
    options = CallOptions(host="127.0.0.1", port=port.getHost().port, hangup_after=0.1)
    try:
        report = await call(options)
    finally:
        await shut(port, protocols)
    assert report.hung_up_by == "client"
    assert report.ok
    assert 0.1 <= report.duration < 1.0


@pytest_twisted.ensureDeferred
async def test_connect_failure_reported():
    """A refused connection is a report with connected False and the error, not a raise."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    report = await call(CallOptions(host="127.0.0.1", port=number))
    assert not report.connected
    assert "cannot connect" in report.error
    assert not report.ok


@pytest_twisted.ensureDeferred
async def test_place_calls_concurrently():
    """place_calls runs N calls at once over a ramp and reports each; aggregate sums them."""
    port, protocols = await serve(ToneServer)
    template = CallOptions(host="127.0.0.1", port=port.getHost().port, keep_audio=False)
    try:
        reports = await Deferred.fromCoroutine(
            place_calls(options_for_calls(template, 4), ramp_s=0.1)
        ).addTimeout(10, reactor)
    finally:
        await shut(port, protocols)
    assert sorted(p.uuid for p in protocols) == sorted(r.uuid for r in reports)
    assert all(r.hung_up_by == "server" and r.frames_received == 25 for r in reports)
    assert all(r.received_pcm == b"" for r in reports)
    totals = aggregate(reports)
    assert (totals["calls"], totals["completed"]) == (4, 4)
    assert totals["hung_up_by"] == {"server": 4}


def test_options_are_frozen():
    """CallOptions is an immutable value."""
    options = CallOptions(host="h", port=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.port = 2


@pytest_twisted.ensureDeferred
async def test_cancelled_call_hangs_up_and_cleans_up():
    """
    Giving up on place_call (cancelling it, as a timeout does) once the call is up hangs the
    call up and closes its socket before the cancellation is reported.
    """
    port, protocols = await serve(DTMFServer)  # never hangs up without a '#'
    options = CallOptions(host="127.0.0.1", port=port.getHost().port)
    d = Deferred.fromCoroutine(place_call(options))
    try:
        await protocols.arrived.get().addTimeout(10, reactor)
        d.cancel()
        with pytest.raises(CancelledError):
            await d.addTimeout(10, reactor)
    finally:
        await shut(port, protocols)
    # shut() waited for the server side to see the client close the connection.
    assert protocols[0].uuid == options.uuid


@pytest_twisted.ensureDeferred
async def test_tracker_hangs_up_all_calls():
    """CallTracker.hang_up_all ends every active call as a client hangup and waits for it."""
    port, protocols = await serve(DTMFServer)
    tracker = CallTracker()
    template = CallOptions(host="127.0.0.1", port=port.getHost().port)
    d = Deferred.fromCoroutine(
        place_calls(options_for_calls(template, 2), tracker=tracker)
    ).addTimeout(10, reactor)
    try:
        # The server has both UUIDs: both calls are connected, hence tracked.
        for _ in range(2):
            await protocols.arrived.get().addTimeout(10, reactor)
        assert len(tracker.active) == 2
        await tracker.hang_up_all()
        reports = await d
    finally:
        await shut(port, protocols)
    assert [r.hung_up_by for r in reports] == ["client", "client"]
    assert all(r.ok for r in reports)


@pytest_twisted.ensureDeferred
async def test_tracker_stops_the_ramp():
    """Calls still waiting for their start on a ramp are not placed once the run stops."""
    port, protocols = await serve(DTMFServer)
    tracker = CallTracker()
    template = CallOptions(host="127.0.0.1", port=port.getHost().port)
    d = Deferred.fromCoroutine(
        place_calls(options_for_calls(template, 3), ramp_s=30, tracker=tracker)
    ).addTimeout(10, reactor)
    try:
        await protocols.arrived.get().addTimeout(10, reactor)
        assert len(tracker.active) == 1
        await tracker.hang_up_all()
        reports = await d
    finally:
        await shut(port, protocols)
    assert reports[0].hung_up_by == "client"
    assert [r.error for r in reports[1:]] == ["not placed: the run was stopped"] * 2
    assert len(protocols) == 1


@pytest_twisted.ensureDeferred
async def test_cancelled_place_calls_cleans_up():
    """
    Giving up on place_calls in the middle of a ramp hangs up the call in progress, places
    none of those still waiting for their start, and leaves no socket or timer behind.
    """
    port, protocols = await serve(DTMFServer)
    template = CallOptions(host="127.0.0.1", port=port.getHost().port)
    d = Deferred.fromCoroutine(place_calls(options_for_calls(template, 3), ramp_s=30))
    try:
        await protocols.arrived.get().addTimeout(10, reactor)
        d.cancel()
        with pytest.raises(CancelledError):
            await d.addTimeout(10, reactor)
    finally:
        await shut(port, protocols)
    # Only the first call was placed; shut() waited for the client to close it.
    assert len(protocols) == 1


# ---------------------------------------------------------------- load mode


def paced(n: int, **kw) -> tuple[list[CallProtocol], list[TCPStringTransport], Clock, Pacer]:
    clock = Clock()
    pacer = Pacer(clock)
    protocols, transports = [], []
    for _ in range(n):
        options = CallOptions(host="127.0.0.1", port=8101, **kw)
        protocol = CallProtocol(options, clock, pacer=pacer)
        transport = TCPStringTransport()
        protocol.makeConnection(transport)
        protocols.append(protocol)
        transports.append(transport)
    return protocols, transports, clock, pacer


def test_pacer_gives_each_call_one_frame_per_tick_with_one_timer():
    """
    Three calls on one L{Pacer} share a single timer, and each sends one frame at connect
    and exactly one per 20 ms tick, none late.
    """
    protocols, transports, clock, pacer = paced(3)
    assert len(clock.getDelayedCalls()) == 1
    for n in range(1, 6):
        at(clock, n * FRAME)
    assert [len(audio_sent(t)) for t in transports] == [6, 6, 6]
    assert [p.late_sends for p in protocols] == [0, 0, 0]
    assert pacer.late_ticks == 0
    for p in protocols:
        finish(p)


def test_pacer_stops_with_its_last_call():
    """The pacer's timer is gone once its last call has ended (no DelayedCall left)."""
    protocols, transports, clock, pacer = paced(2)
    finish(protocols[0])
    assert len(clock.getDelayedCalls()) == 1
    finish(protocols[1])
    assert clock.getDelayedCalls() == []
    assert len(pacer) == 0


def test_pacer_counts_its_own_stall():
    """
    A 70 ms stall of the generator is a late tick of the pacer, with its lateness in the
    pacer's stats, and every call counts the frames it sent late.
    """
    protocols, transports, clock, pacer = paced(2)
    clock.advance(0.07)
    assert pacer.late_ticks == 1
    assert pacer.stats()["tick_lateness_max_ms"] == pytest.approx(10.0)
    assert pacer.stats()["late_at"] == [pytest.approx(0.07)]
    assert [p.late_sends for p in protocols] == [2, 2]
    for p in protocols:
        finish(p)


def test_frames_owed_counts_what_the_server_did_not_send():
    """
    Over 1 s connected a paced server owes 50 frames: a call that heard 30 reports 20 owed,
    one that heard all 50 reports 0.
    """
    short, _, clock_a = connect(send_audio=False)
    full, _, clock_b = connect(send_audio=False)
    for i in range(50):
        at(clock_a, i * FRAME)
        clock_b.advance(clock_a.seconds() - clock_b.seconds())
        if i < 30:
            short.dataReceived(wire.audio(bytes(320)))
        full.dataReceived(wire.audio(bytes(320)))
    at(clock_a, 1.0)
    clock_b.advance(clock_a.seconds() - clock_b.seconds())
    assert finish(short).frames_owed == 20
    assert finish(full).frames_owed == 0


def test_aggregate_flags_a_generator_that_fell_behind():
    """
    Totals are valid only if no call sent late; they sum frames owed and protocol errors
    and give the worst per-leg p99.
    """
    good = [
        CallReport(uuid="a", connected=True, hung_up_by="client", gap_p99_ms=21.0, frames_owed=1),
        CallReport(
            uuid="b", connected=True, hung_up_by="protocol-error", gap_p99_ms=45.0, error="x"
        ),
    ]
    totals = aggregate(good)
    assert totals["valid"] is True
    assert totals["frames_owed"] == 1
    assert totals["protocol_errors"] == 1
    assert totals["worst_leg_gap_p99_ms"] == 45.0
    behind = aggregate(good + [CallReport(uuid="c", connected=True, late_sends=3)])
    assert behind["valid"] is False
    assert "INVALID" in aggregate_summary(behind)
    assert "INVALID" not in aggregate_summary(totals)


def test_aggregate_uses_the_pacer_stats():
    """A pacer that ran a tick late makes the totals invalid and shows in them."""
    protocols, transports, clock, pacer = paced(1)
    clock.advance(0.05)
    report = finish(protocols[0])
    totals = aggregate([report], pacer)
    assert totals["client"]["late_ticks"] == 1
    assert totals["valid"] is False
    json.dumps(totals)


def test_parse_ports():
    """Ranges and lists of ports expand in order; bad parts are named."""
    assert parse_ports("8080-8083,9000") == (8080, 8081, 8082, 8083, 9000)
    assert parse_ports("8080") == (8080,)
    for bad, said in (("80-x", "'80-x'"), ("9-1", "ends before"), ("70000", "65535")):
        with pytest.raises(ValueError, match=said):
            parse_ports(bad)


def test_options_for_calls_spreads_over_ports_round_robin():
    """Five calls over three ports go 1, 2, 3, 1, 2, each with its own UUID."""
    template = CallOptions(host="h", port=9)
    many = options_for_calls(template, 5, ports=(1, 2, 3))
    assert [o.port for o in many] == [1, 2, 3, 1, 2]
    assert len({o.uuid for o in many}) == 5
    with pytest.raises(ValueError, match="ports"):
        options_for_calls(template, 2, ports=())


def test_parse_args_ports():
    """--ports (repeatable) gives the run's ports; a bad range exits with status 2."""
    options, run = parse_args(
        ["127.0.0.1:8080", "--calls", "4", "--ports", "8080-8081", "--ports", "9000"]
    )
    assert run.ports == (8080, 8081, 9000)
    with pytest.raises(SystemExit) as e:
        parse_args(["127.0.0.1:8080", "--ports", "9-1"])
    assert e.value.code == 2


class PacedSilenceServer(Protocol):
    """Sends one silence frame every 20 ms from connect until the client closes."""

    def __init__(self):
        self.lost: Deferred = Deferred()
        self.frames_in = 0
        self.decoder = wire.Decoder()

    def connectionMade(self):
        from twisted.internet.task import LoopingCall

        self.loop = LoopingCall(self.transport.write, wire.audio(bytes(320)))
        self.loop.start(FRAME, now=True)

    def dataReceived(self, data):
        self.frames_in += sum(f.is_audio for f in self.decoder.feed(data))

    def connectionLost(self, reason):
        self.loop.stop()
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_load_run_across_two_ports():
    """
    A load run of four calls over two real ports, sharing one pacer: calls alternate
    between the ports, every call hears the paced server's frames, and the totals count
    the calls, the client's own timing, and who hung up.
    """
    ports = [await serve(PacedSilenceServer) for _ in range(2)]
    numbers = [p.getHost().port for p, _ in ports]
    template = CallOptions(host="127.0.0.1", port=numbers[0], hangup_after=0.5, keep_audio=False)
    pacer = Pacer(reactor)
    try:
        reports = await Deferred.fromCoroutine(
            place_calls(options_for_calls(template, 4, numbers), ramp_s=0.05, pacer=pacer)
        ).addTimeout(10, reactor)
    finally:
        for port, protocols in ports:
            await shut(port, protocols)
    assert [len(protocols) for _, protocols in ports] == [2, 2]
    assert all(r.ok and r.frames_received > 10 for r in reports)
    assert all(p.frames_in > 10 for _, protocols in ports for p in protocols)
    totals = aggregate(reports, pacer)
    assert totals["calls"] == 4 and totals["protocol_errors"] == 0
    assert totals["hung_up_by"] == {"client": 4}
    assert set(totals["client"]) == {
        "late_ticks",
        "tick_lateness_p99_ms",
        "tick_lateness_max_ms",
        "late_at",
    }
    assert len(pacer) == 0


def test_arrival_times_kept_with_the_audio():
    """
    With keep_audio each received frame's arrival (seconds after connect) is kept, one per
    frame of the PCM, and left out of the JSON report.
    """
    protocol, transport, clock = connect(send_audio=False)
    at(clock, 0.5)
    protocol.dataReceived(wire.audio(bytes(320)))
    at(clock, 0.52)
    protocol.dataReceived(wire.audio(tone(160)))
    report = finish(protocol)
    assert report.arrivals_s == [pytest.approx(0.5), pytest.approx(0.52)]
    assert len(report.received_pcm) == 2 * 320
    assert "arrivals_s" not in report.to_dict()
