# -*- test-case-name: tests.test_access -*-
"""
The access audit: every gate opening, attempted or done, kept so that anyone can show
afterwards who let whom in, when and why.

L{AccessLog.add} takes one event and never fails its caller (the gate has opened or not
whatever the audit does). The entry goes to the store's capped stream (C{<prefix>access},
C{[access] audit_maxlen} entries at most, the oldest trimmed first) through a
L{audiosocket.spool.Spool}: an entry the store cannot take now (Redis down) is kept, in order,
and written when the store answers again, exactly like call records. C{GET /api/access} reads
it back, newest first, filtered by condominium, apartment and time; the retention service
(L{audiosocket.retention}) deletes entries older than C{[privacy] access_retention_days}.

An entry is a JSON object with these fields (L{audiosocket.gate.GateOpener} produces them for
every open, attempted or withheld; L{AccessLog} fills C{at} and C{ts} when missing):

  - C{at}: when, ISO 8601 in UTC with milliseconds (C{"2026-12-05T16:20:57.123Z"});
  - C{ts}: the same instant in epoch seconds (a float);
  - C{condominium_id} (int); C{gate}: the condominium's gate kind, C{"none"}, C{"dtmf"} or
    C{"http"}; C{extension_id} (int or null); C{uuid}: the visitor's call, or null (an
    operator opening from the API);
  - C{apartment} (str or null); C{visitor}: the visitor's name as understood, or null —
    always null with C{[privacy] keep_visitor_names = false};
  - C{authorized_by}: C{"resident"}, C{"preauth"} or C{"operator"}; C{who}: the resident's
    name, the pre-authorisation's id, or the operator's reason (or null);
  - C{evidence}: C{"dtmf:1"}, C{"voice"} (the resident's words only with C{[privacy]
    record_speech}: C{"voice:<words>"}), C{"code"}, C{"operator:<reason>"};
  - C{result}: C{"opened"}, C{"handed_off"} (the digits were handed to the PBX, which sends
    them after the call), C{"failed"} (the actuator said no), C{"not_opened"} (no gate, or
    nothing was tried); C{error} (str or null): why it failed; C{attempts} (int or null): how
    many times the actuator was called.

The C{[privacy]} settings are read through a callable at each C{add}, so a reload (SIGHUP)
applies to the next entry.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from .config import PrivacyConfig
from .gate import AUTHORIZED_BY, RESULTS
from .spool import Spool

#: The values the fields with a closed set of values take (for the API's schema): the
#: gate's own.
GATES = ("none", "dtmf", "http")
__all__ = ["AccessLog", "iso_utc", "GATES", "AUTHORIZED_BY", "RESULTS"]


def iso_utc(ts: float) -> str:
    """Epoch seconds as ISO 8601 in UTC with milliseconds and C{Z}."""
    ms = int(round(ts * 1000))
    seconds, ms = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".{:03d}Z".format(ms)


class AccessLog(Spool):
    """
    Appends access audit entries to the store, through an outage too (see the module
    docstring).

    @param store: an C{IStore} (C{append_access}).
    @param privacy: returns the C{[privacy]} settings in effect (read at each C{add}).
    """

    log = Logger()
    name = "access-log"

    def __init__(
        self,
        store,
        *,
        reactor,
        privacy: Callable[[], PrivacyConfig] = PrivacyConfig,
        retry_s: float = 5.0,
        keep: int = 10000,
    ):
        super().__init__(
            store.append_access, what="access entry", reactor=reactor, retry_s=retry_s, keep=keep
        )
        self._privacy = privacy
        self._observers: list[Callable[[dict], Any]] = []

    def add_observer(self, observer: Callable[[dict], Any]) -> None:
        """Call C{observer(entry)} with each entry as it is kept (the operator's screen)."""
        self._observers.append(observer)

    def entry(self, event: dict) -> dict:
        """C{event} as it is kept: the time filled in, the visitor's name only if allowed."""
        entry = dict(event)
        if entry.get("ts") is None:
            entry["ts"] = self._reactor.seconds()
        if entry.get("at") is None:
            entry["at"] = iso_utc(entry["ts"])
        if not self._privacy().keep_visitor_names:
            entry["visitor"] = None
        return entry

    def add(self, event: dict) -> defer.Deferred:
        """Keep C{event}; the Deferred fires with C{None}, never fails."""
        try:
            entry = self.entry(event)
        except Exception:
            self.log.failure("access entry {event!r} dropped: not an event", event=event)
            return defer.succeed(None)
        for observer in self._observers:
            try:
                observer(entry)
            except Exception:
                self.log.failure("an access observer failed")
        return super().add(entry)
