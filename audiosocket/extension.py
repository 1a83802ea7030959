# -*- test-case-name: tests.test_extension,tests.test_control,tests.test_leg_tcp,tests.test_service_extensions,tests.test_api -*-
"""
Extensions (*ramais*) as live services.

An L{ExtensionService} owns the two listening ports of one extension: the AI port where
visitors arrive and the return port where the resident's call comes back. The
L{ExtensionManager} adds, changes, restarts and removes them at run time, keeps the maps
port → extension and extension number → id, and never touches one extension's calls when
another changes.

Listeners are opened with C{await endpoint.listen(...)} rather than through
C{StreamServerEndpointService}: a busy port must be an error the API caller sees (or a
fallback port), not a log line; and because a listening port's C{stopListening} leaves
accepted connections open, each extension tracks its legs and drains or hangs them up
itself.

Input is bounded everywhere: events a second per leg, bytes buffered for a peer that does
not read, connections per listening port and per peer address, busy (turned-away) calls,
the sample rates a peer may choose. The manager hands the C{[limits]} bounds to every
port's L{LegFactory} (C{leg_options}) and owns what spans ports: the count of connections
per peer address (C{peers}) and the refusals by reason code (C{refused}, the metrics'
C{audiosocket_refused_connections}). Hitting a bound closes that ONE connection with a
logged reason code, counted there, and never hurts another call; the bounds and their codes
are listed in L{audiosocket.leg}.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Callable, Iterable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .clock import AudioClock
from .leg import RESIDENT, VISITOR, AudioSocketProtocol, LegFactory
from .model import Extension, InvalidField
from .reactors import default_reactor

LISTENING = "listening"
FAILED = "failed"
DRAINING = "draining"
STOPPED = "stopped"


class Conflict(Exception):
    """An extension id or port is already taken (HTTP 409). Nothing was changed."""


class NotFound(KeyError):
    """No extension with that id (HTTP 404)."""

    def __str__(self):
        return "no extension with id {}".format(self.args[0])


class PortBusy(Conflict):
    def __init__(self, port: int, reason: str):
        super().__init__("port {} is busy: {}".format(port, reason))
        self.port = port


class ExtensionService(Service):
    """
    The two listening endpoints of one extension and the legs they accepted.

    @ivar status: L{LISTENING}, L{FAILED} (C{error} says why), L{DRAINING} (removed,
        waiting for its calls to end) or L{STOPPED}.
    """

    log = Logger()

    def __init__(
        self,
        extension: Extension,
        *,
        bind: str,
        clock: AudioClock,
        on_leg: Callable[["ExtensionService", AudioSocketProtocol], None],
        reactor,
        fallback_ports: Callable[[int], Iterable[int]] | None = None,
        leg_options: dict | None = None,
        refused=None,
        peers=None,
    ):
        self.extension = extension
        self.name = "extension-{}".format(extension.id)
        self._bind = bind
        self._reactor = reactor
        self._fallback_ports = fallback_ports
        options = dict(leg_options or {}, reactor=reactor, refused=refused, peers=peers)
        self.ai_factory = LegFactory(
            VISITOR, clock, lambda leg: on_leg(self, leg), **options
        )
        self.return_factory = LegFactory(
            RESIDENT, clock, lambda leg: on_leg(self, leg), **options
        )
        self.ai_factory.ext = self.return_factory.ext = extension.id
        self._ports: list = []
        self.bound_ai_port: int | None = None
        self.bound_return_port: int | None = None
        self.status = STOPPED
        self.error: str | None = None
        #: At shutdown calls are hung up cleanly; a removal may choose to drain instead.
        self.force_on_stop = True
        self.stopped: defer.Deferred = defer.succeed(None)

    # ------------------------------------------------------------ state

    @property
    def legs(self) -> set[AudioSocketProtocol]:
        return self.ai_factory.connections | self.return_factory.connections

    @property
    def active_calls(self) -> int:
        """Visitor legs connected now (a call is its visitor leg)."""
        return len(self.ai_factory.connections)

    def describe(self) -> dict:
        data = self.extension.to_dict()
        data.update(
            status=self.status,
            bound_ai_port=self.bound_ai_port,
            bound_return_port=self.bound_return_port,
            active_calls=self.active_calls,
        )
        if self.error:
            data["error"] = self.error
        return data

    # ------------------------------------------------------------ listening

    def _endpoint(self, port: int):
        host = self._bind
        try:
            is_v6 = ipaddress.ip_address(host).version == 6
        except ValueError:
            is_v6 = False
        cls = TCP6ServerEndpoint if is_v6 else TCP4ServerEndpoint
        # A large backlog: hundreds of calls may arrive at once after a PBX restart, and
        # Twisted's default of 50 leaves the rest waiting in the kernel queue.
        return cls(self._reactor, port, backlog=1024, interface=host)

    async def _listen_one(self, port: int, factory: LegFactory, taken: set[int]):
        candidates = [port]
        if self._fallback_ports is not None:
            candidates += [p for p in self._fallback_ports(port) if p not in taken]
        last = None
        for candidate in candidates:
            try:
                listening = await self._endpoint(candidate).listen(factory)
            except CannotListenError as e:
                last = e
                continue
            if candidate != port:
                self.log.warn(
                    "extension {ext}: port {port} busy, using fallback port {bound}",
                    ext=self.extension.id,
                    port=port,
                    bound=candidate,
                )
            return listening
        raise PortBusy(port, str(last.socketError if last else "no free fallback port"))

    async def listen(self, taken: set[int] = frozenset()) -> None:
        """
        Open both ports, or neither. With port fallback, a busy port is replaced by a free
        one from the configured range, skipping C{taken}.

        @raise PortBusy: a port could not be opened (nothing is left listening).
        """
        ext = self.extension
        opened = []
        try:
            ai = await self._listen_one(ext.ai_port, self.ai_factory, set(taken))
            opened.append(ai)
            ret = await self._listen_one(
                ext.return_port,
                self.return_factory,
                set(taken) | {ai.getHost().port},
            )
            opened.append(ret)
        except PortBusy as e:
            for p in opened:
                await defer.maybeDeferred(p.stopListening)
            self.status = FAILED
            self.error = str(e)
            raise
        await self.close_listeners()
        self._ports = opened
        self.bound_ai_port = ai.getHost().port
        self.bound_return_port = ret.getHost().port
        self.status = LISTENING
        self.error = None
        self.log.info(
            "extension {ext} ({number}) listening: AI port {ai}, return port {ret}",
            ext=ext.id,
            number=ext.ai_extension,
            ai=self.bound_ai_port,
            ret=self.bound_return_port,
        )

    async def close_listeners(self) -> None:
        ports, self._ports = self._ports, []
        # Both at once: a port closes on the next reactor turn, and a restart waits for it.
        await defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )

    async def relisten(self, taken: set[int]) -> None:
        """
        Stop listening, then listen again on the configured ports (a restart). The old
        listeners must close first: the new ones want the same ports. The ports are closed
        only for the time the old listeners take to close (one reactor turn) and the new
        ones to open; accepted connections (calls in progress) are not touched.

        @raise PortBusy: the ports could not be opened again (the extension is L{FAILED}).
        """
        await self.close_listeners()
        await self.listen(taken)

    async def rebind(self, extension: Extension, taken: set[int]) -> None:
        """
        Move to new ports (calls in progress stay where they are). The new ports are
        opened before the old ones close, so a failure leaves the old ones serving; a port
        kept from the old ones (or a failed extension) is a L{relisten}.
        """
        old = self.extension
        kept = {extension.ai_port, extension.return_port} & {
            self.bound_ai_port,
            self.bound_return_port,
        }
        if kept - {0, None} or not self._ports:
            self.extension = extension
            try:
                await self.relisten(taken)
            except PortBusy:
                # Back to the old settings, listening again if their ports can be had.
                self.extension = old
                try:
                    await self.listen(taken)
                except PortBusy:
                    pass
                raise
            return
        self.extension = extension
        old_ports, old_error = self._ports, self.error
        self._ports = []
        try:
            await self.listen(taken)
        except PortBusy:
            self._ports = old_ports
            self.status, self.error = LISTENING, old_error
            self.extension = old
            raise
        for p in old_ports:
            await defer.maybeDeferred(p.stopListening)

    async def stop(self, force: bool = False) -> None:
        """
        Stop listening at once, then let calls in progress end (or, with C{force}, hang
        them up cleanly: queued audio is dropped and the hangup frame sent).
        """
        await self.close_listeners()
        legs = list(self.legs)
        if legs:
            self.status = DRAINING
            self.log.info(
                "extension {ext}: {n} leg(s) {how}",
                ext=self.extension.id,
                n=len(legs),
                how="hung up" if force else "draining",
            )
        waits = []
        for leg in legs:
            if force:
                leg.stop_playback()
                waits.append(leg.hangup())
            else:
                waits.append(leg.when_closed())
        if waits:
            await defer.gatherResults(waits, consumeErrors=True)
        self.status = STOPPED

    def stopService(self):
        # Start-up listening is driven by the manager, so errors are seen; stopping (a
        # removal or shutdown) closes the ports and drains or hangs up the calls.
        Service.stopService(self)
        d = defer.Deferred.fromCoroutine(self.stop(force=self.force_on_stop))
        self.stopped = d
        return d


class ExtensionManager(MultiService):
    """
    All extensions of this process, changed live.

    @param on_leg: C{on_leg(extension_service, leg)} for every leg that sent its UUID.
    @param condominium_exists: tells whether a condominium id is configured (422 if not).
    @param leg_options: keywords for every port's L{LegFactory}: the handshake timeout,
        allowed peers and the C{[limits]} bounds (see L{audiosocket.leg}).
    @ivar refused: reason code → connections refused or closed for bad input, over every
        port (the metrics' C{audiosocket_refused_connections}).
    @ivar peers: address → connections open from it over every port, against which
        C{max_connections_per_peer} is checked.

    An extension left L{FAILED} (its port taken at start-up, or a restart that could not get
    its ports back) is retried on its own: after C{retry_initial_s}, then twice as long each
    time, at most C{retry_max_s} apart, until it listens, is changed or removed. Each failure
    and the recovery are logged.
    """

    log = Logger()
    name = "extensions"

    def __init__(
        self,
        *,
        clock: AudioClock,
        on_leg,
        reactor=None,
        bind: str = "127.0.0.1",
        condominium_exists: Callable[[int], bool] = lambda cid: True,
        port_fallback_range: tuple[int, int] | None = None,
        leg_options: dict | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ):
        super().__init__()
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self._clock = clock
        self._on_leg = on_leg
        self.bind = bind
        self._condominium_exists = condominium_exists
        self._fallback = port_fallback_range
        self._leg_options = leg_options or {}
        self.extensions: dict[int, ExtensionService] = {}
        self.draining: dict[int, ExtensionService] = {}
        self.refused: collections.Counter = collections.Counter()
        self.peers: collections.Counter = collections.Counter()
        # One change at a time: two concurrent POSTs must not both take port 9000.
        self._lock = defer.DeferredLock()
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        #: extension id → (the pending retry, attempts made so far), for FAILED extensions.
        self._retries: dict[int, tuple] = {}

    # ------------------------------------------------------------ maps

    @property
    def port_map(self) -> dict[int, int]:
        """Bound port → extension id, for every listening extension."""
        ports = {}
        for svc in self.extensions.values():
            for p in (svc.bound_ai_port, svc.bound_return_port):
                if p is not None:
                    ports[p] = svc.extension.id
        return ports

    @property
    def number_map(self) -> dict[str, int]:
        """Extension number (AI and return) → extension id."""
        numbers = {}
        for svc in self.extensions.values():
            numbers[svc.extension.ai_extension] = svc.extension.id
            numbers[svc.extension.return_extension] = svc.extension.id
        return numbers

    def get(self, ext_id: int) -> ExtensionService:
        try:
            return self.extensions[ext_id]
        except KeyError:
            raise NotFound(ext_id) from None

    def _claimed_ports(self, exclude: int | None = None) -> set[int]:
        ports = set()
        others = [s for i, s in self.extensions.items() if i != exclude]
        for svc in others + list(self.draining.values()):
            ports |= {svc.extension.ai_port, svc.extension.return_port}
            ports |= {p for p in (svc.bound_ai_port, svc.bound_return_port) if p}
        return ports

    def _fallback_ports(self, port: int):
        if self._fallback is None:
            return None
        lo, hi = self._fallback
        return lambda _port: range(lo, hi + 1)

    def _check(self, ext: Extension, exclude: int | None = None) -> None:
        if not self._condominium_exists(ext.condominium_id):
            raise InvalidField(
                "condominium_id", "no condominium {}".format(ext.condominium_id)
            )
        claimed = self._claimed_ports(exclude)
        for name in ("ai_port", "return_port"):
            port = getattr(ext, name)
            if port in claimed and port != 0:
                raise Conflict("{} {} is used by another extension".format(name, port))

    def _service(self, ext: Extension) -> ExtensionService:
        return ExtensionService(
            ext,
            bind=self.bind,
            clock=self._clock,
            on_leg=self._on_leg,
            reactor=self._reactor,
            fallback_ports=self._fallback_ports(0),
            leg_options=self._leg_options,
            refused=self.refused,
            peers=self.peers,
        )

    # ------------------------------------------------------------ changes

    async def add(self, ext: Extension) -> ExtensionService:
        """
        Add and start an extension; returns once both ports listen.

        @raise Conflict: id or port taken (nothing changed).
        @raise InvalidField: unknown condominium.
        """
        async with _locked(self._lock):
            if ext.id in self.extensions or ext.id in self.draining:
                raise Conflict("extension id {} already exists".format(ext.id))
            self._check(ext)
            svc = self._service(ext)
            await svc.listen(self._claimed_ports())
            self.extensions[ext.id] = svc
            svc.setServiceParent(self)
            return svc

    async def load(self, extensions: Iterable[Extension]) -> None:
        """
        Start-up: add every extension; one that cannot listen is kept as C{failed} (it is
        still configured, and a restart can bring it up) rather than dropped.
        """
        for ext in extensions:
            try:
                await self.add(ext)
            except PortBusy as e:
                svc = self._service(ext)
                svc.status, svc.error = FAILED, str(e)
                self.extensions[ext.id] = svc
                svc.setServiceParent(self)
                self._schedule_retry(svc)
            except (Conflict, InvalidField) as e:
                self.log.error(
                    "extension {ext} skipped: {error}", ext=ext.id, error=str(e)
                )

    async def update(self, ext: Extension) -> ExtensionService:
        """
        Change an extension. Changed ports are rebound (new ones opened before old ones
        close); calls in progress are untouched either way.
        """
        async with _locked(self._lock):
            svc = self.get(ext.id)
            self._check(ext, exclude=ext.id)
            old = svc.extension
            if (ext.ai_port, ext.return_port) != (old.ai_port, old.return_port) or (
                svc.status == FAILED
            ):
                others = self._claimed_ports(exclude=ext.id)
                try:
                    await svc.rebind(ext, others)
                finally:
                    self._retry_if_failed(svc)
            else:
                svc.extension = ext
            return svc

    async def restart(self, ext_id: int) -> ExtensionService:
        """Close and reopen an extension's ports (e.g. after a failure); calls stay up."""
        async with _locked(self._lock):
            svc = self.get(ext_id)
            try:
                await svc.relisten(self._claimed_ports(exclude=ext_id))
            finally:
                self._retry_if_failed(svc)
            return svc

    async def remove(self, ext_id: int, force: bool = False) -> ExtensionService:
        """
        Remove an extension: its ports stop listening before this returns; its calls
        drain in the background (or are hung up with C{force}), shown as C{draining}
        until the last one ends.
        """
        async with _locked(self._lock):
            svc = self.get(ext_id)
            self._cancel_retry(ext_id)
            await svc.close_listeners()
            del self.extensions[ext_id]
            self.draining[ext_id] = svc
            svc.force_on_stop = force
            stopping = self.removeService(svc)  # the child's stop Deferred: the drain

        def drained(result):
            self.draining.pop(ext_id, None)
            return result

        svc.stopped = stopping.addBoth(drained)
        return svc

    # ------------------------------------------------------------ failed extensions

    def _retry_if_failed(self, svc: ExtensionService) -> None:
        if svc.status == FAILED:
            self._schedule_retry(svc)
        elif svc.extension.id in self._retries:
            attempts = self._retries[svc.extension.id][1]
            self._cancel_retry(svc.extension.id)
            self.log.info(
                "extension {ext} listening again after {n} failed attempt(s)",
                ext=svc.extension.id,
                n=attempts,
            )

    def _schedule_retry(self, svc: ExtensionService) -> None:
        ext_id = svc.extension.id
        pending, attempts = self._retries.pop(ext_id, (None, 0))
        if pending is not None and pending.active():
            pending.cancel()
        attempts += 1
        delay = min(self._retry_initial_s * 2 ** (attempts - 1), self._retry_max_s)
        self.log.error(
            "extension {ext} is not listening: {error}; retry {n} in {delay}s",
            ext=ext_id,
            error=svc.error,
            n=attempts,
            delay=delay,
        )
        if not self.running:
            return
        call = self._reactor.callLater(delay, self._retry, ext_id)
        self._retries[ext_id] = (call, attempts)

    def _cancel_retry(self, ext_id: int) -> None:
        pending, _ = self._retries.pop(ext_id, (None, 0))
        if pending is not None and pending.active():
            pending.cancel()

    def _retry(self, ext_id: int) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self._retry_now(ext_id))
        d.addErrback(lambda f: self.log.failure("retrying extension {ext}", f, ext=ext_id))
        return d

    async def _retry_now(self, ext_id: int) -> None:
        async with _locked(self._lock):
            svc = self.extensions.get(ext_id)
            if svc is None or svc.status != FAILED or not self.running:
                return
            try:
                await svc.relisten(self._claimed_ports(exclude=ext_id))
            except PortBusy:
                pass
            self._retry_if_failed(svc)

    def stopService(self):
        for ext_id in list(self._retries):
            self._cancel_retry(ext_id)
        stopping = super().stopService()
        draining = [svc.stopped for svc in self.draining.values()]
        return defer.gatherResults([stopping] + draining, consumeErrors=True)


class _locked:
    """C{async with} for a L{DeferredLock} (the manager's, and L{audiosocket.control}'s)."""

    def __init__(self, lock: defer.DeferredLock):
        self._lock = lock

    async def __aenter__(self):
        await self._lock.acquire()

    async def __aexit__(self, *exc):
        self._lock.release()
