"""
Speech providers built from the C{[speech]} configuration.

Secrets are read here, through the C{secret(env_name)} callable given (normally
L{audiosocket.config.secret}), so a provider that needs a key and has none fails at start-up
with the variable's name, not on the first call.
"""

from __future__ import annotations

from typing import Callable

from twisted.python.threadpool import ThreadPool

from audiosocket.config import SpeechConfig
from audiosocket.speech.http_tts import AzureTTS, OpenAITTS, StoreCachedTTS
from audiosocket.speech.stt import ISTT, AzureSTT, VoskSTT, WhisperSTT
from audiosocket.speech.tts import ITTS, CachedTTS, EspeakTTS

__all__ = ["make_stt", "make_tts"]

Secret = Callable[[str], "str | None"]


def _required_secret(secret: Secret, env_name: str, key: str) -> str:
    if not env_name:
        raise ValueError(f"{key} must name the environment variable holding the key")
    value = secret(env_name)
    if not value:
        raise ValueError(f"{key}: environment variable {env_name} is not set")
    return value


def _optional_secret(secret: Secret, env_name: str) -> str | None:
    return secret(env_name) if env_name else None


def _azure_key(speech_config: SpeechConfig, secret: Secret) -> str:
    """The Azure Speech key, shared by its synthesis and its recognition."""
    return _required_secret(secret, speech_config.azure.key_env, "speech.azure.key_env")


def make_tts(
    speech_config: SpeechConfig,
    secret: Secret,
    *,
    pool: ThreadPool,
    store=None,
    shared: Callable[[str], bool] | None = None,
    reactor=None,
    http=None,
) -> ITTS:
    """
    The synthesiser C{speech_config.tts} names, behind the caches: C{CachedTTS} (in memory,
    at most C{cache_size} entries and C{cache_mb} MiB, refusing texts over C{max_text_chars})
    in front of C{StoreCachedTTS} (when a C{store} is given) in front of the provider.
    C{pool} is the synthesis thread pool (started and stopped by the caller).

    @param shared: which texts may be kept in the C{store}: C{shared(text)} is true only for
        texts that carry no caller's data (the fixed prompts). Without it nothing is stored.

    @raise ValueError: a provider's key is missing (the message names the variable).
    """
    kind = speech_config.tts
    if kind == "espeak":
        e = speech_config.espeak
        provider: ITTS = EspeakTTS(pool, reactor, voice=e.voice, speed=e.speed, pitch=e.pitch)
    elif kind == "openai":
        o = speech_config.openai
        provider = OpenAITTS(
            o.url,
            model=o.model,
            voice=o.voice,
            api_key=_optional_secret(secret, o.api_key_env),
            timeout_s=o.timeout_s,
            pool=pool,
            http=http,
            reactor=reactor,
        )
    elif kind == "azure":
        a = speech_config.azure
        provider = AzureTTS(
            a.region,
            key=_azure_key(speech_config, secret),
            voice=a.voice,
            language=a.language,
            timeout_s=a.timeout_s,
            pool=pool,
            http=http,
            reactor=reactor,
        )
    else:
        raise ValueError(f"unknown speech.tts {kind!r}")
    if store is not None:
        provider = StoreCachedTTS(
            provider, store, shared=shared or _nothing_shared, reactor=reactor
        )
    return CachedTTS(
        provider,
        max_entries=speech_config.cache_size,
        max_bytes=speech_config.cache_mb * 1024 * 1024,
        max_text_chars=speech_config.max_text_chars,
    )


def _nothing_shared(text: str) -> bool:
    return False



def make_stt(
    speech_config: SpeechConfig,
    secret: Secret,
    *,
    pool: ThreadPool,
    reactor=None,
    http=None,
) -> ISTT | None:
    """
    The recogniser C{speech_config.stt} names, or L{None} for C{"none"} (DTMF only).

    @raise ValueError: a provider's key is missing (the message names the variable).
    @raise ImportError: C{"vosk"} without the vosk package (the message names the extra).
    """
    kind = speech_config.stt
    if kind == "none":
        return None
    if kind == "whisper":
        w = speech_config.whisper
        return WhisperSTT(
            w.url,
            model=w.model,
            language=w.language,
            api_key=_optional_secret(secret, w.api_key_env),
            timeout_s=w.timeout_s,
            http=http,
            reactor=reactor,
        )
    if kind == "azure":
        a = speech_config.azure
        return AzureSTT(
            a.region,
            key=_azure_key(speech_config, secret),
            language=a.language,
            timeout_s=a.timeout_s,
            pool=pool,
            http=http,
            reactor=reactor,
        )
    if kind == "vosk":
        return VoskSTT(speech_config.vosk.model_dir, pool=pool, reactor=reactor)
    raise ValueError(f"unknown speech.stt {kind!r}")
