"""
espeak-ng speech synthesis through its C API (ctypes), with no command-line tool.

The C{espeakng-loader} package ships C{libespeak-ng.so} and its data directory. The library
keeps global state (one voice, one set of parameters, one output callback per process) and is
not thread-safe, so every call into it happens under one module-level lock, and the library
is initialised once, lazily, on first use. Synthesis is blocking and CPU-bound: call
L{EspeakEngine.synthesize} from a worker thread, never from the reactor thread.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_short, c_size_t, c_uint, c_void_p

import numpy as np
from attrs import frozen

from audiosocket.audio import SAMPLE_DTYPE

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data dir as an error instead of exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 0x1
_EE_OK = 0
_PARAM_RATE = 1
_PARAM_PITCH = 3

#: Limits espeak-ng accepts for its rate (words per minute) and pitch parameters.
SPEED_RANGE = (80, 450)
PITCH_RANGE = (0, 100)

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 0 continues.
_SynthCallback = CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)


class SynthesisError(Exception):
    """espeak-ng could not be loaded, initialised, configured, or could not speak."""


class _Library:
    """
    The process-wide libespeak-ng, initialised. Only ever used with L{_lock} held.
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise SynthesisError("the espeakng-loader package is not installed") from e
        library_path = espeakng_loader.get_library_path()
        data_path = espeakng_loader.get_data_path()
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as e:
            raise SynthesisError(f"cannot load {library_path}: {e}") from e

        lib.espeak_Initialize.argtypes = [c_int, c_int, c_char_p, c_int]
        lib.espeak_Initialize.restype = c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [c_char_p]
        lib.espeak_SetVoiceByName.restype = c_int
        lib.espeak_SetParameter.argtypes = [c_int, c_int, c_int]
        lib.espeak_SetParameter.restype = c_int
        lib.espeak_Synth.argtypes = [
            c_void_p, c_size_t, c_uint, c_int, c_uint, c_uint, c_void_p, c_void_p
        ]
        lib.espeak_Synth.restype = c_int

        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise SynthesisError(
                f"espeak_Initialize failed ({rate}) with data directory {data_path}"
            )
        self.lib = lib
        self.sample_rate = rate
        self._chunks: list[np.ndarray] = []
        # The library keeps only the C pointer: this reference is what keeps the
        # trampoline alive for the life of the process.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        # What the library is currently set to, so switching costs nothing when unchanged.
        self._settings: tuple[str, int, int] | None = None

    def _collect(self, wav, numsamples, events) -> int:
        # Called by espeak_Synth on the same thread, with the lock held.
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def configure(self, voice: str, speed: int, pitch: int) -> None:
        if self._settings == (voice, speed, pitch):
            return
        self._settings = None  # unknown until every call below succeeds
        rc = self.lib.espeak_SetVoiceByName(voice.encode())
        if rc != _EE_OK:
            raise SynthesisError(f"espeak-ng has no voice {voice!r} (error {rc})")
        # Selecting a voice loads its defaults, so rate and pitch are set after it.
        for param, value, label in ((_PARAM_RATE, speed, "speed"), (_PARAM_PITCH, pitch, "pitch")):
            rc = self.lib.espeak_SetParameter(param, value, 0)
            if rc != _EE_OK:
                raise SynthesisError(f"espeak-ng refused {label}={value} (error {rc})")
        self._settings = (voice, speed, pitch)

    def speak(self, text: str) -> np.ndarray:
        data = text.encode("utf-8")
        self._chunks = []
        try:
            rc = self.lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            if rc != _EE_OK:
                raise SynthesisError(f"espeak_Synth failed (error {rc})")
            if not self._chunks:
                return np.zeros(0, dtype=np.int16)
            return np.concatenate(self._chunks)
        finally:
            self._chunks = []


_lock = threading.Lock()
_library: _Library | None = None


def _get_library() -> _Library:
    """The initialised library; call with L{_lock} held."""
    global _library
    if _library is None:
        _library = _Library()
    return _library


@frozen
class EspeakEngine:
    """
    Blocking espeak-ng synthesiser for one voice, speed (words per minute) and pitch (0-100).

    Engines are cheap; all of them share the one library, each setting its own voice and
    parameters under the lock before speaking. Safe to call from any thread; calls are
    serialised.

    The output of the stock voices varies slightly from call to call (a few samples of length,
    and the waveform): their pitch "flutter" runs off a counter that libespeak-ng keeps across
    utterances and offers no way to reset. Variants with C{flutter 0} (e.g. C{"pt-br+Diogo"})
    are deterministic. Either way, synthesise a fixed prompt once and cache it.
    """

    voice: str = "pt-br"
    speed: int = 165
    pitch: int = 50

    def __attrs_post_init__(self):
        if not SPEED_RANGE[0] <= self.speed <= SPEED_RANGE[1]:
            raise ValueError(f"speed must be in {SPEED_RANGE}, got {self.speed}")
        if not PITCH_RANGE[0] <= self.pitch <= PITCH_RANGE[1]:
            raise ValueError(f"pitch must be in {PITCH_RANGE}, got {self.pitch}")

    def synthesize(self, text: str) -> tuple[bytes, int]:
        """
        Speak C{text}; return C{(pcm, sample_rate)}, PCM being s16le mono (22050 Hz).

        Text that is empty or only whitespace returns C{(b"", sample_rate)} without
        synthesising: there is nothing to say, and an empty prompt plays as nothing.

        @raise SynthesisError: the library cannot be loaded or initialised, the voice does
            not exist, or synthesis fails.
        """
        with _lock:
            library = _get_library()
            if not text.strip():
                return b"", library.sample_rate
            library.configure(self.voice, self.speed, self.pitch)
            samples = library.speak(text)
            return samples.astype(SAMPLE_DTYPE, copy=False).tobytes(), library.sample_rate
