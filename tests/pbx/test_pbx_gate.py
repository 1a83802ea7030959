"""
The gate on a real Asterisk: with C{[condominiums.gate] kind = "dtmf"}, a resident's "1"
makes the server hand the visitor's call back with C{open,<digits>} (AMI C{DBPut}); the
project's dialplan, after C{AudioSocket()} returns, sends the digits on the visitor's line
with C{SendDTMF} — the gate intercom's line — and hangs up.

The fake phones are UnicastRTP channels, and C{chan_rtp} cannot send DTMF at all (it has no
C{send_digit_begin}: Asterisk drops the keys silently; a PJSIP intercom gets them as RFC 4733
events or in band). So the test watches the PBX do it: the AMI C{Newexten} event of
C{SendDTMF(<digits>)} on the visitor's own channel, after the last word the server sent it.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

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


@pytest_twisted.ensureDeferred
async def test_authorized_sends_the_gate_digits_after_the_goodbye(rig):
    """
    The resident presses 1: the visitor hears "entrada autorizada" and the goodbye, the
    server's hangup frame ends AudioSocket(), and the dialplan sends #9 on the visitor's
    channel, then hangs it up. The record's gate says handed_off; the resident's phone gets
    no digits.
    """
    await start(rig)
    ran = await applications(rig)
    resident = await rig.resident("101")
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "101")
    await decide(rig, resident, "1")
    await ended(visitor, resident)
    (record,) = await rig.records(1)
    assert record["outcome"] == "authorized"
    assert record["gate"] == {"kind": "dtmf", "result": "handed_off", "error": None, "attempts": 1}
    await until(lambda: send_dtmf(ran), what="the dialplan's SendDTMF")
    (channel, digits, at), = send_dtmf(ran)
    assert channel.startswith(visitor.prefix) and digits == GATE_DIGITS
    # After the goodbye: the last word the visitor's phone heard came before the keys.
    last_word = max(t for t, loud in zip(visitor.arrivals, visitor.loud) if loud)
    assert last_word < at
    print("\ngate: SendDTMF ran {:.3f} s after the server's last word".format(at - last_word))
    assert rig.audiosocket_problems() == []


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
