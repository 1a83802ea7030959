"""
SIGHUP's reload (L{audiosocket.service.DoormanService.reload}) on the service that
L{audiosocket.service.makeService} assembles, driven by the flow bench (exact time, no
sockets): what a reload applies reaches the next call, never the call in progress, and the
log names what only a restart applies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from audiosocket.service import makeService
from audiosocket.store import MemoryStore
from audiosocket.config import load_config
from flowkit import Bench
from test_flow import start_call

ETC = Path(__file__).resolve().parent.parent / "etc"


@pytest.fixture
def etc(tmp_path):
    """A copy of the shipped etc/ to edit."""
    shutil.copy(ETC / "audiosocket.toml", tmp_path / "audiosocket.toml")
    shutil.copy(ETC / "apartments.json", tmp_path / "apartments.json")
    return tmp_path


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.stop()


def serve(etc, bench):
    """The real service's registry and flow behind the bench's legs, clock and dialer."""
    svc = makeService(
        load_config(etc / "audiosocket.toml"),
        reactor=bench.reactor,
        store=MemoryStore(),
        dialer=bench.dialer,
        tts=bench.tts,
    )
    bench.registry = svc.registry
    svc.registry.add_observer(lambda s: bench.records.append(s.record()))
    return svc


def edit(etc, old: str, new: str) -> None:
    path = etc / "audiosocket.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def requests_of(bench, visitor):
    return [r for r in bench.dialer.requests if r.uuid == str(visitor.leg.uuid)]


def end_all(bench, svc):
    for session in list(svc.registry.sessions.values()):
        session.end("operator")
    bench.until(lambda: len(svc.registry) == 0)


def test_reloaded_ring_timeout_applies_to_the_next_call_only(etc, bench):
    """
    A call ringing when [flow] ring_timeout_s changes keeps its 30 s for every attempt; the
    next call rings for the new value.
    """
    svc = serve(etc, bench)
    first = start_call(bench)
    bench.until(lambda: requests_of(bench, first))
    edit(etc, "ring_timeout_s = 30", "ring_timeout_s = 12")
    assert svc.reload().result is True
    second = start_call(bench)
    bench.until(lambda: len(requests_of(bench, second)) == 2 and len(requests_of(bench, first)) == 2)
    assert [r.timeout_s for r in requests_of(bench, first)] == [30.0, 30.0]
    assert [r.timeout_s for r in requests_of(bench, second)] == [12.0, 12.0]
    end_all(bench, svc)


def test_reloaded_max_call_s_applies_to_the_next_call_only(etc, bench):
    """A lower [flow] max_call_s ends the next call at the new limit; the call in progress goes on."""
    svc = serve(etc, bench)
    first = start_call(bench)
    edit(etc, "max_call_s = 180", "max_call_s = 20")
    assert svc.reload().result is True
    second = start_call(bench)
    bench.until(lambda: len(bench.records) == 1, max_s=30)
    assert bench.records[0]["uuid"] == str(second.leg.uuid)
    assert bench.records[0]["ended_by"] == "max_call"
    assert svc.registry.sessions[first.leg.uuid].state != "ended"
    end_all(bench, svc)
    assert bench.records[1]["ended_by"] == "operator"


def test_reload_names_the_tables_that_need_a_restart(etc, bench):
    """
    The log says which changed tables apply to new calls and which need a restart; the
    service's config is replaced, keeping the running values of the latter.
    """
    svc = serve(etc, bench)
    edit(etc, "ring_timeout_s = 30", "ring_timeout_s = 12")
    edit(etc, "max_calls = 100", "max_calls = 50")
    with capturedLogs() as events:
        assert svc.reload().result is True
    lines = [e["log_format"].format(**e) for e in events]
    assert any("new calls use the changed [flow]" in line for line in lines), lines
    restart = [line for line in lines if "restart" in line]
    assert len(restart) == 1 and "[server]" in restart[0] and "[flow]" not in restart[0], lines
    assert svc.config.flow.ring_timeout_s == 12
    assert svc.config.server.max_calls == 100  # what runs: [server] waits for a restart


def test_reload_without_restart_tables_says_nothing_about_a_restart(etc, bench):
    """A reload changing only per-call settings logs no restart warning."""
    svc = serve(etc, bench)
    edit(etc, "ring_timeout_s = 30", "ring_timeout_s = 12")
    with capturedLogs() as events:
        assert svc.reload().result is True
    assert not [e for e in events if "restart" in e["log_format"]]
