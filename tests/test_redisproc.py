"""
Tests for L{audiosocket.redisproc.EmbeddedRedis}: a real redis-server under ProcessMonitor.
"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.runner.procmon import ProcessMonitor

from audiosocket.model import Extension
from audiosocket.redisproc import EmbeddedRedis, RedisStartError
from audiosocket.store import RedisStore

TIMEOUT = 10


def ext(id=10) -> Extension:
    return Extension(
        id=id,
        ai_extension="1001",
        ai_port=8101,
        return_extension="1002",
        return_port=8201,
        host="127.0.0.1",
        condominium_id=1,
    )


async def wait(d, seconds=TIMEOUT):
    return await d.addTimeout(seconds, reactor)


def child_pid(redis: EmbeddedRedis) -> int:
    return redis.monitor.protocols["redis"].transport.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until(predicate, seconds=TIMEOUT):
    deadline = reactor.seconds() + seconds
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in {}s".format(seconds)
        await task.deferLater(reactor, 0.02, lambda: None)


async def store_on(redis: EmbeddedRedis) -> RedisStore:
    store = RedisStore(redis.address, timeout_s=2.0, reconnect_max_s=0.2)
    store.startService()
    await wait(store.whenSubscribed())
    return store


@pytest_twisted.async_yield_fixture
async def embedded(tmp_path):
    redis = EmbeddedRedis(str(tmp_path / "state"))
    redis.startService()
    await wait(redis.whenReady())
    yield redis
    await wait(redis.stopService())


@pytest_twisted.ensureDeferred
async def test_runs_under_process_monitor(embedded, tmp_path):
    """The child runs under a ProcessMonitor, its log and data are in state_dir/redis."""
    assert isinstance(embedded.monitor, ProcessMonitor)
    assert alive(child_pid(embedded))
    assert os.path.exists(tmp_path / "state" / "redis" / "redis.log")
    assert embedded.directory == str(tmp_path / "state" / "redis")


def test_config_unix_socket_no_tcp(tmp_path):
    """The generated config turns TCP off and listens on the unix socket, append-only."""
    config = EmbeddedRedis(str(tmp_path))._config().splitlines()
    assert "port 0" in config
    assert "appendonly yes" in config
    assert any(line.startswith("unixsocket /") for line in config)


def test_long_state_dir_gets_short_socket(tmp_path):
    """A state_dir too deep for sun_path gets a short socket path elsewhere."""
    deep = tmp_path / ("d" * 120)
    redis = EmbeddedRedis(str(deep))
    assert redis.socket_path is not None
    assert len(redis.socket_path.encode()) <= 100
    assert redis.address == redis.socket_path


def test_config_caps_memory_without_eviction(tmp_path):
    """maxmemory comes from maxmemory_mb, and a full Redis refuses writes (noeviction)."""
    config = EmbeddedRedis(str(tmp_path), maxmemory_mb=64)._config().splitlines()
    assert "maxmemory 64mb" in config
    assert "maxmemory-policy noeviction" in config


def config_get(redis: EmbeddedRedis, name: str) -> str:
    import redis as redis_py

    client = redis_py.Redis(unix_socket_path=redis.socket_path, socket_timeout=5)
    try:
        return client.config_get(name)[name]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_running_server_has_maxmemory(embedded):
    """The real redis-server answers CONFIG GET with the cap (256 MiB by default) and policy."""
    assert await wait(threads.deferToThread(config_get, embedded, "maxmemory")) == str(
        256 * 1024 * 1024
    )
    policy = await wait(threads.deferToThread(config_get, embedded, "maxmemory-policy"))
    assert policy == "noeviction"


@pytest_twisted.ensureDeferred
async def test_full_redis_refuses_writes_and_keeps_extensions(tmp_path):
    """
    Filled up, the embedded Redis answers writes with an error (the store's caller sees it)
    and evicts nothing: an extension saved before is still there.
    """
    redis = EmbeddedRedis(str(tmp_path / "state"), maxmemory_mb=3)
    redis.startService()
    try:
        await wait(redis.whenReady())
        store = await store_on(redis)
        try:
            await wait(store.save_extension(ext()))
            with pytest.raises(Exception, match="OOM"):
                for i in range(100):
                    await wait(store.set_blob("fill:{}".format(i), b"x" * 100_000, 3600))
            assert await wait(store.load_extensions()) == [ext()]
        finally:
            await wait(store.stopService())
    finally:
        await wait(redis.stopService())


@pytest_twisted.ensureDeferred
async def test_store_works_on_address(embedded):
    """A RedisStore on the embedded server's address round-trips an extension."""
    store = await store_on(embedded)
    try:
        await wait(store.save_extension(ext()))
        assert await wait(store.load_extensions()) == [ext()]
    finally:
        await wait(store.stopService())


@pytest_twisted.ensureDeferred
async def test_data_survives_restart(tmp_path):
    """Data written before stopService is there after a new EmbeddedRedis on the same state_dir."""
    first = EmbeddedRedis(str(tmp_path / "state"))
    first.startService()
    await wait(first.whenReady())
    store = await store_on(first)
    await wait(store.save_extension(ext()))
    await wait(store.stopService())
    await wait(first.stopService())

    second = EmbeddedRedis(str(tmp_path / "state"))
    second.startService()
    try:
        await wait(second.whenReady())
        store = await store_on(second)
        try:
            assert await wait(store.load_extensions()) == [ext()]
        finally:
            await wait(store.stopService())
    finally:
        await wait(second.stopService())


@pytest_twisted.ensureDeferred
async def test_child_gone_after_stop(tmp_path):
    """After stopService has fired, the redis-server process no longer exists."""
    redis = EmbeddedRedis(str(tmp_path / "state"))
    redis.startService()
    await wait(redis.whenReady())
    pid = child_pid(redis)
    await wait(redis.stopService())
    assert not alive(pid)


@pytest_twisted.ensureDeferred
async def test_restarted_when_killed(embedded):
    """A redis-server killed behind our back is started again by the ProcessMonitor."""
    pid = child_pid(embedded)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: "redis" in embedded.monitor.protocols and child_pid(embedded) != pid)
    store = await store_on(embedded)
    try:
        assert await wait(store.load_extensions()) == []
    finally:
        await wait(store.stopService())


@pytest_twisted.ensureDeferred
async def test_not_ready_names_binary_and_log(tmp_path):
    """A binary that never serves makes whenReady fail naming the binary and the log file."""
    redis = EmbeddedRedis(str(tmp_path / "state"), binary="/bin/false", ready_timeout_s=0.3)
    redis.startService()
    try:
        with pytest.raises(RedisStartError) as e:
            await wait(redis.whenReady())
        assert "/bin/false" in str(e.value)
        assert redis.log_path in str(e.value)
    finally:
        await wait(redis.stopService())


def test_missing_binary_is_clear(tmp_path):
    """startService with a binary that does not exist raises, naming it."""
    redis = EmbeddedRedis(str(tmp_path), binary=str(tmp_path / "no-redis"))
    with pytest.raises(RedisStartError, match="no-redis"):
        redis.startService()


@pytest_twisted.ensureDeferred
async def test_when_ready_before_start():
    """whenReady on a service that was never started fails at once, saying so."""
    with pytest.raises(RedisStartError, match="not started"):
        await EmbeddedRedis("/tmp/unused-state").whenReady()


@pytest_twisted.ensureDeferred
async def test_stop_without_start(tmp_path):
    """stopService on a service that was never started completes quietly."""
    await wait(EmbeddedRedis(str(tmp_path)).stopService())


@pytest_twisted.ensureDeferred
async def test_second_on_same_state_dir_refuses_and_first_keeps_serving(embedded, tmp_path):
    """
    A second EmbeddedRedis on a state_dir in use refuses to start (naming the directory and
    the owner's pid) without starting a redis-server; the first one's socket still answers.
    """
    from audiosocket.redisproc import StateDirLocked

    pid = child_pid(embedded)
    second = EmbeddedRedis(str(tmp_path / "state"))
    with pytest.raises(StateDirLocked) as e:
        second.startService()
    assert str(tmp_path / "state") in str(e.value) and str(os.getpid()) in str(e.value)
    assert not second.monitor.protocols and not second.running
    await wait(second.stopService())
    assert child_pid(embedded) == pid and os.path.exists(embedded.socket_path)
    store = await store_on(embedded)
    try:
        await wait(store.save_extension(ext()))
    finally:
        await wait(store.stopService())


def test_lock_is_free_again_after_release(tmp_path):
    """A released state-dir lock can be taken again (a restart in the same process)."""
    from audiosocket.redisproc import StateDirLock

    first = StateDirLock(str(tmp_path))
    first.acquire()
    first.release()
    second = StateDirLock(str(tmp_path))
    second.acquire()
    assert second.held
    second.release()
