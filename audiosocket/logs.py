"""
Structured logs for log shippers: C{twistd --logger audiosocket.logs.json_lines audiosocket ...}
writes one JSON object per line (JSON Lines: C{json.loads} each line), instead of text lines.

Each object has:

    - C{time}: ISO 8601 in UTC, C{level}: C{debug} ... C{critical}, C{namespace}: the logger;
    - C{message}: the rendered text, as the text log shows it;
    - every field of the event (C{uuid}, C{ext}, C{outcome}, C{role}, ...) under its own
      name; a value JSON cannot hold is written as its C{repr};
    - C{traceback}: the text of the failure, for C{log.failure(...)} events.

twisted.logger's own C{jsonFileLogObserver} is not used: it starts every record with the
byte 0x1E (RFC 7464 record separator), carries no rendered message, and is made to be read
back by twisted.logger rather than by a log shipper.

The file is C{$AUDIOSOCKET_JSON_LOG}, else C{audiosocket.log.json} in the working directory
(twistd's own C{--logfile} is for its text format). C{-} means standard output (for C{-n}
under systemd or a container).
"""

from __future__ import annotations

import io
import json
import os
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer


def _jsonable(value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def event_as_dict(event: dict) -> dict:
    """The JSON object written for one twisted.logger event (see the module docstring)."""
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key == "format":
            continue
        record[key] = _jsonable(value)
    return record


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one JSON object and a newline, flushed (see the module docstring)."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def __call__(self, event: dict) -> None:
        self._stream.write(json.dumps(event_as_dict(event), ensure_ascii=False) + "\n")
        self._stream.flush()


def json_lines() -> JsonLinesObserver:
    """The observer factory twistd's C{--logger} calls (with no arguments)."""
    target = os.environ.get("AUDIOSOCKET_JSON_LOG", "audiosocket.log.json")
    if target == "-":
        stream = sys.stdout
    else:
        stream = io.open(target, "a", encoding="utf-8", buffering=1)
    return JsonLinesObserver(stream)
