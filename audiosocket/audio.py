"""
PCM helpers on numpy arrays: conversion, resampling, energy, padding, silence and fades.

All audio here is what AudioSocket carries: signed 16-bit little-endian, mono, as C{bytes}.
Functions take and return C{bytes} so callers never hold a mutable view of a frame; they are
vectorised and free of I/O, so they are safe to call from a worker thread.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

#: Sample format on the wire: signed 16-bit little-endian.
SAMPLE_DTYPE = np.dtype("<i2")
SAMPLE_BYTES = SAMPLE_DTYPE.itemsize

_INT16_MIN = -32768
_INT16_MAX = 32767
_FULL_SCALE = 32768.0

#: libsoxr quality for every conversion. "VHQ" costs little more than "HQ" at telephone
#: rates and keeps the stopband well below anything a listener or an STT model notices.
RESAMPLE_QUALITY = "VHQ"


def pcm_to_array(pcm: bytes) -> np.ndarray:
    """
    View s16le PCM as an int16 array (read-only; copy it to modify).

    @raise ValueError: C{pcm} holds an odd number of bytes, i.e. not whole samples.
    """
    if len(pcm) % SAMPLE_BYTES:
        raise ValueError(f"PCM length {len(pcm)} is not a whole number of 16-bit samples")
    return np.frombuffer(pcm, dtype=SAMPLE_DTYPE)


def _to_int16(a: np.ndarray) -> np.ndarray:
    """Round (if floating) and clip to the int16 range, so loud peaks saturate, never wrap."""
    a = np.asarray(a)
    if a.dtype == SAMPLE_DTYPE or a.dtype == np.int16:
        return a
    if np.issubdtype(a.dtype, np.floating):
        a = np.rint(a)
    return np.clip(a, _INT16_MIN, _INT16_MAX).astype(SAMPLE_DTYPE)


def array_to_pcm(a: np.ndarray) -> bytes:
    """
    Encode samples as s16le bytes.

    Integer arrays are clipped to the int16 range; floating arrays (in int16 units, not
    -1..1) are rounded then clipped.
    """
    return _to_int16(a).astype(SAMPLE_DTYPE, copy=False).tobytes()


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """
    Convert s16le mono PCM from C{from_rate} to C{to_rate} Hz with an anti-aliasing filter.

    The output holds C{round(n * to_rate / from_rate)} samples (libsoxr's one-shot length),
    so durations are kept. Identity (the same object) when the rates match. The work is done
    in float32 and clipped back to int16, because the filter's overshoot on a near-full-scale
    signal would otherwise wrap around.

    Each call is independent: resampling a stream frame by frame this way adds small edge
    effects at every frame boundary; resample whole utterances or prompts instead.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return pcm
    a = pcm_to_array(pcm)
    if a.size == 0:
        return b""
    out = soxr.resample(a.astype(np.float32), from_rate, to_rate, quality=RESAMPLE_QUALITY)
    return array_to_pcm(out)


def rms_dbfs(pcm: bytes) -> float:
    """
    Root-mean-square level in dBFS (0 dBFS = a full-scale square wave; a full-scale sine is
    about -3 dBFS). Digital silence and empty input give C{-inf}.
    """
    a = pcm_to_array(pcm)
    if a.size == 0:
        return -math.inf
    # float64 so the sum of squares of a long buffer cannot overflow.
    ms = float(np.mean(np.square(a, dtype=np.float64)))
    if ms == 0.0:
        return -math.inf
    return 10.0 * math.log10(ms / (_FULL_SCALE * _FULL_SCALE))


def is_silent(pcm: bytes, threshold_dbfs: float = -50.0) -> bool:
    """True when the RMS level of C{pcm} is below C{threshold_dbfs}."""
    return rms_dbfs(pcm) < threshold_dbfs


def pad_to_frame(pcm: bytes, frame_bytes: int) -> bytes:
    """
    Pad the tail with zeros to a whole number of C{frame_bytes} frames.

    Input that already ends on a frame boundary (including empty input) is returned as is.
    """
    if frame_bytes <= 0:
        raise ValueError(f"frame size must be positive, got {frame_bytes}")
    short = -len(pcm) % frame_bytes
    return pcm + bytes(short) if short else pcm


def samples_for(rate: int, ms: float) -> int:
    """Number of samples in C{ms} milliseconds at C{rate} Hz, rounded to the nearest."""
    return int(round(rate * ms / 1000.0))


def silence(rate: int, ms: float) -> bytes:
    """C{ms} milliseconds of digital silence at C{rate} Hz."""
    return bytes(SAMPLE_BYTES * samples_for(rate, ms))


def fade(pcm: bytes, rate: int, ms: float = 5.0) -> bytes:
    """
    Apply a linear fade-in and fade-out of C{ms} milliseconds.

    A prompt that starts or stops mid-waveform is heard as a click; a few milliseconds of
    ramp remove it without audibly changing the speech. On audio shorter than two ramps the
    ramp is shortened to half its length.
    """
    a = pcm_to_array(pcm)
    n = min(samples_for(rate, ms), a.size // 2)
    if n <= 0:
        return pcm
    out = a.astype(np.float32)
    # Fade-in from 0 up to (but excluding) full gain, fade-out its mirror image.
    ramp = np.arange(n, dtype=np.float32) / n
    out[:n] *= ramp
    out[-n:] *= ramp[::-1]
    return array_to_pcm(out)


def trim_silence(
    pcm: bytes, rate: int, threshold_dbfs: float = -50.0, keep_ms: float = 50.0
) -> bytes:
    """
    Drop leading and trailing silence, keeping up to C{keep_ms} of it on each side.

    A sample is sound when its magnitude exceeds C{threshold_dbfs} of full scale. Synthesisers
    pad their output with hundreds of milliseconds of silence, which on a phone line is dead
    air before a prompt starts and delay before the caller may answer; a little is kept so
    the first and last phonemes are not cut. All-silent input gives C{b""}.
    """
    a = pcm_to_array(pcm)
    threshold = _FULL_SCALE * 10.0 ** (threshold_dbfs / 20.0)
    loud = np.flatnonzero(np.abs(a.astype(np.int32)) > threshold)
    if loud.size == 0:
        return b""
    keep = samples_for(rate, keep_ms)
    start = max(0, int(loud[0]) - keep)
    end = min(a.size, int(loud[-1]) + 1 + keep)
    return pcm[start * SAMPLE_BYTES : end * SAMPLE_BYTES]
