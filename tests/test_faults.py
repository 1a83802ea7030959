"""
Faults around a running server, each on the real parts: the real service from
L{makeService} on 127.0.0.1 with a real redis-server, real TCP, real espeak-ng, real local
HTTP servers for the webhook dialer and the speech provider (L{httpkit}). Each test breaks one
thing while calls are in progress and checks that the calls keep their audio, that nothing is
lost, and that the server recovers on its own.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.web import server

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from audiosocket.callclient import CallOptions
from audiosocket.speech.stt import STTError, WhisperSTT
from audiosocket.fakepbx import Webhook
from test_service import (
    PRESSES_1,
    call,
    config_for,
    free_ports,
    spoken_wav,
    started,
    stopped,
    until,
    webhook_dialer,
    whisper_speech,
)
from test_service_extensions import api_url, extension, request


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


# -- the disk full under the embedded redis-server ----------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a disk that fills up), mounted for the test; skipped where mount is denied."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + mounted.stderr.strip())
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(directory) -> str:
    """Write zeros into C{directory} until the disk is full; the filler's path."""
    path = os.path.join(str(directory), "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return path


@pytest_twisted.ensureDeferred
async def test_disk_full_under_embedded_redis(small_disk, tmp_path):
    """
    The embedded Redis's disk fills up: Redis refuses writes it cannot persist (MISCONF), so an
    API write answers 503 store_unavailable (not a 500), a call in progress goes on and ends
    normally, its record waits in memory; once space is freed Redis writes again, the API
    accepts the change and the record lands — nothing lost, nothing restarted.
    """
    ai, ret = free_ports(2)
    config = config_for("", tmp_path, ai, ret, redis={"url": ""})
    config = attrs.evolve(config, server=attrs.evolve(config.server, state_dir=small_disk / "var"))
    svc = await started(config)
    filler = None
    try:
        filler = fill(small_disk)
        refused = None
        for n in range(2, 40):  # Redis takes writes into memory until its AOF write fails
            code, body = await request(
                "POST", api_url(svc, "/api/extensions"), extension(n, *free_ports(2))
            )
            if code != 201:
                refused = (code, body["error"])
                break
            await deferLater(reactor, 0.2, lambda: None)
        assert refused == (503, "store_unavailable")
        report = await call(ai, 2.5).addTimeout(30, reactor)
        assert report.hung_up_by == "client" and report.speech_seconds > 0 and report.error is None
        await until(lambda: len(svc.records.unsaved) == 1, what="the record kept for retry")
        os.remove(filler)
        filler = None
        for _ in range(200):
            code, body = await request(
                "POST", api_url(svc, "/api/extensions"), extension(99, *free_ports(2))
            )
            if code == 201:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert code == 201, body
        await until(lambda: not svc.records.unsaved, 30, "the record saved")
        saved = {c["uuid"] for c in await svc.store.recent_calls(10)}
        assert report.uuid in saved
    finally:
        if filler is not None:
            os.remove(filler)
        await stopped(svc)


# -- the AMI connection lost while a resident's phone rings (unit; the real PBX: tests/pbx) ----


def test_ami_cancel_while_disconnected_hangs_up_once_reconnected():
    """
    The AMI connection drops while the resident's phone rings and the flow cancels the dial:
    Asterisk keeps ringing a call it originated, so once the dialer has logged in again it
    sends the C{Hangup} for that channel (the phone stops ringing), once.
    """
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    from test_dialer import LEG_UUID, answer, logged_in, originated_on_clock, written_actions

    clock, dialer, protocol, transport, originate = originated_on_clock()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert dialer.cancel(LEG_UUID).called
    protocol2, transport2 = logged_in(dialer)
    [hangup] = written_actions(transport2)
    assert (hangup["Action"], hangup["Channel"]) == ("Hangup", originate["ChannelId"])
    answer(protocol2, Response="Success", ActionID=hangup["ActionID"], Message="Channel Hungup")
    transport2.clear()
    dialer.cancel(LEG_UUID)
    logged_in(dialer)
    assert transport2.value() == b""


def test_ami_hangup_lost_with_the_connection_is_sent_again():
    """
    The connection drops after a C{Hangup} was sent but before Asterisk answered it: the
    next login sends it again.
    """
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionLost

    from test_dialer import LEG_UUID, answer, logged_in, originated_on_clock, written_actions

    clock, dialer, protocol, transport, originate = originated_on_clock()
    answer(protocol, Event="Newchannel", Uniqueid=originate["ChannelId"])
    dialer.cancel(LEG_UUID)
    [hangup] = written_actions(transport)
    protocol.connectionLost(Failure(ConnectionLost()))
    protocol2, transport2 = logged_in(dialer)
    [again] = written_actions(transport2)
    assert (again["Action"], again["Channel"]) == ("Hangup", originate["ChannelId"])


# -- a speech provider that hangs, resets the connection or answers garbage ------------------


class BrokenProvider(protocol.Protocol):
    """
    A speech provider's endpoint gone wrong, on real TCP: on the request's first bytes it
    C{hang}s (reads on, never answers), C{reset}s the connection (RST) or answers
    C{garbage} (bytes that are not HTTP) and closes.
    """

    def connectionMade(self):
        self.factory.open.add(self)
        self.seen = False

    def dataReceived(self, data):
        if self.seen:
            return
        self.seen = True
        self.factory.requests += 1
        if self.factory.mode == "reset":
            self.transport.abortConnection()
        elif self.factory.mode == "garbage":
            self.transport.write(b"\x00\xffnot http at all\r\n\r\n{{{")
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        if not self.factory.open:
            waiters, self.factory.idle = self.factory.idle, []
            for d in waiters:
                d.callback(None)


class BrokenProviderFactory(protocol.Factory):
    protocol = BrokenProvider

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self.open: set = set()
        self.idle: list = []

    def when_idle(self):
        if not self.open:
            return defer.succeed(None)
        d = defer.Deferred()
        self.idle.append(d)
        return d


@pytest.mark.parametrize("mode", ["reset", "garbage"])
@pytest_twisted.ensureDeferred
async def test_stt_provider_reset_or_garbage_is_a_recognition_failure(mode):
    """
    The whisper-compatible provider resets the connection or answers bytes that are not HTTP:
    transcribe() fails at once with STTError (what turns a call to the keypad, as the "hang"
    call below shows end to end), and no connection is left open.
    """
    provider = BrokenProviderFactory(mode)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(provider)
    pool = HTTPConnectionPool(reactor, persistent=False)
    stt = WhisperSTT(
        "http://127.0.0.1:{}/v1".format(port.getHost().port),
        model="whisper-1",
        api_key=None,
        timeout_s=5.0,
        http=HTTPClient(Agent(reactor, pool=pool)),
        reactor=reactor,
    )
    try:
        with pytest.raises(STTError):
            await stt.transcribe(b"\x01\x00" * 8000, 8000).addTimeout(10, reactor)
        assert provider.requests == 1
        await provider.when_idle().addTimeout(10, reactor)
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()
        # The client reads the server's close a reactor turn or two later.
        for _ in range(100):
            if not [r for r in reactor.getReaders() + reactor.getWriters() if isinstance(r, tcp.Client)]:
                break
            await deferLater(reactor, 0.01, lambda: None)


@pytest.mark.parametrize("mode", ["hang"])
@pytest_twisted.ensureDeferred
async def test_stt_provider_broken_call_goes_on_by_keypad(redis_server, tmp_path, mode):
    """
    The whisper-compatible provider hangs (timeout_s 1 s) when the visitor speaks: the call
    turns to the keypad, the visitor types 101#, the resident presses 1 and the call ends
    authorized by dtmf:1 — nothing waits on the provider, whose connection is closed by the
    client (no request left hanging). (A reset or garbage answer fails the same way, sooner:
    the test above.)
    """
    provider = BrokenProviderFactory(mode)
    stt_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(provider)
    phone = Webhook(reactor, dtmf=PRESSES_1, seconds=40, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(phone))
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path,
        tmp_path,
        ai,
        ret,
        dialer=webhook_dialer(web.getHost().port),
        speech=whisper_speech(stt_port.getHost().port, timeout_s=1.0),
    )
    sentence = "Oi, sou o Pedro, vim visitar a Ana"
    svc = await started(config)
    try:
        visitor = await call(
            ai, 60, wav=spoken_wav(tmp_path / "visitor.wav", sentence), wav_at=3.0,
            dtmf=[(16.0, "101#")],
        ).addTimeout(70, reactor)
        (resident,) = await defer.gatherResults(phone.calls).addTimeout(30, reactor)
        (record,) = await svc.store.recent_calls(1)
        await provider.when_idle().addTimeout(10, reactor)
    finally:
        await stopped(svc)
        await stt_port.stopListening()
        await web.stopListening()
    assert provider.requests >= 1
    assert record["outcome"] == "authorized", record
    assert record["facts"]["apartment"] == "101"
    assert record["decision_input"] == "dtmf:1"
    assert visitor.hung_up_by == "server" and resident.hung_up_by == "server"
    assert visitor.frames_owed <= 1


# -- the webhook (http dialer) down or slow --------------------------------------------------


@pytest.mark.parametrize("mode, reason", [("down", "unreachable"), ("hang", "timeout")])
@pytest_twisted.ensureDeferred
async def test_webhook_down_or_slow_each_attempt_fails_within_its_timeout(
    redis_server, tmp_path, mode, reason
):
    """
    The http dialer's webhook refuses connections (down) or never answers (hang; [dialer]
    timeout_s 1 s) while the ring timeout is 30 s: each of the two attempts fails on its own
    (unreachable / timeout) without waiting for the ring, the visitor hears the no-answer
    prompt and the hangup, and the record reads no_answer with both failures.
    """
    webhook = BrokenProviderFactory("hang")
    if mode == "down":
        (port,) = free_ports(1)
        listening = None
    else:
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(webhook)
        port = listening.getHost().port
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path,
        tmp_path,
        ai,
        ret,
        dialer={"kind": "http", "url": "http://127.0.0.1:{}/dial".format(port), "timeout_s": 1.0},
        flow={"ring_timeout_s": 30, "attempts": 2},
    )
    svc = await started(config)
    try:
        visitor = await call(ai, 120, dtmf=[(1.0, "101#")]).addTimeout(100, reactor)
        (record,) = await svc.store.recent_calls(1)
        await webhook.when_idle().addTimeout(10, reactor)
    finally:
        await stopped(svc)
        if listening is not None:
            await listening.stopListening()
    assert record["outcome"] == "no_answer"
    assert record["dial_failures"] == [
        {"attempt": 1, "reason": reason},
        {"attempt": 2, "reason": reason},
    ]
    assert visitor.hung_up_by == "server" and visitor.speech_seconds > 0
    # Far less than one ring timeout: no attempt waited for the ring.
    assert visitor.duration < 30
    if mode == "hang":
        assert webhook.requests >= 2


# -- SIGTERM with many calls in progress, on the real twistd process ---------------------------


def _loud_after(report, t: float) -> bool:
    """Did the call hear speech in audio frames that arrived C{t} seconds after it connected?"""
    import numpy as np

    pcm = np.frombuffer(report.received_pcm, dtype="<i2")
    per_frame = len(pcm) // max(1, len(report.arrivals_s))
    for i, at in enumerate(report.arrivals_s):
        if at > t and np.abs(pcm[i * per_frame:(i + 1) * per_frame].astype(np.int32)).max(initial=0) > 1000:
            return True
    return False


#: Calls in progress when the server gets SIGTERM.
SIGTERM_CALLS = 50


@pytest_twisted.ensureDeferred
async def test_sigterm_with_fifty_calls_each_hears_goodbye(tmp_path):
    """
    The real C{twistd audiosocket} process with 50 calls in progress (each past its greeting,
    waiting for the apartment) gets SIGTERM: every call hears speech after the signal (the
    goodbye) and then the hangup frame, every record is saved, and the process exits by
    itself without cutting any call ("still open at shutdown" never logged).
    """
    import treq

    from audiosocket.callclient import place_calls
    from test_daemon import start_twistd, wait_for_text, write_config

    path, api = write_config(tmp_path, "Bom dia.")
    ai = int(path.read_text().split("ai_port = ")[1].split()[0])
    log = tmp_path / "out.log"
    process = start_twistd(tmp_path, path, log)

    async def sessions():
        response = await treq.get(
            "http://127.0.0.1:{}/api/sessions".format(api), persistent=False
        ).addTimeout(10, reactor)
        return (await response.json())["sessions"]

    try:
        wait_for_text(log, "ready:")
        started_at = reactor.seconds()
        calls = defer.Deferred.fromCoroutine(
            place_calls(
                [CallOptions(host="127.0.0.1", port=ai, hangup_after=120) for _ in range(SIGTERM_CALLS)],
                reactor=reactor,
            )
        )
        for _ in range(600):
            live = await sessions()
            if len(live) == SIGTERM_CALLS and all(s["state"] == "collecting" for s in live):
                break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            raise AssertionError("{} calls past their greeting not reached: {}".format(SIGTERM_CALLS, live))
        uuids = {s["uuid"] for s in live}
        signalled = reactor.seconds() - started_at
        process.send_signal(signal.SIGTERM)
        reports = await calls.addTimeout(60, reactor)
        for _ in range(600):
            if process.poll() is not None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        code = process.wait(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == -signal.SIGTERM
    assert {r.uuid for r in reports} == uuids
    assert [r.hung_up_by for r in reports] == ["server"] * SIGTERM_CALLS
    assert all(_loud_after(r, signalled) for r in reports)
    content = log.read_text()
    assert "still open at shutdown" not in content
    assert "could not be saved" not in content
    assert "Traceback" not in content
    # Every record is in the embedded Redis the process left behind.
    from audiosocket.redisproc import EmbeddedRedis
    from audiosocket.store import RedisStore

    redis = EmbeddedRedis(str(tmp_path / "var"))
    redis.startService()
    store = None
    try:
        await redis.whenReady().addTimeout(20, reactor)
        store = RedisStore(redis.address, timeout_s=2.0, reconnect_max_s=0.2)
        store.startService()
        await store.whenSubscribed().addTimeout(10, reactor)
        records = await store.recent_calls(2 * SIGTERM_CALLS)
    finally:
        if store is not None:
            await store.stopService()
        await redis.stopService()
        await deferLater(reactor, 0.05, lambda: None)
    assert {r["uuid"] for r in records} == uuids
    assert {r["ended_by"] for r in records} == {"shutdown"}


# -- leak accounting ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_process_figures_come_back_after_calls(redis_server, tmp_path):
    """
    GET /api/status's "process" section: after three two-leg calls (the webhook connects the
    resident, who presses 1) are over and their records written, the reactor holds as many
    timers as before them, no leg route, nothing settling or unsaved, and as many open file
    descriptors as before.
    """
    from test_service_extensions import api_url, request

    phone = Webhook(reactor, dtmf=PRESSES_1, seconds=40, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(phone))
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path, tmp_path, ai, ret,
        dialer=webhook_dialer(web.getHost().port),
    )
    svc = await started(config)
    try:
        code, before = await request("GET", api_url(svc, "/api/status"))
        assert code == 200
        reports = await defer.gatherResults(
            [call(ai, 60, dtmf=[(1.0, "101#")]) for _ in range(3)]
        ).addTimeout(90, reactor)
        await defer.gatherResults(phone.calls).addTimeout(30, reactor)
        await until(lambda: len(svc.registry) == 0 and not svc.registry._settling)
        # Let the closed connections finish closing.
        await deferLater(reactor, 0.2, lambda: None)
        code, after = await request("GET", api_url(svc, "/api/status"))
    finally:
        await stopped(svc)
        await web.stopListening()
    assert [r.hung_up_by for r in reports] == ["server"] * 3
    assert after["sessions"]["finished"] == 3
    b, a = before["process"], after["process"]
    assert (a["leg_routes"], a["settling"], a["records_unsaved"]) == (0, 0, 0)
    assert a["delayed_calls"] == b["delayed_calls"], (b, a)
    assert a["open_fds"] == b["open_fds"], (b, a)
    assert a["rss_kb"] > 0
