"""
A harness for the extension manager without sockets: a MemoryReactor with a clock, where
ports can be made busy and closing one is seen; the manager and its audio clock started on
it; the extensions tests add; and L{run} for what completes synchronously there.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from audiosocket.clock import AudioClock
from audiosocket.extension import ExtensionManager
from audiosocket.model import Extension


class _Port:
    """A listening port that leaves L{Reactor.open} when it stops listening."""

    def __init__(self, reactor, port, real):
        self._reactor, self.port, self._real = reactor, port, real

    def getHost(self):
        return self._real.getHost()

    def stopListening(self):
        self._reactor.open.discard(self.port)


class Reactor(MemoryReactor, Clock):
    """
    A MemoryReactor with a clock. Ports in C{busy} refuse to listen; C{open} holds the ports
    listening now, C{listening()} every port listened on (sorted).
    """

    def __init__(self):
        MemoryReactor.__init__(self)
        Clock.__init__(self)
        self.busy = set()
        self.open = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address in use"))
        real = MemoryReactor.listenTCP(self, port, factory, backlog, interface)
        self.open.add(port)
        return _Port(self, port, real)

    def listening(self):
        return sorted(p for p, *_ in self.tcpServers)


def ext_fields(id=1, ai=8080, ret=8081, condo=1) -> dict:
    """The fields of a valid extension: numbers 1000+id and 2000+id, on 127.0.0.1."""
    return {
        "id": id,
        "ai_extension": str(1000 + id),
        "ai_port": ai,
        "return_extension": str(2000 + id),
        "return_port": ret,
        "host": "127.0.0.1",
        "condominium_id": condo,
    }


def ext(id=1, ai=8080, ret=8081, condo=1, **kw) -> Extension:
    """An L{Extension} of L{ext_fields}, with any other field in C{kw}."""
    return Extension(**ext_fields(id, ai, ret, condo), **kw)


def run(coro_or_d):
    """Run a coroutine (or Deferred) that completes synchronously on the fake reactor."""
    d = defer.ensureDeferred(coro_or_d)
    results = []
    d.addBoth(results.append)
    assert results, "did not complete synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class ManagerSetup:
    """
    An L{ExtensionManager} binding 127.0.0.1, started with its L{AudioClock} on a new
    L{Reactor}; C{condos} are the condominiums that exist, C{fallback} its port fallback range,
    C{on_leg} and C{leg_options} passed on to the manager.
    """

    def __init__(self, condos=(1,), fallback=None, on_leg=None, leg_options=None):
        self.reactor = Reactor()
        self.clock = AudioClock(reactor=self.reactor)
        self.clock.startService()
        self.manager = ExtensionManager(
            clock=self.clock,
            on_leg=on_leg or (lambda svc, leg: None),
            reactor=self.reactor,
            bind="127.0.0.1",
            condominium_exists=lambda c: c in condos,
            port_fallback_range=fallback,
            leg_options=leg_options,
        )
        self.manager.startService()
