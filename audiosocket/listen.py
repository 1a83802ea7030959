"""
Hearing the caller: voice activity, endpointing, barge-in and the echo guard.

L{Endpointer} is the transport-free part: it takes a leg's inbound PCM (any chunking, at the
leg's rate) and cuts it into L{Utterance}s. A 20 ms frame is voiced when webrtcvad says so
I{and} its RMS level is above an energy floor: the VAD alone fires on line hiss and on its own
hangover, the energy gate alone on any noise, both together on speech. Speech starts after
C{speech_start_ms} of consecutive voiced frames and ends after C{silence_ms} without one; the
utterance keeps C{preroll_ms} of audio before the start (the first consonant is often below
the gate) and is trimmed to end shortly after its last voiced frame.

L{Listener} is the Twisted side for one leg: it pulls frames from the leg's audio queue,
feeds an Endpointer, queues utterances for the flow, stops a prompt when the caller talks
over it (barge-in) and refuses to start an utterance from our own prompt's echo.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import numpy as np
import soxr
import webrtcvad
from attrs import define, field, frozen, validators
from twisted.internet import defer
from twisted.logger import Logger

from . import wire
from .leg import RESIDENT, VISITOR
from .reactors import default_reactor

__all__ = [
    "Endpointer",
    "Listener",
    "ListenSettings",
    "SpeechStarted",
    "Utterance",
]

FRAME_MS = wire.FRAME_MS
FRAME_S = FRAME_MS / 1000.0

#: Rates webrtcvad takes as they are; anything else is resampled to L{VAD_RATE} for it.
VAD_RATES = frozenset((8000, 16000, 32000, 48000))
VAD_RATE = 16000

#: Audio kept after the last voiced frame: the gate closes on the decaying end of the last
#: phoneme, which an STT model still wants to hear.
TAIL_MS = 40

_FULL_SCALE = 32768.0

_ms = [validators.instance_of(int), validators.ge(0)]
_positive_ms = [validators.instance_of(int), validators.gt(0)]


def _frames(ms: int) -> int:
    """Whole 20 ms frames covering C{ms} (at least one)."""
    return max(1, math.ceil(ms / FRAME_MS))


@frozen(kw_only=True)
class ListenSettings:
    """
    How one leg is listened to; durations in milliseconds.

    @ivar energy_floor_dbfs: a frame whose RMS level is at or below this is never voiced.
    @ivar barge_in: speech during a prompt stops it after C{barge_in_ms} of continuous speech.
    @ivar echo_guard_ms: after a prompt ends, this long passes before an utterance may start.
    """

    silence_ms: int = field(default=700, validator=_positive_ms)
    speech_start_ms: int = field(default=60, validator=_positive_ms)
    preroll_ms: int = field(default=300, validator=_ms)
    min_utterance_ms: int = field(default=200, validator=_ms)
    max_utterance_ms: int = field(default=15000, validator=_positive_ms)
    vad_aggressiveness: int = field(
        default=2, validator=[validators.instance_of(int), validators.ge(0), validators.le(3)]
    )
    barge_in: bool = field(default=True, validator=validators.instance_of(bool))
    barge_in_ms: int = field(default=250, validator=_positive_ms)
    echo_guard_ms: int = field(default=200, validator=_ms)
    energy_floor_dbfs: float = field(
        default=-45.0,
        validator=[validators.instance_of((int, float)), validators.lt(0), validators.gt(-120)],
    )

    def __attrs_post_init__(self):
        if self.max_utterance_ms <= self.min_utterance_ms:
            raise ValueError(
                "max_utterance_ms ({}) must be greater than min_utterance_ms ({})".format(
                    self.max_utterance_ms, self.min_utterance_ms
                )
            )

    @classmethod
    def for_role(cls, audio_config, role: str, **overrides) -> "ListenSettings":
        """
        The settings for a leg of C{role} (L{VISITOR} or L{RESIDENT}) from the C{[audio]}
        section (L{audiosocket.config.AudioConfig}); C{overrides} replace single fields.

        @raise ValueError: C{role} is not a known leg role.
        """
        try:
            silence_key, barge_key = _ROLE_KEYS[role]
        except KeyError:
            raise ValueError(
                "unknown leg role {!r}; expected one of {}".format(role, sorted(_ROLE_KEYS))
            ) from None
        values = dict(
            silence_ms=getattr(audio_config, silence_key),
            speech_start_ms=audio_config.speech_start_ms,
            preroll_ms=audio_config.preroll_ms,
            min_utterance_ms=audio_config.min_utterance_ms,
            max_utterance_ms=audio_config.max_utterance_ms,
            vad_aggressiveness=audio_config.vad_aggressiveness,
            barge_in=getattr(audio_config, barge_key),
            barge_in_ms=audio_config.barge_in_ms,
            echo_guard_ms=audio_config.echo_guard_ms,
        )
        values.update(overrides)
        return cls(**values)


#: role -> (AudioConfig field for silence_ms, AudioConfig field for barge_in).
_ROLE_KEYS: dict[str, tuple[str, str]] = {
    VISITOR: ("visitor_silence_ms", "barge_in"),
    RESIDENT: ("resident_silence_ms", "resident_barge_in"),
}


@frozen
class SpeechStarted:
    """Speech began at C{at} (reactor seconds: the start of its first voiced frame)."""

    at: float


@frozen
class Utterance:
    """
    One stretch of speech, s16le mono at C{rate}.

    C{pcm} begins up to C{preroll_ms} before C{started_at} (the start of the first voiced
    frame) and ends a little after C{ended_at} (the end of the last voiced frame).
    C{reason} is C{"silence"} (the caller stopped) or C{"max_length"} (cut while talking).
    """

    pcm: bytes = field(repr=False)
    rate: int
    started_at: float
    ended_at: float
    reason: str

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (2.0 * self.rate)


_IDLE = 0
_SPEECH = 1


class Endpointer:
    """
    Cuts one leg's inbound audio into utterances. Pure: no Twisted, no I/O, no threads.

    @ivar voiced: whether the last frame was voiced.
    @ivar voiced_run: consecutive voiced frames up to and including the last one.
    @ivar in_speech: an utterance is in progress.
    """

    def __init__(self, rate: int, settings: ListenSettings):
        if rate not in wire.KIND_OF_RATE:
            raise ValueError(
                "unsupported sample rate {} Hz; AudioSocket carries {}".format(
                    rate, sorted(wire.KIND_OF_RATE)
                )
            )
        self.rate = rate
        self.settings = settings
        self._frame_bytes = wire.frame_bytes(rate)
        self._bytes_per_s = 2.0 * rate
        samples = self._frame_bytes // 2
        # Sum of squares above which a frame's RMS exceeds the floor: no log per frame.
        level = _FULL_SCALE * 10.0 ** (settings.energy_floor_dbfs / 20.0)
        self._floor_sumsq = samples * level * level
        self._square = np.empty(samples, dtype=np.float32)
        self._vad = webrtcvad.Vad(settings.vad_aggressiveness)
        if rate in VAD_RATES:
            self._stream = None
            self._vad_rate = rate
        else:
            # One streaming resampler per leg: a one-shot resample per frame costs ~250-450
            # us (filter design every call) and rings at every frame edge; the stream costs
            # ~12-30 us. Low quality is plenty for a voice/no-voice decision.
            self._stream = soxr.ResampleStream(rate, VAD_RATE, 1, dtype="int16", quality="LQ")
            self._vad_rate = VAD_RATE
        self._vad_bytes = wire.frame_bytes(VAD_RATE)
        self._start_frames = _frames(settings.speech_start_ms)
        self._silence_frames = _frames(settings.silence_ms)
        self._preroll_frames = round(settings.preroll_ms / FRAME_MS)
        self._min_frames = round(settings.min_utterance_ms / FRAME_MS)
        self._max_frames = _frames(settings.max_utterance_ms)
        self._tail_frames = round(TAIL_MS / FRAME_MS)
        # Before speech starts, enough recent frames to start from a barge-in's whole run.
        lead = max(self._start_frames, _frames(settings.barge_in_ms))
        self._recent: collections.deque[bytes] = collections.deque(
            maxlen=self._preroll_frames + lead
        )
        self.frames = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything heard: partial frames, the run, any utterance in progress."""
        self._partial = bytearray()
        self._vad_buffer = bytearray()
        self._recent.clear()
        self._state = _IDLE
        self._speech: list[bytes] = []
        self._speech_start = 0.0
        self._last_voiced = 0  # index in _speech just past the last voiced frame
        self._preroll_used = 0
        self._last_voiced_end = 0.0
        self._silence_run = 0
        self._run_start = 0.0
        self._last_end = 0.0
        self._vad_voiced = False
        self.voiced = False
        self.voiced_run = 0
        if self._stream is not None:
            self._stream.clear()

    @property
    def in_speech(self) -> bool:
        return self._state == _SPEECH

    def feed(self, pcm: bytes, now: float, *, may_start: bool = True) -> list:
        """
        Take C{pcm} (s16le at the endpointer's rate), the last sample of which arrived at
        C{now} (seconds). Returns the events it completes: L{SpeechStarted}, L{Utterance}.

        With C{may_start} false no utterance starts (one in progress goes on), but voice
        activity is still tracked, so L{begin} can start one from the current run.
        """
        size = self._frame_bytes
        events: list = []
        if not self._partial and len(pcm) == size:
            self._frame(pcm, now, may_start, events)
            return events
        buffer = self._partial
        buffer += pcm
        count = len(buffer) // size
        if not count:
            return events
        left = len(buffer) - count * size
        per_s = self._bytes_per_s
        for i in range(count):
            end = now - (left + (count - 1 - i) * size) / per_s
            self._frame(bytes(buffer[i * size : (i + 1) * size]), end, may_start, events)
        del buffer[: count * size]
        return events

    def begin(self) -> SpeechStarted | None:
        """
        Start an utterance now from the current voiced run and its preroll, whatever the
        start rules say (barge-in: the caller is talking over a prompt). None when there
        is no run to start from or speech is already in progress.
        """
        if self._state == _SPEECH or not self.voiced_run:
            return None
        keep = min(len(self._recent), self.voiced_run + self._preroll_frames)
        recent = list(self._recent)[-keep:]
        self._recent.clear()
        self._start(recent, self._run_start, min(self.voiced_run, keep))
        return SpeechStarted(self._run_start)

    # ------------------------------------------------------------ per frame

    def _is_voiced(self, frame: bytes) -> bool:
        square = self._square
        np.copyto(square, np.frombuffer(frame, dtype="<i2"))
        loud = float(square.dot(square)) > self._floor_sumsq
        stream = self._stream
        if stream is None:
            return self._vad.is_speech(frame, self._vad_rate) and loud
        out = stream.resample_chunk(np.frombuffer(frame, dtype="<i2"))
        buffer = self._vad_buffer
        buffer += out.tobytes()
        size = self._vad_bytes
        # The resampler's output lags by a few ms and comes in uneven pieces: decide on
        # the newest whole 16 kHz frame, keep the last decision until there is one.
        while len(buffer) >= size:
            self._vad_voiced = self._vad.is_speech(bytes(buffer[:size]), VAD_RATE)
            del buffer[:size]
        return self._vad_voiced and loud

    def _frame(self, frame: bytes, end: float, may_start: bool, events: list) -> None:
        self.frames += 1
        self._last_end = end
        voiced = self.voiced = self._is_voiced(frame)
        if voiced:
            if not self.voiced_run:
                self._run_start = end - FRAME_S
            self.voiced_run += 1
        else:
            self.voiced_run = 0
        if self._state == _IDLE:
            self._recent.append(frame)
            if may_start and self.voiced_run >= self._start_frames:
                events.append(self.begin())
            return
        speech = self._speech
        speech.append(frame)
        if voiced:
            self._last_voiced = len(speech)
            self._last_voiced_end = end
            self._silence_run = 0
        else:
            self._silence_run += 1
            if self._silence_run >= self._silence_frames:
                utterance = self._finish(
                    min(len(speech), self._last_voiced + self._tail_frames), "silence"
                )
                if utterance is not None:
                    events.append(utterance)
                return
        if len(speech) - self._preroll_used >= self._max_frames:
            # Cut here; in a pause, at its last voiced frame like an ordinary end.
            events.append(
                self._finish(min(len(speech), self._last_voiced + self._tail_frames), "max_length")
            )
            # Whatever is said next is a new utterance, started by the usual rules.
            self.voiced_run = 0

    def _start(self, recent: list, at: float, run: int) -> None:
        self._state = _SPEECH
        self._speech = recent
        self._preroll_used = len(recent) - run
        self._speech_start = at
        self._last_voiced = len(recent)
        self._last_voiced_end = self._last_end
        self._silence_run = 0

    def _finish(self, keep: int, reason: str) -> Utterance | None:
        speech = self._speech
        self._state = _IDLE
        self._speech = []
        self._silence_run = 0
        # Frames after the cut may be the next utterance's preroll.
        self._recent.clear()
        voiced_frames = self._last_voiced - self._preroll_used
        if reason == "silence" and voiced_frames < self._min_frames:
            return None  # a click or a cough
        return Utterance(
            b"".join(speech[:keep]),
            self.rate,
            self._speech_start,
            self._last_voiced_end,
            reason,
        )


@define(eq=False, repr=False)
class Listener:
    """
    Listens to one leg: pulls its audio queue, endpoints it, queues L{Utterance}s.

    @ivar utterances: L{DeferredQueue} of utterances; when full the oldest is dropped
        (counted in C{dropped}): the flow wants what the caller said last.
    @ivar barged_in: prompts stopped because the caller talked over them.
    @ivar enabled: false between L{pause} and L{resume}: frames are read and discarded.
    @ivar on_barge_in: called with the listener when it stops a prompt.
    @ivar on_speech: called with the L{SpeechStarted} when an utterance starts.
    """

    log = Logger()

    leg: object
    settings: ListenSettings
    _reactor: object = field(default=None, kw_only=True, alias="reactor")
    queue_size: int = field(default=4, kw_only=True, validator=validators.gt(0))
    on_barge_in: Callable[["Listener"], None] | None = field(default=None, kw_only=True)
    on_speech: Callable[[SpeechStarted], None] | None = field(default=None, kw_only=True)
    utterances: defer.DeferredQueue = field(init=False)
    enabled: bool = field(default=True, init=False)
    running: bool = field(default=False, init=False)
    barged_in: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    frames: int = field(default=0, init=False)
    _endpointer: Endpointer | None = field(default=None, init=False)
    _pending: defer.Deferred | None = field(default=None, init=False)
    _pumping: bool = field(default=False, init=False)
    _was_playing: bool = field(default=False, init=False)
    _guard_until: float = field(default=-math.inf, init=False)
    _waiters: set = field(factory=set, init=False)

    def __attrs_post_init__(self):
        self._reactor = default_reactor(self._reactor)
        self.utterances = defer.DeferredQueue(size=self.queue_size)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        """Start pulling the leg's audio. Idempotent; a leg already gone is not listened to."""
        if self.running or getattr(self.leg, "closed", False):
            return
        self.running = True
        self._pump()

    def stop(self) -> None:
        """
        Stop listening: cancel the pending read of the leg's audio, answer every waiting
        L{next_utterance} with None and drop what was heard. Idempotent. (Readers of
        C{utterances} itself are left to their owners to cancel.)
        """
        self.running = False
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        if self._endpointer is not None:
            self._endpointer.reset()
        waiters, self._waiters = self._waiters, set()
        queue_waiting = self.utterances.waiting
        for d in waiters:
            if d in queue_waiting:
                queue_waiting.remove(d)
                d.callback(None)

    def flush(self) -> None:
        """Drop utterances queued so far and anything half heard (before a new question)."""
        del self.utterances.pending[:]
        if self._endpointer is not None:
            self._endpointer.reset()

    def pause(self) -> None:
        """Discard audio until L{resume} (keypad-only steps)."""
        self.enabled = False
        if self._endpointer is not None:
            self._endpointer.reset()

    def resume(self) -> None:
        """Listen again, from fresh audio."""
        if not self.enabled and self._endpointer is not None:
            self._endpointer.reset()
        self.enabled = True

    def next_utterance(self, timeout_s: float | None = None) -> defer.Deferred:
        """
        The next utterance: a Deferred firing with it, or with None after C{timeout_s}
        seconds (None: no timeout) or when the listener stops. Cancelling it is safe.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive, got {!r}".format(timeout_s))
        if not self.running and not self.utterances.pending:
            return defer.succeed(None)
        d = self.utterances.get()
        if d.called:
            return d
        self._waiters.add(d)
        d.addBoth(self._answered, d)
        if timeout_s is not None:
            d.addTimeout(timeout_s, self._reactor, onTimeoutCancel=lambda _r, _t: None)
        return d

    def _answered(self, result, d: defer.Deferred):
        self._waiters.discard(d)
        return result

    # ------------------------------------------------------------ the pull loop

    def _pump(self) -> None:
        # A trampoline: a queued frame fires get() synchronously, which must not recurse.
        self._pumping = True
        try:
            while self.running and self._pending is None:
                d = self._pending = self.leg.audio.get()
                d.addCallbacks(self._arrived, self._read_failed)
        finally:
            self._pumping = False

    def _arrived(self, pcm: bytes) -> None:
        self._pending = None
        try:
            self._hear(pcm)
        except Exception:
            self.log.failure("listener for leg {uuid} failed on a frame", uuid=str(self.leg.uuid))
        if not self._pumping:
            self._pump()

    def _read_failed(self, failure) -> None:
        self._pending = None
        if not failure.check(defer.CancelledError):
            self.log.failure("reading audio of leg {uuid}", failure, uuid=str(self.leg.uuid))
        if self.running:
            # The leg cancels its readers when its connection is lost: nothing more to hear.
            self.stop()

    def _hear(self, pcm: bytes) -> None:
        self.frames += 1
        if not self.enabled:
            return
        leg = self.leg
        endpointer = self._endpointer
        if endpointer is None or endpointer.rate != leg.rate:
            endpointer = self._endpointer = Endpointer(leg.rate, self.settings)
        now = self._reactor.seconds()
        settings = self.settings
        playing = leg.playing
        if playing != self._was_playing:
            self._was_playing = playing
            if playing:
                if not settings.barge_in and not endpointer.in_speech:
                    endpointer.reset()
            else:
                self._guard_until = now + settings.echo_guard_ms / 1000.0
        if playing and not settings.barge_in and not endpointer.in_speech:
            # Nothing the caller says over a prompt counts: skip even the VAD.
            return
        may_start = not playing and now >= self._guard_until
        events = endpointer.feed(pcm, now, may_start=may_start)
        if playing and settings.barge_in and (
            endpointer.voiced_run * FRAME_MS >= settings.barge_in_ms
        ):
            dropped = leg.stop_playback()
            self._was_playing = False
            self.barged_in += 1
            self.log.info(
                "barge-in on leg {uuid}: prompt stopped, {frames} frames dropped",
                uuid=str(leg.uuid),
                frames=dropped,
            )
            started = endpointer.begin()
            if started is not None:
                events.append(started)
            if self.on_barge_in is not None:
                self.on_barge_in(self)
        for event in events:
            if isinstance(event, Utterance):
                self._deliver(event)
            elif self.on_speech is not None:
                self.on_speech(event)

    def _deliver(self, utterance: Utterance) -> None:
        queue = self.utterances
        if len(queue.pending) >= queue.size:
            del queue.pending[0]
            self.dropped += 1
        queue.put(utterance)
