"""
The gate in the conversation: a resident's "1" or a valid code opens it (a dtmf hand-off or
an http relay), a visitor who hung up first gets nothing opened, a relay that fails is told
(and goes to the operator), and every open is audited.
"""

from __future__ import annotations

import json
import uuid

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.resource import Resource

from audiosocket.config import GateConfig, OperatorConfig
from audiosocket.gate import SIGNATURE_HEADER, GateOpener, sign
from tests.flowkit import Bench, start_call
from tests.test_flow_reach import decide

SECRET = "relay-secret"
DTMF_GATE = GateConfig(kind="dtmf", digits="#9")
HTTP_GATE = GateConfig(kind="http", url="http://127.0.0.1:9/open", secret_env="GATE", retries=1)


class Relay(Resource):
    """A relay controller in memory (served through StubTreq): answers C{codes} in turn."""

    isLeaf = True

    def __init__(self, *codes):
        super().__init__()
        self.codes = list(codes) or [200]
        self.seen = []

    def render_POST(self, request):
        body = request.content.read()
        self.seen.append((request.getHeader(SIGNATURE_HEADER), body))
        request.setResponseCode(self.codes.pop(0) if len(self.codes) > 1 else self.codes[0])
        return b"{}"


@attrs.frozen
class Pre:
    """What Preauths.redeem gives back (the fields the flow reads)."""

    id: str
    apartment: str
    visitor_name: str


class Codes:
    """A redeemer with one valid code (the store-backed one is tested in test_preauth)."""

    def __init__(self, code="123456", pre=Pre("p1", "101", "Maria Faxineira")):
        self.code = code
        self.pre = pre
        self.tried = []

    def redeem(self, condominium_id, code, tz):
        self.tried.append(code)
        return defer.succeed(self.pre if code == self.code else None)


def gate_bench(gate, *, relay=None, operator=None, codes=None, **flow):
    bench = Bench(**flow)
    bench.audit = []
    http = StubTreq(relay or Relay())
    opener = GateOpener(
        dialer=bench.dialer,
        http=http,
        secret={"GATE": SECRET}.get,
        audit=bench.audit.append,
        reactor=bench.reactor,
    )
    bench.flow.gate = opener
    bench.flow.preauths = codes
    bench.site = attrs.evolve(bench.site, gate=gate, operator=operator or OperatorConfig())
    return bench


@pytest.fixture
def benches():
    made = []

    def make(*args, **kwargs):
        bench = gate_bench(*args, **kwargs)
        made.append(bench)
        return bench

    yield make
    for bench in made:
        bench.stop()


def texts(bench, peer) -> list[str]:
    """What C{peer} heard, as texts."""
    return [bench.tts.texts[label - 1] for label in peer.heard]


def resident_decides(bench, visitor, key="1"):
    bench.until(lambda: bench.dialer.requests)
    resident = bench.resident_for(visitor)
    return decide(bench, resident, key)


# --- a resident's decision ----------------------------------------------------------------------


def test_authorized_with_dtmf_gate_hands_off_open_digits(benches):
    """
    "1" → "pode entrar", then the hand-off open,<digits> for the visitor's call, then the
    goodbye and the hangup frame (the dialplan sends the digits after it); audited.
    """
    bench = benches(DTMF_GATE)
    visitor = start_call(bench)
    record = resident_decides(bench, visitor)
    assert record["outcome"] == "authorized"
    assert bench.dialer.handoffs == [(str(visitor.leg.uuid), "open", "#9")]
    assert record["gate"] == {"kind": "dtmf", "result": "handed_off", "error": None, "attempts": 1}
    heard = visitor.heard
    assert heard.index(bench.text("authorized")) < heard.index(bench.text("goodbye"))
    assert visitor.hangup_after_audio
    (entry,) = bench.audit
    assert entry["authorized_by"] == "resident" and entry["evidence"] == "dtmf:1"
    assert entry["apartment"] == "101" and entry["uuid"] == str(visitor.leg.uuid)
    assert entry["result"] == "handed_off" and entry["gate"] == "dtmf"
    assert "#9" not in json.dumps(entry)


def test_denied_opens_nothing(benches):
    """"2": no hand-off, no relay call, no audit entry."""
    relay = Relay()
    bench = benches(HTTP_GATE, relay=relay)
    visitor = start_call(bench)
    record = resident_decides(bench, visitor, key="2")
    assert record["outcome"] == "denied"
    assert not bench.dialer.handoffs and not relay.seen and not bench.audit
    assert record["gate"] is None


def test_no_gate_is_todays_behaviour(benches):
    """kind = "none": "pode entrar" and goodbye, nothing opened, nothing audited."""
    bench = benches(GateConfig())
    visitor = start_call(bench)
    record = resident_decides(bench, visitor)
    assert record["outcome"] == "authorized" and record["gate"] is None
    assert not bench.dialer.handoffs and not bench.audit
    assert bench.heard(visitor, "authorized") and bench.heard(visitor, "goodbye")


def test_visitor_gone_before_the_gate_opens_it_stays_shut(benches):
    """
    The visitor hangs up during "pode entrar": the record says authorized (the resident
    decided), but nothing is opened, and the audit says not_opened.
    """
    relay = Relay()
    bench = benches(HTTP_GATE, relay=relay)
    visitor = start_call(bench)
    bench.until(lambda: bench.dialer.requests)
    resident = bench.resident_for(visitor)
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press("1")
    bench.until(lambda: bench.text("authorized") in visitor.heard)
    visitor.drop()
    bench.until(bench.ended)
    record = bench.records[0]
    assert record["outcome"] == "authorized"
    assert not relay.seen
    assert record["gate"]["result"] == "not_opened"
    (entry,) = bench.audit
    assert entry["result"] == "not_opened"


def test_http_relay_signed_and_opened(benches):
    """The relay gets a signed JSON body naming the call; a 200 is "opened"."""
    relay = Relay(200)
    bench = benches(HTTP_GATE, relay=relay)
    visitor = start_call(bench)
    record = resident_decides(bench, visitor)
    (signature, body), = relay.seen
    assert signature == sign(SECRET, body)
    sent = json.loads(body)
    assert sent["event"] == "open" and sent["uuid"] == str(visitor.leg.uuid)
    assert sent["authorized_by"] == "resident" and sent["evidence"] == "dtmf:1"
    assert record["gate"]["result"] == "opened"
    assert bench.audit[0]["result"] == "opened"
    assert not bench.heard(visitor, "gate_failed")


def test_http_relay_failure_is_told_and_recorded(benches):
    """Every try fails (503, 503): the visitor hears it, the record and audit say failed."""
    relay = Relay(503)
    bench = benches(HTTP_GATE, relay=relay)
    visitor = start_call(bench)
    record = resident_decides(bench, visitor)
    assert len(relay.seen) == 2  # one try and one retry
    assert record["gate"]["result"] == "failed" and record["gate"]["attempts"] == 2
    assert "503" in record["gate"]["error"]
    assert bench.heard(visitor, "gate_failed")
    assert not bench.heard(visitor, "goodbye")  # gate_failed says it
    assert bench.audit[0]["result"] == "failed"


def test_http_relay_failure_goes_to_the_operator(benches):
    """With an operator, a relay that fails hands the visitor to them."""
    bench = benches(
        HTTP_GATE, relay=Relay(500), operator=OperatorConfig(dial="PJSIP/portaria")
    )
    visitor = start_call(bench)
    record = resident_decides(bench, visitor)
    assert record["outcome"] == "authorized"
    assert record["reach"]["handoff"]["reason"] == "gate_failed"
    assert bench.dialer.handoffs == [(str(visitor.leg.uuid), "transfer", "PJSIP/portaria")]
    assert bench.heard(visitor, "gate_failed_operator")
    assert not bench.heard(visitor, "goodbye")


# --- pre-authorisation codes ---------------------------------------------------------------------


def test_greeting_offers_codes_only_where_the_gate_takes_them(benches):
    """The code path is in the greeting with a gate and codes on; not without a gate."""
    with_gate = benches(DTMF_GATE, codes=Codes())
    visitor = with_gate.connect()
    with_gate.advance(0.5)
    assert any(t.endswith(with_gate.prompts.say("code_hint")) for t in texts(with_gate, visitor))
    visitor.drop()
    with_gate.until(with_gate.ended)
    without = benches(GateConfig(), codes=Codes())
    visitor = without.connect()
    without.advance(0.5)
    assert not any("código" in t for t in texts(without, visitor))
    visitor.drop()
    without.until(without.ended)


def test_valid_code_opens_without_calling_anyone(benches):
    """
    *123456#: "Bem-vindo, Maria", the resident is notified, the gate opens (hand-off), the
    outcome is preauthorized and nobody is dialed. The code is nowhere in the record.
    """
    codes = Codes()
    bench = benches(DTMF_GATE, codes=codes)
    visitor = start_call(bench, "*123456#")
    bench.until(bench.ended, max_s=30)
    record = bench.records[0]
    assert record["outcome"] == "preauthorized"
    assert not bench.dialer.requests
    assert bench.heard(visitor, "code_welcome", visitor="Maria Faxineira")
    assert bench.dialer.handoffs == [(str(visitor.leg.uuid), "open", "#9")]
    (notice,) = bench.dialer.notices
    assert notice["kind"] == "preauthorized" and notice["apartment"] == "101"
    (entry,) = bench.audit
    assert (entry["authorized_by"], entry["who"], entry["evidence"]) == ("preauth", "p1", "code")
    assert "123456" not in json.dumps(record) and "123456" not in json.dumps(entry)
    assert record["facts"]["apartment"] == "101"


def test_wrong_code_three_times_ends_the_code_path(benches):
    """
    Three wrong codes: told each time, the third ends the code path (a fourth * is not read
    as a code); nothing opens; the visitor can still type the apartment.
    """
    codes = Codes()
    bench = benches(DTMF_GATE, codes=codes)
    visitor = bench.connect()
    bench.advance(0.1)
    for wrong in ("111111", "222222", "333333"):
        visitor.press("*" + wrong + "#")
        bench.advance(6.0)
    assert codes.tried == ["111111", "222222", "333333"]
    assert bench.heard(visitor, "code_invalid") and bench.heard(visitor, "code_no_more")
    visitor.press("*123456#")
    bench.advance(6.0)
    assert codes.tried == ["111111", "222222", "333333"]
    assert not bench.dialer.handoffs and not bench.audit
    visitor.press("101#")
    record = resident_decides(bench, visitor, key="2")
    assert record["outcome"] == "denied"


def test_code_of_wrong_length_is_not_checked(benches):
    """*12# is wrong at once (never looked up) and counted."""
    codes = Codes()
    bench = benches(DTMF_GATE, codes=codes)
    visitor = start_call(bench, "*12#")
    bench.advance(6.0)
    assert codes.tried == []
    assert bench.heard(visitor, "code_invalid")
    visitor.drop()
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "abandoned"


def test_star_is_an_ordinary_key_without_a_gate(benches):
    """Without a gate there are no codes: * clears the entry, as before."""
    codes = Codes()
    bench = benches(GateConfig(), codes=codes)
    visitor = start_call(bench, "9*101#")
    bench.until(lambda: bench.dialer.requests)
    assert bench.dialer.requests[0].apartment == "101"
    assert codes.tried == []
    visitor.drop()
    bench.until(bench.ended)
