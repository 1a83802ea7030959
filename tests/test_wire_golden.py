"""
The wire format against bytes a real Asterisk (22.10.1) sent: tests/data/asterisk/call.bin is
one AudioSocket() connection captured by tests/pbx/capture.py — the UUID frame, the audio of a
phone playing a 1 kHz ulaw tone, the DTMF frame of a key pressed on it, then Asterisk's close
(the phone hung up; Asterisk closes TCP without a hangup frame). call.json says what was sent.

These run without a PBX. The server, its test peers and audiosocket-call all share
audiosocket.wire, so only bytes from Asterisk itself can catch a wrong byte order or layout.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from audiosocket import wire

DATA = Path(__file__).resolve().parent / "data" / "asterisk"
STREAM = (DATA / "call.bin").read_bytes()
META = json.loads((DATA / "call.json").read_text())


def ulaw_to_pcm(codes: bytes) -> np.ndarray:
    """G.711 mu-law decoding (the table Asterisk's codec_ulaw uses)."""
    u = ~np.frombuffer(codes, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def frames() -> list[wire.Frame]:
    decoder = wire.Decoder()
    out = decoder.feed(STREAM)
    decoder.finish()
    return out


def test_stream_decodes_as_uuid_audio_and_dtmf():
    """
    The whole capture decodes: the UUID frame first, then 8 kHz audio frames of 20 ms, one
    DTMF frame with the key pressed, and nothing left over at Asterisk's close.
    """
    decoded = frames()
    assert decoded[0].kind == wire.Kind.UUID
    kinds = [f.kind for f in decoded[1:]]
    assert set(kinds) == {wire.Kind.AUDIO, wire.Kind.DTMF}
    assert kinds.count(wire.Kind.DTMF) == 1
    assert all(len(f.payload) == 320 for f in decoded if f.kind == wire.Kind.AUDIO)


def test_uuid_frame_carries_the_dialplan_uuid():
    """The UUID frame holds the 16 bytes of the UUID given to AudioSocket()."""
    assert wire.parse_uuid(frames()[0]) == uuid.UUID(META["uuid"])


def test_dtmf_frame_is_the_key_pressed():
    """The DTMF frame's payload is the ASCII digit pressed on the phone."""
    (dtmf,) = [f for f in frames() if f.kind == wire.Kind.DTMF]
    assert dtmf.payload.decode("ascii") == META["digit"]


def test_audio_is_signed_16_bit_little_endian():
    """
    Asterisk's audio payload is the phone's ulaw decoded to signed 16-bit little-endian PCM:
    every frame after the first few equals the tone the phone sent, sample for sample.
    """
    expected = ulaw_to_pcm(bytes.fromhex(META["phone_ulaw_hex"]))
    audio = [f.payload for f in frames() if f.kind == wire.Kind.AUDIO]
    matching = [p for p in audio if np.array_equal(np.frombuffer(p, "<i2"), expected)]
    assert len(matching) >= len(audio) - 2  # the first packets may precede the tone


def test_no_hangup_frame_before_the_close():
    """Asterisk ends the connection by closing TCP: no hangup (0x00) frame is sent."""
    assert all(f.kind != wire.Kind.HANGUP for f in frames())


@pytest.mark.parametrize("size", [1, 2, 3, 7, 320, 323, 1000])
def test_stream_split_anywhere_decodes_the_same(size):
    """Fed in pieces of any size, the capture decodes to the same frames."""
    decoder = wire.Decoder()
    out = []
    for i in range(0, len(STREAM), size):
        out.extend(decoder.feed(STREAM[i : i + size]))
    decoder.finish()
    assert out == frames()


def test_encoder_rebuilds_asterisks_bytes():
    """
    The encoder builds, byte for byte, the frames Asterisk sent: the UUID frame from the UUID,
    each audio frame from its PCM, the DTMF frame from the digit — the whole stream.
    """
    rebuilt = bytearray()
    for f in frames():
        if f.kind == wire.Kind.UUID:
            rebuilt += wire.uuid_frame(META["uuid"])
        elif f.kind == wire.Kind.DTMF:
            rebuilt += wire.dtmf(f.payload.decode("ascii"))
        else:
            rebuilt += wire.audio(f.payload, 8000)
    assert bytes(rebuilt) == STREAM


def test_audio_header_layout():
    """An 8 kHz audio frame of 320 bytes starts 0x10 0x01 0x40 (length big-endian), as sent."""
    header = STREAM[19:22]
    assert header == b"\x10\x01\x40"
    assert wire.audio(bytes(320))[:3] == header


def test_hangup_frame_is_kind_zero_length_zero():
    """
    The hangup frame Asterisk accepts from the server (res_audiosocket reads kind 0x00 as a
    graceful end): three zero bytes.
    """
    assert wire.hangup() == b"\x00\x00\x00"
