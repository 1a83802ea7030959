"""
Stopping the real service (L{makeService} on 127.0.0.1, a real redis-server) while a call is
in progress: the call is ended and its record written before the store stops.
"""

from __future__ import annotations

import uuid

import pytest_twisted
from twisted.internet import defer, reactor, task

from audiosocket.callclient import CallOptions, place_call
from audiosocket.service import DoormanService
from audiosocket.store import RedisStore

from test_service import config_for, free_ports, started


async def until(predicate, seconds=20.0):
    """Poll the reactor until C{predicate()} is true; fail after C{seconds}."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in {} s".format(seconds)
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_call_saves_its_record(redis_server, tmp_path):
    """
    A visitor is on the line when the service is stopped: the call ends (the visitor gets
    the hangup) and, once C{stopService} has fired, its record is in Redis, as read by a
    fresh store; nothing is left waiting for a retry.
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    # The call ends with the greeting's rest and the goodbye (about 9 s here): on a loaded
    # machine that can pass the 10 s a stop gives calls, and the call would be cut — what
    # this test checks is the ending and the record, not that bound.
    svc.SHUTDOWN_CALLS_S = 30.0
    call_uuid = str(uuid.uuid4())
    call = defer.Deferred.fromCoroutine(
        place_call(
            CallOptions(host="127.0.0.1", port=ai, uuid=call_uuid, hangup_after=60), reactor
        )
    )
    def on_the_line() -> bool:
        # Past the connect: the server is talking to the visitor (the greeting plays).
        sessions = svc.registry.describe_all()
        legs = sessions[0].get("legs") or {} if sessions else {}
        return bool(legs.get("visitor")) and legs["visitor"]["frames_out"] >= 10

    try:
        await until(on_the_line)
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(30, reactor)
    report = await call.addTimeout(30, reactor)
    assert report.hung_up_by == "server"
    assert not svc.records.unsaved

    fresh = RedisStore(redis_server.path, timeout_s=2.0, reconnect_max_s=0.2)
    fresh.startService()
    try:
        await fresh.whenSubscribed().addTimeout(10, reactor)
        records = await fresh.recent_calls(10)
    finally:
        await fresh.stopService()
        await task.deferLater(reactor, 0.05, lambda: None)
    assert [r["uuid"] for r in records] == [call_uuid]
    assert records[0]["ended_by"] == "shutdown"


class _Registry:
    """A registry whose calls take C{ending} to end."""

    def __init__(self, ending):
        self.ending = ending

    def hangup_all(self):
        return self.ending


@pytest_twisted.ensureDeferred
async def test_calls_not_ending_in_time_are_a_timeout_not_an_error(tmp_path):
    """
    Calls still not ended after the grace period make C{_end_calls} answer C{False} (the
    connections are cut next), whatever Deferred the registry gathered them in: the timeout
    cancels only the wait, so the calls' own Deferreds are left alone and the stop goes on.
    """
    clock = task.Clock()
    config = config_for("/nonexistent/redis.sock", tmp_path, 8101, 8102)
    svc = DoormanService(config, {}, reactor=clock, node_id="n")
    calls = [defer.Deferred(), defer.Deferred()]
    svc.registry = _Registry(defer.gatherResults(calls, consumeErrors=True))
    result = defer.Deferred.fromCoroutine(svc._end_calls(10.0))
    clock.advance(10.0)
    assert result.result is False
    assert not any(d.called for d in calls)
    for d in calls:
        d.callback(None)  # the calls end later: nothing fails
