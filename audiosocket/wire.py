# -*- test-case-name: tests.test_wire,tests.test_wire_golden -*-
"""
The AudioSocket wire format: frame kinds, an encoder, and an incremental decoder.

Pure functions and plain objects only: nothing here knows about Twisted or sockets, so the
decoder can be fed a byte stream split at any point and driven by property tests.

The protocol, as Asterisk's C{AudioSocket()} application and C{Dial(AudioSocket/...)}
channel (res_audiosocket) really behave, which is the contract the rest of the server keeps:

  - A frame is its kind (1 byte), its payload length (2 bytes, unsigned big-endian) and the
    payload: at most 65535 bytes, the length may be 0.
  - C{0x00} hangup, no payload: sent by the server to end the call. Asterisk never sends
    it; it hangs up by closing the TCP connection.
  - C{0x01} UUID, 16 raw bytes in RFC 4122 (big-endian) order: always the first frame
    Asterisk sends, and only once.
  - C{0x03} DTMF, one ASCII byte (C{0-9 * # A-D}), sent when a digit ends; Asterisk to
    server only.
  - C{0x10} audio: signed 16-bit little-endian PCM, 8 kHz mono; 320 bytes is 20 ms, the
    size Asterisk sends and the server paces its own frames at.
  - C{0x11} to C{0x18} audio at 12, 16, 24, 32, 44.1, 48, 96 and 192 kHz (C{0x11} is
    12 kHz, C{0x12} 16 kHz), same sample format, for the channels that use them.
  - C{0xff} error: defined, never sent by current Asterisk; the decoder refuses it.

What Asterisk accepts from the server: C{0x00} and the audio kinds, nothing else. Any other
kind (C{0x02}, C{0x03}, C{0xff}, an unknown one) makes it hang up the call, and so does an
audio frame with no payload, or a frame whose payload arrives in pieces more than about
5 ms apart: so the encoder builds only those kinds (L{hangup}, L{audio}; L{encode} is for
tests and the client tool) and refuses empty audio, and the server writes each frame whole,
in one write, on a socket with C{TCP_NODELAY}. C{AudioSocket()} also hangs up after 2 s
with no audio either way, which is why a leg sends silence while it has nothing to say
(L{audiosocket.leg}).
"""

from __future__ import annotations

import struct
import uuid as _uuid
from enum import IntEnum
from typing import Iterable, Iterator

from attrs import frozen


class Kind(IntEnum):
    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    AUDIO = 0x10  # signed 16-bit LE PCM, 8 kHz mono (or the channel's negotiated codec)
    AUDIO_12K = 0x11
    AUDIO_16K = 0x12
    AUDIO_24K = 0x13
    AUDIO_32K = 0x14
    AUDIO_44K = 0x15
    AUDIO_48K = 0x16
    AUDIO_96K = 0x17
    AUDIO_192K = 0x18
    ERROR = 0xFF


#: Sample rate of each audio kind.
RATE_OF_KIND: dict[int, int] = {
    Kind.AUDIO: 8000,
    Kind.AUDIO_12K: 12000,
    Kind.AUDIO_16K: 16000,
    Kind.AUDIO_24K: 24000,
    Kind.AUDIO_32K: 32000,
    Kind.AUDIO_44K: 44100,
    Kind.AUDIO_48K: 48000,
    Kind.AUDIO_96K: 96000,
    Kind.AUDIO_192K: 192000,
}
KIND_OF_RATE: dict[int, int] = {rate: kind for kind, rate in RATE_OF_KIND.items()}
AUDIO_KINDS = frozenset(RATE_OF_KIND)

HEADER = struct.Struct(">BH")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 0xFFFF
SAMPLE_WIDTH = 2  # bytes per sample, signed 16-bit little-endian
FRAME_MS = 20

#: A digit Asterisk may report in a DTMF frame.
DTMF_DIGITS = frozenset("0123456789*#ABCD")


def frame_bytes(rate: int, ms: int = FRAME_MS) -> int:
    """
    Bytes of PCM in one frame of C{ms} milliseconds at C{rate} Hz (320 for 20 ms at 8 kHz).
    """
    return rate * ms // 1000 * SAMPLE_WIDTH


def audio_kind(rate: int) -> int:
    """
    The frame kind that carries audio at C{rate} Hz.

    @raise ValueError: no AudioSocket kind carries that rate.
    """
    try:
        return KIND_OF_RATE[rate]
    except KeyError:
        raise ValueError(f"no AudioSocket audio kind for {rate} Hz") from None


@frozen
class Frame:
    kind: int
    payload: bytes = b""

    @property
    def is_audio(self) -> bool:
        return self.kind in AUDIO_KINDS

    @property
    def rate(self) -> int:
        return RATE_OF_KIND[self.kind]


# ---------------------------------------------------------------- encoding


def encode(kind: int, payload: bytes = b"") -> bytes:
    """
    Encode one frame of any kind (tests and the client tool need every kind; the server
    itself only sends what L{hangup} and L{audio} build).
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"frame kind {kind!r} is not a byte")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


def hangup() -> bytes:
    """The hangup frame: kind 0x00, no payload."""
    return HANGUP_FRAME


HANGUP_FRAME = HEADER.pack(Kind.HANGUP, 0)


def audio(pcm: bytes, rate: int = 8000) -> bytes:
    """
    An audio frame of C{pcm} at C{rate}. Asterisk hangs up on an empty audio frame, so that
    is refused here rather than sent.
    """
    if not pcm:
        raise ValueError("an empty audio frame makes Asterisk hang up")
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError("PCM must be whole 16-bit samples")
    return encode(audio_kind(rate), pcm)


def uuid_frame(value: _uuid.UUID | str) -> bytes:
    """The first frame a peer (Asterisk, or our client tool) sends."""
    if isinstance(value, str):
        value = _uuid.UUID(value)
    return encode(Kind.UUID, value.bytes)


def dtmf(digit: str) -> bytes:
    """A DTMF frame, as Asterisk sends it at the end of a digit."""
    if digit not in DTMF_DIGITS:
        raise ValueError(f"{digit!r} is not a DTMF digit")
    return encode(Kind.DTMF, digit.encode("ascii"))


# ---------------------------------------------------------------- decoding errors


class ProtocolError(Exception):
    """
    The peer broke the protocol. C{reason} is a short, stable code (used as a metric label);
    the message says what exactly was wrong.
    """

    reason = "protocol_error"
    #: Whole, valid frames decoded from the same C{feed} before the error.
    frames: list = []


class FirstFrameNotUUID(ProtocolError):
    reason = "first_frame_not_uuid"


class BadUUID(ProtocolError):
    reason = "bad_uuid"


class DuplicateUUID(ProtocolError):
    reason = "duplicate_uuid_frame"


class UnknownKind(ProtocolError):
    reason = "unknown_kind"


class EmptyAudio(ProtocolError):
    reason = "empty_audio"


class OddAudio(ProtocolError):
    reason = "odd_audio_length"


class BadDTMF(ProtocolError):
    reason = "bad_dtmf"


class BadHangup(ProtocolError):
    reason = "bad_hangup"


class PeerError(ProtocolError):
    reason = "peer_error"


class FrameTooLarge(ProtocolError):
    reason = "frame_too_large"


class RateNotAllowed(ProtocolError):
    reason = "rate_not_allowed"


class TruncatedFrame(ProtocolError):
    reason = "truncated_frame"


# ---------------------------------------------------------------- decoding


class Decoder:
    """
    Incremental decoder of the frames a peer (Asterisk) sends to the server.

    Feed it bytes as they arrive, split anywhere; it returns the whole frames they complete
    and keeps the rest. The first frame must be the UUID; after that only audio, DTMF and
    hangup are valid. Every malformed case raises its own L{ProtocolError}; after one, the
    decoder is spent and the connection should be closed.

    @param max_audio_payload: the largest audio payload accepted. 20 ms at 192 kHz is 7680
        bytes; the default leaves room for larger packetization while still refusing a
        peer that announces 64 KiB of nonsense.
    @param rates: the sample rates whose audio kinds are accepted (L{None}: all); audio in
        any other kind is L{RateNotAllowed}, refused at its header.
    """

    def __init__(
        self,
        *,
        expect_uuid: bool = True,
        max_audio_payload: int = 16384,
        rates: Iterable[int] | None = None,
    ):
        self._buffer = bytearray()
        self._expect_uuid = expect_uuid
        self._seen_uuid = not expect_uuid
        self._max_audio = max_audio_payload
        self._audio_kinds = (
            AUDIO_KINDS if rates is None else frozenset(KIND_OF_RATE[r] for r in rates)
        )
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """
        Every whole frame C{data} completes, as a list.

        @raise ProtocolError: on the first malformed frame; its C{frames} are the good
            frames decoded before it.
        """
        if self._failed is not None:
            raise self._failed
        frames: list[Frame] = []
        try:
            for frame in self.frames(data):
                frames.append(frame)
        except ProtocolError as e:
            # The good frames before the bad one still count (a DTMF digit, say).
            e.frames = frames
            raise
        return frames

    def frames(self, data: bytes) -> Iterator[Frame]:
        """
        Like L{feed}, but lazily: each frame is decoded only when the caller asks for it.
        A caller that stops early (a bound was hit and the connection is closing) does no
        work for the rest, however much one read brought; what was not decoded stays
        buffered. Close the iterator (or exhaust it) before the next call.
        """
        if self._failed is not None:
            raise self._failed
        buf = self._buffer
        buf += data
        offset = 0
        try:
            while len(buf) - offset >= HEADER_SIZE:
                kind, length = HEADER.unpack_from(buf, offset)
                self._check_header(kind, length)
                end = offset + HEADER_SIZE + length
                if end > len(buf):
                    break
                payload = bytes(buf[offset + HEADER_SIZE : end])
                frame = self._check_frame(kind, payload)
                offset = end
                yield frame
        except ProtocolError as e:
            self._failed = e
            raise
        finally:
            if offset:
                del buf[:offset]

    def discard(self) -> None:
        """The connection is closing: forget buffered bytes and decode nothing more."""
        self._buffer = bytearray()
        if self._failed is None:
            self._failed = ProtocolError("the decoder was discarded")

    def finish(self) -> None:
        """
        The peer closed the connection. Raise L{TruncatedFrame} if it left part of a frame.
        """
        if self._failed is None and self._buffer:
            raise TruncatedFrame(
                f"connection closed inside a frame ({len(self._buffer)} bytes pending)"
            )

    def _check_header(self, kind: int, length: int) -> None:
        # Checked as soon as the 3 header bytes are in, so a bad frame is refused without
        # waiting for (or buffering) a payload that may never come.
        if not self._seen_uuid and kind != Kind.UUID:
            raise FirstFrameNotUUID(f"first frame is kind 0x{kind:02x}, not a UUID (0x01)")
        if kind == Kind.UUID:
            if self._seen_uuid:
                raise DuplicateUUID("a second UUID frame on the same connection")
            if length != 16:
                raise BadUUID(f"UUID payload is {length} bytes, not 16")
        elif kind in AUDIO_KINDS:
            if kind not in self._audio_kinds:
                raise RateNotAllowed(
                    f"audio at {RATE_OF_KIND[kind]} Hz (kind 0x{kind:02x}) is not allowed here"
                )
            if length == 0:
                raise EmptyAudio(f"zero-length audio frame (kind 0x{kind:02x})")
            if length > self._max_audio:
                raise FrameTooLarge(
                    f"audio frame of {length} bytes exceeds {self._max_audio}"
                )
            if length % SAMPLE_WIDTH:
                raise OddAudio(f"audio frame of {length} bytes is not whole samples")
        elif kind == Kind.DTMF:
            if length != 1:
                raise BadDTMF(f"DTMF payload is {length} bytes, not 1")
        elif kind == Kind.HANGUP:
            if length != 0:
                raise BadHangup(f"hangup frame with a {length}-byte payload")
        elif kind == Kind.ERROR:
            # Never sent by current Asterisk; legacy peers may. Read its code, then fail.
            if length > 16:
                raise PeerError(f"error frame (kind 0xff) with a {length}-byte payload")
        else:
            raise UnknownKind(f"unknown frame kind 0x{kind:02x} ({length}-byte payload)")

    def _check_frame(self, kind: int, payload: bytes) -> Frame:
        if kind == Kind.UUID:
            try:
                _uuid.UUID(bytes=payload)
            except ValueError as e:  # pragma: no cover - 16 bytes always parse
                raise BadUUID(str(e)) from None
            if payload == bytes(16):
                raise BadUUID("the nil UUID (all zero) identifies no call")
            self._seen_uuid = True
        elif kind == Kind.DTMF:
            digit = payload.decode("latin-1")
            if digit not in DTMF_DIGITS:
                raise BadDTMF(f"DTMF payload {payload!r} is not a keypad digit")
        elif kind == Kind.ERROR:
            raise PeerError(f"peer sent an error frame, code {payload.hex() or 'none'}")
        return Frame(kind, payload)


def parse_uuid(frame: Frame) -> _uuid.UUID:
    return _uuid.UUID(bytes=frame.payload)
