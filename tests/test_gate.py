"""
The gate openers against real peers: an http relay on 127.0.0.1 (the signature checked here,
with the secret, as a relay would), its timeout and bounded retries; the dtmf hand-off's
refusals; the audit entry of each open.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from audiosocket.config import GateConfig
from audiosocket.dialer import HandoffFailed
from audiosocket.gate import SIGNATURE_HEADER, GateError, GateOpener, OpenRequest
from tests.flowkit import ScriptedDialer
from tests.httpkit import HANG, api, refused_url, within  # noqa: F401 (fixture)

SECRET = "a relay secret"
CALL = "8a3f2d8e-56a4-4b3b-9b1e-1f0c2e3d4a5b"


def request(**values) -> OpenRequest:
    fields = dict(
        condominium_id=1,
        authorized_by="resident",
        evidence="dtmf:1",
        who="Ana Souza",
        uuid=CALL,
        extension_id=3,
        apartment="101",
        visitor="Pedro",
    )
    fields.update(values)
    return OpenRequest(**fields)


def opener(http=None, dialer=None, audit=None, secrets=None):
    return GateOpener(
        dialer=dialer or ScriptedDialer(),
        http=http,
        secret=(secrets if secrets is not None else {"GATE_SECRET": SECRET}).get,
        audit=(audit if audit is not None else []).append,
        reactor=reactor,
        retry_delay_s=0.05,
    )


def relay_gate(url, **values) -> GateConfig:
    return GateConfig(kind="http", url=url, secret_env="GATE_SECRET", **values)


def verified(seen) -> dict:
    """The body of a relay request, after checking its signature as a relay would."""
    header = seen.headers[SIGNATURE_HEADER.lower()]
    expected = "sha256=" + hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(header, expected)
    assert seen.headers["content-type"] == "application/json"
    return json.loads(seen.body)


@pytest_twisted.ensureDeferred
async def test_relay_open_is_signed_and_audited(api):
    """A 200 opens: one signed POST with the call's facts; the audit entry says opened."""
    audit = []
    api.answer(200, {"ok": True})
    result = await within(opener(api.http, audit=audit).open(relay_gate(api.url + "/open"), request()))
    assert (result.result, result.attempts, result.error) == ("opened", 1, None)
    (seen,) = api.seen
    assert seen.method == "POST" and seen.path == "/open"
    body = verified(seen)
    assert body["event"] == "open" and body["condominium_id"] == 1 and body["uuid"] == CALL
    assert body["apartment"] == "101" and body["authorized_by"] == "resident"
    assert len(body["id"]) == 32 and body["ts"] > 1.7e9
    (entry,) = audit
    assert entry["result"] == "opened" and entry["gate"] == "http" and entry["who"] == "Ana Souza"
    assert SECRET not in json.dumps(entry)


@pytest_twisted.ensureDeferred
async def test_relay_tampered_body_fails_the_check(api):
    """The signature covers the exact bytes: a changed apartment no longer verifies."""
    await within(opener(api.http).open(relay_gate(api.url), request()))
    (seen,) = api.seen
    forged = seen.body.replace(b'"101"', b'"102"')
    expected = "sha256=" + hmac.new(SECRET.encode(), forged, hashlib.sha256).hexdigest()
    assert seen.headers[SIGNATURE_HEADER.lower()] != expected


@pytest_twisted.ensureDeferred
async def test_relay_5xx_is_retried_then_failed(api):
    """503 on every try: 1 + retries requests, the same id each (a relay can dedupe)."""
    api.answer(503)
    result = await within(opener(api.http).open(relay_gate(api.url, retries=2), request()))
    assert (result.result, result.attempts) == ("failed", 3)
    assert "503" in result.error
    ids = {verified(s)["id"] for s in api.seen}
    assert len(api.seen) == 3 and len(ids) == 1


@pytest_twisted.ensureDeferred
async def test_relay_4xx_is_not_retried(api):
    """A 403 is the relay refusing: one request, failed at once."""
    api.answer(403)
    result = await within(opener(api.http).open(relay_gate(api.url, retries=2), request()))
    assert (result.result, result.attempts) == ("failed", 1)
    assert len(api.seen) == 1 and "refused" in result.error


@pytest_twisted.ensureDeferred
async def test_relay_timeout_each_try(api):
    """A relay that never answers: each try is cut at timeout_s, then retried, then failed."""
    api.reply = HANG
    gate = relay_gate(api.url, retries=1, timeout_s=0.2)
    result = await within(opener(api.http).open(gate, request()))
    assert (result.result, result.attempts) == ("failed", 2)
    assert result.error == "no answer within 0.2 s"
    assert len(api.seen) == 2


@pytest_twisted.ensureDeferred
async def test_relay_unreachable_fails(api):
    """Nothing listening: every try fails to connect; the error says so."""
    url = await refused_url()
    result = await within(opener(api.http).open(relay_gate(url, retries=1), request()))
    assert (result.result, result.attempts) == ("failed", 2)
    assert "refused" in result.error.lower()


@pytest_twisted.ensureDeferred
async def test_relay_without_its_secret_never_sends(api):
    """The secret's variable unset: nothing is sent (an unsigned open is no open)."""
    result = await within(opener(api.http, secrets={}).open(relay_gate(api.url), request()))
    assert result.result == "failed" and "GATE_SECRET" in result.error
    assert api.seen == []


@pytest_twisted.ensureDeferred
async def test_dtmf_gate_hands_off_the_digits():
    """dtmf: the dialer's hand-off open,<digits> for the call; handed_off."""
    dialer = ScriptedDialer()
    audit = []
    gate = GateConfig(kind="dtmf", digits="*71#")
    result = await opener(dialer=dialer, audit=audit).open(gate, request())
    assert result.result == "handed_off"
    assert dialer.handoffs == [(CALL, "open", "*71#")]
    assert "*71#" not in json.dumps(audit)


@pytest_twisted.ensureDeferred
async def test_dtmf_gate_refused_by_the_pbx_fails():
    """The PBX refuses the hand-off (DBPut denied): failed, with its reason."""
    dialer = ScriptedDialer()
    dialer.handoff_result = HandoffFailed("Asterisk refused DBPut: Permission denied")
    result = await opener(dialer=dialer).open(GateConfig(kind="dtmf", digits="9"), request())
    assert result.result == "failed" and "Permission denied" in result.error


@pytest_twisted.ensureDeferred
async def test_dtmf_gate_needs_a_call_and_none_has_no_gate():
    """An operator's dtmf open without a call, or any open of no gate: GateError, no audit."""
    audit = []
    gates = opener(audit=audit)
    with pytest.raises(GateError, match="uuid of a call"):
        await gates.open(GateConfig(kind="dtmf", digits="9"), request(uuid=None))
    with pytest.raises(GateError, match="no gate"):
        await gates.open(GateConfig(), request())
    assert audit == []


def test_open_request_names_who_authorized():
    """authorized_by is resident, preauth or operator."""
    with pytest.raises(ValueError):
        request(authorized_by="visitor")
