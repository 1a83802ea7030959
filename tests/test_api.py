"""
Tests for L{audiosocket.api}: every route and error status through C{StubTreq} (real HTTP
requests into the Klein resource, no sockets), with the extension manager on a
MemoryReactor + Clock so "listening" is observable without opening ports; and the checks
made before any route runs (Host, Origin, content type, body cap) through an L{ApiSite} on
127.0.0.1 over real TCP, with raw HTTP written by hand.
"""

import json
import re
import uuid

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.web.http_headers import Headers
from klein import Klein
from treq.testing import StubTreq

from audiosocket.api import Api, json_content_type, openapi_document
from audiosocket.control import ExtensionControl
from audiosocket.dashboard import Dashboard
from audiosocket.model import Extension, InvalidField
from audiosocket.store import MemoryStore
from extkit import ManagerSetup, ext_fields, run
from httpkit import Tracking

BASE = "http://api.test"


class FakeSessions:
    """The SessionRegistry surface the API uses."""

    def __init__(self):
        self.sessions = {}
        self.hung_up = []

    def describe_all(self):
        return list(self.sessions.values())

    def describe(self, uid):
        return self.sessions.get(uid)

    def hangup(self, uid):
        if uid not in self.sessions:
            raise KeyError(uid)
        self.hung_up.append(uid)
        return defer.Deferred()  # the goodbye is still playing


def ext_json(id=1, ai=8080, ret=8081, **kw):
    data = ext_fields(id, ai, ret)
    data.update(kw)
    return data


class Setup(ManagerSetup):
    def __init__(
        self, token=None, registry=None, condos=(1,), fallback=None, api_class=Api, **api
    ):
        super().__init__(condos=condos, fallback=fallback)
        self.store = MemoryStore(reactor=self.reactor, node_id="node-a")
        self.sessions = FakeSessions()
        self.control = ExtensionControl(self.manager, self.store, reactor=self.reactor)
        self.api = api_class(
            self.control,
            self.sessions,
            self.store,
            token=token,
            status=lambda: {"node": "n1"},
            metrics_registry=registry,
            **api,
        )
        self.treq = StubTreq(self.api.resource())

    def request(self, method, path, body=None, raw=None, token=None, headers=None):
        """Send one request; return (status, headers, parsed JSON or bytes)."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = "Bearer " + token
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        d = self.treq.request(method, BASE + path, data=data, headers=hdrs)
        response = _result(self.treq, d)
        content = _result(self.treq, self.treq.content(response))
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        if ctype.startswith("application/json") and content:  # HEAD has no body
            content = json.loads(content)
        return response.code, response.headers, content

    def add(self, **kw):
        status, _, body = self.request("POST", "/api/extensions", ext_json(**kw))
        assert status == 201, body
        return body


def _result(stub, d):
    stub.flush()
    return run(d)


def header(headers, name):
    values = headers.getRawHeaders(name)
    return values[0] if values else None


# ---------------------------------------------------------------- health, status, metrics


def test_healthz():
    """GET /healthz answers ok as JSON with the charset in the content type."""
    s = Setup()
    status, headers, body = s.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    assert header(headers, "content-type") == "application/json; charset=utf-8"


def test_status_merges_store_and_extensions():
    """GET /api/status merges status() with store availability and extension summaries."""
    s = Setup()
    s.add()
    status, _, body = s.request("GET", "/api/status")
    assert status == 200
    assert body["node"] == "n1"
    assert body["store"] == {"available": True}
    assert body["extensions"] == [
        {
            "id": 1,
            "ai_extension": "1001",
            "status": "listening",
            "bound_ai_port": 8080,
            "bound_return_port": 8081,
            "active_calls": 0,
        }
    ]


def test_fallback_port_is_reported_by_extension_and_status():
    """With port fallback, the port actually bound shows in the extension and in /api/status."""
    s = Setup(fallback=(20000, 20010))
    s.reactor.busy.add(9000)
    status, _, created = s.request("POST", "/api/extensions", ext_json(ai_port=9000, return_port=9001))
    assert status == 201
    assert created["ai_port"] == 9000 and created["bound_ai_port"] == 20000
    _, _, body = s.request("GET", "/api/status")
    assert body["extensions"][0]["bound_ai_port"] == 20000
    assert body["extensions"][0]["bound_return_port"] == 9001


def test_metrics_served_from_registry():
    """GET /metrics renders the registry in the Prometheus text format."""
    registry = CollectorRegistry()
    Counter("calls_total", "calls", registry=registry).inc(3)
    s = Setup(registry=registry)
    status, headers, body = s.request("GET", "/metrics")
    assert status == 200
    assert header(headers, "content-type").startswith("text/plain")
    assert b"calls_total 3.0" in body


def test_metrics_without_registry_404():
    """GET /metrics without a registry is a JSON 404."""
    status, _, body = Setup().request("GET", "/metrics")
    assert status == 404
    assert body["error"] == "not_found"


# ---------------------------------------------------------------- extensions


def test_post_creates_listening_extension():
    """POST answers 201 with Location only once both ports listen."""
    s = Setup()
    status, headers, body = s.request("POST", "/api/extensions", ext_json())
    assert status == 201
    assert header(headers, "location") == "/api/extensions/1"
    assert s.reactor.listening() == [8080, 8081]
    assert body["status"] == "listening"
    assert (body["bound_ai_port"], body["bound_return_port"]) == (8080, 8081)
    assert s.store.hub.extensions[1] == Extension.from_dict(ext_json())


def test_list_and_get_extensions():
    """GET lists every extension and GET /<id> describes one."""
    s = Setup()
    s.add(id=1)
    s.add(id=2, ai=9000, ret=9001)
    status, _, body = s.request("GET", "/api/extensions")
    assert status == 200
    assert [e["id"] for e in body["extensions"]] == [1, 2]
    status, _, body = s.request("GET", "/api/extensions/2")
    assert (status, body["ai_port"], body["active_calls"]) == (200, 9000, 0)


def test_get_unknown_extension_404():
    """GET of an unknown id is a JSON 404 naming it."""
    status, headers, body = Setup().request("GET", "/api/extensions/7")
    assert status == 404
    assert body == {"error": "not_found", "detail": "no extension with id 7"}
    assert header(headers, "content-type") == "application/json; charset=utf-8"


def test_unknown_route_404():
    """An unknown route is a JSON 404."""
    status, _, body = Setup().request("GET", "/api/nothing")
    assert (status, body["error"]) == (404, "not_found")


def test_wrong_method_405():
    """A known route with the wrong method is a JSON 405 with Allow."""
    status, headers, body = Setup().request("PATCH", "/api/extensions/1")
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert "PUT" in header(headers, "allow")


def test_post_bad_json_400():
    """A body that is not JSON is a 400 bad_json."""
    status, _, body = Setup().request("POST", "/api/extensions", raw=b"{nope")
    assert (status, body["error"]) == (400, "bad_json")


def test_post_not_an_object_400():
    """A JSON body that is not an object is a 400 not_an_object."""
    status, _, body = Setup().request("POST", "/api/extensions", [1, 2])
    assert (status, body["error"]) == (400, "not_an_object")
    assert "list" in body["detail"]


def test_post_duplicate_id_409():
    """POSTing an id that exists is a 409 and nothing new listens."""
    s = Setup()
    s.add()
    status, _, body = s.request("POST", "/api/extensions", ext_json(ai=9000, ret=9001))
    assert (status, body["error"]) == (409, "conflict")
    assert "id 1" in body["detail"]
    assert s.reactor.listening() == [8080, 8081]


def test_post_port_taken_by_extension_409():
    """A port used by another extension is a 409 naming the port."""
    s = Setup()
    s.add()
    status, _, body = s.request("POST", "/api/extensions", ext_json(id=2, ret=9001))
    assert (status, body["error"]) == (409, "conflict")
    assert "8080" in body["detail"]
    assert 2 not in s.store.hub.extensions


def test_post_port_busy_on_host_409():
    """A port busy on the host (PortBusy) is a 409 and nothing is stored."""
    s = Setup()
    s.reactor.busy.add(8081)
    status, _, body = s.request("POST", "/api/extensions", ext_json())
    assert (status, body["error"]) == (409, "conflict")
    assert "8081" in body["detail"]
    assert s.store.hub.extensions == {}
    assert s.manager.extensions == {}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"ai_port": "8080"}, "ai_port"),
        ({"ai_port": 70000}, "ai_port"),
        ({"return_port": 8080}, "return_port"),
        ({"host": ""}, "host"),
        ({"host": "10.0.0.2:8081,AUDIOSOCKET_UUID=x"}, "host"),
        ({"host": "10.0.0.2:8081"}, "host"),
        ({"host": "pbx.local x"}, "host"),
        ({"host": "pbx\nlocal"}, "host"),
        ({"host": "[::1]"}, "host"),
        ({"ai_extension": "1001,X=1"}, "ai_extension"),
        ({"ai_extension": "1" * 33}, "ai_extension"),
        ({"return_extension": "20 01"}, "return_extension"),
        ({"return_extension": "2001\r\nAction: Logoff"}, "return_extension"),
        ({"colour": "blue"}, "colour"),
        ({"condominium_id": 99}, "condominium_id"),
        ({"max_calls": 0}, "max_calls"),
    ],
)
def test_post_invalid_field_422(change, field):
    """Each kind of invalid field is a 422 whose detail and field name it."""
    s = Setup()
    status, _, body = s.request("POST", "/api/extensions", ext_json(**change))
    assert (status, body["error"], body["field"]) == (422, "invalid_field", field)
    assert body["detail"].startswith(field)
    assert s.reactor.listening() == []


def test_model_refuses_bad_values_however_built():
    """An Extension built directly (not from a dict) runs the same checks on host and numbers."""
    with pytest.raises(InvalidField) as e:
        Extension(**dict(ext_json(), host="10.0.0.2,X=1"))
    assert e.value.field == "host"
    with pytest.raises(InvalidField) as e:
        Extension(**dict(ext_json(), ai_extension="1001 "))
    assert e.value.field == "ai_extension"


@pytest.mark.parametrize("host", ["10.0.0.2", "2001:db8::5", "pbx-1.condominio.example", "asterisk"])
def test_post_accepts_addresses_and_host_names(host):
    """An IPv4 or IPv6 address or a DNS host name is a valid host."""
    s = Setup()
    status, _, body = s.request("POST", "/api/extensions", ext_json(host=host))
    assert (status, body["host"]) == (201, host)


def test_post_extension_numbers_may_use_dial_characters():
    """Extension numbers may hold letters and * # + - (1 to 32 of them)."""
    s = Setup()
    data = ext_json(ai_extension="*99#", return_extension="+55-11-" + "9" * 25)
    assert s.request("POST", "/api/extensions", data)[0] == 201


def test_post_text_plain_415():
    """A JSON body sent as text/plain is a 415 and creates nothing."""
    s = Setup()
    status, _, body = s.request(
        "POST", "/api/extensions", ext_json(), headers={"Content-Type": "text/plain"}
    )
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert s.manager.extensions == {} and s.store.hub.extensions == {}


@pytest.mark.parametrize(
    "value, ok",
    [
        ("application/json", True),
        ("Application/JSON; charset=UTF-8", True),
        ('application/json; charset="utf-8"', True),
        ("application/json; charset=latin-1", False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonp", False),
        (None, False),
    ],
)
def test_json_content_type(value, ok):
    """Only application/json (with a UTF-8 charset if any) is a JSON content type."""
    assert json_content_type(value) is ok


def test_post_missing_field_422():
    """A missing required field is a 422 naming it."""
    data = ext_json()
    del data["host"]
    status, _, body = Setup().request("POST", "/api/extensions", data)
    assert (status, body["field"]) == (422, "host")


def test_put_changes_ports():
    """PUT without an id in the body rebinds the extension to its new ports."""
    s = Setup()
    s.add()
    data = ext_json(ai=9000, ret=9001)
    del data["id"]
    status, _, body = s.request("PUT", "/api/extensions/1", data)
    assert status == 200
    assert (body["bound_ai_port"], body["bound_return_port"]) == (9000, 9001)
    assert s.store.hub.extensions[1].ai_port == 9000


def test_put_id_mismatch_422():
    """PUT with a body id other than the path's is a 422 on id; nothing changes."""
    s = Setup()
    s.add()
    status, _, body = s.request("PUT", "/api/extensions/1", ext_json(id=2))
    assert (status, body["field"]) == (422, "id")
    assert s.manager.get(1).extension.id == 1


def test_put_unknown_404():
    """PUT of an unknown id is a 404."""
    status, _, body = Setup().request("PUT", "/api/extensions/5", ext_json(id=5))
    assert status == 404


def test_delete_removes_and_closes_ports():
    """DELETE removes the extension from the manager and the store."""
    s = Setup()
    s.add()
    status, _, body = s.request("DELETE", "/api/extensions/1?force=true")
    assert (status, body["status"]) == (200, "stopped")
    assert s.manager.extensions == {}
    assert s.store.hub.extensions == {}
    assert s.request("GET", "/api/extensions/1")[0] == 404


def test_delete_bad_force_400():
    """DELETE with a force that is not a boolean is a 400 naming force."""
    s = Setup()
    s.add()
    status, _, body = s.request("DELETE", "/api/extensions/1?force=maybe")
    assert status == 400
    assert "force" in body["detail"]
    assert 1 in s.manager.extensions


def test_restart():
    """POST /restart reopens the ports and describes the extension."""
    s = Setup()
    s.add()
    status, _, body = s.request("POST", "/api/extensions/1/restart")
    assert (status, body["status"]) == (200, "listening")


def test_restart_unknown_404():
    """Restarting an unknown id is a 404."""
    assert Setup().request("POST", "/api/extensions/3/restart")[0] == 404


# ---------------------------------------------------------------- store unavailable


def test_store_unavailable_post_503_nothing_listens():
    """With the store down, POST is a 503 and no port is opened."""
    s = Setup()
    s.store.available = False
    status, headers, body = s.request("POST", "/api/extensions", ext_json())
    assert (status, body["error"]) == (503, "store_unavailable")
    assert s.reactor.listening() == []
    assert s.manager.extensions == {}


def test_store_unavailable_gets_answer_from_memory():
    """With the store down, extension GETs and status still answer from memory."""
    s = Setup()
    s.add()
    s.store.available = False
    assert s.request("GET", "/api/extensions")[2]["extensions"][0]["id"] == 1
    assert s.request("GET", "/api/extensions/1")[0] == 200
    status, _, body = s.request("GET", "/api/status")
    assert (status, body["store"]) == (200, {"available": False})


def test_store_unavailable_delete_503_keeps_extension():
    """With the store down, DELETE is a 503 and the extension keeps listening."""
    s = Setup()
    s.add()
    s.store.available = False
    status, _, body = s.request("DELETE", "/api/extensions/1")
    assert status == 503
    assert s.manager.get(1).status == "listening"


def test_store_unavailable_calls_503():
    """With the store down, GET /api/calls is a 503."""
    s = Setup()
    s.store.available = False
    assert s.request("GET", "/api/calls")[0] == 503


# ---------------------------------------------------------------- sessions and calls


def test_sessions_list_and_get():
    """Sessions are listed and described by UUID."""
    s = Setup()
    uid = str(uuid.uuid4())
    s.sessions.sessions[uid] = {"uuid": uid, "state": "collecting"}
    assert s.request("GET", "/api/sessions")[2] == {"sessions": [s.sessions.sessions[uid]]}
    status, _, body = s.request("GET", "/api/sessions/" + uid.upper())
    assert (status, body["state"]) == (200, "collecting")


def test_session_unknown_404():
    """An unknown session UUID is a 404."""
    status, _, body = Setup().request("GET", "/api/sessions/" + str(uuid.uuid4()))
    assert (status, body["error"]) == (404, "not_found")


def test_session_malformed_uuid_400():
    """A malformed session UUID is a 400."""
    assert Setup().request("GET", "/api/sessions/not-a-uuid")[0] == 400


def test_session_hangup_accepted():
    """POST /hangup starts the hangup and answers 202 without waiting for the goodbye."""
    s = Setup()
    uid = str(uuid.uuid4())
    s.sessions.sessions[uid] = {"uuid": uid}
    status, _, body = s.request("POST", "/api/sessions/{}/hangup".format(uid))
    assert (status, body) == (202, {"uuid": uid, "status": "hanging_up"})
    assert s.sessions.hung_up == [uid]


def test_session_hangup_unknown_404():
    """Hanging up an unknown session is a 404."""
    path = "/api/sessions/{}/hangup".format(uuid.uuid4())
    assert Setup().request("POST", path)[0] == 404


def test_calls_limit():
    """GET /api/calls returns at most limit calls, 50 by default."""
    s = Setup()
    s.store.hub.calls = [{"uuid": str(i)} for i in range(60)]
    assert len(s.request("GET", "/api/calls")[2]["calls"]) == 50
    assert len(s.request("GET", "/api/calls?limit=3")[2]["calls"]) == 3


@pytest.mark.parametrize("limit", ["0", "1001", "ten"])
def test_calls_bad_limit_400(limit):
    """A limit outside 1..1000 or not a number is a 400 naming limit."""
    status, _, body = Setup().request("GET", "/api/calls?limit=" + limit)
    assert status == 400
    assert "limit" in body["detail"]


# ---------------------------------------------------------------- auth


def test_auth_missing_token_401():
    """Without a token, a request is a 401 with a Bearer challenge."""
    s = Setup(token=lambda: "s3cret")
    status, headers, body = s.request("GET", "/api/extensions")
    assert (status, body["error"]) == (401, "unauthorized")
    assert header(headers, "www-authenticate").startswith("Bearer")


def test_auth_wrong_token_401():
    """A wrong token is a 401 with error=invalid_token."""
    s = Setup(token=lambda: "s3cret")
    status, headers, _ = s.request("GET", "/api/extensions", token="guess")
    assert status == 401
    assert 'error="invalid_token"' in header(headers, "www-authenticate")


def test_auth_right_token():
    """The right token is let through."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/api/extensions", token="s3cret")[0] == 200


def test_auth_token_unset_refuses_everything():
    """When the token source returns None, even a guessed empty token is refused."""
    s = Setup(token=lambda: None)
    assert s.request("GET", "/api/status", token="")[0] == 401
    assert s.request("GET", "/api/status", token="None")[0] == 401


def test_auth_healthz_open():
    """GET /healthz needs no token."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/healthz")[0] == 200


def test_auth_unknown_route_401():
    """An anonymous caller gets 401, not 404, for an unknown route."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/api/nothing")[0] == 401


def test_auth_post_refused_before_body():
    """A POST without a token is a 401 and opens nothing, even with a valid body."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("POST", "/api/extensions", ext_json())[0] == 401
    assert s.reactor.listening() == []


#: A concrete value for each converter a route may use.
_SAMPLE_ARGUMENTS = {"IntegerConverter": "1", "UnicodeConverter": str(uuid.UUID(int=1))}


def every_request(app):
    """
    (method, concrete path) for every method of every rule of C{app}'s URL map, each
    argument filled with a sample value of its converter's type.
    """
    for rule in app.url_map.iter_rules():
        path = rule.rule
        for name, converter in rule._converters.items():
            sample = _SAMPLE_ARGUMENTS[type(converter).__name__]
            path = re.sub(r"<(?:[a-z]+:)?{}>".format(name), sample, path)
        assert "<" not in path, rule.rule
        for method in sorted(rule.methods):
            yield method, path


def every_route(api_class):
    """Every request to the API's routes and to the dashboard's, which it serves too."""
    yield from every_request(api_class.app)
    yield from every_request(Dashboard.app)


#: What answers without a token: liveness and the dashboard's login page.
OPEN = [("GET", "/healthz"), ("GET", "/login"), ("HEAD", "/healthz"), ("HEAD", "/login")]


def unprotected(api_class):
    """
    Every request to a route of C{api_class} (and of the dashboard) answered without a 401
    when a token is configured and none is sent, each with a JSON body where it takes one.
    """
    s = Setup(token=lambda: "s3cret", api_class=api_class)
    answered = []
    for method, path in every_route(api_class):
        body = ext_json() if method in ("POST", "PUT") else None
        status = s.request(method, path, body)[0]
        if status != 401:
            answered.append((method, path, status))
    return answered


def test_auth_every_route_needs_the_token():
    """
    Walking every rule of the URL maps (the API's and the dashboard's), every method of
    every route is a 401 without the token, except GET and HEAD /healthz and the login page.
    """
    open_ = [(m, p) for m, p, status in unprotected(Api)]
    assert sorted(open_) == OPEN
    assert len(list(every_request(Api.app))) > 15  # the walk did reach the routes
    assert len(list(every_request(Dashboard.app))) > 15


def test_auth_walk_catches_an_open_route():
    """
    The walk above finds a route left open: here an API that lets /api/status through
    without the token.
    """

    class Leaky(Api):
        open_routes = Api.open_routes | {(b"GET", b"/api/status")}

    open_ = [(m, p) for m, p, status in unprotected(Leaky)]
    assert ("GET", "/api/status") in open_


def test_auth_route_added_later_needs_the_token():
    """
    A route of a subclass's app, added after the API was built, needs the token like the
    others: protection does not depend on how a route is written.
    """

    class Extended(Api):
        app = Klein()

    s = Setup(token=lambda: "s3cret", api_class=Extended)
    Extended.app.route("/api/late", methods=["GET"])(lambda self, request: b"late")
    assert s.request("GET", "/api/late")[0] == 401
    assert s.request("GET", "/api/late", token="s3cret")[2] == b"late"


def test_open_routes_exist():
    """
    Every open (method, path) is served (200 without a token), so the list stays tiny: the
    health check, the login page and the two static files the login page needs.
    """
    s = Setup(token=lambda: "s3cret")
    for method, path in Api.open_routes:
        assert s.request(method.decode(), path.decode())[0] == 200, (method, path)
    assert {p for _, p in Api.open_routes} == {
        b"/healthz", b"/login", b"/static/style.css", b"/static/login.js"
    }
    assert {m for m, _ in Api.open_routes} == {b"GET", b"HEAD"}


def test_static_files_need_the_token():
    """The dashboard's other static files (its scripts) are behind the token."""
    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/static/app.js")[0] == 401
    assert s.request("GET", "/static/htmx.min.js")[0] == 401
    assert s.request("GET", "/static/app.js", token="s3cret")[0] == 200


@pytest_twisted.ensureDeferred
async def test_tcp_every_route_needs_the_token():
    """
    Over real TCP, through the L{ApiSite}: every method of every route answers 401 to an
    anonymous request (with a JSON body where it takes one), but GET and HEAD /healthz and
    the dashboard's login page.
    """
    setup = Setup(token=lambda: "s3cret")
    factory = Tracking(setup.api.site())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    answers = {}
    try:
        for method, path in every_route(Api):
            body = json.dumps(ext_json()).encode() if method in ("POST", "PUT") else b""
            extra = {"content_type": "application/json"} if body else {}
            client = await Served(port, setup).send(
                raw_request(method, path, body, host="localhost", **extra)
            )
            answers[method, path] = int(client.received.split(b" ", 2)[1])
    finally:
        await factory.all_closed().addTimeout(5, reactor)
        await port.stopListening()
    open_ = {key: status for key, status in answers.items() if status != 401}
    assert open_ == {key: 200 for key in OPEN}
    assert created_nothing(setup)


# ---------------------------------------------------------------- checks on the head


def head(**headers):
    """Request headers as the channel holds them (names with underscores as dashes)."""
    return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8082", "LOCALHOST", "127.0.0.1", "127.0.0.1:8082", "[::1]", "[::1]:8082"],
)
def test_admit_loopback_hosts(host):
    """The loopback names are allowed by default, with or without a port."""
    assert Setup().api.admit(b"GET", head(host=host), 0) is None


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8082", "127.0.0.1.nip.io", "localhost.evil.example", "10.0.0.5", "127.0.0.1:x"],
)
def test_admit_foreign_host_421(host):
    """A Host that is not an allowed name (DNS rebinding) is a 421, whatever the method."""
    error = Setup().api.admit(b"GET", head(host=host), 0)
    assert (error.status, error.code) == (421, "host_not_allowed")


def test_admit_missing_or_repeated_host_421():
    """No Host, or two of them, is a 421."""
    api = Setup().api
    assert api.admit(b"GET", Headers(), 0).status == 421
    two = Headers({b"host": [b"localhost", b"evil.example"]})
    assert api.admit(b"GET", two, 0).status == 421


def test_admit_configured_host():
    """A name given in allowed_hosts is accepted in Host and Origin."""
    api = Setup(allowed_hosts={"doorman.example", "localhost"}).api
    headers = head(host="doorman.example:8443", origin="https://doorman.example:8443")
    assert api.admit(b"DELETE", headers, 0) is None


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example", "file://", "chrome-extension://abc"]
)
def test_admit_foreign_origin_on_change_403(origin):
    """A state-changing request from a page of another site is a 403."""
    error = Setup().api.admit(b"POST", head(host="127.0.0.1:8082", origin=origin), 0)
    assert (error.status, error.code) == (403, "cross_site")


def test_admit_foreign_origin_on_read_allowed():
    """A GET carrying a foreign Origin goes on: it changes nothing and CORS hides the answer."""
    assert Setup().api.admit(b"GET", head(host="localhost", origin="http://evil.example"), 0) is None


def test_admit_own_origin_on_change_allowed():
    """An Origin naming an allowed host (any port) may change things."""
    headers = head(host="127.0.0.1:8082", origin="http://127.0.0.1:8082")
    assert Setup().api.admit(b"PUT", headers, 0) is None


@pytest.mark.parametrize("site, refused", [("cross-site", True), ("same-site", True), ("same-origin", False), ("none", False)])
def test_admit_sec_fetch_site(site, refused):
    """Sec-Fetch-Site cross-site or same-site refuses a change; same-origin and none do not."""
    error = Setup().api.admit(b"POST", head(host="localhost", sec_fetch_site=site), 0)
    assert (error is not None and error.status == 403) is refused


def test_admit_body_over_cap_413():
    """A Content-Length over the cap is a 413; at the cap it goes on."""
    api = Setup(max_body=1000).api
    json_head = head(host="localhost", content_type="application/json")
    assert api.admit(b"POST", json_head, 1001).status == 413
    assert api.admit(b"POST", json_head, 1000) is None


def test_admit_body_not_json_415():
    """Any request with a body (sized or chunked) must be application/json."""
    api = Setup().api
    for length in (10, None):
        error = api.admit(b"POST", head(host="localhost", content_type="text/plain"), length)
        assert (error.status, error.code) == (415, "unsupported_media_type")


def test_admit_body_needs_token_first():
    """With a token configured, a request with a body is refused (401) before the body."""
    api = Setup(token=lambda: "s3cret").api
    json_head = head(host="localhost", content_type="application/json")
    assert api.admit(b"POST", json_head, 10).status == 401
    json_head.setRawHeaders(b"authorization", [b"Bearer s3cret"])
    assert api.admit(b"POST", json_head, 10) is None


# ---------------------------------------------------------------- over real TCP


class RawClient(protocol.Protocol):
    """Writes bytes as given, keeps everything the server sends, notes who closed first."""

    def __init__(self, data: bytes):
        self.data = data
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)

    def response(self):
        """(status, headers dict with lower-case names, JSON body) of the first response."""
        head, _, body = self.received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )
        if headers.get("transfer-encoding") == "chunked":
            size, _, rest = body.partition(b"\r\n")
            body = rest[: int(size, 16)]
        return int(lines[0].split()[1]), headers, json.loads(body)


class Served:
    """An API listening on C{port} (127.0.0.1), and the L{Setup} behind it if any."""

    def __init__(self, port, setup=None):
        self.setup = setup
        self.number = port.getHost().port

    async def send(self, data: bytes) -> RawClient:
        """Connect, write C{data}, and wait (bounded) until the server closes."""
        client = RawClient(data)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.number), client)
        await client.closed.addTimeout(5, reactor)
        return client


def raw_request(method, path, body=b"", **headers) -> bytes:
    """An HTTP/1.1 request with Connection: close; headers named with underscores as dashes."""
    lines = ["{} {} HTTP/1.1".format(method, path)]
    headers.setdefault("connection", "close")
    if body and "transfer_encoding" not in headers:
        headers.setdefault("content_length", str(len(body)))
    lines += ["{}: {}".format(k.replace("_", "-"), v) for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest_twisted.async_yield_fixture
async def served():
    setup = Setup()
    factory = Tracking(setup.api.site())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        yield Served(port, setup)
    finally:
        await factory.all_closed().addTimeout(5, reactor)
        await port.stopListening()


def created_nothing(setup) -> bool:
    return setup.manager.extensions == {} and setup.store.hub.extensions == {}


@pytest_twisted.ensureDeferred
async def test_tcp_json_post_from_own_host_creates(served):
    """The control case: a JSON POST to 127.0.0.1 with its own Origin creates the extension."""
    here = "127.0.0.1:{}".format(served.number)
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(ext_json()).encode(),
            host=here, origin="http://" + here, content_type="application/json",
        )
    )
    status, _, body = client.response()
    assert (status, body["id"]) == (201, 1)
    assert 1 in served.setup.store.hub.extensions


@pytest_twisted.ensureDeferred
async def test_tcp_cross_site_text_plain_post_refused(served):
    """
    The CSRF a web page can send without a preflight (a text/plain POST, its Origin foreign)
    to the loopback API without a token is a 403 and creates no extension.
    """
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(ext_json()).encode(),
            host="127.0.0.1:{}".format(served.number),
            origin="http://evil.example", content_type="text/plain",
        )
    )
    status, headers, body = client.response()
    assert (status, body["error"]) == (403, "cross_site")
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert created_nothing(served.setup)
    assert served.setup.api.refused["api_cross_site"] == 1


@pytest_twisted.ensureDeferred
async def test_tcp_dns_rebinding_host_refused(served):
    """
    A page whose name its attacker pointed at 127.0.0.1 sends its own name as Host (and
    Origin): a 421 before any route runs, and no extension is created.
    """
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(ext_json()).encode(),
            host="evil.example:{}".format(served.number),
            origin="http://evil.example:{}".format(served.number), content_type="text/plain",
        )
    )
    status, _, body = client.response()
    assert (status, body["error"]) == (421, "host_not_allowed")
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_text_plain_body_415(served):
    """A body that is not application/json is a 415, even from a client that is no browser."""
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(ext_json()).encode(),
            host="localhost", content_type="text/plain",
        )
    )
    status, _, body = client.response()
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_huge_content_length_413_without_reading_body(served):
    """
    A 50 MiB Content-Length, unauthenticated, is answered 413 and the connection closed by
    the server while the client has sent only the head: the body is never waited for.
    """
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", host="localhost", content_type="application/json",
            content_length=str(50 * 1024 * 1024), expect="100-continue",
        )
    )
    status, headers, body = client.response()
    assert (status, body["error"]) == (413, "body_too_large")
    assert headers["connection"] == "close"
    assert b"100 Continue" not in client.received
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_chunked_body_over_cap_aborted(served):
    """A chunked body is cut off with a 413 as soon as it passes the cap (64 KiB)."""
    chunk = b"[" + b" " * (64 * 1024) + b"]"
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", host="localhost", content_type="application/json",
            transfer_encoding="chunked",
        )
        + b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    )
    status, _, body = client.response()
    assert (status, body["error"]) == (413, "body_too_large")
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_chunked_body_under_cap_served(served):
    """A chunked JSON body under the cap is read and served as usual."""
    data = json.dumps(ext_json()).encode()
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", host="localhost", content_type="application/json",
            transfer_encoding="chunked",
        )
        + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
    )
    assert client.response()[0] == 201


@pytest_twisted.ensureDeferred
async def test_tcp_ami_injection_in_host_422(served):
    """
    A host carrying an AMI channel variable after a comma is a 422 naming host; nothing
    reaches the store or the manager.
    """
    payload = ext_json(host="10.0.0.2:8081,AUDIOSOCKET_UUID=00000000-0000-0000-0000-000000000000")
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(payload).encode(),
            host="localhost", content_type="application/json",
        )
    )
    status, _, body = client.response()
    assert (status, body["error"], body["field"]) == (422, "invalid_field", "host")
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_bad_extension_number_422(served):
    """An extension number with a comma is a 422 naming it; nothing is created."""
    payload = ext_json(return_extension="2001,CALLERID(num)=0")
    client = await served.send(
        raw_request(
            "POST", "/api/extensions", json.dumps(payload).encode(),
            host="localhost", content_type="application/json",
        )
    )
    status, _, body = client.response()
    assert (status, body["field"]) == (422, "return_extension")
    assert created_nothing(served.setup)


@pytest_twisted.ensureDeferred
async def test_tcp_token_checked_before_body():
    """
    With a token configured, a POST announcing a body but carrying no token is a 401 sent
    while only its head has arrived.
    """
    setup = Setup(token=lambda: "s3cret")
    factory = Tracking(setup.api.site())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    try:
        client = await Served(port, setup).send(
            raw_request(
                "POST", "/api/extensions", host="localhost", content_type="application/json",
                content_length="1000",
            )
        )
    finally:
        await factory.all_closed().addTimeout(5, reactor)
        await port.stopListening()
    status, headers, body = client.response()
    assert (status, body["error"]) == (401, "unauthorized")
    assert headers["www-authenticate"].startswith("Bearer")


@pytest_twisted.ensureDeferred
async def test_service_serves_api_behind_its_checks(redis_server, tmp_path):
    """
    The real service (makeService) serves its API through the checks, with the configured
    names and cap: a foreign Host and an oversize body are refused and counted with the
    listeners' refusals, a configured name is served.
    """
    from test_service import config_for, free_ports, started, stopped

    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path, tmp_path, ai, ret,
        api={"allowed_hosts": ["doorman.example"], "max_body_kb": 1},
    )
    svc = await started(config)
    try:
        number = svc.api_port.getHost().port
        served = Served(svc.api_port)
        foreign = await served.send(raw_request("GET", "/api/extensions", host="localhost"))
        named = await served.send(raw_request("GET", "/api/extensions", host="doorman.example"))
        interface = await served.send(
            raw_request("GET", "/healthz", host="127.0.0.1:{}".format(number))
        )
        big = await served.send(
            raw_request(
                "PUT", "/api/extensions/1", host="doorman.example",
                content_type="application/json", content_length="1025",
            )
        )
    finally:
        await stopped(svc)
    assert foreign.response()[0] == 421  # allowed_hosts replaced the loopback names
    assert named.response()[0] == 200
    assert interface.response()[0] == 200  # the endpoint's interface is always allowed
    assert big.response()[0] == 413
    assert svc.manager.refused["api_host_not_allowed"] == 1
    assert svc.manager.refused["api_body_too_large"] == 1


# ---------------------------------------------------------------- OpenAPI


def test_openapi_served():
    """GET /api/openapi.json serves an OpenAPI 3.1 document."""
    status, _, body = Setup().request("GET", "/api/openapi.json")
    assert (status, body["openapi"]) == (200, "3.1.0")


def test_openapi_describes_every_route():
    """Every Klein route appears in the document with the same methods."""
    doc = openapi_document()
    routes = {}
    for rule in Api.app.url_map.iter_rules():
        path = re.sub(
            r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule.replace("<string:session_id>", "{uuid}")
        )
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", path)  # any other: its own name
        routes.setdefault(path, set()).update(
            m.lower() for m in rule.methods if m not in ("HEAD", "OPTIONS")
        )
    documented = {
        path: {m for m in item if m != "parameters"} for path, item in doc["paths"].items()
    }
    assert documented == routes


def test_openapi_refs_resolve():
    """Every $ref points at a defined schema and every operation documents its errors."""
    doc = openapi_document()
    text = json.dumps(doc)
    schemas = doc["components"]["schemas"]
    import re

    for ref in re.findall(r'"\$ref": "#/components/schemas/([A-Za-z]+)"', text):
        assert ref in schemas
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (path, method)
            if path != "/healthz":
                assert "401" in op["responses"], (path, method)


def test_openapi_documents_refusals():
    """The refusals made before any route runs are documented where they can happen."""
    doc = openapi_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert "421" in op["responses"], (path, method)
            assert ("403" in op["responses"]) is (method in ("post", "put", "delete"))
            if "requestBody" in op:
                assert {"413", "415"} <= set(op["responses"]), (path, method)
    codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert {"host_not_allowed", "cross_site", "body_too_large", "unsupported_media_type"} <= set(codes)


def test_openapi_validates():
    """The document passes openapi-spec-validator when it is installed."""
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document())




def _stored_calls(s):
    """Four records stored at known times (the store's clock) on the memory store."""
    from twisted.internet.task import Clock

    clock = Clock()
    s.store._reactor = clock
    day = 1796428800.0  # 2026-12-05T00:00:00Z
    rows = [
        ("a", "authorized", 1, "101", "Pedro", day - 60),
        ("b", "denied", 1, "202", "=HYPERLINK(\"http://x\")", day + 60),
        ("c", "authorized", 2, "101", "Ana", day + 120),
        ("d", "preauthorized", 1, "101", None, day + 180),
    ]
    for uid, outcome, cid, apartment, visitor, at in rows:
        clock.advance(at - clock.seconds())
        run(s.store.append_call({
            "uuid": uid, "outcome": outcome, "condominium_id": cid,
            "facts": {"apartment": apartment, "visitor_name": visitor, "resident": "Ana Souza"},
            "gate": {"result": "opened"} if outcome != "denied" else None,
        }))


def test_calls_filters():
    """Outcome, condominium, apartment and the time range filter the history, newest first."""
    s = Setup()
    _stored_calls(s)

    def uuids(query):
        status, _, body = s.request("GET", "/api/calls" + query)
        assert status == 200, body
        return [c["uuid"] for c in body["calls"]]

    assert uuids("") == ["d", "c", "b", "a"]
    assert uuids("?outcome=authorized") == ["c", "a"]
    assert uuids("?condominium_id=1&apartment=101") == ["d", "a"]
    assert uuids("?since=2026-12-05T00:00:00Z") == ["d", "c", "b"]
    assert uuids("?since=2026-12-04T21:00:00-03:00&until=2026-12-05T00:02:00Z") == ["c", "b"]
    assert uuids("?outcome=authorized&limit=1") == ["c"]


def test_calls_filter_errors():
    """An unknown parameter is a 400; a bad outcome, time, condominium or format a 422."""
    s = Setup()
    assert s.request("GET", "/api/calls?outcom=authorized")[0] == 400
    for query, field in [
        ("?outcome=opened", "outcome"),
        ("?since=yesterday", "since"),
        ("?since=2026-12-05T10:00:00Z&until=2026-12-05T09:00:00Z", "until"),
        ("?condominium_id=x", "condominium_id"),
        ("?format=xml", "format"),
    ]:
        status, _, body = s.request("GET", "/api/calls" + query)
        assert (status, body.get("field")) == (422, field), query


def test_calls_csv_export():
    """format=csv: a header and one row per call, formulas kept as text, an attachment."""
    import csv as csvmod
    import io as iomod

    s = Setup()
    _stored_calls(s)
    status, headers, body = s.request("GET", "/api/calls?format=csv&condominium_id=1")
    assert status == 200
    assert header(headers, "content-type") == "text/csv; charset=utf-8"
    assert "attachment" in header(headers, "content-disposition")
    rows = list(csvmod.DictReader(iomod.StringIO(body.decode("utf-8"))))
    assert [r["uuid"] for r in rows] == ["d", "b", "a"]
    assert rows[2]["visitor_name"] == "Pedro" and rows[0]["visitor_name"] == ""
    assert rows[1]["visitor_name"] == "'=HYPERLINK(\"http://x\")"
    assert rows[0]["gate_result"] == "opened" and rows[1]["gate_result"] == ""
    assert rows[2]["resident"] == "Ana Souza"
