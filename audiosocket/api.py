# -*- test-case-name: tests.test_api,tests.test_admin,tests.test_tls -*-
"""
The HTTP API: extensions, sessions, finished calls, the access audit, pre-authorisations
(L{audiosocket.preauth}), the gate (L{audiosocket.gate}), the residents directories
(L{audiosocket.directories}), status, health, metrics and its own OpenAPI document, and
C{GET /api/events} (server-sent events for the operator's screen, see
L{audiosocket.events}), as a Klein app with its dependencies injected; the same site serves
the dashboard's pages (L{audiosocket.dashboard}) behind the same guard.

Serve it with C{Api(...).site()} (an L{ApiSite}); never C{app.run()}, and never a plain
C{Site} around C{app.resource()}, which would skip the checks below (L{Api.resource} is the
app behind its token check, for a C{Site} of your own or C{StubTreq}).

Errors are JSON C{{"error": code, "detail": text}} (plus C{"field"} for a 422), produced in one
place: L{Api.error} maps every exception to an L{ApiError}, and L{_error_body} renders it, for
the routes and for the refusals below alike.

Who may drive the API. A web page the operator visits must not be able to (CSRF), nor a page
whose host name its attacker points at 127.0.0.1 (DNS rebinding), nor may a client make the
server buffer an unbounded body. So, judged by L{ApiSite} on the request's head, before its
body is read and before any route runs (a refusal answers and closes the connection, counted
in C{refused} as C{api_<error>}):

  - C{Host} must be one of the allowed names (config C{[api] allowed_hosts}, default
    C{localhost}, C{127.0.0.1}, C{[::1]}, plus the endpoint's interface), with or without a
    port; anything else, or none, is a 421 C{host_not_allowed}.
  - On a state-changing method (anything but GET, HEAD, OPTIONS), an C{Origin} whose host is
    not an allowed name (C{null} included), or C{Sec-Fetch-Site: cross-site} or C{same-site},
    is a 403 C{cross_site}. Clients that are not browsers send neither.
  - A C{Content-Length} over the cap (config C{[api] max_body_kb}, default 64 KiB) is a 413
    C{body_too_large}, sent without reading the body; a chunked body is counted as it arrives
    and cut off at the cap the same way. At most the cap is ever buffered, in memory.
  - A request with a body must say C{Content-Type: application/json} (a charset, if given,
    must be UTF-8): anything else is a 415 C{unsupported_media_type}. A browser cannot send
    that type cross-site without a CORS preflight, which this API never grants.
  - A request with a body must carry a credential (below; when a token is configured): a
    401, or the 403 of a session cookie without its CSRF token, before the body is read.

Authentication is not something a route does: it is done once, in front of the router, so
no route can be added without it. L{Api.resource} wraps the Klein resource in a guard that
calls L{Api.authorize} on every request before any route is looked up, and L{Api.open_routes}
is the whole list of what passes without a token: C{GET} (and C{HEAD}) C{/healthz}, the
dashboard's login page C{/login} and the two static files it needs (C{/static/style.css},
C{/static/login.js}), matched on the raw path. Every other request, to a route that exists,
to one added later (by a subclass, or at run time) or to none, to the JSON API or to the
dashboard's pages and files (L{audiosocket.dashboard}, served by the same guard for every
path outside C{/api/}, C{/healthz} and C{/metrics}), needs a credential when a token is
configured:

  - C{Authorization: Bearer <token>}; or
  - the dashboard's session cookie, which C{POST /login} gives for the token (HttpOnly,
    SameSite=Strict, Secure under TLS; see L{audiosocket.dashboard.auth}), and which on a
    state-changing method counts only together with that login's CSRF token in an
    C{X-CSRF-Token} header: without it, a 403 C{csrf_token_required}. The cookie never
    widens what the token allows: it stands for the token, on the same routes.

A missing or wrong credential is a 401 (RFC 6750: C{invalid_token} is a 401, not a 403), and
so is every request while the token's source (an environment variable) is unset (logins made
with another token are void). An anonymous caller thus learns nothing of which routes exist
(401, never 404 or 405); a browser asking for a page gets that 401 as a page pointing to the
login. C{tests/test_api.py} walks every rule of both URL maps to hold this. L{ApiSite} judges
the credential of a request with a body earlier still, on its head (above), since no open
route takes one. A change refused for its missing CSRF token is counted in C{refused} as
C{api_csrf_token_required} wherever it is judged.

The routes check the content type of the JSON bodies they read.
"""

from __future__ import annotations

import collections
import datetime
import hmac
import csv
import io
import json
import uuid as _uuid
import weakref
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from .access import AUTHORIZED_BY, GATES, RESULTS
from .config import LOOPBACK_NAMES, host_name
from .control import ExtensionControl, StoreUnavailable
from .dashboard import Dashboard, is_page
from .dashboard.auth import CSRF_HEADER, SESSION_COOKIE, BrowserLogins, Login, cookie_value
from .events import EventHub
from .extension import Conflict, NotFound
from .gate import GateError
from .model import EXTENSION_FIELDS, InvalidField, Extension
from .preauth import MAX_APARTMENT, MAX_NAME, MAX_USES, PreauthLimit
from .reactors import default_reactor
from .session import OUTCOMES

JSON_TYPE = b"application/json; charset=utf-8"
CALLS_LIMIT_DEFAULT = 50
CALLS_LIMIT_MAX = 1000
MAX_BODY_DEFAULT = 64 * 1024
#: Methods that change nothing; any other method is refused cross-site.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_REASONS = {421: b"Misdirected Request"}


class ApiError(Exception):
    """An error with its HTTP status and code, raised by a route."""

    def __init__(self, status: int, code: str, detail: str, headers=None, extra=None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


def _error_body(e: ApiError) -> bytes:
    """The JSON of an error, for a route's answer and a refusal before the body alike."""
    data = dict({"error": e.code, "detail": e.detail}, **e.extra)
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def json_content_type(value: bytes | str | None) -> bool:
    """Is C{value} (a C{Content-Type}) C{application/json}, with no charset but UTF-8?"""
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    media, *params = (p.strip().lower() for p in value.split(";"))
    if media != "application/json":
        return False
    for param in params:
        name, _, charset = param.partition("=")
        if name.strip() == "charset" and charset.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def _origin_host(origin: bytes) -> str | None:
    """The normalized host of an C{Origin} header, or L{None} (C{null}, not http(s), bad)."""
    try:
        parts = urlsplit(origin.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if parts.scheme not in ("http", "https") or parts.path or parts.query:
        return None
    return host_name(parts.netloc)


def _unauthorized(detail: str, invalid: bool) -> ApiError:
    challenge = 'Bearer realm="audiosocket"'
    if invalid:
        challenge += ', error="invalid_token"'
    return ApiError(401, "unauthorized", detail, {"WWW-Authenticate": challenge})


def _json(request, data: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    return json.dumps(data, ensure_ascii=False).encode("utf-8")


def _arg(request, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "{} is not valid UTF-8".format(name))


class Api:
    """
    The Klein app. Routes are methods; state lives in the injected objects.

    @param control: applies extension changes (manager + store).
    @param sessions: the session registry (C{describe_all}, C{describe}, C{hangup}).
    @param store: an C{IStore} (availability, finished calls).
    @param token: returns the bearer token, or None when it is unset (everything but
        C{/healthz} is then refused); C{token=None} itself means no authentication.
    @param status: returns process status merged into C{GET /api/status}.
    @param metrics_registry: a prometheus_client registry for C{GET /metrics}.
    @param allowed_hosts: the names a C{Host} may carry, normalized by
        L{audiosocket.config.host_name} (C{ApiConfig.host_names}).
    @param max_body: the request body cap, in bytes.
    @param refused: a counter of refusals by reason (C{api_<error>}), shared with the
        AudioSocket listeners' so one metric shows them all.
    @param preauths: the pre-authorisations (L{audiosocket.preauth.Preauths}) served at
        C{/api/preauth}; None: those routes answer 404.
    @param access: the access audit (L{audiosocket.access.AccessLog}), for the routes that
        open a gate; C{GET /api/access} reads the store.
    """

    app = Klein()
    log = Logger()
    #: The only requests served without the token, as (method, raw path): liveness, and the
    #: dashboard's login page with the two static files it needs.
    open_routes = frozenset(
        (method, path)
        for method in (b"GET", b"HEAD")
        for path in (b"/healthz", b"/login", b"/static/style.css", b"/static/login.js")
    )

    def __init__(
        self,
        control: ExtensionControl,
        sessions,
        store,
        *,
        token: Callable[[], str | None] | None = None,
        status: Callable[[], dict] = dict,
        metrics_registry=None,
        allowed_hosts: Iterable[str] = LOOPBACK_NAMES,
        max_body: int = MAX_BODY_DEFAULT,
        refused: collections.Counter | None = None,
        reactor=None,
        privacy=None,
        dialer=None,
        gates=None,
        preauths=None,
        access=None,
    ):
        self._control = control
        self._manager = control.manager
        self._sessions = sessions
        self._store = store
        self._gates = gates
        self._token = token
        self._status = status
        self._registry = metrics_registry
        self.allowed_hosts = frozenset(allowed_hosts)
        self.max_body = max_body
        self.refused = refused if refused is not None else collections.Counter()
        reactor = default_reactor(reactor)
        self.reactor = reactor
        self.logins = BrowserLogins(reactor)
        self.events = EventHub(
            sessions, self._describe_all, reactor=reactor, refused=self.refused
        )
        if hasattr(sessions, "add_observer"):
            sessions.add_observer(self.events.session_ended)
        self.dashboard = Dashboard(self, privacy=privacy, dialer=dialer)
        #: The access audit (L{audiosocket.access.AccessLog}) that gate openings go to; each
        #: entry is also pushed to the live screens (C{event: access}).
        self.access = access
        if access is not None and hasattr(access, "add_observer"):
            access.add_observer(self.events.access)
        self._sites: weakref.WeakSet[ApiSite] = weakref.WeakSet()
        self._preauths = preauths

    def site(self, **kwargs) -> "ApiSite":
        """A C{Site} serving this API behind its request checks (see the module docstring)."""
        site = ApiSite(self, **kwargs)
        self._sites.add(site)
        return site

    def shutdown(self) -> None:
        """
        The server stops: end the event streams and close every connection still open to
        a site of this API (idle keep-alive ones included), so nothing is served by a
        stopped server and browsers reconnect to the next one. Stop listening first.
        """
        self.events.stop(final=True)
        for site in list(self._sites):
            site.close_connections()

    # ------------------------------------------------------------ before any route

    def admit(self, method: bytes, headers: Headers, length: int | None) -> ApiError | None:
        """
        Judge a request by its head alone, before its body is read and before any route runs.

        @param length: the C{Content-Length}, L{None} for a chunked body, 0 for none.
        @return: the refusal, or L{None} to go on.
        """
        hosts = headers.getRawHeaders(b"host") or []
        name = host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if name is None or name not in self.allowed_hosts:
            return ApiError(
                421,
                "host_not_allowed",
                "this API does not answer to that Host; add the name to api.allowed_hosts",
            )
        if method.upper() not in SAFE_METHODS:
            for origin in headers.getRawHeaders(b"origin") or ():
                if _origin_host(origin) not in self.allowed_hosts:
                    return ApiError(
                        403, "cross_site", "a change from another site's page is refused"
                    )
            fetch_site = (headers.getRawHeaders(b"sec-fetch-site") or [b""])[-1]
            if fetch_site.strip().lower() in (b"cross-site", b"same-site"):
                return ApiError(403, "cross_site", "a change from another site's page is refused")
        if length is not None and length > self.max_body:
            return self._too_large()
        if length != 0:
            if not json_content_type((headers.getRawHeaders(b"content-type") or [None])[-1]):
                return self._not_json()
            try:
                self.credentials(method, headers)
            except ApiError as e:
                return e
        return None

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            "body_too_large",
            "the request body is over {} bytes (api.max_body_kb)".format(self.max_body),
        )

    @staticmethod
    def _not_json() -> ApiError:
        return ApiError(
            415, "unsupported_media_type", "the body must be sent as Content-Type: application/json"
        )

    def count_refusal(self, error: ApiError, method: bytes, peer) -> None:
        """Count and log a refusal (C{refused["api_<error>"]})."""
        reason = "api_" + error.code
        self.refused[reason] += 1
        self.log.info(
            "API request {method} from {peer} refused: {reason}",
            method=method.decode("latin-1")[:16],
            peer=getattr(peer, "host", peer),
            reason=reason,
        )

    def refusal(self, error: ApiError, method: bytes, peer) -> bytes:
        """
        A whole HTTP response for a request refused before its body was read (the connection
        closes after it), counted and logged.
        """
        self.count_refusal(error, method, peer)
        body = _error_body(error)
        phrase = http.RESPONSES.get(error.status) or _REASONS.get(error.status, b"Refused")
        headers = dict(
            error.headers,
            **{
                "Content-Type": JSON_TYPE.decode(),
                "Content-Length": str(len(body)),
                "Connection": "close",
            },
        )
        head = [b"HTTP/1.1 %d %s" % (error.status, phrase)]
        head += [
            "{}: {}".format(name, value).encode("latin-1") for name, value in headers.items()
        ]
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    # ------------------------------------------------------------ helpers

    def resource(self) -> "_Guarded":
        """
        The app as a resource, every route of it behind L{authorize}: the only way this app
        is served (L{ApiSite} uses it; so do the tests).
        """
        return _Guarded(self, self.app.resource(), self.dashboard.app.resource())

    def authorize(self, method: bytes, path: bytes, headers: Headers) -> "Login | None":
        """
        Let a request through to the routes, or raise the 401 (or the 403 of a browser change
        without its CSRF token): every request needs a credential (L{credentials}) except
        those in L{open_routes}, matched on the raw method and path (a path spelled any other
        way, even one the router would map to an open route, needs the token).

        @return: the dashboard login the request came with, if it came with one.
        """
        if (method.upper(), path) in self.open_routes:
            return self._login_of(headers, required=False)
        return self.credentials(method, headers)

    def credentials(self, method: bytes, headers: Headers) -> "Login | None":
        """
        Judge a request's credential: C{Authorization: Bearer <token>}, or else the
        dashboard's session cookie (L{SESSION_COOKIE}, given by C{POST /login} for the
        token), which on a state-changing method counts only with the login's CSRF token in
        an C{X-CSRF-Token} header (a 403 C{csrf_token_required} without it). With no token
        configured, everything passes.

        @return: the dashboard login the request came with, or L{None}.
        """
        if self._token is None:
            return None
        header = (headers.getRawHeaders(b"authorization") or [None])[-1]
        if header is None:
            login = self._login_of(headers, required=True)
            if login is not None:
                if method.upper() not in SAFE_METHODS:
                    given = (headers.getRawHeaders(CSRF_HEADER) or [b""])[-1]
                    if not hmac.compare_digest(given, login.csrf.encode("ascii")):
                        raise ApiError(
                            403,
                            "csrf_token_required",
                            "a change made with the dashboard's session cookie needs its "
                            "CSRF token in an X-CSRF-Token header",
                        )
                return login
        self._check_token(header)
        return None

    def _login_of(self, headers: Headers, required: bool) -> "Login | None":
        if self._token is None:
            return None
        expected = self._token()
        if not expected:
            return None
        return self.logins.find(cookie_value(headers, SESSION_COOKIE), expected)

    def _check_token(self, header: bytes | str | None) -> None:
        if self._token is None:
            return
        expected = self._token()
        if not expected:
            raise _unauthorized("the API token is not configured on the server", False)
        if header is None:
            raise _unauthorized("an Authorization: Bearer token is required", False)
        if isinstance(header, str):
            header = header.encode("utf-8")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise _unauthorized("the Authorization header must be 'Bearer <token>'", True)
        if not hmac.compare_digest(given.strip(), expected.encode("utf-8")):
            raise _unauthorized("wrong token", True)

    def _body(self, request) -> dict:
        if not json_content_type(request.getHeader("content-type")):
            raise self._not_json()
        raw = request.content.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "bad_json", "the body is not valid JSON: {}".format(e))
        if not isinstance(data, dict):
            raise ApiError(
                400,
                "not_an_object",
                "the body must be a JSON object, not {}".format(type(data).__name__),
            )
        return data

    def _service(self, ext_id: int):
        svc = self._manager.extensions.get(ext_id) or self._manager.draining.get(ext_id)
        if svc is None:
            raise NotFound(ext_id)
        return svc

    def _describe_all(self) -> list[dict]:
        services = list(self._manager.extensions.values()) + list(
            self._manager.draining.values()
        )
        return [s.describe() for s in sorted(services, key=lambda s: s.extension.id)]

    @staticmethod
    def _session_id(value: str) -> str:
        try:
            return str(_uuid.UUID(value))
        except ValueError:
            raise ApiError(400, "bad_request", "{!r} is not a UUID".format(value))

    # ------------------------------------------------------------ errors, one place

    @app.handle_errors(Exception)
    def error(self, request, failure):
        return self.answer_error(request, self._api_error(request, failure))

    @staticmethod
    def answer_error(request, e: ApiError) -> bytes:
        """Set C{request}'s status and headers for C{e}; return the body."""
        for name, value in e.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setResponseCode(e.status)
        request.setHeader(b"Content-Type", JSON_TYPE)
        return _error_body(e)

    def _api_error(self, request, failure) -> ApiError:
        """Every exception a route may raise, as the L{ApiError} to answer with."""
        e = failure.value
        if isinstance(e, ApiError):
            return e
        if isinstance(e, InvalidField):
            return ApiError(422, "invalid_field", str(e), extra={"field": e.field})
        if isinstance(e, NotFound):
            return ApiError(404, "not_found", str(e))
        if isinstance(e, Conflict):
            return ApiError(409, "conflict", str(e))
        if isinstance(e, StoreUnavailable):
            detail = str(e) or "the extension store is unavailable"
            return ApiError(503, "store_unavailable", detail, {"Retry-After": "5"})
        if isinstance(e, RouteNotFound):
            return ApiError(404, "not_found", "no such route")
        if isinstance(e, MethodNotAllowed):
            allowed = ", ".join(sorted(e.valid_methods or ()))
            return ApiError(
                405, "method_not_allowed", "allowed methods: {}".format(allowed), {"Allow": allowed}
            )
        if isinstance(e, HTTPException):
            return ApiError(e.code or 500, "http_error", e.description or e.name)
        self.log.failure("unhandled error in {method} {path}", failure,
                         method=request.method, path=request.path)
        return ApiError(500, "internal_error", "internal server error")

    # ------------------------------------------------------------ health, status, metrics

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        # "degraded" is a 503 so a load balancer or a monitor sees it without reading the
        # body: an extension that does not listen loses every call sent to it.
        failed = [
            {"id": ext_id, "error": svc.error}
            for ext_id, svc in sorted(self._manager.extensions.items())
            if svc.status == "failed"
        ]
        if failed:
            return _json(request, {"status": "degraded", "failed_extensions": failed}, 503)
        return _json(request, {"status": "ok"})

    @app.route("/api/status", methods=["GET"])
    def status(self, request):
        data = dict(self._status())
        extensions = self._describe_all()
        data["store"] = {"available": bool(self._store.available)}
        data["extensions"] = [
            {
                "id": d["id"],
                "ai_extension": d["ai_extension"],
                "status": d["status"],
                "bound_ai_port": d["bound_ai_port"],
                "bound_return_port": d["bound_return_port"],
                "active_calls": d["active_calls"],
            }
            for d in extensions
        ]
        return _json(request, data)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        if self._registry is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)

    @app.route("/api/openapi.json", methods=["GET"])
    def openapi(self, request):
        return _json(request, openapi_document())

    # ------------------------------------------------------------ extensions

    @app.route("/api/extensions", methods=["GET"])
    def list_extensions(self, request):
        return _json(request, {"extensions": self._describe_all()})

    @app.route("/api/extensions", methods=["POST"])
    async def create_extension(self, request):
        ext = Extension.from_dict(self._body(request))
        svc = await self._control.add(ext)
        request.setHeader(b"Location", "/api/extensions/{}".format(ext.id).encode())
        return _json(request, svc.describe(), 201)

    @app.route("/api/extensions/<int:ext_id>", methods=["GET"])
    def get_extension(self, request, ext_id):
        return _json(request, self._service(ext_id).describe())

    @app.route("/api/extensions/<int:ext_id>", methods=["PUT"])
    async def put_extension(self, request, ext_id):
        data = self._body(request)
        if "id" in data and data["id"] != ext_id:
            raise InvalidField(
                "id", "must match the id in the path ({}), or be omitted".format(ext_id)
            )
        data["id"] = ext_id
        ext = Extension.from_dict(data)
        svc = await self._control.update(ext)
        return _json(request, svc.describe())

    @app.route("/api/extensions/<int:ext_id>", methods=["DELETE"])
    async def delete_extension(self, request, ext_id):
        raw = _arg(request, "force")
        if raw is None or raw.lower() in ("false", "0", "no"):
            force = False
        elif raw.lower() in ("true", "1", "yes"):
            force = True
        else:
            raise ApiError(400, "bad_request", "force must be true or false, not {!r}".format(raw))
        svc = await self._control.remove(ext_id, force=force)
        return _json(request, svc.describe())

    @app.route("/api/extensions/<int:ext_id>/restart", methods=["POST"])
    async def restart_extension(self, request, ext_id):
        svc = await self._control.restart(ext_id)
        return _json(request, svc.describe())

    # ------------------------------------------------------------ the gate

    @app.route("/api/gates/<int:condominium_id>/open", methods=["POST"])
    async def open_gate(self, request, condominium_id):
        """An operator opens a condominium's gate by hand (see L{audiosocket.gate.OperatorDesk})."""
        if self._gates is None:
            raise ApiError(404, "not_found", "this server opens no gates")
        body = self._body(request)
        try:
            result = await self._gates.open(condominium_id, body)
        except KeyError as e:
            raise ApiError(404, "not_found", str(e.args[0]) if e.args else "not found") from None
        except GateError as e:
            raise ApiError(409, "cannot_open", str(e)) from None
        data = {"condominium_id": condominium_id, **result.to_dict()}
        if not result.ok:
            # The error code is "gate_failed"; the relay's or PBX's reason is the detail.
            del data["error"]
            raise ApiError(502, "gate_failed", result.error or "the gate did not open", extra=data)
        return _json(request, data)

    # ------------------------------------------------------------ residents directories

    #: The directories (L{audiosocket.directories.DirectoryControl}), set by makeService;
    #: None: the C{/api/condominiums} routes answer 404.
    directories = None

    def _directory_control(self):
        if self.directories is None:
            raise ApiError(404, "not_found", "directories are not managed by this server")
        return self.directories

    @staticmethod
    def _any_json(request) -> Any:
        if not json_content_type(request.getHeader("content-type")):
            raise Api._not_json()
        try:
            return json.loads(request.content.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "bad_json", "the body is not valid JSON: {}".format(e))

    async def _directory_call(self, method, *args):
        """Run a L{DirectoryControl} method, its errors as the API's."""
        from .directories import UnknownCondominium
        from .flow.directory import DirectoryError

        try:
            return await method(*args)
        except UnknownCondominium as e:
            raise ApiError(404, "not_found", "no condominium {}".format(e.args[0])) from None
        except DirectoryError as e:
            extra = {"field": e.field or "apartments"}
            if e.index is not None:
                extra["index"] = e.index
            raise ApiError(422, "invalid_field", str(e), extra=extra) from None

    @app.route("/api/condominiums", methods=["GET"])
    def list_condominiums(self, request):
        return _json(request, {"condominiums": self._directory_control().condominiums()})

    @app.route("/api/condominiums/<int:condominium_id>/apartments", methods=["GET"])
    async def list_apartments(self, request, condominium_id):
        control = self._directory_control()
        rows = await self._directory_call(defer.maybeDeferred, control.rows, condominium_id)
        return _json(request, {"condominium_id": condominium_id, "apartments": rows})

    @app.route("/api/condominiums/<int:condominium_id>/apartments", methods=["PUT"])
    async def put_apartments(self, request, condominium_id):
        control = self._directory_control()
        rows = await self._directory_call(control.replace, condominium_id, self._any_json(request))
        return _json(request, {"condominium_id": condominium_id, "apartments": rows})

    @app.route("/api/condominiums/<int:condominium_id>/apartments/<string:number>", methods=["PUT"])
    async def put_apartment(self, request, condominium_id, number):
        control = self._directory_control()
        created, row = await self._directory_call(
            control.put_apartment, condominium_id, number, self._body(request)
        )
        if created:
            location = "/api/condominiums/{}/apartments/{}".format(
                condominium_id, row["apartment_number"]
            )
            request.setHeader(b"Location", location.encode("utf-8"))
        return _json(request, row, 201 if created else 200)

    @app.route("/api/condominiums/<int:condominium_id>/apartments/<string:number>", methods=["DELETE"])
    async def delete_apartment(self, request, condominium_id, number):
        control = self._directory_control()
        if not await self._directory_call(control.remove_apartment, condominium_id, number):
            raise ApiError(
                404,
                "not_found",
                "no apartment {!r} in condominium {}".format(number[:32], condominium_id),
            )
        request.setResponseCode(204)
        return b""

    # ------------------------------------------------------------ sessions and calls

    @app.route("/api/sessions", methods=["GET"])
    def list_sessions(self, request):
        return _json(request, {"sessions": list(self._sessions.describe_all())})

    @app.route("/api/sessions/<string:session_id>", methods=["GET"])
    def get_session(self, request, session_id):
        sid = self._session_id(session_id)
        data = self._sessions.describe(sid)
        if data is None:
            raise ApiError(404, "not_found", "no session {}".format(sid))
        return _json(request, data)

    @app.route("/api/sessions/<string:session_id>/hangup", methods=["POST"])
    def hangup_session(self, request, session_id):
        sid = self._session_id(session_id)
        try:
            d = defer.maybeDeferred(self._sessions.hangup, sid)
        except KeyError:
            d = defer.fail(KeyError(sid))
        failed = []
        d.addErrback(lambda f: failed.append(f) if f.check(KeyError) else f)
        if failed:
            raise ApiError(404, "not_found", "no session {}".format(sid))
        # The goodbye takes seconds to play: answer now, log what goes wrong later.
        d.addErrback(
            lambda f: self.log.failure("hanging up session {uuid} failed", f, uuid=sid)
        )
        return _json(request, {"uuid": sid, "status": "hanging_up"}, 202)

    @app.route("/api/events", methods=["GET"])
    def events_stream(self, request):
        """
        Server-sent events (see L{audiosocket.events}): the stream stays open; it ends when
        the client goes, the server stops, or the client does not keep up.
        """
        if self.events.closed:
            raise ApiError(503, "shutting_down", "the server is stopping", {"Retry-After": "1"})
        if self.events.full():
            raise ApiError(
                503, "too_many_streams", "too many event streams open", {"Retry-After": "5"}
            )
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return self.events.subscribe(request).done

    @app.route("/api/calls", methods=["GET"])
    async def list_calls(self, request):
        """
        Finished calls, newest first, filtered (outcome, condominium, apartment, time range);
        C{format=csv} gives them as a spreadsheet (see L{CSV_COLUMNS}).
        """
        _only(request, CALLS_PARAMETERS)
        raw = _arg(request, "limit")
        limit = CALLS_LIMIT_DEFAULT
        if raw is not None:
            try:
                limit = int(raw)
            except ValueError:
                limit = None
            if limit is None or not 1 <= limit <= CALLS_LIMIT_MAX:
                raise ApiError(
                    400,
                    "bad_request",
                    "limit must be an integer between 1 and {}, not {!r}".format(
                        CALLS_LIMIT_MAX, raw
                    ),
                )
        outcome = _arg(request, "outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise InvalidField("outcome", "must be one of {}".format(", ".join(OUTCOMES)))
        form = _arg(request, "format") or "json"
        if form not in ("json", "csv"):
            raise InvalidField("format", 'must be "json" or "csv"')
        calls = await self._store.calls(outcome=outcome, limit=limit, **_filters(request))
        if form == "csv":
            return _csv(request, calls)
        return _json(request, {"calls": list(calls)})

    # ------------------------------------------------------------ pre-authorisations

    def _preauth_service(self):
        if self._preauths is None:
            raise ApiError(404, "not_found", "pre-authorisations are not enabled on this server")
        return self._preauths

    @app.route("/api/preauth", methods=["POST"])
    async def create_preauth(self, request):
        preauths = self._preauth_service()
        try:
            item, code = await preauths.create(self._body(request))
        except PreauthLimit as e:
            raise ApiError(409, "conflict", str(e))
        # The only time the code is shown: no cache may keep it.
        request.setHeader(b"Cache-Control", b"no-store")
        return _json(request, dict(item.to_public(), code=code), 201)

    @app.route("/api/preauth", methods=["GET"])
    async def list_preauths(self, request):
        preauths = self._preauth_service()
        raw = _arg(request, "condominium_id")
        if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 10:
            raise ApiError(
                400, "bad_request", "condominium_id is required and must be a positive integer"
            )
        apartment = _arg(request, "apartment")
        if apartment is not None and len(apartment) > 16:
            raise ApiError(400, "bad_request", "apartment is too long")
        items = await preauths.list(int(raw), apartment)
        return _json(request, {"preauths": [item.to_public() for item in items]})

    @app.route("/api/preauth/<string:preauth_id>", methods=["DELETE"])
    async def delete_preauth(self, request, preauth_id):
        if not await self._preauth_service().delete(preauth_id):
            raise ApiError(404, "not_found", "no pre-authorisation {}".format(preauth_id[:64]))
        request.setResponseCode(204)
        return b""
    # ------------------------------------------------------------ access audit, retention

    @app.route("/api/access", methods=["GET"])
    async def list_access(self, request):
        """The access audit, newest first; a bad filter is a 422 naming it."""
        _only(request, ACCESS_PARAMETERS)
        filters = _filters(request)
        limit = _int_arg(request, "limit", 1, ACCESS_LIMIT_MAX)
        events = await self._store.access_events(
            limit=ACCESS_LIMIT_DEFAULT if limit is None else limit, **filters
        )
        return _json(request, {"access": list(events)})

    @app.route("/api/calls", methods=["DELETE"])
    async def delete_calls(self, request):
        """Delete the call records stored before C{?before=} (ISO 8601; LGPD erasure)."""
        _only(request, ("before",))
        before = _time_arg(request, "before")
        if before is None:
            raise InvalidField(
                "before", "is required: the records stored before this time are deleted"
            )
        deleted = await self._store.delete_calls(before)
        self.log.info(
            "API: deleted {n} call record(s) stored before {before}",
            n=deleted,
            before=_arg(request, "before"),
        )
        return _json(request, {"deleted": deleted})


ACCESS_LIMIT_DEFAULT = 100
ACCESS_LIMIT_MAX = 1000
ACCESS_PARAMETERS = ("condominium_id", "apartment", "since", "until", "limit")
APARTMENT_MAX = 32


CALLS_PARAMETERS = ("limit", "outcome", "condominium_id", "apartment", "since", "until", "format")
#: The columns of C{GET /api/calls?format=csv}, each a path into the call record.
CSV_COLUMNS = (
    ("uuid", ("uuid",)),
    ("node", ("node",)),
    ("started_at", ("started_at",)),
    ("ended_at", ("ended_at",)),
    ("outcome", ("outcome",)),
    ("ended_by", ("ended_by",)),
    ("condominium_id", ("condominium_id",)),
    ("extension_id", ("extension_id",)),
    ("apartment", ("facts", "apartment")),
    ("visitor_name", ("facts", "visitor_name")),
    ("intent", ("facts", "intent")),
    ("resident", ("facts", "resident")),
    ("decision_input", ("decision_input",)),
    ("decided_by", ("reach", "decided_by")),
    ("attempts", ("attempts",)),
    ("gate_result", ("gate", "result")),
    ("total_s", ("timings", "total_s")),
)


def _filters(request) -> dict:
    """The condominium, apartment and time range filters of a listing (a bad one: a 422)."""
    since = _time_arg(request, "since")
    until = _time_arg(request, "until")
    if since is not None and until is not None and until < since:
        raise InvalidField("until", "must not be before since")
    apartment = _arg(request, "apartment")
    if apartment is not None and not 1 <= len(apartment) <= APARTMENT_MAX:
        raise InvalidField("apartment", "must be 1 to {} characters".format(APARTMENT_MAX))
    return {
        "condominium_id": _int_arg(request, "condominium_id", 1, 2**31),
        "apartment": apartment,
        "since": since,
        "until": until,
    }


def _cell(record: dict, path: tuple) -> str:
    value: Any = record
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    text = "" if value is None else str(value)
    # A cell a spreadsheet would run as a formula (a visitor's "name" is what a caller said):
    # kept as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(request, calls) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([name for name, _ in CSV_COLUMNS])
    for record in calls:
        writer.writerow([_cell(record, path) for _, path in CSV_COLUMNS])
    request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
    request.setHeader(b"Content-Disposition", b'attachment; filename="calls.csv"')
    return out.getvalue().encode("utf-8")


def _only(request, names) -> None:
    """A query parameter the route does not take is a 400 naming it (a typo filters nothing)."""
    for raw in request.args:
        name = raw.decode("utf-8", "replace")
        if name not in names:
            raise ApiError(
                400,
                "bad_request",
                "unknown parameter {!r}; this route takes {}".format(name, ", ".join(names)),
            )


def _int_arg(request, name: str, low: int, high: int) -> int | None:
    """The query parameter C{name} as an integer in [low, high], or None; else a 422."""
    raw = _arg(request, name)
    if raw is None:
        return None
    try:
        value = int(raw, 10)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise InvalidField(
            name, "must be an integer between {} and {}, not {!r}".format(low, high, raw[:40])
        )
    return value


def _time_arg(request, name: str) -> float | None:
    """
    The query parameter C{name}, ISO 8601 with C{Z} or an offset, as epoch seconds, or None;
    else a 422. A C{+} left unencoded in the query (read as a space) is taken as C{+}.
    """
    raw = _arg(request, name)
    if raw is None:
        return None
    text = raw.strip().replace(" ", "+")
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in text or when.year < 1970:
        raise InvalidField(
            name,
            "must be an ISO 8601 date and time with Z or an offset "
            "(2026-12-05T14:00:00Z, 2026-12-05T11:00:00-03:00), not {!r}".format(raw[:40]),
        )
    return when.timestamp()


# ---------------------------------------------------------------- the HTTP layer


class _CheckedRequest(server.Request):
    """
    A request judged by L{Api.admit} as soon as its head is in, and whose body is counted
    against the cap as it arrives. Twisted's C{Request} buffers the whole body before any
    resource sees it, so this is the only place a bound on it can hold.

    A refusal writes the whole answer, closes the connection (whatever the client still
    sends is never read) and leaves the request unprocessed.
    """

    _refused = False
    _received = 0

    def gotLength(self, length):
        api = self.channel.site.api
        # The request line is parsed, but Request.method is only set once the body is in;
        # the channel holds it meanwhile.
        method = getattr(self.channel, "_command", b"")
        error = api.admit(method, self.requestHeaders, length)
        if error is not None:
            self._refuse(api, error, method)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        api = self.channel.site.api
        if self._received > api.max_body:  # chunked, or more than Content-Length promised
            self._refuse(api, api._too_large(), getattr(self.channel, "_command", b""))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self, api: Api, error: ApiError, method: bytes) -> None:
        self._refused = True
        # Without this the channel would invite the body ("100 Continue") after the answer.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        channel.transport.write(api.refusal(error, method, self.client))
        channel.loseConnection()


class _Guarded(resource.Resource):
    """
    The Klein resource behind L{Api.authorize}: the token is judged here, once, before the
    router runs, so every route (an unknown one included, and any route added later) is
    private unless L{Api.open_routes} names it.
    """

    isLeaf = True

    def __init__(self, api: Api, routes: resource.Resource, pages: resource.Resource):
        super().__init__()
        self._api = api
        self._routes = routes
        self._pages = pages

    def render(self, request):
        try:
            request.dashboard_login = self._api.authorize(
                request.method, request.path, request.requestHeaders
            )
        except ApiError as e:
            if e.code == "csrf_token_required":
                self._api.count_refusal(e, request.method, request.client)
            if e.status == 401 and is_page(request.path):
                return self._api.dashboard.unauthorized_page(request, e)
            return self._api.answer_error(request, e)
        if is_page(request.path):
            return self._pages.render(request)
        return self._routes.render(request)


class ApiSite(server.Site):
    """The C{Site} serving an L{Api}: every request passes L{Api.admit} first."""

    requestFactory = _CheckedRequest
    displayTracebacks = False

    def __init__(self, api: Api, **kwargs):
        super().__init__(api.resource(), **kwargs)
        self.api = api
        self._channels: weakref.WeakSet = weakref.WeakSet()

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        if channel is not None:
            self._channels.add(channel)
        return channel

    def close_connections(self) -> None:
        """Close every connection of this site (see L{Api.shutdown})."""
        for channel in list(self._channels):
            # Twisted's protocol here wraps the HTTPChannel, which holds the transport.
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.loseConnection()

    def getContentFile(self, length):
        # The body is at most the cap: memory, never a temporary file per request.
        return io.BytesIO()


# ---------------------------------------------------------------- OpenAPI


def _error_response(description: str) -> dict:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
        },
    }


def _json_response(description: str, ref: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ref}}},
    }


_EXT_ID = {
    "name": "ext_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_SESSION_ID = {
    "name": "uuid",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_EXT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ExtensionInput"}}
    },
}


def _directory_document(document: dict, pick) -> None:
    """The residents directories' routes and schemas (L{audiosocket.directories})."""
    from .directories import MAX_APARTMENTS, MAX_RESIDENTS, MAX_TEXT

    cid = {
        "name": "condominium_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
    number = {
        "name": "number",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "maxLength": 32},
        "description": 'the apartment number ("101", "B101"; "0101" and "ap 101" mean "101")',
    }
    schema = "#/components/schemas/"

    def body(ref):
        return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}

    document["paths"].update(
        {
            "/api/condominiums": {
                "get": {
                    "summary": "The condominiums of the config, with their apartments count",
                    "operationId": "listCondominiums",
                    "responses": {
                        "200": _json_response("Condominiums", schema + "CondominiumList"),
                        **pick("401"),
                    },
                }
            },
            "/api/condominiums/{condominium_id}/apartments": {
                "parameters": [cid],
                "get": {
                    "summary": "A condominium's residents directory (what the next call uses)",
                    "operationId": "listApartments",
                    "responses": {
                        "200": _json_response("The directory", schema + "Directory"),
                        **pick("401", "404"),
                    },
                },
                "put": {
                    "summary": "Replace the whole directory (the original system's JSON "
                    "file, as is); the next call uses it",
                    "operationId": "replaceApartments",
                    "requestBody": body(schema + "DirectoryInput"),
                    "responses": {
                        "200": _json_response("The directory as stored", schema + "Directory"),
                        **pick("400", "401", "404", "422", "503"),
                    },
                },
            },
            "/api/condominiums/{condominium_id}/apartments/{number}": {
                "parameters": [cid, number],
                "put": {
                    "summary": "Add or replace one apartment; the next call uses it",
                    "operationId": "putApartment",
                    "requestBody": body(schema + "ApartmentInput"),
                    "responses": {
                        "200": _json_response("Replaced", schema + "Apartment"),
                        "201": _json_response("Added", schema + "Apartment"),
                        **pick("400", "401", "404", "422", "503"),
                    },
                },
                "delete": {
                    "summary": "Remove one apartment; the next call no longer finds it",
                    "operationId": "deleteApartment",
                    "responses": {
                        "204": {"description": "Removed"},
                        **pick("401", "404", "503"),
                    },
                },
            },
        }
    )
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
    resident = {
        "oneOf": [
            text,
            {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": text, "phone": text},
                "description": "a resident with a phone of their own (a dial string)",
            },
        ]
    }
    apartment_props = {
        "apartment_number": {"type": ["string", "integer"]},
        "residents": {
            "oneOf": [text, {"type": "array", "maxItems": MAX_RESIDENTS, "items": resident}]
        },
        "voip_number": {
            "type": ["string", "integer"],
            "description": "the apartment's dial string (no comma, CR or LF)",
        },
    }
    rows = {"type": "array", "maxItems": MAX_APARTMENTS, "items": {"$ref": schema + "Apartment"}}
    document["components"]["schemas"].update(
        {
            "Apartment": {
                "type": "object",
                "required": ["apartment_number", "residents", "voip_number"],
                "properties": apartment_props,
            },
            "ApartmentInput": {
                "type": "object",
                "required": ["residents", "voip_number"],
                "description": "apartment_number may be omitted but must match the path",
                "properties": apartment_props,
            },
            "DirectoryInput": {
                "oneOf": [
                    rows,
                    {"type": "object", "required": ["apartments"], "properties": {"apartments": rows}},
                ]
            },
            "Directory": {
                "type": "object",
                "required": ["condominium_id", "apartments"],
                "properties": {"condominium_id": {"type": "integer"}, "apartments": rows},
            },
            "CondominiumList": {
                "type": "object",
                "required": ["condominiums"],
                "properties": {
                    "condominiums": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["id", "name", "apartments"],
                            "properties": {
                                "id": {"type": "integer"},
                                "name": {"type": "string"},
                                "apartments": {"type": "integer", "minimum": 0},
                            },
                        },
                    }
                },
            },
        }
    )


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of every route, schema and error of L{Api}."""
    errors = {
        "400": _error_response("Bad JSON, a body that is not an object, or a bad parameter"),
        "401": _error_response("Missing or wrong bearer token"),
        "403": _error_response(
            "A change from another site: an Origin that is not an allowed host, or "
            "Sec-Fetch-Site cross-site or same-site; or a change made with the dashboard's "
            "session cookie without its X-CSRF-Token"
        ),
        "404": _error_response(
            "Unknown extension, session, pre-authorisation, condominium, apartment or route"
        ),
        "405": _error_response("Method not allowed on this route"),
        "409": _error_response(
            "Extension id or port already taken, or the condominium holds its maximum of "
            "pre-authorisations ([access] max_preauths)"
        ),
        "413": _error_response(
            "The body is over the cap (api.max_body_kb); refused before it is read, and the "
            "connection is closed"
        ),
        "415": _error_response("A body not sent as Content-Type: application/json"),
        "421": _error_response(
            "The Host header is not an allowed name (api.allowed_hosts); refused before any "
            "route runs"
        ),
        "422": _error_response("Invalid field; `field` names it"),
        "502": _error_response(
            "The gate did not open (the relay failed or refused, or the PBX did not take the "
            "hand-off); `result`, `attempts` say how"
        ),
        "503": _error_response(
            "The store is unavailable (nothing changed), or too many event streams"
        ),
    }

    def pick(*codes):
        return {c: errors[c] for c in codes}

    def query(name: str, schema: dict, description: str | None = None) -> dict:
        param = {"name": name, "in": "query", "required": False, "schema": schema}
        if description:
            param["description"] = description
        return param

    # The filters of a listing (calls, the access audit): see L{_filters}.
    when = {"type": "string", "format": "date-time"}
    filters = [
        query("condominium_id", {"type": "integer", "minimum": 1}),
        query("apartment", {"type": "string", "minLength": 1, "maxLength": APARTMENT_MAX}),
        query("since", when, "ISO 8601 with Z or an offset; stored at or after"),
        query("until", when, "ISO 8601 with Z or an offset; stored at or before"),
    ]

    ext = "#/components/schemas/Extension"
    port = {"type": "integer", "minimum": 1, "maximum": 65535}
    number = {"type": "string", "pattern": "^[0-9A-Za-z*#+-]{1,32}$"}
    ext_props = {
        "id": {"type": "integer", "minimum": 1},
        "ai_extension": number,
        "ai_port": port,
        "return_extension": number,
        "return_port": port,
        "host": {
            "type": "string",
            "minLength": 1,
            "maxLength": 253,
            "description": "an IPv4 or IPv6 address or a DNS host name; no port, no commas, "
            "spaces or control characters",
        },
        "condominium_id": {"type": "integer", "minimum": 1},
        "max_calls": {"type": ["integer", "null"], "minimum": 1},
    }
    assert set(ext_props) == set(EXTENSION_FIELDS)
    instant = {
        "type": "string",
        "format": "date-time",
        "description": "ISO 8601 with Z or an offset; a time without one is refused",
    }
    preauth_props = {
        "condominium_id": {"type": "integer", "minimum": 1},
        "apartment": {
            "type": ["string", "integer"],
            "description": "an apartment of the condominium's directory",
        },
        "visitor_name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "valid_from": instant,
        "valid_until": {**instant, "description": "exclusive; after valid_from, in the future"},
        "weekdays": {
            "type": ["array", "null"],
            "items": {"type": "integer", "minimum": 0, "maximum": 6},
            "minItems": 1,
            "maxItems": 7,
            "uniqueItems": True,
            "description": "0 = Monday ... 6 = Sunday, in the condominium's local time; "
            "null or omitted: every day",
        },
        "hours": {
            "type": ["string", "null"],
            "pattern": "^[0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]$",
            "description": "HH:MM-HH:MM local time, end exclusive; an overnight range "
            "(22:00-06:00) belongs to the day it starts; null or omitted: all day",
        },
        "uses": {"type": "integer", "minimum": 1, "maximum": MAX_USES, "default": 1},
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "audiosocket",
            "version": "1",
            "description": "AI virtual doorman: extensions, sessions, calls and "
            "pre-authorisations.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness (never needs a token)",
                    "operationId": "healthz",
                    "security": [],
                    "responses": {
                        "200": _json_response("Alive", "#/components/schemas/Health"),
                        "503": _json_response(
                            "Degraded: an extension does not listen (failed_extensions says "
                            "which and why; it is retried)",
                            "#/components/schemas/Health",
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **pick("401", "404"),
                    },
                }
            },
            "/api/status": {
                "get": {
                    "summary": "Process status, store availability, extension summaries",
                    "operationId": "getStatus",
                    "responses": {
                        "200": _json_response("Status", "#/components/schemas/Status"),
                        **pick("401"),
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "getOpenApi",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **pick("401"),
                    },
                }
            },
            "/api/extensions": {
                "get": {
                    "summary": "All extensions (including draining ones)",
                    "operationId": "listExtensions",
                    "responses": {
                        "200": _json_response(
                            "Extensions", "#/components/schemas/ExtensionList"
                        ),
                        **pick("401"),
                    },
                },
                "post": {
                    "summary": "Add an extension; answers once both ports listen",
                    "operationId": "createExtension",
                    "requestBody": _EXT_BODY,
                    "responses": {
                        "201": {
                            **_json_response("Created and listening", ext),
                            "headers": {
                                "Location": {
                                    "description": "URL of the new extension",
                                    "schema": {"type": "string"},
                                }
                            },
                        },
                        **pick("400", "401", "409", "422", "503"),
                    },
                },
            },
            "/api/extensions/{ext_id}": {
                "parameters": [_EXT_ID],
                "get": {
                    "summary": "One extension",
                    "operationId": "getExtension",
                    "responses": {
                        "200": _json_response("The extension", ext),
                        **pick("401", "404"),
                    },
                },
                "put": {
                    "summary": "Replace an extension (changed ports are rebound live)",
                    "operationId": "updateExtension",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "$ref": "#/components/schemas/ExtensionUpdate"
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json_response("Updated", ext),
                        **pick("400", "401", "404", "409", "422", "503"),
                    },
                },
                "delete": {
                    "summary": "Remove an extension: its ports close at once, its calls "
                    "drain (or are hung up with force=true)",
                    "operationId": "deleteExtension",
                    "parameters": [
                        {
                            "name": "force",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean", "default": False},
                        }
                    ],
                    "responses": {
                        "200": _json_response("Removed (status draining or stopped)", ext),
                        **pick("400", "401", "404", "503"),
                    },
                },
            },
            "/api/extensions/{ext_id}/restart": {
                "parameters": [_EXT_ID],
                "post": {
                    "summary": "Close and reopen the extension's ports; calls stay up",
                    "operationId": "restartExtension",
                    "responses": {
                        "200": _json_response("Restarted", ext),
                        **pick("401", "404", "409"),
                    },
                },
            },
            "/api/gates/{condominium_id}/open": {
                "parameters": [
                    {
                        "name": "condominium_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "post": {
                    "summary": "Open a condominium's gate by hand (audited); a dtmf gate opens "
                    "on a call in progress (uuid), which then ends",
                    "operationId": "openGate",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/GateOpenRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json_response("Opened (or handed to the PBX)", "#/components/schemas/GateOpenResult"),
                        "409": _error_response("This condominium has no gate, or a dtmf gate needs a call"),
                        **pick("400", "401", "404", "422", "502"),
                    },
                },
            },
            "/api/sessions": {
                "get": {
                    "summary": "Calls in progress",
                    "operationId": "listSessions",
                    "responses": {
                        "200": _json_response(
                            "Sessions", "#/components/schemas/SessionList"
                        ),
                        **pick("401"),
                    },
                }
            },
            "/api/sessions/{uuid}": {
                "parameters": [_SESSION_ID],
                "get": {
                    "summary": "One call in progress",
                    "operationId": "getSession",
                    "responses": {
                        "200": _json_response("The session", "#/components/schemas/Session"),
                        **pick("400", "401", "404"),
                    },
                },
            },
            "/api/sessions/{uuid}/hangup": {
                "parameters": [_SESSION_ID],
                "post": {
                    "summary": "Say goodbye and hang up both legs (asynchronously)",
                    "operationId": "hangupSession",
                    "responses": {
                        "202": _json_response(
                            "Hangup started", "#/components/schemas/HangupAccepted"
                        ),
                        **pick("400", "401", "404"),
                    },
                },
            },
            "/api/events": {
                "get": {
                    "summary": "Server-sent events: session started/changed/ended, "
                    "extension changed/removed (JSON data)",
                    "operationId": "events",
                    "responses": {
                        "200": {
                            "description": "An open text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **pick("401", "503"),
                    },
                }
            },
            "/api/calls": {
                "get": {
                    "summary": "Finished calls, newest first, filtered; format=csv for a "
                    "spreadsheet (an unknown parameter is a 400)",
                    "operationId": "listCalls",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": CALLS_LIMIT_MAX,
                                "default": CALLS_LIMIT_DEFAULT,
                            },
                        },
                        {
                            "name": "outcome",
                            "in": "query",
                            "required": False,
                            "schema": {"enum": list(OUTCOMES)},
                        },
                        *filters,
                        {
                            "name": "format",
                            "in": "query",
                            "required": False,
                            "schema": {"enum": ["json", "csv"], "default": "json"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Calls (JSON), or with format=csv a CSV file",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/CallList"}
                                },
                                "text/csv": {"schema": {"type": "string"}},
                            },
                        },
                        **pick("400", "401", "422", "503"),
                    },
                },
                "delete": {
                    "summary": "Delete the call records stored before a time (LGPD erasure; "
                    "the retention service does the same every hour, [privacy] "
                    "calls_retention_days)",
                    "operationId": "deleteCalls",
                    "parameters": [
                        {
                            "name": "before",
                            "in": "query",
                            "required": True,
                            "description": "ISO 8601 with Z or an offset",
                            "schema": {"type": "string", "format": "date-time"},
                        }
                    ],
                    "responses": {
                        "200": _json_response(
                            "How many were deleted", "#/components/schemas/Deleted"
                        ),
                        **pick("400", "401", "422", "503"),
                    },
                },
            },
            "/api/access": {
                "get": {
                    "summary": "The access audit: every gate opening, attempted or done, "
                    "newest first",
                    "operationId": "listAccess",
                    "parameters": [
                        *filters,
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": ACCESS_LIMIT_MAX,
                                "default": ACCESS_LIMIT_DEFAULT,
                            },
                        },
                    ],
                    "responses": {
                        "200": _json_response(
                            "Access entries", "#/components/schemas/AccessList"
                        ),
                        **pick("400", "401", "422", "503"),
                    },
                }
            },
            "/api/preauth": {
                "get": {
                    "summary": "The live pre-authorisations of a condominium (never a code)",
                    "operationId": "listPreauths",
                    "parameters": [
                        {
                            "name": "condominium_id",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 1},
                        },
                        {
                            "name": "apartment",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "maxLength": MAX_APARTMENT},
                        },
                    ],
                    "responses": {
                        "200": _json_response(
                            "Pre-authorisations, oldest first", "#/components/schemas/PreauthList"
                        ),
                        **pick("400", "401", "404", "503"),
                    },
                },
                "post": {
                    "summary": "Pre-authorise an expected visitor; the answer carries the "
                    "6-digit code, shown this once",
                    "operationId": "createPreauth",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/PreauthInput"}
                            }
                        },
                    },
                    "responses": {
                        "201": _json_response(
                            "Created; the only answer with the code",
                            "#/components/schemas/PreauthCreated",
                        ),
                        **pick("400", "401", "404", "409", "422", "503"),
                    },
                },
            },
            "/api/preauth/{preauth_id}": {
                "parameters": [
                    {
                        "name": "preauth_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    }
                ],
                "delete": {
                    "summary": "Delete a pre-authorisation (its code stops working at once)",
                    "operationId": "deletePreauth",
                    "responses": {
                        "204": {"description": "Deleted"},
                        **pick("401", "404", "503"),
                    },
                },
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {
                            "type": "string",
                            "enum": [
                                "bad_json",
                                "not_an_object",
                                "bad_request",
                                "unauthorized",
                                "cross_site",
                                "csrf_token_required",
                                "too_many_streams",
                                "shutting_down",
                                "body_too_large",
                                "unsupported_media_type",
                                "host_not_allowed",
                                "not_found",
                                "method_not_allowed",
                                "conflict",
                                "invalid_field",
                                "store_unavailable",
                                "http_error",
                                "internal_error",
                                "cannot_open",
                                "gate_failed",
                            ],
                        },
                        "detail": {"type": "string"},
                        "field": {
                            "type": "string",
                            "description": "the invalid field (422 only)",
                        },
                        "index": {
                            "type": "integer",
                            "description": "the directory row the invalid field is in (422 on "
                            "a directory only)",
                        },
                    },
                },
                "GateOpenRequest": {
                    "type": "object",
                    "required": ["reason"],
                    "additionalProperties": False,
                    "properties": {
                        "reason": {"type": "string", "minLength": 1, "maxLength": 200},
                        "uuid": {
                            "type": "string",
                            "description": "a call in progress on this condominium (required "
                            "for a dtmf gate: the digits go on its line, and the call ends)",
                        },
                        "apartment": {"type": "string", "pattern": "^[0-9A-Za-z-]{1,16}$"},
                    },
                },
                "GateOpenResult": {
                    "type": "object",
                    "required": ["condominium_id", "result", "attempts"],
                    "properties": {
                        "condominium_id": {"type": "integer"},
                        "result": {"enum": ["opened", "handed_off", "failed"]},
                        "error": {"type": ["string", "null"]},
                        "attempts": {"type": "integer"},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"enum": ["ok", "degraded"]},
                        "failed_extensions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "integer"},
                                    "error": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "ExtensionInput": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": [f for f in EXTENSION_FIELDS if f != "max_calls"],
                    "properties": ext_props,
                },
                "ExtensionUpdate": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "as ExtensionInput; id may be omitted but must match the path",
                    "required": [
                        f for f in EXTENSION_FIELDS if f not in ("id", "max_calls")
                    ],
                    "properties": ext_props,
                },
                "Extension": {
                    "type": "object",
                    "required": list(EXTENSION_FIELDS)
                    + ["status", "bound_ai_port", "bound_return_port", "active_calls"],
                    "properties": {
                        **ext_props,
                        "status": {
                            "type": "string",
                            "enum": ["listening", "failed", "draining", "stopped"],
                        },
                        "bound_ai_port": {"type": ["integer", "null"]},
                        "bound_return_port": {"type": ["integer", "null"]},
                        "active_calls": {"type": "integer", "minimum": 0},
                        "error": {"type": "string"},
                    },
                },
                "ExtensionList": {
                    "type": "object",
                    "required": ["extensions"],
                    "properties": {
                        "extensions": {"type": "array", "items": {"$ref": ext}}
                    },
                },
                "Status": {
                    "type": "object",
                    "required": ["store", "extensions"],
                    "properties": {
                        "store": {
                            "type": "object",
                            "properties": {"available": {"type": "boolean"}},
                        },
                        "extensions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "integer"},
                                    "ai_extension": {"type": "string"},
                                    "status": {"type": "string"},
                                    "active_calls": {"type": "integer"},
                                },
                            },
                        },
                    },
                    "additionalProperties": True,
                },
                "Session": {
                    "type": "object",
                    "description": "as described by the session registry",
                    "properties": {"uuid": {"type": "string", "format": "uuid"}},
                    "additionalProperties": True,
                },
                "SessionList": {
                    "type": "object",
                    "required": ["sessions"],
                    "properties": {
                        "sessions": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Session"},
                        }
                    },
                },
                "HangupAccepted": {
                    "type": "object",
                    "required": ["uuid", "status"],
                    "properties": {
                        "uuid": {"type": "string", "format": "uuid"},
                        "status": {"const": "hanging_up"},
                    },
                },
                "PreauthInput": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": [
                        "condominium_id", "apartment", "visitor_name", "valid_from", "valid_until"
                    ],
                    "properties": preauth_props,
                },
                "Preauth": {
                    "type": "object",
                    "required": list(preauth_props) + ["id", "created_at"],
                    "properties": {
                        **preauth_props,
                        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "uses": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "uses left",
                        },
                    },
                },
                "PreauthCreated": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Preauth"},
                        {
                            "type": "object",
                            "required": ["code"],
                            "properties": {
                                "code": {
                                    "type": "string",
                                    "pattern": "^[0-9]{6}$",
                                    "description": "typed at the gate as * code #; shown "
                                    "only in this answer, stored only hashed",
                                }
                            },
                        },
                    ]
                },
                "PreauthList": {
                    "type": "object",
                    "required": ["preauths"],
                    "properties": {
                        "preauths": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Preauth"},
                        }
                    },
                },
                "AccessEvent": {
                    "type": "object",
                    "description": "one gate opening, attempted or done",
                    "required": ["at", "ts", "condominium_id", "authorized_by", "result"],
                    "properties": {
                        "at": {"type": "string", "format": "date-time"},
                        "ts": {"type": "number", "description": "epoch seconds"},
                        "condominium_id": {"type": "integer"},
                        "gate": {"enum": list(GATES)},
                        "extension_id": {"type": ["integer", "null"]},
                        "uuid": {"type": ["string", "null"], "description": "the call"},
                        "apartment": {"type": ["string", "null"]},
                        "visitor": {
                            "type": ["string", "null"],
                            "description": "null with [privacy] keep_visitor_names = false",
                        },
                        "authorized_by": {"enum": list(AUTHORIZED_BY)},
                        "who": {
                            "type": ["string", "null"],
                            "description": "the resident's name, the pre-authorisation's id "
                            "or the operator's reason",
                        },
                        "evidence": {
                            "type": ["string", "null"],
                            "description": "dtmf:1, voice, code, operator:<reason>",
                        },
                        "result": {"enum": list(RESULTS)},
                        "error": {"type": ["string", "null"]},
                        "attempts": {"type": ["integer", "null"]},
                    },
                    "additionalProperties": True,
                },
                "AccessList": {
                    "type": "object",
                    "required": ["access"],
                    "properties": {
                        "access": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/AccessEvent"},
                        }
                    },
                },
                "Deleted": {
                    "type": "object",
                    "required": ["deleted"],
                    "properties": {"deleted": {"type": "integer", "minimum": 0}},
                },
                "CallList": {
                    "type": "object",
                    "required": ["calls"],
                    "properties": {
                        "calls": {
                            "type": "array",
                            "items": {"type": "object", "additionalProperties": True},
                        }
                    },
                },
            },
        },
    }
    _directory_document(document, pick)
    # Refusals made before any route runs apply to every operation of their kind.
    for item in document["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            operation["responses"]["421"] = errors["421"]
            if method in ("post", "put", "delete", "patch"):
                operation["responses"]["403"] = errors["403"]
            if "requestBody" in operation:
                operation["responses"]["413"] = errors["413"]
                operation["responses"]["415"] = errors["415"]
            operation["responses"] = dict(sorted(operation["responses"].items()))
    return document
