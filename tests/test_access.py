"""
Tests for L{audiosocket.access} (the access audit, kept through a store outage),
L{audiosocket.retention} (LGPD retention on an exact clock), the MemoryStore's audit, the
routes C{GET /api/access} and C{DELETE /api/calls}, and C{[privacy] keep_visitor_names} in
the call record. The same store methods against a real redis-server are in
C{tests/test_store.py}.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from audiosocket.access import AccessLog, iso_utc
from audiosocket.config import PrivacyConfig
from audiosocket.retention import DAY_S, Retention
from audiosocket.service import makeService
from audiosocket.store import MemoryStore
from test_api import Setup
from test_service import config_for, free_ports

#: 2026-12-05T14:00:00Z
T0 = 1796479200.0


def event(**kw) -> dict:
    """An access event as the flow makes it, without its time."""
    data = {
        "condominium_id": 1,
        "gate": "dtmf",
        "extension_id": 1,
        "uuid": "5f0c6a2e-0000-4000-8000-000000000001",
        "apartment": "101",
        "visitor": "Pedro da Silva",
        "authorized_by": "resident",
        "who": "Ana",
        "evidence": "dtmf:1",
        "result": "handed_off",
        "error": None,
        "attempts": 1,
    }
    data.update(kw)
    return data


def audit(privacy=None, start=T0):
    """A clock at C{start}, a MemoryStore on it and a started AccessLog."""
    clock = Clock()
    clock.advance(start)
    store = MemoryStore(reactor=clock)
    settings = {"privacy": privacy or PrivacyConfig()}
    log = AccessLog(store, reactor=clock, privacy=lambda: settings["privacy"], retry_s=5)
    log.startService()
    return clock, store, log, settings


def stored(store, **filters) -> list[dict]:
    return store.access_events(**filters).result


class Logged:
    """The text of every log event emitted while it is open."""

    def __enter__(self):
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        return self

    def _observe(self, e):
        self.lines.append(formatEvent(e) or "")

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self._observe)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------- the entry


def test_iso_utc_has_milliseconds_and_z():
    """at is ISO 8601 in UTC with milliseconds and Z."""
    assert iso_utc(T0 + 0.1234) == "2026-12-05T14:00:00.123Z"
    assert iso_utc(T0 + 59.9999) == "2026-12-05T14:01:00.000Z"


def test_add_fills_the_time_from_the_reactor():
    """An event without at/ts gets both from the reactor's clock."""
    clock, store, log, _ = audit(start=T0 + 0.25)
    d = log.add(event())
    assert d.called and d.result is None
    [entry] = stored(store)
    assert (entry["ts"], entry["at"]) == (T0 + 0.25, "2026-12-05T14:00:00.250Z")
    assert entry == dict(event(), ts=T0 + 0.25, at="2026-12-05T14:00:00.250Z")


def test_add_keeps_a_given_time():
    """An event that says when it happened keeps it."""
    clock, store, log, _ = audit()
    log.add(event(ts=T0 - 60))
    [entry] = stored(store)
    assert (entry["ts"], entry["at"]) == (T0 - 60, "2026-12-05T13:59:00.000Z")


def test_visitor_name_kept_by_default():
    """With keep_visitor_names (the default), the entry names the visitor."""
    clock, store, log, _ = audit()
    log.add(event())
    assert stored(store)[0]["visitor"] == "Pedro da Silva"


def test_visitor_name_dropped_without_keep_visitor_names():
    """[privacy] keep_visitor_names = false: the entry's visitor is null, the rest is kept."""
    clock, store, log, _ = audit(PrivacyConfig(keep_visitor_names=False))
    log.add(event())
    [entry] = stored(store)
    assert entry["visitor"] is None
    assert (entry["apartment"], entry["who"], entry["result"]) == ("101", "Ana", "handed_off")


def test_privacy_read_at_each_add():
    """A reload that turns keep_visitor_names off applies to the next entry."""
    clock, store, log, settings = audit()
    log.add(event(apartment="101"))
    settings["privacy"] = PrivacyConfig(keep_visitor_names=False)
    log.add(event(apartment="102"))
    assert [e["visitor"] for e in stored(store)] == [None, "Pedro da Silva"]


def test_add_does_not_change_the_callers_event():
    """The entry is a copy: the caller's dict is left as it was."""
    clock, store, log, _ = audit(PrivacyConfig(keep_visitor_names=False))
    mine = event()
    log.add(mine)
    assert mine == event()


def test_add_never_fails_the_caller():
    """Something that is not an event, or cannot be stored, is logged and dropped."""
    clock, store, log, _ = audit()
    with Logged() as logged:
        for bad in (None, event(when=object())):
            d = log.add(bad)
            assert d.called and d.result is None
    assert stored(store) == [] and not log.unsaved
    assert "access entry" in logged.text


# ---------------------------------------------------------------- through an outage


def test_entries_kept_through_an_outage_and_written_in_order():
    """
    Entries refused while the store is down are kept, in order, retried every retry_s, and
    written once it answers; an entry added meanwhile waits behind them.
    """
    clock, store, log, _ = audit()
    store.available = False
    d = log.add(event(apartment="101"))
    assert d.called and d.result is None  # the caller is not failed
    log.add(event(apartment="102"))
    assert [e["apartment"] for e in log.unsaved] == ["101", "102"]
    clock.advance(5)  # still down
    assert len(log.unsaved) == 2
    store.available = True
    log.add(event(apartment="103"))  # behind the waiting ones
    assert stored(store) == []
    clock.advance(5)
    assert not log.unsaved
    assert [e["apartment"] for e in stored(store)] == ["103", "102", "101"]
    assert clock.getDelayedCalls() == []


def test_outage_entry_keeps_the_time_it_happened():
    """An entry written after an outage says when the opening happened, not when it was saved."""
    clock, store, log, _ = audit()
    store.available = False
    log.add(event())
    clock.advance(30)
    store.available = True
    clock.advance(5)
    assert stored(store)[0]["ts"] == T0


def test_stop_cancels_the_retry():
    """Stopping the audit leaves no DelayedCall behind."""
    clock, store, log, _ = audit()
    store.available = False
    log.add(event())
    log.stopService()
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------- reading it back (MemoryStore)


def three_condominiums(clock, store):
    for n in range(9):
        clock.advance(60)
        store.append_access(
            event(condominium_id=1 + n % 3, apartment=str(101 + n % 2), attempts=n)
        )


def test_memory_filters_by_condominium_and_apartment():
    """access_events filters by condominium and by apartment, newest first, up to limit."""
    clock = Clock()
    store = MemoryStore(reactor=clock)
    three_condominiums(clock, store)
    assert [e["attempts"] for e in stored(store, condominium_id=2)] == [7, 4, 1]
    assert [e["attempts"] for e in stored(store, apartment="102")] == [7, 5, 3, 1]
    assert [e["attempts"] for e in stored(store, condominium_id=2, apartment="102")] == [7, 1]
    assert [e["attempts"] for e in stored(store, limit=2)] == [8, 7]


def test_memory_time_range_includes_both_ends():
    """since and until select by the time the store took the entry, both ends included."""
    clock = Clock()
    store = MemoryStore(reactor=clock)
    three_condominiums(clock, store)  # at 60, 120, ..., 540
    assert [e["attempts"] for e in stored(store, since=120, until=240)] == [3, 2, 1]
    assert [e["attempts"] for e in stored(store, since=480)] == [8, 7]
    assert [e["attempts"] for e in stored(store, until=119.999)] == [0]


def test_memory_audit_capped():
    """The MemoryStore keeps the last audit_maxlen entries."""
    store = MemoryStore(reactor=Clock(), audit_maxlen=3)
    for n in range(5):
        store.append_access(event(attempts=n))
    assert [e["attempts"] for e in stored(store)] == [4, 3, 2]


def test_memory_trim_and_delete_calls_by_age():
    """trim_access and delete_calls delete what was stored before the time, and count it."""
    clock = Clock()
    store = MemoryStore(reactor=clock)
    for n in range(3):
        clock.advance(100)
        store.append_access(event(attempts=n))
        store.append_call({"n": n})
    assert store.trim_access(200).result == 1
    assert store.delete_calls(300.5).result == 3
    assert [e["attempts"] for e in stored(store)] == [2, 1]
    assert store.recent_calls(10).result == []


# ---------------------------------------------------------------- retention


def retention(privacy=None, start=T0):
    clock = Clock()
    clock.advance(start)
    store = MemoryStore(reactor=clock)
    privacy = privacy or PrivacyConfig(calls_retention_days=2, access_retention_days=3)
    settings = {"privacy": privacy}
    keeper = Retention(store, reactor=clock, privacy=lambda: settings["privacy"])
    return clock, store, keeper, settings


def aged(clock, store, days):
    """
    A call record and an access entry stored C{days} ago for each of C{days}, oldest first
    (the hub's lists as the store would have filled them then).
    """
    now = clock.seconds()
    ages = sorted(days, reverse=True)
    store.hub.call_log = [(now - age * DAY_S, {"age": age}) for age in ages]
    store.hub.access = [(now - age * DAY_S, {"age": age}) for age in ages]


def test_retention_runs_at_start_and_deletes_what_is_too_old():
    """At start, call records older than calls_retention_days and entries older than
    access_retention_days are deleted; younger ones stay."""
    clock, store, keeper, _ = retention()
    aged(clock, store, [4, 2.5, 1])
    with Logged() as logged:
        keeper.startService()
    assert [r["age"] for r in store.recent_calls(10).result] == [1]
    assert [e["age"] for e in stored(store)] == [1, 2.5]
    assert "deleted 2 call record(s) older than 2 day(s)" in logged.text
    assert "deleted 1 access entry(s) older than 3 day(s)" in logged.text
    keeper.stopService()


def test_retention_runs_every_hour():
    """An hour later it runs again: what has aged past the limit meanwhile goes."""
    clock, store, keeper, _ = retention()
    aged(clock, store, [1.99])
    keeper.startService()
    assert len(store.recent_calls(10).result) == 1
    clock.advance(3599)
    assert len(store.recent_calls(10).result) == 1
    clock.advance(1)
    assert store.recent_calls(10).result == []
    assert keeper.runs == 2
    keeper.stopService()
    assert clock.getDelayedCalls() == []


def test_retention_zero_days_keeps_everything():
    """0 days: that kind is kept (until its stream's cap only)."""
    clock, store, keeper, _ = retention(
        PrivacyConfig(calls_retention_days=0, access_retention_days=0)
    )
    aged(clock, store, [10000, 1])
    keeper.startService()
    assert len(store.recent_calls(10).result) == 2 and len(stored(store)) == 2
    keeper.stopService()


def test_retention_reads_the_settings_at_each_run():
    """A reload that shortens the retention applies at the next run."""
    clock, store, keeper, settings = retention()
    aged(clock, store, [1.5])
    keeper.startService()
    assert len(store.recent_calls(10).result) == 1
    settings["privacy"] = PrivacyConfig(calls_retention_days=1)
    clock.advance(3600)
    assert store.recent_calls(10).result == []
    keeper.stopService()


def test_retention_outage_logged_and_retried_next_run():
    """With the store down the run logs it and goes on; the next run does the work."""
    clock, store, keeper, _ = retention()
    aged(clock, store, [5])
    store.available = False
    with Logged() as logged:
        keeper.startService()
        clock.advance(3600)
    assert "not deleted, the store is unavailable" in logged.text
    assert keeper.runs == 2 and keeper.running
    store.available = True
    clock.advance(3600)
    assert store.recent_calls(10).result == [] and stored(store) == []
    keeper.stopService()
    assert clock.getDelayedCalls() == []


def test_retention_never_stops_on_an_unexpected_error():
    """A store that fails in an unexpected way: logged, and the loop goes on."""
    clock, store, keeper, _ = retention()

    def broken(before_ts):
        raise RuntimeError("boom")

    store.delete_calls = broken
    with Logged() as logged:
        keeper.startService()
    assert "retention run failed" in logged.text
    clock.advance(3600)  # still scheduled
    assert len([c for c in clock.getDelayedCalls()]) == 1
    keeper.stopService()
    assert clock.getDelayedCalls() == []


class _WaitingStore(MemoryStore):
    """A store that is not available yet at start (Redis still coming up)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.available = False
        self.waiters: list[defer.Deferred] = []

    def whenAvailable(self):
        d = defer.Deferred(lambda d: self.waiters.remove(d))
        self.waiters.append(d)
        return d


def test_retention_first_run_waits_for_the_store():
    """At start the run waits until the store answers, then deletes."""
    clock = Clock()
    clock.advance(T0)
    store = _WaitingStore(reactor=clock)
    keeper = Retention(store, reactor=clock, privacy=lambda: PrivacyConfig(calls_retention_days=1))
    aged(clock, store, [2])
    keeper.startService()
    assert keeper.runs == 0 and len(store.hub.call_log) == 1
    store.available = True
    store.waiters.pop().callback(None)
    assert keeper.runs == 1 and store.hub.call_log == []
    keeper.stopService()


def test_retention_stop_ends_a_run_waiting_for_the_store():
    """Stopping while the first run waits for the store ends it: nothing is left waiting."""
    clock = Clock()
    store = _WaitingStore(reactor=clock)
    keeper = Retention(store, reactor=clock)
    keeper.startService()
    assert len(store.waiters) == 1
    keeper.stopService()
    assert store.waiters == [] and clock.getDelayedCalls() == []


# ---------------------------------------------------------------- the API


def api_with_audit():
    s = Setup()
    clock = Clock()
    s.store._reactor = clock  # the times the store takes entries at
    where = [(1, "101"), (2, "101"), (1, "102"), (1, "101")]
    for n, (condominium_id, apartment) in enumerate(where):
        clock.advance(3600 if n else T0)
        s.store.append_access(
            event(condominium_id=condominium_id, apartment=apartment, attempts=n)
        )
    return s


def attempts(body) -> list[int]:
    return [e["attempts"] for e in body["access"]]


def test_api_access_newest_first():
    """GET /api/access lists the audit newest first."""
    status, _, body = api_with_audit().request("GET", "/api/access")
    assert (status, attempts(body)) == (200, [3, 2, 1, 0])
    assert body["access"][0]["apartment"] == "101"


def test_api_access_filters():
    """condominium_id, apartment and limit filter the audit."""
    s = api_with_audit()
    assert attempts(s.request("GET", "/api/access?condominium_id=1")[2]) == [3, 2, 0]
    assert attempts(s.request("GET", "/api/access?apartment=101")[2]) == [3, 1, 0]
    body = s.request("GET", "/api/access?condominium_id=1&apartment=101&limit=1")[2]
    assert attempts(body) == [3]


def test_api_access_time_range_with_z_or_offset():
    """since/until take ISO 8601 with Z or an offset (an unencoded + included)."""
    s = api_with_audit()  # stored at 14:00Z, 15:00Z, 16:00Z, 17:00Z
    body = s.request("GET", "/api/access?since=2026-12-05T15:00:00Z&until=2026-12-05T16:00:00Z")[2]
    assert attempts(body) == [2, 1]
    body = s.request("GET", "/api/access?since=2026-12-05T13:00:00-03:00")[2]  # 16:00Z
    assert attempts(body) == [3, 2]
    body = s.request("GET", "/api/access?until=2026-12-05T16:30:00+01:00")[2]  # 15:30Z
    assert attempts(body) == [1, 0]


@pytest.mark.parametrize(
    "query, field",
    [
        ("condominium_id=abc", "condominium_id"),
        ("condominium_id=0", "condominium_id"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=yesterday", "since"),
        ("since=2026-12-05T14:00:00", "since"),  # no zone
        ("until=2026-12-05", "until"),
        ("since=2026-12-05T15:00:00Z&until=2026-12-05T14:00:00Z", "until"),
        ("apartment=" + "9" * 33, "apartment"),
    ],
)
def test_api_access_bad_filter_422(query, field):
    """A bad filter is a 422 naming the field."""
    status, _, body = api_with_audit().request("GET", "/api/access?" + query)
    assert (status, body["error"], body["field"]) == (422, "invalid_field", field)


def test_api_access_unknown_parameter_400():
    """A parameter the route does not take is a 400 naming it (a typo must not list all)."""
    status, _, body = api_with_audit().request("GET", "/api/access?condominio=1")
    assert (status, body["error"]) == (400, "bad_request")
    assert "condominio" in body["detail"]


def test_api_access_store_down_503():
    """With the store down, GET /api/access is a 503."""
    s = api_with_audit()
    s.store.available = False
    status, headers, body = s.request("GET", "/api/access")
    assert (status, body["error"]) == (503, "store_unavailable")


def test_api_access_needs_the_token():
    """GET /api/access is behind the token like every route."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/api/access")[0] == 401
    assert s.request("GET", "/api/access", token="s3cret")[0] == 200


def calls_at(s, *hours):
    clock = Clock()
    clock.advance(T0)
    s.store._reactor = clock
    for hour in hours:
        clock.advance(T0 + hour * 3600 - clock.seconds())
        s.store.append_call({"hour": hour})


def test_api_delete_calls_before():
    """DELETE /api/calls?before= deletes the records stored before it and says how many."""
    s = Setup()
    calls_at(s, 0, 1, 2)  # 14:00Z, 15:00Z, 16:00Z
    status, _, body = s.request("DELETE", "/api/calls?before=2026-12-05T12:30:00-03:00")
    assert (status, body) == (200, {"deleted": 2})
    assert [c["hour"] for c in s.request("GET", "/api/calls")[2]["calls"]] == [2]


@pytest.mark.parametrize("query", ["", "?before=", "?before=ontem", "?before=2026-12-05T12:00:00"])
def test_api_delete_calls_needs_before_422(query):
    """before is required, ISO 8601 with a zone: else a 422 naming it, and nothing deleted."""
    s = Setup()
    calls_at(s, 0)
    status, _, body = s.request("DELETE", "/api/calls" + query)
    assert (status, body["field"]) == (422, "before")
    assert len(s.request("GET", "/api/calls")[2]["calls"]) == 1


def test_api_delete_calls_store_down_503():
    """With the store down, DELETE /api/calls is a 503."""
    s = Setup()
    s.store.available = False
    status, _, body = s.request("DELETE", "/api/calls?before=2026-12-05T14:00:00Z")
    assert (status, body["error"]) == (503, "store_unavailable")


def test_api_delete_calls_needs_the_token():
    """DELETE /api/calls is behind the token: without it nothing is deleted."""
    s = Setup(token=lambda: "s3cret")
    calls_at(s, 0)
    assert s.request("DELETE", "/api/calls?before=2030-01-01T00:00:00Z")[0] == 401
    assert len(s.store.hub.call_log) == 1


# ---------------------------------------------------------------- the server


class _Session:
    """What DoormanService.record_call reads of a finished session."""

    def __init__(self):
        from audiosocket.model import Extension

        self.extension = Extension(
            id=1, ai_extension="1001", ai_port=1, return_extension="1002", return_port=2,
            host="127.0.0.1", condominium_id=1,
        )
        self.outcome = "authorized"
        self.attempts = 0
        self.started_at = 0.0
        self.resident_at = self.decided_at = None

    def legs(self):
        return []

    def record(self):
        return {
            "uuid": "u1",
            "outcome": "authorized",
            "facts": {"intent": "delivery", "visitor_name": "Pedro", "apartment": "101"},
        }


def server(tmp_path, **privacy):
    ai, ret = free_ports(2)
    config = config_for("/nonexistent/redis.sock", tmp_path, ai, ret, privacy=privacy)
    return makeService(config, reactor=reactor, store=MemoryStore(), tts=object())


def test_server_wires_the_audit_and_retention(tmp_path):
    """makeService builds the access audit and the retention service; the API gets the audit."""
    svc = server(tmp_path)
    assert isinstance(svc.access, AccessLog) and svc.access.parent is svc
    assert isinstance(svc.retention, Retention) and svc.retention.parent is svc
    assert svc.api.access is svc.access


def test_call_record_keeps_the_visitor_name_by_default(tmp_path):
    """By default the call record names the visitor."""
    svc = server(tmp_path)
    svc.record_call(_Session())
    assert svc.store.recent_calls(1).result[0]["facts"]["visitor_name"] == "Pedro"


def test_call_record_without_visitor_name(tmp_path):
    """[privacy] keep_visitor_names = false: the call record's visitor_name is null."""
    svc = server(tmp_path, keep_visitor_names=False)
    svc.record_call(_Session())
    facts = svc.store.recent_calls(1).result[0]["facts"]
    assert facts == {"intent": "delivery", "visitor_name": None, "apartment": "101"}


def test_server_audit_reads_the_reloaded_privacy(tmp_path):
    """The server's audit reads [privacy] from the flow, where a reload puts it."""
    svc = server(tmp_path)
    svc.flow.privacy = PrivacyConfig(keep_visitor_names=False)
    svc.access.add(event())
    assert svc.store.access_events().result[0]["visitor"] is None


def test_server_gate_audits_through_the_access_log(tmp_path):
    """
    The server's gate appends every open to the access audit: an open withheld (the visitor
    left) lands in the store with its time, and without the visitor's name when
    [privacy] keep_visitor_names is false.
    """
    from audiosocket.config import GateConfig
    from audiosocket.gate import OpenRequest

    svc = server(tmp_path, keep_visitor_names=False)
    request = OpenRequest(
        condominium_id=1, authorized_by="resident", evidence="dtmf:1", who="Ana",
        uuid="u1", extension_id=1, apartment="101", visitor="Pedro",
    )
    svc.gate.withheld(GateConfig(kind="http"), request, "the visitor hung up")
    [entry] = svc.store.access_events().result
    assert (entry["result"], entry["error"], entry["who"]) == (
        "not_opened", "the visitor hung up", "Ana"
    )
    assert entry["visitor"] is None and entry["at"].endswith("Z")
