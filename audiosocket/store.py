"""
Persistence of extensions, call records, the access audit and residents directories, and
live changes across nodes.

L{IStore} is the boundary the rest of the server sees. L{RedisStore} implements it on
txredisapi; L{MemoryStore} implements it in memory, for unit tests of other modules and for a
server run without Redis.

txredisapi waits forever for a connection while Redis is down, so every command here carries
its own timeout and a timeout or a lost connection becomes L{StoreUnavailable} (HTTP 503).
Replies are read as raw bytes (C{charset=None}, C{convertNumbers=False}): blobs stay
binary-safe and JSON is decoded here, once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from attrs import frozen
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .model import Extension
from .reactors import default_reactor

PUT = "put"
DELETE = "delete"

DEFAULT_CALLS_MAXLEN = 10000
MAX_RECENT_CALLS = 10000
DEFAULT_AUDIT_MAXLEN = 100000
#: Stream entries read per round trip while listing call records or access entries.
STREAM_PAGE = 500


class StoreUnavailable(Exception):
    """Redis is down, or a command did not complete in time (the API answers 503)."""


class StoreRetry:
    """
    What serves from memory while the store was unavailable at start-up (extensions, the
    residents directories) loads from it later: C{attempt()} (a coroutine function) is run
    every C{every_s} seconds until it returns. A L{StoreUnavailable} is logged as a warning
    naming C{what}, anything else as a failure; either way it is tried again. C{stop()} (at
    shutdown) cancels what is pending; nothing runs after it.
    """

    log = Logger()

    def __init__(self, reactor, every_s: float, attempt: Callable[[], Any], what: str):
        self._reactor = reactor
        self.every_s = every_s
        self._attempt = attempt
        self._what = what
        self._call = None
        self._stopped = False

    def schedule(self) -> None:
        if not self._stopped:
            self._call = self._reactor.callLater(self.every_s, self._run)

    def _run(self) -> defer.Deferred:
        self._call = None
        return defer.Deferred.fromCoroutine(self._try())

    async def _try(self) -> None:
        try:
            await self._attempt()
        except StoreUnavailable as e:
            self.log.warn(
                "store still unavailable ({error}); loading {what} again in {s}s",
                error=str(e),
                what=self._what,
                s=self.every_s,
            )
            self.schedule()
        except Exception:
            self.log.failure("loading {what} from the store failed", what=self._what)
            self.schedule()

    def stop(self) -> None:
        self._stopped = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


class _Refused(Exception):
    """Redis answered, refusing the command for now (see L{_REFUSALS})."""


@frozen
class ExtensionChange:
    """
    An extension put or deleted by another node sharing the store.

    @ivar kind: L{PUT} or L{DELETE}.
    @ivar extension: the new value for a put; C{None} for a delete.
    @ivar node_id: the node that made the change.
    """

    kind: str
    ext_id: int
    extension: Extension | None
    node_id: str


class IStore(Interface):
    """
    Extensions, finished-call records and a binary cache, shared by every node using the
    same backing store. Every method returns a Deferred; a store that cannot be reached
    fails it with L{StoreUnavailable}.
    """

    available = Attribute("C{bool}: whether the last contact with the backing store worked.")

    def load_extensions():
        """Every valid stored extension, sorted by id (corrupt entries are logged and skipped)."""

    def seed(extensions):
        """
        Store C{extensions} only if this store was never seeded; fires with C{True} if they
        were written. Deleting every extension later does not make the store seed again.
        """

    def save_extension(ext):
        """Create or replace C{ext} and tell the other nodes."""

    def delete_extension(ext_id):
        """Delete extension C{ext_id}, tell the other nodes; fires with whether it existed."""

    def append_call(record):
        """Append a finished-call record (a JSON-serialisable dict) to a capped log."""

    def recent_calls(limit):
        """Up to C{limit} most recent call records, newest first."""

    def get_blob(key):
        """The bytes stored under C{key}, or C{None}."""

    def set_blob(key, data, ttl_s):
        """Store C{data} (bytes) under C{key}, expiring after C{ttl_s} seconds (None: never)."""

    def subscribe(callback):
        """
        Call C{callback(change: ExtensionChange)} for each change made by another node.
        Returns a zero-argument callable that unsubscribes.
        """

    # -- pre-authorisations (audiosocket.preauth) --

    def save_preauth(item, limit=None):
        """
        Store a pre-authorisation (a dict with at least C{id}, C{condominium_id} and
        C{uses}), unless its condominium already holds C{limit} items; fires with whether it
        was stored.
        """

    def preauths(condominium_id):
        """The stored pre-authorisations of a condominium, as dicts (C{uses}: what remains)."""

    def delete_preauth(preauth_id):
        """Delete a pre-authorisation; fires with whether it existed."""

    def use_preauth(condominium_id, preauth_id):
        """
        Take one use of a pre-authorisation, atomically: fires with C{True} if one was left
        (the item is deleted with its last use), C{False} if none was (or no such item). Of
        two calls racing for the last use, exactly one gets C{True}.
        """

    # -- the access audit and retention

    def append_access(event):
        """
        Append an access audit entry (a JSON-serialisable dict, see L{audiosocket.access}) to
        a capped log (C{audit_maxlen} entries, trimmed approximately, oldest first).
        """

    def access_events(*, condominium_id=None, apartment=None, since=None, until=None, limit=100):
        """
        Up to C{limit} access audit entries, newest first, of one condominium and/or
        apartment when given, appended to the store within [C{since}, C{until}] (epoch
        seconds, millisecond precision, both ends included; the time the store took the
        entry, which is the entry's C{ts} unless it waited through an outage).
        """

    def calls(*, outcome=None, condominium_id=None, apartment=None, since=None, until=None, limit=100):
        """
        Up to C{limit} call records, newest first, with that C{outcome}, condominium and/or
        apartment (the record's C{facts.apartment}) when given, stored within [C{since},
        C{until}] (epoch seconds, both ends included).
        """

    def delete_calls(before_ts):
        """Delete call records stored before C{before_ts} (epoch seconds); fires with how many."""

    def trim_access(before_ts):
        """Delete access entries stored before C{before_ts} (epoch seconds); fires with how many."""

    # -- residents directories (audiosocket.directories) --

    def load_directories():
        """Every stored directory: C{{condominium_id: rows}} (rows: the original JSON list)."""

    def load_directory(condominium_id):
        """The stored rows of one condominium, or C{None} if it was never stored."""

    def save_directory(condominium_id, rows):
        """
        Replace a condominium's whole directory, atomically, and tell the other nodes
        (L{DirectoryChange}); fires with the directory's new version (1, 2, ...).
        """

    def seed_directories(directories):
        """
        Store each C{{condominium_id: rows}} only if that condominium was never stored; fires
        with the sorted list of the condominium ids written.
        """

    def subscribe_directories(callback):
        """
        Call C{callback(change: DirectoryChange)} for each directory saved by another node.
        Returns a zero-argument callable that unsubscribes.
        """


# -- validation shared by both implementations ---------------------------------------------


def _check_extension(ext: Any) -> Extension:
    if not isinstance(ext, Extension):
        raise TypeError("extension must be an Extension, not {}".format(type(ext).__name__))
    return ext


def _check_ext_id(ext_id: Any) -> int:
    if isinstance(ext_id, bool) or not isinstance(ext_id, int):
        raise TypeError("ext_id must be an integer, not {}".format(type(ext_id).__name__))
    return ext_id


def _encode_record(record: Any, what: str = "call record") -> str:
    if not isinstance(record, dict):
        raise TypeError("{} must be a dict, not {}".format(what, type(record).__name__))
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError("{} is not JSON-serialisable: {}".format(what, e)) from None


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError("limit must be an integer, not {}".format(type(limit).__name__))
    if not 1 <= limit <= MAX_RECENT_CALLS:
        raise ValueError("limit must be between 1 and {}, not {}".format(MAX_RECENT_CALLS, limit))
    return limit


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("blob key must be a non-empty string, not {!r}".format(key))
    return key


def _check_blob(data: Any, ttl_s: Any) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("blob data must be bytes, not {}".format(type(data).__name__))
    if ttl_s is not None and (
        isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1
    ):
        raise ValueError("ttl_s must be a positive integer or None, not {!r}".format(ttl_s))
    return bytes(data)


def _default_node_id() -> str:
    # Two stores in one process (tests, or a node talking to two Redis) must still differ.
    return "{}:{}:{}".format(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])


def _change_message(node_id: str, kind: str, ext_id: int, ext: Extension | None) -> str:
    return json.dumps(
        {
            "node_id": node_id,
            "kind": kind,
            "ext_id": ext_id,
            "extension": ext.to_dict() if ext is not None else None,
        },
        separators=(",", ":"),
    )


def _parse_change(message: str | bytes) -> ExtensionChange:
    """
    @raise ValueError: the message is not a well-formed change (the reason says why).
    """
    try:
        data = json.loads(message)
    except ValueError as e:
        raise ValueError("not JSON: {}".format(e)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    node_id = data.get("node_id")
    kind = data.get("kind")
    ext_id = data.get("ext_id")
    if not isinstance(node_id, str) or not node_id:
        raise ValueError("node_id missing")
    if kind not in (PUT, DELETE):
        raise ValueError("kind must be put or delete, not {!r}".format(kind))
    if isinstance(ext_id, bool) or not isinstance(ext_id, int):
        raise ValueError("ext_id must be an integer, not {!r}".format(ext_id))
    ext = None
    if kind == PUT:
        ext = Extension.from_dict(data.get("extension"))  # InvalidField is a ValueError
        if ext.id != ext_id:
            raise ValueError("extension id {} differs from ext_id {}".format(ext.id, ext_id))
    return ExtensionChange(kind=kind, ext_id=ext_id, extension=ext, node_id=node_id)


class _Subscribers:
    """The callbacks of one store, each called in isolation: one failing hurts no other."""

    log = Logger()

    def __init__(self):
        self._callbacks: list[Callable[[ExtensionChange], Any]] = []

    def add(self, callback: Callable[[ExtensionChange], Any]) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError("subscriber must be callable, not {!r}".format(callback))
        self._callbacks.append(callback)

        def unsubscribe():
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, change: ExtensionChange) -> None:
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:
                self.log.failure(
                    "extension change subscriber {callback!r} failed on {change!r}",
                    callback=callback,
                    change=change,
                )


# -- Redis -----------------------------------------------------------------------------------

# HSET + PUBLISH in one script: a change is stored and announced atomically, in one round trip.
_SAVE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
_DELETE = """
local n = redis.call('HDEL', KEYS[1], ARGV[1])
if n == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return n
"""
# The marker key makes seeding happen once in the store's life, whatever is deleted later.
_SEED = """
if redis.call('SETNX', KEYS[1], '1') == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Pre-authorisations: per condominium, a hash id -> JSON (everything but the uses) and a hash
# id -> uses left; an index id -> condominium for deleting by id. The uses live apart so that
# taking one is a plain counter decrement, never a rewrite of the JSON inside Lua.
_PREAUTH_SAVE = """
if tonumber(ARGV[5]) > 0 and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
   and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""
_PREAUTH_LIST = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""
# The item's keys are named from its condominium, read from the index in the same script: a
# single Redis (not a cluster), as everywhere in this store.
_PREAUTH_DELETE = """
local cid = redis.call('HGET', KEYS[1], ARGV[1])
if not cid then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', ARGV[2] .. cid, ARGV[1])
redis.call('HDEL', ARGV[3] .. cid, ARGV[1])
return 1
"""
_PREAUTH_USE = """
local left = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if not left or left < 1 then return 0 end
if left == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
end
return 1
"""


def _check_condominium_id(condominium_id: Any) -> int:
    if isinstance(condominium_id, bool) or not isinstance(condominium_id, int):
        raise TypeError(
            "condominium_id must be an integer, not {}".format(type(condominium_id).__name__)
        )
    return condominium_id


def _check_preauth_id(preauth_id: Any) -> str:
    if not isinstance(preauth_id, str) or not preauth_id or len(preauth_id) > 64:
        raise ValueError("pre-authorisation id must be a short non-empty string")
    return preauth_id


def _split_preauth(item: Any) -> tuple[str, int, int, str]:
    """(id, condominium id, uses, JSON of the rest) of an item to store."""
    if not isinstance(item, dict):
        raise TypeError("pre-authorisation must be a dict, not {}".format(type(item).__name__))
    rest = dict(item)
    preauth_id = _check_preauth_id(rest.get("id"))
    cid = _check_condominium_id(rest.get("condominium_id"))
    uses = rest.pop("uses", None)
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        raise ValueError("uses must be a positive integer, not {!r}".format(uses))
    return preauth_id, cid, uses, json.dumps(rest, ensure_ascii=False, separators=(",", ":"))


_UNAVAILABLE = (
    defer.TimeoutError,
    defer.CancelledError,
    txredisapi.ConnectionError,
    ConnectionClosed,
    ConnectError,
)

#: Error replies by which a running Redis refuses to serve for now: it cannot persist (MISCONF:
#: the disk is full or read-only), it is out of memory (OOM, under noeviction), it is a replica
#: (READONLY) or it is loading its data (LOADING). The store is unavailable, not broken.
#: A script's command refused so comes wrapped: "ERR Error running script ...: -MISCONF ...".
_REFUSAL = re.compile(r"(?:^-?|: -)(MISCONF|OOM|READONLY|LOADING|MASTERDOWN|BUSY)\b")


def _refusal(error: Exception) -> bool:
    if not isinstance(error, txredisapi.ResponseError):
        return False
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("latin-1")
    return _REFUSAL.search(str(message)) is not None


@frozen
class RedisAddress:
    """Where a Redis server is: a unix socket C{path}, or C{host} and C{port}; and a db."""

    path: str | None
    host: str | None
    port: int | None
    db: int
    password: str | None = None
    #: C{rediss://}: the connection is TLS, the server's certificate verified for C{host}.
    tls: bool = False

    @classmethod
    def parse(cls, address: str, db: int = 0) -> "RedisAddress":
        """
        Accept a unix socket path, C{unix:///path?db=N} or C{redis://[:password@]host:port/db}
        (C{rediss://...}: the same over TLS).

        @raise ValueError: naming the address and what is wrong with it.
        """
        if not isinstance(address, str) or not address:
            raise ValueError("redis address must be a non-empty string, not {!r}".format(address))
        if address.startswith("/"):
            return cls(path=address, host=None, port=None, db=db)
        parts = urlsplit(address)
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("redis address {!r}: unix URL has no path".format(address))
            query = parse_qs(parts.query)
            if "db" in query:
                db = _db(address, query["db"][0])
            return cls(
                path=parts.path,
                host=None,
                port=None,
                db=db,
                password=unquote(parts.password) if parts.password else None,
            )
        if parts.scheme in ("redis", "rediss"):
            if not parts.hostname:
                raise ValueError("redis address {!r}: no host".format(address))
            try:
                port = parts.port or 6379
            except ValueError:
                raise ValueError("redis address {!r}: bad port".format(address)) from None
            if parts.path.strip("/"):
                db = _db(address, parts.path.strip("/"))
            return cls(
                path=None,
                host=parts.hostname,
                port=port,
                db=db,
                password=unquote(parts.password) if parts.password else None,
                tls=parts.scheme == "rediss",
            )
        raise ValueError(
            "redis address {!r}: expected a socket path, unix://, redis:// or rediss:// "
            "URL".format(address)
        )


def _db(address: str, text: str) -> int:
    try:
        db = int(text)
    except ValueError:
        db = -1
    if db < 0:
        raise ValueError("redis address {!r}: db must be a non-negative integer".format(address))
    return db


class _ChangeListener(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.store._message_received(message)

    def connectionLost(self, why):
        self.factory.store._subscription_lost(self)
        super().connectionLost(why)


class _ChangeSubscriberFactory(txredisapi.SubscriberFactory):
    """A reconnecting subscriber that subscribes again on every new connection."""

    protocol = _ChangeListener
    log = Logger()

    def __init__(self, store: "RedisStore", password: str | None):
        super().__init__(isLazy=True)
        self.store = store
        self.password = password

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.whenConnected().addCallback(self._subscribe)
        return p

    def _subscribe(self, p):
        d = p.subscribe(self.store.channel)
        d.addCallback(lambda _: self.store._subscribed(p))
        d.addErrback(
            lambda f: self.log.warn(
                "cannot subscribe to {channel}: {error}",
                channel=self.store.channel,
                error=f.getErrorMessage(),
            )
        )


class _CommandFactory(txredisapi.RedisFactory):
    """The command pool; a fresh connection means Redis answers again."""

    store: "RedisStore"

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool:
            self.store._healthy = True
            self.store._became_available()


def _tune_reconnect(factory, max_delay: float) -> None:
    # txredisapi backs off to 10 s by default: too long for a local Redis coming back.
    factory.maxDelay = max_delay
    factory.initialDelay = min(factory.initialDelay, max_delay)


@implementer(IStore)
class RedisStore(Service):
    """
    L{IStore} on Redis through txredisapi: extensions as one JSON per id in a hash, call
    records in a capped stream, blobs as plain keys, changes on a pub/sub channel.

    The connections reconnect by themselves; C{startService} does not wait for Redis.
    """

    log = Logger()

    def __init__(
        self,
        address: str,
        *,
        password: str | None = None,
        db: int = 0,
        timeout_s: float = 2.0,
        node_id: str | None = None,
        prefix: str = "audiosocket:",
        reactor=None,
        poolsize: int = 2,
        calls_maxlen: int = DEFAULT_CALLS_MAXLEN,
        reconnect_max_s: float = 2.0,
        ca_file: str | None = None,
        audit_maxlen: int = DEFAULT_AUDIT_MAXLEN,
    ):
        reactor = default_reactor(reactor)
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError("timeout_s must be a positive number, not {!r}".format(timeout_s))
        if not isinstance(calls_maxlen, int) or calls_maxlen < 1:
            raise ValueError(
                "calls_maxlen must be a positive integer, not {!r}".format(calls_maxlen)
            )
        if not isinstance(prefix, str):
            raise ValueError("prefix must be a string, not {!r}".format(prefix))
        #: Commands that failed for want of Redis (exported as a metric).
        self.errors = 0
        self._address = RedisAddress.parse(address, db)
        #: For C{rediss://}: the CA (PEM) the server's certificate must chain to; None: the
        #: system's trust store. The host name is always checked (service-identity).
        self._tls_options = None
        if self._address.tls:
            if ca_file:
                with open(ca_file, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            else:
                trust = ssl.platformTrust()
            self._tls_options = ssl.optionsForClientTLS(self._address.host, trustRoot=trust)
        self._password = password if password is not None else self._address.password
        self._reactor = reactor
        self._timeout_s = float(timeout_s)
        self._poolsize = poolsize
        self._calls_maxlen = calls_maxlen
        self._reconnect_max_s = reconnect_max_s
        self.node_id = node_id or _default_node_id()
        self.prefix = prefix
        # Pub/sub ignores the db: two deployments on one Redis with different dbs and the same
        # prefix must not hear each other, so a non-zero db is part of the channel name.
        db_suffix = ":db{}".format(self._address.db) if self._address.db else ""
        self.channel = prefix + "extensions" + db_suffix
        self._extensions_key = prefix + "extensions"
        self._seeded_key = prefix + "seeded"
        self._calls_key = prefix + "calls"
        self._access_key = prefix + "access"
        self._audit_maxlen = _check_maxlen("audit_maxlen", audit_maxlen)
        self._blob_prefix = prefix + "blob:"
        self._commands = None
        self._subscriber = None
        self._subscribed_protocol = None
        self._subscribed_waiters: list[defer.Deferred] = []
        self._available_waiters: list[defer.Deferred] = []
        self._in_flight: set[defer.Deferred] = set()
        self._healthy = True
        self._subscribers = _Subscribers()

    def __repr__(self):
        return "<RedisStore {} node={}>".format(self.describe_address(), self.node_id)

    def describe_address(self) -> str:
        a = self._address
        if a.path is not None:
            return "unix:{} db={}".format(a.path, a.db)
        return "{}{}:{} db={}".format("rediss://" if a.tls else "", a.host, a.port, a.db)

    # -- service ----------------------------------------------------------------------------

    def _endpoint(self):
        a = self._address
        if a.path is not None:
            return UNIXClientEndpoint(self._reactor, a.path, timeout=self._timeout_s)
        endpoint = HostnameEndpoint(self._reactor, a.host, a.port, timeout=self._timeout_s)
        if self._tls_options is not None:
            return wrapClientTLS(self._tls_options, endpoint)
        return endpoint

    def startService(self):
        super().startService()
        commands = _CommandFactory(
            self.describe_address(),
            self._address.db,
            self._poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset=None,
            password=self._password,
            convertNumbers=False,
        )
        commands.store = self
        _tune_reconnect(commands, self._reconnect_max_s)
        subscriber = _ChangeSubscriberFactory(self, self._password)
        _tune_reconnect(subscriber, self._reconnect_max_s)
        self._commands, self._subscriber = commands, subscriber
        commands.startConnecting(self._endpoint())
        subscriber.startConnecting(self._endpoint())
        self.log.info("store connecting to redis at {address}", address=self.describe_address())

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        commands, subscriber = self._commands, self._subscriber
        self._commands = self._subscriber = None
        for d in list(self._in_flight):
            d.cancel()
        for d in self._subscribed_waiters + self._available_waiters:
            d.errback(StoreUnavailable("store stopped"))
        self._subscribed_waiters = []
        self._available_waiters = []
        if commands is not None:
            await defer.gatherResults(
                [commands.disconnect(), subscriber.disconnect()], consumeErrors=True
            )
            # txredisapi hands ready connections over with callLater(0, ...): let those run
            # (and find the pool closed) before saying the store is stopped.
            await task.deferLater(self._reactor, 0, lambda: None)

    # -- state ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return bool(self._healthy and self._commands is not None and self._commands.size)

    @property
    def subscribed(self) -> bool:
        return self._subscribed_protocol is not None

    def whenSubscribed(self) -> defer.Deferred:
        """
        Fires once this store is subscribed to the change channel (at once if it is): from
        then on, changes published by other nodes reach the subscribers.
        """
        if self._subscribed_protocol is not None:
            return defer.succeed(None)
        if self._subscriber is None:
            return defer.fail(StoreUnavailable("store not started"))
        d = defer.Deferred(lambda d: self._subscribed_waiters.remove(d))
        self._subscribed_waiters.append(d)
        return d

    def whenAvailable(self) -> defer.Deferred:
        """
        Fires once a command connection to Redis is up (at once if the store is available):
        after an outage, when commands can work again.
        """
        if self.available:
            return defer.succeed(None)
        if self._commands is None:
            return defer.fail(StoreUnavailable("store not started"))
        d = defer.Deferred(lambda d: self._available_waiters.remove(d))
        self._available_waiters.append(d)
        return d

    def _became_available(self):
        waiters, self._available_waiters = self._available_waiters, []
        for d in waiters:
            d.callback(None)

    def _subscribed(self, p):
        self._subscribed_protocol = p
        self.log.info("store subscribed to {channel}", channel=self.channel)
        waiters, self._subscribed_waiters = self._subscribed_waiters, []
        for d in waiters:
            d.callback(None)

    def _subscription_lost(self, p):
        if self._subscribed_protocol is p:
            self._subscribed_protocol = None
            if self.running:
                self.log.warn("store lost its subscription to {channel}", channel=self.channel)

    def _message_received(self, message):
        if self._directory_message(message):
            return
        try:
            change = _parse_change(message)
        except ValueError as e:
            self.log.warn(
                "ignoring malformed message on {channel}: {error}", channel=self.channel, error=e
            )
            return
        if change.node_id == self.node_id:
            return
        self._subscribers.deliver(change)

    def subscribe(self, callback):
        return self._subscribers.add(callback)

    # -- commands ---------------------------------------------------------------------------

    async def _call(self, *args):
        """Run one command with a timeout; a timeout or a lost connection is L{StoreUnavailable}."""
        if self._commands is None:
            raise StoreUnavailable("store is not running ({})".format(self.describe_address()))
        d = self._commands.handler.execute_command(*args)
        d.addTimeout(self._timeout_s, self._reactor)
        self._in_flight.add(d)
        try:
            try:
                result = await d
            except txredisapi.ResponseError as e:
                if not _refusal(e):
                    raise
                raise _Refused(str(e)) from None
        except (*_UNAVAILABLE, _Refused) as e:
            self._healthy = False
            self.errors += 1
            if isinstance(e, defer.TimeoutError):
                why = "no reply within {}s".format(self._timeout_s)
            elif isinstance(e, defer.CancelledError):
                why = "the store was stopped"
            else:
                why = str(e) or type(e).__name__
            raise StoreUnavailable(
                "redis at {} is unavailable: {} failed: {}".format(
                    self.describe_address(), args[0], why
                )
            ) from None
        finally:
            self._in_flight.discard(d)
        self._healthy = True
        return result

    def load_extensions(self):
        return defer.Deferred.fromCoroutine(self._load_extensions())

    async def _load_extensions(self) -> list[Extension]:
        reply = await self._call("HGETALL", self._extensions_key)
        found = []
        for field, value in zip(reply[::2], reply[1::2]):
            try:
                ext = Extension.from_dict(json.loads(value))
                if str(ext.id).encode() != field:
                    raise ValueError("stored under id {!r} but has id {}".format(field, ext.id))
            except (ValueError, UnicodeDecodeError) as e:  # InvalidField is a ValueError
                self.log.error(
                    "skipping corrupt extension {field!r} in {key}: {error}",
                    field=field,
                    key=self._extensions_key,
                    error=e,
                )
                continue
            found.append(ext)
        return sorted(found, key=lambda e: e.id)

    def seed(self, extensions):
        return defer.Deferred.fromCoroutine(self._seed(extensions))

    async def _seed(self, extensions: Iterable[Extension]) -> bool:
        args = []
        for ext in extensions:
            _check_extension(ext)
            args += [str(ext.id), json.dumps(ext.to_dict())]
        written = await self._call(
            "EVAL", _SEED, 2, self._seeded_key, self._extensions_key, *args
        )
        return written == 1

    def save_extension(self, ext):
        return defer.Deferred.fromCoroutine(self._save_extension(ext))

    async def _save_extension(self, ext) -> None:
        _check_extension(ext)
        await self._call(
            "EVAL",
            _SAVE,
            1,
            self._extensions_key,
            str(ext.id),
            json.dumps(ext.to_dict()),
            self.channel,
            _change_message(self.node_id, PUT, ext.id, ext),
        )

    def delete_extension(self, ext_id):
        return defer.Deferred.fromCoroutine(self._delete_extension(ext_id))

    async def _delete_extension(self, ext_id) -> bool:
        _check_ext_id(ext_id)
        deleted = await self._call(
            "EVAL",
            _DELETE,
            1,
            self._extensions_key,
            str(ext_id),
            self.channel,
            _change_message(self.node_id, DELETE, ext_id, None),
        )
        return deleted == 1

    def append_call(self, record):
        return defer.Deferred.fromCoroutine(self._append_call(record))

    async def _append_call(self, record) -> None:
        data = _encode_record(record)
        # "~": Redis trims whole stream nodes, which is cheap; the cap is approximate.
        await self._call(
            "XADD", self._calls_key, "MAXLEN", "~", self._calls_maxlen, "*", "record", data
        )

    def recent_calls(self, limit):
        return self.calls(limit=limit)

    def _decode(self, reply, key: str, what: str) -> list[tuple[bytes, dict]]:
        """
        (id, dict) of each entry of an XRANGE/XREVRANGE C{reply}; an entry that is not a
        JSON object under C{record} is logged as corrupt and skipped.
        """
        entries = []
        for entry_id, fields in reply:
            values = dict(zip(fields[::2], fields[1::2]))
            try:
                record = json.loads(values[b"record"])
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (KeyError, ValueError, UnicodeDecodeError) as e:
                self.log.error(
                    "skipping corrupt {what} {id!r} in {key}: {error!r}",
                    what=what,
                    id=entry_id,
                    key=key,
                    error=e,
                )
                continue
            entries.append((entry_id, record))
        return entries

    def get_blob(self, key):
        return defer.Deferred.fromCoroutine(self._get_blob(key))

    async def _get_blob(self, key) -> bytes | None:
        _check_key(key)
        return await self._call("GET", self._blob_prefix + key)

    def set_blob(self, key, data, ttl_s=None):
        return defer.Deferred.fromCoroutine(self._set_blob(key, data, ttl_s))

    async def _set_blob(self, key, data, ttl_s) -> None:
        _check_key(key)
        data = _check_blob(data, ttl_s)
        args = ["SET", self._blob_prefix + key, data]
        if ttl_s is not None:
            args += ["EX", ttl_s]
        await self._call(*args)

    # -- pre-authorisations -----------------------------------------------------------------

    def _preauth_keys(self, cid: int) -> list[str]:
        return [
            "{}preauth:{}".format(self.prefix, cid),
            "{}preauth-uses:{}".format(self.prefix, cid),
            self.prefix + "preauth-ids",
        ]

    def save_preauth(self, item, limit=None):
        return defer.Deferred.fromCoroutine(self._save_preauth(item, limit))

    async def _save_preauth(self, item, limit) -> bool:
        preauth_id, cid, uses, data = _split_preauth(item)
        saved = await self._call(
            "EVAL", _PREAUTH_SAVE, 3, *self._preauth_keys(cid),
            preauth_id, data, uses, cid, limit or 0,
        )
        return saved == 1

    def preauths(self, condominium_id):
        return defer.Deferred.fromCoroutine(self._preauths(condominium_id))

    async def _preauths(self, condominium_id) -> list[dict]:
        keys = self._preauth_keys(_check_condominium_id(condominium_id))
        items, uses = await self._call("EVAL", _PREAUTH_LIST, 2, *keys[:2])
        left = dict(zip(uses[::2], uses[1::2]))
        found = []
        for field, value in zip(items[::2], items[1::2]):
            try:
                data = json.loads(value)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                data["uses"] = int(left.get(field, b"0"))
            except (ValueError, UnicodeDecodeError) as e:
                self.log.error(
                    "skipping corrupt pre-authorisation {field!r} in {key}: {error}",
                    field=field,
                    key=keys[0],
                    error=e,
                )
                continue
            found.append(data)
        return found

    def delete_preauth(self, preauth_id):
        return defer.Deferred.fromCoroutine(self._delete_preauth(preauth_id))

    async def _delete_preauth(self, preauth_id) -> bool:
        _check_preauth_id(preauth_id)
        deleted = await self._call(
            "EVAL", _PREAUTH_DELETE, 1, self.prefix + "preauth-ids", preauth_id,
            self.prefix + "preauth:", self.prefix + "preauth-uses:",
        )
        return deleted == 1

    def use_preauth(self, condominium_id, preauth_id):
        return defer.Deferred.fromCoroutine(self._use_preauth(condominium_id, preauth_id))

    async def _use_preauth(self, condominium_id, preauth_id) -> bool:
        keys = self._preauth_keys(_check_condominium_id(condominium_id))
        used = await self._call(
            "EVAL", _PREAUTH_USE, 3, *keys, _check_preauth_id(preauth_id)
        )
        return used == 1

    # -- the access audit and retention -----------------------------------------------------

    def append_access(self, event):
        return defer.Deferred.fromCoroutine(self._append_access(event))

    async def _append_access(self, event) -> None:
        data = _encode_record(event, "access entry")
        await self._call(
            "XADD", self._access_key, "MAXLEN", "~", self._audit_maxlen, "*", "record", data
        )

    def access_events(
        self, *, condominium_id=None, apartment=None, since=None, until=None, limit=100
    ):
        return defer.Deferred.fromCoroutine(
            self._access_events(condominium_id, apartment, since, until, limit)
        )

    async def _access_events(self, condominium_id, apartment, since, until, limit) -> list[dict]:
        wanted = AccessFilter.of(condominium_id, apartment, since, until)
        return await self._newest(self._access_key, wanted, limit, "access entry")

    def calls(
        self, *, outcome=None, condominium_id=None, apartment=None, since=None, until=None,
        limit=100,
    ):
        wanted = CallFilter.of(condominium_id, apartment, since, until, outcome=outcome)
        return defer.Deferred.fromCoroutine(
            self._newest(self._calls_key, wanted, limit, "call record")
        )

    async def _newest(self, key: str, wanted: "AccessFilter", limit, what: str) -> list[dict]:
        """
        The entries of stream C{key} that C{wanted} takes, newest first, a page at a time from
        the end of its time range, filtering here: until C{limit} match or the range is done.
        """
        _check_limit(limit)
        end = "+" if wanted.until_ms is None else str(wanted.until_ms)
        start = "-" if wanted.since_ms is None else "{}-0".format(wanted.since_ms)
        found: list[dict] = []
        while True:
            reply = await self._call("XREVRANGE", key, end, start, "COUNT", STREAM_PAGE)
            for _, event in self._decode(reply, key, what):
                if wanted.matches(event):
                    found.append(event)
                    if len(found) == limit:
                        return found
            if len(reply) < STREAM_PAGE:
                return found
            end = _before_id(reply[-1][0])
            if end is None:
                return found

    def delete_calls(self, before_ts):
        return defer.Deferred.fromCoroutine(self._trim(self._calls_key, before_ts))

    def trim_access(self, before_ts):
        return defer.Deferred.fromCoroutine(self._trim(self._access_key, before_ts))

    async def _trim(self, key: str, before_ts) -> int:
        # MINID (Redis 6.2): every entry whose id, its time in ms, is below the bound goes.
        deleted = await self._call("XTRIM", key, "MINID", _ms(before_ts, "before_ts"))
        return int(deleted)

    # -- residents directories --------------------------------------------------------------

    @property
    def _directory_subscribers(self) -> _Subscribers:
        subscribers = self.__dict__.get("_directory_subscribers_")
        if subscribers is None:
            subscribers = self.__dict__["_directory_subscribers_"] = _Subscribers()
        return subscribers

    def _directory_keys(self) -> list[str]:
        return [self.prefix + "directories", self.prefix + "directory-versions"]

    def _directory_message(self, message) -> bool:
        """Deliver C{message} if it is a directory change; C{False} if it is not one."""
        try:
            change = _parse_directory_change(message)
        except ValueError as e:
            self.log.warn(
                "ignoring malformed message on {channel}: {error}", channel=self.channel, error=e
            )
            return True
        if change is None:
            return False
        if change.node_id != self.node_id:
            self._directory_subscribers.deliver(change)
        return True

    def subscribe_directories(self, callback):
        return self._directory_subscribers.add(callback)

    def load_directories(self):
        return defer.Deferred.fromCoroutine(self._load_directories())

    async def _load_directories(self) -> dict[int, list]:
        key = self._directory_keys()[0]
        reply = await self._call("HGETALL", key)
        found = {}
        for field, value in zip(reply[::2], reply[1::2]):
            try:
                found[int(field)] = _decode_rows(value)
            except (ValueError, UnicodeDecodeError) as e:
                self.log.error(
                    "skipping corrupt directory {field!r} in {key}: {error}",
                    field=field,
                    key=key,
                    error=e,
                )
        return found

    def load_directory(self, condominium_id):
        return defer.Deferred.fromCoroutine(self._load_directory(condominium_id))

    async def _load_directory(self, condominium_id) -> list | None:
        cid = _check_condominium_id(condominium_id)
        value = await self._call("HGET", self._directory_keys()[0], str(cid))
        return None if value is None else _decode_rows(value)

    def save_directory(self, condominium_id, rows):
        return defer.Deferred.fromCoroutine(self._save_directory(condominium_id, rows))

    async def _save_directory(self, condominium_id, rows) -> int:
        cid = _check_condominium_id(condominium_id)
        data = _encode_rows(rows)
        version = await self._call(
            "EVAL", _DIRECTORY_SAVE, 2, *self._directory_keys(),
            str(cid), data, self.channel, _directory_message(self.node_id, cid, data),
        )
        return int(version)

    def seed_directories(self, directories):
        return defer.Deferred.fromCoroutine(self._seed_directories(directories))

    async def _seed_directories(self, directories) -> list[int]:
        args = []
        for cid, rows in dict(directories).items():
            args += [str(_check_condominium_id(cid)), _encode_rows(rows)]
        if not args:
            return []
        written = await self._call("EVAL", _DIRECTORY_SEED, 1, self._directory_keys()[0], *args)
        return sorted(int(cid) for cid in written)


# -- memory ----------------------------------------------------------------------------------


class MemoryHub:
    """
    What several L{MemoryStore}s share, as nodes share one Redis: the data, and delivery of
    each store's changes to the other stores' subscribers.
    """

    def __init__(self):
        self.extensions: dict[int, Extension] = {}
        self.seeded = False
        #: (time stored, record) of each call record, oldest first (see L{calls}).
        self.call_log: list[tuple[float | None, dict]] = []
        #: (time stored, entry) of each access audit entry, oldest first.
        self.access: list[tuple[float, dict]] = []
        self.blobs: dict[str, tuple[bytes, float | None]] = {}
        self.stores: list["MemoryStore"] = []
        #: pre-authorisation id -> its stored dict (C{uses} included)
        self.preauths: dict[str, dict] = {}

    @property
    def calls(self) -> list[dict]:
        """The call records, oldest first (a copy)."""
        return [record for _, record in self.call_log]

    @calls.setter
    def calls(self, records: list[dict]) -> None:
        # Set by hand (tests): no time is known, so no age-based deletion touches them.
        self.call_log = [(None, record) for record in records]

    def publish(self, change: ExtensionChange) -> None:
        for store in list(self.stores):
            if store.node_id != change.node_id:
                store._subscribers.deliver(change)


@implementer(IStore)
class MemoryStore(Service):
    """
    L{IStore} in memory. Set C{available = False} to simulate an outage: every method then
    fails with L{StoreUnavailable}. Changes reach the subscribers of the other stores on the
    same L{MemoryHub} synchronously.
    """

    def __init__(
        self,
        hub: MemoryHub | None = None,
        *,
        node_id: str | None = None,
        calls_maxlen: int = DEFAULT_CALLS_MAXLEN,
        reactor=None,
        audit_maxlen: int = DEFAULT_AUDIT_MAXLEN,
    ):
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self.hub = hub if hub is not None else MemoryHub()
        self.hub.stores.append(self)
        self.node_id = node_id or _default_node_id()
        self.available = True
        self._calls_maxlen = calls_maxlen
        self._audit_maxlen = _check_maxlen("audit_maxlen", audit_maxlen)
        self._subscribers = _Subscribers()

    def _check(self):
        if not self.available:
            raise StoreUnavailable("memory store {} is marked unavailable".format(self.node_id))

    def subscribe(self, callback):
        return self._subscribers.add(callback)

    def load_extensions(self):
        return defer.maybeDeferred(self._load_extensions)

    def _load_extensions(self):
        self._check()
        return sorted(self.hub.extensions.values(), key=lambda e: e.id)

    def seed(self, extensions):
        return defer.maybeDeferred(self._seed, extensions)

    def _seed(self, extensions):
        extensions = list(extensions)
        for ext in extensions:
            _check_extension(ext)
        self._check()
        if self.hub.seeded:
            return False
        self.hub.seeded = True
        for ext in extensions:
            self.hub.extensions[ext.id] = ext
        return True

    def save_extension(self, ext):
        return defer.maybeDeferred(self._save_extension, ext)

    def _save_extension(self, ext):
        _check_extension(ext)
        self._check()
        self.hub.extensions[ext.id] = ext
        self.hub.publish(ExtensionChange(PUT, ext.id, ext, self.node_id))

    def delete_extension(self, ext_id):
        return defer.maybeDeferred(self._delete_extension, ext_id)

    def _delete_extension(self, ext_id):
        _check_ext_id(ext_id)
        self._check()
        if self.hub.extensions.pop(ext_id, None) is None:
            return False
        self.hub.publish(ExtensionChange(DELETE, ext_id, None, self.node_id))
        return True

    def append_call(self, record):
        return defer.maybeDeferred(self._append_call, record)

    def _append_call(self, record):
        data = _encode_record(record)
        self._check()
        # A copy, as Redis would keep, with the time it was stored (the stream id's time).
        self.hub.call_log.append((self._reactor.seconds(), json.loads(data)))
        del self.hub.call_log[: -self._calls_maxlen]

    def recent_calls(self, limit):
        return self.calls(limit=limit)

    def get_blob(self, key):
        return defer.maybeDeferred(self._get_blob, key)

    def _get_blob(self, key):
        _check_key(key)
        self._check()
        item = self.hub.blobs.get(key)
        if item is None:
            return None
        data, expires = item
        if expires is not None and self._reactor.seconds() >= expires:
            del self.hub.blobs[key]
            return None
        return data

    def set_blob(self, key, data, ttl_s=None):
        return defer.maybeDeferred(self._set_blob, key, data, ttl_s)

    def _set_blob(self, key, data, ttl_s):
        _check_key(key)
        data = _check_blob(data, ttl_s)
        self._check()
        expires = None if ttl_s is None else self._reactor.seconds() + ttl_s
        self.hub.blobs[key] = (data, expires)

    # -- pre-authorisations -----------------------------------------------------------------

    def save_preauth(self, item, limit=None):
        return defer.maybeDeferred(self._save_preauth, item, limit)

    def _save_preauth(self, item, limit):
        preauth_id, cid, uses, data = _split_preauth(item)
        self._check()
        held = sum(1 for d in self.hub.preauths.values() if d["condominium_id"] == cid)
        if limit and preauth_id not in self.hub.preauths and held >= limit:
            return False
        self.hub.preauths[preauth_id] = dict(json.loads(data), uses=uses)  # a copy
        return True

    def preauths(self, condominium_id):
        return defer.maybeDeferred(self._preauths, condominium_id)

    def _preauths(self, condominium_id):
        _check_condominium_id(condominium_id)
        self._check()
        return [
            dict(d) for d in self.hub.preauths.values() if d["condominium_id"] == condominium_id
        ]

    def delete_preauth(self, preauth_id):
        return defer.maybeDeferred(self._delete_preauth, preauth_id)

    def _delete_preauth(self, preauth_id):
        _check_preauth_id(preauth_id)
        self._check()
        return self.hub.preauths.pop(preauth_id, None) is not None

    def use_preauth(self, condominium_id, preauth_id):
        return defer.maybeDeferred(self._use_preauth, condominium_id, preauth_id)

    def _use_preauth(self, condominium_id, preauth_id):
        _check_condominium_id(condominium_id)
        _check_preauth_id(preauth_id)
        self._check()
        item = self.hub.preauths.get(preauth_id)
        if item is None or item["condominium_id"] != condominium_id or item["uses"] < 1:
            return False
        item["uses"] -= 1
        if item["uses"] == 0:
            del self.hub.preauths[preauth_id]
        return True

    # -- the access audit and retention -----------------------------------------------------

    def append_access(self, event):
        return defer.maybeDeferred(self._append_access, event)

    def _append_access(self, event):
        data = _encode_record(event, "access entry")
        self._check()
        self.hub.access.append((self._reactor.seconds(), json.loads(data)))
        del self.hub.access[: -self._audit_maxlen]

    def access_events(
        self, *, condominium_id=None, apartment=None, since=None, until=None, limit=100
    ):
        return defer.maybeDeferred(
            self._access_events, condominium_id, apartment, since, until, limit
        )

    def _access_events(self, condominium_id, apartment, since, until, limit):
        wanted = AccessFilter.of(condominium_id, apartment, since, until)
        return self._newest(self.hub.access, wanted, limit)

    def calls(
        self, *, outcome=None, condominium_id=None, apartment=None, since=None, until=None,
        limit=100,
    ):
        wanted = CallFilter.of(condominium_id, apartment, since, until, outcome=outcome)
        return defer.maybeDeferred(self._newest, self.hub.call_log, wanted, limit)

    def _newest(self, log, wanted, limit):
        _check_limit(limit)
        self._check()
        found = []
        for stored, entry in reversed(log):
            if wanted.covers(stored) and wanted.matches(entry):
                found.append(entry)
                if len(found) == limit:
                    break
        return found

    def delete_calls(self, before_ts):
        return defer.maybeDeferred(self._trim, "call_log", before_ts)

    def trim_access(self, before_ts):
        return defer.maybeDeferred(self._trim, "access", before_ts)

    def _trim(self, log: str, before_ts) -> int:
        """Drop the entries of the hub's C{log} stored before C{before_ts}; how many went.
        (A record put in memory by hand has no time of its own: it stays.)"""
        bound = _ms(before_ts, "before_ts")
        self._check()
        entries = getattr(self.hub, log)
        kept = [(t, e) for t, e in entries if t is None or _ms(t) >= bound]
        setattr(self.hub, log, kept)
        return len(entries) - len(kept)

    # -- residents directories --------------------------------------------------------------

    @property
    def _directory_subscribers(self) -> _Subscribers:
        subscribers = self.__dict__.get("_directory_subscribers_")
        if subscribers is None:
            subscribers = self.__dict__["_directory_subscribers_"] = _Subscribers()
        return subscribers

    def _directories(self) -> tuple[dict[int, str], dict[int, int]]:
        """The hub's directories (cid -> rows as JSON) and versions, made on first use."""
        hub = self.hub
        if not hasattr(hub, "directories"):
            hub.directories, hub.directory_versions = {}, {}
        return hub.directories, hub.directory_versions

    def subscribe_directories(self, callback):
        return self._directory_subscribers.add(callback)

    def load_directories(self):
        return defer.maybeDeferred(self._load_directories)

    def _load_directories(self):
        self._check()
        return {cid: _decode_rows(data) for cid, data in self._directories()[0].items()}

    def load_directory(self, condominium_id):
        return defer.maybeDeferred(self._load_directory, condominium_id)

    def _load_directory(self, condominium_id):
        _check_condominium_id(condominium_id)
        self._check()
        data = self._directories()[0].get(condominium_id)
        return None if data is None else _decode_rows(data)

    def save_directory(self, condominium_id, rows):
        return defer.maybeDeferred(self._save_directory, condominium_id, rows)

    def _save_directory(self, condominium_id, rows):
        _check_condominium_id(condominium_id)
        data = _encode_rows(rows)
        self._check()
        directories, versions = self._directories()
        directories[condominium_id] = data
        version = versions[condominium_id] = versions.get(condominium_id, 0) + 1
        change = DirectoryChange(condominium_id, _decode_rows(data), version, self.node_id)
        for store in list(self.hub.stores):
            if store.node_id != self.node_id:
                store._directory_subscribers.deliver(change)
        return version

    def seed_directories(self, directories):
        return defer.maybeDeferred(self._seed_directories, directories)

    def _seed_directories(self, directories):
        encoded = {
            _check_condominium_id(cid): _encode_rows(rows) for cid, rows in dict(directories).items()
        }
        self._check()
        stored = self._directories()[0]
        written = sorted(cid for cid in encoded if cid not in stored)
        for cid in written:
            stored[cid] = encoded[cid]
        return written


# -- the access audit's filter, shared by both implementations ---------------------------------


def _check_maxlen(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("{} must be a positive integer, not {!r}".format(name, value))
    return value


def _ms(ts: Any, name: str = "time") -> int:
    """Epoch seconds as the milliseconds a stream id carries."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < 2**42:
        raise ValueError("{} must be epoch seconds, not {!r}".format(name, ts))
    return int(ts * 1000)


def _before_id(entry_id: bytes) -> str | None:
    """The stream id just before C{entry_id} (an exclusive end that any Redis accepts)."""
    ms, _, seq = entry_id.decode("ascii").partition("-")
    if int(seq) > 0:
        return "{}-{}".format(ms, int(seq) - 1)
    if int(ms) > 0:
        return "{}-18446744073709551615".format(int(ms) - 1)
    return None


@frozen
class AccessFilter:
    """Which access entries C{access_events} returns; times in ms (both ends included)."""

    condominium_id: int | None
    apartment: str | None
    since_ms: int | None
    until_ms: int | None

    @classmethod
    def of(cls, condominium_id, apartment, since, until) -> "AccessFilter":
        """
        @raise TypeError: a filter of the wrong type.
        @raise ValueError: a time that is not epoch seconds.
        """
        if condominium_id is not None and (
            isinstance(condominium_id, bool) or not isinstance(condominium_id, int)
        ):
            raise TypeError("condominium_id must be an integer, not {!r}".format(condominium_id))
        if apartment is not None and not isinstance(apartment, str):
            raise TypeError("apartment must be a string, not {!r}".format(apartment))
        return cls(
            condominium_id=condominium_id,
            apartment=apartment,
            since_ms=None if since is None else _ms(since, "since"),
            until_ms=None if until is None else _ms(until, "until"),
        )

    def covers(self, stored: float | None) -> bool:
        if stored is None:  # a record put in memory by hand: no time of its own
            return self.since_ms is None and self.until_ms is None
        ms = _ms(stored)
        return (self.since_ms is None or ms >= self.since_ms) and (
            self.until_ms is None or ms <= self.until_ms
        )

    def matches(self, event: dict) -> bool:
        if self.condominium_id is not None and event.get("condominium_id") != self.condominium_id:
            return False
        return self.apartment is None or self._apartment(event) == self.apartment

    @staticmethod
    def _apartment(event: dict):
        return event.get("apartment")


@frozen
class CallFilter(AccessFilter):
    """Which call records C{calls} returns: the access filters, on C{facts.apartment}, and
    the C{outcome}."""

    outcome: str | None = None

    @classmethod
    def of(cls, condominium_id, apartment, since, until, outcome=None) -> "CallFilter":
        if outcome is not None and not isinstance(outcome, str):
            raise TypeError("outcome must be a string, not {!r}".format(outcome))
        base = AccessFilter.of(condominium_id, apartment, since, until)
        return cls(base.condominium_id, base.apartment, base.since_ms, base.until_ms, outcome)

    def matches(self, record: dict) -> bool:
        if self.outcome is not None and record.get("outcome") != self.outcome:
            return False
        return super().matches(record)

    @staticmethod
    def _apartment(record: dict):
        return (record.get("facts") or {}).get("apartment")


# -- residents directories -------------------------------------------------------------------

#: The kind of a directory change's message on the extensions' channel.
DIRECTORY = "directory"


@frozen
class DirectoryChange:
    """
    A condominium's directory replaced by another node (sent on the extensions' channel, as
    a message of kind C{"directory"}).

    @ivar rows: the whole new directory, as stored (the original JSON list).
    @ivar version: the store's count of saves of this directory: a node applies a change
        only if it is newer than the one it holds (pub/sub messages and command replies
        travel on different connections: their relative order is not guaranteed).
    """

    condominium_id: int
    rows: list
    version: int
    node_id: str


# The version counts saves per condominium; the message gets it here, so the stored rows,
# their version and the notice are one atomic step, in the store's order.
_DIRECTORY_SAVE = """
local v = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], '{"version":' .. v .. ',' .. string.sub(ARGV[4], 2))
return v
"""
# Only the condominiums never stored: a first start, or a condominium added to the config.
_DIRECTORY_SEED = """
local written = {}
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    written[#written + 1] = ARGV[i]
  end
end
return written
"""


def _encode_rows(rows: Any) -> str:
    if not isinstance(rows, list):
        raise TypeError("directory rows must be a list, not {}".format(type(rows).__name__))
    try:
        return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError("directory rows are not JSON-serialisable: {}".format(e)) from None


def _decode_rows(data: str | bytes) -> list:
    rows = json.loads(data)
    if not isinstance(rows, list):
        raise ValueError("not a JSON list")
    return rows


def _directory_message(node_id: str, cid: int, data: str) -> str:
    # No "version" here: the save script puts it first (see _DIRECTORY_SAVE).
    return '{{"node_id":{},"kind":"{}","condominium_id":{},"rows":{}}}'.format(
        json.dumps(node_id), DIRECTORY, cid, data
    )


def _parse_directory_change(message: str | bytes) -> DirectoryChange | None:
    """
    The directory change C{message} carries; C{None} if it is not one (an extension change).

    @raise ValueError: a directory message that is malformed (the reason says why).
    """
    try:
        data = json.loads(message)
    except ValueError:
        return None  # _parse_change says why
    if not isinstance(data, dict) or data.get("kind") != DIRECTORY:
        return None
    node_id, cid = data.get("node_id"), data.get("condominium_id")
    version, rows = data.get("version"), data.get("rows")
    if not isinstance(node_id, str) or not node_id:
        raise ValueError("node_id missing")
    if isinstance(cid, bool) or not isinstance(cid, int):
        raise ValueError("condominium_id must be an integer, not {!r}".format(cid))
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("version must be a positive integer, not {!r}".format(version))
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    return DirectoryChange(cid, rows, version, node_id)
