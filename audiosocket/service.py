# -*- test-case-name: tests.test_service,tests.test_service_extensions,tests.test_reload,tests.test_tap,tests.test_records,tests.test_privacy,tests.test_tls,tests.test_metrics,tests.test_decision_tcp,tests.test_daemon -*-
"""
The root service: L{makeService} assembles the tree, L{DoormanService} runs it.

L{makeService(config)} builds and connects every part, top to bottom, and does nothing else
(magic-wormhole's rule); parts passed in (a store, a dialer, speech providers) are used as they
are, and then nothing of what they replace is built (no worker pool for a given C{tts}).
L{DoormanService} keeps only the lifecycle, the status and the reload.

What a start can tell at once is checked in C{startService}, before the reactor runs, and
raised as L{StartupError} (twistd then exits 1, in daemon mode its parent too): the API port is
bound there (but accepts no connection until the server is ready; the kernel queues them) and
the embedded Redis locks the state directory. The work that needs a running reactor — waiting
for Redis, loading extensions — happens in L{DoormanService.startup} after C{callWhenRunning};
a fatal error there is logged as one line, sets C{exit_code} and stops the reactor rather than
leaving a half-started server.

An extension that cannot listen is not fatal: it is retried (see
L{audiosocket.extension.ExtensionManager}), and shown as C{failed} by C{GET /healthz}
(503 "degraded"), C{/metrics} (C{audiosocket_extension_status}) and the ready line.

SIGHUP (L{DoormanService.reload}) re-reads the config file and validates it whole; then the
tables in L{NEW_CALL_TABLES} apply to the next call (a call in progress keeps the settings it
started with), and the log names every changed table of L{RESTART_TABLES}, which only a
restart applies. The residents directories are the store's (L{audiosocket.directories}): a
directory file only seeds the store for a condominium it never held, at start or when a reload
adds the condominium; a reload keeps the stored directories and logs which files differ.

Service tree::

    DoormanService (MultiService)
    ├── EmbeddedRedis        (only with [redis] url = "")
    ├── RedisStore
    ├── CallRecords
    ├── AccessLog            (the access audit, kept through outages like call records)
    ├── Retention            (deletes records and audit entries past [privacy] retention)
    ├── the worker pools     (speech synthesis and recognition, when built here)
    ├── AudioClock           (20 ms tick for every leg)
    ├── ExtensionManager     (one ExtensionService per extension)
    └── the dialer           (when it is a service: AMI)
"""

from __future__ import annotations

import functools
import signal
import time
import uuid as _uuid
from pathlib import Path

import attrs
from treq.client import HTTPClient
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from audiosocket import __version__
from audiosocket.access import AccessLog
from audiosocket.api import Api
from audiosocket.clock import AudioClock
from audiosocket.config import Config, ConfigError, load_config
from audiosocket.control import ExtensionControl
from audiosocket.dialer import make_dialer
from audiosocket.directories import DirectoryControl
from audiosocket.extension import ExtensionManager
from audiosocket.flow.call import DoormanFlow, Site
from audiosocket.flow.directory import Directory, DirectoryError
from audiosocket.flow.prompts import Prompts, greeting
from audiosocket.flow.understand import make_nlu
from audiosocket.gate import GateOpener, OperatorDesk
from audiosocket.listen import Listener, ListenSettings
from audiosocket.metrics import Metrics, timed_nlu, timed_stt, timed_tts
from audiosocket.preauth import CodeGuard, Preauths
from audiosocket.reactors import default_reactor
from audiosocket.redisproc import EmbeddedRedis, RedisStartError
from audiosocket.resources import process_figures
from audiosocket.retention import Retention
from audiosocket.session import SessionRegistry
from audiosocket.speech.factory import make_stt, make_tts
from audiosocket.speech.tts import make_pool
from audiosocket.spool import Spool
from audiosocket.store import RedisStore
from audiosocket.webhook import CallWebhook

#: Config tables a reload applies: to the next call (a call in progress keeps its own).
NEW_CALL_TABLES = ("flow", "audio", "privacy", "condominiums")
#: Config tables only a restart applies: listeners, connections and providers built at start.
RESTART_TABLES = ("server", "api", "redis", "limits", "speech", "dialer", "access", "events")


class StartupError(Exception):
    """The server cannot start; the message says why in one line."""


class CallRecords(Spool):
    """
    Writes finished calls to the store through a L{Spool}: a record the store cannot take
    now (Redis down) is kept, oldest first, and written when the store answers again; a
    call is never lost because its record came at a bad moment. At most C{keep} records wait.
    """

    name = "call-records"

    def __init__(self, store, *, reactor, retry_s: float = 5.0, keep: int = 10000):
        super().__init__(
            store.append_call, what="call record", reactor=reactor, retry_s=retry_s, keep=keep
        )


class PoolService(Service):
    """A worker ThreadPool as a service: started with the server, joined at shutdown."""

    def __init__(self, pool, name: str):
        self.pool = pool
        self.name = name

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        # Joins the workers: a synthesis in progress finishes first (they are short).
        self.pool.stop()


def build_sites(config: Config) -> dict[int, Site]:
    """
    Every condominium's directory and prompts, loaded now.

    @raise ConfigError: a directory file is unreadable or malformed (naming it).
    """
    sites = {}
    prompts = Prompts(config.flow.prompts)
    for i, condominium in enumerate(config.condominiums):
        try:
            directory = Directory.load(condominium.directory)
        except DirectoryError as e:
            raise ConfigError(
                config.path, "condominiums[{}].directory".format(i), str(e)
            ) from None
        sites[condominium.id] = Site(
            id=condominium.id,
            name=condominium.name,
            greeting=condominium.greeting,
            directory=directory,
            prompts=prompts,
            audio=condominium.audio_config(config.audio),
            max_calls=condominium.max_calls,
            flow=config.flow,
            strategy=condominium.dial.strategy,
            operator=condominium.operator,
            gate=condominium.gate,
            timezone=condominium.timezone,
            access=config.access,
        )
    return sites


def fixed_texts(sites) -> frozenset[str]:
    """Every site's fixed prompts and greeting: the texts that carry no caller's data."""
    texts = set()
    for site in sites.values():
        texts.update(site.prompts.fixed())
        texts.add(greeting(site.prompts, site.greeting))
        texts.add(greeting(site.prompts, site.greeting, codes=True))
    return frozenset(texts)


class DoormanService(MultiService):
    """
    The whole server: its lifecycle, status and reload. L{makeService} builds its parts and
    sets them as attributes (for the API, tests and benchmarks): C{store}, C{records},
    C{access}, C{retention}, C{tts}, C{stt}, C{nlu}, C{dialer}, C{metrics}, C{clock},
    C{flow}, C{registry}, C{manager}, C{control}, C{directories} (L{audiosocket.directories}),
    C{api}, C{preauths} and C{code_guard}
    (L{audiosocket.preauth}), C{gate} (L{audiosocket.gate}); C{embedded_redis}, C{http_pool}
    and C{http} (the speech providers' and the gate relays' HTTP client) and C{webhook}
    (L{audiosocket.webhook}) when built.

    @ivar config: the config in effect: the file's last valid reading, with the tables
        only a restart applies (L{RESTART_TABLES}) as they were at start.
    @ivar sites: condominium id → L{Site}, swapped whole by a reload.
    @ivar ready: fires once the extensions listen, the API is up and the fixed prompts are
        preloaded (or fails).
    @ivar api_port: the API's C{IListeningPort} once listening.
    """

    log = Logger()

    store = records = access = retention = tts = stt = nlu = dialer = metrics = None
    clock = flow = registry = manager = control = api = None
    embedded_redis = http_pool = http = webhook = None
    preauths = code_guard = gate = None
    directories = None

    def __init__(
        self,
        config: Config,
        sites: dict[int, Site],
        *,
        reactor,
        node_id: str,
        install_signals: bool = False,
    ):
        super().__init__()
        self._reactor = reactor
        self.config = config
        self.sites = sites
        self.node_id = node_id
        self.state_dir = Path(config.server.state_dir)
        self.started_wall = time.time()
        self._install_signals = install_signals
        self.ready: defer.Deferred = defer.Deferred()
        self.api_port = None
        self._reloading = None
        self._reload_again = False
        self._fixed_for = None
        self._fixed_texts: frozenset[str] = frozenset()

    # ------------------------------------------------------------ what the parts ask

    def site(self, condominium_id: int) -> Site:
        return self.sites[condominium_id]

    def has_condominium(self, condominium_id: int) -> bool:
        return condominium_id in self.sites

    def swap_directory(self, condominium_id: int, directory: Directory) -> None:
        """The next call of C{condominium_id} uses C{directory}; a call in progress keeps its own."""
        site = self.sites.get(condominium_id)
        if site is not None:
            self.sites = {**self.sites, condominium_id: attrs.evolve(site, directory=directory)}

    def condominium_limit(self, condominium_id: int) -> int | None:
        site = self.sites.get(condominium_id)
        return site.max_calls if site is not None else None

    def shared_text(self, text: str) -> bool:
        """
        May the audio of C{text} be kept in Redis? Only a fixed prompt or a greeting of the
        current sites: never a text carrying a caller's data (an announcement naming the visitor).
        """
        sites = self.sites
        if self._fixed_for is not sites:  # reloaded since: recompute
            self._fixed_texts = fixed_texts(sites)
            self._fixed_for = sites
        return text in self._fixed_texts

    def record_call(self, session):
        self.metrics.call_ended(session)
        record = session.record()
        if not self.flow.privacy.keep_visitor_names:  # [privacy]: the call record forgets it
            record["facts"] = dict(record["facts"], visitor_name=None)
        if self.webhook is not None:
            self.webhook.call_ended(record)
        return self.records.add(record)

    # ------------------------------------------------------------ status

    def status(self) -> dict:
        clock = self.clock
        return {
            "version": __version__,
            "node_id": self.node_id,
            "node": self.config.server.node_name,
            "uptime_s": round(time.time() - self.started_wall, 1),
            "sessions": {
                "active": self.registry.active(),
                "max_calls": self.registry.max_calls,
                "finished": self.registry.finished,
                "turned_away": self.registry.turned_away,
            },
            "clock": {
                "legs": len(clock),
                "late_ticks": clock.late_ticks,
                "skipped_frames": clock.skipped_frames,
                "lateness_p99_ms": clock.lateness.quantile(0.99),
                "lateness_max_ms": round(clock.lateness.max_ms, 2),
            },
            "refused": dict(self.manager.refused),
            "speech": {
                "tts": self.config.speech.tts,
                "stt": self.config.speech.stt,
                "nlu": self.config.speech.nlu,
            },
            "dialer": self.config.dialer.kind,
            "process": process_figures(self._reactor, self.registry, self.records),
        }

    # ------------------------------------------------------------ life

    #: The process's exit status after a start-up failure (see L{audiosocket.tap}).
    exit_code = 0

    def startService(self):
        """
        @raise StartupError: the API port cannot be bound, or the state directory is in use
            by another server (L{audiosocket.redisproc.StateDirLocked}); nothing is left
            started.
        """
        self._listen_api()
        try:
            super().startService()
        except Exception:
            port, self.api_port = self.api_port, None
            port.stopListening()
            raise
        self._reactor.callWhenRunning(self._begin)

    def _listen_api(self) -> None:
        endpoint = self.config.api.endpoint
        results: list = []
        serverFromString(self._reactor, endpoint).listen(self.api.site()).addBoth(results.append)
        if not results:  # not a stream endpoint that listens at once (tcp, ssl, unix)
            raise StartupError("API endpoint {} did not listen at once".format(endpoint))
        if isinstance(results[0], Failure):
            error = results[0].value
            reason = error.socketError if isinstance(error, CannotListenError) else error
            raise StartupError("API endpoint {}: {}".format(endpoint, reason))
        self.api_port = results[0]
        # Bound now, so a busy port stops the start; served once ready (connections wait in
        # the kernel's backlog meanwhile).
        stop_reading = getattr(self.api_port, "stopReading", None)
        if stop_reading is not None:
            stop_reading()

    def _begin(self):
        d = defer.Deferred.fromCoroutine(self.startup())
        d.addErrback(self._startup_failed)

    def _startup_failed(self, failure):
        self.log.error("audiosocket failed to start: {error}", error=_reason(failure))
        if not failure.check(StartupError, ConfigError, RedisStartError, defer.TimeoutError):
            # Not a failure we expect: the traceback helps whoever debugs it (-l - --loglevel).
            self.log.failure("start-up failure", failure, level=LogLevel.debug)
        self.exit_code = 1
        if not self.ready.called:
            self.ready.errback(failure)
        if self._install_signals:
            self._reactor.stop()

    async def startup(self) -> None:
        for unset in self.config.unset_secrets():
            self.log.warn("{path}: {problem}", path=str(self.config.path), problem=str(unset))
        if self.embedded_redis is not None:
            await self.embedded_redis.whenReady()
        await self.directories.start()
        await self.control.start(self.config.extensions)
        self._log_extension_drift()
        preloading = self._preload_prompts()
        start_reading = getattr(self.api_port, "startReading", None)
        if start_reading is not None:
            start_reading()
        if self._install_signals:
            self._install_sighup()
        # Ready means the fixed prompts are synthesized too (or failed, logged): a first call
        # does not wait for them, and nothing still synthesizes them when ready fires.
        await preloading
        extensions = self.manager.extensions.values()
        failed = sorted(s.extension.id for s in extensions if s.status == "failed")
        self.log.info(
            "audiosocket {version} ready: {n} extension(s), {failed} failed{ids}, API on {api}",
            version=__version__,
            n=len(self.manager.extensions),
            failed=len(failed),
            ids=" ({})".format(", ".join(map(str, failed))) if failed else "",
            api=self.config.api.endpoint,
        )
        self.ready.callback(self)

    def _log_extension_drift(self) -> None:
        """
        The file's C{[[extensions]]} only seed an empty store; after that the store (the API,
        audiosocket-admin) is the truth. Say so when the file says something else, rather than
        ignoring an edit silently.
        """
        if not getattr(self.control, "synced", True):
            return  # the store was unavailable: the file's extensions are served as they are
        live = {i: s.extension for i, s in self.manager.extensions.items()}
        differ = sorted(
            ext.id for ext in self.config.extensions if live.get(ext.id) != ext
        )
        if differ:
            self.log.warn(
                "[[extensions]] {ids} in {path} differ from the store, which is used: the "
                "file only seeds an empty store; change extensions with the API or "
                "audiosocket-admin",
                ids=", ".join(map(str, differ)),
                path=str(self.config.path),
            )

    def _preload_prompts(self) -> defer.Deferred:
        """Synthesize the fixed prompts ahead; a failure is logged, never fatal."""
        preload = getattr(self.tts, "preload", None)
        if preload is None:
            return defer.succeed(None)
        d = preload(sorted(fixed_texts(self.sites)), 8000)
        d.addErrback(lambda f: self.log.failure("preloading prompts failed", f))
        return d

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    #: Shutdown: how long the calls in progress get to say goodbye and have their records
    #: written before their connections are cut.
    SHUTDOWN_CALLS_S = 10.0
    #: ... and how long, after the cut, their records still get before the store stops.
    SHUTDOWN_RECORDS_S = 5.0

    async def _stop(self) -> None:
        """
        Shutdown order: the API stops listening; every call is ended (goodbye, hangup) and
        its record written (L{SessionRegistry.hangup_all}), bounded by L{SHUTDOWN_CALLS_S};
        calls still open then are cut and get L{SHUTDOWN_RECORDS_S} more for their records;
        only then do the children stop (the store last of all, L{MultiService} stops them
        in reverse order): a call ended by the shutdown never finds the store stopped.
        """
        if self.api_port is not None:
            port, self.api_port = self.api_port, None
            await defer.maybeDeferred(port.stopListening)
        self.api.shutdown()  # event streams and keep-alive connections close too
        self.control.stop()
        self.directories.stop()
        if not await self._end_calls(self.SHUTDOWN_CALLS_S):
            self.log.warn(
                "{n} call(s) still open at shutdown after {s} s; closing them",
                n=len(self.registry),
                s=self.SHUTDOWN_CALLS_S,
            )
            for session in list(self.registry.sessions.values()):
                for leg in session.legs():
                    if not leg.closed and leg.transport is not None:
                        leg.transport.abortConnection()
            if not await self._end_calls(self.SHUTDOWN_RECORDS_S):
                self.log.error(
                    "{n} call(s) did not end within {s} s of being cut at shutdown",
                    n=len(self.registry),
                    s=self.SHUTDOWN_RECORDS_S,
                )
        await super().stopService()
        if self.http_pool is not None:
            await self.http_pool.closeCachedConnections()

    async def _end_calls(self, timeout_s: float) -> bool:
        """End every call and wait for their records; C{False} if C{timeout_s} passed first."""
        ending = self.registry.hangup_all()
        ending.addErrback(lambda f: self.log.failure("ending the calls at shutdown", f))
        # The timeout cancels only this wait, never the calls' own Deferreds (cancelling the
        # gathered ones would fail with their first CancelledError, not a timeout).
        waited = defer.Deferred()
        ending.addBoth(lambda _: None if waited.called else waited.callback(None))
        waited.addTimeout(timeout_s, self._reactor)
        try:
            await waited
        except defer.TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ SIGHUP

    def _install_sighup(self) -> None:
        def handler(signum, frame):
            # Only schedule: the reload runs on the reactor, never inside the handler.
            self._reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, handler)

    def reload(self) -> defer.Deferred:
        """
        Re-read the config file and apply what applies to new calls (L{NEW_CALL_TABLES}: the
        condominiums' greetings and prompts (the directories stay the store's), C{[flow]}'s
        timings and limits — C{max_call_s} included —, C{[audio]} and C{[privacy]}); a call
        in progress keeps the settings it started with. The changed tables only a restart applies
        (L{RESTART_TABLES}) are named in the log. The new file is validated whole before
        anything is applied: an invalid file changes nothing and says why. Repeated requests
        while one runs coalesce into one more.

        @return: a Deferred firing with C{True} when the file was applied.
        """
        if self._reloading is not None:
            self._reload_again = True
            return self._reloading
        self._reloading = defer.maybeDeferred(self._reload)

        def done(result):
            self._reloading = None
            if self._reload_again:
                self._reload_again = False
                self.reload()
            return result

        return self._reloading.addBoth(done)

    def _reload(self) -> bool:
        path = self.config.path
        try:
            config = load_config(path)
            sites = build_sites(config)
        except ConfigError as e:
            self.log.error(
                "reload of {path} aborted without making any changes: {error}",
                path=str(path),
                error=str(e),
            )
            return False
        missing = {s.extension.condominium_id for s in self.manager.extensions.values()} - set(sites)
        if missing:
            self.log.error(
                "reload of {path} aborted without making any changes: condominium(s) {ids} "
                "still have extensions",
                path=str(path),
                ids=sorted(missing),
            )
            return False
        old = self.config
        applied = _changed(old, config, NEW_CALL_TABLES)
        needs_restart = _changed(old, config, RESTART_TABLES)
        # Each part reads its settings once per call: swapping them here changes the next
        # call only. The directories stay the store's: a file only seeds it.
        self.sites = self.directories.overlay(sites)
        self.directories.adopt()
        self.flow.privacy = config.privacy  # the operator's screen reads it from the flow
        self.registry.max_call_s = config.flow.max_call_s
        # In effect: the new file, but what only a restart applies as it started.
        self.config = attrs.evolve(config, **{name: getattr(old, name) for name in RESTART_TABLES})
        self.log.info(
            "reloaded {path}: {n} condominium(s); new calls use the changed {applied}",
            path=str(path),
            n=len(sites),
            applied=_tables(applied) or "nothing else (no other table changed)",
        )
        if needs_restart:
            self.log.warn(
                "reload of {path}: {tables} changed and need(s) a restart to apply; until "
                "then the server runs with the previous values",
                path=str(path),
                tables=_tables(needs_restart),
            )
        if config.extensions != old.extensions:
            self._log_extension_drift()
        self._preload_prompts()
        return True


def _changed(old: Config, new: Config, tables) -> list[str]:
    return [name for name in tables if getattr(old, name) != getattr(new, name)]


def _tables(names) -> str:
    """C{["flow", "condominiums"]} as C{"[flow], [[condominiums]]"} (as the file writes them)."""
    return ", ".join("[[{}]]".format(n) if n == "condominiums" else "[{}]".format(n) for n in names)


def _reason(failure) -> str:
    error = failure.value
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    return "{}".format(error) or type(error).__name__


def makeService(
    config: Config,
    *,
    reactor=None,
    store=None,
    dialer=None,
    tts=None,
    stt=None,
    nlu=None,
    install_signals: bool = False,
) -> DoormanService:
    """
    The root service for C{config}, its tree assembled top to bottom (see the module
    docstring). C{store}, C{dialer}, C{tts} and C{stt}/C{nlu} replace what C{config}
    describes; nothing of what they replace is built.

    @param install_signals: the real server (twistd): SIGHUP reloads, a start-up failure
        stops the reactor.
    @raise ConfigError: a setting only the parts can judge (a directory file, a provider's
        secret), naming it.
    """
    reactor = default_reactor(reactor)
    server = DoormanService(
        config,
        build_sites(config),
        reactor=reactor,
        node_id=_uuid.uuid4().hex[:12],
        install_signals=install_signals,
    )

    # Storage.
    if store is None:
        store = _redis_store(server, config, reactor)
    server.store = store
    if IService.providedBy(store):
        store.setServiceParent(server)
    server.records = CallRecords(store, reactor=reactor)
    server.records.setServiceParent(server)
    events = config.events
    if events.url:
        server.webhook = CallWebhook(
            events.url,
            secret=lambda: config.secret(events.secret_env),
            http=_http(server, reactor),
            reactor=reactor,
            timeout_s=events.timeout_s,
            retries=events.retries,
        )
        server.webhook.setServiceParent(server)
    privacy = lambda: server.flow.privacy  # noqa: E731 -- the reloaded settings, at each use
    server.access = AccessLog(store, reactor=reactor, privacy=privacy)
    server.access.setServiceParent(server)
    server.retention = Retention(store, reactor=reactor, privacy=privacy)
    server.retention.setServiceParent(server)

    # Speech and the dialer.
    try:
        if tts is None:
            tts = _tts(server, config, reactor)
        if stt is None and nlu is None:
            stt, nlu = _understanding(server, config, reactor)
        if dialer is None:
            dialer = make_dialer(config.dialer, config.secret, reactor=reactor)
    except ValueError as e:
        # The providers name the setting ("dialer.ami.secret_env: ... is not set").
        key, _, message = str(e).partition(": ")
        raise ConfigError(config.path, key if message else None, message or str(e)) from None
    # It reads the other parts only when scraped, so it can exist before them.
    server.metrics = metrics = Metrics(server, reactor=reactor)
    server.tts = timed_tts(tts, metrics)
    server.stt = timed_stt(stt, metrics)
    server.nlu = timed_nlu(nlu, metrics)
    server.dialer = dialer

    # Expected visitors: pre-authorisation codes (hashed in their own pool) and the guard
    # against guessing them.
    access = config.access
    server.preauths = Preauths(
        store,
        reactor=reactor,
        pool=_pool(server, "codes"),
        sites=server.site,
        accepts_codes=lambda cid: server.site(cid).codes,
        max_per_condominium=access.max_preauths,
    )
    server.code_guard = CodeGuard(
        reactor,
        failures=access.lockout_failures,
        window_s=access.lockout_window_s,
        lock_s=access.lockout_s,
    )

    # The gate.
    server.gate = GateOpener(
        dialer=dialer,
        http=_http(server, reactor),
        secret=config.secret,
        audit=server.access.add,
        reactor=reactor,
    )

    # Calls.
    server.clock = AudioClock(reactor=reactor)
    server.clock.setServiceParent(server)
    server.flow = DoormanFlow(
        tts=server.tts,
        dialer=dialer,
        sites=server.site,
        reactor=reactor,
        stt=server.stt,
        nlu=server.nlu,
        listener_for=functools.partial(_listener, reactor=reactor),
        privacy=config.privacy,
        gate=server.gate,
        preauths=server.preauths,
        code_guard=server.code_guard,
    )
    server.registry = SessionRegistry(
        reactor=reactor,
        run_flow=server.flow.run,
        run_busy=server.flow.run_busy,
        max_calls=config.server.max_calls,
        max_call_s=config.flow.max_call_s,
        max_busy=config.limits.max_busy,
        busy_max_s=config.limits.busy_max_s,
        on_end=server.record_call,
        condominium_limit=server.condominium_limit,
        return_host=config.server.return_host,
        node=config.server.node_name,
    )
    settings = config.server
    server.manager = ExtensionManager(
        clock=server.clock,
        on_leg=server.registry.on_leg,
        reactor=reactor,
        bind=settings.bind,
        condominium_exists=server.has_condominium,
        port_fallback_range=settings.port_fallback_range if settings.port_fallback else None,
        leg_options={
            "handshake_timeout": settings.handshake_timeout_s,
            "allowed_peers": settings.allowed_networks,
            **config.limits.leg_options,
        },
    )
    server.manager.setServiceParent(server)
    if IService.providedBy(dialer):
        dialer.setServiceParent(server)
    server.control = ExtensionControl(server.manager, store, reactor=reactor)
    server.directories = DirectoryControl(
        store, sites=lambda: server.sites, swap=server.swap_directory, reactor=reactor
    )

    # The API.
    api = config.api
    server.api = Api(
        server.control,
        server.registry,
        store,
        token=api.bearer_token if api.requires_token else None,
        status=server.status,
        metrics_registry=metrics.registry,
        allowed_hosts=api.host_names,
        max_body=api.max_body,
        refused=server.manager.refused,
        reactor=reactor,
        privacy=privacy,
        dialer=dialer,
        gates=OperatorDesk(server.gate, site=server.site, sessions=server.registry),
        preauths=server.preauths,
        access=server.access,
    )
    server.api.directories = server.directories
    return server


def _listener(leg, audio_config, *, reactor) -> Listener:
    """What hears a leg when speech recognition is on, with its condominium's C{[audio]}."""
    return Listener(leg, ListenSettings.for_role(audio_config, leg.role), reactor=reactor)


def _redis_store(server: DoormanService, config: Config, reactor) -> RedisStore:
    """The Redis store, and with C{[redis] url = ""} the embedded redis-server it uses."""
    redis = config.redis
    password = config.secret(redis.password_env) if redis.password_env else None
    if redis.embedded:
        server.embedded_redis = EmbeddedRedis(
            server.state_dir, reactor=reactor, maxmemory_mb=redis.embedded_maxmemory_mb
        )
        server.embedded_redis.setServiceParent(server)
        address = server.embedded_redis.address
    else:
        address = redis.url
    return RedisStore(
        address,
        password=password,
        timeout_s=redis.timeout_s,
        node_id=server.node_id,
        reactor=reactor,
        ca_file=str(redis.ca_file) if redis.ca_file else None,
        audit_maxlen=config.access.audit_maxlen,
    )


def _http(server: DoormanService, reactor) -> HTTPClient:
    """
    The one HTTP connection pool of every speech provider (keep-alive: no TLS handshake per
    utterance), made on first need and closed at shutdown.
    """
    if server.http_pool is None:
        server.http_pool = HTTPConnectionPool(reactor, persistent=True)
        server.http_pool.maxPersistentPerHost = 8
        server.http = HTTPClient(Agent(reactor, pool=server.http_pool))
    return server.http


def _pool(server: DoormanService, name: str):
    """A bounded worker pool, started and joined with the server."""
    pool = make_pool("audiosocket-" + name, maxthreads=2)
    PoolService(pool, name + "-pool").setServiceParent(server)
    return pool


def _tts(server: DoormanService, config: Config, reactor):
    # espeak is local and free: a Redis copy of its audio buys nothing.
    store = server.store if config.speech.tts != "espeak" else None
    return make_tts(
        config.speech,
        config.secret,
        pool=_pool(server, "tts"),
        store=store,
        shared=server.shared_text,
        reactor=reactor,
        http=_http(server, reactor),
    )


def _understanding(server: DoormanService, config: Config, reactor):
    http = _http(server, reactor)
    pool = _pool(server, "stt") if config.speech.stt != "none" else None
    stt = make_stt(config.speech, config.secret, pool=pool, reactor=reactor, http=http)
    nlu = make_nlu(config.speech, config.secret, reactor=reactor, http=http)
    return stt, nlu
