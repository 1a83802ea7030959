"""
C{POST /api/gates/{condominium_id}/open}: an operator opens a gate by hand, with a reason
that goes to the audit; an http relay opens at once, a dtmf gate opens on a call in progress
(which then ends, authorized by the operator); refusals are JSON errors with their status.
"""

from __future__ import annotations

import json

import attrs
from treq.testing import StubTreq

from audiosocket.config import GateConfig
from audiosocket.gate import GateOpener, OperatorDesk
from audiosocket.signed import sign
from extkit import run
from test_api import BASE, Setup, _result
from tests.flowkit import Bench, start_call
from tests.test_flow_gate import SECRET, Relay

HTTP_GATE = GateConfig(kind="http", url="http://relay.test/open", secret_env="GATE", retries=1)
DTMF_GATE = GateConfig(kind="dtmf", digits="#9")


def desk_setup(gates: dict, *, relay=None, bench=None):
    """An API whose desk opens C{gates} (condominium id → GateConfig)."""
    bench = bench or Bench()
    audit: list[dict] = []
    opener = GateOpener(
        dialer=bench.dialer,
        http=StubTreq(relay or Relay()),
        secret={"GATE": SECRET}.get,
        audit=audit.append,
        reactor=bench.reactor,
    )
    sites = {cid: attrs.evolve(bench.site, id=cid, gate=gate) for cid, gate in gates.items()}
    bench.site = sites.get(1, bench.site)

    def site(cid):
        return sites[cid]

    setup = Setup(gates=OperatorDesk(opener, site=site, sessions=bench.registry))
    return setup, bench, audit


def test_operator_opens_an_http_gate():
    """200 opened; the relay got a signed open by the operator; the audit keeps the reason."""
    relay = Relay(200)
    setup, bench, audit = desk_setup({1: HTTP_GATE}, relay=relay)
    status, _, body = setup.request(
        "POST", "/api/gates/1/open", {"reason": "entregador conhecido", "apartment": "101"}
    )
    assert status == 200, body
    assert body == {"condominium_id": 1, "result": "opened", "error": None, "attempts": 1}
    (signature, sent), = relay.seen
    assert signature == sign(SECRET, sent)
    assert json.loads(sent)["authorized_by"] == "operator"
    (entry,) = audit
    assert entry["evidence"] == "operator:entregador conhecido"
    assert (entry["authorized_by"], entry["apartment"], entry["uuid"]) == ("operator", "101", None)
    bench.stop()


def post_with_retries(setup, bench, path, body):
    """POST C{body}, moving the bench's clock past the relay's retry delay meanwhile."""
    treq = setup.treq
    d = treq.request(
        "POST", BASE + path, data=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    for _ in range(10):
        treq.flush()
        bench.reactor.advance(1.0)
    response = run(d)
    return response.code, json.loads(_result(treq, treq.content(response)))


def test_operator_open_relay_failure_is_a_502():
    """The relay fails every try: 502 gate_failed with the attempts; audited as failed."""
    setup, bench, audit = desk_setup({1: HTTP_GATE}, relay=Relay(503))
    status, body = post_with_retries(setup, bench, "/api/gates/1/open", {"reason": "teste"})
    assert status == 502
    assert body["error"] == "gate_failed" and body["attempts"] == 2
    assert audit[0]["result"] == "failed"
    bench.stop()


def test_operator_open_refusals():
    """Unknown condominium 404; no gate or a dtmf gate without a call 409; bad bodies 422."""
    setup, bench, audit = desk_setup({1: GateConfig(), 2: DTMF_GATE})
    cases = [
        (9, {"reason": "x"}, 404, "not_found"),
        (1, {"reason": "x"}, 409, "cannot_open"),
        (2, {"reason": "x"}, 409, "cannot_open"),
        (2, {}, 422, "invalid_field"),
        (2, {"reason": "  "}, 422, "invalid_field"),
        (2, {"reason": "a\nb"}, 422, "invalid_field"),
        (2, {"reason": "x" * 201}, 422, "invalid_field"),
        (2, {"reason": "x", "code": "1"}, 422, "invalid_field"),
        (2, {"reason": "x", "apartment": "1,2"}, 422, "invalid_field"),
        (2, {"reason": "x", "uuid": "no-such-call"}, 404, "not_found"),
    ]
    for cid, body, want_status, want_error in cases:
        status, _, answer = setup.request("POST", "/api/gates/{}/open".format(cid), body)
        assert (status, answer["error"]) == (want_status, want_error), (cid, body, answer)
    assert audit == [] and bench.dialer.handoffs == []
    bench.stop()


def test_operator_opens_a_dtmf_gate_on_a_call_which_then_ends():
    """
    A visitor waits while the resident's phone rings; the operator opens with the call's
    uuid: the hand-off open,#9 for that call, then the call ends (the visitor hears the
    goodbye and the hangup frame; the dial is cancelled), recorded as authorized by the
    operator.
    """
    bench = Bench()
    setup, bench, audit = desk_setup({1: DTMF_GATE}, bench=bench)
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    call = str(visitor.leg.uuid)
    status, _, body = setup.request(
        "POST", "/api/gates/1/open", {"reason": "morador pediu por telefone", "uuid": call}
    )
    assert status == 200 and body["result"] == "handed_off", body
    assert bench.dialer.handoffs == [(call, "open", "#9")]
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert (record["outcome"], record["ended_by"]) == ("authorized", "operator")
    assert record["gate"]["by"] == "operator"
    assert visitor.hangup_after_audio
    assert bench.dialer.cancels == [bench.dialer.requests[0].leg_uuid]
    (entry,) = audit
    assert entry["uuid"] == call and entry["evidence"] == "operator:morador pediu por telefone"
    bench.stop()


def test_operator_open_names_a_call_of_another_condominium():
    """A uuid of a call on another condominium is not found there (404), nothing opens."""
    bench = Bench()
    setup, bench, audit = desk_setup({1: DTMF_GATE, 2: DTMF_GATE}, bench=bench)
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    status, _, body = setup.request(
        "POST", "/api/gates/2/open", {"reason": "x", "uuid": str(visitor.leg.uuid)}
    )
    assert status == 404
    assert bench.dialer.handoffs == [] and audit == []
    visitor.drop()
    bench.until(bench.ended)
    bench.stop()
