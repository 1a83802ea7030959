# -*- test-case-name: tests.test_access -*-
"""
Retention (LGPD): personal data is kept no longer than configured.

L{Retention} runs once the server starts (as soon as the store answers) and then every hour:
it deletes the call records stored more than C{[privacy] calls_retention_days} ago and the
access audit entries stored more than C{[privacy] access_retention_days} ago (0: that kind is
kept until its stream's cap only). The settings are read through a callable at each run, so
a reload (SIGHUP) applies to the next run. What was deleted is logged; a store outage is
logged and the work is done by the next run; nothing here ever stops the server.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from .config import PrivacyConfig
from .store import StoreUnavailable

DAY_S = 86400.0
INTERVAL_S = 3600.0


class Retention(Service):
    """
    Deletes what is older than the retention periods, at start and every C{interval_s}.

    @param store: an C{IStore} (C{delete_calls}, C{trim_access}).
    @param privacy: returns the C{[privacy]} settings in effect.
    @ivar runs: how many runs have ended (for tests and status).
    """

    log = Logger()
    name = "retention"

    def __init__(
        self,
        store,
        *,
        reactor,
        privacy: Callable[[], PrivacyConfig] = PrivacyConfig,
        interval_s: float = INTERVAL_S,
    ):
        self._store = store
        self._reactor = reactor
        self._privacy = privacy
        self._interval_s = interval_s
        self._loop: task.LoopingCall | None = None
        self._current: defer.Deferred | None = None
        self.runs = 0
        self._first = True

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._interval_s, now=True)

    def stopService(self):
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._current is not None:
            self._current.cancel()  # a run waiting for the store ends now

    def _tick(self) -> defer.Deferred:
        self._current = d = self.run()

        def done(_):
            if self._current is d:
                self._current = None

        return d.addBoth(done)

    def run(self) -> defer.Deferred:
        """One run now; the Deferred fires when it is over, and never fails."""
        d = defer.Deferred.fromCoroutine(self._run())

        def failed(f):
            if not f.check(defer.CancelledError):
                self.log.failure("retention run failed", f)

        return d.addErrback(failed)

    async def _run(self) -> None:
        when_available = getattr(self._store, "whenAvailable", None)
        if self._first and when_available is not None and not self._store.available:
            try:
                await when_available()  # at start: Redis may not be up yet
            except StoreUnavailable:
                pass  # the commands below fail and say so
        self._first = False
        privacy = self._privacy()
        now = self._reactor.seconds()
        await self._delete(
            "call record", privacy.calls_retention_days, now, self._store.delete_calls
        )
        await self._delete(
            "access entry", privacy.access_retention_days, now, self._store.trim_access
        )
        self.runs += 1

    async def _delete(self, what: str, days: int, now: float, delete) -> None:
        if days == 0:
            return
        try:
            deleted = await delete(now - days * DAY_S)
        except StoreUnavailable as e:
            self.log.warn(
                "retention: {what}s older than {days} day(s) not deleted, the store is "
                "unavailable ({error}); next run in {interval} s",
                what=what,
                days=days,
                error=str(e),
                interval=self._interval_s,
            )
            return
        if deleted:
            self.log.info(
                "retention: deleted {n} {what}(s) older than {days} day(s)",
                n=deleted,
                what=what,
                days=days,
            )
