"""
Free TCP ports for the tests to listen on.

A port is picked outside the kernel's ephemeral range (Linux: 32768-60999), so no client
connection of another test can be given it between the moment it is picked and the moment a
server listens on it; and below the test Asterisk's RTP range (20000-40000, tests/pbx). Under
pytest-xdist each worker picks from its own slice of the range, so two workers never pick the
same port. Within a process the picks are random in the slice, each checked free by binding
it, and a port is not handed out twice in a row of picks.
"""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 10000, 20000

#: The ports handed out lately, not handed out again while they may still be in use.
_given: list[int] = []
_KEEP = 2000


def _slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (HIGH - LOW) // count
    return LOW + index * size, LOW + (index + 1) * size


def free_ports(n: int) -> list[int]:
    """C{n} distinct ports free right now on 127.0.0.1, drawn at random from this process's
    slice (never one handed out in the last L{_KEEP} picks)."""
    low, high = _slice()
    ports: list[int] = []
    recent = set(_given)
    for _ in range(20 * (high - low)):
        port = random.randrange(low, high)
        if port in recent or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            _given.extend(ports)
            del _given[:-_KEEP]
            return ports
    raise RuntimeError("no {} free ports between {} and {}".format(n, low, high))
