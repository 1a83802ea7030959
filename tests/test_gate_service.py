"""
The gate on a real server, end to end over TCP, with an http relay on 127.0.0.1: a resident's
"1", a valid pre-authorisation code and an operator's API call each open the relay (signed),
and each is in GET /api/access; a wrong code opens nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server

from audiosocket.config import GateConfig
from audiosocket.fakepbx import Webhook
from audiosocket.signed import SIGNATURE_HEADER
from tests.httpkit import api  # noqa: F401 (fixture)
from test_service import (
    PRESSES_1,
    call,
    config_for,
    free_ports,
    started,
    stopped,
    until,
    webhook_dialer,
)
from test_service_extensions import api_url, request

SECRET = "relay secret"


def opened(seen) -> dict:
    """The relay's view of one open: the body, its signature checked as a relay would."""
    expected = "sha256=" + hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(seen.headers[SIGNATURE_HEADER.lower()], expected)
    return json.loads(seen.body)


@pytest_twisted.ensureDeferred
async def test_resident_code_and_operator_each_open_the_relay(api, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GATE_SECRET", SECRET)
    pbx = Webhook(reactor, dtmf=PRESSES_1, seconds=40, out=io.StringIO())
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(pbx))
    ai, ret = free_ports(2)
    config = config_for(
        redis_server.path, tmp_path, ai, ret, dialer=webhook_dialer(web.getHost().port)
    )
    gate = GateConfig(kind="http", url=api.url + "/open", secret_env="GATE_SECRET", retries=0)
    config = attrs.evolve(config, condominiums=(attrs.evolve(config.condominiums[0], gate=gate),))
    svc = await started(config)
    try:
        # 1. A resident's "1".
        visitor = await call(ai, 40, dtmf=[(1.0, "101#")]).addTimeout(60, reactor)
        await until(lambda: len(api.seen) == 1, 30.0, what="the resident's open")
        # 2. A wrong code, then a valid one: nobody is dialed for it.
        code, made = await request("POST", api_url(svc, "/api/preauth"), {
            "condominium_id": 1, "apartment": "102", "visitor_name": "Maria",
            "valid_from": _in(days=-1), "valid_until": _in(days=1),
        })
        assert code == 201, made
        wrong = "000000" if made["code"] != "000000" else "111111"
        dials = len(pbx.requests)
        guest = await call(
            ai, 14, dtmf=[(1.0, "*" + wrong + "#"), (6.0, "*" + made["code"] + "#")]
        ).addTimeout(60, reactor)
        await until(lambda: len(api.seen) == 2, 30.0, what="the code's open")
        assert len(pbx.requests) == dials
        await until(lambda: pbx.notices, 30.0, what="the resident told")
        # 3. The operator, by hand.
        code, body = await request(
            "POST", api_url(svc, "/api/gates/1/open"), {"reason": "entregador conhecido"}
        )
        assert (code, body["result"]) == (200, "opened"), body
        await until(lambda: len(api.seen) == 3, 30.0, what="the operator's open")
        await svc.access.when_saved()
        code, audit = await request("GET", api_url(svc, "/api/access"))
        calls = await svc.store.recent_calls(2)
    finally:
        await stopped(svc)
        await web.stopListening()
    by = [opened(s)["authorized_by"] for s in api.seen]
    assert by == ["resident", "preauth", "operator"]
    entries = audit["access"]
    assert [(e["authorized_by"], e["result"]) for e in entries] == [
        ("operator", "opened"), ("preauth", "opened"), ("resident", "opened"),
    ]
    assert entries[1]["apartment"] == "102" and entries[1]["visitor"] == "Maria"
    assert entries[2]["evidence"] == "dtmf:1" and entries[2]["uuid"] == visitor.uuid
    assert entries[0]["evidence"] == "operator:entregador conhecido"
    assert {c["uuid"]: c["outcome"] for c in calls} == {
        guest.uuid: "preauthorized", visitor.uuid: "authorized"
    }
    assert made["code"] not in json.dumps(entries) and made["code"] not in json.dumps(calls)


def _in(days: int) -> str:
    import datetime

    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)).isoformat()
