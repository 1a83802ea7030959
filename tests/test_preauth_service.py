"""
Tests for how L{audiosocket.service.makeService} wires pre-authorisations: from C{[access]}
and C{[condominiums.gate] codes}, and end to end on the real server over TCP with the real
redis-server: a code created through the API opens once, and Redis never holds it.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import attrs
import pytest_twisted
from twisted.internet import reactor

from audiosocket.config import GateConfig, parse_config
from audiosocket.model import InvalidField
from audiosocket.preauth import CodeGuard, Preauths
from audiosocket.service import makeService
from audiosocket.store import MemoryStore
from preauthkit import body
from test_api import Served, raw_request
from test_service import ETC, config_for, free_ports, started, stopped
from test_store import redis_command


def config(tmp_path, codes=True, **access):
    data = {
        "server": {"bind": "127.0.0.1", "state_dir": str(tmp_path / "var")},
        "access": access,
        "condominiums": [
            {
                "id": 1,
                "name": "Apoena",
                "directory": str(ETC / "apartments.json"),
                "gate": {"kind": "dtmf", "digits": "9", "codes": codes},
            }
        ],
    }
    return parse_config(data, str(tmp_path / "audiosocket.toml"))


def test_service_builds_preauths_and_guard_from_access(tmp_path):
    """makeService builds Preauths and CodeGuard from [access] and hands Preauths to the API."""
    svc = makeService(
        config(tmp_path, max_preauths=7, lockout_failures=4, lockout_window_s=60, lockout_s=120),
        store=MemoryStore(),
    )
    assert isinstance(svc.preauths, Preauths) and isinstance(svc.code_guard, CodeGuard)
    assert svc.preauths.max_per_condominium == 7
    g = svc.code_guard
    assert (g.failures, g.window_s, g.lock_s) == (4, 60, 120)
    assert svc.api._preauths is svc.preauths
    assert "codes-pool" in {s.name for s in svc}


def test_service_refuses_codes_where_the_gate_takes_none(tmp_path):
    """With [condominiums.gate] codes = false, a pre-authorisation there is refused."""
    svc = makeService(config(tmp_path, codes=False), store=MemoryStore())
    failures = []
    svc.preauths.create(body()).addErrback(failures.append)
    [failure] = failures
    assert failure.check(InvalidField) and failure.value.field == "condominium_id"


def _post(body_: dict) -> bytes:
    data = json.dumps(body_).encode()
    return raw_request(
        "POST", "/api/preauth", data, host="localhost", content_type="application/json"
    )


@pytest_twisted.ensureDeferred
async def test_code_from_the_api_opens_once_and_is_never_stored(redis_server, tmp_path):
    """
    On the real server: POST /api/preauth over TCP answers 201 with a code; the code is
    nowhere in Redis; redeemed through the server's Preauths (its own worker pool) it opens
    once, then no more; GET /api/preauth then lists nothing.
    """
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret)
    # Codes are taken where a gate acts on them.
    gated = attrs.evolve(config.condominiums[0], gate=GateConfig(kind="dtmf", digits="9"))
    svc = await started(attrs.evolve(config, condominiums=(gated,)))
    try:
        served = Served(svc.api_port)
        now = datetime.fromtimestamp(reactor.seconds(), timezone.utc)
        created = await served.send(
            _post(
                body(
                    valid_from=(now - timedelta(minutes=1)).isoformat(),
                    valid_until=(now + timedelta(days=1)).isoformat(),
                )
            )
        )
        status, headers, made = created.response()
        assert status == 201, made
        code = made["code"]
        raw = redis_command(redis_server.path, b"HGETALL", b"audiosocket:preauth:1")
        assert made["id"].encode() in raw and code.encode() not in raw
        tz = svc.config.condominium(1).timezone
        first = await svc.preauths.redeem(1, code, tz).addTimeout(10, reactor)
        second = await svc.preauths.redeem(1, code, tz).addTimeout(10, reactor)
        listed = await served.send(
            raw_request("GET", "/api/preauth?condominium_id=1", host="localhost")
        )
    finally:
        await stopped(svc)
    assert first is not None and first.id == made["id"] and first.uses == 0
    assert second is None
    assert listed.response()[2] == {"preauths": []}
