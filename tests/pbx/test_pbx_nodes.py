"""
Two doorman nodes on one Redis and one real Asterisk: node A on 127.0.0.1, node B on
127.0.0.2 (a loopback alias), the same extension on both. The dialplan's global sends the first
visitor to A and the second to B; each node's AMI dialer originates its resident's call with its
own address as C{AUDIOSOCKET_HOST}, so the resident's leg comes back to the node holding the
visitor's session (with the extension's shared host it would reach A, which would refuse B's
leg as an unknown UUID).
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from pbx.conftest import SECRET_ENV, Rig, extension, free_ports
from pbx.test_pbx_calls import decide, ended, type_apartment


@pytest_twisted.ensureDeferred
async def test_two_nodes_each_serve_a_call(asterisk, redis_server, tmp_path, monkeypatch):
    """
    A visitor routed to each node types an apartment and its resident presses 1: both calls
    are authorized, each record names the node that served it, each resident leg joined the
    node that dialed it (no node refused a leg), and /api/sessions-style descriptions carry
    the node while the calls are in progress.
    """
    monkeypatch.setenv(SECRET_ENV, asterisk.server_secret)
    ai, ret = free_ports(2)
    ext = extension(1, "1001", ai, ret)
    rigs = []
    for name, bind in (("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")):
        (tmp_path / name).mkdir()
        rig = Rig(asterisk, tmp_path / name, name)
        rig.redis_path = redis_server.path
        rigs.append(rig)
    a, b = rigs
    try:
        await a.start([ext], server={"bind": "127.0.0.1", "node": "node-a"})
        await b.start([ext], server={"bind": "127.0.0.2", "node": "node-b"})
        resident_a = await a.resident("101")
        resident_b = await b.resident("102")
        await a.route("1001", ai, "127.0.0.1")
        visitor_a = await a.visitor("1001", "visitor a")
        await b.route("1001", ai, "127.0.0.2")
        visitor_b = await b.visitor("1001", "visitor b")
        assert [s["node"] for s in a.svc.registry.describe_all()] == ["node-a"]
        assert [s["node"] for s in b.svc.registry.describe_all()] == ["node-b"]
        await type_apartment(a, visitor_a, "101")
        await type_apartment(b, visitor_b, "102")
        await defer.gatherResults(
            [
                defer.ensureDeferred(decide(a, resident_a, "1")),
                defer.ensureDeferred(decide(b, resident_b, "1")),
            ]
        )
        await ended(visitor_a, resident_a, visitor_b, resident_b)
        records = {r["node"]: r for r in await a.records(2)}
        assert set(records) == {"node-a", "node-b"}
        assert records["node-a"]["facts"]["apartment"] == "101"
        assert records["node-b"]["facts"]["apartment"] == "102"
        assert [r["outcome"] for r in records.values()] == ["authorized", "authorized"]
        assert [r["decision_input"] for r in records.values()] == ["dtmf:1", "dtmf:1"]
        for rig in rigs:
            assert not any(rig.svc.status()["refused"].values())
            assert rig.audiosocket_problems() == []
    finally:
        for rig in rigs:
            await rig.stop()
