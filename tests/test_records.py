"""Tests for L{audiosocket.service.CallRecords}: no call record is lost to a store outage."""

from twisted.internet.task import Clock

from audiosocket.service import CallRecords
from audiosocket.store import MemoryStore


def records():
    clock = Clock()
    store = MemoryStore(reactor=clock)
    keeper = CallRecords(store, reactor=clock, retry_s=5)
    keeper.startService()
    return clock, store, keeper


def test_records_written_at_once_when_the_store_answers():
    """The usual case: each record goes straight to the store."""
    clock, store, keeper = records()
    keeper.add({"uuid": "a"})
    assert [r["uuid"] for r in store.recent_calls(10).result] == ["a"]
    assert not keeper.unsaved


def test_records_kept_through_an_outage_and_written_in_order():
    """Records refused while the store is down are written, in order, once it is back."""
    clock, store, keeper = records()
    store.available = False
    keeper.add({"uuid": "a"})
    keeper.add({"uuid": "b"})
    assert [r["uuid"] for r in keeper.unsaved] == ["a", "b"]
    clock.advance(5)  # still down: kept, retried later
    assert len(keeper.unsaved) == 2
    store.available = True
    keeper.add({"uuid": "c"})  # queued behind the waiting ones, not ahead of them
    clock.advance(5)
    assert not keeper.unsaved
    assert [r["uuid"] for r in store.recent_calls(10).result] == ["c", "b", "a"]
    assert clock.getDelayedCalls() == []


def test_stop_cancels_the_retry():
    """Stopping leaves no DelayedCall behind."""
    clock, store, keeper = records()
    store.available = False
    keeper.add({"uuid": "a"})
    keeper.stopService()
    assert clock.getDelayedCalls() == []


class _SlowStore:
    """A store whose appends complete only when the test says so."""

    def __init__(self):
        from twisted.internet import defer

        self._defer = defer
        self.pending = []

    def append_call(self, record):
        d = self._defer.Deferred()
        self.pending.append(d)
        return d


def test_when_saved_waits_for_a_write_in_flight():
    """when_saved fires only once a record being written is in the store."""
    clock = Clock()
    store = _SlowStore()
    keeper = CallRecords(store, reactor=clock)
    keeper.startService()
    assert keeper.when_saved().called  # nothing handed over yet
    keeper.add({"uuid": "a"})
    saved = keeper.when_saved()
    assert not saved.called
    store.pending[0].callback(None)
    assert saved.called


def test_when_saved_waits_through_an_outage():
    """A record kept through an outage counts as unsaved until the retry writes it."""
    clock, store, keeper = records()
    store.available = False
    keeper.add({"uuid": "a"})
    saved = keeper.when_saved()
    clock.advance(5)
    assert not saved.called
    store.available = True
    clock.advance(5)
    assert saved.called and not keeper.unsaved


def test_a_record_the_store_cannot_encode_is_dropped_not_retried():
    """
    A record the store refuses for what it is (not JSON) is logged and dropped: retrying
    could never write it, and it must not hold back the records behind it.
    """
    clock, store, keeper = records()
    keeper.add({"uuid": "bad", "when": object()})
    assert not keeper.unsaved
    keeper.add({"uuid": "b"})
    assert [r["uuid"] for r in store.recent_calls(10).result] == ["b"]
    assert clock.getDelayedCalls() == []


def test_a_bad_record_kept_behind_an_outage_does_not_block_the_others():
    """A record that cannot be encoded, queued during an outage, is dropped at the retry."""
    clock, store, keeper = records()
    store.available = False
    keeper.add({"uuid": "a"})
    keeper.add({"uuid": "bad", "when": object()})
    keeper.add({"uuid": "c"})
    store.available = True
    clock.advance(5)
    assert not keeper.unsaved
    assert [r["uuid"] for r in store.recent_calls(10).result] == ["c", "a"]
