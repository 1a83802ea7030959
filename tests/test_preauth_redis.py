"""
Tests for the pre-authorisation methods of L{audiosocket.store.RedisStore} against a real
redis-server, and for L{audiosocket.preauth.Preauths} on it with a real worker pool: above
all, that two calls racing for an item's last use never both get in.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from audiosocket.preauth import PreAuth, Preauths
from audiosocket.store import MemoryStore
from preauthkit import body, sites
from test_store import redis_command, started, wait

ID_A, ID_B, ID_C = "a" * 32, "b" * 32, "c" * 32


def stored(preauth_id=ID_A, condominium_id=1, uses=1) -> dict:
    now = datetime(2026, 12, 1, 3, tzinfo=timezone.utc)
    return PreAuth(
        id=preauth_id,
        condominium_id=condominium_id,
        apartment="101",
        visitor_name="Maria",
        valid_from=now,
        valid_until=now + timedelta(days=1),
        weekdays=(1,),
        hours=None,
        uses=uses,
        created_at=now,
        salt=b"s" * 16,
        code_hash=b"h" * 32,
    ).to_dict()


@pytest_twisted.async_yield_fixture
async def store(redis_server):
    s = await started(redis_server.path, node_id="a")
    try:
        yield s
    finally:
        await s.stopService()


@pytest_twisted.ensureDeferred
async def test_save_list_round_trip(store):
    """A saved item is listed as it was saved, under its own condominium only."""
    item = stored(uses=3)
    assert await wait(store.save_preauth(item)) is True
    assert await wait(store.preauths(1)) == [item]
    assert await wait(store.preauths(2)) == []
    assert PreAuth.from_dict((await wait(store.preauths(1)))[0]).uses == 3


@pytest_twisted.ensureDeferred
async def test_use_takes_one_and_the_last_deletes(store):
    """use_preauth takes one use at a time; the last one deletes the item; then False."""
    await wait(store.save_preauth(stored(uses=2)))
    assert await wait(store.use_preauth(1, ID_A)) is True
    assert [p["uses"] for p in await wait(store.preauths(1))] == [1]
    assert await wait(store.use_preauth(1, ID_A)) is True
    assert await wait(store.preauths(1)) == []
    assert await wait(store.use_preauth(1, ID_A)) is False
    assert await wait(store.delete_preauth(ID_A)) is False  # the index is clean too


@pytest_twisted.ensureDeferred
async def test_use_needs_the_right_condominium(store):
    """An item is used only through its own condominium."""
    await wait(store.save_preauth(stored()))
    assert await wait(store.use_preauth(2, ID_A)) is False
    assert await wait(store.use_preauth(1, ID_A)) is True


@pytest_twisted.ensureDeferred
async def test_delete_by_id(store):
    """delete_preauth finds the item by id alone and says whether it existed."""
    await wait(store.save_preauth(stored(ID_A, 1)))
    await wait(store.save_preauth(stored(ID_B, 2)))
    assert await wait(store.delete_preauth(ID_B)) is True
    assert await wait(store.delete_preauth(ID_B)) is False
    assert await wait(store.preauths(2)) == []
    assert await wait(store.use_preauth(2, ID_B)) is False
    assert len(await wait(store.preauths(1))) == 1


@pytest_twisted.ensureDeferred
async def test_limit_is_checked_in_the_store(store):
    """At the limit a new item is refused; replacing an existing one still works."""
    assert await wait(store.save_preauth(stored(ID_A), limit=2))
    assert await wait(store.save_preauth(stored(ID_B), limit=2))
    assert await wait(store.save_preauth(stored(ID_C), limit=2)) is False
    assert await wait(store.save_preauth(stored(ID_A, uses=5), limit=2)) is True
    assert await wait(store.save_preauth(stored(ID_C, condominium_id=2), limit=2)) is True


@pytest_twisted.ensureDeferred
async def test_corrupt_item_skipped(redis_server, store):
    """A corrupt stored item is logged and skipped; the others are listed."""
    await wait(store.save_preauth(stored(ID_A)))
    redis_command(redis_server.path, b"HSET", b"audiosocket:preauth:1", b"x", b"{nope")
    assert [p["id"] for p in await wait(store.preauths(1))] == [ID_A]


@pytest_twisted.ensureDeferred
async def test_race_for_the_last_use_store(store):
    """Two use_preauth at once for the last use: exactly one gets it."""
    await wait(store.save_preauth(stored(uses=1)))
    results = await wait(
        defer.gatherResults([store.use_preauth(1, ID_A), store.use_preauth(1, ID_A)])
    )
    assert sorted(results) == [False, True]


@pytest_twisted.ensureDeferred
async def test_race_for_the_last_use_at_two_gates(store):
    """
    Two calls type the same code at once for an item with one use left, on a real worker
    pool: both find it valid, exactly one gets in.
    """
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-codes")
    pool.start()
    try:
        preauths = Preauths(store, reactor=reactor, pool=pool, sites=sites())
        now = datetime.fromtimestamp(reactor.seconds(), timezone.utc)
        _, code = await wait(
            preauths.create(
                body(valid_from=now.isoformat(), valid_until=(now + timedelta(days=1)).isoformat())
            )
        )
        results = await wait(
            defer.gatherResults(
                [preauths.redeem(1, code, "UTC"), preauths.redeem(1, code, "UTC")]
            )
        )
    finally:
        pool.stop()
    assert sorted(r is not None for r in results) == [False, True]
    assert await wait(store.preauths(1)) == []


def test_memory_store_race_for_the_last_use():
    """The memory store also gives the last use once."""
    store = MemoryStore()
    store.save_preauth(stored(uses=1))
    results = []
    for _ in range(2):
        store.use_preauth(1, ID_A).addCallback(results.append)
    assert results == [True, False]
