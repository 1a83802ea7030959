"""
The resident's answer over real TCP: the real service from L{makeService} on 127.0.0.1, a
visitor and a resident placed by the L{audiosocket.callclient} core as Asterisk would, a
local Whisper-compatible server transcribing, and a resident who talks over the
announcement — "Alô? Pode falar", the way a phone is picked up.
"""

from __future__ import annotations

import io
import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

from audiosocket.fakepbx import Webhook
from test_service import (
    call,
    config_for,
    free_ports,
    spoken_wav,
    started,
    stopped,
    webhook_dialer,
    whisper_speech,
)

SENTENCE = "Oi, sou o Pedro da Silva, vim entregar uma encomenda para a Ana do 101"
PICK_UP = "Alô? Pode falar"


class Transcriber(resource.Resource):
    """
    A local OpenAI-compatible transcription endpoint: the visitor's long sentence, or (for
    anything under two seconds) the resident's "Alô? Pode falar". Keeps what it answered.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.answered: list[str] = []

    def render_POST(self, request):
        import wave

        body = request.content.read()
        # The WAV is the multipart's file part; its header says how long it is.
        start = body.index(b"RIFF")
        with wave.open(io.BytesIO(body[start:])) as w:
            seconds = w.getnframes() / w.getframerate()
        text = SENTENCE if seconds > 2.0 else PICK_UP
        self.answered.append(text)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"text": text}).encode()


@pytest_twisted.ensureDeferred
async def test_hello_over_the_announcement_does_not_authorize(redis_server, tmp_path):
    """
    The resident picks up and says "Alô? Pode falar" half a second in, over the
    announcement. That is not an answer to a question not yet asked: it is discarded, the
    announcement and question play out, and with nothing said after them the call ends
    denied by timeout — never authorized (the previous code took it as a yes).
    """
    whisper = Transcriber()
    stt_web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server.Site(whisper)
    )
    phone = Webhook(
        reactor,
        wav=spoken_wav(tmp_path / "alo.wav", "Alô, pode falar"),
        wav_at=0.5,
        seconds=60,
        out=io.StringIO(),
    )
    dial_web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server.Site(phone)
    )
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path,
        tmp_path,
        ai,
        ret,
        flow={"decision_timeout_s": 3},
        dialer=webhook_dialer(dial_web.getHost().port),
        speech=whisper_speech(stt_web.getHost().port),
    )
    visitor_wav = spoken_wav(tmp_path / "visitor.wav", SENTENCE)
    svc = await started(config)
    try:
        await call(ai, 60, wav=visitor_wav, wav_at=3.0).addTimeout(70, reactor)
        (resident,) = await defer.gatherResults(phone.calls).addTimeout(30, reactor)
        (record,) = await svc.store.recent_calls(1)
    finally:
        await stopped(svc)
        await stt_web.stopListening()
        await dial_web.stopListening()
    assert phone.requests, "the resident was never called"
    assert record["outcome"] != "authorized", record
    assert (record["outcome"], record["decision_input"]) == ("denied", "timeout"), record
    assert PICK_UP not in whisper.answered
    assert resident.hung_up_by == "server"
