"""
Tests for L{audiosocket.listen}: endpointing on real espeak-synthesised pt-BR speech with known
silence around it, and the Listener (barge-in, echo guard, timeouts, clean stop) on a leg driven
by StringTransport, task.Clock and a real AudioClock (exact time, no sockets, no sleeps).
"""

from __future__ import annotations

import functools
import uuid

import numpy as np
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport

from audiosocket import wire
from audiosocket.audio import resample
from audiosocket.clock import AudioClock
from audiosocket.config import AudioConfig
from audiosocket.leg import RESIDENT, VISITOR, LegFactory
from audiosocket.listen import (
    Endpointer,
    Listener,
    ListenSettings,
    SpeechStarted,
    Utterance,
)
from audiosocket.speech.espeak import EspeakEngine

#: The eight phrases the README's endpointing figures are measured on (the first three are
#: also the material of the other tests).
PHRASES = (
    "Bom dia, eu vim visitar o apartamento cento e dois.",
    "Sim, pode deixar subir.",
    "Não, eu não estou esperando ninguém.",
    "Oi, sou o Pedro da Silva, vim entregar uma encomenda para a Ana do cento e um.",
    "É uma entrega do mercado.",
    "Pode autorizar, por favor.",
    "Meu nome é Maria das Graças, sou a diarista.",
    "Vim consertar a máquina de lavar do apartamento duzentos e três.",
)
#: The rates the README's endpointing figures are given for.
RATES = (8000, 12000, 16000, 24000)
#: A sample louder than this (dBFS of full scale) is speech, for the "true" bounds.
TRUE_THRESHOLD_DBFS = -40.0
U1 = uuid.UUID("11111111-2222-3333-4444-555555555555")


@functools.lru_cache(maxsize=None)
def speech(text: str, rate: int) -> bytes:
    """C{text} spoken by espeak-ng (pt-BR), resampled to C{rate}."""
    pcm, native = EspeakEngine().synthesize(text)
    return resample(pcm, native, rate)


def pause(rate: int, ms: float) -> bytes:
    return bytes(2 * round(rate * ms / 1000.0))


def true_bounds(audio: bytes, rate: int) -> tuple[float, float]:
    """(first, last) instant, in seconds, at which a sample is above the speech threshold."""
    a = np.abs(np.frombuffer(audio, dtype="<i2").astype(np.int32))
    loud = np.flatnonzero(a > 32768 * 10 ** (TRUE_THRESHOLD_DBFS / 20))
    return loud[0] / rate, (loud[-1] + 1) / rate


def feed_all(endpointer: Endpointer, audio: bytes, chunk: int | None = None) -> list:
    """Feed C{audio} in C{chunk}-byte pieces (default one frame) timed as real-time arrival."""
    rate = endpointer.rate
    size = chunk or wire.frame_bytes(rate)
    out = []
    for i in range(0, len(audio), size):
        piece = audio[i : i + size]
        now = (i + len(piece)) / (2.0 * rate)
        out.extend((now, event) for event in endpointer.feed(piece, now))
    return out


def utterances(events) -> list:
    return [(now, e) for now, e in events if isinstance(e, Utterance)]


def role_settings(role: str, **overrides) -> ListenSettings:
    return ListenSettings.for_role(AudioConfig(), role, **overrides)


# ---------------------------------------------------------------- settings


def test_for_role_takes_each_roles_silence():
    """Visitor legs end after visitor_silence_ms, resident legs after resident_silence_ms."""
    config = AudioConfig(visitor_silence_ms=900, resident_silence_ms=400)
    assert ListenSettings.for_role(config, VISITOR).silence_ms == 900
    assert ListenSettings.for_role(config, RESIDENT).silence_ms == 400


def test_for_role_takes_barge_in_and_common_fields_from_config():
    """barge_in_ms, echo guard and VAD settings come from [audio]; barge-in is per role."""
    config = AudioConfig(
        barge_in=False,
        resident_barge_in=True,
        barge_in_ms=300,
        echo_guard_ms=150,
        vad_aggressiveness=3,
        preroll_ms=200,
    )
    visitor = ListenSettings.for_role(config, VISITOR)
    resident = ListenSettings.for_role(config, RESIDENT)
    assert (visitor.barge_in, resident.barge_in) == (False, True)
    for s in (visitor, resident):
        assert (s.barge_in_ms, s.echo_guard_ms) == (300, 150)
        assert (s.vad_aggressiveness, s.preroll_ms) == (3, 200)


def test_for_role_refuses_unknown_role():
    """An unknown role is a ValueError naming it."""
    with pytest.raises(ValueError, match="'porter'"):
        ListenSettings.for_role(AudioConfig(), "porter")


@pytest.mark.parametrize(
    "field, value",
    [
        ("vad_aggressiveness", 4),
        ("silence_ms", 0),
        ("energy_floor_dbfs", 3.0),
        ("energy_floor_dbfs", "-45"),
        ("barge_in", 1),
    ],
)
def test_settings_refuse_bad_values(field, value):
    """A bad setting is refused with an error naming the field."""
    with pytest.raises((ValueError, TypeError), match=field):
        ListenSettings(**{field: value})


def test_endpointer_refuses_rate_audiosocket_cannot_carry():
    """A rate no AudioSocket kind carries is a ValueError naming it."""
    with pytest.raises(ValueError, match="11025"):
        Endpointer(11025, ListenSettings())


# ---------------------------------------------------------------- endpointing


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("role, silence_ms", [(VISITOR, 700), (RESIDENT, 600)])
def test_end_comes_within_a_frame_of_silence_ms(rate, role, silence_ms):
    """
    On each of the 8 phrases, the utterance is delivered after silence_ms and within one
    20 ms frame past it, counted from the true end of speech (the last sample above -40
    dBFS). Frames are timed by their position in the audio, so this is exact, not a
    wall-clock measure.
    """
    settings = role_settings(role)
    assert settings.silence_ms == silence_ms
    for text in PHRASES:
        audio = pause(rate, 1000) + speech(text, rate) + pause(rate, 1500)
        _, true_end = true_bounds(audio, rate)
        got = utterances(feed_all(Endpointer(rate, settings), audio))
        assert len(got) == 1, text
        delivered, utterance = got[0]
        assert utterance.reason == "silence"
        late_ms = (delivered - true_end) * 1000
        assert silence_ms - 20 <= late_ms <= silence_ms + 20, (text, late_ms)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_start_comes_within_100ms(rate):
    """SpeechStarted reports a start within 100 ms of the true start of speech."""
    for text in PHRASES:
        audio = pause(rate, 1000) + speech(text, rate) + pause(rate, 1000)
        true_start, _ = true_bounds(audio, rate)
        events = feed_all(Endpointer(rate, ListenSettings()), audio)
        starts = [e for _, e in events if isinstance(e, SpeechStarted)]
        assert len(starts) == 1, text
        assert abs(starts[0].at - true_start) <= 0.1
        assert utterances(events)[0][1].started_at == starts[0].at


def test_utterance_includes_preroll_and_is_trimmed():
    """
    The utterance is the input from preroll_ms before the detected start to at most 60 ms
    after the last voiced frame: the true start of speech is in it, the trailing silence not.
    """
    rate = 8000
    audio = pause(rate, 1000) + speech(PHRASES[1], rate) + pause(rate, 1000)
    true_start, true_end = true_bounds(audio, rate)
    (_, u), = utterances(feed_all(Endpointer(rate, ListenSettings(preroll_ms=300)), audio))
    begin = round((u.started_at - 0.3) * rate) * 2
    assert u.pcm == audio[begin : begin + len(u.pcm)]
    assert begin / 2 / rate < true_start
    end = (begin + len(u.pcm)) / 2 / rate
    assert u.ended_at <= end <= u.ended_at + 0.06
    assert end >= true_end - 0.1


def test_short_pause_keeps_one_utterance():
    """Two phrases with a pause shorter than silence_ms are one utterance."""
    rate = 8000
    audio = (
        pause(rate, 500) + speech(PHRASES[1], rate) + pause(rate, 400)
        + speech(PHRASES[2], rate) + pause(rate, 1000)
    )
    got = utterances(feed_all(Endpointer(rate, ListenSettings(silence_ms=700)), audio))
    assert len(got) == 1
    _, true_end = true_bounds(audio, rate)
    assert got[0][1].ended_at == pytest.approx(true_end, abs=0.1)


def test_long_pause_splits_utterances():
    """Two phrases with a pause longer than silence_ms are two utterances."""
    rate = 8000
    audio = (
        pause(rate, 500) + speech(PHRASES[1], rate) + pause(rate, 1000)
        + speech(PHRASES[2], rate) + pause(rate, 1000)
    )
    got = utterances(feed_all(Endpointer(rate, ListenSettings(silence_ms=700)), audio))
    assert len(got) == 2
    assert got[0][1].ended_at < got[1][1].started_at


def click(rate: int) -> bytes:
    """40 ms of a voiced vowel cut from real speech, 10 ms off the frame grid."""
    s = speech(PHRASES[0], rate)
    a = np.abs(np.frombuffer(s, dtype="<i2").astype(np.int32))
    n = round(rate * 0.04)
    energy = np.convolve(a, np.ones(n), mode="valid")
    at = int(np.argmax(energy))
    return pause(rate, 1010) + s[2 * at : 2 * (at + n)] + pause(rate, 990)


def test_click_starts_speech_but_is_dropped():
    """A 40 ms click is heard (SpeechStarted) but never delivered: shorter than the minimum."""
    rate = 8000
    events = feed_all(Endpointer(rate, ListenSettings(min_utterance_ms=200)), click(rate))
    assert any(isinstance(e, SpeechStarted) for _, e in events)
    assert utterances(events) == []


def test_click_delivered_without_minimum():
    """With min_utterance_ms 0 the same click is delivered (the drop is the minimum's doing)."""
    rate = 8000
    events = feed_all(Endpointer(rate, ListenSettings(min_utterance_ms=0)), click(rate))
    assert len(utterances(events)) == 1


@pytest.mark.parametrize("rate", [8000, 16000])
def test_noise_floor_never_triggers(rate):
    """Ten seconds of white noise at -60 dBFS (and digital silence) give no event at all."""
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 32768 * 10 ** (-60 / 20), size=rate * 10)
    audio = pause(rate, 1000) + noise.astype("<i2").tobytes() + pause(rate, 1000)
    assert feed_all(Endpointer(rate, ListenSettings()), audio) == []


def test_noise_gate_is_what_keeps_noise_out():
    """The same noise with the energy floor below it does trigger the VAD (the gate matters)."""
    rate = 8000
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 32768 * 10 ** (-60 / 20), size=rate * 10).astype("<i2")
    settings = ListenSettings(energy_floor_dbfs=-90, vad_aggressiveness=0)
    endpointer = Endpointer(rate, settings)
    voiced = 0
    for i in range(0, noise.size - 160, 160):
        endpointer.feed(noise[i : i + 160].tobytes(), i / rate)
        voiced += endpointer.voiced
    assert voiced > 0


def test_max_utterance_cut():
    """Speech longer than max_utterance_ms is cut there ("max_length"); the rest follows."""
    rate = 8000
    audio = pause(rate, 500) + speech(PHRASES[0], rate) + pause(rate, 1000)
    _, true_end = true_bounds(audio, rate)
    settings = ListenSettings(max_utterance_ms=1500, preroll_ms=200, min_utterance_ms=100)
    got = utterances(feed_all(Endpointer(rate, settings), audio))
    assert [u.reason for _, u in got] == ["max_length", "max_length", "silence"]
    delivered, first = got[0]
    assert first.duration_s == pytest.approx(1.5 + 0.2, abs=0.021)
    assert delivered == pytest.approx(first.started_at + 1.5, abs=0.021)
    assert got[1][1].started_at == pytest.approx(first.started_at + 1.5, abs=0.021)
    assert got[2][1].ended_at == pytest.approx(true_end, abs=0.1)


@pytest.mark.parametrize("rate", [12000, 24000, 44100])
def test_rates_webrtcvad_lacks(rate):
    """12, 24 and 44.1 kHz input is endpointed too (resampled for the VAD), kept at its rate."""
    settings = ListenSettings(silence_ms=700)
    audio = pause(rate, 1000) + speech(PHRASES[1], rate) + pause(rate, 1500)
    true_start, true_end = true_bounds(audio, rate)
    (delivered, u), = utterances(feed_all(Endpointer(rate, settings), audio))
    assert u.rate == rate
    assert abs(u.started_at - true_start) <= 0.1
    assert 0.68 <= delivered - true_end <= 0.76


def test_chunking_does_not_matter():
    """Audio in 7 ms pieces is endpointed exactly as in 20 ms frames."""
    rate = 8000
    audio = pause(rate, 500) + speech(PHRASES[1], rate) + pause(rate, 1000)
    framed = utterances(feed_all(Endpointer(rate, ListenSettings()), audio))
    pieces = utterances(feed_all(Endpointer(rate, ListenSettings()), audio, chunk=112))
    assert len(framed) == len(pieces) == 1
    (t1, u1), (t2, u2) = framed[0], pieces[0]
    assert u1.pcm == u2.pcm
    assert u1.started_at == pytest.approx(u2.started_at)
    assert t2 - t1 < 0.02


def test_reset_forgets_speech_in_progress():
    """After reset() an utterance in progress is never delivered."""
    rate = 8000
    s = speech(PHRASES[0], rate)
    endpointer = Endpointer(rate, ListenSettings())
    feed_all(endpointer, pause(rate, 500) + s[: len(s) // 2])
    assert endpointer.in_speech
    endpointer.reset()
    assert not endpointer.in_speech
    assert utterances(feed_all(endpointer, pause(rate, 1500))) == []


# ---------------------------------------------------------------- listener

TONE = b"\x10\x27" * 160  # one 20 ms frame of a constant, non-zero sample at 8 kHz


class Harness:
    """A visitor leg on a StringTransport, paced by a real AudioClock on a task.Clock."""

    def __init__(self, **settings):
        self.reactor = Clock()
        self.clock = AudioClock(reactor=self.reactor)
        self.clock.startService()
        legs = []
        self.factory = LegFactory(VISITOR, self.clock, legs.append, reactor=self.reactor)
        self.leg = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.leg.makeConnection(self.transport)
        self.leg.dataReceived(wire.uuid_frame(U1))
        self.barges = []
        self.listener = Listener(
            self.leg,
            ListenSettings(**settings),
            reactor=self.reactor,
            on_barge_in=self.barges.append,
        )
        self.listener.start()

    def say(self, audio: bytes, until=None) -> int:
        """
        Send C{audio} one frame per 20 ms tick; stop early (returning the frame index) once
        C{until()} is true. Returns the number of frames sent otherwise.
        """
        size = wire.frame_bytes(8000)
        for n, i in enumerate(range(0, len(audio), size)):
            self.leg.dataReceived(wire.audio(audio[i : i + size].ljust(size, b"\0")))
            if until is not None and until():
                return n
            self.reactor.advance(0.02)
        return len(audio) // size

    def sent(self) -> list[bytes]:
        data = self.transport.value()
        self.transport.clear()
        return [f.payload for f in wire.Decoder(expect_uuid=False).feed(data)]

    def close(self):
        self.listener.stop()
        self.transport.loseConnection()
        self.leg.connectionLost()
        self.clock.stopService()
        assert self.reactor.getDelayedCalls() == []


def timers(h: Harness) -> list:
    """The DelayedCalls pending on the harness's Clock, other than the audio clock's tick."""
    return [c for c in h.reactor.getDelayedCalls() if not isinstance(c.func, LoopingCall)]


def onset_frame(audio: bytes) -> int:
    start, _ = true_bounds(audio, 8000)
    return int(start / 0.02)


def test_barge_in_stops_prompt_within_a_frame():
    """
    Caller speech over a prompt stops it on the frame that completes barge_in_ms of speech
    (± one frame of the true onset); every frame sent afterwards is silence, and the
    utterance that barged in is still delivered.
    """
    h = Harness(barge_in=True, barge_in_ms=250)
    prompt = h.leg.play(TONE * 500)  # 10 s
    audio = pause(8000, 400) + speech(PHRASES[0], 8000) + pause(8000, 1000)
    stopped_at = h.say(audio, until=lambda: not h.leg.playing)
    assert prompt.called and prompt.result is False
    assert abs((stopped_at - onset_frame(audio) + 1) - 250 / 20) <= 1.5
    assert h.barges == [h.listener] and h.listener.barged_in == 1
    h.sent()
    h.say(audio[(stopped_at + 1) * 320 :])
    assert set(h.sent()) == {bytes(320)}
    d = h.listener.next_utterance(1)
    u = d.result
    assert isinstance(u, Utterance)
    true_start, _ = true_bounds(audio, 8000)
    assert abs(u.started_at - true_start) <= 0.1
    assert u.duration_s >= u.ended_at - true_start  # it begins before the speech did
    h.close()


def test_barge_in_disabled_lets_prompt_play():
    """With barge-in off, speech over a prompt neither stops it nor becomes an utterance."""
    h = Harness(barge_in=False)
    h.leg.play(TONE * 500)
    audio = pause(8000, 400) + speech(PHRASES[0], 8000) + pause(8000, 1000)
    h.say(audio)
    assert h.leg.playing
    assert h.listener.barged_in == 0 and h.barges == []
    assert set(h.sent()) == {TONE}
    assert h.listener.utterances.pending == []
    h.close()


def snippet() -> bytes:
    """About 400 ms of real speech (an echo of a prompt's last words, say)."""
    s = speech(PHRASES[1], 8000)
    start, _ = true_bounds(s, 8000)
    i = round(start * 8000) * 2
    return s[i : i + 2 * 3200]


def test_echo_guard_ignores_speech_right_after_prompt():
    """Speech that starts and ends within echo_guard_ms of a prompt's end starts nothing."""
    h = Harness(echo_guard_ms=600, min_utterance_ms=100)
    done = h.leg.play(TONE * 10)
    h.say(pause(8000, 200), until=lambda: done.called)
    h.say(snippet() + pause(8000, 1500))
    assert h.listener.utterances.pending == []
    h.close()


def test_speech_after_echo_guard_is_heard():
    """The same speech once echo_guard_ms has passed is an utterance (the guard is the cause)."""
    h = Harness(echo_guard_ms=600, min_utterance_ms=100)
    done = h.leg.play(TONE * 10)
    h.say(pause(8000, 200), until=lambda: done.called)
    h.say(pause(8000, 700) + snippet() + pause(8000, 1500))
    assert len(h.listener.utterances.pending) == 1
    h.close()


def test_next_utterance_timeout_returns_none_and_cleans_up():
    """next_utterance(t) fires None after t seconds and leaves no DelayedCall of its own."""
    h = Harness()
    d = h.listener.next_utterance(2.0)
    assert len(timers(h)) == 1
    h.reactor.advance(1.99)
    assert not d.called
    h.reactor.advance(0.02)
    assert d.called and d.result is None
    assert timers(h) == []
    assert h.listener.utterances.waiting == []
    h.close()


def test_next_utterance_delivers_and_cancels_timer():
    """An utterance arriving before the timeout is delivered and the timer is cancelled."""
    h = Harness()
    d = h.listener.next_utterance(30.0)
    assert len(timers(h)) == 1
    h.say(pause(8000, 300) + speech(PHRASES[1], 8000) + pause(8000, 1000))
    assert isinstance(d.result, Utterance)
    assert timers(h) == []
    h.close()


def test_stop_leaves_nothing_behind():
    """stop() cancels the read of the leg's audio, answers waiters with None, stops reading."""
    h = Harness()
    d = h.listener.next_utterance(5.0)
    assert len(h.leg.audio.waiting) == 1
    h.listener.stop()
    assert h.leg.audio.waiting == []
    assert d.result is None
    h.say(TONE * 3)
    assert len(h.leg.audio.pending) == 3
    assert h.listener.next_utterance(5.0).result is None
    h.close()


def test_hangup_stops_listener():
    """When the leg's connection is lost the listener stops and waiters get None."""
    h = Harness()
    d = h.listener.next_utterance()
    h.transport.loseConnection()
    h.leg.connectionLost()
    assert d.result is None
    assert not h.listener.running
    h.close()


def test_pause_discards_audio():
    """Between pause() and resume() audio is read and discarded; after it, heard again."""
    h = Harness()
    h.listener.pause()
    h.say(pause(8000, 300) + speech(PHRASES[1], 8000) + pause(8000, 1000))
    assert h.listener.utterances.pending == []
    assert h.leg.audio.pending == []
    h.listener.resume()
    h.say(pause(8000, 300) + speech(PHRASES[1], 8000) + pause(8000, 1000))
    assert len(h.listener.utterances.pending) == 1
    h.close()


def test_flush_drops_queued_and_partial_speech():
    """flush() drops queued utterances and one in progress."""
    h = Harness()
    s = speech(PHRASES[0], 8000)
    h.say(pause(8000, 300) + speech(PHRASES[1], 8000) + pause(8000, 1000))
    h.say(pause(8000, 300) + s[: len(s) // 2])
    assert len(h.listener.utterances.pending) == 1
    h.listener.flush()
    h.say(pause(8000, 1000))
    assert h.listener.utterances.pending == []
    h.close()


def test_full_queue_drops_oldest_utterance():
    """With the utterance queue full, the oldest is dropped and counted."""
    h = Harness()
    h.listener.utterances.size = 1
    for text in PHRASES[1:3]:
        h.say(pause(8000, 300) + speech(text, 8000) + pause(8000, 1000))
    assert h.listener.dropped == 1
    (kept,) = h.listener.utterances.pending
    assert kept.duration_s > 1.5  # the second, longer phrase
    h.close()


def test_stop_leaves_direct_queue_readers_to_their_owner():
    """stop() answers next_utterance() with None but does not fire a raw utterances.get()."""
    h = Harness()
    raw = h.listener.utterances.get()
    mine = h.listener.next_utterance(5.0)
    h.listener.stop()
    assert mine.result is None
    assert not raw.called
    raw.cancel()
    raw.addErrback(lambda f: None)
    assert h.listener.utterances.waiting == []
    h.close()


def test_start_on_a_closed_leg_does_nothing():
    """A listener started on a leg that is already gone waits on nothing."""
    h = Harness()
    h.listener.stop()
    h.transport.loseConnection()
    h.leg.connectionLost()
    h.listener.start()
    assert not h.listener.running
    assert h.leg.audio.waiting == []
    assert h.listener.next_utterance(1.0).result is None
    h.close()
