"""
The gate on a real Asterisk: with C{[condominiums.gate] kind = "dtmf"}, a resident's "1"
makes the server hand the visitor's call back with C{open,<digits>} (AMI C{DBPut}); the
project's dialplan, after C{AudioSocket()} returns, sends the digits with C{SendDTMF} on the
visitor's own line — the gate intercom's — and hangs up.

An intercom that carries DTMF (here behind a Local channel, as a SIP intercom would be) gets
the keys: AMI C{DTMFEnd} events sent on its channel, after the last word the server said. The
bare fake phones (UnicastRTP) cannot carry DTMF at all — C{chan_rtp} has no
C{send_digit_begin}, so Asterisk drops the keys — so where a test calls from one, it watches
the PBX run C{SendDTMF(<digits>)} on the visitor's channel instead (AMI C{Newexten}).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from pbx.conftest import PROMPTS, extension, free_ports
from pbx.test_pbx_calls import decide, ended, type_apartment, until

GATE_DIGITS = "#9"
GATE_PROMPTS = {**PROMPTS, "code_hint": "Ou código."}


async def applications(rig) -> list[tuple[str, str, str, float]]:
    """(channel, application, its data, reactor time) of each dialplan step, as it runs."""
    ran: list[tuple[str, str, str, float]] = []
    # The rig's AMI session hears the "call" class; Newexten is of the "dialplan" class.
    await rig.ami.checked("Events", EventMask="call,dialplan")

    def listen(message):
        if message.get("event", "").lower() == "newexten":
            ran.append((
                message.get("channel", ""), message.get("application", ""),
                message.get("appdata", ""), reactor.seconds(),
            ))

    rig.ami.listeners.append(listen)
    return ran


def send_dtmf(ran, prefix=None) -> list[tuple[str, str, float]]:
    """The SendDTMF steps: (channel, digits, time), on channels named C{prefix}... if given."""
    return [
        (channel, data, at)
        for channel, app, data, at in ran
        if app == "SendDTMF" and (prefix is None or channel.startswith(prefix))
    ]


async def start(rig):
    ai, ret = free_ports(2)
    await rig.start(
        [extension(1, "1001", ai, ret)],
        condominium={"gate": {"kind": "dtmf", "digits": GATE_DIGITS}},
        prompts=GATE_PROMPTS,
    )


async def dtmf_sent(rig) -> list[tuple[str, str, float]]:
    """(channel, digit, time) of each key Asterisk sends to a channel (AMI DTMFEnd, Sent)."""
    sent: list[tuple[str, str, float]] = []
    await rig.ami.checked("Events", EventMask="call,dialplan,dtmf")

    def listen(message):
        if (
            message.get("event", "").lower() == "dtmfend"
            and message.get("direction", "").lower() == "sent"
        ):
            sent.append((message.get("channel", ""), message.get("digit", ""), reactor.seconds()))

    rig.ami.listeners.append(listen)
    return sent


@pytest_twisted.ensureDeferred
async def test_the_intercom_line_gets_the_digits(rig):
    """
    The visitor calls from an intercom behind a channel that carries DTMF (a Local channel
    here, as a SIP intercom's would be): after "entrada autorizada" and the goodbye, the
    keys #9 are sent on the intercom's own line — AMI DTMFEnd events, direction Sent, on the
    phone's channel, after the last word it heard — and on no other line.
    """
    await start(rig)
    sent = await dtmf_sent(rig)
    resident = await rig.resident("101")
    intercom = await rig.resident("700")  # a phone the pbx-phones context reaches
    await rig.ami.checked(
        "Originate", Channel="Local/700@pbx-phones/n", Context="audiosocket-visitor",
        Exten="1001", Priority="1", Async="true",
    )
    await intercom.channel_seen.addTimeout(10, reactor)
    await intercom.answered.addTimeout(10, reactor)
    await type_apartment(rig, intercom, "101")
    await decide(rig, resident, "1")
    await ended(intercom, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "authorized" and record["gate"]["result"] == "handed_off"
    to_intercom = [(d, at) for channel, d, at in sent if channel == intercom.channel]
    assert "".join(d for d, _ in to_intercom) == GATE_DIGITS
    assert not [c for c, _, _ in sent if c.startswith(resident.prefix)]
    last_word = max(t for t, loud in zip(intercom.arrivals, intercom.loud) if loud)
    assert last_word < to_intercom[0][1]
    print("\ngate: the intercom's line got # {:.3f} s after the server's last word".format(
        to_intercom[0][1] - last_word))


@pytest_twisted.ensureDeferred
async def test_denied_sends_no_digits(rig):
    """The resident presses 2: the visitor is told and hung up; no DTMF is sent anywhere."""
    await start(rig)
    ran = await applications(rig)
    resident = await rig.resident("102")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "102")
    await decide(rig, resident, "2")
    await ended(visitor, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "denied" and record["gate"] is None
    assert send_dtmf(ran) == []


@pytest_twisted.ensureDeferred
async def test_valid_code_opens_without_dialing_anyone(rig):
    """
    A pre-authorised visitor types * + code + #: no resident is dialed (no Local channel is
    ever created), the gate's SendDTMF runs on the visitor's channel, the record reads
    preauthorized; the same code a second time opens nothing.
    """
    await start(rig)
    ran = await applications(rig)
    now = datetime.now(timezone.utc)
    (item, code) = await rig.svc.preauths.create({
        "condominium_id": 1, "apartment": "101", "visitor_name": "Maria",
        "valid_from": (now - timedelta(minutes=1)).isoformat(),
        "valid_until": (now + timedelta(hours=1)).isoformat(),
    })
    visitor = await rig.visitor("1001")
    await deferLater(reactor, 0.5, lambda: None)
    await visitor.press(rig.ami, "*" + code + "#")
    await ended(visitor)
    await until(lambda: send_dtmf(ran), what="the dialplan's SendDTMF")
    (channel, digits, _), = send_dtmf(ran)
    assert channel.startswith(visitor.prefix) and digits == GATE_DIGITS
    (record,) = await rig.records(1)
    assert record["outcome"] == "preauthorized" and record["reach"]["preauth"] == item.id
    assert rig.local_channels("") == []
    again = await rig.visitor("1001", name="again")
    await deferLater(reactor, 0.5, lambda: None)
    await again.press(rig.ami, "*" + code + "#")
    await deferLater(reactor, 3.0, lambda: None)
    await again.hangup(rig.ami)
    await ended(again)
    assert len(send_dtmf(ran)) == 1
    assert rig.audiosocket_problems() == []
