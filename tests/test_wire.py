"""
Tests for L{audiosocket.wire}: encoding, incremental decoding, and each malformed case.
"""

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audiosocket import wire

UUID = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")

pcm_payloads = st.binary(min_size=2, max_size=1000).filter(lambda b: len(b) % 2 == 0)

audio_frames = st.tuples(st.sampled_from(sorted(wire.AUDIO_KINDS)), pcm_payloads).map(
    lambda t: wire.Frame(*t)
)
dtmf_frames = st.sampled_from(sorted(wire.DTMF_DIGITS)).map(
    lambda d: wire.Frame(wire.Kind.DTMF, d.encode())
)
hangup_frames = st.just(wire.Frame(wire.Kind.HANGUP))
body_frames = st.lists(st.one_of(audio_frames, dtmf_frames, hangup_frames), max_size=30)


def stream_of(frames):
    return wire.uuid_frame(UUID) + b"".join(wire.encode(f.kind, f.payload) for f in frames)


@given(body_frames)
def test_round_trip(frames):
    """Every frame a peer may send decodes back to itself, after the UUID frame."""
    decoded = wire.Decoder().feed(stream_of(frames))
    assert decoded[0] == wire.Frame(wire.Kind.UUID, UUID.bytes)
    assert decoded[1:] == frames


@given(body_frames, st.lists(st.integers(0, 10_000), max_size=20))
def test_any_chunking(frames, cuts):
    """The stream split at any points decodes to the same frames as the whole stream."""
    data = stream_of(frames)
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = wire.Decoder()
    out = []
    last = 0
    for p in points + [len(data)]:
        out += decoder.feed(data[last:p])
        last = p
    assert out == wire.Decoder().feed(data)
    assert decoder.buffered == 0
    decoder.finish()


def test_byte_by_byte():
    """Feeding one byte at a time yields each frame exactly when its last byte arrives."""
    data = wire.uuid_frame(UUID) + wire.audio(b"\x01\x00" * 160) + wire.dtmf("#")
    decoder = wire.Decoder()
    completions = [i for i, b in enumerate(data) if decoder.feed(bytes([b]))]
    assert completions == [18, 18 + 323, 18 + 323 + 4]


def test_encoder_refuses_empty_audio():
    """An empty audio frame makes Asterisk hang up, so the encoder refuses to build one."""
    with pytest.raises(ValueError):
        wire.audio(b"")


def test_encoder_refuses_oversized_payload():
    """A payload over 65535 bytes cannot be framed."""
    with pytest.raises(ValueError):
        wire.encode(wire.Kind.AUDIO, bytes(65536))


def test_audio_kind_by_rate():
    """Audio kinds map to rates as Asterisk defines them: 0x11 is 12 kHz, 0x12 16 kHz."""
    assert wire.audio_kind(8000) == 0x10
    assert wire.audio_kind(12000) == 0x11
    assert wire.audio_kind(16000) == 0x12
    assert wire.RATE_OF_KIND[0x18] == 192000
    with pytest.raises(ValueError):
        wire.audio_kind(11025)


def test_frame_bytes():
    """20 ms is 320 bytes at 8 kHz and 640 at 16 kHz."""
    assert wire.frame_bytes(8000) == 320
    assert wire.frame_bytes(16000) == 640


def _fails(data, error, **kw):
    decoder = wire.Decoder(**kw)
    with pytest.raises(error) as info:
        decoder.feed(data)
    # A spent decoder keeps refusing.
    with pytest.raises(error):
        decoder.feed(b"")
    return info.value


def test_first_frame_not_uuid():
    """Audio before the UUID is refused as first_frame_not_uuid."""
    e = _fails(wire.audio(bytes(320)), wire.FirstFrameNotUUID)
    assert e.reason == "first_frame_not_uuid"


def test_uuid_wrong_length():
    """A UUID frame whose payload is not 16 bytes is refused as bad_uuid."""
    _fails(wire.encode(wire.Kind.UUID, b"short"), wire.BadUUID)


def test_nil_uuid():
    """The all-zero UUID identifies no call and is refused."""
    _fails(wire.encode(wire.Kind.UUID, bytes(16)), wire.BadUUID)


def test_second_uuid():
    """A second UUID frame on one connection is refused."""
    _fails(wire.uuid_frame(UUID) * 2, wire.DuplicateUUID)


def test_unknown_kind():
    """A kind outside the protocol (0x02, 0x42) is refused as unknown_kind."""
    for kind in (0x02, 0x42, 0x19):
        e = _fails(wire.uuid_frame(UUID) + wire.encode(kind, b"x"), wire.UnknownKind)
        assert f"0x{kind:02x}" in str(e)


def test_unknown_kind_refused_from_header_alone():
    """A bad header is refused before its (possibly never-coming) payload arrives."""
    header = wire.HEADER.pack(0x42, 60000)
    _fails(wire.uuid_frame(UUID) + header, wire.UnknownKind)


def test_zero_length_audio():
    """A zero-length audio frame is refused as empty_audio."""
    _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.AUDIO, b""), wire.EmptyAudio)


def test_odd_audio():
    """Audio that is not whole 16-bit samples is refused."""
    _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.AUDIO, b"abc"), wire.OddAudio)


def test_audio_too_large():
    """An audio frame over the configured limit is refused from its header."""
    header = wire.HEADER.pack(wire.Kind.AUDIO, 20000)
    _fails(wire.uuid_frame(UUID) + header, wire.FrameTooLarge)


def test_bad_dtmf():
    """A DTMF frame that is not one keypad digit is refused."""
    _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.DTMF, b"12"), wire.BadDTMF)
    _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.DTMF, b"x"), wire.BadDTMF)


def test_bad_hangup():
    """A hangup frame with a payload is refused."""
    _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.HANGUP, b"x"), wire.BadHangup)


def test_error_frame():
    """A legacy error frame closes the leg as peer_error, naming its code."""
    e = _fails(wire.uuid_frame(UUID) + wire.encode(wire.Kind.ERROR, b"\x02"), wire.PeerError)
    assert "02" in str(e)


def test_truncated_at_close():
    """Closing inside a frame is reported as truncated_frame; at a boundary it is not."""
    decoder = wire.Decoder()
    decoder.feed(wire.uuid_frame(UUID) + wire.audio(bytes(320))[:100])
    with pytest.raises(wire.TruncatedFrame):
        decoder.finish()
    clean = wire.Decoder()
    clean.feed(wire.uuid_frame(UUID))
    clean.finish()


def test_frames_before_error_are_kept():
    """The valid frames decoded before a bad one in the same chunk ride on the error."""
    data = wire.uuid_frame(UUID) + wire.dtmf("5") + wire.encode(0x42, b"")
    e = _fails(data, wire.UnknownKind)
    assert [f.kind for f in e.frames] == [wire.Kind.UUID, wire.Kind.DTMF]


def test_distinct_reasons():
    """Every malformed case has its own reason code (they label metrics)."""
    classes = [c for c in vars(wire).values() if isinstance(c, type) and issubclass(c, wire.ProtocolError)]
    reasons = [c.reason for c in classes]
    assert len(reasons) == len(set(reasons))


def test_frames_decodes_only_what_is_asked_for():
    """
    Decoder.frames is lazy: a caller that stops after N frames has had N headers checked,
    and the frames it did not take stay buffered for later.
    """
    decoder = wire.Decoder()
    data = wire.uuid_frame(UUID) + wire.dtmf("1") * 1000
    frames = decoder.frames(data)
    taken = [next(frames) for _ in range(3)]
    frames.close()
    assert [f.kind for f in taken] == [wire.Kind.UUID, wire.Kind.DTMF, wire.Kind.DTMF]
    assert decoder.buffered == 998 * 4
    assert len(decoder.feed(b"")) == 998


def test_rate_not_allowed_refused_at_its_header():
    """Audio in a rate outside C{rates} is refused from its 3-byte header, payload unread."""
    decoder = wire.Decoder(rates=[8000, 16000])
    decoder.feed(wire.uuid_frame(UUID) + wire.audio(bytes(640), 16000))
    with pytest.raises(wire.RateNotAllowed):
        decoder.feed(wire.audio(bytes(7680), 192000)[:3])


def test_discarded_decoder_holds_nothing():
    """A discarded decoder (its connection is closing) drops its buffer and decodes no more."""
    decoder = wire.Decoder()
    decoder.feed(wire.uuid_frame(UUID) + wire.audio(bytes(320))[:100])
    decoder.discard()
    assert decoder.buffered == 0
    with pytest.raises(wire.ProtocolError):
        decoder.feed(wire.dtmf("1"))
