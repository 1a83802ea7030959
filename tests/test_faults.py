"""
Faults around a running server, each on the real parts: the real service from
L{makeService} on 127.0.0.1 with a real redis-server, real TCP, real espeak-ng, real local
HTTP servers for the webhook dialer and the speech provider (L{httpkit}). Each test breaks one
thing while calls are in progress and checks that the calls keep their audio, that nothing is
lost, and that the server recovers on its own.
"""

from __future__ import annotations

import os
import signal

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from audiosocket.callclient import CallOptions, place_call
from test_service import config_for, free_ports, started, stopped
from test_service_extensions import api_url, extension, request


async def until(predicate, seconds: float = 20.0, what: str = "condition"):
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("{} not reached in {} s".format(what, seconds))


def call(port: int, seconds: float, **options):
    return defer.Deferred.fromCoroutine(
        place_call(CallOptions(host="127.0.0.1", port=port, hangup_after=seconds, **options), reactor)
    )


def redis_pid(svc) -> int | None:
    process = svc.embedded_redis.monitor.protocols.get("redis")
    return None if process is None or process.transport is None else process.transport.pid


# -- the embedded redis-server killed -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_embedded_redis_killed_during_calls(tmp_path):
    """
    The embedded redis-server is SIGKILLed while three calls are in progress: the calls go on
    hearing speech and end normally, an API write answers 503 while Redis is down, and once the
    ProcessMonitor has started redis-server again (held back 6 s here to make the outage
    visible; by itself it restarts at once) writes succeed again and the records of the calls that ended during the
    outage are in Redis — nothing lost, no restart of the server.
    """
    ai, ret, b_ai, b_ret = free_ports(4)
    svc = await started(config_for("", tmp_path, ai, ret, redis={"url": ""}))
    try:
        # ProcessMonitor restarts a long-lived process at once; make this death count as
        # "too fast" so the restart waits 6 s, long enough to see the outage.
        monitor = svc.embedded_redis.monitor
        monitor.threshold, monitor.delay["redis"] = 3600, 6.0
        calls = [call(ai, 2.5) for _ in range(3)]
        await until(lambda: svc.registry.active() == 3, what="three calls")
        pid = redis_pid(svc)
        os.kill(pid, signal.SIGKILL)
        await until(lambda: redis_pid(svc) is None, what="redis-server gone")
        code, body = await request(
            "POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret)
        )
        assert (code, body["error"]) == (503, "store_unavailable")
        reports = await defer.gatherResults(calls).addTimeout(30, reactor)
        assert [r.hung_up_by for r in reports] == ["client"] * 3
        assert all(r.speech_seconds > 0 and r.error is None for r in reports)
        # Every frame the server owed while Redis was gone was sent (give or take the phase of
        # its clock).
        assert all(r.frames_owed <= 1 for r in reports)
        # Their records could not be written: they wait in memory for Redis.
        await until(lambda: len(svc.records.unsaved) == 3, what="records kept for retry")
        assert redis_pid(svc) is None
        await until(lambda: redis_pid(svc) not in (None, pid), what="redis-server restarted")
        for _ in range(200):
            code, body = await request(
                "POST", api_url(svc, "/api/extensions"), extension(2, b_ai, b_ret)
            )
            if code == 201:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert code == 201
        await until(lambda: not svc.records.unsaved, 30, "records saved")
        saved = {c["uuid"] for c in await svc.store.recent_calls(10)}
        assert {r.uuid for r in reports} <= saved
    finally:
        await stopped(svc)


# -- the AMI connection lost while a resident's phone rings (unit; the real PBX: tests/pbx) ----


def _login_again(dialer):
    """A new AMI connection for C{dialer}, logged in; returns its protocol and transport."""
    from twisted.internet.testing import StringTransport

    from test_dialer import action_ids

    protocol = dialer.factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"Asterisk Call Manager/5.0.4\r\n")
    [login_id] = action_ids(transport)
    transport.clear()
    protocol.dataReceived(b"Response: Success\r\nActionID: " + login_id + b"\r\n\r\n")
    return protocol, transport


def test_ami_cancel_while_disconnected_hangs_up_once_reconnected():
    """
    The AMI connection drops while the resident's phone rings and the flow cancels the dial:
    Asterisk keeps ringing a call it originated, so once the dialer has logged in again it
    sends the C{Hangup} for that channel (the phone stops ringing), once.
    """
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    from test_dialer import LEG_UUID, answer, originated_on_clock, written_actions

    clock, dialer, protocol, transport, originate = originated_on_clock()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert dialer.cancel(LEG_UUID).called
    protocol2, transport2 = _login_again(dialer)
    [hangup] = written_actions(transport2)
    assert (hangup["Action"], hangup["Channel"]) == ("Hangup", originate["ChannelId"])
    answer(protocol2, Response="Success", ActionID=hangup["ActionID"], Message="Channel Hungup")
    transport2.clear()
    dialer.cancel(LEG_UUID)
    _login_again(dialer)
    assert transport2.value() == b""


def test_ami_hangup_lost_with_the_connection_is_sent_again():
    """
    The connection drops after a C{Hangup} was sent but before Asterisk answered it: the
    next login sends it again.
    """
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionLost

    from test_dialer import LEG_UUID, answer, originated_on_clock, written_actions

    clock, dialer, protocol, transport, originate = originated_on_clock()
    answer(protocol, Event="Newchannel", Uniqueid=originate["ChannelId"])
    dialer.cancel(LEG_UUID)
    [hangup] = written_actions(transport)
    protocol.connectionLost(Failure(ConnectionLost()))
    protocol2, transport2 = _login_again(dialer)
    [again] = written_actions(transport2)
    assert (again["Action"], again["Channel"]) == ("Hangup", originate["ChannelId"])
