# -*- test-case-name: tests.test_gate,tests.test_webhook -*-
"""
Signed JSON requests to a receiver the operator configured (a gate relay, the call-end
webhook): one rule for how the server proves a request is its own and how it retries.

The body is compact JSON; C{X-Audiosocket-Signature: sha256=<hex>} is the HMAC-SHA256 of its
exact bytes under a shared secret. The receiver recomputes it over the bytes it received and
compares in constant time::

    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(request.headers["X-Audiosocket-Signature"], expected)

A 2xx answer is delivered. A 4xx is the receiver refusing: not tried again. A 5xx, a
connection error or no answer within C{timeout_s} is tried again, C{retries} more times, the
same bytes each time (a receiver dedupes on the body's C{id}), after C{delay_s(n)} seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Callable

from attrs import frozen
from twisted.internet import defer, task
from twisted.python.failure import Failure

SIGNATURE_HEADER = "X-Audiosocket-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for C{body}: C{sha256=<hex>}."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(payload: dict) -> bytes:
    """The body as sent (and signed): compact JSON, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@frozen
class Delivery:
    """How a signed request ended: C{ok}, the last C{error}, and the tries made."""

    ok: bool
    error: str | None
    attempts: int


def _timed_out(result, timeout):
    # Cancelled, treq fails with ResponseNeverReceived: whatever it failed with, a try cut by
    # the timeout is a timeout.
    return Failure(defer.TimeoutError("no answer within {} s".format(timeout)))


async def post_signed(
    http,
    url: str,
    body: bytes,
    *,
    secret: str,
    reactor,
    timeout_s: float,
    retries: int,
    delay_s: Callable[[int], float],
    method: str = "POST",
) -> Delivery:
    """
    Send C{body} (from L{encode}) signed with C{secret}; never raises but for cancellation.

    @param delay_s: seconds to wait before try C{n} (2, 3, ...).
    """
    headers = {"Content-Type": ["application/json"], SIGNATURE_HEADER: [sign(secret, body)]}
    error = None
    tries = 1 + retries
    for attempt in range(1, tries + 1):
        if attempt > 1:
            await task.deferLater(reactor, delay_s(attempt), lambda: None)
        d = defer.Deferred.fromCoroutine(_send(http, method, url, body, headers))
        d.addTimeout(timeout_s, reactor, onTimeoutCancel=_timed_out)
        try:
            code = await d
        except defer.CancelledError:
            raise
        except defer.TimeoutError:
            error = "no answer within {} s".format(timeout_s)
            continue
        except Exception as e:
            error = str(e) or type(e).__name__
            continue
        if 200 <= code < 300:
            return Delivery(True, None, attempt)
        error = "answered {}".format(code)
        if 400 <= code < 500:
            return Delivery(False, error + " (refused, not retried)", attempt)
    return Delivery(False, error, tries)


async def _send(http, method: str, url: str, body: bytes, headers: dict) -> int:
    response = await http.request(method, url, data=body, headers=headers)
    await response.content()  # read it whole, so the connection is released
    return response.code
