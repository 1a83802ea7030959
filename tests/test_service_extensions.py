"""
Integration tests for extensions as live services: the real server over its HTTP API, real
TCP on loopback, a real redis-server (shared by two servers, stopped under one), the embedded
redis-server across a restart.
"""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import defer, reactor

from test_service import call, config_for, free_ports, started, stopped


def api_url(svc, path: str) -> str:
    return "http://127.0.0.1:{}{}".format(svc.api_port.getHost().port, path)


async def request(method: str, url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    response = await treq.request(
        method, url, data=data, headers=headers, persistent=False
    ).addTimeout(10, reactor)
    content = await treq.content(response)
    return response.code, (json.loads(content) if content else None)


def extension(id: int, ai: int, ret: int) -> dict:
    return {
        "id": id,
        "ai_extension": str(2000 + id),
        "ai_port": ai,
        "return_extension": str(3000 + id),
        "return_port": ret,
        "host": "127.0.0.1",
        "condominium_id": 1,
    }


def applied(svc, predicate, seconds: float = 10.0) -> defer.Deferred:
    """
    Fires once C{predicate()} holds after a change from another node has been applied on
    C{svc} (at once if it holds already): the event, not a while.
    """
    d = defer.Deferred()

    def check(_change=None):
        if not d.called and predicate():
            d.callback(None)

    svc.control.add_observer(check)
    check()
    return d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
async def test_live_call_untouched_while_another_extension_changes(redis_server, tmp_path):
    """
    A call on extension 1 keeps every frame while extension 2 is added (its ports answer
    before the 201), changed to new ports, and removed (its ports stop answering); and the
    audio clock skipped no run of frames meanwhile (skipped frames are neither sent nor
    received, so only the clock's own counter shows a stall such as a blocked reactor).
    """
    a_ai, a_ret, b_ai, b_ret, c_ai, c_ret = free_ports(6)
    svc = await started(config_for(redis_server.path, tmp_path, a_ai, a_ret))
    try:
        live = call(a_ai, 6.0)
        await svc.registry.when_started().addTimeout(10, reactor)
        skipped = svc.clock.skipped_frames
        code, body = await request("POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret))
        assert code == 201 and body["status"] == "listening"
        probe = await call(b_ai, 1.0)
        assert probe.connected and probe.speech_seconds > 0
        code, body = await request("PUT", api_url(svc, "/api/extensions/2"), extension(2, c_ai, c_ret))
        assert code == 200 and body["bound_ai_port"] == c_ai
        moved = await call(b_ai, 0.5)
        assert not moved.connected
        code, _ = await request("DELETE", api_url(svc, "/api/extensions/2"))
        assert code == 200
        gone = await call(c_ai, 0.5)
        assert not gone.connected
        # A blocked reactor (a synchronous bind, a blocking store call) skips a run of frames;
        # a loaded machine descheduling the process for a moment may skip one or two.
        assert svc.clock.skipped_frames - skipped <= 2
        visitor_leg = next(iter(svc.manager.get(1).ai_factory.connections))
        report = await live.addTimeout(20, reactor)
    finally:
        await stopped(svc)
    assert report.error is None and report.hung_up_by == "client"
    # Nothing the server sent on the live call was lost or held back by the churn (but the
    # frame in flight when the client hung up).
    assert visitor_leg.stats.frames - 1 <= report.frames_received <= visitor_leg.stats.frames


@pytest_twisted.ensureDeferred
async def test_extension_survives_restart_with_embedded_redis(tmp_path):
    """An extension added over the API is there again after a restart (embedded Redis)."""
    a_ai, a_ret, b_ai, b_ret = free_ports(4)
    config = config_for("", tmp_path, a_ai, a_ret, redis={"url": ""})
    svc = await started(config)
    try:
        code, _ = await request("POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret))
        assert code == 201
        code, _ = await request("DELETE", api_url(svc, "/api/extensions/1"))
        assert code == 200
    finally:
        await stopped(svc)
    again = await started(config)
    try:
        code, body = await request("GET", api_url(again, "/api/extensions"))
        report = await call(b_ai, 1.0)
    finally:
        await stopped(again)
    # Extension 1 was deleted: the config's [[extensions]] seed only the first start.
    assert [e["id"] for e in body["extensions"]] == [2]
    assert report.connected and report.speech_seconds > 0


@pytest_twisted.ensureDeferred
async def test_two_servers_sharing_redis_see_each_others_changes(redis_server, tmp_path):
    """
    Two servers on one Redis (here on 127.0.0.1 and 127.0.0.2): an extension added through
    one's API starts listening on the other; deleting it there stops it here.
    """
    ai, ret, b_ai, b_ret = free_ports(4)
    one = await started(config_for(redis_server.path, tmp_path / "a", ai, ret))
    two = await started(
        config_for(redis_server.path, tmp_path / "b", ai, ret, server={"bind": "127.0.0.2"})
    )
    try:
        await two.store.whenSubscribed()
        await one.store.whenSubscribed()
        code, _ = await request("POST", api_url(one, "/api/extensions"), extension(2, b_ai, b_ret))
        assert code == 201
        await applied(two, lambda: 2 in two.manager.extensions)
        report = await call(b_ai, 1.0, host="127.0.0.2")
        assert report.connected and report.speech_seconds > 0
        code, _ = await request("DELETE", api_url(two, "/api/extensions/2"))
        assert code == 200
        await applied(one, lambda: 2 not in one.manager.extensions)
    finally:
        await stopped(two)
        await stopped(one)


@pytest_twisted.ensureDeferred
async def test_redis_down_calls_go_on_reads_answer_writes_fail_fast(redis_server, tmp_path):
    """
    With Redis stopped under a running server: a call still hears its greeting, GETs answer
    from memory, a POST answers 503 (within the store timeout, 2 s); once Redis is back,
    writes work again without a restart.
    """
    ai, ret, b_ai, b_ret = free_ports(4)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        redis_server.stop()
        report = await call(ai, 2.0)
        code, body = await request("GET", api_url(svc, "/api/extensions"))
        assert code == 200 and [e["id"] for e in body["extensions"]] == [1]
        code, body = await request("POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret))
        assert code == 503 and body["error"] == "store_unavailable"
        assert 2 not in svc.manager.extensions
        redis_server.start()
        await svc.store.whenAvailable().addTimeout(15, reactor)
        code, body = await request("POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret))
        assert code == 201
        # The record of the call made during the outage was kept and written once Redis came back.
        await svc.records.when_saved().addTimeout(15, reactor)
        uuids = [c["uuid"] for c in await svc.store.recent_calls(5)]
    finally:
        await stopped(svc)
    assert report.speech_seconds > 0
    assert report.uuid in uuids
