"""
Tests for L{audiosocket.store}: L{RedisStore} against a real redis-server, L{MemoryStore} alone.
"""

from __future__ import annotations

import json
import socket

import pytest
import txredisapi
import pytest_twisted
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from audiosocket.model import Extension
from audiosocket.store import (
    DELETE,
    PUT,
    ExtensionChange,
    IStore,
    MemoryHub,
    MemoryStore,
    RedisAddress,
    RedisStore,
    StoreUnavailable,
)

TIMEOUT = 5


def ext(id=10, ai_port=8101, **kw) -> Extension:
    fields = dict(
        id=id,
        ai_extension=str(1000 + id),
        ai_port=ai_port,
        return_extension=str(2000 + id),
        return_port=ai_port + 100,
        host="127.0.0.1",
        condominium_id=1,
    )
    fields.update(kw)
    return Extension(**fields)


def redis_command(path: str, *args: bytes) -> bytes:
    """Send one raw command to Redis outside the store (blocking; test set-up only)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        s.sendall(out)
        return s.recv(4096)
    finally:
        s.close()


async def wait(d, seconds=TIMEOUT):
    return await d.addTimeout(seconds, reactor)


async def until(predicate, seconds=TIMEOUT):
    """Poll the reactor until predicate() is true; fail after seconds."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in {}s".format(seconds)
        await task.deferLater(reactor, 0.01, lambda: None)


async def started(path, **kw) -> RedisStore:
    kw.setdefault("timeout_s", 1.0)
    kw.setdefault("reconnect_max_s", 0.2)
    store = RedisStore(path, **kw)
    store.startService()
    await wait(store.whenSubscribed())
    return store


@pytest_twisted.async_yield_fixture
async def store(redis_server):
    s = await started(redis_server.path, node_id="a")
    yield s
    await wait(s.stopService())


@pytest_twisted.async_yield_fixture
async def other(redis_server):
    s = await started(redis_server.path, node_id="b")
    yield s
    await wait(s.stopService())


class Changes:
    """
    Collects changes; C{next()} gives the oldest one not yet taken, waiting if there is none
    (a message may arrive before or after the command's own reply: neither is lost).
    """

    def __init__(self):
        self.seen: list[ExtensionChange] = []
        self._queue = defer.DeferredQueue()

    def __call__(self, change):
        self.seen.append(change)
        self._queue.put(change)

    def next(self) -> defer.Deferred:
        return self._queue.get().addTimeout(TIMEOUT, reactor)


# -- interface ---------------------------------------------------------------------------------


def test_redis_store_provides_istore():
    """RedisStore provides IStore (before it is started: nothing connects in __init__)."""
    assert verifyObject(IStore, RedisStore("/tmp/nowhere.sock"))


def test_memory_store_provides_istore():
    """MemoryStore provides IStore."""
    assert verifyObject(IStore, MemoryStore())


# -- addresses ---------------------------------------------------------------------------------


def test_address_socket_path():
    """A bare absolute path is a unix socket, db from the argument."""
    expected = RedisAddress("/run/redis.sock", None, None, 3)
    assert RedisAddress.parse("/run/redis.sock", 3) == expected


def test_address_redis_url():
    """A redis:// URL gives host, port, db and password."""
    a = RedisAddress.parse("redis://:s%40cret@redis.local:6380/2")
    assert (a.host, a.port, a.db, a.password) == ("redis.local", 6380, 2, "s@cret")


def test_address_unix_url():
    """A unix:// URL gives the path and the db from its query."""
    a = RedisAddress.parse("unix:///var/run/redis.sock?db=4")
    assert (a.path, a.db) == ("/var/run/redis.sock", 4)


@pytest.mark.parametrize("bad", ["", "redis.local:6379", "http://x/0", "redis://h/x", "unix://"])
def test_address_bad(bad):
    """A bad address is a ValueError quoting it."""
    with pytest.raises(ValueError, match="redis address"):
        RedisAddress.parse(bad)


# -- extensions --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_extensions_round_trip(store):
    """Saved extensions load back equal, sorted by id; a deleted one is gone."""
    await wait(store.save_extension(ext(11, 8111)))
    await wait(store.save_extension(ext(10, 8101, max_calls=3)))
    await wait(store.save_extension(ext(12, 8121)))
    assert await wait(store.delete_extension(12)) is True
    assert await wait(store.load_extensions()) == [ext(10, 8101, max_calls=3), ext(11, 8111)]


@pytest_twisted.ensureDeferred
async def test_save_replaces(store):
    """Saving an extension with an existing id replaces it."""
    await wait(store.save_extension(ext(10, 8101)))
    await wait(store.save_extension(ext(10, 9101)))
    assert await wait(store.load_extensions()) == [ext(10, 9101)]


@pytest_twisted.ensureDeferred
async def test_delete_missing(store):
    """Deleting an id that is not stored fires with False."""
    assert await wait(store.delete_extension(99)) is False


@pytest_twisted.ensureDeferred
async def test_seed_first_start_only(store):
    """Seed writes on the first call only; a second seed changes nothing."""
    assert await wait(store.seed([ext(10)])) is True
    assert await wait(store.seed([ext(20, 8201)])) is False
    assert await wait(store.load_extensions()) == [ext(10)]


@pytest_twisted.ensureDeferred
async def test_seed_not_after_all_deleted(redis_server, store):
    """After every seeded extension was deleted, a restarted node does not seed again."""
    assert await wait(store.seed([ext(10)])) is True
    assert await wait(store.delete_extension(10)) is True
    again = await started(redis_server.path, node_id="restarted")
    try:
        assert await wait(again.seed([ext(10)])) is False
        assert await wait(again.load_extensions()) == []
    finally:
        await wait(again.stopService())


@pytest_twisted.ensureDeferred
async def test_corrupt_entry_skipped(redis_server, store):
    """A stored entry that is not a valid extension is skipped; the others load."""
    await wait(store.save_extension(ext(10)))
    redis_command(redis_server.path, b"HSET", b"audiosocket:extensions", b"11", b"{not json")
    bad = dict(ext(12, 8121).to_dict(), ai_port=0)
    redis_command(
        redis_server.path, b"HSET", b"audiosocket:extensions", b"12", json.dumps(bad).encode()
    )
    assert await wait(store.load_extensions()) == [ext(10)]


@pytest_twisted.ensureDeferred
async def test_save_rejects_non_extension(store):
    """save_extension of a dict fails with TypeError, naming the type."""
    with pytest.raises(TypeError, match="dict"):
        await wait(store.save_extension(ext(10).to_dict()))


@pytest_twisted.ensureDeferred
async def test_prefix_isolates(redis_server, store):
    """Stores with different prefixes do not see each other's extensions."""
    other = await started(redis_server.path, prefix="elsewhere:")
    try:
        await wait(store.save_extension(ext(10)))
        assert await wait(other.load_extensions()) == []
    finally:
        await wait(other.stopService())


# -- pub/sub -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_put_reaches_other_node(store, other):
    """A save on one node reaches the other node's subscriber as a put with the extension."""
    changes = Changes()
    other.subscribe(changes)
    await wait(store.save_extension(ext(10)))
    assert await changes.next() == ExtensionChange(PUT, 10, ext(10), "a")


@pytest_twisted.ensureDeferred
async def test_delete_reaches_other_node(store, other):
    """A delete on one node reaches the other node's subscriber as a delete."""
    changes = Changes()
    other.subscribe(changes)
    await wait(store.save_extension(ext(10)))
    assert (await changes.next()).kind == PUT  # the put comes first
    await wait(store.delete_extension(10))
    assert await changes.next() == ExtensionChange(DELETE, 10, None, "a")


@pytest_twisted.ensureDeferred
async def test_own_changes_ignored(store, other):
    """A node's subscriber never hears its own changes; it hears the other node's."""
    mine = Changes()
    store.subscribe(mine)
    await wait(store.save_extension(ext(10)))
    heard = mine.next()
    await wait(other.save_extension(ext(11, 8111)))
    change = await heard
    assert change.node_id == "b"
    assert [c.ext_id for c in mine.seen] == [11]


@pytest_twisted.ensureDeferred
async def test_malformed_message_ignored(redis_server, store):
    """A malformed message on the channel is dropped; later changes still arrive."""
    changes = Changes()
    store.subscribe(changes)
    redis_command(redis_server.path, b"PUBLISH", b"audiosocket:extensions", b"garbage")
    good = json.dumps(
        {"node_id": "z", "kind": "put", "ext_id": 10, "extension": ext(10).to_dict()}
    )
    redis_command(redis_server.path, b"PUBLISH", b"audiosocket:extensions", good.encode())
    assert await changes.next() == ExtensionChange(PUT, 10, ext(10), "z")
    assert len(changes.seen) == 1


@pytest_twisted.ensureDeferred
async def test_unsubscribe(store, other):
    """After unsubscribing, a callback hears nothing more."""
    gone, kept = Changes(), Changes()
    other.subscribe(kept)
    other.subscribe(gone)()
    await wait(store.save_extension(ext(10)))
    await kept.next()
    assert gone.seen == []


# -- outage ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_down_is_unavailable(redis_server, store):
    """With Redis stopped, a command fails with StoreUnavailable in about timeout_s."""
    redis_server.stop()
    await until(lambda: not store.available)
    # The command ends as StoreUnavailable: by the store's own 1 s timeout, or sooner when
    # txredisapi's reconnect attempt fails first (both happen, depending on timing). Without
    # the timeout the command can hang (txredisapi alone may wait for ever) and wait() would
    # time out instead, with another error.
    with pytest.raises(StoreUnavailable, match=r"no reply within 1\.0s|Lost connection"):
        await wait(store.load_extensions())
    assert store.available is False


@pytest_twisted.ensureDeferred
async def test_command_right_after_redis_stops(redis_server, store):
    """A command sent as Redis goes away (lost connection or none yet) is StoreUnavailable."""
    await wait(store.save_extension(ext(10)))
    redis_server.stop()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        await wait(store.load_extensions())
    assert store.available is False


@pytest_twisted.ensureDeferred
async def test_redis_restart_recovers(redis_server, store, other):
    """After Redis comes back, commands and pub/sub work again without restarting the stores."""
    await wait(store.save_extension(ext(10)))
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await wait(store.load_extensions())
    await until(lambda: not (store.subscribed or other.subscribed))
    redis_server.start()
    await wait(store.whenSubscribed())
    await wait(other.whenSubscribed())
    await wait(store.whenAvailable())
    changes = Changes()
    other.subscribe(changes)
    await wait(store.save_extension(ext(11, 8111)))
    assert (await changes.next()).ext_id == 11
    assert await wait(store.load_extensions()) == [ext(10), ext(11, 8111)]
    assert store.available is True


@pytest_twisted.ensureDeferred
async def test_not_started_is_unavailable():
    """A store that was never started fails commands with StoreUnavailable, not a hang."""
    with pytest.raises(StoreUnavailable, match="not running"):
        await wait(RedisStore("/tmp/nowhere.sock").load_extensions())


@pytest_twisted.ensureDeferred
async def test_stop_fails_pending_commands(redis_server, store):
    """Stopping the store while a command waits for Redis fails it at once."""
    redis_server.stop()
    await until(lambda: not store.available)
    pending = store.get_blob("k")
    assert not pending.called  # waiting for Redis
    stopped = store.stopService()
    with pytest.raises(StoreUnavailable, match="stopped"):
        await wait(pending, 0.8)
    await wait(stopped)


# -- call records ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_calls_newest_first(store):
    """recent_calls returns at most limit records, newest first."""
    for n in range(5):
        await wait(store.append_call({"n": n, "outcome": "autorizado"}))
    assert await wait(store.recent_calls(3)) == [
        {"n": 4, "outcome": "autorizado"},
        {"n": 3, "outcome": "autorizado"},
        {"n": 2, "outcome": "autorizado"},
    ]


@pytest_twisted.ensureDeferred
async def test_calls_capped(redis_server):
    """The call log is trimmed near calls_maxlen (approximately: whole stream nodes)."""
    # One connection: the appends, pipelined, reach Redis in order.
    s = await started(redis_server.path, calls_maxlen=10, poolsize=1)
    try:
        await wait(
            defer.gatherResults([s.append_call({"n": n}) for n in range(450)]), 10
        )
        kept = await wait(s.recent_calls(1000))
        assert kept[0] == {"n": 449}
        assert 10 <= len(kept) <= 10 + 100  # stream-node-max-entries is 100
    finally:
        await wait(s.stopService())


@pytest_twisted.ensureDeferred
async def test_call_record_not_json(store):
    """A record that JSON cannot encode fails with ValueError saying so."""
    with pytest.raises(ValueError, match="JSON"):
        await wait(store.append_call({"when": object()}))


@pytest_twisted.ensureDeferred
async def test_recent_calls_bad_limit(store):
    """A limit outside 1..10000 is a ValueError naming the limit."""
    with pytest.raises(ValueError, match="limit"):
        await wait(store.recent_calls(0))


# -- blobs -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_blob_binary_safe(store):
    """Blobs come back byte for byte, NUL bytes and invalid UTF-8 included."""
    data = b"\x00\xff\xfe" + bytes(range(256)) + b"\x00"
    await wait(store.set_blob("tts:abc", data, None))
    assert await wait(store.get_blob("tts:abc")) == data


@pytest_twisted.ensureDeferred
async def test_blob_utf8_text_stays_bytes(store):
    """A blob that happens to be valid UTF-8 still comes back as bytes."""
    await wait(store.set_blob("k", "olá".encode(), None))
    assert await wait(store.get_blob("k")) == "olá".encode()


@pytest_twisted.ensureDeferred
async def test_blob_missing(store):
    """A missing blob is None."""
    assert await wait(store.get_blob("nope")) is None


@pytest_twisted.ensureDeferred
async def test_blob_ttl_set(redis_server, store):
    """set_blob with ttl_s gives the key that expiry in Redis."""
    await wait(store.set_blob("k", b"x", 60))
    reply = redis_command(redis_server.path, b"TTL", b"audiosocket:blob:k")
    assert 0 < int(reply[1:].strip()) <= 60


@pytest_twisted.ensureDeferred
async def test_blob_bad_ttl(store):
    """A ttl_s that is not a positive integer is a ValueError naming ttl_s."""
    with pytest.raises(ValueError, match="ttl_s"):
        await wait(store.set_blob("k", b"x", 0))


# -- memory store ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_round_trip():
    """MemoryStore keeps, replaces and deletes extensions like RedisStore."""
    s = MemoryStore()
    await s.save_extension(ext(11, 8111))
    await s.save_extension(ext(10, 8101))
    assert await s.delete_extension(11) is True
    assert await s.delete_extension(11) is False
    assert await s.load_extensions() == [ext(10, 8101)]


@pytest_twisted.ensureDeferred
async def test_memory_seed_once():
    """MemoryStore seeds once per hub, even after everything was deleted."""
    hub = MemoryHub()
    assert await MemoryStore(hub).seed([ext(10)]) is True
    await MemoryStore(hub).delete_extension(10)
    assert await MemoryStore(hub).seed([ext(10)]) is False


@pytest_twisted.ensureDeferred
async def test_memory_unavailable():
    """A MemoryStore marked unavailable fails with StoreUnavailable, and recovers."""
    s = MemoryStore()
    s.available = False
    with pytest.raises(StoreUnavailable):
        await s.load_extensions()
    s.available = True
    assert await s.load_extensions() == []


@pytest_twisted.ensureDeferred
async def test_memory_hub_delivers_to_other_nodes():
    """Two MemoryStores on one hub share data; each hears the other's changes, not its own."""
    hub = MemoryHub()
    a, b = MemoryStore(hub, node_id="a"), MemoryStore(hub, node_id="b")
    heard_a, heard_b = Changes(), Changes()
    a.subscribe(heard_a)
    b.subscribe(heard_b)
    await a.save_extension(ext(10))
    await b.delete_extension(10)
    assert heard_b.seen == [ExtensionChange(PUT, 10, ext(10), "a")]
    assert heard_a.seen == [ExtensionChange(DELETE, 10, None, "b")]


@pytest_twisted.ensureDeferred
async def test_memory_calls_capped_newest_first():
    """MemoryStore keeps the last calls_maxlen records, newest first."""
    s = MemoryStore(calls_maxlen=3)
    for n in range(5):
        await s.append_call({"n": n})
    assert await s.recent_calls(10) == [{"n": 4}, {"n": 3}, {"n": 2}]


@pytest_twisted.ensureDeferred
async def test_memory_blob_expires():
    """A MemoryStore blob is gone once its ttl_s has passed on the store's clock."""
    clock = task.Clock()
    s = MemoryStore(reactor=clock)
    await s.set_blob("k", b"\x00a", 10)
    clock.advance(9)
    assert await s.get_blob("k") == b"\x00a"
    clock.advance(1)
    assert await s.get_blob("k") is None


def test_memory_subscriber_failure_isolated():
    """A subscriber that raises does not stop the next one from hearing the change."""
    hub = MemoryHub()
    a, b = MemoryStore(hub, node_id="a"), MemoryStore(hub, node_id="b")
    heard = Changes()
    b.subscribe(lambda change: 1 / 0)
    b.subscribe(heard)
    a.save_extension(ext(10))
    assert [c.ext_id for c in heard.seen] == [10]


@pytest.mark.parametrize(
    "reply, unavailable",
    [
        ("MISCONF Errors writing to the AOF file: No space left on device", True),
        (b"OOM command not allowed when used memory > 'maxmemory'.", True),
        ("ERR Error running script (call to f_1): @user_script:2: -MISCONF Errors writing", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("READONLY You can't write against a read only replica.", True),
        ("ERR wrong number of arguments for 'hset' command", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_refusals_are_unavailability(reply, unavailable):
    """Redis refusing for now (disk full, memory full, loading, replica) is StoreUnavailable
    (a 503, records kept for retry); a real command error is not."""
    from audiosocket.store import _refusal

    assert _refusal(txredisapi.ResponseError(reply)) is unavailable


# -- the access audit and retention (real Redis) -------------------------------------------------


def access(n, condominium_id=1, apartment="101", **kw) -> dict:
    return dict(
        {"n": n, "condominium_id": condominium_id, "apartment": apartment, "result": "opened"},
        **kw,
    )


def xadd_at(path: str, key: bytes, ms: int, record: dict | bytes) -> None:
    """Add a stream entry with the id C{<ms>-0}: as if the store had taken it at that time."""
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    reply = redis_command(path, b"XADD", key, b"%d-0" % ms, b"record", data)
    assert reply.startswith(b"$"), reply


@pytest_twisted.ensureDeferred
async def test_access_newest_first(store):
    """access_events returns the appended entries newest first, at most limit."""
    for n in range(5):
        await wait(store.append_access(access(n)))
    assert [e["n"] for e in await wait(store.access_events(limit=3))] == [4, 3, 2]
    assert [e["n"] for e in await wait(store.access_events())] == [4, 3, 2, 1, 0]


@pytest_twisted.ensureDeferred
async def test_access_filters_page_until_limit_entries_match(store, monkeypatch):
    """
    Condominium and apartment filters read page after page until C{limit} entries match:
    matching entries far apart in the stream still come back.
    """
    monkeypatch.setattr("audiosocket.store.STREAM_PAGE", 3)
    for n in range(20):
        apartment = "202" if n % 7 == 0 else "101"
        await wait(store.append_access(access(n, condominium_id=1 + n % 2, apartment=apartment)))
    found = await wait(store.access_events(apartment="202", limit=10))
    assert [e["n"] for e in found] == [14, 7, 0]
    found = await wait(store.access_events(condominium_id=2, limit=4))
    assert [e["n"] for e in found] == [19, 17, 15, 13]
    found = await wait(store.access_events(condominium_id=1, apartment="202"))
    assert [e["n"] for e in found] == [14, 0]


@pytest_twisted.ensureDeferred
async def test_access_time_range_uses_the_stream_ids(redis_server, store):
    """since and until (epoch seconds) select by the time in the entries' ids, both included."""
    for second in (1000, 2000, 3000, 4000):
        xadd_at(redis_server.path, b"audiosocket:access", second * 1000, access(second))
    found = await wait(store.access_events(since=2000.0, until=3000.0))
    assert [e["n"] for e in found] == [3000, 2000]
    assert [e["n"] for e in await wait(store.access_events(since=3500))] == [4000]
    assert [e["n"] for e in await wait(store.access_events(until=1999.999))] == [1000]


@pytest_twisted.ensureDeferred
async def test_access_corrupt_entry_skipped(redis_server, store):
    """An audit entry that is not a JSON object is skipped (and logged); the others come back."""
    await wait(store.append_access(access(1)))
    redis_command(redis_server.path, b"XADD", b"audiosocket:access", b"*", b"record", b"{no")
    redis_command(redis_server.path, b"XADD", b"audiosocket:access", b"*", b"other", b"x")
    await wait(store.append_access(access(2)))
    assert [e["n"] for e in await wait(store.access_events())] == [2, 1]


@pytest_twisted.ensureDeferred
async def test_access_capped(redis_server):
    """The audit stream is trimmed near audit_maxlen (approximately: whole stream nodes)."""
    s = await started(redis_server.path, audit_maxlen=10, poolsize=1)
    try:
        await wait(defer.gatherResults([s.append_access(access(n)) for n in range(450)]), 10)
        kept = await wait(s.access_events(limit=1000))
        assert kept[0]["n"] == 449
        assert 10 <= len(kept) <= 10 + 100  # stream-node-max-entries is 100
    finally:
        await wait(s.stopService())


@pytest_twisted.ensureDeferred
async def test_access_bad_filters(store):
    """A filter of the wrong type or a time that is not epoch seconds fails, naming it."""
    with pytest.raises(TypeError, match="condominium_id"):
        await wait(store.access_events(condominium_id="1"))
    with pytest.raises(ValueError, match="since"):
        await wait(store.access_events(since="yesterday"))
    with pytest.raises(ValueError, match="limit"):
        await wait(store.access_events(limit=0))


@pytest_twisted.ensureDeferred
async def test_trim_access_deletes_older_entries(redis_server, store):
    """trim_access(t) deletes the entries stored before t and says how many."""
    for second in (1000, 2000, 3000):
        xadd_at(redis_server.path, b"audiosocket:access", second * 1000, access(second))
    assert await wait(store.trim_access(2000.0)) == 1
    assert [e["n"] for e in await wait(store.access_events())] == [3000, 2000]
    assert await wait(store.trim_access(2000.0)) == 0


@pytest_twisted.ensureDeferred
async def test_delete_calls_deletes_older_records(redis_server, store):
    """delete_calls(t) deletes the call records stored before t, only them, and counts them."""
    for second in (1000, 2000, 3000):
        xadd_at(redis_server.path, b"audiosocket:calls", second * 1000, {"n": second})
    await wait(store.append_call({"n": "now"}))
    assert await wait(store.delete_calls(2500.5)) == 2
    assert await wait(store.recent_calls(10)) == [{"n": "now"}, {"n": 3000}]


@pytest_twisted.ensureDeferred
async def test_retention_commands_when_redis_is_down(redis_server, store):
    """With Redis down, the audit and retention commands fail with StoreUnavailable."""
    redis_server.stop()
    for call in (
        lambda: store.append_access(access(1)),
        lambda: store.access_events(),
        lambda: store.delete_calls(1.0),
        lambda: store.trim_access(1.0),
    ):
        with pytest.raises(StoreUnavailable):
            await wait(call())
