"""
Tests for L{audiosocket.api}: every route and error status through C{StubTreq} (real HTTP
requests into the Klein resource, no sockets), with the extension manager on a
MemoryReactor + Clock so "listening" is observable without opening ports.
"""

import json
import uuid

import pytest
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from treq.testing import StubTreq

from audiosocket.api import Api, openapi_document
from audiosocket.control import ExtensionControl
from audiosocket.model import Extension
from audiosocket.store import MemoryStore
from extkit import ManagerSetup, ext_fields, run

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
    def __init__(self, token=None, registry=None, condos=(1,), fallback=None):
        super().__init__(condos=condos, fallback=fallback)
        self.store = MemoryStore(reactor=self.reactor, node_id="node-a")
        self.sessions = FakeSessions()
        self.control = ExtensionControl(self.manager, self.store, reactor=self.reactor)
        self.api = Api(
            self.control,
            self.sessions,
            self.store,
            token=token,
            status=lambda: {"node": "n1"},
            metrics_registry=registry,
        )
        self.treq = StubTreq(self.api.app.resource())

    def request(self, method, path, body=None, raw=None, token=None, headers=None):
        """Send one request; return (status, headers, parsed JSON or bytes)."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = "Bearer " + token
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        d = self.treq.request(method, BASE + path, data=data, headers=hdrs)
        response = _result(self.treq, d)
        content = _result(self.treq, self.treq.content(response))
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        if ctype.startswith("application/json"):
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
        path = rule.rule.replace("<int:ext_id>", "{ext_id}").replace(
            "<string:session_id>", "{uuid}"
        )
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


def test_openapi_validates():
    """The document passes openapi-spec-validator when it is installed."""
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document())


