"""
Tests for L{audiosocket.logs}: the JSON Lines observer for C{--logger
audiosocket.logs.json_lines} writes one plain JSON object per line with the rendered message
and the event's fields.
"""

from __future__ import annotations

import io
import json
import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher

from audiosocket import wire
from audiosocket.logs import json_lines
from extkit import ManagerSetup, ext, run


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_one_plain_json_object_with_the_message(tmp_path, monkeypatch):
    """
    Every line parses with json.loads as it is (no 0x1E record separator) and carries the
    rendered message, the level, the namespace and the event's own fields.
    """
    target = tmp_path / "events.json"
    monkeypatch.setenv("AUDIOSOCKET_JSON_LOG", str(target))
    log = Logger(namespace="audiosocket.test", observer=json_lines())
    log.info("call {uuid} ended: {outcome}", uuid="u-1", outcome="authorized")
    log.warn("second event")
    raw = target.read_bytes()
    assert b"\x1e" not in raw
    first, second = [json.loads(line) for line in raw.decode().splitlines()]
    assert first["message"] == "call u-1 ended: authorized"
    assert (first["uuid"], first["outcome"]) == ("u-1", "authorized")
    assert (first["level"], first["namespace"]) == ("info", "audiosocket.test")
    assert first["time"].endswith("+00:00")
    assert second["message"] == "second event" and second["level"] == "warn"


def test_a_failure_has_its_traceback_and_odd_values_their_repr():
    """log.failure events carry the traceback text; a value JSON cannot hold is its repr."""
    from audiosocket.logs import JsonLinesObserver

    stream = io.StringIO()
    log = Logger(namespace="audiosocket.test", observer=JsonLinesObserver(stream))
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("computing {thing}", thing=object)
    (line,) = _lines(stream)
    assert line["message"].startswith("computing <class 'object'>")
    assert "ZeroDivisionError" in line["traceback"]
    assert line["thing"] == repr(object)


def test_leg_ended_event_names_its_extension():
    """The "leg ... ended" event carries the extension id (ext) with its uuid."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        s = ManagerSetup()
        svc = run(s.manager.add(ext(id=7, ai=9070, ret=9071)))
        leg = svc.ai_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        leg.makeConnection(StringTransport())
        uid = uuid.uuid4()
        leg.dataReceived(wire.uuid_frame(uid))
        leg.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    (ended,) = [e for e in events if "ended (hung up by" in e.get("log_format", "")]
    assert ended["ext"] == 7 and ended["uuid"] == str(uid)
