"""
A config reload (what SIGHUP runs: L{DoormanService.reload}) and the calls around it: a
call in progress keeps the greeting, prompts and directory it started with; the next call
gets the new ones. The service's own flow is driven on the flow bench (exact time, no
sockets); the real process's SIGHUP is in tests/test_daemon.py.
"""

from __future__ import annotations

import json

import pytest

from audiosocket.config import load_config
from audiosocket.flow.prompts import greeting
from audiosocket.service import DoormanService
from audiosocket.store import MemoryStore
from flowkit import Bench

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
    svc = DoormanService(
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
