"""
The call-end webhook against a real receiver on 127.0.0.1: each record POSTed signed, in
order, retried on a 5xx, not on a 4xx, bounded while the receiver is down; and on the real
server, a whole call's record arrives when the call ends.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest_twisted
from twisted.internet import reactor

from audiosocket.signed import SIGNATURE_HEADER
from audiosocket.webhook import CallWebhook
from tests.httpkit import api  # noqa: F401 (fixture)
from test_service import call, config_for, free_ports, started, stopped, until

SECRET = "events secret"


def verified(seen) -> dict:
    expected = "sha256=" + hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(seen.headers[SIGNATURE_HEADER.lower()], expected)
    return json.loads(seen.body)


def hook(api, **kw):
    webhook = CallWebhook(
        api.url + "/calls", secret=lambda: SECRET, http=api.http, reactor=reactor, **kw
    )
    webhook.startService()
    return webhook


@pytest_twisted.ensureDeferred
async def test_records_are_posted_signed_in_order(api):
    """Two records: two signed POSTs, in the order the calls ended, each with its own id."""
    webhook = hook(api)
    webhook.call_ended({"uuid": "a", "outcome": "authorized"})
    webhook.call_ended({"uuid": "b", "outcome": "denied"})
    await until(webhook.idle, 10)
    first, second = [verified(s) for s in api.seen]
    assert [first["record"]["uuid"], second["record"]["uuid"]] == ["a", "b"]
    assert first["event"] == "call_ended" and first["id"] != second["id"]
    assert webhook.delivered == 2
    webhook.stopService()


@pytest_twisted.ensureDeferred
async def test_5xx_is_retried_with_the_same_body(api):
    """A receiver answering 503: 1 + retries tries of the same bytes, then logged as failed."""
    api.answer(503)
    webhook = hook(api, retries=1)
    webhook.call_ended({"uuid": "a"})
    await until(webhook.idle, 5)
    assert len(api.seen) == 2 and api.seen[0].body == api.seen[1].body
    assert (webhook.delivered, webhook.failed) == (0, 1)
    webhook.stopService()


@pytest_twisted.ensureDeferred
async def test_4xx_is_not_retried(api):
    """A 401 (say, the receiver's secret differs): one try."""
    api.answer(401)
    webhook = hook(api, retries=3)
    webhook.call_ended({"uuid": "a"})
    await until(webhook.idle, 10)
    assert len(api.seen) == 1 and webhook.failed == 1
    webhook.stopService()


def test_waiting_records_are_bounded():
    """While one is being sent, at most max_waiting wait; the oldest goes beyond that."""
    from twisted.internet.defer import Deferred

    class Never:
        def request(self, *args, **kwargs):
            return Deferred()

    webhook = CallWebhook(
        "http://127.0.0.1:9/x", secret=lambda: SECRET, http=Never(), reactor=reactor,
        max_waiting=3,
    )
    webhook.startService()
    for n in range(6):
        webhook.call_ended({"uuid": str(n)})
    # "0" is being sent; "1" and "2" were dropped to make room for "4" and "5".
    assert [r["uuid"] for r in webhook.waiting] == ["3", "4", "5"]
    assert webhook.dropped == 2
    webhook.stopService()
    assert not webhook.waiting


@pytest_twisted.ensureDeferred
async def test_a_real_call_end_reaches_the_webhook(api, redis_server, tmp_path, monkeypatch):
    """
    The real server with [events] url: a visitor calls, types nothing and hangs up; the
    record the store keeps is the one the receiver gets, signed.
    """
    monkeypatch.setenv("EVENTS_SECRET", SECRET)
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret)
    import attrs

    config = attrs.evolve(
        config,
        events=attrs.evolve(config.events, url=api.url + "/calls", secret_env="EVENTS_SECRET"),
    )
    svc = await started(config)
    try:
        report = await call(ai, 1.0).addTimeout(30, reactor)
        await until(lambda: api.seen, 20)
        (stored,) = await svc.store.recent_calls(1)
    finally:
        await stopped(svc)
    (sent,) = [verified(s) for s in api.seen]
    assert sent["record"] == stored
    assert sent["record"]["uuid"] == report.uuid and sent["record"]["outcome"] == "abandoned"
