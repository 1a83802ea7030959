"""
A config reload (what SIGHUP runs: L{DoormanService.reload}) and the calls around it: a
call in progress keeps the greeting, prompts, directory and [flow] settings (ring timeout,
max call time) it started with; the next call gets the new ones; the log names the changed
tables only a restart applies. The service's own flow is driven on the flow bench (exact
time, no sockets); the real process's SIGHUP is in tests/test_daemon.py.
"""

from __future__ import annotations

import json

import pytest
from twisted.logger import capturedLogs

from audiosocket.config import load_config
from audiosocket.flow.prompts import greeting
from audiosocket.service import makeService
from audiosocket.store import MemoryStore
from flowkit import Bench
from test_flow import start_call

OLD_GREETING = "Condomínio Apoena, em que posso ajudar?"
NEW_GREETING = "Residencial Jatobá, pois não?"
NEW_CALLING = "Um momento, vou tocar no {apartment}."


def write_config(tmp_path, greeting_text: str, dial: str, calling: str | None = None):
    directory = tmp_path / "apartments-{}.json".format(dial.replace("/", "-"))
    directory.write_text(
        json.dumps([{"apartment_number": "101", "residents": ["Ana Souza"], "voip_number": dial}])
    )
    prompts = '[flow.prompts]\ncalling = "{}"\n'.format(calling) if calling else ""
    path = tmp_path / "audiosocket.toml"
    path.write_text(
        """
[server]
state_dir = "{state}"

[redis]
url = "unix:///nonexistent/redis.sock"

{prompts}
[[condominiums]]
id = 1
name = "Condomínio"
greeting = "{greeting}"
directory = "{directory}"
""".format(state=tmp_path / "var", prompts=prompts, greeting=greeting_text, directory=directory)
    )
    return path


@pytest.fixture
def served(tmp_path):
    """A bench running the real service's flow and sites (built from a config file)."""
    bench = Bench()
    path = write_config(tmp_path, OLD_GREETING, "SIP/1101")
    svc = makeService(
        load_config(path),
        reactor=bench.reactor,
        store=MemoryStore(),
        tts=bench.tts,
        dialer=bench.dialer,
    )
    bench.flow = svc.flow
    bench.registry._run_flow = svc.flow.run
    bench.registry._run_busy = svc.flow.run_busy
    yield bench, svc, tmp_path
    bench.stop()


def label(bench, text: str) -> int:
    return bench.tts.label(text)


def greeting_of(svc) -> str:
    site = svc.site(1)
    return greeting(site.prompts, site.greeting)


def test_call_in_progress_keeps_its_settings_the_next_call_gets_the_new(served):
    """
    A call starts; the config is rewritten (greeting, a prompt, the directory's dial
    string for 101) and reloaded. The call in progress still dials 101 the old way and hears
    the old "calling" prompt; the next call hears the new greeting and prompt and dials
    101 the new way.
    """
    bench, svc, tmp_path = served
    old_greeting = greeting_of(svc)
    old_calling = svc.site(1).prompts.say("calling", apartment="101")
    first = bench.connect()
    bench.advance(0.5)
    assert label(bench, old_greeting) in first.heard

    write_config(tmp_path, NEW_GREETING, "SIP/9101", calling=NEW_CALLING)
    assert svc.reload().result is True
    new_greeting = greeting_of(svc)
    new_calling = svc.site(1).prompts.say("calling", apartment="101")
    assert new_greeting != old_greeting and new_calling != old_calling

    first.press("101#")
    bench.until(lambda: len(bench.dialer.requests) == 1)
    assert bench.dialer.requests[0].dial == "SIP/1101"
    bench.until(lambda: label(bench, old_calling) in first.heard)

    second = bench.connect()
    bench.advance(0.5)
    second.press("101#")
    bench.until(lambda: len(bench.dialer.requests) == 2)
    assert bench.dialer.requests[1].dial == "SIP/9101"
    bench.until(lambda: label(bench, new_calling) in second.heard)

    assert label(bench, new_greeting) in second.heard
    assert label(bench, old_greeting) not in second.heard
    assert label(bench, new_greeting) not in first.heard
    assert label(bench, new_calling) not in first.heard
    first.drop()
    second.drop()
    bench.until(lambda: len(bench.records) == 2)


def test_invalid_reload_changes_nothing(served):
    """A reload of a broken file keeps the old settings for the next call (and says False)."""
    bench, svc, tmp_path = served
    before = svc.sites
    (tmp_path / "audiosocket.toml").write_text("[server\n")
    assert svc.reload().result is False
    assert svc.sites is before
    visitor = bench.connect()
    bench.advance(0.5)
    assert label(bench, greeting_of(svc)) in visitor.heard
    visitor.drop()
    bench.until(lambda: len(bench.records) == 1)


# ---------------------------------------------------------------- [flow] and what needs a restart
#
# The service's own registry behind the bench's legs: [flow] max_call_s is the registry's.

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


def test_reloaded_log_speech_reaches_the_operators_screen(etc, bench):
    """
    The operator's screen may show what callers said exactly when the flow may keep it:
    a reload turning C{[privacy] log_speech} on changes both at once.
    """
    svc = serve(etc, bench)
    assert not svc.flow.privacy.log_speech and not svc.api.dashboard.log_speech
    edit(etc, "log_speech = false", "log_speech = true")
    assert svc.reload().result is True
    assert svc.flow.privacy.log_speech and svc.api.dashboard.log_speech
