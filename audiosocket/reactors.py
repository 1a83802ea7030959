"""
The reactor a part uses when none is injected.

Library code takes C{reactor=None} and stores C{default_reactor(reactor)}: tests pass a
C{Clock} or a C{MemoryReactor}, the server passes its own, and only when nothing is passed
is the global reactor imported — here, at call time, never at module import (importing it
early would install the default reactor before twistd chooses one).
"""

from __future__ import annotations

from typing import Any


def default_reactor(reactor: Any = None) -> Any:
    """C{reactor}, or the global reactor when it is C{None}."""
    if reactor is None:
        from twisted.internet import reactor as _global

        return _global
    return reactor
