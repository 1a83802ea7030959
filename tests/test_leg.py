"""
Tests for L{audiosocket.leg} and L{audiosocket.clock}: pacing, playout, hangup and bad input,
driven by StringTransport and task.Clock (exact time, no sockets, no sleeps).
"""

import ipaddress
import uuid

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from audiosocket import wire
from audiosocket.clock import AudioClock
from audiosocket.leg import VISITOR, Dtmf, Hangup, LegFactory, Refused

U1 = uuid.UUID("11111111-2222-3333-4444-555555555555")
U2 = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
TONE = b"\x10\x27" * 160  # one 20 ms frame of a constant, non-zero sample at 8 kHz


class Harness:
    def __init__(self, on_leg=None, **kw):
        self.reactor = Clock()
        self.clock = AudioClock(reactor=self.reactor)
        self.clock.startService()
        self.legs = []
        self.factory = LegFactory(
            VISITOR, self.clock, on_leg or self.legs.append, reactor=self.reactor, **kw
        )

    def connect(self, peer="127.0.0.1"):
        leg = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        if leg is None:
            return None, None
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        leg.makeConnection(transport)
        return leg, transport

    def call(self, uid=U1):
        leg, transport = self.connect()
        leg.dataReceived(wire.uuid_frame(uid))
        return leg, transport

    def ticks(self, n):
        for _ in range(n):
            self.reactor.advance(0.02)


def frames(transport):
    data = transport.value()
    transport.clear()
    return wire.Decoder(expect_uuid=False).feed(data)


def lose(leg, transport):
    transport.loseConnection()
    leg.connectionLost()


# ---------------------------------------------------------------- pacing


def test_one_frame_per_tick():
    """A connected leg gets exactly one frame per 20 ms tick, from its first tick on."""
    h = Harness()
    leg, t = h.call()
    h.reactor.advance(0.019)
    assert frames(t) == []
    for _ in range(10):
        h.reactor.advance(0.02)
        got = frames(t)
        assert len(got) == 1
    assert leg.stats.frames == 10


def test_silence_fill():
    """With nothing to say, every frame is 320 bytes of 8 kHz silence (kind 0x10)."""
    h = Harness()
    leg, t = h.call()
    h.ticks(5)
    got = frames(t)
    assert [(f.kind, f.payload) for f in got] == [(0x10, bytes(320))] * 5


def test_not_paced_before_uuid():
    """
    A connection is paced from its UUID on (Asterisk sends it at once); before that it
    costs no clock tick, so connections that never identify themselves load nothing.
    """
    h = Harness()
    leg, t = h.connect()
    h.ticks(3)
    assert frames(t) == [] and len(h.clock) == 0
    leg.dataReceived(wire.uuid_frame(U1))
    h.ticks(3)
    assert len(frames(t)) == 3


def test_speech_then_silence():
    """Queued speech goes out a frame per tick, padded to a whole frame, then silence."""
    h = Harness()
    leg, t = h.call()
    done = leg.play(TONE * 2 + TONE[:100])
    h.ticks(5)
    got = frames(t)
    assert [f.payload == TONE for f in got[:2]] == [True, True]
    assert got[2].payload == TONE[:100] + bytes(220)
    assert got[3].payload == bytes(320) and got[4].payload == bytes(320)
    assert done.called and done.result is True


def test_play_fires_when_last_frame_sent():
    """play()'s Deferred fires on the tick that sends its last frame, not before."""
    h = Harness()
    leg, t = h.call()
    done = leg.play(TONE * 3)
    h.ticks(2)
    assert not done.called
    h.ticks(1)
    assert done.result is True


def test_late_tick_catches_up_owed_frames():
    """A tick 70 ms late sends the 3 frames owed, once, then the cadence resumes."""
    h = Harness()
    leg, t = h.call()
    h.ticks(1)
    frames(t)
    h.reactor.advance(0.06)  # three intervals pass in one step
    assert len(frames(t)) == 3
    assert leg.stats.late_ticks == 1
    h.ticks(1)
    assert len(frames(t)) == 1


def test_long_stall_is_skipped_not_burst():
    """After a 1 s stall the clock sends at most max_catchup frames, never a 50-frame burst."""
    h = Harness()
    leg, t = h.call()
    h.ticks(1)
    frames(t)
    h.reactor.advance(1.0)
    assert len(frames(t)) == h.clock.max_catchup
    assert h.clock.skipped_frames == 50 - h.clock.max_catchup
    assert leg.stats.max_gap_ms == pytest.approx(1000.0)


def test_absolute_schedule_does_not_drift():
    """Ticks stay on start + n·20 ms however the reactor's turns are split."""
    h = Harness()
    leg, t = h.call()
    for _ in range(1000):
        h.reactor.advance(0.013)
        h.reactor.advance(0.007)
    h.reactor.advance(0.001)  # absorb float rounding of the 2000 small steps
    assert leg.stats.frames == 1000
    assert h.clock.late_ticks == 0


def test_one_clock_for_all_legs():
    """Two legs on one clock each get one frame per tick; a leg removed gets no more."""
    h = Harness()
    a, ta = h.call(U1)
    b, tb = h.call(U2)
    h.ticks(3)
    assert len(frames(ta)) == 3 and len(frames(tb)) == 3
    lose(a, ta)
    h.ticks(2)
    assert frames(ta) == [] and len(frames(tb)) == 2
    assert len(h.clock) == 1


# ---------------------------------------------------------------- rates


def test_replies_in_peer_rate():
    """A peer sending 16 kHz audio (kind 0x12) gets 16 kHz replies: kind 0x12, 640 bytes."""
    h = Harness()
    leg, t = h.call()
    leg.dataReceived(wire.audio(bytes(640), 16000))
    assert leg.rate == 16000
    h.ticks(1)
    (f,) = frames(t)
    assert (f.kind, len(f.payload)) == (0x12, 640)


def test_play_at_given_rate():
    """Audio queued at 16 kHz is framed as 0x12 whatever the leg's current rate."""
    h = Harness()
    leg, t = h.call()
    leg.play(b"\x01\x00" * 320, rate=16000)
    h.ticks(1)
    (f,) = frames(t)
    assert (f.kind, len(f.payload)) == (0x12, 640)


# ---------------------------------------------------------------- inbound


def test_uuid_reaches_handler():
    """The handler gets the leg once its UUID is known, with the UUID set."""
    h = Harness()
    leg, t = h.call()
    assert h.legs == [leg] and leg.uuid == U1


def test_audio_and_dtmf_queued():
    """Inbound audio goes to the audio queue, DTMF to the events queue, in order."""
    h = Harness()
    leg, t = h.call()
    leg.dataReceived(wire.audio(TONE) + wire.dtmf("1") + wire.dtmf("#"))
    assert leg.audio.pending == [TONE]
    assert leg.events.pending == [Dtmf("1"), Dtmf("#")]


def test_audio_queue_keeps_newest():
    """When nobody reads audio, the queue keeps the newest frames and counts the dropped."""
    h = Harness(audio_queue_frames=3)
    leg, t = h.call()
    for i in range(5):
        h.reactor.advance(0.02)
        leg.dataReceived(wire.audio(bytes([i, 0]) * 160))
    assert [p[0] for p in leg.audio.pending] == [2, 3, 4]
    assert leg.audio_dropped == 2 and not t.disconnecting


def test_peer_close_is_hangup_event():
    """Asterisk hangs up by closing TCP: a waiting reader gets Hangup(by='peer')."""
    h = Harness()
    leg, t = h.call()
    got = leg.events.get()
    lose(leg, t)
    assert got.result == Hangup("peer", "")
    assert leg.when_closed().called


def test_audio_waiters_cancelled_on_close():
    """A pending audio get() is cancelled when the leg ends, leaving no waiter behind."""
    h = Harness()
    leg, t = h.call()
    d = leg.audio.get()
    lose(leg, t)
    assert isinstance(d.result.value, defer.CancelledError)
    d.addErrback(lambda f: None)
    assert leg.audio.waiting == []


# ---------------------------------------------------------------- hangup


def test_hangup_after_playout():
    """hangup() waits for queued audio to play out, then sends 0x00 and closes."""
    h = Harness()
    leg, t = h.call()
    leg.play(TONE * 3)
    closed = leg.hangup()
    h.ticks(2)
    assert [f.kind for f in frames(t)] == [0x10, 0x10]
    assert not t.disconnecting
    h.ticks(1)
    got = frames(t)
    assert [f.kind for f in got] == [0x10, 0x00]
    assert got[0].payload == TONE
    assert t.disconnecting
    leg.connectionLost()
    assert closed.called and leg.hung_up_by == "server"


def test_hangup_with_nothing_queued():
    """With nothing to play, hangup goes out on the next tick and no audio follows."""
    h = Harness()
    leg, t = h.call()
    leg.hangup()
    h.ticks(1)
    assert [f.kind for f in frames(t)] == [0x00]
    h.ticks(3)
    assert t.value() == b""


def test_stop_playback_drops_queue():
    """stop_playback (barge-in) drops queued audio at once; its Deferred says False."""
    h = Harness()
    leg, t = h.call()
    done = leg.play(TONE * 10)
    h.ticks(2)
    assert leg.stop_playback() == 8
    assert done.result is False
    h.ticks(1)
    assert frames(t)[-1].payload == bytes(320)


def test_only_audio_and_hangup_are_sent():
    """Whatever happens on a leg, the server only ever writes audio and hangup kinds."""
    h = Harness()
    leg, t = h.call()
    leg.dataReceived(wire.dtmf("5"))
    leg.play(TONE * 2)
    h.ticks(3)
    leg.hangup()
    h.ticks(1)
    kinds = {f.kind for f in wire.Decoder(expect_uuid=False).feed(t.value())}
    assert kinds <= set(wire.AUDIO_KINDS) | {wire.Kind.HANGUP}


def test_each_frame_is_one_write():
    """Every frame leaves in a single transport.write (Asterisk drops split frames)."""
    h = Harness()
    leg, t = h.call()
    writes = []
    t.write = writes.append
    leg.play(TONE * 2)
    h.ticks(4)
    assert len(writes) == 4
    for w in writes:
        (f,) = wire.Decoder(expect_uuid=False).feed(w)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data,reason",
    [
        (wire.audio(TONE), "first_frame_not_uuid"),
        (wire.encode(1, b"short"), "bad_uuid"),
        (wire.uuid_frame(U1) + wire.encode(0x42, b"x"), "unknown_kind"),
        (wire.uuid_frame(U1) + wire.encode(0x10, b""), "empty_audio"),
        (wire.uuid_frame(U1) + b"\xfe\xff\xff garbage", "unknown_kind"),
        (b"GET / HTTP/1.1\r\n\r\n", "first_frame_not_uuid"),
    ],
)
def test_bad_input_closes_leg(data, reason):
    """Each malformed input closes that leg with its reason, counted on the factory."""
    h = Harness()
    leg, t = h.connect()
    leg.dataReceived(data)
    assert t.disconnecting
    assert leg.close_reason == reason
    assert h.factory.refused[reason] == 1
    leg.connectionLost()
    assert len(h.clock) == 0


def test_bad_leg_does_not_touch_good_leg():
    """A garbage connection is closed while a good leg on the same port keeps its cadence."""
    h = Harness()
    good, tg = h.call(U1)
    bad, tb = h.connect()
    h.ticks(2)
    bad.dataReceived(b"\x99\x00\x01x")
    bad.connectionLost()
    h.ticks(3)
    assert len(frames(tg)) == 5 and not tg.disconnecting


def test_truncated_frame_at_close_is_logged_reason():
    """A connection closed mid-frame records truncated_frame."""
    h = Harness()
    leg, t = h.call()
    leg.dataReceived(wire.audio(TONE)[:50])
    leg.connectionLost()
    assert leg.close_reason == "truncated_frame"
    assert h.factory.refused["truncated_frame"] == 1


def test_handshake_timeout():
    """A connection that sends no UUID within handshake_timeout is closed."""
    h = Harness(handshake_timeout=5.0)
    leg, t = h.connect()
    h.reactor.advance(4.9)
    assert not t.disconnecting
    h.reactor.advance(0.2)
    assert t.disconnecting and leg.close_reason == "handshake_timeout"


def test_duplicate_live_uuid_refused():
    """A second live connection with a UUID in use on the port is refused; the first lives."""
    h = Harness()
    a, ta = h.call(U1)
    b, tb = h.call(U1)
    assert tb.disconnecting and b.close_reason == "uuid_in_use"
    assert not ta.disconnecting and h.factory.live[U1] is a
    b.connectionLost()
    assert h.factory.live[U1] is a


def test_flooding_peer_closed():
    """A peer streaming far faster than real time is closed as audio_flood."""
    h = Harness(audio_burst_s=2.0)
    leg, t = h.call()
    leg.dataReceived(wire.audio(TONE) * 99)  # 1.98 s at once: allowed burst
    assert not t.disconnecting
    leg.dataReceived(wire.audio(TONE) * 5)
    assert t.disconnecting and leg.close_reason == "audio_flood"


def test_real_time_peer_is_not_flood():
    """A peer sending one frame per 20 ms for a minute is never taken for a flood."""
    h = Harness(audio_burst_s=0.5)
    leg, t = h.call()
    for _ in range(3000):
        leg.dataReceived(wire.audio(TONE))
        h.reactor.advance(0.02)
    assert not t.disconnecting


def test_handler_refusal_closes_leg():
    """A handler raising Refused closes the leg with its reason."""

    def refuse(leg):
        raise Refused("busy", "todas as linhas ocupadas")

    h = Harness(on_leg=refuse)
    leg, t = h.call()
    assert t.disconnecting and leg.close_reason == "busy"


def test_peer_not_allowed():
    """With allowed_peers set, a connection from elsewhere is refused before any frame."""
    h = Harness(allowed_peers=[ipaddress.ip_network("10.0.0.0/8")])
    leg, t = h.connect("192.168.1.5")
    assert leg is None
    assert h.factory.refused["peer_not_allowed"] == 1
    ok, to = h.connect("10.1.2.3")
    assert ok is not None


def test_audio_queued_by_a_dropped_prompts_callback_survives():
    """
    Stopping playback tells each dropped prompt at once; audio queued from that callback (the
    goodbye after a barge-in) is new and must play, not be dropped with the old queue.
    """
    h = Harness()
    leg, transport = h.call()
    goodbye = b"\x20\x4e" * 160
    played = []
    leg.play(TONE * 10).addCallback(lambda ok: played.append(leg.play(goodbye)))
    h.ticks(2)
    leg.stop_playback()
    transport.clear()
    h.ticks(2)
    sent = frames(transport)
    assert sent[0].payload == goodbye
    assert played[0].called and played[0].result is True


def test_when_audio_fires_with_the_peers_rate():
    """when_audio fires with the rate of the first audio frame; cancelling forgets the waiter."""
    h = Harness()
    leg, transport = h.call()
    d = leg.when_audio()
    cancelled = leg.when_audio()
    cancelled.cancel()
    cancelled.addErrback(lambda f: None)
    assert not d.called
    leg.dataReceived(wire.audio(bytes(640), 16000))
    assert d.result == 16000
    assert leg.when_audio().result == 16000


def test_clock_lateness_counts_from_the_first_owed_frame():
    """A 100 ms stall shows as ~100 ms of lateness, not the 20 ms of the latest slot."""
    reactor = Clock()
    clock = AudioClock(reactor=reactor)
    clock.startService()
    reactor.advance(0.02)
    reactor.advance(0.1)  # five slots owed at once
    assert clock.lateness.max_ms >= 79.0
    clock.stopService()


# ---------------------------------------------------------------- bounds


def _collect_log(leg):
    """Send C{leg}'s log events to a list (to count lines, not to read them)."""
    from twisted.logger import Logger

    events = []
    leg.log = Logger(namespace="test", source=leg, observer=events.append)
    return events


def test_connections_per_port_capped():
    """Past max_connections_per_port a connection is refused at accept and counted."""
    h = Harness(max_connections_per_port=2)
    a, _ = h.connect()
    b, _ = h.connect()
    c, _ = h.connect()
    assert a is not None and b is not None and c is None
    assert h.factory.refused["too_many_connections"] == 1
    lose(a, a.transport)
    d, _ = h.connect()
    assert d is not None


def test_connections_per_peer_span_every_port():
    """
    max_connections_per_peer counts one address over every factory sharing C{peers} (an
    extension manager's ports); other addresses are not affected.
    """
    import collections

    peers = collections.Counter()
    ai = Harness(max_connections_per_peer=2, peers=peers)
    ret = Harness(max_connections_per_peer=2, peers=peers)
    a, _ = ai.connect("10.0.0.9")
    b, _ = ret.connect("10.0.0.9")
    assert a is not None and b is not None
    assert ai.connect("10.0.0.9")[0] is None and ret.connect("10.0.0.9")[0] is None
    assert ai.factory.refused["too_many_from_peer"] == 1
    assert ai.connect("10.0.0.10")[0] is not None
    lose(b, b.transport)
    assert peers["10.0.0.9"] == 1
    assert ai.connect("10.0.0.9")[0] is not None


def test_handshakes_per_port_capped_until_uuid():
    """
    Connections that have not sent their UUID are capped apart from the port's total, so
    idle connections cannot take every slot; one that identifies itself frees its slot.
    """
    h = Harness(max_handshakes_per_port=2)
    a, _ = h.connect()
    h.connect()
    assert h.connect()[0] is None
    assert h.factory.refused["too_many_handshakes"] == 1
    a.dataReceived(wire.uuid_frame(U1))
    assert h.connect()[0] is not None


def test_connection_refusals_log_a_line_a_second():
    """A flood of refused connections logs one line a second, saying how many it left out."""
    from twisted.logger import Logger

    h = Harness(max_connections_per_port=1)
    events = []
    h.factory.log = Logger(namespace="test", observer=events.append)
    h.connect()
    for _ in range(100):
        h.connect()
    assert len(events) == 1 and h.factory.refused["too_many_connections"] == 100
    h.reactor.advance(1.0)
    h.connect()
    assert len(events) == 2 and events[1]["unlogged"] == 99


def test_dtmf_flood_closes_leg():
    """More keypad frames at once than event_burst closes the leg as event_flood."""
    h = Harness(events_per_s=20, event_burst=40)
    leg, t = h.call()
    leg.dataReceived(wire.dtmf("*") * 40)
    assert not t.disconnecting and len(leg.events.pending) == 40
    leg.dataReceived(wire.dtmf("*"))
    assert t.disconnecting and leg.close_reason == "event_flood"
    assert h.factory.refused["event_flood"] == 1


def test_dtmf_flood_decoding_stops_at_the_bound():
    """
    400 KB of keypad frames in one read (100,000 frames) is decoded only up to the frame
    that hits the bound: the work done is event_burst frames, not the whole read.
    """
    h = Harness(event_burst=40)
    leg, t = h.call()
    headers = []
    check = leg._decoder._check_header
    leg._decoder._check_header = lambda kind, length: (headers.append(kind), check(kind, length))
    leg.dataReceived(wire.dtmf("*") * 100_000)
    assert leg.close_reason == "event_flood"
    assert len(headers) == 41
    assert leg._decoder.buffered == 0  # what was not decoded is dropped, not kept


def test_human_keypad_rate_is_not_a_flood():
    """Ten keys a second for a minute (faster than anyone types) is never event_flood."""
    h = Harness(events_per_s=20, event_burst=40)
    leg, t = h.call()
    for _ in range(600):
        leg.dataReceived(wire.dtmf("5"))
        leg.events.pending.clear()
        h.reactor.advance(0.1)
    assert not t.disconnecting


def test_audio_burst_after_idle_is_refused():
    """
    Time spent silent does not accrue a burst: after a minute without audio a peer may
    still send only audio_burst_s ahead of real time, not a minute of it.
    """
    h = Harness(audio_burst_s=2.0)
    leg, t = h.call()
    for _ in range(50):  # one second in real time
        leg.dataReceived(wire.audio(TONE))
        h.reactor.advance(0.02)
    h.reactor.advance(60.0)
    leg.dataReceived(wire.audio(TONE) * 100)  # 2 s at once: the burst allowed
    assert not t.disconnecting
    leg.dataReceived(wire.audio(TONE) * 5)
    assert t.disconnecting and leg.close_reason == "audio_flood"


def test_audio_burst_refills_at_real_time():
    """A spent burst allowance comes back at one second of audio per second, no faster."""
    h = Harness(audio_burst_s=2.0)
    leg, t = h.call()
    leg.dataReceived(wire.audio(TONE) * 100)
    h.reactor.advance(1.0)
    leg.dataReceived(wire.audio(TONE) * 50)
    assert not t.disconnecting
    leg.dataReceived(wire.audio(TONE))
    assert t.disconnecting and leg.close_reason == "audio_flood"


def test_rate_not_allowed_refused():
    """Audio in a kind outside the allowed rates closes the leg as rate_not_allowed."""
    h = Harness(rates=[8000, 16000])
    leg, t = h.call()
    leg.dataReceived(wire.audio(bytes(640), 16000))
    assert not t.disconnecting
    leg.dataReceived(wire.audio(bytes(7680), 192000))
    assert t.disconnecting and leg.close_reason == "rate_not_allowed"
    assert h.factory.refused["rate_not_allowed"] == 1


def test_default_rates_refuse_96_and_192_khz():
    """By default a peer may not choose 96 or 192 kHz (7.7 KB a frame, 384 KB/s)."""
    for rate in (96000, 192000):
        h = Harness()
        leg, t = h.call()
        leg.dataReceived(wire.audio(bytes(wire.frame_bytes(rate)), rate))
        assert leg.close_reason == "rate_not_allowed"


def test_rate_flapping_logs_once_then_closes():
    """
    A peer alternating audio kinds gets one log line for its first switch (not one a
    frame), and is closed as rate_flapping on the switch after max_rate_switches.
    """
    h = Harness(max_rate_switches=5)
    leg, t = h.call()
    events = _collect_log(leg)
    for i in range(6):
        rate = 16000 if i % 2 else 8000
        leg.dataReceived(wire.audio(bytes(wire.frame_bytes(rate)), rate))
    assert leg.rate_switches == 5 and not t.disconnecting
    switched = [e for e in events if "switched" in e["log_format"]]
    assert len(switched) == 1
    leg.dataReceived(wire.audio(bytes(320), 8000))
    assert t.disconnecting and leg.close_reason == "rate_flapping"


def test_paused_leg_writes_nothing():
    """While its transport has paused it (peer not reading), the leg writes no frame."""
    h = Harness()
    leg, t = h.call()
    assert t.producer is leg and t.streaming
    leg.pauseProducing()
    h.ticks(10)
    assert t.value() == b""
    leg.resumeProducing()
    h.ticks(1)
    assert len(frames(t)) == 1


def test_slow_reader_closed_after_bound():
    """A leg paused for longer than slow_reader_s is closed as slow_reader."""
    h = Harness(slow_reader_s=5.0)
    leg, t = h.call()
    leg.pauseProducing()
    h.reactor.advance(4.9)
    assert not t.disconnecting
    h.reactor.advance(0.2)
    assert t.disconnecting and leg.close_reason == "slow_reader"
    assert t.producer is None  # unregistered, or loseConnection would wait for it
    assert h.factory.refused["slow_reader"] == 1


def test_reader_catching_up_is_not_slow():
    """A pause that ends before slow_reader_s forgets its deadline."""
    h = Harness(slow_reader_s=5.0)
    leg, t = h.call()
    leg.pauseProducing()
    h.reactor.advance(4.0)
    leg.resumeProducing()
    h.reactor.advance(4.0)
    leg.pauseProducing()
    h.reactor.advance(4.0)
    assert not t.disconnecting
    lose(leg, t)
    h.clock.stopService()
    assert not h.reactor.getDelayedCalls()  # closing the leg cancelled the deadline


# ---------------------------------------------------------------- peer hangup, event queue, crashing handler


def test_hangup_frame_from_peer_ends_the_leg():
    """
    A peer that hangs up with a 0x00 frame: a waiting reader gets Hangup(by='peer'), the leg
    is marked hung up by the peer and its transport closes; no refusal is counted.
    """
    h = Harness()
    leg, t = h.call()
    got = leg.events.get()
    leg.dataReceived(wire.hangup())
    assert got.result == Hangup("peer", "hangup frame")
    assert leg.hung_up_by == "peer"
    assert t.disconnecting
    assert sum(h.factory.refused.values()) == 0
    leg.connectionLost()
    assert leg.when_closed().called
    assert len(h.clock) == 0


def test_unread_event_flood_closes_leg():
    """
    Events nobody reads pile up to event_queue_size; one more closes the leg as event_flood
    (the keypad rate bucket set wide open so only the queue bound applies).
    """
    h = Harness(event_queue_size=8, events_per_s=1000, event_burst=1000)
    leg, t = h.call()
    leg.dataReceived(wire.dtmf("5") * 8)
    assert not t.disconnecting and len(leg.events.pending) == 8
    leg.dataReceived(wire.dtmf("5"))
    assert t.disconnecting and leg.close_reason == "event_flood"
    assert h.factory.refused["event_flood"] == 1


def test_read_events_do_not_count_toward_the_flood():
    """A reader keeping up with the keys keeps the queue short: no flood however many keys."""
    h = Harness(event_queue_size=8, events_per_s=1000, event_burst=1000)
    leg, t = h.call()
    for _ in range(100):
        leg.dataReceived(wire.dtmf("5"))
        leg.events.get()
    assert not t.disconnecting


def test_crashing_handler_closes_only_that_leg():
    """
    An on_leg handler raising an unexpected error closes that leg as handler_error (logged,
    counted); a leg already in progress on the same port keeps its cadence and a later leg
    is handled normally.
    """
    legs = []

    def on_leg(leg):
        if leg.uuid == U2:
            raise RuntimeError("bug in the handler")
        legs.append(leg)

    h = Harness(on_leg=on_leg)
    good, tg = h.call(U1)
    h.ticks(2)
    bad, tb = h.call(U2)
    assert tb.disconnecting and bad.close_reason == "handler_error"
    assert h.factory.refused["handler_error"] == 1
    bad.connectionLost()
    assert U2 not in h.factory.live
    h.ticks(3)
    assert len(frames(tg)) == 5 and not tg.disconnecting and good.close_reason is None
    later, tl = h.call(uuid.UUID(int=3))
    assert legs == [good, later] and not tl.disconnecting
