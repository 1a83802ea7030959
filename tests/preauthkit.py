"""
A harness for L{audiosocket.preauth} without threads or Redis: a Clock that runs
C{callFromThread} at once, a worker pool that runs its work inline (and counts it), a site
lookup with a small directory, and L{body} for a valid C{POST /api/preauth} body.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from twisted.internet.task import Clock
from twisted.python.failure import Failure

from audiosocket.flow.directory import Apartment, Directory
from audiosocket.preauth import Preauths
from audiosocket.store import MemoryStore

SAO_PAULO = "America/Sao_Paulo"
#: Local midnight starting Tuesday 1 December 2026 in São Paulo (UTC-3), in UTC.
TUESDAY = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
#: The clock's start: the Monday before, at 12:00 local time.
START = TUESDAY - timedelta(hours=12)


class Reactor(Clock):
    """A Clock whose C{callFromThread} runs the call at once (the pool below is inline)."""

    def __init__(self, at: datetime = START):
        super().__init__()
        self.advance(at.timestamp())

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def at(self, moment: datetime) -> None:
        """Move the clock to C{moment} (forwards only)."""
        delta = moment.timestamp() - self.seconds()
        assert delta >= 0, "the clock only moves forwards"
        self.advance(delta)


class InlinePool:
    """A C{ThreadPool} stand-in: the work runs at once on the caller's thread; C{calls} counts it."""

    def __init__(self):
        self.calls = 0

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.calls += 1
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Site:
    def __init__(self, directory):
        self.directory = directory


DIRECTORY = Directory(
    [
        Apartment(number="101", residents=("Ana Souza",), dial="SIP/1101"),
        Apartment(number="202", residents=("Ricardo Almeida",), dial="SIP/1202"),
    ]
)


def sites(condominiums=(1, 2)):
    table = {cid: Site(DIRECTORY) for cid in condominiums}
    return table.__getitem__


def body(**kw) -> dict:
    """A valid body: apartment 101 of condominium 1, the whole of December 2026, one use."""
    data = {
        "condominium_id": 1,
        "apartment": "101",
        "visitor_name": "Maria Silva",
        "valid_from": "2026-12-01T00:00:00-03:00",
        "valid_until": "2027-01-01T00:00:00-03:00",
    }
    data.update(kw)
    return {k: v for k, v in data.items() if v is not ...}


class Setup:
    """Preauths on a MemoryStore, the Reactor above and an InlinePool."""

    def __init__(self, max_per_condominium=1000, accepts_codes=None, at=START, **kw):
        self.reactor = Reactor(at)
        self.pool = InlinePool()
        self.store = MemoryStore(reactor=self.reactor, node_id="n")
        self.preauths = Preauths(
            self.store,
            reactor=self.reactor,
            pool=self.pool,
            sites=sites(),
            accepts_codes=accepts_codes,
            max_per_condominium=max_per_condominium,
            **kw,
        )
