"""
Tests for L{audiosocket.speech.stt}: the Whisper-compatible and Azure recognisers against a
real local HTTP server speaking their APIs, the Vosk extra's missing-package error, and
L{audiosocket.speech.factory.make_stt}.

The local server (L{FakeAPI}) is shared with the TTS and NLU tests: it records each request
and answers with whatever the test sets, or never (to exercise deadlines).
"""

from __future__ import annotations

import email
import email.policy
import io
import sys
import wave

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from audiosocket.config import SpeechConfig
from audiosocket.speech.factory import make_stt
from audiosocket.speech.stt import ISTT, AzureSTT, VoskSTT, WhisperSTT, wav_bytes

TIMEOUT_S = 5


# --- a real local HTTP server ----------------------------------------------------------------


# The api fixture imported here is, as pytest means it, redefined by every test taking it.
# ruff: noqa: F811
from httpkit import (  # noqa: F401 (api is a fixture)
    Seen,
    Reply,
    HANG,
    FakeAPI,
    api,
    within,
    on_its_own,
    tone,
    failure_of,
    refused_url,
)


def form_parts(seen: Seen) -> dict[str, email.message.EmailMessage]:
    """The parts of a multipart/form-data request body, by field name (stdlib parser)."""
    raw = f"Content-Type: {seen.headers['content-type']}\r\n\r\n".encode() + seen.body
    message = email.message_from_bytes(raw, policy=email.policy.HTTP)
    assert message.is_multipart()
    return {
        part.get_param("name", header="content-disposition"): part
        for part in message.iter_parts()
    }


def wav_contents(data: bytes) -> tuple[int, int, int, bytes]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.readframes(w.getnframes())


# --- Whisper ---------------------------------------------------------------------------------


def whisper(api: FakeAPI, **kwargs) -> WhisperSTT:
    options = dict(model="whisper-1", api_key="sk-test", timeout_s=TIMEOUT_S, http=api.http)
    options.update(kwargs)
    return WhisperSTT(api.url + "/v1/", reactor=reactor, **options)


def test_whisper_provides_istt():
    """WhisperSTT implements ISTT and names its model."""
    stt = WhisperSTT("http://127.0.0.1:1/v1", model="whisper-1", http=object(), reactor=reactor)
    assert verifyObject(ISTT, stt)
    assert stt.name == "whisper:whisper-1"


@pytest_twisted.ensureDeferred
async def test_whisper_posts_to_transcriptions_with_bearer(api):
    """The request is a POST to {url}/audio/transcriptions carrying the key as a Bearer."""
    api.answer(body={"text": "oi"})
    await within(whisper(api).transcribe(tone(8000), 8000))
    (seen,) = api.seen
    assert seen.method == "POST"
    assert seen.path == "/v1/audio/transcriptions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")


@pytest_twisted.ensureDeferred
async def test_whisper_sends_form_fields(api):
    """The form carries model, language, response_format=json and the prompt when given."""
    api.answer(body={"text": "oi"})
    stt = whisper(api, model="large-v3", language="pt", prompt="Apoena")
    await within(stt.transcribe(tone(8000), 8000))
    parts = form_parts(api.seen[0])
    assert {k: v.get_content() for k, v in parts.items() if k != "file"} == {
        "model": "large-v3",
        "language": "pt",
        "response_format": "json",
        "prompt": "Apoena",
    }


@pytest_twisted.ensureDeferred
async def test_whisper_sends_the_pcm_as_wav(api):
    """The file part is audio.wav (audio/wav), a WAV decoding to exactly the PCM sent."""
    api.answer(body={"text": "oi"})
    pcm = tone(16000)
    await within(whisper(api).transcribe(pcm, 16000))
    part = form_parts(api.seen[0])["file"]
    assert part.get_filename() == "audio.wav"
    assert part.get_content_type() == "audio/wav"
    assert wav_contents(part.get_payload(decode=True)) == (1, 2, 16000, pcm)


@pytest_twisted.ensureDeferred
async def test_whisper_returns_the_text(api):
    """The answer's text is returned, stripped."""
    api.answer(body={"text": "  Pedro, apartamento 501 \n"})
    assert await within(whisper(api).transcribe(tone(8000), 8000)) == "Pedro, apartamento 501"


@pytest_twisted.ensureDeferred
async def test_whisper_without_key_sends_no_authorization(api):
    """With no API key (a local server) no Authorization header is sent."""
    api.answer(body={"text": ""})
    await within(whisper(api, api_key=None).transcribe(tone(8000), 8000))
    assert "authorization" not in api.seen[0].headers


@pytest.mark.parametrize("code", [401, 500])
@pytest_twisted.ensureDeferred
async def test_whisper_http_error(api, code):
    """An HTTP error status fails with STTError reason http_<status>."""
    api.answer(code, {"error": {"message": "nope"}})
    error = await failure_of(whisper(api).transcribe(tone(8000), 8000))
    assert error.reason == f"http_{code}"
    assert "nope" in str(error)


@pytest_twisted.ensureDeferred
async def test_whisper_invalid_json(api):
    """A 200 answer that is not JSON fails with reason bad_response."""
    api.answer(body=b"<html>oops</html>", content_type="text/html")
    error = await failure_of(whisper(api).transcribe(tone(8000), 8000))
    assert error.reason == "bad_response"


@pytest_twisted.ensureDeferred
async def test_whisper_answer_without_text(api):
    """JSON without a "text" string fails with reason bad_response."""
    api.answer(body={"txt": "oi"})
    error = await failure_of(whisper(api).transcribe(tone(8000), 8000))
    assert error.reason == "bad_response"


@pytest_twisted.ensureDeferred
async def test_whisper_slow_server_times_out_and_cancels(api):
    """
    A server that never answers fails with reason timeout after timeout_s, and the request's
    connection is closed (the server sees its request abandoned).
    """
    api.reply = HANG
    error = await failure_of(
        whisper(api, timeout_s=0.3).transcribe(tone(8000), 8000), wait=on_its_own
    )
    assert error.reason == "timeout"
    (abandoned,) = api.abandoned
    await within(abandoned)  # errback consumed: fires None once the client disconnected


@pytest_twisted.ensureDeferred
async def test_whisper_connection_refused():
    """Nothing listening fails with reason connection."""
    url = await refused_url()
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    stt = WhisperSTT(url, model="whisper-1", http=http, reactor=reactor)
    error = await failure_of(stt.transcribe(tone(8000), 8000))
    assert error.reason == "connection"


@pytest_twisted.ensureDeferred
async def test_whisper_empty_audio_is_refused_without_request(api):
    """No audio fails with reason empty, and nothing is sent."""
    error = await failure_of(whisper(api).transcribe(b"", 8000))
    assert error.reason == "empty"
    assert api.seen == []


@pytest.mark.parametrize("pcm, rate", [(b"\x00" * 3, 8000), (b"\x00" * 4, 0)])
@pytest_twisted.ensureDeferred
async def test_whisper_bad_audio_arguments(api, pcm, rate):
    """Odd-length PCM or a non-positive rate is a ValueError saying what was wrong."""
    with pytest.raises(ValueError, match="even number|sample rate"):
        await within(whisper(api).transcribe(pcm, rate))


def test_wav_bytes_round_trip():
    """wav_bytes writes a mono 16-bit WAV holding the PCM at its rate."""
    pcm = tone(8000, 40)
    assert wav_contents(wav_bytes(pcm, 8000)) == (1, 2, 8000, pcm)


# --- Azure -----------------------------------------------------------------------------------


def azure(api: FakeAPI, **kwargs) -> AzureSTT:
    options = dict(key="az-key", timeout_s=TIMEOUT_S, base_url=api.url, http=api.http)
    options.update(kwargs)
    return AzureSTT("brazilsouth", reactor=reactor, **options)


def test_azure_provides_istt():
    """AzureSTT implements ISTT."""
    assert verifyObject(ISTT, AzureSTT("brazilsouth", key="k", http=object(), reactor=reactor))


def test_azure_refuses_bad_region():
    """A region that cannot be a host name part is refused, naming it."""
    with pytest.raises(ValueError, match="evil.com/x"):
        AzureSTT("evil.com/x", key="k", http=object(), reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_azure_request(api):
    """
    The request goes to the short-audio recognition path with language and format, the key
    header and the 16 kHz PCM WAV content type.
    """
    api.answer(body={"RecognitionStatus": "Success", "DisplayText": "Sim."})
    await within(azure(api).transcribe(tone(8000), 8000))
    (seen,) = api.seen
    assert seen.path == (
        "/speech/recognition/conversation/cognitiveservices/v1?language=pt-BR&format=simple"
    )
    assert seen.headers["ocp-apim-subscription-key"] == "az-key"
    assert seen.headers["content-type"] == "audio/wav; codecs=audio/pcm; samplerate=16000"


@pytest_twisted.ensureDeferred
async def test_azure_resamples_to_16k(api):
    """8 kHz audio is sent as a 16 kHz WAV of the same duration."""
    api.answer(body={"RecognitionStatus": "Success", "DisplayText": "Sim."})
    pcm = tone(8000, 200)
    await within(azure(api).transcribe(pcm, 8000))
    channels, width, rate, frames = wav_contents(api.seen[0].body)
    assert (channels, width, rate) == (1, 2, 16000)
    assert len(frames) == 2 * len(pcm)


@pytest_twisted.ensureDeferred
async def test_azure_success_returns_display_text(api):
    """Success returns DisplayText."""
    api.answer(body={"RecognitionStatus": "Success", "DisplayText": "Pode subir."})
    assert await within(azure(api).transcribe(tone(16000), 16000)) == "Pode subir."


@pytest.mark.parametrize("status", ["NoMatch", "InitialSilenceTimeout"])
@pytest_twisted.ensureDeferred
async def test_azure_nothing_recognised_is_empty_text(api, status):
    """NoMatch and InitialSilenceTimeout mean nothing was said: an empty transcript."""
    api.answer(body={"RecognitionStatus": status})
    assert await within(azure(api).transcribe(tone(8000), 8000)) == ""


@pytest_twisted.ensureDeferred
async def test_azure_other_status_fails(api):
    """Any other RecognitionStatus fails with reason bad_response, naming the status."""
    api.answer(body={"RecognitionStatus": "Error"})
    error = await failure_of(azure(api).transcribe(tone(8000), 8000))
    assert error.reason == "bad_response"
    assert "Error" in str(error)


@pytest.mark.parametrize("code", [401, 500])
@pytest_twisted.ensureDeferred
async def test_azure_http_error(api, code):
    """An HTTP error status fails with reason http_<status>."""
    api.answer(code, b"")
    error = await failure_of(azure(api).transcribe(tone(8000), 8000))
    assert error.reason == f"http_{code}"


@pytest_twisted.ensureDeferred
async def test_azure_invalid_json(api):
    """A 200 answer that is not JSON fails with reason bad_response."""
    api.answer(body=b"{not json")
    error = await failure_of(azure(api).transcribe(tone(8000), 8000))
    assert error.reason == "bad_response"


@pytest_twisted.ensureDeferred
async def test_azure_slow_server_times_out(api):
    """A server that never answers fails with reason timeout and the request is dropped."""
    api.reply = HANG
    error = await failure_of(
        azure(api, timeout_s=0.3).transcribe(tone(8000), 8000), wait=on_its_own
    )
    assert error.reason == "timeout"
    await within(api.abandoned[0])


# --- Vosk ------------------------------------------------------------------------------------


def test_vosk_missing_package_names_the_extra(monkeypatch, tmp_path):
    """Without the vosk package, VoskSTT raises ImportError naming the package and extra."""
    monkeypatch.setitem(sys.modules, "vosk", None)  # makes "import vosk" raise ImportError
    with pytest.raises(ImportError, match=r"audiosocket\[vosk\]"):
        VoskSTT(tmp_path, pool=object(), reactor=reactor)


# --- make_stt --------------------------------------------------------------------------------


def test_make_stt_none():
    """stt = "none" builds no recogniser (DTMF only)."""
    assert make_stt(SpeechConfig(), lambda name: None, pool=object(), reactor=reactor) is None


@pytest_twisted.ensureDeferred
async def test_make_stt_whisper_uses_config_and_secret(api):
    """stt = "whisper" builds a WhisperSTT on the configured URL with the key from secret()."""
    config = attrs.evolve(
        SpeechConfig(),
        stt="whisper",
        whisper=attrs.evolve(SpeechConfig().whisper, url=api.url + "/v1", api_key_env="WK"),
    )
    stt = make_stt(
        config, {"WK": "sk-w"}.get, pool=object(), reactor=reactor, http=api.http
    )
    api.answer(body={"text": "oi"})
    assert await within(stt.transcribe(tone(8000), 8000)) == "oi"
    assert api.seen[0].headers["authorization"] == "Bearer sk-w"


def test_make_stt_azure_without_key_names_the_variable():
    """stt = "azure" with its key variable unset is a ValueError naming the variable."""
    config = attrs.evolve(
        SpeechConfig(), stt="azure", azure=attrs.evolve(SpeechConfig().azure, region="eastus")
    )
    with pytest.raises(ValueError, match="AZURE_SPEECH_KEY"):
        make_stt(config, lambda name: None, pool=object(), reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_whisper_cancel_drops_the_request(api):
    """Cancelling a transcription fails it with CancelledError and drops its connection."""
    api.reply = HANG
    d = whisper(api).transcribe(tone(8000), 8000)
    while not api.seen:  # wait (in reactor turns) until the request has reached the server
        await within(deferLater(reactor, 0, lambda: None))
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await within(api.abandoned[0])
