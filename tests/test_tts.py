"""
Tests for L{audiosocket.speech.espeak} (real espeak-ng synthesis through ctypes) and
L{audiosocket.speech.tts}: the thread-pool provider on a real L{ThreadPool}, and the cache
driven by a fake provider whose Deferreds the tests fire by hand.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer
from zope.interface.verify import verifyObject

from audiosocket import audio
from audiosocket.speech.espeak import EspeakEngine, SynthesisError
from audiosocket.speech.tts import ITTS, CachedTTS, EspeakTTS, TextTooLong, make_pool

GREETING = "Condomínio Apoena, em que posso ajudar?"
NATIVE_RATE = 22050
#: A pt-BR variant with no pitch flutter, whose output is identical on every call (the stock
#: voice's flutter counter carries over between utterances; see EspeakEngine).
STEADY_VOICE = "pt-br+Diogo"
TIMEOUT_S = 30


def seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / 2 / rate


# --- espeak-ng ------------------------------------------------------------------------------


def test_espeak_speaks_greeting():
    """The greeting gives over a second of non-silent 22050 Hz audio."""
    pcm, rate = EspeakEngine().synthesize(GREETING)
    assert rate == NATIVE_RATE
    assert seconds(pcm, rate) >= 1.0
    assert not audio.is_silent(pcm)


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_espeak_blank_text_is_empty(text):
    """Empty or whitespace-only text returns no audio at the native rate, never an error."""
    assert EspeakEngine().synthesize(text) == (b"", NATIVE_RATE)


def test_espeak_unknown_voice_raises():
    """An unknown voice raises SynthesisError, and later synthesis with a good voice works."""
    with pytest.raises(SynthesisError, match="no-such-voice"):
        EspeakEngine(voice="no-such-voice").synthesize("olá")
    pcm, _ = EspeakEngine().synthesize("olá")
    assert not audio.is_silent(pcm)


def test_espeak_refuses_out_of_range_settings():
    """Speed and pitch outside espeak-ng's ranges are refused when the engine is made."""
    with pytest.raises(ValueError):
        EspeakEngine(speed=10)
    with pytest.raises(ValueError):
        EspeakEngine(pitch=101)


def test_espeak_speed_changes_duration():
    """A faster speed gives shorter audio (the parameter reaches the library)."""
    slow, _ = EspeakEngine(voice=STEADY_VOICE, speed=120).synthesize(GREETING)
    fast, _ = EspeakEngine(voice=STEADY_VOICE, speed=300).synthesize(GREETING)
    assert len(fast) < 0.7 * len(slow)


def test_espeak_concurrent_equals_serial():
    """
    Engines with different settings called from several threads at once give exactly the
    audio each gives when called alone: calls are serialised and each sets its own voice.
    """
    engines = [
        EspeakEngine(voice=STEADY_VOICE, speed=165),
        EspeakEngine(voice=STEADY_VOICE, speed=220, pitch=70),
    ]
    texts = [GREETING, "Qual o número do apartamento?"]
    jobs = [(e, t) for e in engines for t in texts] * 4
    serial = {(id(e), t): e.synthesize(t) for e, t in jobs}
    with ThreadPoolExecutor(max_workers=6) as executor:
        results = list(executor.map(lambda job: job[0].synthesize(job[1]), jobs))
    for (e, t), result in zip(jobs, results):
        assert result == serial[(id(e), t)]


def test_espeak_concurrent_stock_voice():
    """The stock voice from several threads at once gives whole, non-silent greetings."""
    engine = EspeakEngine()
    alone, _ = engine.synthesize(GREETING)
    with ThreadPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(lambda _: engine.synthesize(GREETING), range(8)))
    for pcm, rate in results:
        assert rate == NATIVE_RATE
        assert not audio.is_silent(pcm)
        # Flutter moves the length by a few samples; a mix-up would move it by far more.
        assert len(pcm) == pytest.approx(len(alone), rel=0.01)


# --- EspeakTTS ------------------------------------------------------------------------------


@pytest.fixture
def pool():
    pool = make_pool(maxthreads=2)
    pool.start()
    yield pool
    pool.stop()


def expected_samples(text: str, rate: int) -> int:
    """Samples EspeakTTS should produce for text: trimmed at 22050 Hz, then resampled."""
    pcm, native = EspeakEngine(voice=STEADY_VOICE).synthesize(text)
    trimmed = audio.trim_silence(pcm, native, keep_ms=EspeakTTS.keep_silence_ms)
    return round(len(trimmed) // 2 * rate / native)


def test_espeak_tts_provides_itts(pool):
    """EspeakTTS provides ITTS and names itself after its voice."""
    tts = EspeakTTS(pool, reactor)
    assert verifyObject(ITTS, tts)
    assert tts.name == "espeak:pt-br"


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest_twisted.ensureDeferred
async def test_espeak_tts_at_leg_rate(pool, rate):
    """
    Audio comes back at the requested rate with the duration of the trimmed synthesis,
    starting from zero (faded in) with no more than ~50 ms of silence before the speech.
    """
    tts = EspeakTTS(pool, reactor, voice=STEADY_VOICE)
    pcm = await tts.synthesize(GREETING, rate).addTimeout(TIMEOUT_S, reactor)
    assert len(pcm) // 2 == expected_samples(GREETING, rate)
    assert seconds(pcm, rate) >= 1.0
    assert not audio.is_silent(pcm)
    samples = audio.pcm_to_array(pcm)
    assert samples[0] == 0 and samples[-1] == 0
    sound = np.flatnonzero(np.abs(samples) > 104)  # louder than -50 dBFS
    margin = rate * 55 // 1000
    assert sound[0] <= margin and len(samples) - 1 - sound[-1] <= margin


@pytest_twisted.ensureDeferred
async def test_espeak_tts_blank_text(pool):
    """Blank text synthesises to no audio."""
    tts = EspeakTTS(pool, reactor)
    assert await tts.synthesize("  ", 8000).addTimeout(TIMEOUT_S, reactor) == b""


@pytest_twisted.ensureDeferred
async def test_espeak_tts_runs_in_pool(pool):
    """Synthesis runs in a worker of the given pool, not in the reactor thread."""
    seen = []
    tts = EspeakTTS(pool, reactor)
    render = tts._render

    def spy(text, rate):
        seen.append(threading.current_thread())
        return render(text, rate)

    tts._render = spy
    await tts.synthesize("sim", 8000).addTimeout(TIMEOUT_S, reactor)
    assert len(seen) == 1
    assert seen[0] is not threading.main_thread()
    assert "audiosocket-tts" in seen[0].name


@pytest_twisted.ensureDeferred
async def test_espeak_tts_failure_is_a_failed_deferred(pool):
    """An unknown voice fails the Deferred with SynthesisError."""
    tts = EspeakTTS(pool, reactor, voice="no-such-voice")
    with pytest.raises(SynthesisError):
        await tts.synthesize("olá", 8000).addTimeout(TIMEOUT_S, reactor)


def test_espeak_tts_refuses_bad_rate(pool):
    """A non-positive rate fails at once, without using the pool."""
    failures = []
    EspeakTTS(pool, reactor).synthesize("olá", 0).addErrback(failures.append)
    assert failures and failures[0].check(ValueError)


# --- CachedTTS ------------------------------------------------------------------------------


@implementer(ITTS)
class FakeTTS:
    """Records each request; the test fires its Deferred."""

    name = "fake:pt-br"

    def __init__(self):
        self.calls: list[tuple[str, int, Deferred]] = []

    def synthesize(self, text, rate):
        d = Deferred()
        self.calls.append((text, rate, d))
        return d

    def answer(self, index=-1, pcm=None):
        text, rate, d = self.calls[index]
        d.callback(pcm if pcm is not None else pcm_for(text, rate))


def pcm_for(text, rate):
    return f"{text}@{rate}".encode().ljust(16, b"\0")


def result_of(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def test_cache_provides_itts():
    """CachedTTS provides ITTS under the wrapped provider's name."""
    cache = CachedTTS(FakeTTS())
    assert verifyObject(ITTS, cache)
    assert cache.name == "fake:pt-br"


def test_cache_second_request_is_a_hit():
    """The second request for a text is answered at once from memory, without the provider."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    first = cache.synthesize("olá", 8000)
    fake.answer()
    assert result_of(first) == pcm_for("olá", 8000)
    assert result_of(cache.synthesize("olá", 8000)) == pcm_for("olá", 8000)
    assert len(fake.calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_concurrent_requests_share_one_synthesis():
    """
    Requests made while a synthesis is in progress join it: one provider call, and each
    caller gets its own Deferred whose callbacks do not change what the others receive.
    """
    fake = FakeTTS()
    cache = CachedTTS(fake)
    a = cache.synthesize("olá", 8000)
    b = cache.synthesize("olá", 8000)
    c = cache.synthesize("olá", 8000)
    assert a is not b and b is not c
    a.addCallback(lambda _: "changed by a's caller")
    assert len(fake.calls) == 1
    fake.answer()
    assert result_of(a) == "changed by a's caller"
    assert result_of(b) == pcm_for("olá", 8000)
    assert result_of(c) == pcm_for("olá", 8000)
    assert (cache.hits, cache.misses, cache.joined) == (2, 1, 2)


def test_cache_failure_not_cached():
    """A failure reaches every waiter, is not cached, and the next request synthesises again."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    a = cache.synthesize("olá", 8000)
    b = cache.synthesize("olá", 8000)
    fake.calls[0][2].errback(SynthesisError("boom"))
    assert result_of(a).check(SynthesisError)
    assert result_of(b).check(SynthesisError)
    assert len(cache) == 0
    again = cache.synthesize("olá", 8000)
    assert len(fake.calls) == 2
    fake.answer()
    assert result_of(again) == pcm_for("olá", 8000)


def test_cache_provider_raising_synchronously():
    """A provider that raises instead of returning a Deferred gives a failed Deferred."""

    @implementer(ITTS)
    class Broken:
        name = "broken"

        def synthesize(self, text, rate):
            raise SynthesisError("no library")

    cache = CachedTTS(Broken())
    assert result_of(cache.synthesize("olá", 8000)).check(SynthesisError)
    assert len(cache) == 0


def test_cache_evicts_least_recently_used():
    """Over max_entries the least recently used entry goes; a recently used one stays."""
    fake = FakeTTS()
    cache = CachedTTS(fake, max_entries=2)
    for text in ("a", "b"):
        cache.synthesize(text, 8000)
        fake.answer()
    cache.synthesize("a", 8000)  # a is now more recent than b
    cache.synthesize("c", 8000)
    fake.answer()
    assert len(cache) == 2
    calls = len(fake.calls)
    result_of(cache.synthesize("a", 8000))
    assert len(fake.calls) == calls  # still cached
    cache.synthesize("b", 8000)
    assert len(fake.calls) == calls + 1  # evicted, synthesised again
    assert fake.calls[-1][0] == "b"


def test_cache_of_size_zero_keeps_nothing():
    """With max_entries=0 nothing is kept, but concurrent requests still share a synthesis."""
    fake = FakeTTS()
    cache = CachedTTS(fake, max_entries=0)
    a = cache.synthesize("olá", 8000)
    b = cache.synthesize("olá", 8000)
    fake.answer()
    assert result_of(a) == result_of(b) == pcm_for("olá", 8000)
    assert len(cache) == 0
    cache.synthesize("olá", 8000)
    assert len(fake.calls) == 2


def test_cache_is_bounded_by_bytes():
    """Over max_bytes the least recently used entries go, whatever max_entries allows."""
    fake = FakeTTS()
    cache = CachedTTS(fake, max_entries=100, max_bytes=250)
    for text in ("a", "b", "c"):
        cache.synthesize(text, 8000)
        fake.answer(pcm=b"\1" * 100)
    assert len(cache) == 2 and cache.bytes == 200
    calls = len(fake.calls)
    result_of(cache.synthesize("c", 8000))
    result_of(cache.synthesize("b", 8000))
    assert len(fake.calls) == calls  # the two newest are kept
    cache.synthesize("a", 8000)
    assert len(fake.calls) == calls + 1  # the oldest went


def test_cache_never_keeps_an_entry_larger_than_its_bound():
    """Audio larger than max_bytes reaches its caller but is not kept, and evicts nothing."""
    fake = FakeTTS()
    cache = CachedTTS(fake, max_bytes=250)
    cache.synthesize("small", 8000)
    fake.answer(pcm=b"\1" * 100)
    big = cache.synthesize("big", 8000)
    fake.answer(pcm=b"\1" * 251)
    assert result_of(big) == b"\1" * 251
    assert len(cache) == 1 and cache.bytes == 100
    cache.synthesize("big", 8000)
    assert fake.calls[-1][0] == "big"  # synthesised again


def test_cache_byte_count_follows_clear():
    """clear() empties the byte count too."""
    fake = FakeTTS()
    cache = CachedTTS(fake, max_bytes=1000)
    cache.synthesize("a", 8000)
    fake.answer(pcm=b"\1" * 100)
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)


def test_cache_refuses_overlong_text_before_synthesis():
    """
    A text over max_text_chars fails with TextTooLong (giving lengths, not the text) and never
    reaches the provider; one at the bound is synthesised.
    """
    fake = FakeTTS()
    cache = CachedTTS(fake, max_text_chars=10)
    failure = result_of(cache.synthesize("9" * 11, 8000))
    assert failure.check(TextTooLong)
    assert "9" not in str(failure.value)
    assert fake.calls == [] and cache.refused == 1
    cache.synthesize("9" * 10, 8000)
    assert len(fake.calls) == 1


def test_make_tts_bounds_the_cache_from_config():
    """make_tts gives the cache [speech] cache_size, cache_mb and max_text_chars."""
    from audiosocket.config import SpeechConfig
    from audiosocket.speech.factory import make_tts

    config = SpeechConfig(cache_size=10, cache_mb=2, max_text_chars=900)
    tts = make_tts(config, lambda name: None, pool=None, reactor=reactor)
    assert (tts.max_entries, tts.max_bytes, tts.max_text_chars) == (10, 2 * 1024 * 1024, 900)


def test_cache_rate_is_part_of_the_key():
    """The same text at another rate is a separate entry and a separate synthesis."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    at8 = cache.synthesize("olá", 8000)
    at16 = cache.synthesize("olá", 16000)
    assert [(t, r) for t, r, _ in fake.calls] == [("olá", 8000), ("olá", 16000)]
    fake.answer(0)
    fake.answer(1)
    assert result_of(at8) == pcm_for("olá", 8000)
    assert result_of(at16) == pcm_for("olá", 16000)


def test_cache_cancelled_waiter_leaves_others():
    """Cancelling one waiter fails only it; the others get the audio, which is cached."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    a = cache.synthesize("olá", 8000)
    b = cache.synthesize("olá", 8000)
    a.cancel()
    assert result_of(a).check(CancelledError)
    fake.answer()
    assert result_of(b) == pcm_for("olá", 8000)
    assert len(cache) == 1


def test_cache_preload_warms_prompts():
    """preload synthesises each distinct text once; later requests for them are hits."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    done = cache.preload(["oi", "tchau", "oi"], 8000)
    assert [t for t, _, _ in fake.calls] == ["oi", "tchau"]
    fake.answer(0)
    fake.answer(1)
    assert result_of(done) is None
    assert result_of(cache.synthesize("tchau", 8000)) == pcm_for("tchau", 8000)
    assert len(fake.calls) == 2


def test_cache_preload_reports_failure():
    """preload fails with the provider's own exception when a prompt cannot be synthesised."""
    fake = FakeTTS()
    cache = CachedTTS(fake)
    done = cache.preload(["oi", "tchau"], 8000)
    fake.calls[0][2].errback(SynthesisError("boom"))
    fake.answer(1)
    assert result_of(done).check(SynthesisError)
    assert len(cache) == 1


@pytest_twisted.ensureDeferred
async def test_cache_over_espeak(pool):
    """Over real espeak-ng the second request returns the very same audio without synthesis."""
    cache = CachedTTS(EspeakTTS(pool, reactor))
    first = await cache.synthesize(GREETING, 8000).addTimeout(TIMEOUT_S, reactor)
    second = await cache.synthesize(GREETING, 8000).addTimeout(TIMEOUT_S, reactor)
    assert second is first
    assert (cache.hits, cache.misses) == (1, 1)
