"""
Tests for L{audiosocket.preauth}: the fields a pre-authorisation is built from, its window,
weekdays and hours in the condominium's local time, codes (hashed, unique, shown once), their
redemption and the brute-force guard, on a L{Clock} with the hashing pool inline
(L{preauthkit}); and one run of the hashing on a real worker pool.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, time, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor as real_reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from audiosocket import preauth
from audiosocket.model import InvalidField
from audiosocket.preauth import ITERATIONS, CodeGuard, PreAuth, PreauthLimit, Preauths, parse_body
from audiosocket.store import MemoryStore, StoreUnavailable
from extkit import run
from preauthkit import SAO_PAULO, START, TUESDAY, Setup, body, sites

US = timedelta(microseconds=1)


def created(setup: Setup, **kw):
    """Create an item from L{body} with C{kw}; return (PreAuth, code)."""
    return run(setup.preauths.create(body(**kw)))


def redeem(setup: Setup, code, condominium_id=1, tz=SAO_PAULO):
    return run(setup.preauths.redeem(condominium_id, code, tz))


def item(**kw) -> PreAuth:
    """A PreAuth valid all of December 2026 (local time), one use, no weekdays or hours."""
    fields = dict(
        id="0" * 32,
        condominium_id=1,
        apartment="101",
        visitor_name="Maria",
        valid_from=TUESDAY,
        valid_until=TUESDAY + timedelta(days=31),
        weekdays=None,
        hours=None,
        uses=1,
        created_at=START,
        salt=b"s" * 16,
        code_hash=b"h" * 32,
    )
    fields.update(kw)
    return PreAuth(**fields)


def local(y, mo, d, h=0, mi=0, s=0, us=0) -> datetime:
    """A São Paulo wall-clock time (UTC-3 all year) as the UTC instant."""
    return datetime(y, mo, d, h, mi, s, us, tzinfo=timezone(timedelta(hours=-3))).astimezone(
        timezone.utc
    )


# ---------------------------------------------------------------- the fields


def test_body_is_checked_and_normalized():
    """A valid body gives UTC instants, sorted weekdays, local hours and the uses."""
    fields = parse_body(
        body(weekdays=[3, 1], hours="08:00-17:00", uses=4, apartment="0101"), START
    )
    assert fields["valid_from"] == TUESDAY
    assert fields["valid_from"].tzinfo == timezone.utc
    assert fields["weekdays"] == (1, 3)
    assert fields["hours"] == (time(8), time(17))
    assert fields["uses"] == 4
    assert fields["apartment"] == "101"


def test_uses_defaults_to_one_and_weekdays_hours_to_none():
    """Omitted uses is 1; omitted (or null) weekdays and hours mean every day, all day."""
    fields = parse_body(body(weekdays=None), START)
    assert (fields["uses"], fields["weekdays"], fields["hours"]) == (1, None, None)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"condominium_id": ...}, "condominium_id"),
        ({"apartment": ...}, "apartment"),
        ({"visitor_name": ...}, "visitor_name"),
        ({"valid_from": ...}, "valid_from"),
        ({"valid_until": ...}, "valid_until"),
        ({"colour": "blue"}, "colour"),
        ({"condominium_id": True}, "condominium_id"),
        ({"condominium_id": "1"}, "condominium_id"),
        ({"condominium_id": 0}, "condominium_id"),
        ({"apartment": "x" * 17}, "apartment"),
        ({"apartment": "the roof"}, "apartment"),
        ({"apartment": None}, "apartment"),
        ({"visitor_name": ""}, "visitor_name"),
        ({"visitor_name": "   "}, "visitor_name"),
        ({"visitor_name": "M" * 81}, "visitor_name"),
        ({"visitor_name": "Maria\x1b[31m"}, "visitor_name"),
        ({"visitor_name": 7}, "visitor_name"),
        ({"valid_from": "2026-12-01T00:00:00"}, "valid_from"),  # naive: refused
        ({"valid_until": "2027-01-01 00:00"}, "valid_until"),
        ({"valid_from": "tomorrow"}, "valid_from"),
        ({"valid_from": 1764558000}, "valid_from"),
        ({"valid_until": "2026-12-01T00:00:00-03:00"}, "valid_until"),  # equal to from
        ({"valid_until": "2026-11-30T00:00:00-03:00"}, "valid_until"),  # before from
        ({"valid_until": "2028-01-01T00:00:00Z"}, "valid_until"),  # over a year
        ({"weekdays": []}, "weekdays"),
        ({"weekdays": [7]}, "weekdays"),
        ({"weekdays": [-1]}, "weekdays"),
        ({"weekdays": [1, 1]}, "weekdays"),
        ({"weekdays": [True]}, "weekdays"),
        ({"weekdays": "mon"}, "weekdays"),
        ({"hours": "8:00-17:00"}, "hours"),
        ({"hours": "08:00-24:00"}, "hours"),
        ({"hours": "08:60-17:00"}, "hours"),
        ({"hours": "08:00-08:00"}, "hours"),
        ({"hours": "08:00"}, "hours"),
        ({"hours": ["08:00", "17:00"]}, "hours"),
        ({"uses": 0}, "uses"),
        ({"uses": 1001}, "uses"),
        ({"uses": True}, "uses"),
        ({"uses": 1.5}, "uses"),
    ],
)
def test_bad_field_is_named(change, field):
    """Each bad or missing field is refused with an error naming it."""
    data = body(**{k: v for k, v in change.items()})
    with pytest.raises(InvalidField) as e:
        parse_body(data, START)
    assert e.value.field == field


def test_window_already_past_refused():
    """An item whose valid_until is already past is refused (it could never be used)."""
    with pytest.raises(InvalidField) as e:
        parse_body(body(), datetime(2027, 1, 1, 3, tzinfo=timezone.utc))
    assert e.value.field == "valid_until"


def test_unknown_condominium_refused():
    """A condominium that is not configured is refused, naming condominium_id."""
    with pytest.raises(InvalidField) as e:
        created(Setup(), condominium_id=9)
    assert e.value.field == "condominium_id"


def test_apartment_not_in_directory_refused():
    """An apartment that is not in the condominium's directory is refused."""
    with pytest.raises(InvalidField) as e:
        created(Setup(), apartment="303")
    assert e.value.field == "apartment"


def test_condominium_without_codes_refused():
    """A condominium whose gate does not take codes ([condominiums.gate] codes) is refused."""
    with pytest.raises(InvalidField) as e:
        created(Setup(accepts_codes=lambda cid: cid != 1))
    assert e.value.field == "condominium_id"


def test_apartment_stored_as_the_directory_number():
    """"ap 0101" is stored as the directory's "101"."""
    p, _ = created(Setup(), apartment="ap 0101")
    assert p.apartment == "101"


# ---------------------------------------------------------------- window, weekdays, hours


def test_valid_from_is_inclusive():
    """Valid at the very instant of valid_from, not a microsecond before."""
    p = item()
    assert p.valid_at(p.valid_from, SAO_PAULO)
    assert not p.valid_at(p.valid_from - US, SAO_PAULO)


def test_valid_until_is_exclusive():
    """Not valid at the instant of valid_until; valid a microsecond before."""
    p = item()
    assert not p.valid_at(p.valid_until, SAO_PAULO)
    assert p.valid_at(p.valid_until - US, SAO_PAULO)


def test_weekday_starts_at_local_midnight():
    """
    A Tuesday-only item starts at Tuesday 00:00 in São Paulo (03:00 UTC), not at midnight
    UTC: Monday 23:59:59 local (Tuesday 02:59:59 UTC) is still Monday.
    """
    p = item(weekdays=(1,), valid_from=TUESDAY - timedelta(days=7))
    assert not p.valid_at(local(2026, 11, 30, 23, 59, 59, 999999), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 0, 0), SAO_PAULO)


def test_weekday_ends_at_local_midnight():
    """Tuesday 23:59:59 local (Wednesday 02:59:59 UTC) is Tuesday; 00:00 local is Wednesday."""
    p = item(weekdays=(1,))
    assert p.valid_at(local(2026, 12, 1, 23, 59, 59, 999999), SAO_PAULO)
    assert not p.valid_at(local(2026, 12, 2, 0, 0), SAO_PAULO)


def test_weekdays_judged_in_the_given_zone():
    """The same instant is Tuesday in São Paulo and already Wednesday in UTC."""
    p = item(weekdays=(1,))
    moment = local(2026, 12, 1, 22, 0)  # Wednesday 01:00 UTC
    assert p.valid_at(moment, SAO_PAULO)
    assert not p.valid_at(moment, "UTC")


def test_hours_edges():
    """08:00-17:00: from 08:00 local inclusive to 17:00 exclusive."""
    p = item(hours=(time(8), time(17)))
    assert not p.valid_at(local(2026, 12, 1, 7, 59, 59, 999999), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 8, 0), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 16, 59, 59, 999999), SAO_PAULO)
    assert not p.valid_at(local(2026, 12, 1, 17, 0), SAO_PAULO)


def test_overnight_hours_belong_to_the_day_they_start():
    """
    Tuesday, 22:00-06:00: Tuesday 22:00 to Wednesday 06:00 local. Tuesday's early morning
    belongs to Monday's night, Wednesday's evening to Wednesday: neither is valid.
    """
    p = item(weekdays=(1,), hours=(time(22), time(6)), valid_from=TUESDAY - timedelta(days=1))
    assert not p.valid_at(local(2026, 12, 1, 5, 59), SAO_PAULO)  # Monday's night
    assert not p.valid_at(local(2026, 12, 1, 21, 59, 59), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 22, 0), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 2, 0, 0), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 2, 5, 59, 59, 999999), SAO_PAULO)
    assert not p.valid_at(local(2026, 12, 2, 6, 0), SAO_PAULO)
    assert not p.valid_at(local(2026, 12, 2, 22, 0), SAO_PAULO)  # Wednesday's night


def test_until_midnight():
    """18:00-00:00 means 18:00 to the end of the day."""
    p = item(hours=(time(18), time(0)))
    assert not p.valid_at(local(2026, 12, 1, 17, 59, 59), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 18, 0), SAO_PAULO)
    assert p.valid_at(local(2026, 12, 1, 23, 59, 59, 999999), SAO_PAULO)
    assert not p.valid_at(local(2026, 12, 2, 0, 0), SAO_PAULO)


def test_no_use_left_is_never_valid():
    """An item with no use left is not valid, whatever the time."""
    assert not item(uses=0).valid_at(TUESDAY, SAO_PAULO)


def test_naive_moment_refused():
    """valid_at needs an aware instant: a naive one is a programming error."""
    with pytest.raises(ValueError):
        item().valid_at(datetime(2026, 12, 1, 12), SAO_PAULO)


# ---------------------------------------------------------------- codes


def test_code_is_six_digits_and_stored_only_hashed():
    """
    The code is 6 digits; the store keeps a PBKDF2-SHA256 hash with a random salt and the
    iteration count, never the code.
    """
    s = Setup()
    p, code = created(s)
    assert preauth.is_code(code)
    [stored] = s.store.hub.preauths.values()
    assert code not in repr(stored)
    assert stored["iterations"] == ITERATIONS
    salt = bytes.fromhex(stored["salt"])
    assert len(salt) == 16
    assert bytes.fromhex(stored["code_hash"]) == hashlib.pbkdf2_hmac(
        "sha256", code.encode(), salt, ITERATIONS
    )


def test_salts_differ_per_item():
    """Two items never share a salt (the same code gives different hashes)."""
    s = Setup()
    created(s)
    created(s)
    salts = {d["salt"] for d in s.store.hub.preauths.values()}
    assert len(salts) == 2


def test_public_form_has_no_code_salt_or_hash():
    """to_public leaves out the code, the salt and the hash; repr leaves out salt and hash."""
    s = Setup()
    p, code = created(s, weekdays=[1], hours="22:00-06:00")
    public = p.to_public()
    assert set(public) == {
        "id", "condominium_id", "apartment", "visitor_name", "valid_from", "valid_until",
        "weekdays", "hours", "uses", "created_at",
    }
    assert public["hours"] == "22:00-06:00"
    assert public["valid_from"] == "2026-12-01T03:00:00Z"
    assert p.salt.hex() not in repr(p) and p.code_hash.hex() not in repr(p)


def test_new_code_never_equals_a_live_code():
    """A drawn code equal to a live item's code of the same condominium is drawn again."""
    s = Setup()
    _, first = created(s)
    draws = iter([first, first, "654321" if first != "654321" else "123456"])
    s.preauths._draw = lambda: next(draws)
    _, second = created(s)
    assert second != first
    assert next(draws, None) is None  # both clashes were seen and drawn again


def test_same_code_allowed_in_another_condominium():
    """Uniqueness is per condominium: another condominium's code does not count."""
    s = Setup()
    _, first = created(s)
    s.preauths._draw = lambda: first
    _, second = created(s, condominium_id=2)
    assert second == first


def test_limit_per_condominium():
    """
    At max_per_condominium live items, a new one is refused (PreauthLimit) before any code
    is drawn or hashed.
    """
    s = Setup(max_per_condominium=2)
    created(s)
    created(s)
    before = s.pool.calls
    with pytest.raises(PreauthLimit):
        created(s)
    assert s.pool.calls == before
    created(s, condominium_id=2)  # another condominium has its own limit


def test_store_limit_holds_when_two_creations_race():
    """The store refuses an item over the limit even when the count read earlier was lower."""
    s = Setup(max_per_condominium=1)
    s.store.hub.preauths["f" * 32] = dict(item(id="f" * 32).to_dict())
    held = s.preauths.max_per_condominium
    s.preauths.max_per_condominium = 5  # as if the count was read before another creation
    assert not run(s.store.save_preauth(item(id="e" * 32).to_dict(), limit=held))


# ---------------------------------------------------------------- redeem


def test_right_code_redeems_and_consumes_the_use():
    """A right code, in time, gives the item with one use fewer; the last use deletes it."""
    s = Setup()
    p, code = created(s)
    s.reactor.at(TUESDAY)
    got = redeem(s, code)
    assert (got.id, got.visitor_name, got.uses) == (p.id, "Maria Silva", 0)
    assert s.store.hub.preauths == {}
    assert redeem(s, code) is None


def test_uses_run_out():
    """An item with 2 uses opens twice, then never."""
    s = Setup()
    _, code = created(s, uses=2)
    s.reactor.at(TUESDAY)
    assert redeem(s, code).uses == 1
    assert redeem(s, code).uses == 0
    assert redeem(s, code) is None


def test_wrong_code_refused_and_consumes_nothing():
    """A wrong code opens nothing and takes no use."""
    s = Setup()
    _, code = created(s)
    s.reactor.at(TUESDAY)
    wrong = "{:06d}".format((int(code) + 1) % 1000000)
    assert redeem(s, wrong) is None
    [stored] = s.store.hub.preauths.values()
    assert stored["uses"] == 1


def test_code_before_the_window_refused_then_accepted():
    """Before valid_from the code is refused without using it; from valid_from it opens."""
    s = Setup()
    _, code = created(s)
    s.reactor.at(TUESDAY - timedelta(seconds=1))
    assert redeem(s, code) is None
    s.reactor.at(TUESDAY)
    assert redeem(s, code) is not None


def test_code_outside_hours_and_weekdays_refused():
    """Tuesdays 08:00-17:00: refused at 07:59 Tuesday and 08:00 Wednesday, accepted 08:00 Tuesday."""
    s = Setup()
    _, code = created(s, weekdays=[1], hours="08:00-17:00", uses=5)
    s.reactor.at(local(2026, 12, 1, 7, 59))
    assert redeem(s, code) is None
    s.reactor.at(local(2026, 12, 1, 8, 0))
    assert redeem(s, code).uses == 4
    s.reactor.at(local(2026, 12, 2, 8, 0))
    assert redeem(s, code) is None


def test_hours_use_the_zone_given():
    """The same instant is within 08:00-17:00 in São Paulo but not in UTC."""
    s = Setup()
    _, code = created(s, hours="08:00-17:00", uses=2)
    s.reactor.at(local(2026, 12, 1, 15, 0))  # 18:00 UTC
    assert redeem(s, code, tz="UTC") is None
    assert redeem(s, code, tz=SAO_PAULO) is not None


def test_expired_item_refused_and_removed():
    """At valid_until the code is refused and the item is deleted from the store (lazily)."""
    s = Setup()
    _, code = created(s)
    s.reactor.at(datetime(2027, 1, 1, 3, tzinfo=timezone.utc))
    assert redeem(s, code) is None
    assert s.store.hub.preauths == {}


def test_code_of_another_condominium_refused():
    """A code opens only its own condominium's gate."""
    s = Setup()
    _, code = created(s)
    s.reactor.at(TUESDAY)
    assert redeem(s, code, condominium_id=2) is None
    assert redeem(s, code, condominium_id=1) is not None


@pytest.mark.parametrize(
    "code", ["12345", "1234567", "12345a", "", " 12345", "\u0661\u0662\u0663\u0664\u0665\u0666", None, 123456]
)
def test_malformed_code_refused_without_hashing(code):
    """A code that is not exactly six ASCII digits is None at once: nothing is hashed."""
    s = Setup()
    created(s)
    s.reactor.at(TUESDAY)
    before = s.pool.calls
    assert redeem(s, code) is None
    assert s.pool.calls == before


def test_only_items_valid_now_are_hashed():
    """A check hashes the typed code only against items valid at that moment."""
    s = Setup()
    created(s, weekdays=[2])  # Wednesdays only
    created(s, uses=3)
    s.reactor.at(TUESDAY)
    before = s.pool.calls
    redeem(s, "000000")
    assert s.pool.calls - before == 1


def test_store_down_fails_redeem_and_create():
    """With the store down, create and redeem fail with StoreUnavailable (API 503)."""
    s = Setup()
    _, code = created(s)
    s.store.available = False
    with pytest.raises(StoreUnavailable):
        redeem(s, code)
    with pytest.raises(StoreUnavailable):
        created(s)


# ---------------------------------------------------------------- list and delete


def test_list_filters_by_apartment_and_hides_expired():
    """list gives the live items of a condominium (of one apartment), oldest first."""
    s = Setup()
    a, _ = created(s)
    s.reactor.advance(1)
    b, _ = created(s, apartment="202")
    s.reactor.advance(1)
    c, _ = created(s, valid_until="2026-12-02T00:00:00-03:00")
    created(s, condominium_id=2)
    assert [p.id for p in run(s.preauths.list(1))] == [a.id, b.id, c.id]
    assert [p.id for p in run(s.preauths.list(1, "ap 202"))] == [b.id]
    s.reactor.at(local(2026, 12, 2))
    assert [p.id for p in run(s.preauths.list(1))] == [a.id, b.id]


def test_delete():
    """delete removes an item (its code stops working) and says whether it existed."""
    s = Setup()
    p, code = created(s)
    assert run(s.preauths.delete(p.id)) is True
    assert run(s.preauths.delete(p.id)) is False
    assert run(s.preauths.delete("../../etc")) is False
    s.reactor.at(TUESDAY)
    assert redeem(s, code) is None


# ---------------------------------------------------------------- the real pool


@pytest_twisted.ensureDeferred
async def test_hashing_runs_in_the_worker_pool(monkeypatch):
    """Every hash runs on a worker thread of the pool given, never on the reactor's thread."""
    threads = []
    original = preauth._hash

    def spy(*args):
        threads.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(preauth, "_hash", spy)
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-codes")
    pool.start()
    try:
        store = MemoryStore(reactor=real_reactor)
        p = Preauths(store, reactor=real_reactor, pool=pool, sites=sites())
        when = datetime.fromtimestamp(real_reactor.seconds(), timezone.utc)
        _, code = await p.create(
            body(valid_from=when.isoformat(), valid_until=(when + timedelta(days=1)).isoformat())
        )
        got = await p.redeem(1, code, "UTC")
    finally:
        pool.stop()
    assert got is not None
    assert len(threads) >= 2
    assert all(t is not threading.main_thread() for t in threads)


# ---------------------------------------------------------------- the guard


def guard(clock=None):
    return CodeGuard(clock or Clock(), failures=3, window_s=60, lock_s=300)


def test_guard_locks_at_the_failure_count():
    """The third wrong code within the window locks code entry on that extension."""
    clock = Clock()
    g = guard(clock)
    assert g.failed(7) is False
    assert g.failed(7) is False
    assert not g.locked(7)
    assert g.failed(7) is True
    assert g.locked(7)


def test_guard_lock_expires():
    """The lock lasts lock_s; then the count starts again from zero."""
    clock = Clock()
    g = guard(clock)
    for _ in range(3):
        g.failed(7)
    clock.advance(299.9)
    assert g.locked(7)
    clock.advance(0.1)
    assert not g.locked(7)
    assert g.failed(7) is False
    assert g.failed(7) is False
    assert g.failed(7) is True


def test_guard_forgets_failures_older_than_the_window():
    """Failures spread over more than the window never lock."""
    clock = Clock()
    g = guard(clock)
    for _ in range(10):
        assert g.failed(7) is False
        clock.advance(30)


def test_guard_is_per_extension():
    """A lock on one extension leaves the others free."""
    g = guard()
    for _ in range(3):
        g.failed(7)
    assert g.locked(7)
    assert not g.locked(8)
    assert g.failed(8) is False


def test_guard_failure_while_locked_keeps_the_lock():
    """A wrong code typed while locked does not extend or reset anything; it is refused."""
    clock = Clock()
    g = guard(clock)
    for _ in range(3):
        g.failed(7)
    clock.advance(100)
    assert g.failed(7) is True
    clock.advance(200)
    assert not g.locked(7)


def test_guard_forgets_extensions_whose_failures_are_old():
    """Past SWEEP_AT extensions with failures, those outside the window are forgotten."""
    clock = Clock()
    g = guard(clock)
    g.SWEEP_AT = 10
    for ext in range(10):
        g.failed(ext)
    clock.advance(61)
    g.failed(100)
    g.failed(101)
    assert set(g._recent) == {100, 101}


# ---------------------------------------------------------------- nothing leaks


@pytest.fixture
def logged():
    """Every log event emitted during the test, formatted, with its fields' reprs."""
    texts = []

    def observer(event):
        # Every field but the logger's own (log_time's digits could hold any 6 digits).
        fields = {k: v for k, v in event.items() if not k.startswith("log_")}
        texts.append("{} {!r} {!r}".format(formatEvent(event), event.get("log_format"), fields))

    globalLogPublisher.addObserver(observer)
    try:
        yield texts
    finally:
        globalLogPublisher.removeObserver(observer)


def test_codes_never_logged(logged):
    """
    Creating, redeeming (right and wrong), failing and locking out log what happened, and
    never the code.
    """
    s = Setup()
    p, code = created(s, uses=2)
    s.reactor.at(TUESDAY)
    assert redeem(s, code) is not None
    g = CodeGuard(s.reactor, failures=2, window_s=60, lock_s=60)
    wrong = "{:06d}".format((int(code) + 1) % 1000000)
    for _ in range(2):
        assert redeem(s, wrong) is None
        g.failed(5)
    s.reactor.at(datetime(2027, 1, 2, tzinfo=timezone.utc))
    assert redeem(s, code) is None  # expired: deleted
    text = "\n".join(logged)
    assert p.id in text  # the log does speak of the item
    assert "locked on extension 5" in text
    assert code not in text and wrong not in text
