"""
Text-to-speech: the L{ITTS} interface, the espeak-ng provider and the synthesis cache.

Synthesis is blocking CPU work, so providers run it in a dedicated, bounded thread pool
(L{make_pool}) and hand the result back to the reactor thread as a Deferred. A doorman says
the same few prompts all day, so a L{CachedTTS} in front of any provider makes all but the
first of them free; L{CachedTTS.preload} warms the fixed ones at start-up.

Bounds: the cache holds at most C{max_entries} entries and C{max_bytes} of audio (an entry
larger than that is never kept), and a text longer than C{max_text_chars} is refused with
L{TextTooLong} before any synthesis — no prompt comes near it, so only caller data could.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from twisted.internet.defer import (
    Deferred,
    FirstError,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from audiosocket import audio
from audiosocket.speech.espeak import EspeakEngine
from audiosocket.reactors import default_reactor


class TextTooLong(ValueError):
    """A text longer than the synthesizer accepts; the message gives lengths, never the text."""


class ITTS(Interface):
    """A speech synthesiser."""

    name = Attribute(
        "Provider id, e.g. C{'espeak:pt-br'}: what produced the audio (logs, metrics, cache)."
    )

    def synthesize(text: str, rate: int) -> Deferred:
        """
        Speak C{text}.

        @param rate: sample rate (Hz) of the audio wanted, e.g. 8000 for a slin leg.
        @return: a Deferred firing with signed 16-bit little-endian mono PCM at C{rate},
            with at most a little silence at either end; C{b""} for blank text.
        """


def make_pool(name: str = "audiosocket-tts", maxthreads: int = 2) -> ThreadPool:
    """
    Make a bounded thread pool for synthesis; it is returned B{not started}.

    Starting it, and stopping it at shutdown (which joins its threads, so work in progress
    finishes first), is the caller's job, e.g.::

        pool = make_pool()
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    or from an L{IService}: C{pool.start()} in C{startService}, C{pool.stop()} in
    C{stopService}. espeak-ng itself runs one synthesis at a time (see
    L{audiosocket.speech.espeak}); a second thread still lets resampling, or another
    provider, overlap with it.
    """
    if maxthreads < 1:
        raise ValueError(f"maxthreads must be at least 1, got {maxthreads}")
    return ThreadPool(minthreads=0, maxthreads=maxthreads, name=name)


@implementer(ITTS)
class EspeakTTS:
    """
    espeak-ng synthesis in a thread pool, trimmed, resampled and faded for the phone.

    Everything but the hand-back (synthesis, trimming, resampling, the fade) runs in a
    worker thread of C{pool}, which the caller starts and stops (see L{make_pool}).
    """

    log = Logger()

    #: Silence kept before and after the speech, in ms.
    keep_silence_ms = 50.0
    #: Fade-in and fade-out at the prompt's edges, in ms (removes clicks).
    fade_ms = 5.0

    def __init__(
        self,
        pool: ThreadPool,
        reactor=None,
        voice: str = "pt-br",
        speed: int = 165,
        pitch: int = 50,
    ):
        reactor = default_reactor(reactor)
        self._pool = pool
        self._reactor = reactor
        self._engine = EspeakEngine(voice=voice, speed=speed, pitch=pitch)
        self.name = f"espeak:{voice}"

    def synthesize(self, text: str, rate: int) -> Deferred:
        if rate <= 0:
            return fail(ValueError(f"sample rate must be positive, got {rate}"))
        return deferToThreadPool(self._reactor, self._pool, self._render, text, rate)

    def _render(self, text: str, rate: int) -> bytes:
        # Runs in a worker thread: pure computation on local data, no Twisted calls.
        pcm, native_rate = self._engine.synthesize(text)
        pcm = audio.trim_silence(pcm, native_rate, keep_ms=self.keep_silence_ms)
        pcm = audio.resample(pcm, native_rate, rate)
        return audio.fade(pcm, rate, self.fade_ms)


@implementer(ITTS)
class CachedTTS:
    """
    An in-memory LRU cache of synthesised audio in front of any L{ITTS}.

    Entries are keyed by (provider name, rate, text) and at most C{max_entries} are kept,
    holding at most C{max_bytes} of audio (L{None}: no byte bound), the least recently used
    going first (0 keeps nothing, but still shares syntheses in progress); audio larger
    than C{max_bytes} is passed on but never kept. A text longer than C{max_text_chars}
    (L{None}: no bound) fails with L{TextTooLong} and reaches no provider; C{refused} counts
    them. Requests for a key whose synthesis is in progress
    join it rather than start another; each caller still gets a Deferred of its own, so one
    caller's callbacks (or cancelling) never change what another receives. A failed
    synthesis is passed to everyone waiting on it and is not cached: the next request tries
    again.

    Counters: C{misses} is the number of syntheses started; C{hits} the requests answered
    without starting one, C{joined} of them by sharing one in progress. C{hits + misses} is
    the number of requests.
    """

    log = Logger()

    def __init__(
        self,
        tts: ITTS,
        max_entries: int = 256,
        *,
        max_bytes: int | None = None,
        max_text_chars: int | None = None,
    ):
        if max_entries < 0:
            raise ValueError(f"max_entries must not be negative, got {max_entries}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        if max_text_chars is not None and max_text_chars < 1:
            raise ValueError(f"max_text_chars must be at least 1, got {max_text_chars}")
        self._tts = tts
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_text_chars = max_text_chars
        #: Bytes of audio held in the cache now.
        self.bytes = 0
        self.refused = 0
        self._entries: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._waiting: dict[tuple[str, int, str], list[Deferred]] = {}
        self.hits = 0
        self.misses = 0
        self.joined = 0

    @property
    def name(self) -> str:
        return self._tts.name

    def __len__(self) -> int:
        """Number of cached entries."""
        return len(self._entries)

    def synthesize(self, text: str, rate: int) -> Deferred:
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            self.refused += 1
            return fail(
                TextTooLong(
                    f"text of {len(text)} characters refused (at most {self.max_text_chars})"
                )
            )
        key = (self._tts.name, rate, text)
        pcm = self._entries.get(key)
        if pcm is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return succeed(pcm)

        waiter: Deferred = Deferred(lambda d: self._abandon(key, d))
        waiters = self._waiting.get(key)
        if waiters is not None:
            self.hits += 1
            self.joined += 1
            waiters.append(waiter)
            return waiter

        self.misses += 1
        # Registered before the provider is called, so a provider that answers at once
        # still finds its waiter.
        self._waiting[key] = [waiter]
        maybeDeferred(self._tts.synthesize, text, rate).addBoth(self._settle, key)
        return waiter

    def _abandon(self, key, waiter: Deferred) -> None:
        # A cancelled waiter stops waiting; the synthesis goes on (a worker thread cannot
        # be interrupted) and is cached for the next request.
        waiters = self._waiting.get(key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    def _settle(self, result, key) -> None:
        waiters = self._waiting.pop(key, [])
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return None
        pcm = bytes(result)
        self._store(key, pcm)
        for waiter in waiters:
            waiter.callback(pcm)
        return None

    def _store(self, key, pcm: bytes) -> None:
        if self.max_bytes is not None and len(pcm) > self.max_bytes:
            return  # would evict everything else and still not fit
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = pcm
        self.bytes += len(pcm)
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self.bytes > self.max_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)

    def clear(self) -> None:
        """Forget every cached entry (syntheses in progress still answer their callers)."""
        self._entries.clear()
        self.bytes = 0

    def preload(self, texts: Iterable[str], rate: int) -> Deferred:
        """
        Synthesise C{texts} at C{rate} into the cache, e.g. the fixed prompts at start-up.

        @return: a Deferred firing with C{None} when every text is cached, or failing with
            the first synthesis failure (the other texts are still attempted and cached).
        """
        unique = list(dict.fromkeys(texts))
        if len(unique) > self.max_entries:
            self.log.warn(
                "preloading {count} prompts into a cache of {max_entries}: "
                "the first ones will be evicted",
                count=len(unique),
                max_entries=self.max_entries,
            )
        d = gatherResults([self.synthesize(t, rate) for t in unique], consumeErrors=True)

        def unwrap(failure: Failure):
            failure.trap(FirstError)
            return failure.value.subFailure

        d.addCallbacks(lambda _: None, unwrap)
        return d
