"""
Tests for L{audiosocket.audio}: PCM conversion, anti-aliased resampling, levels, padding,
silence, fades and silence trimming. Pure numpy, no reactor.
"""

import math

import numpy as np
import pytest
import soxr

from audiosocket import audio


def tone(freq: float, rate: int, seconds: float, amplitude: float = 10000.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return audio.array_to_pcm(amplitude * np.sin(2 * math.pi * freq * t))


def peak_hz(pcm: bytes, rate: int) -> float:
    a = audio.pcm_to_array(pcm).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(a * np.hanning(a.size)))
    return float(np.fft.rfftfreq(a.size, 1.0 / rate)[np.argmax(spectrum)])


def test_pcm_round_trip():
    """Bytes -> int16 array -> bytes gives back the same bytes, little-endian."""
    pcm = b"\x01\x00\xff\xff\x00\x80\xff\x7f"
    a = audio.pcm_to_array(pcm)
    assert a.tolist() == [1, -1, -32768, 32767]
    assert audio.array_to_pcm(a) == pcm


def test_pcm_to_array_refuses_half_samples():
    """An odd number of bytes is not PCM16 and is refused rather than silently truncated."""
    with pytest.raises(ValueError):
        audio.pcm_to_array(b"\x00\x01\x02")


def test_array_to_pcm_rounds_and_clips_floats():
    """Floating samples are rounded and saturate at the int16 limits instead of wrapping."""
    pcm = audio.array_to_pcm(np.array([1.6, -1.6, 40000.0, -40000.0]))
    assert audio.pcm_to_array(pcm).tolist() == [2, -2, 32767, -32768]


def test_resample_up_and_down_keeps_tone_and_length():
    """8 kHz -> 16 kHz -> 8 kHz keeps a 440 Hz tone at 440 Hz and the number of samples."""
    pcm8 = tone(440, 8000, 1.0)
    pcm16 = audio.resample(pcm8, 8000, 16000)
    assert len(pcm16) == 2 * len(pcm8)
    assert peak_hz(pcm16, 16000) == pytest.approx(440, abs=2)
    back = audio.resample(pcm16, 16000, 8000)
    assert len(back) == len(pcm8)
    assert peak_hz(back, 8000) == pytest.approx(440, abs=2)


def test_resample_same_rate_is_identity():
    """Equal rates return the input unchanged (no filtering, no copy)."""
    pcm = tone(440, 8000, 0.1)
    assert audio.resample(pcm, 8000, 8000) is pcm


def test_resample_keeps_tone_below_new_nyquist():
    """A 3.5 kHz tone survives 16 kHz -> 8 kHz at its frequency and level."""
    pcm = tone(3500, 16000, 1.0)
    out = audio.resample(pcm, 16000, 8000)
    assert peak_hz(out, 8000) == pytest.approx(3500, abs=2)
    assert audio.rms_dbfs(out) == pytest.approx(audio.rms_dbfs(pcm), abs=1.0)


def test_resample_removes_tone_above_new_nyquist():
    """
    A 6 kHz tone at 16 kHz is filtered out by 16 kHz -> 8 kHz (> 40 dB down), where naive
    decimation would fold it to 2 kHz at full level.
    """
    pcm = tone(6000, 16000, 1.0)
    naive = audio.array_to_pcm(audio.pcm_to_array(pcm)[::2])
    assert audio.rms_dbfs(naive) > audio.rms_dbfs(pcm) - 1.0  # the aliasing we must avoid
    out = audio.resample(pcm, 16000, 8000)
    assert audio.rms_dbfs(out) < audio.rms_dbfs(pcm) - 40.0


def test_resample_clips_overshoot_instead_of_wrapping():
    """
    The filter overshoots a full-scale square wave past int16; those samples saturate at
    the limit rather than wrapping around to the opposite sign.
    """
    a = np.where((np.arange(8000) // 20) % 2 == 0, 32767, -32768).astype(np.int16)
    exact = soxr.resample(a.astype(np.float32), 8000, 16000, quality=audio.RESAMPLE_QUALITY)
    assert exact.max() > 32767  # the test needs a real overshoot
    out = audio.pcm_to_array(audio.resample(audio.array_to_pcm(a), 8000, 16000))
    assert np.abs(out.astype(np.int32) - np.clip(exact, -32768, 32767)).max() <= 1


def test_resample_empty():
    """Resampling no audio gives no audio."""
    assert audio.resample(b"", 22050, 8000) == b""


def test_rms_of_silence_and_tone():
    """Digital silence is -inf dBFS and silent; a full-scale sine is -3 dBFS and not silent."""
    assert audio.rms_dbfs(audio.silence(8000, 20)) == -math.inf
    assert audio.rms_dbfs(b"") == -math.inf
    assert audio.is_silent(audio.silence(8000, 20))
    full = tone(1000, 8000, 1.0, amplitude=32767)
    assert audio.rms_dbfs(full) == pytest.approx(-3.01, abs=0.05)
    assert not audio.is_silent(full)


def test_is_silent_threshold():
    """A quiet tone (about -63 dBFS) is silent at the default -50 dBFS, not at -70."""
    quiet = tone(1000, 8000, 0.1, amplitude=32)
    assert audio.is_silent(quiet)
    assert not audio.is_silent(quiet, threshold_dbfs=-70)


def test_pad_to_frame():
    """The tail is zero-padded to a whole frame; whole frames and empty input are unchanged."""
    assert audio.pad_to_frame(b"\x01\x02" * 100, 320) == b"\x01\x02" * 100 + bytes(120)
    whole = b"\x01" * 640
    assert audio.pad_to_frame(whole, 320) is whole
    assert audio.pad_to_frame(b"", 320) == b""


def test_silence_length():
    """silence(rate, ms) is ms of zero samples: 20 ms at 8 kHz is one 320-byte frame."""
    assert audio.silence(8000, 20) == bytes(320)
    assert len(audio.silence(16000, 50)) == 1600


def test_fade_ramps_edges_only():
    """The fade starts and ends at zero and leaves the middle untouched."""
    pcm = audio.array_to_pcm(np.full(8000, 10000, dtype=np.int16))
    out = audio.pcm_to_array(audio.fade(pcm, 8000, ms=5))
    assert out[0] == 0
    assert out[-1] == 0
    assert np.all(np.diff(out[:40].astype(np.int32)) > 0)
    assert np.all(out[40:-40] == 10000)
    assert len(out) == 8000


def test_fade_on_short_audio():
    """Audio shorter than two ramps is faded over half its length each way, not garbled."""
    out = audio.pcm_to_array(audio.fade(audio.array_to_pcm(np.full(10, 1000)), 8000, ms=5))
    assert out.tolist() == [0, 200, 400, 600, 800, 800, 600, 400, 200, 0]


def test_trim_silence_keeps_a_margin():
    """Long leading and trailing silence is cut down to keep_ms on each side."""
    rate = 8000
    speech = tone(440, rate, 0.5)
    pcm = audio.silence(rate, 400) + speech + audio.silence(rate, 300)
    out = audio.trim_silence(pcm, rate, keep_ms=50)
    # The sine's first and last samples are ~0 themselves, so allow a few samples more.
    assert len(out) == pytest.approx(len(speech) + 2 * len(audio.silence(rate, 50)), abs=8)
    assert audio.pcm_to_array(out)[: rate * 45 // 1000].max() == 0


def test_trim_silence_of_silence_is_empty():
    """All-silent input trims to nothing."""
    assert audio.trim_silence(audio.silence(8000, 100), 8000) == b""
