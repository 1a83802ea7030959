"""
Shared fixtures.

pytest-twisted runs tests on the global reactor but, unlike trial, never checks what a test
left behind. The autouse fixture below does: a test that leaves a DelayedCall pending or a
socket open fails, naming what it left.
"""

from __future__ import annotations

import pytest
from twisted.internet import reactor


def _selectables():
    # The reactor's own wakers (installed when it first runs) are not a test's leftovers.
    return {
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if "Waker" not in type(s).__name__
    }


def _describe(delayed) -> str:
    try:
        return repr(delayed)
    except Exception:  # pragma: no cover - repr of odd callables
        return object.__repr__(delayed)


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """
    Fail a test that leaves DelayedCalls or connections on the global reactor.

    Tests that do not touch the reactor (StringTransport + Clock) pass trivially.
    """
    calls_before = set(reactor.getDelayedCalls())
    selectables_before = _selectables()
    yield
    if request.node.get_closest_marker("allow_leftovers"):
        return
    leftover_calls = [
        c for c in reactor.getDelayedCalls() if c not in calls_before and c.active()
    ]
    leftover_selectables = [s for s in _selectables() - selectables_before]
    problems = []
    if leftover_calls:
        problems.append(
            "pending DelayedCalls: " + ", ".join(_describe(c) for c in leftover_calls)
        )
    if leftover_selectables:
        problems.append(
            "open selectables: " + ", ".join(repr(s) for s in leftover_selectables)
        )
    if problems:
        # Clean up so one leaky test does not fail every test after it.
        for c in leftover_calls:
            c.cancel()
        for s in leftover_selectables:
            try:
                s.loseConnection()
            except Exception:
                pass
        pytest.fail("test left reactor state behind: " + "; ".join(problems))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_leftovers: the test hands its reactor state to a later fixture"
    )
