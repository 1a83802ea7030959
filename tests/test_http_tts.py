"""
Tests for L{audiosocket.speech.http_tts}: the OpenAI-compatible and Azure synthesisers
against a real local HTTP server speaking their APIs (L{httpkit.FakeAPI}), resampling in a
real thread pool; L{StoreCachedTTS} over an in-memory blob store; and
L{audiosocket.speech.factory.make_tts}.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from audiosocket import audio
from audiosocket.config import SpeechConfig
from audiosocket.speech.factory import make_tts
from audiosocket.speech.http_tts import AzureTTS, OpenAITTS, StoreCachedTTS, TTSError
from audiosocket.speech.tts import ITTS, CachedTTS, make_pool
from audiosocket.store import MemoryStore
# The api fixture imported here is, as pytest means it, redefined by every test taking it.
# ruff: noqa: F811
from httpkit import (  # noqa: F401 (api is a fixture)
    HANG,
    FakeAPI,
    api,
    on_its_own,
    tone,
    within,
)

TIMEOUT_S = 5


@pytest.fixture
def pool():
    pool = make_pool("test-http-tts", maxthreads=1)
    pool.start()
    yield pool
    pool.stop()


async def tts_failure(d: Deferred, wait=within) -> TTSError:
    with pytest.raises(TTSError) as info:
        await wait(d)
    return info.value


# --- OpenAI ----------------------------------------------------------------------------------


def openai(api: FakeAPI, pool, **kwargs) -> OpenAITTS:
    options = dict(
        model="gpt-4o-mini-tts", voice="alloy", api_key="sk-t", timeout_s=TIMEOUT_S, pool=pool
    )
    options.update(kwargs)
    return OpenAITTS(api.url + "/v1", http=api.http, reactor=reactor, **options)


def test_openai_provides_itts():
    """OpenAITTS implements ITTS and names model and voice."""
    tts = OpenAITTS(
        "http://127.0.0.1:1/v1", model="m", voice="v", api_key=None, pool=object(),
        http=object(), reactor=reactor,
    )  # fmt: skip
    assert verifyObject(ITTS, tts)
    assert tts.name == "openai:m:v"


@pytest_twisted.ensureDeferred
async def test_openai_request(api, pool):
    """A POST to {url}/audio/speech, Bearer key, JSON with model, voice, input and pcm."""
    api.answer(body=tone(24000, 60), content_type="audio/pcm")
    await within(openai(api, pool).synthesize("Olá, tudo bem?", 24000))
    (seen,) = api.seen
    assert seen.path == "/v1/audio/speech"
    assert seen.headers["authorization"] == "Bearer sk-t"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {
        "model": "gpt-4o-mini-tts",
        "voice": "alloy",
        "input": "Olá, tudo bem?",
        "response_format": "pcm",
    }


@pytest_twisted.ensureDeferred
async def test_openai_resamples_24k_to_rate(api, pool):
    """The 24 kHz answer is resampled to the rate asked for, keeping its duration."""
    native = tone(24000, 300)
    api.answer(body=native, content_type="audio/pcm")
    pcm = await within(openai(api, pool).synthesize("Olá", 8000))
    assert pcm == audio.resample(native, 24000, 8000)
    assert len(pcm) == len(native) // 3


@pytest_twisted.ensureDeferred
async def test_openai_native_rate_unchanged(api, pool):
    """Asked for 24 kHz, the answer is returned as it came."""
    native = tone(24000, 100)
    api.answer(body=native, content_type="audio/pcm")
    assert await within(openai(api, pool).synthesize("Olá", 24000)) == native


@pytest.mark.parametrize("code", [401, 500])
@pytest_twisted.ensureDeferred
async def test_openai_http_error(api, pool, code):
    """An HTTP error status fails with TTSError reason http_<status>."""
    api.answer(code, {"error": "no"})
    error = await tts_failure(openai(api, pool).synthesize("Olá", 8000))
    assert error.reason == f"http_{code}"


@pytest_twisted.ensureDeferred
async def test_openai_empty_answer(api, pool):
    """A 200 answer with no audio fails with reason empty."""
    api.answer(body=b"", content_type="audio/pcm")
    error = await tts_failure(openai(api, pool).synthesize("Olá", 8000))
    assert error.reason == "empty"


@pytest_twisted.ensureDeferred
async def test_openai_slow_server_times_out(api, pool):
    """A server that never answers fails with reason timeout; the request is dropped."""
    api.reply = HANG
    error = await tts_failure(openai(api, pool, timeout_s=0.3).synthesize("Olá", 8000), on_its_own)
    assert error.reason == "timeout"
    await within(api.abandoned[0])


@pytest_twisted.ensureDeferred
async def test_openai_blank_text_is_silent_without_request(api, pool):
    """Blank text gives no audio and sends nothing."""
    assert await within(openai(api, pool).synthesize("  ", 8000)) == b""
    assert api.seen == []


@pytest_twisted.ensureDeferred
async def test_openai_bad_rate(api, pool):
    """A non-positive rate is a ValueError naming it."""
    with pytest.raises(ValueError, match="sample rate"):
        await within(openai(api, pool).synthesize("Olá", 0))


# --- Azure -----------------------------------------------------------------------------------


def azure(api: FakeAPI, pool, **kwargs) -> AzureTTS:
    options = dict(key="az", voice="pt-BR-FranciscaNeural", language="pt-BR", timeout_s=TIMEOUT_S)
    options.update(kwargs)
    return AzureTTS(
        "brazilsouth", pool=pool, base_url=api.url, http=api.http, reactor=reactor, **options
    )


def test_azure_provides_itts():
    """AzureTTS implements ITTS."""
    tts = AzureTTS("eastus", key="k", pool=object(), http=object(), reactor=reactor)
    assert verifyObject(ITTS, tts)


def test_azure_without_key_is_refused():
    """AzureTTS without a key is a ValueError saying so."""
    with pytest.raises(ValueError, match="key"):
        AzureTTS("eastus", key=None, pool=object(), http=object(), reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_azure_request_headers(api, pool):
    """
    The request goes to /cognitiveservices/v1 with the key, SSML content type, a
    User-Agent and the 8 kHz raw PCM output format for an 8 kHz leg.
    """
    api.answer(body=tone(8000, 60), content_type="audio/basic")
    await within(azure(api, pool).synthesize("Olá", 8000))
    (seen,) = api.seen
    assert seen.path == "/cognitiveservices/v1"
    assert seen.headers["ocp-apim-subscription-key"] == "az"
    assert seen.headers["content-type"] == "application/ssml+xml"
    assert seen.headers["x-microsoft-outputformat"] == "raw-8khz-16bit-mono-pcm"
    assert seen.headers["user-agent"]


@pytest_twisted.ensureDeferred
async def test_azure_ssml_escapes_text(api, pool):
    """The text is escaped in the SSML: markup characters arrive as text, voice as set."""
    api.answer(body=tone(8000, 60), content_type="audio/basic")
    text = 'Pedro & <Filhos> "Ltda" </voice><evil/>'
    await within(azure(api, pool).synthesize(text, 8000))
    root = ET.fromstring(api.seen[0].body)
    (voice,) = list(root)
    assert voice.tag.endswith("voice")
    assert voice.get("name") == "pt-BR-FranciscaNeural"
    assert voice.text == text
    assert list(voice) == []


@pytest_twisted.ensureDeferred
async def test_azure_8k_returned_as_is(api, pool):
    """At 8 kHz the answer is the audio itself, unresampled."""
    native = tone(8000, 100)
    api.answer(body=native, content_type="audio/basic")
    assert await within(azure(api, pool).synthesize("Olá", 8000)) == native


@pytest_twisted.ensureDeferred
async def test_azure_other_rates_from_16k(api, pool):
    """Other rates ask for 16 kHz raw PCM and resample it to the rate asked for."""
    native = tone(16000, 100)
    api.answer(body=native, content_type="audio/basic")
    pcm = await within(azure(api, pool).synthesize("Olá", 48000))
    assert api.seen[0].headers["x-microsoft-outputformat"] == "raw-16khz-16bit-mono-pcm"
    assert pcm == audio.resample(native, 16000, 48000)


@pytest.mark.parametrize("code", [401, 500])
@pytest_twisted.ensureDeferred
async def test_azure_http_error(api, pool, code):
    """An HTTP error status fails with reason http_<status>."""
    api.answer(code, b"")
    error = await tts_failure(azure(api, pool).synthesize("Olá", 8000))
    assert error.reason == f"http_{code}"


@pytest_twisted.ensureDeferred
async def test_azure_slow_server_times_out(api, pool):
    """A server that never answers fails with reason timeout; the request is dropped."""
    api.reply = HANG
    error = await tts_failure(azure(api, pool, timeout_s=0.3).synthesize("Olá", 8000), on_its_own)
    assert error.reason == "timeout"
    await within(api.abandoned[0])


# --- StoreCachedTTS --------------------------------------------------------------------------


def memory_store(clock=None) -> MemoryStore:
    return MemoryStore(reactor=clock or task.Clock())


def broken_store() -> MemoryStore:
    """A store whose every call fails with StoreUnavailable, as with Redis down."""
    store = memory_store()
    store.available = False
    return store


class SilentStore:
    """A store whose calls never answer (a reconnecting client waiting forever)."""

    def get_blob(self, key):
        return Deferred()

    def set_blob(self, key, data, ttl_s):
        return Deferred()


def everything(text: str) -> bool:
    """Every text may be stored (the tests of the store cache itself)."""
    return True


@implementer(ITTS)
class CountingTTS:
    name = "fake:voice"

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def synthesize(self, text, rate):
        self.calls.append((text, rate))
        return succeed(f"{text}@{rate}".encode())


def test_store_cached_provides_itts():
    """StoreCachedTTS implements ITTS and keeps the provider's name."""
    cached = StoreCachedTTS(CountingTTS(), memory_store(), shared=everything, reactor=task.Clock())
    assert verifyObject(ITTS, cached)
    assert cached.name == "fake:voice"


def test_store_cached_second_synthesis_from_store():
    """The second synthesis of a text is served from the store without the provider."""
    provider, store = CountingTTS(), memory_store()
    cached = StoreCachedTTS(provider, store, shared=everything, reactor=task.Clock())
    first = cached.synthesize("Olá", 8000)
    second = StoreCachedTTS(provider, store, shared=everything, reactor=task.Clock()).synthesize("Olá", 8000)
    assert first.result == second.result == "Olá@8000".encode()
    assert provider.calls == [("Olá", 8000)]


def test_store_cached_key():
    """The key is "tts:" + a sha256 hex of provider, rate and text."""
    store = memory_store()
    cached = StoreCachedTTS(CountingTTS(), store, shared=everything, reactor=task.Clock())
    cached.synthesize("Olá", 8000)
    ((key, (data, _)),) = store.hub.blobs.items()
    assert re.fullmatch("tts:[0-9a-f]{64}", key)
    assert key == cached.key("Olá", 8000)
    assert data == "Olá@8000".encode()


def test_store_cached_entry_expires_after_ttl():
    """Once ttl_s has passed the store has forgotten the audio and the provider is asked again."""
    clock = task.Clock()
    provider, store = CountingTTS(), memory_store(clock)
    cached = StoreCachedTTS(provider, store, ttl_s=3600, shared=everything, reactor=clock)
    cached.synthesize("Olá", 8000)
    clock.advance(3599)
    cached.synthesize("Olá", 8000)
    assert len(provider.calls) == 1
    clock.advance(1)
    cached.synthesize("Olá", 8000)
    assert len(provider.calls) == 2


def test_store_cached_blank_audio_not_stored():
    """Empty audio (blank text) is returned but not written to the store."""

    @implementer(ITTS)
    class Blank:
        name = "blank"

        def synthesize(self, text, rate):
            return succeed(b"")

    store = memory_store()
    assert StoreCachedTTS(Blank(), store, shared=everything, reactor=task.Clock()).synthesize(" ", 8000).result == b""
    assert store.hub.blobs == {}


def test_store_cached_key_depends_on_rate_text_provider():
    """Different rates, texts or providers never share a key."""
    a = StoreCachedTTS(CountingTTS(), memory_store(), shared=everything, reactor=task.Clock())
    other = CountingTTS()
    other.name = "fake:other"
    b = StoreCachedTTS(other, memory_store(), shared=everything, reactor=task.Clock())
    keys = {a.key("Olá", 8000), a.key("Olá", 16000), a.key("Oi", 8000), b.key("Olá", 8000)}
    assert len(keys) == 4


def test_store_cached_store_failure_falls_through():
    """A store that fails on read and write still gets the provider's audio to the caller."""
    provider = CountingTTS()
    cached = StoreCachedTTS(provider, broken_store(), shared=everything, reactor=task.Clock())
    assert cached.synthesize("Olá", 8000).result == "Olá@8000".encode()
    assert provider.calls == [("Olá", 8000)]
    assert cached.errors == 2


def test_store_cached_silent_store_times_out():
    """A store read that never answers gives up after timeout_s and asks the provider."""
    clock = task.Clock()
    provider = CountingTTS()
    cached = StoreCachedTTS(provider, SilentStore(), timeout_s=1.0, shared=everything, reactor=clock)
    d = cached.synthesize("Olá", 8000)
    assert not d.called
    clock.advance(1.0)
    assert d.result == "Olá@8000".encode()
    clock.advance(1.0)  # the write times out too, logged, not left pending
    assert clock.getDelayedCalls() == []


def test_store_cached_provider_failure_propagates():
    """A provider failure reaches the caller and nothing is stored."""

    @implementer(ITTS)
    class Failing:
        name = "failing"

        def synthesize(self, text, rate):
            return fail(TTSError("http_500"))

    store = memory_store()
    d = StoreCachedTTS(Failing(), store, shared=everything, reactor=task.Clock()).synthesize("Olá", 8000)
    assert d.result.value.reason == "http_500"
    d.addErrback(lambda _: None)
    assert store.hub.blobs == {}


def test_store_cached_keeps_no_per_call_text():
    """
    A text that is not shared (an announcement naming the visitor) is neither written to nor
    looked up in the store: it goes straight to the provider, every time.
    """
    provider, store = CountingTTS(), memory_store()
    fixed = "Aguarde, por favor."
    cached = StoreCachedTTS(provider, store, shared={fixed}.__contains__, reactor=task.Clock())
    announce = "Olá, morador do apartamento 101! Pedro da Silva está na portaria."
    assert cached.synthesize(announce, 8000).result == f"{announce}@8000".encode()
    cached.synthesize(announce, 8000)
    assert store.hub.blobs == {}
    assert provider.calls == [(announce, 8000), (announce, 8000)]
    assert cached.private == 2
    cached.synthesize(fixed, 8000)
    assert list(store.hub.blobs) == [cached.key(fixed, 8000)]


class RecordingStore:
    """A store that notes every key asked for."""

    def __init__(self):
        self.asked = []

    def get_blob(self, key):
        self.asked.append(key)
        return succeed(None)

    def set_blob(self, key, data, ttl_s):
        self.asked.append(key)
        return succeed(None)


def test_store_cached_does_not_look_up_per_call_text():
    """Not even a read: the store never learns a per-call text was spoken."""
    store = RecordingStore()
    cached = StoreCachedTTS(CountingTTS(), store, shared=lambda t: False, reactor=task.Clock())
    cached.synthesize("Pedro da Silva está na portaria.", 8000)
    assert store.asked == []


# --- make_tts --------------------------------------------------------------------------------


def test_make_tts_espeak_behind_memory_cache(pool):
    """tts = "espeak" builds espeak behind a CachedTTS of cache_size entries."""
    tts = make_tts(attrs.evolve(SpeechConfig(), cache_size=7), lambda n: None, pool=pool)
    assert isinstance(tts, CachedTTS)
    assert tts.max_entries == 7
    assert tts.name == "espeak:pt-br"


@pytest_twisted.ensureDeferred
async def test_make_tts_openai_with_store(api, pool):
    """tts = "openai" with a store: memory cache → store cache → OpenAI, key from secret()."""
    config = attrs.evolve(
        SpeechConfig(),
        tts="openai",
        openai=attrs.evolve(SpeechConfig().openai, url=api.url + "/v1", api_key_env="OK"),
    )
    store = memory_store()
    tts = make_tts(
        config,
        {"OK": "sk-o"}.get,
        pool=pool,
        store=store,
        shared={"Olá"}.__contains__,
        reactor=reactor,
        http=api.http,
    )
    api.answer(body=tone(24000, 60), content_type="audio/pcm")
    pcm = await within(tts.synthesize("Olá", 24000))
    assert api.seen[0].headers["authorization"] == "Bearer sk-o"
    assert [data for data, _ in store.hub.blobs.values()] == [pcm]


@pytest_twisted.ensureDeferred
async def test_make_tts_without_shared_stores_nothing(api, pool):
    """make_tts with a store but no C{shared}: no text may be kept, so none is."""
    config = attrs.evolve(
        SpeechConfig(),
        tts="openai",
        openai=attrs.evolve(SpeechConfig().openai, url=api.url + "/v1", api_key_env=""),
    )
    store = memory_store()
    tts = make_tts(config, lambda n: None, pool=pool, store=store, reactor=reactor, http=api.http)
    api.answer(body=tone(24000, 60), content_type="audio/pcm")
    await within(tts.synthesize("Olá", 24000))
    assert store.hub.blobs == {}


def test_make_tts_azure_without_key_names_the_variable(pool):
    """tts = "azure" with its key variable unset is a ValueError naming the variable."""
    config = attrs.evolve(
        SpeechConfig(), tts="azure", azure=attrs.evolve(SpeechConfig().azure, region="eastus")
    )
    with pytest.raises(ValueError, match="AZURE_SPEECH_KEY"):
        make_tts(config, lambda n: None, pool=pool)
