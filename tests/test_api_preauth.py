"""
Tests for C{/api/preauth} (L{audiosocket.api}) through C{StubTreq}: the code shown once, the
list never showing it, deletion, and the statuses of bad input, the limit and a store outage.
"""

from __future__ import annotations

import pytest

from audiosocket.api import openapi_document
from preauthkit import TUESDAY, body
from preauthkit import Setup as PreauthSetup
from test_api import Setup, header

TOKEN = "s3cret"


@pytest.fixture
def api():
    """The API with pre-authorisations on a memory store (C{api.pre}: their L{PreauthSetup})."""
    pre = PreauthSetup(max_per_condominium=3)
    s = Setup(token=lambda: TOKEN, preauths=pre.preauths)
    s.pre = pre
    return s


def call(s, method, path, data=None, token=TOKEN):
    return s.request(method, path, data, token=token)


def test_post_answers_201_with_the_code_once(api):
    """POST answers 201 with the item and its 6-digit code, not to be cached."""
    status, headers, data = call(api, "POST", "/api/preauth", body(uses=2, hours="08:00-17:00"))
    assert status == 201, data
    assert len(data["code"]) == 6 and data["code"].isdigit()
    assert (data["apartment"], data["uses"], data["hours"]) == ("101", 2, "08:00-17:00")
    assert header(headers, "cache-control") == "no-store"
    assert "salt" not in data and "code_hash" not in data


def test_list_never_shows_the_code(api):
    """GET lists the items of a condominium without their code, salt or hash."""
    _, _, made = call(api, "POST", "/api/preauth", body())
    api.pre.reactor.advance(1)
    call(api, "POST", "/api/preauth", body(apartment="202"))
    status, _, data = call(api, "GET", "/api/preauth?condominium_id=1")
    assert status == 200
    assert [p["apartment"] for p in data["preauths"]] == ["101", "202"]
    for p in data["preauths"]:
        assert not {"code", "salt", "code_hash", "iterations"} & set(p)
        assert made["code"] not in p.values()
    _, _, only = call(api, "GET", "/api/preauth?condominium_id=1&apartment=202")
    assert [p["apartment"] for p in only["preauths"]] == ["202"]


@pytest.mark.parametrize(
    "query", ["", "?condominium_id=", "?condominium_id=x", "?condominium_id=-1", "?apartment=101"]
)
def test_list_needs_a_condominium_400(api, query):
    """GET without a numeric condominium_id is a 400."""
    assert call(api, "GET", "/api/preauth" + query)[0] == 400


def test_post_bad_field_422(api):
    """A bad field is a 422 naming it."""
    status, _, data = call(api, "POST", "/api/preauth", body(valid_from="2026-12-01T08:00:00"))
    assert (status, data["error"], data["field"]) == (422, "invalid_field", "valid_from")


def test_post_unknown_apartment_422(api):
    """An apartment that is not in the directory is a 422 on apartment."""
    status, _, data = call(api, "POST", "/api/preauth", body(apartment="909"))
    assert (status, data["field"]) == (422, "apartment")


def test_post_bad_json_400(api):
    """A body that is not JSON is a 400, as everywhere in the API."""
    status, _, data = api.request(
        "POST", "/api/preauth", raw=b"{", token=TOKEN
    )
    assert status == 400


def test_post_over_the_limit_409(api):
    """Over [access] max_preauths for a condominium, a POST is a 409."""
    for _ in range(3):
        assert call(api, "POST", "/api/preauth", body())[0] == 201
    status, _, data = call(api, "POST", "/api/preauth", body())
    assert (status, data["error"]) == (409, "conflict")


def test_delete_204_then_404(api):
    """DELETE answers 204, then 404 for the same id; the code no longer opens."""
    _, _, made = call(api, "POST", "/api/preauth", body())
    status, _, data = call(api, "DELETE", "/api/preauth/" + made["id"])
    assert (status, data) == (204, b"")
    assert call(api, "DELETE", "/api/preauth/" + made["id"])[0] == 404
    assert call(api, "DELETE", "/api/preauth/not-an-id")[0] == 404
    api.pre.reactor.at(TUESDAY)
    results = []
    api.pre.preauths.redeem(1, made["code"], "America/Sao_Paulo").addCallback(results.append)
    assert results == [None]


@pytest.mark.parametrize(
    "method, path, data",
    [
        ("POST", "/api/preauth", body()),
        ("GET", "/api/preauth?condominium_id=1", None),
        ("DELETE", "/api/preauth/" + "a" * 32, None),
    ],
)
def test_store_down_503(api, method, path, data):
    """With the store down, every pre-authorisation route is a 503."""
    api.pre.store.available = False
    status, headers, answer = call(api, method, path, data)
    assert (status, answer["error"]) == (503, "store_unavailable")


def test_routes_need_the_token(api):
    """Without the token, each route is a 401 (and nothing is created)."""
    assert call(api, "POST", "/api/preauth", body(), token=None)[0] == 401
    assert call(api, "GET", "/api/preauth?condominium_id=1", token=None)[0] == 401
    assert call(api, "DELETE", "/api/preauth/" + "a" * 32, token=None)[0] == 401
    assert api.pre.store.hub.preauths == {}


def test_without_preauths_404():
    """An API built without pre-authorisations answers 404 on their routes."""
    s = Setup()
    assert s.request("GET", "/api/preauth?condominium_id=1")[0] == 404
    assert s.request("POST", "/api/preauth", body())[0] == 404


def test_answers_match_the_openapi_schemas(api):
    """The 201 and the list validate against the schemas the OpenAPI document gives."""
    jsonschema = pytest.importorskip("jsonschema")
    doc = openapi_document()

    def check(data, name):
        schema = {"$ref": "#/components/schemas/" + name, "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(data)

    _, _, made = call(api, "POST", "/api/preauth", body(weekdays=[1, 3], hours="22:00-06:00"))
    check(made, "PreauthCreated")
    _, _, listed = call(api, "GET", "/api/preauth?condominium_id=1")
    check(listed, "PreauthList")
    check({k: v for k, v in body(weekdays=[1]).items()}, "PreauthInput")
