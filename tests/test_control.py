"""
Tests for L{audiosocket.control}: local changes applied to manager and store all-or-nothing,
start-up seeding and loading (with the store down, and its later recovery), and changes
from other nodes applied locally; on a MemoryReactor + Clock (and one bad record loaded from
a real redis-server).
"""

import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from audiosocket.control import ExtensionControl, StoreUnavailable
from audiosocket.extension import DRAINING, NotFound
from audiosocket.store import DELETE, PUT, ExtensionChange, MemoryStore
from extkit import ManagerSetup, ext, run


class Store(MemoryStore):
    """A MemoryStore whose writes can be made to fail or wait, and which logs them."""

    def __init__(self, stored=(), **kw):
        super().__init__(**kw)
        self.log = []
        self.fail_saves = False
        self.save_result = None  # a Deferred the next save waits for
        if stored:
            self.hub.extensions = {e.id: e for e in stored}
            self.hub.seeded = True

    @property
    def extensions(self):
        return self.hub.extensions

    def save_extension(self, ext):
        self.log.append(("save", ext.id))
        if self.fail_saves:
            return defer.fail(StoreUnavailable("redis timed out"))
        if self.save_result is not None:
            d, self.save_result = self.save_result, None
            return d.addCallback(lambda _: MemoryStore.save_extension(self, ext))
        return super().save_extension(ext)

    def delete_extension(self, ext_id):
        self.log.append(("delete", ext_id))
        if self.fail_saves:
            return defer.fail(StoreUnavailable("redis timed out"))
        return super().delete_extension(ext_id)


def change(kind, ext_id, extension=None):
    return ExtensionChange(kind, ext_id, extension, "node-b")


class Setup(ManagerSetup):
    def __init__(self, stored=()):
        super().__init__()
        self.store = Store(stored, reactor=self.reactor, node_id="node-a")
        self.control = ExtensionControl(
            self.manager, self.store, reactor=self.reactor, retry_s=10
        )


# ---------------------------------------------------------------- local changes


def test_add_listens_then_saves():
    """add opens both ports and then saves the extension."""
    s = Setup()
    run(s.control.add(ext()))
    assert s.reactor.open == {8080, 8081}
    assert s.store.extensions == {1: ext()}


def test_add_save_failure_undoes_add():
    """When the save fails the add is undone (ports closed) and the error re-raised."""
    s = Setup()
    s.store.fail_saves = True
    with pytest.raises(StoreUnavailable):
        run(s.control.add(ext()))
    assert s.reactor.open == set()
    assert s.manager.extensions == {}
    assert s.manager.draining == {}


def test_add_store_known_down_touches_nothing():
    """With the store known unavailable, add raises before opening any port."""
    s = Setup()
    s.store.available = False
    with pytest.raises(StoreUnavailable):
        run(s.control.add(ext()))
    assert s.reactor.open == set()
    assert s.store.log == []


def test_update_save_failure_restores_old():
    """When saving an update fails, the previous definition and ports come back."""
    s = Setup()
    run(s.control.add(ext()))
    s.store.fail_saves = True
    with pytest.raises(StoreUnavailable):
        run(s.control.update(ext(ai=9000, ret=9001)))
    assert s.manager.get(1).extension == ext()
    assert s.reactor.open == {8080, 8081}
    assert s.store.extensions[1] == ext()


def test_update_unknown_not_found():
    """Updating an unknown id is NotFound, even with the store down."""
    s = Setup()
    s.store.available = False
    with pytest.raises(NotFound):
        run(s.control.update(ext(id=4)))


def test_remove_deletes_then_stops():
    """remove deletes from the store and closes the extension's ports."""
    s = Setup()
    run(s.control.add(ext()))
    run(s.control.remove(1))
    assert s.store.extensions == {}
    assert s.reactor.open == set()
    assert s.manager.extensions == {}


def test_remove_store_failure_keeps_extension():
    """If the store delete fails, the extension keeps listening."""
    s = Setup()
    run(s.control.add(ext()))
    s.store.fail_saves = True
    with pytest.raises(StoreUnavailable):
        run(s.control.remove(1))
    assert s.reactor.open == {8080, 8081}


def test_changes_are_serialised():
    """A second change waits until the first one's save has finished."""
    s = Setup()
    pending = defer.Deferred()
    s.store.save_result = pending
    first = defer.ensureDeferred(s.control.add(ext()))
    second = defer.ensureDeferred(s.control.add(ext(id=2, ai=9000, ret=9001)))
    assert s.reactor.open == {8080, 8081}  # the second has not started
    pending.callback(None)
    run(first)
    run(second)
    assert s.reactor.open == {8080, 8081, 9000, 9001}
    assert s.store.log == [("save", 1), ("save", 2)]


# ---------------------------------------------------------------- start-up


def test_start_seeds_empty_store():
    """On first start the configured extensions seed the store and listen."""
    s = Setup()
    run(s.control.start([ext()]))
    assert s.store.extensions == {1: ext()}
    assert s.reactor.open == {8080, 8081}
    assert s.control.synced


def test_start_prefers_store_over_seed():
    """A store that already holds extensions wins over the config's seed."""
    s = Setup(stored=[ext(id=2, ai=9000, ret=9001)])
    run(s.control.start([ext()]))
    assert list(s.manager.extensions) == [2]
    assert s.reactor.open == {9000, 9001}


def test_start_subscribes_to_other_nodes_changes():
    """After start, an extension saved by another node on the same store listens here."""
    s = Setup()
    run(s.control.start([]))
    other = MemoryStore(s.store.hub, node_id="node-b", reactor=s.reactor)
    run(other.save_extension(ext(id=5, ai=9500, ret=9501)))
    assert s.reactor.open == {9500, 9501}
    other.delete_extension(5)
    assert s.reactor.open == set()


def test_stop_unsubscribes():
    """After stop, changes from other nodes are no longer applied."""
    s = Setup()
    run(s.control.start([]))
    s.control.stop()
    other = MemoryStore(s.store.hub, node_id="node-b", reactor=s.reactor)
    run(other.save_extension(ext(id=5, ai=9500, ret=9501)))
    assert s.reactor.open == set()


def test_start_store_down_serves_seed_then_retries():
    """With the store down at start the seed is served; a later retry loads the store."""
    s = Setup(stored=[ext(id=2, ai=9000, ret=9001)])
    s.store.available = False
    run(s.control.start([ext()]))
    assert list(s.manager.extensions) == [1]
    assert not s.control.synced
    s.reactor.advance(10)  # still down: retried again later
    assert not s.control.synced
    s.store.available = True
    s.reactor.advance(10)
    assert s.control.synced
    assert list(s.manager.extensions) == [2]
    assert s.reactor.open == {9000, 9001}


def test_stop_cancels_retry():
    """stop() cancels a pending start-up retry."""
    s = Setup()
    s.store.available = False
    run(s.control.start([ext()]))
    s.control.stop()
    assert [c for c in s.reactor.getDelayedCalls() if c.func == s.control._retry] == []


# ---------------------------------------------------------------- remote changes


def test_remote_put_adds():
    """A put from another node adds the extension here without saving it again."""
    s = Setup()
    run(s.control.apply_remote(change(PUT, 3, ext(id=3, ai=9100, ret=9101))))
    assert s.reactor.open == {9100, 9101}
    assert s.store.log == []


def test_remote_put_updates():
    """A put of a known extension updates it (rebinding changed ports)."""
    s = Setup()
    run(s.control.add(ext()))
    run(s.control.apply_remote(change(PUT, 1, ext(ai=9000, ret=9001))))
    assert s.manager.get(1).extension.ai_port == 9000
    assert s.reactor.open == {9000, 9001}


def test_remote_delete_drains():
    """A delete from another node removes the extension, letting calls drain."""
    s = Setup()
    run(s.control.add(ext()))
    svc = s.manager.get(1)
    run(s.control.apply_remote(change(DELETE, 1)))
    assert s.manager.extensions == {}
    assert s.reactor.open == set()
    assert svc.force_on_stop is False
    assert s.store.log == [("save", 1)]


def test_remote_error_logged_not_raised():
    """A remote change that cannot apply (port taken here) is logged, not raised."""
    s = Setup()
    run(s.control.add(ext()))
    with capturedLogs() as events:
        run(s.control.apply_remote(change(PUT, 2, ext(id=2, ai=8080, ret=9001))))
    assert 2 not in s.manager.extensions
    assert any("could not be applied" in e.get("log_format", "") for e in events)


def test_remote_unknown_kind_logged():
    """A change of unknown kind is logged as a failure and changes nothing."""
    s = Setup()
    with capturedLogs() as events:
        run(s.control.apply_remote(change("explode", 1)))
    assert any(e.get("log_failure") is not None for e in events)
    assert s.manager.extensions == {}


def test_draining_status_visible():
    """A removed extension with a call in progress is shown as draining."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    import uuid
    from audiosocket import wire

    s = Setup()
    svc = run(s.control.add(ext()))
    leg = svc.ai_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    leg.makeConnection(StringTransport())
    leg.dataReceived(wire.uuid_frame(uuid.uuid4()))
    run(s.control.remove(1))
    assert s.manager.draining[1].status == DRAINING
    leg.connectionLost(Failure(Exception("gone")))
    assert s.manager.draining == {}


# ---------------------------------------------------------------- a bad record in Redis


@pytest_twisted.ensureDeferred
async def test_stored_extension_with_injected_host_is_skipped(redis_server):
    """
    At start-up, a record in the real Redis whose host carries an AMI channel variable after a
    comma is logged and skipped: the good extension loads, the bad one never reaches the
    manager, and start-up completes.
    """
    from test_store import redis_command, started, wait

    store = await started(redis_server.path)
    try:
        await wait(store.save_extension(ext(1)))
        bad = dict(ext(2, ai=9000, ret=9001).to_dict(), host="10.0.0.2:9001,AUDIOSOCKET_UUID=x")
        redis_command(
            redis_server.path, b"HSET", b"audiosocket:extensions", b"2", json.dumps(bad).encode()
        )
        s = ManagerSetup()
        control = ExtensionControl(s.manager, store, reactor=s.reactor)
        with capturedLogs() as events:
            await wait(defer.Deferred.fromCoroutine(control.start([])))
        control.stop()
    finally:
        await wait(store.stopService())
    assert sorted(s.manager.extensions) == [1] and control.synced
    skipped = [e for e in events if "skipping corrupt extension" in e.get("log_format", "")]
    assert len(skipped) == 1 and "host" in str(skipped[0]["error"])
