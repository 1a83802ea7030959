"""
What the process holds, for leak accounting (C{GET /api/status}, key C{"process"}): figures
that must come back to their idle values once the calls are over. C{benchmarks/soak.py}
compares them before and after a long run.

  - C{open_fds}: open file descriptors (listening ports, Redis, legs, HTTP connections);
  - C{rss_kb}: resident memory;
  - C{delayed_calls}: timers pending in the reactor (each call holds a few: ring window,
    maximum call time, prompts);
  - C{leg_routes}: admitted resident-leg UUIDs (each removed when its ring window ends);
  - C{settling}: ended calls whose record write has not finished;
  - C{records_unsaved}: records waiting for the store to come back.

Each is cheap (no walk over the heap): the endpoint may be polled.
"""

from __future__ import annotations

import os


def open_fds() -> int | None:
    """How many file descriptors this process has open (Linux: C{/proc/self/fd})."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def rss_kb() -> int | None:
    """This process's resident memory in KiB (Linux: C{/proc/self/statm})."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def process_figures(reactor, registry, records) -> dict:
    """The C{"process"} section of the status (see the module docstring)."""
    return {
        "open_fds": open_fds(),
        "rss_kb": rss_kb(),
        "delayed_calls": len(reactor.getDelayedCalls()),
        "leg_routes": len(registry.leg_uuids),
        "settling": len(registry._settling),
        "records_unsaved": len(records.unsaved),
    }
