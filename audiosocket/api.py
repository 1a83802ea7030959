"""
The HTTP API: extensions, sessions, finished calls, status, health, metrics and its own
OpenAPI document, as a Klein app with its dependencies injected.

Mount C{Api(...).app.resource()} in a C{Site}; never C{app.run()}.

Errors are JSON C{{"error": code, "detail": text}} (plus C{"field"} for a 422), produced in one
place (L{Api.error}). Authentication: with a token configured, every request but
C{GET /healthz} needs C{Authorization: Bearer <token>}; a missing or wrong token is a 401 (RFC
6750: C{invalid_token} is a 401, not a 403), and so is every request while the token's source
(an environment variable) is unset.
"""

from __future__ import annotations

import hmac
import json
import uuid as _uuid
from typing import Any, Callable

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from .control import ExtensionControl, StoreUnavailable
from .extension import Conflict, NotFound
from .model import EXTENSION_FIELDS, InvalidField, Extension

JSON_TYPE = b"application/json; charset=utf-8"
CALLS_LIMIT_DEFAULT = 50
CALLS_LIMIT_MAX = 1000


class ApiError(Exception):
    """An error with its HTTP status and code, raised by a route."""

    def __init__(self, status: int, code: str, detail: str, headers=None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


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
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        control: ExtensionControl,
        sessions,
        store,
        *,
        token: Callable[[], str | None] | None = None,
        status: Callable[[], dict] = dict,
        metrics_registry=None,
    ):
        self._control = control
        self._manager = control.manager
        self._sessions = sessions
        self._store = store
        self._token = token
        self._status = status
        self._registry = metrics_registry

    # ------------------------------------------------------------ helpers

    def _authorize(self, request) -> None:
        if self._token is None:
            return
        expected = self._token()
        header = request.getHeader("authorization")
        if not expected:
            raise _unauthorized("the API token is not configured on the server", False)
        if header is None:
            raise _unauthorized("an Authorization: Bearer token is required", False)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized("the Authorization header must be 'Bearer <token>'", True)
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise _unauthorized("wrong token", True)

    def _body(self, request) -> dict:
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
        e = failure.value
        extra = {}
        headers = {}
        if isinstance(e, (RouteNotFound, MethodNotAllowed)):
            # Unknown routes are private too: do not tell an anonymous caller what exists.
            try:
                self._authorize(request)
            except ApiError as auth:
                e = auth
        if isinstance(e, ApiError):
            status, code, detail, headers = e.status, e.code, e.detail, e.headers
        elif isinstance(e, InvalidField):
            status, code, detail = 422, "invalid_field", str(e)
            extra["field"] = e.field
        elif isinstance(e, NotFound):
            status, code, detail = 404, "not_found", str(e)
        elif isinstance(e, Conflict):
            status, code, detail = 409, "conflict", str(e)
        elif isinstance(e, StoreUnavailable):
            status, code = 503, "store_unavailable"
            detail = str(e) or "the extension store is unavailable"
            headers = {"Retry-After": "5"}
        elif isinstance(e, RouteNotFound):
            status, code, detail = 404, "not_found", "no such route"
        elif isinstance(e, MethodNotAllowed):
            status, code = 405, "method_not_allowed"
            allowed = ", ".join(sorted(e.valid_methods or ()))
            detail = "allowed methods: {}".format(allowed)
            headers = {"Allow": allowed}
        elif isinstance(e, HTTPException):
            status, code, detail = e.code or 500, "http_error", e.description or e.name
        else:
            self.log.failure("unhandled error in {method} {path}", failure,
                             method=request.method, path=request.path)
            status, code, detail = 500, "internal_error", "internal server error"
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        return _json(request, dict({"error": code, "detail": detail}, **extra), status)

    # ------------------------------------------------------------ health, status, metrics

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        return _json(request, {"status": "ok"})

    @app.route("/api/status", methods=["GET"])
    def status(self, request):
        self._authorize(request)
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
        self._authorize(request)
        if self._registry is None:
            raise ApiError(404, "not_found", "metrics are not enabled")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)

    @app.route("/api/openapi.json", methods=["GET"])
    def openapi(self, request):
        self._authorize(request)
        return _json(request, openapi_document())

    # ------------------------------------------------------------ extensions

    @app.route("/api/extensions", methods=["GET"])
    def list_extensions(self, request):
        self._authorize(request)
        return _json(request, {"extensions": self._describe_all()})

    @app.route("/api/extensions", methods=["POST"])
    async def create_extension(self, request):
        self._authorize(request)
        ext = Extension.from_dict(self._body(request))
        svc = await self._control.add(ext)
        request.setHeader(b"Location", "/api/extensions/{}".format(ext.id).encode())
        return _json(request, svc.describe(), 201)

    @app.route("/api/extensions/<int:ext_id>", methods=["GET"])
    def get_extension(self, request, ext_id):
        self._authorize(request)
        return _json(request, self._service(ext_id).describe())

    @app.route("/api/extensions/<int:ext_id>", methods=["PUT"])
    async def put_extension(self, request, ext_id):
        self._authorize(request)
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
        self._authorize(request)
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
        self._authorize(request)
        svc = await self._control.restart(ext_id)
        return _json(request, svc.describe())

    # ------------------------------------------------------------ sessions and calls

    @app.route("/api/sessions", methods=["GET"])
    def list_sessions(self, request):
        self._authorize(request)
        return _json(request, {"sessions": list(self._sessions.describe_all())})

    @app.route("/api/sessions/<string:session_id>", methods=["GET"])
    def get_session(self, request, session_id):
        self._authorize(request)
        sid = self._session_id(session_id)
        data = self._sessions.describe(sid)
        if data is None:
            raise ApiError(404, "not_found", "no session {}".format(sid))
        return _json(request, data)

    @app.route("/api/sessions/<string:session_id>/hangup", methods=["POST"])
    def hangup_session(self, request, session_id):
        self._authorize(request)
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

    @app.route("/api/calls", methods=["GET"])
    async def list_calls(self, request):
        self._authorize(request)
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
        calls = await self._store.recent_calls(limit)
        return _json(request, {"calls": list(calls)})


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


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of every route, schema and error of L{Api}."""
    errors = {
        "400": _error_response("Bad JSON, a body that is not an object, or a bad parameter"),
        "401": _error_response("Missing or wrong bearer token"),
        "404": _error_response("Unknown extension, session or route"),
        "405": _error_response("Method not allowed on this route"),
        "409": _error_response("Extension id or port already taken"),
        "422": _error_response("Invalid field; `field` names it"),
        "503": _error_response("The extension store is unavailable; nothing changed"),
    }

    def pick(*codes):
        return {c: errors[c] for c in codes}

    ext = "#/components/schemas/Extension"
    port = {"type": "integer", "minimum": 1, "maximum": 65535}
    ext_props = {
        "id": {"type": "integer", "minimum": 1},
        "ai_extension": {"type": "string", "minLength": 1},
        "ai_port": port,
        "return_extension": {"type": "string", "minLength": 1},
        "return_port": port,
        "host": {"type": "string", "minLength": 1},
        "condominium_id": {"type": "integer", "minimum": 1},
        "max_calls": {"type": ["integer", "null"], "minimum": 1},
    }
    assert set(ext_props) == set(EXTENSION_FIELDS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "audiosocket",
            "version": "1",
            "description": "AI virtual doorman: extensions, sessions and calls.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness (never needs a token)",
                    "operationId": "healthz",
                    "security": [],
                    "responses": {
                        "200": _json_response("Alive", "#/components/schemas/Health")
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
            "/api/calls": {
                "get": {
                    "summary": "Finished calls, newest first",
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
                        }
                    ],
                    "responses": {
                        "200": _json_response("Calls", "#/components/schemas/CallList"),
                        **pick("400", "401", "503"),
                    },
                }
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
                                "not_found",
                                "method_not_allowed",
                                "conflict",
                                "invalid_field",
                                "store_unavailable",
                                "http_error",
                                "internal_error",
                            ],
                        },
                        "detail": {"type": "string"},
                        "field": {
                            "type": "string",
                            "description": "the invalid field (422 only)",
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"const": "ok"}},
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
