"""
Capture what a real Asterisk sends on an AudioSocket connection, byte for byte, as test data
for tests/test_wire_golden.py (which runs without a PBX, from the stored bytes).

    ASTERISK_PREFIX=/opt/asterisk .venv/bin/python tests/pbx/capture.py tests/data/asterisk

It boots a private Asterisk (L{pbx.asterisk.Asterisk}), listens on a port as a bare AudioSocket
server that sends silence every 20 ms (so AudioSocket() keeps the call), and originates a
UnicastRTP phone straight into C{AudioSocket(<a known UUID>,127.0.0.1:<port>)}. The phone sends
the same 20 ms of a 1 kHz ulaw tone in every packet; once its audio flows, the key C{5} is
pressed (AMI PlayDTMF, Receive: true) and then the phone hangs up. Written:

  - C{call.bin}: every byte Asterisk sent, in order, up to its close;
  - C{call.json}: the UUID given to AudioSocket(), the digit, the phone's ulaw payload (hex),
    and how the connection ended.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbx.asterisk import ULAW, Asterisk, Phone, connect_ami  # noqa: E402

DIGIT = "5"


def tone_ulaw() -> bytes:
    """20 ms of a 1 kHz tone (20 whole periods at 8 kHz) as ulaw codes."""
    samples = np.round(8000 * np.sin(2 * np.pi * 1000 * np.arange(160) / 8000)).astype(int)
    return bytes(int(np.argmin(np.abs(ULAW.astype(int) - s))) for s in samples)


class Recorder(protocol.Protocol):
    """A bare AudioSocket server: keeps every byte, sends 20 ms of silence every 20 ms."""

    def __init__(self):
        self.data = bytearray()
        self.closed = defer.Deferred()
        self.loop = task.LoopingCall(self._silence)

    def connectionMade(self):
        self.loop.start(0.02)

    def _silence(self):
        # kind 0x10, length 320, big-endian: written out here, not with audiosocket.wire,
        # so the capture does not depend on the code it is there to check.
        self.transport.write(b"\x10\x01\x40" + bytes(320))

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        if self.loop.running:
            self.loop.stop()
        self.closed.callback(reason.getErrorMessage())


async def capture(reactor, out: Path) -> None:
    pbx = Asterisk(os.environ["ASTERISK_PREFIX"])
    pbx.start()
    try:
        recorder = Recorder()
        factory = protocol.Factory.forProtocol(lambda: recorder)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        ami = await connect_ami(reactor, pbx)
        phone = Phone(reactor, "capture").listen()
        phone._payload = tone_ulaw()
        ami.listeners.append(phone.event)
        call_uuid = str(uuid.uuid4())
        await ami.checked(
            "Originate", Channel=phone.dial, Application="AudioSocket",
            Data="{},127.0.0.1:{}".format(call_uuid, port.getHost().port), Async="true",
        )
        await phone.answered.addTimeout(10, reactor)
        await deferLater(reactor, 0.2, lambda: None)
        await phone.press(ami, DIGIT)
        await deferLater(reactor, 0.2, lambda: None)
        await phone.hangup(ami)
        how = await recorder.closed.addTimeout(10, reactor)
        await phone.hung_up.addTimeout(10, reactor)
        await port.stopListening()
        await phone.close()
        ami.transport.loseConnection()
        warnings = pbx.problems_since(0)
    finally:
        pbx.stop()
        pbx.remove()
    out.mkdir(parents=True, exist_ok=True)
    (out / "call.bin").write_bytes(bytes(recorder.data))
    (out / "call.json").write_text(
        json.dumps(
            {
                "asterisk": "22.10.1",
                "uuid": call_uuid,
                "digit": DIGIT,
                "phone_ulaw_hex": tone_ulaw().hex(),
                "ended": "phone hung up; Asterisk closed TCP ({})".format(how),
                "bytes": len(recorder.data),
            },
            indent=2,
        )
        + "\n"
    )
    print("{} bytes from Asterisk -> {}".format(len(recorder.data), out / "call.bin"))
    for line in warnings:
        print("asterisk:", line)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/asterisk")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(capture(reactor, out)))
