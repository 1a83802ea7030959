"""
Faults on the real PBX: the AMI connection the server dials through is closed by Asterisk
(CLI C{manager kick session}) while a resident's phone rings.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from pbx.conftest import extension, free_ports
from pbx.test_pbx_calls import EVENT_S, decide, ended, type_apartment, until


@pytest_twisted.ensureDeferred
async def test_ami_connection_kicked_while_the_resident_rings(rig):
    """
    Apartment 202 rings unanswered (ring timeout 30 s) when Asterisk kicks the server's AMI
    session: the attempt fails at once as C{unreachable}, the visitor hears the no-answer
    prompt and is hung up (no silence, no waiting for the timeout); once the dialer has
    logged in again it hangs up the channel still ringing, well before its 30 s; and a later
    call dials through the new connection and is authorized.
    """
    ai, ret = free_ports(2)
    await rig.start([extension(1, "1001", ai, ret)], ring_timeout_s=30, attempts=1)
    visitor = await rig.visitor("1001")
    await type_apartment(rig, visitor, "202")
    await until(lambda: rig.local_channels("noanswer@"), what="apartment 202 ringing")
    kicked_at = reactor.seconds()
    assert rig.asterisk.kick_manager(rig.asterisk.server_user) == 1
    await ended(visitor)
    (record,) = await rig.records(1)
    assert record["outcome"] == "no_answer"
    assert record["dial_failures"] == [{"attempt": 1, "reason": "unreachable"}]
    assert record["ended_by"] == "server" and visitor.hung_up_by == "pbx"
    # Speech after the kick: the no-answer prompt.
    spoke_after = [t for t, loud in zip(visitor.arrivals, visitor.loud) if loud]
    assert spoke_after and spoke_after[-1] > kicked_at
    await rig.svc.dialer.when_ready().addTimeout(EVENT_S, reactor)

    async def ringing():
        return [c for c in await rig.channels() if c.startswith("Local/noanswer@")]

    for _ in range(int(EVENT_S / 0.2)):
        if not await ringing():
            break
        await deferLater(reactor, 0.2, lambda: None)
    assert await ringing() == []
    assert reactor.seconds() - kicked_at < 30

    resident = await rig.resident("101")
    second = await rig.visitor("1001", "second visitor")
    await type_apartment(rig, second, "101")
    await decide(rig, resident, "1")
    await ended(second, resident)
    latest = (await rig.records(2))[0]
    assert latest["outcome"] == "authorized" and latest["dial_failures"] == []
