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
