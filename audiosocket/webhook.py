# -*- test-case-name: tests.test_webhook -*-
"""
The call-end webhook (C{[events] url}): when a call ends, its record — the same JSON that
C{GET /api/calls} serves — is POSTed to the integrator's receiver as
C{{"event": "call_ended", "id": "<hex>", "ts": <Unix seconds>, "record": {...}}}, signed with
C{X-Audiosocket-Signature} (HMAC-SHA256 of the body under the secret in C{secret_env}; see
L{audiosocket.signed}). C{id} is the same on every try: a receiver dedupes on it.

Delivery never holds a call up and never fails one: records are sent one at a time, in the
order the calls ended, each tried C{1 + retries} times (1, 2, 4 ... s apart, C{timeout_s}
each); a 4xx is the receiver refusing and is not retried. Records wait in memory while one
is being sent, at most L{MAX_WAITING} (the oldest is dropped, with an error in the log,
beyond that). What could not be delivered is logged with the call's UUID; the call record
itself is safe in the store whatever happens here. At shutdown, what is still waiting is
logged and dropped.
"""

from __future__ import annotations

import collections
import uuid as _uuid
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from audiosocket.reactors import default_reactor
from audiosocket.signed import encode, post_signed

#: Records waiting to be sent at most (a receiver down for long must not grow memory).
MAX_WAITING = 1000


class CallWebhook(Service):
    """Sends each finished call's record to C{url} (see the module docstring)."""

    log = Logger()
    name = "call-webhook"

    def __init__(
        self,
        url: str,
        *,
        secret: Callable[[], str | None],
        http,
        reactor=None,
        timeout_s: float = 5.0,
        retries: int = 3,
        max_waiting: int = MAX_WAITING,
    ):
        self.url = url
        self._secret = secret
        self._http = http
        self._reactor = default_reactor(reactor)
        self._timeout_s = timeout_s
        self._retries = retries
        self.waiting: collections.deque = collections.deque()
        self._max_waiting = max_waiting
        self._sending: defer.Deferred | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def call_ended(self, record: dict) -> None:
        """Queue C{record} for sending; returns at once, never raises."""
        if not self.running:
            return
        if len(self.waiting) >= self._max_waiting:
            old = self.waiting.popleft()
            self.dropped += 1
            self.log.error(
                "call-end webhook: {n} records waiting; dropped the oldest (call {uuid})",
                n=len(self.waiting) + 1,
                uuid=old.get("uuid"),
            )
        self.waiting.append(record)
        if self._sending is None:
            self._sending = defer.Deferred.fromCoroutine(self._send_waiting())

    def idle(self) -> bool:
        """Nothing waiting nor being sent."""
        return self._sending is None and not self.waiting

    async def _send_waiting(self) -> None:
        try:
            while self.waiting and self.running:
                record = self.waiting.popleft()
                await self._send(record)
        finally:
            self._sending = None

    async def _send(self, record: dict) -> None:
        secret = self._secret()
        if not secret:
            self.failed += 1
            self.log.error(
                "call-end webhook: the secret is not set; record of call {uuid} not sent",
                uuid=record.get("uuid"),
            )
            return
        body = encode(
            {
                "event": "call_ended",
                "id": _uuid.uuid4().hex,
                "ts": round(self._reactor.seconds(), 3),
                "record": record,
            }
        )
        delivery = await post_signed(
            self._http,
            self.url,
            body,
            secret=secret,
            reactor=self._reactor,
            timeout_s=self._timeout_s,
            retries=self._retries,
            delay_s=lambda n: 2.0 ** (n - 2),
        )
        if delivery.ok:
            self.delivered += 1
            return
        self.failed += 1
        self.log.warn(
            "call-end webhook: record of call {uuid} not delivered after {attempts} "
            "tries: {error}",
            uuid=record.get("uuid"),
            attempts=delivery.attempts,
            error=delivery.error,
        )

    def stopService(self):
        super().stopService()
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.addErrback(lambda f: f.trap(defer.CancelledError))
            sending.cancel()
        if self.waiting:
            self.log.warn(
                "call-end webhook: {n} record(s) not sent before shutdown (they are in the "
                "store)",
                n=len(self.waiting),
            )
            self.waiting.clear()
