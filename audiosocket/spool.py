# -*- test-case-name: tests.test_records,tests.test_access -*-
"""
A write to the store that must not be lost to a store outage: call records
(L{audiosocket.service.CallRecords}) and access audit entries
(L{audiosocket.access.AccessLog}) both go through a L{Spool}, so the rule lives here once.

The contract:
  - C{add(item)} hands an item over and never fails the caller: its Deferred fires with
    C{None} once the item is written or kept for later.
  - An item the store cannot take now (Redis down: any error but the two below) is kept,
    oldest first, and every item after it waits behind it: items reach the store in the
    order they were added. Every C{retry_s} the oldest is tried again; when the store
    answers, all kept items are written.
  - An item the store refuses for what it is (C{TypeError}/C{ValueError}: not a dict, not
    JSON) can never be written: it is logged as an error and dropped, so it cannot block
    the items behind it.
  - At most C{keep} items wait; beyond that the oldest are dropped (memory is bounded).
  - Stopping cancels the retry timer and logs how many items are still unsaved.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

#: Errors that say the item itself is bad: retrying can never write it.
_REFUSED = (TypeError, ValueError)


class Spool(Service):
    """
    Writes items with C{write(item) -> Deferred}, keeping through an outage what the store
    cannot take now (see the module docstring).

    @ivar unsaved: the items waiting for the store, oldest first.
    """

    log = Logger()

    def __init__(
        self,
        write: Callable[[Any], defer.Deferred],
        *,
        what: str,
        reactor,
        retry_s: float = 5.0,
        keep: int = 10000,
        name: str | None = None,
    ):
        self._write = write
        self.what = what
        self._reactor = reactor
        self._retry_s = retry_s
        if name is not None:
            self.name = name
        self.unsaved: collections.deque = collections.deque(maxlen=keep)
        self._timer = None
        self._saved_waiters: list[defer.Deferred] = []
        self._writing: set[defer.Deferred] = set()

    def when_saved(self) -> defer.Deferred:
        """
        Fires once every item handed to L{add} so far is in the store (at once if so): none
        is being written nor waiting for the store to come back.
        """
        if not self.unsaved and not self._writing:
            return defer.succeed(None)
        d = defer.Deferred(lambda d: self._saved_waiters.remove(d))
        self._saved_waiters.append(d)
        return d

    def _check_saved(self, result=None):
        if not self.unsaved and not self._writing:
            waiters, self._saved_waiters = self._saved_waiters, []
            for d in waiters:
                d.callback(None)
        return result

    def add(self, item) -> defer.Deferred:
        """Write C{item}, or keep it for later; the Deferred never fails."""
        if self.unsaved:
            self.unsaved.append(item)  # keep the order: after those already waiting
            return defer.succeed(None)
        d = defer.maybeDeferred(self._write, item)
        d.addErrback(self._failed, item)
        self._writing.add(d)

        def written(result):
            self._writing.discard(d)
            return self._check_saved(result)

        return d.addBoth(written)

    def _label(self, item) -> str:
        if isinstance(item, dict):
            return str(item.get("uuid") or item.get("at") or "")
        return ""

    def _failed(self, failure, item):
        if failure.check(*_REFUSED):
            self._refused(item, failure.getErrorMessage())
            return
        self.log.warn(
            "{what} {label} not saved ({error}); kept for retry",
            what=self.what,
            label=self._label(item),
            error=failure.getErrorMessage(),
        )
        self.unsaved.appendleft(item)
        self._schedule()

    def _refused(self, item, error: str):
        self.log.error(
            "{what} {label} dropped: the store cannot take it ({error})",
            what=self.what,
            label=self._label(item),
            error=error,
        )

    def _schedule(self):
        if self.running and (self._timer is None or not self._timer.active()):
            self._timer = self._reactor.callLater(self._retry_s, self._flush)

    def _flush(self):
        return defer.Deferred.fromCoroutine(self._write_waiting())

    async def _write_waiting(self):
        self._timer = None
        written = 0
        while self.unsaved:
            item = self.unsaved[0]
            try:
                await defer.maybeDeferred(self._write, item)
            except _REFUSED as e:
                self._refused(item, str(e) or type(e).__name__)
            except Exception:
                self._schedule()
                return
            else:
                written += 1
            self.unsaved.popleft()
        self.log.info(
            "{n} {what}(s) written after the store came back", n=written, what=self.what
        )
        self._check_saved()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.unsaved:
            self.log.error(
                "{n} {what}(s) could not be saved before shutdown",
                n=len(self.unsaved),
                what=self.what,
            )

