"""
Text-to-speech over HTTP, and a cache of synthesised audio in the shared store.

  - L{OpenAITTS}: any OpenAI-compatible C{POST {url}/audio/speech} asked for raw PCM;
  - L{AzureTTS}: Azure Speech's REST synthesis from SSML;
  - L{StoreCachedTTS}: audio of the fixed prompts kept in a blob store (Redis) across
    restarts and nodes, so a paid provider synthesises each prompt once a month rather than
    once a process. Texts that carry a caller's data (an announcement naming the visitor)
    are never stored there.

Requests go through L{audiosocket.speech.stt.post}: one deadline for the whole exchange,
cancelled (connection aborted) when it passes. Resampling runs in the synthesis pool.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Callable
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from audiosocket import audio
from audiosocket.reactors import default_reactor
from audiosocket.speech.stt import (
    HTTPProvider,
    OpenAICompatible,
    ProviderError,
    _check_region,
)
from audiosocket.speech.tts import ITTS

__all__ = ["AzureTTS", "OpenAITTS", "StoreCachedTTS", "TTSError"]


class TTSError(ProviderError):
    """A synthesis failed; C{reason} as for L{ProviderError}."""


def _check_rate(rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {rate!r}")


def _audio(pcm: bytes, provider: str) -> bytes:
    """The PCM C{provider} answered, whole samples only; an answer without any is an error."""
    # A truncated last sample would shift every later frame by one byte.
    pcm = pcm[: len(pcm) - len(pcm) % 2]
    if not pcm:
        raise TTSError("empty", f"{provider} answered with no audio")
    return pcm


class _HTTPTTS(HTTPProvider):
    """
    A synthesiser over HTTP. In C{synthesize}, a bad rate fails at once and blank text is
    silence without a request; anything else goes to the subclass's C{_synthesize}.
    """

    error = TTSError

    def synthesize(self, text: str, rate: int) -> Deferred:
        try:
            _check_rate(rate)
        except ValueError as e:
            return fail(e)
        if not text or not text.strip():
            return succeed(b"")
        return Deferred.fromCoroutine(self._synthesize(text, rate))


@implementer(ITTS)
class OpenAITTS(_HTTPTTS, OpenAICompatible):
    """
    OpenAI-compatible speech: C{POST {url}/audio/speech} with
    C{{"model", "voice", "input", "response_format": "pcm"}}, answered by 24 kHz s16le mono
    PCM, resampled (in C{pool}) to the rate asked for.
    """

    log = Logger()
    NATIVE_RATE = 24000
    path = "/audio/speech"

    def __init__(
        self,
        url: str,
        *,
        model: str,
        voice: str,
        api_key: str | None,
        timeout_s: float = 10.0,
        pool,
        http=None,
        reactor=None,
    ):
        if not url:
            raise ValueError("OpenAITTS needs the API's base URL")
        if not model or not voice:
            raise ValueError("OpenAITTS needs a model and a voice")
        super().__init__(
            url, model=model, api_key=api_key, timeout_s=timeout_s, http=http, reactor=reactor
        )
        self._voice = voice
        self._pool = pool
        self.name = f"openai:{model}:{voice}"

    async def _synthesize(self, text: str, rate: int) -> bytes:
        body = json.dumps(
            {
                "model": self._model,
                "voice": self._voice,
                "input": text,
                "response_format": "pcm",
            }
        ).encode("utf-8")
        pcm = await self._post(self._headers("application/json", "audio/pcm"), body)
        pcm = _audio(pcm, self._url)
        return await deferToThreadPool(
            self._reactor, self._pool, audio.resample, pcm, self.NATIVE_RATE, rate
        )


@implementer(ITTS)
class AzureTTS(_HTTPTTS):
    """
    Azure Speech synthesis: SSML (the text escaped) to
    C{https://{region}.tts.speech.microsoft.com/cognitiveservices/v1}, raw 8 kHz PCM for
    an 8 kHz leg, else raw 16 kHz PCM resampled (in C{pool}) to the rate asked for.

    @param base_url: replaces C{https://{region}.tts.speech.microsoft.com} (tests, proxies).
    """

    log = Logger()
    USER_AGENT = "audiosocket"

    def __init__(
        self,
        region: str,
        *,
        key: str | None,
        voice: str = "pt-BR-FranciscaNeural",
        language: str = "pt-BR",
        timeout_s: float = 10.0,
        pool,
        base_url: str | None = None,
        http=None,
        reactor=None,
    ):
        _check_region(region, base_url)
        if not key:
            raise ValueError("AzureTTS needs a subscription key")
        if not voice or not language:
            raise ValueError("AzureTTS needs a voice and a language")
        super().__init__(timeout_s=timeout_s, http=http, reactor=reactor)
        base = (base_url or f"https://{quote(region)}.tts.speech.microsoft.com").rstrip("/")
        self._url = base + "/cognitiveservices/v1"
        self._key = key
        self._voice = voice
        self._language = language
        self._pool = pool
        self.name = f"azure:{voice}"

    def ssml(self, text: str) -> str:
        """The SSML document speaking C{text} (escaped: C{<}, C{&} are text, not markup)."""
        lang = quoteattr(self._language)
        return (
            f"<speak version='1.0' xmlns='http://www.w3.org/2001/10/synthesis' xml:lang={lang}>"
            f"<voice xml:lang={lang} name={quoteattr(self._voice)}>{escape(text)}</voice>"
            "</speak>"
        )

    async def _synthesize(self, text: str, rate: int) -> bytes:
        native = 8000 if rate == 8000 else 16000
        pcm = await self._post(
            {
                "Ocp-Apim-Subscription-Key": self._key,
                "Content-Type": "application/ssml+xml",
                "X-Microsoft-OutputFormat": f"raw-{native // 1000}khz-16bit-mono-pcm",
                "User-Agent": self.USER_AGENT,
            },
            self.ssml(text).encode("utf-8"),
        )
        pcm = _audio(pcm, "Azure TTS")
        if native == rate:
            return pcm
        return await deferToThreadPool(
            self._reactor, self._pool, audio.resample, pcm, native, rate
        )


@implementer(ITTS)
class StoreCachedTTS:
    """
    Synthesised audio of shared texts kept in a blob store in front of C{tts}.

    Only a text for which C{shared(text)} is true is read from or written to the store: the
    fixed prompts, never one carrying a caller's data (a name said at the gate would
    otherwise sit in Redis for C{ttl_s}). Other texts go straight to the provider.

    C{store} has C{get_blob(key) -> Deferred[bytes | None]} and
    C{set_blob(key, data, ttl_s) -> Deferred} (L{audiosocket.store.IStore}; C{ttl_s} is
    passed as whole seconds). The key is C{"tts:" + sha256(provider name, rate, text)}: the
    text itself is not in Redis. The store is a cache, never a dependency: a read or write that fails or takes longer than C{timeout_s} is logged and the audio
    comes from (or still goes to the caller from) the provider. Writes are not waited for.

    Counters: C{hits} (served from the store), C{misses} (provider called for a shared
    text), C{private} (texts not shared, straight to the provider), C{errors} (store
    failures).
    """

    log = Logger()

    def __init__(
        self,
        tts: ITTS,
        store,
        *,
        shared: Callable[[str], bool],
        ttl_s: float = 30 * 86400,
        timeout_s: float = 1.0,
        reactor=None,
    ):
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, got {ttl_s!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._tts = tts
        self._store = store
        self._shared = shared
        self._ttl_s = math.ceil(ttl_s)  # Redis expiries are whole seconds
        self._timeout_s = timeout_s
        self._reactor = default_reactor(reactor)
        self.hits = 0
        self.misses = 0
        self.private = 0
        self.errors = 0

    @property
    def name(self) -> str:
        return self._tts.name

    def key(self, text: str, rate: int) -> str:
        """The store key of C{text} spoken at C{rate} by this provider."""
        material = json.dumps([self._tts.name, rate, text], ensure_ascii=False)
        return "tts:" + hashlib.sha256(material.encode("utf-8")).hexdigest()

    def synthesize(self, text: str, rate: int) -> Deferred:
        return Deferred.fromCoroutine(self._synthesize(text, rate))

    def _store_call(self, what: str, method, *args) -> Deferred:
        d = maybeDeferred(method, *args)
        d.addTimeout(self._timeout_s, self._reactor)

        def failed(failure: Failure):
            self.errors += 1
            # A warning, not a traceback: with Redis down this happens on every prompt.
            self.log.warn(
                "TTS store {what} failed ({error}); using the provider",
                what=what,
                error=failure.getErrorMessage() or failure.type.__name__,
            )
            return None

        return d.addErrback(failed)

    async def _synthesize(self, text: str, rate: int) -> bytes:
        if not self._shared(text):
            self.private += 1
            return await self._tts.synthesize(text, rate)
        key = self.key(text, rate)
        cached = await self._store_call("read", self._store.get_blob, key)
        if cached is not None:
            self.hits += 1
            return bytes(cached)
        self.misses += 1
        pcm = await self._tts.synthesize(text, rate)
        if pcm:  # blank text: nothing worth a round trip
            self._store_call("write", self._store.set_blob, key, pcm, self._ttl_s)
        return pcm
