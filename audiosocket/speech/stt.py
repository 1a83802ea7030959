"""
Speech-to-text: the L{ISTT} interface and its providers.

  - L{WhisperSTT}: any OpenAI-compatible C{POST {url}/audio/transcriptions} (OpenAI, Groq, a
    local faster-whisper server);
  - L{AzureSTT}: Azure Speech's REST API for short audio;
  - L{VoskSTT}: an offline Vosk model, run in a bounded thread pool (optional extra).

Remote providers are L{HTTPProvider}s, sharing L{post}: one HTTP request with a deadline
covering the whole exchange (connect, send, headers, body). At the deadline the request is
cancelled, which aborts its connection, so a stalled provider leaves nothing behind.
Failures are L{STTError}s whose C{reason} the flow and the metrics can switch on.
"""

from __future__ import annotations

import functools
import io
import json
import wave
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface, implementer

from audiosocket import audio
from audiosocket.reactors import default_reactor

__all__ = [
    "ISTT",
    "AzureSTT",
    "HTTPProvider",
    "OpenAICompatible",
    "ProviderError",
    "STTError",
    "VoskSTT",
    "WhisperSTT",
    "default_http",
    "post",
    "wav_bytes",
]

#: The largest response body read from a provider (a minute of 24 kHz PCM is ~2.9 MB).
MAX_BODY = 32 * 1024 * 1024


class ProviderError(Exception):
    """
    A remote speech or language provider failed.

    @ivar reason: C{"timeout"}, C{"http_<status>"} (e.g. C{"http_401"}), C{"connection"},
        C{"bad_response"} or C{"empty"}.
    @ivar detail: a short human-readable explanation (never a secret).
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class STTError(ProviderError):
    """A transcription failed; see L{ProviderError} for C{reason}."""


# --- HTTP ------------------------------------------------------------------------------------


def default_http(reactor):
    """
    A treq client on C{reactor} with its own persistent connection pool (a provider is called
    many times; a TLS handshake per utterance would add latency). HTTPS verifies certificates.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return HTTPClient(Agent(reactor, pool=pool))


class _Body(Protocol):
    """
    Collects a response body into C{finished}; cancelling C{finished} aborts the connection
    (treq's own collector cannot be cancelled).
    """

    def __init__(self, limit: int, error: type[ProviderError]):
        self.finished: Deferred = Deferred(self._cancel)
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._error = error

    def _cancel(self, d: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.finished.errback(
                self._error("bad_response", f"response larger than {self._limit} bytes")
            )
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


async def _exchange(http, url: str, headers: dict[str, str], body: bytes, error) -> tuple:
    response = await http.post(
        url,
        data=body,
        headers=Headers({k.encode("ascii"): [v.encode("latin-1")] for k, v in headers.items()}),
    )
    collector = _Body(MAX_BODY, error)
    response.deliverBody(collector)
    content = await collector.finished
    return response.code, content


def post(
    http,
    reactor,
    url: str,
    *,
    headers: dict[str, str],
    body: bytes,
    timeout_s: float,
    error: type[ProviderError],
) -> Deferred:
    """
    POST C{body} to C{url} and read the answer, all within C{timeout_s}.

    @param http: a treq-like client (C{post(url, data=, headers=)} firing with an
        L{IResponse}).
    @return: a Deferred firing with the body (bytes) of a 2xx answer, or failing with
        C{error} (an L{ProviderError} subclass) whose reason is C{"timeout"},
        C{"http_<status>"} or C{"connection"}. Cancelling it cancels the request.
    """
    exchange = Deferred.fromCoroutine(_exchange(http, url, headers, body, error))
    # Cancelling a request in flight fails it with treq's own errors (ResponseNeverReceived,
    # ...), not CancelledError; so the deadline is remembered rather than inferred, and the
    # caller gets a Deferred of its own whose cancellation is a plain CancelledError.
    expired, cancelled = [], []

    def cancel(_: Deferred) -> None:
        cancelled.append(True)
        exchange.cancel()

    result: Deferred = Deferred(cancel)

    def expire() -> None:
        expired.append(True)
        exchange.cancel()

    deadline = reactor.callLater(timeout_s, expire)

    def classify(failure: Failure):
        if expired:
            raise error("timeout", f"no answer from {url} within {timeout_s:g} s")
        if failure.check(ProviderError):
            return failure
        raise error("connection", f"{url}: {failure.getErrorMessage()}")

    def check_status(answer: tuple) -> bytes:
        code, content = answer
        if not 200 <= code < 300:
            snippet = content[:200].decode("utf-8", "replace").strip()
            raise error(f"http_{code}", f"{url} answered {code}: {snippet}")
        return content

    def relay(outcome) -> None:
        if deadline.active():
            deadline.cancel()
        if not cancelled:  # else result fails with CancelledError: nobody wants the outcome
            result.callback(outcome)

    exchange.addCallbacks(check_status, classify).addBoth(relay)
    return result


def parse_json(content: bytes, error: type[ProviderError], what: str) -> Any:
    """C{content} as JSON, or C{error("bad_response")} naming C{what} answered."""
    try:
        return json.loads(content)
    except (UnicodeDecodeError, ValueError):
        snippet = content[:80].decode("utf-8", "replace")
        raise error("bad_response", f"{what} answered with invalid JSON: {snippet!r}") from None


# --- audio -----------------------------------------------------------------------------------


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """C{pcm} (s16le mono) as a complete WAV file in memory."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buffer.getvalue()


def _check_audio(pcm: bytes, rate: int) -> None:
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {rate!r}")
    if len(pcm) % 2:
        raise ValueError(f"s16le PCM must have an even number of bytes, got {len(pcm)}")
    if not pcm:
        raise STTError("empty", "no audio to transcribe")


def _checks_audio(transcribe):
    """
    Makes C{transcribe(self, pcm, rate)} return a failed Deferred, without calling it, when
    the audio cannot be transcribed (see L{_check_audio}).
    """

    @functools.wraps(transcribe)
    def checked(self, pcm: bytes, rate: int) -> Deferred:
        try:
            _check_audio(pcm, rate)
        except Exception as e:
            return fail(e)
        return transcribe(self, pcm, rate)

    return checked


class HTTPProvider:
    """
    What every remote provider shares: the reactor, the treq client (by default
    L{default_http}), the endpoint (C{_url}) and the deadline of each request.

    A subclass checks its own arguments (naming itself in the errors), calls this constructor,
    which checks C{timeout_s}, and then sets C{_url}: so the first thing wrong is the error.
    """

    #: The L{ProviderError} subclass this provider fails with.
    error: type[ProviderError] = ProviderError
    _url: str

    def __init__(self, *, timeout_s: float, http, reactor):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._reactor = default_reactor(reactor)
        self._http = http if http is not None else default_http(self._reactor)
        self._timeout_s = timeout_s

    def _post(self, headers: dict[str, str], body: bytes) -> Deferred:
        """L{post} C{body} to this provider's endpoint, within its deadline."""
        return post(
            self._http,
            self._reactor,
            self._url,
            headers=headers,
            body=body,
            timeout_s=self._timeout_s,
            error=self.error,
        )


class OpenAICompatible(HTTPProvider):
    """
    An OpenAI-compatible API: C{POST {url}{path}}, with C{api_key} (when there is one) as a
    bearer token. The subclass checks C{url} and C{model} are given before calling this.
    """

    #: What the endpoint adds to the API's base URL, e.g. C{"/audio/transcriptions"}.
    path: str

    def __init__(self, url: str, *, model: str, api_key: str | None, timeout_s, http, reactor):
        super().__init__(timeout_s=timeout_s, http=http, reactor=reactor)
        self._url = url.rstrip("/") + self.path
        self._model = model
        self._api_key = api_key

    def _headers(self, content_type: str, accept: str) -> dict[str, str]:
        """The request headers: these two, and the bearer token when there is a key."""
        headers = {"Content-Type": content_type, "Accept": accept}
        if self._api_key:
            headers["Authorization"] = "Bearer " + self._api_key
        return headers


class ISTT(Interface):
    """A speech recogniser."""

    name = Attribute("Provider id, e.g. C{'whisper:whisper-1'} (logs, metrics).")

    def transcribe(pcm: bytes, rate: int) -> Deferred:
        """
        Transcribe one utterance.

        @param pcm: signed 16-bit little-endian mono PCM.
        @param rate: its sample rate in Hz.
        @return: a Deferred firing with the text heard (C{""} when nothing was recognised),
            or failing with L{STTError}. Every request has a deadline.
        """


# --- providers -------------------------------------------------------------------------------


@implementer(ISTT)
class WhisperSTT(OpenAICompatible):
    """
    Any OpenAI-compatible transcription API: C{POST {url}/audio/transcriptions}, multipart
    with the utterance as C{audio.wav}, answered by C{{"text": "..."}}.

    @param prompt: optional text to steer recognition (names, vocabulary).
    """

    log = Logger()
    error = STTError
    path = "/audio/transcriptions"

    def __init__(
        self,
        url: str,
        *,
        model: str,
        language: str = "pt",
        api_key: str | None = None,
        timeout_s: float = 10.0,
        prompt: str | None = None,
        http=None,
        reactor=None,
    ):
        if not url:
            raise ValueError("WhisperSTT needs the API's base URL")
        if not model:
            raise ValueError("WhisperSTT needs a model name")
        super().__init__(
            url, model=model, api_key=api_key, timeout_s=timeout_s, http=http, reactor=reactor
        )
        self._language = language
        self._prompt = prompt
        self.name = f"whisper:{model}"

    @_checks_audio
    def transcribe(self, pcm: bytes, rate: int) -> Deferred:
        fields = {"model": self._model, "response_format": "json"}
        if self._language:
            fields["language"] = self._language
        if self._prompt:
            fields["prompt"] = self._prompt
        body, content_type = multipart_form(
            fields, {"file": ("audio.wav", "audio/wav", wav_bytes(pcm, rate))}
        )
        d = self._post(self._headers(content_type, "application/json"), body)
        d.addCallback(self._text)
        return d

    def _text(self, content: bytes) -> str:
        answer = parse_json(content, STTError, self._url)
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise STTError("bad_response", f'{self._url} answered without a "text" string')
        return text.strip()


def multipart_form(
    fields: dict[str, str], files: dict[str, tuple[str, str, bytes]]
) -> tuple[bytes, str]:
    """
    A C{multipart/form-data} body of text C{fields} and C{files} (name → (filename,
    content type, data)), and its Content-Type header value. Built in memory: utterances
    are small, and a fixed body needs no producer scheduling.
    """
    import secrets

    boundary = "audiosocket-" + secrets.token_hex(16)
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode("utf-8")
            + b"\r\n"
        )
    for name, (filename, content_type, data) in files.items():
        parts.append(
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _check_region(region: str, base_url: str | None) -> None:
    if base_url is None and not (region and region.isalnum() and region.isascii()):
        raise ValueError(
            f'Azure region must be letters and digits, like "brazilsouth", not {region!r}'
        )


@implementer(ISTT)
class AzureSTT(HTTPProvider):
    """
    Azure Speech's REST API for short audio (up to 60 s): the utterance is resampled to
    16 kHz and sent as WAV; C{format=simple} answers C{RecognitionStatus} and C{DisplayText}.

    @param base_url: replaces C{https://{region}.stt.speech.microsoft.com} (tests, proxies).
    @param pool: when given, resampling runs there instead of on the reactor thread.
    """

    log = Logger()
    error = STTError

    #: Statuses meaning "nothing was said": an empty transcript, not an error.
    SILENT = frozenset({"NoMatch", "InitialSilenceTimeout", "BabbleTimeout"})
    RATE = 16000

    def __init__(
        self,
        region: str,
        *,
        key: str | None,
        language: str = "pt-BR",
        timeout_s: float = 10.0,
        base_url: str | None = None,
        pool=None,
        http=None,
        reactor=None,
    ):
        _check_region(region, base_url)
        if not key:
            raise ValueError("AzureSTT needs a subscription key")
        super().__init__(timeout_s=timeout_s, http=http, reactor=reactor)
        from urllib.parse import urlencode

        base = (base_url or f"https://{region}.stt.speech.microsoft.com").rstrip("/")
        query = urlencode({"language": language, "format": "simple"})
        self._url = f"{base}/speech/recognition/conversation/cognitiveservices/v1?{query}"
        self._key = key
        self._pool = pool
        self.name = f"azure-stt:{language}"

    @_checks_audio
    def transcribe(self, pcm: bytes, rate: int) -> Deferred:
        return Deferred.fromCoroutine(self._transcribe(pcm, rate))

    async def _transcribe(self, pcm: bytes, rate: int) -> str:
        if self._pool is not None and rate != self.RATE:
            pcm = await deferToThreadPool(
                self._reactor, self._pool, audio.resample, pcm, rate, self.RATE
            )
        else:
            pcm = audio.resample(pcm, rate, self.RATE)
        content = await self._post(
            {
                "Ocp-Apim-Subscription-Key": self._key,
                "Content-Type": f"audio/wav; codecs=audio/pcm; samplerate={self.RATE}",
                "Accept": "application/json",
            },
            wav_bytes(pcm, self.RATE),
        )
        answer = parse_json(content, STTError, "Azure STT")
        status = answer.get("RecognitionStatus") if isinstance(answer, dict) else None
        if status == "Success":
            text = answer.get("DisplayText")
            if not isinstance(text, str):
                raise STTError("bad_response", 'Azure STT answered Success without "DisplayText"')
            return text.strip()
        if status in self.SILENT:
            return ""
        raise STTError("bad_response", f"Azure STT recognition status {status!r}")


@implementer(ISTT)
class VoskSTT:
    """
    Offline recognition with a Vosk model directory, in a bounded thread pool.

    Needs the optional C{vosk} package (C{pip install 'audiosocket[vosk]'}); without it the
    constructor raises L{ImportError} saying so. The model is loaded in the constructor (at
    start-up, not per call); each utterance gets a fresh recogniser.
    """

    log = Logger()

    def __init__(self, model_dir, *, pool, reactor=None):
        try:
            import vosk
        except ImportError as e:
            raise ImportError(
                'speech.stt = "vosk" needs the vosk package, which is not installed: '
                "pip install 'audiosocket[vosk]' (or pip install vosk), "
                'or choose another speech.stt'
            ) from e
        if model_dir is None:
            raise ValueError('speech.stt = "vosk" needs speech.vosk.model_dir')
        self._vosk = vosk
        self._model = vosk.Model(str(model_dir))
        self._pool = pool
        self._reactor = default_reactor(reactor)
        self.name = "vosk"

    @_checks_audio
    def transcribe(self, pcm: bytes, rate: int) -> Deferred:
        d = deferToThreadPool(self._reactor, self._pool, self._recognise, pcm, rate)

        def wrap(failure: Failure):
            if failure.check(STTError, CancelledError):
                return failure
            raise STTError("bad_response", f"vosk: {failure.getErrorMessage()}")

        d.addErrback(wrap)
        return d

    def _recognise(self, pcm: bytes, rate: int) -> str:
        # Runs in a worker thread.
        recogniser = self._vosk.KaldiRecognizer(self._model, float(rate))
        recogniser.AcceptWaveform(pcm)
        result = json.loads(recogniser.FinalResult())
        return str(result.get("text", "")).strip()
