"""
Structured logs for log shippers: C{twistd --logger audiosocket.logs.json_lines audiosocket ...}
writes one JSON object per event (twisted.logger's own format, every field of the event kept:
C{uuid}, C{ext}, C{outcome}, ...) instead of text lines.

The file is C{$AUDIOSOCKET_JSON_LOG}, else C{audiosocket.log.json} in the working directory
(twistd's own C{--logfile} is for its text format). C{-} means standard output (for C{-n}
under systemd or a container).
"""

from __future__ import annotations

import io
import os
import sys

from twisted.logger import jsonFileLogObserver


def json_lines():
    """The observer factory twistd's C{--logger} calls (with no arguments)."""
    target = os.environ.get("AUDIOSOCKET_JSON_LOG", "audiosocket.log.json")
    if target == "-":
        stream = sys.stdout
    else:
        stream = io.open(target, "a", encoding="utf-8", buffering=1)
    return jsonFileLogObserver(stream)
