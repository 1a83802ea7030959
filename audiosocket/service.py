# -*- test-case-name: tests.test_service,tests.test_service_extensions,tests.test_tap,tests.test_records,tests.test_privacy,tests.test_tls,tests.test_metrics,tests.test_decision_tcp,tests.test_daemon -*-
"""
The root service: wires config, store, extensions, clock, sessions, flow and API together.

C{makeService(config)} only builds and connects objects (magic-wormhole's rule); the work
that needs a running reactor — waiting for Redis, loading extensions, opening the API port —
happens in L{DoormanService.startup} after C{callWhenRunning}, and a fatal error there is
logged and stops the reactor rather than leaving a half-started server.

Service tree::

    DoormanService (MultiService)
    ├── EmbeddedRedis        (only with [redis] url = "")
    ├── RedisStore
    ├── the worker pools     (speech synthesis and recognition)
    ├── AudioClock           (20 ms tick for every leg)
    ├── ExtensionManager     (one ExtensionService per extension)
    └── the dialer           (when it is a service: AMI)
"""

from __future__ import annotations

import collections
import signal
import time
import uuid as _uuid
from pathlib import Path

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from audiosocket import __version__
from audiosocket.clock import AudioClock
from audiosocket.config import Config, ConfigError, load_config
from audiosocket.control import ExtensionControl
from audiosocket.dialer import make_dialer
from audiosocket.extension import ExtensionManager
from audiosocket.flow.call import DoormanFlow, Site
from audiosocket.flow.directory import Directory, DirectoryError
from audiosocket.flow.prompts import Prompts, greeting
from audiosocket.resources import process_figures
from audiosocket.session import SessionRegistry
from audiosocket.speech.tts import make_pool


class CallRecords(Service):
    """
    Writes finished calls to the store. A record the store cannot take now (Redis down) is
    kept, oldest first, and written when the store answers again: a call is never lost
    because its record came at a bad moment. At most C{keep} records wait.
    """

    log = Logger()
    name = "call-records"

    def __init__(self, store, *, reactor, retry_s: float = 5.0, keep: int = 10000):
        self._store = store
        self._reactor = reactor
        self._retry_s = retry_s
        self.unsaved: collections.deque = collections.deque(maxlen=keep)
        self._timer = None
        self._flushing = False

    def add(self, record: dict) -> defer.Deferred:
        if self.unsaved:
            self.unsaved.append(record)  # keep the order: after those already waiting
            return defer.succeed(None)
        d = self._store.append_call(record)
        d.addErrback(self._failed, record)
        return d

    def _failed(self, failure, record):
        self.log.warn(
            "call record {uuid} not saved ({error}); kept for retry",
            uuid=record.get("uuid"),
            error=failure.getErrorMessage(),
        )
        self.unsaved.appendleft(record)
        self._schedule()

    def _schedule(self):
        if self.running and (self._timer is None or not self._timer.active()):
            self._timer = self._reactor.callLater(self._retry_s, self._flush)

    def _flush(self):
        return defer.Deferred.fromCoroutine(self._write_waiting())

    async def _write_waiting(self):
        self._timer = None
        while self.unsaved:
            record = self.unsaved[0]
            try:
                await self._store.append_call(record)
            except Exception:
                self._schedule()
                return
            self.unsaved.popleft()
        self.log.info("call records written after the store came back")

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.unsaved:
            self.log.error("{n} call record(s) could not be saved before shutdown", n=len(self.unsaved))


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
        )
    return sites


def fixed_texts(sites) -> frozenset[str]:
    """Every site's fixed prompts and greeting: the texts that carry no caller's data."""
    texts = set()
    for site in sites.values():
        texts.update(site.prompts.fixed())
        texts.add(greeting(site.prompts, site.greeting))
    return frozenset(texts)


class DoormanService(MultiService):
    """
    The whole server. Attributes are the parts, for the API, tests and benchmarks:
    C{store}, C{manager}, C{clock}, C{registry}, C{flow}, C{control}, C{tts}, C{dialer}.

    @ivar ready: fires once the extensions listen and the API is up (or fails).
    @ivar api_port: the API's C{IListeningPort} once listening.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        *,
        reactor=None,
        store=None,
        dialer=None,
        tts=None,
        stt=None,
        nlu=None,
        install_signals: bool = False,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.config = config
        self.node_id = _uuid.uuid4().hex[:12]
        self.started_wall = time.time()
        self._install_signals = install_signals
        self.ready: defer.Deferred = defer.Deferred()
        self.api_port = None
        self._reloading = None
        self._reload_again = False
        self.sites = build_sites(config)
        self._fixed_for = None
        self._fixed_texts: frozenset[str] = frozenset()

        state_dir = config.server.state_dir
        self.state_dir = Path(state_dir)

        # Storage.
        self.embedded_redis = None
        if store is None:
            store = self._make_store(config)
        self.store = store
        if IService.providedBy(store):
            store.setServiceParent(self)
        self.records = CallRecords(store, reactor=reactor)
        self.records.setServiceParent(self)

        # Speech. One HTTP connection pool for every provider (keep-alive: no TLS handshake
        # per utterance), closed at shutdown.
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.http_pool = HTTPConnectionPool(reactor, persistent=True)
        self.http_pool.maxPersistentPerHost = 8
        self.http = HTTPClient(Agent(reactor, pool=self.http_pool))
        self.tts_pool = make_pool("audiosocket-tts", maxthreads=2)
        PoolService(self.tts_pool, "tts-pool").setServiceParent(self)
        self.stt_pool = make_pool("audiosocket-stt", maxthreads=2)
        PoolService(self.stt_pool, "stt-pool").setServiceParent(self)
        try:
            self.tts = tts if tts is not None else self._make_tts(config)
            if stt is None and nlu is None:
                stt, nlu = self._make_understanding(config)
            if dialer is None:
                dialer = make_dialer(config.dialer, config.secret, reactor=reactor)
        except ValueError as e:
            # The providers name the setting ("dialer.ami.secret_env: ... is not set").
            key, _, message = str(e).partition(": ")
            raise ConfigError(config.path, key if message else None, message or str(e)) from None
        self.metrics = self._make_metrics()
        from audiosocket.metrics import timed_nlu, timed_stt, timed_tts

        self.tts = timed_tts(self.tts, self.metrics)
        self.stt = timed_stt(stt, self.metrics)
        self.nlu = timed_nlu(nlu, self.metrics)

        # Calls.
        self.clock = AudioClock(reactor=reactor)
        self.clock.setServiceParent(self)
        self.dialer = dialer
        self.flow = DoormanFlow(
            tts=self.tts,
            dialer=self.dialer,
            sites=self.site,
            flow_config=config.flow,
            reactor=reactor,
            stt=self.stt,
            nlu=self.nlu,
            listener_for=self._listener_for,
            privacy=config.privacy,
        )
        self.registry = SessionRegistry(
            reactor=reactor,
            run_flow=self.flow.run,
            run_busy=self.flow.run_busy,
            max_calls=config.server.max_calls,
            max_call_s=config.flow.max_call_s,
            max_busy=config.limits.max_busy,
            busy_max_s=config.limits.busy_max_s,
            on_end=self._record,
            condominium_limit=lambda cid: self.sites[cid].max_calls if cid in self.sites else None,
            return_host=config.server.return_host,
            node=config.server.node_name,
        )
        server = config.server
        self.manager = ExtensionManager(
            clock=self.clock,
            on_leg=self.registry.on_leg,
            reactor=reactor,
            bind=server.bind,
            condominium_exists=lambda cid: cid in self.sites,
            port_fallback_range=server.port_fallback_range if server.port_fallback else None,
            leg_options={
                "handshake_timeout": server.handshake_timeout_s,
                "allowed_peers": server.allowed_networks,
                **config.limits.leg_options,
            },
        )
        self.manager.setServiceParent(self)
        if IService.providedBy(dialer):
            dialer.setServiceParent(self)
        self.control = ExtensionControl(self.manager, self.store, reactor=reactor)
        self.api = self._make_api()

    # ------------------------------------------------------------ parts

    def _make_store(self, config: Config):
        from audiosocket.store import RedisStore

        password = config.secret(config.redis.password_env) if config.redis.password_env else None
        if config.redis.embedded:
            from audiosocket.redisproc import EmbeddedRedis

            self.embedded_redis = EmbeddedRedis(
                self.state_dir,
                reactor=self._reactor,
                maxmemory_mb=config.redis.embedded_maxmemory_mb,
            )
            self.embedded_redis.setServiceParent(self)
            address = self.embedded_redis.address
        else:
            address = config.redis.url
        return RedisStore(
            address,
            password=password,
            timeout_s=config.redis.timeout_s,
            node_id=self.node_id,
            reactor=self._reactor,
        )

    def _make_tts(self, config: Config):
        from audiosocket.speech.factory import make_tts

        # espeak is local and free: a Redis copy of its audio buys nothing.
        store = self.store if config.speech.tts != "espeak" else None
        return make_tts(
            config.speech,
            config.secret,
            pool=self.tts_pool,
            store=store,
            shared=self._shared_text,
            reactor=self._reactor,
            http=self.http,
        )

    def _shared_text(self, text: str) -> bool:
        """
        May the audio of C{text} be kept in Redis? Only a fixed prompt or a greeting of the
        current sites: never a text carrying a caller's data (an announcement naming the visitor).
        """
        sites = self.sites
        if self._fixed_for is not sites:  # reloaded since: recompute
            self._fixed_texts = fixed_texts(sites)
            self._fixed_for = sites
        return text in self._fixed_texts

    def _make_understanding(self, config: Config):
        from audiosocket.flow.understand import make_nlu
        from audiosocket.speech.factory import make_stt

        stt = make_stt(
            config.speech, config.secret, pool=self.stt_pool, reactor=self._reactor, http=self.http
        )
        nlu = make_nlu(config.speech, config.secret, reactor=self._reactor, http=self.http)
        return stt, nlu

    def _listener_for(self, leg, audio_config):
        from audiosocket.listen import Listener, ListenSettings

        settings = ListenSettings.for_role(audio_config, leg.role)
        return Listener(leg, settings, reactor=self._reactor)

    def _make_metrics(self):
        from audiosocket.metrics import Metrics

        # It reads the other parts only when scraped, so it can exist before them.
        return Metrics(self, reactor=self._reactor)

    def _make_api(self):
        from audiosocket.api import Api

        api_config = self.config.api
        token = api_config.bearer_token if api_config.requires_token else None
        return Api(
            self.control,
            self.registry,
            self.store,
            token=token,
            status=self.status,
            metrics_registry=self.metrics.registry,
            allowed_hosts=api_config.host_names,
            max_body=api_config.max_body,
            refused=self.manager.refused,
        )

    def site(self, condominium_id: int) -> Site:
        return self.sites[condominium_id]

    def _record(self, session):
        self.metrics.call_ended(session)
        return self.records.add(session.record())

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

    def startService(self):
        super().startService()
        self._reactor.callWhenRunning(self._begin)

    def _begin(self):
        d = defer.Deferred.fromCoroutine(self.startup())
        d.addErrback(self._startup_failed)

    def _startup_failed(self, failure):
        self.log.failure("audiosocket failed to start", failure)
        if not self.ready.called:
            self.ready.errback(failure)
        if self._install_signals:
            self._reactor.stop()

    async def startup(self) -> None:
        if self.embedded_redis is not None:
            await self.embedded_redis.whenReady()
        await self.control.start(self.config.extensions)
        self._preload_prompts()
        site = self.api.site()
        self.api_port = await serverFromString(self._reactor, self.config.api.endpoint).listen(site)
        if self._install_signals:
            self._install_sighup()
        self.log.info(
            "audiosocket {version} ready: {n} extension(s), API on {api}",
            version=__version__,
            n=len(self.manager.extensions),
            api=self.config.api.endpoint,
        )
        self.ready.callback(self)

    def _preload_prompts(self) -> None:
        preload = getattr(self.tts, "preload", None)
        if preload is None:
            return
        d = preload(sorted(fixed_texts(self.sites)), 8000)
        d.addErrback(lambda f: self.log.failure("preloading prompts failed", f))

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
        self.control.stop()
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
        await self.http_pool.closeCachedConnections()

    async def _end_calls(self, timeout_s: float) -> bool:
        """End every call and wait for their records; C{False} if C{timeout_s} passed first."""
        ending = self.registry.hangup_all()
        ending.addTimeout(timeout_s, self._reactor)
        try:
            await ending
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
        Re-read the config file and apply the condominiums' settings (greeting, directory,
        prompts). The new file is validated whole before anything is applied: an invalid
        file changes nothing and says why. Calls in progress keep the settings they started
        with. Repeated requests while one runs coalesce into one more.
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
            self.log.error("reload of {path} aborted without making any changes: {error}", path=str(path), error=str(e))
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
        self.sites = sites
        self.log.info("reloaded {path}: {n} condominium(s)", path=str(path), n=len(sites))
        return True


def makeService(config: Config, reactor=None, **parts) -> DoormanService:
    """The root service for C{config} (see the module docstring for its tree)."""
    return DoormanService(config, reactor=reactor, **parts)

