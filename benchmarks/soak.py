"""
Soak and leak accounting: N concurrent calls cycling for M minutes against the real server,
then what it holds once they are over compared with what it held before.

The server (C{twistd -n audiosocket}, embedded Redis, C{[dialer] kind = "http"}) runs pinned
to CPU 0; the driver (this script run with C{--driver}, one Twisted process) to CPU 1. The
driver keeps N visitor calls going: each types an apartment (C{101#}) after the greeting,
the server dials through the driver's webhook (the fake PBX's L{Webhook} role), the
resident's leg joins with the dial's leg UUID and presses 1 (or 2, every other call) once the
question has played, the server announces the decision and hangs up both legs — then the slot
places its next call at once. One call in ten hangs up during its greeting instead (a visitor
who gives up). Calls keep no audio (C{keep_audio=False}), so the driver's memory stays flat.

Before the load, every minute during it, and once the last call has ended (after a settle
time), the orchestrator reads: the server's open file descriptors and RSS (from C{/proc}),
the reactor's pending timers, leg routes, records settling or unsaved (C{GET /api/status},
C{"process"}), sessions in progress and legs on the audio clock. A leak shows as an "after"
above "before" that grows with the run's length. Pending Deferreds are not counted: a count
needs a walk over the heap (C{gc.get_objects()}), which would stall the audio clock of the
calls being measured; the timers and tables above are what an unfinished Deferred holds on to.

    python benchmarks/soak.py --calls 100 --minutes 5 --json soak.json
    python benchmarks/soak.py --calls 200 --minutes 30        # the full soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    PYTHON,
    ROOT,
    Server,
    free_ports,
    machine,
    pinned,
    rss_kb,
    table,
    write_config,
    write_json,
)

#: The resident presses the key every few seconds: keys count only once the announcement and
#: the question have played, and the driver does not know when that is.
PRESS_AT = (1.0, 6.0, 10.0, 14.0, 18.0, 22.0)


# -- the driver (its own process, its own reactor) ---------------------------------------------


def driver(args) -> int:
    from twisted.internet import defer, task
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web import resource, server

    from audiosocket.callclient import CallOptions, place_call

    stats = {
        "visitor_calls": 0,
        "resident_calls": 0,
        "hung_up_by": {},
        "errors": 0,
        "dials": 0,
        "cancels": 0,
        "worst_gap_p99_ms": 0.0,
        "frames_owed": 0,
    }
    gaps_p99 = []

    def account(report, role):
        stats[role] += 1
        by = report.hung_up_by or "none"
        stats["hung_up_by"][by] = stats["hung_up_by"].get(by, 0) + 1
        if report.error:
            stats["errors"] += 1
        if report.gap_p99_ms is not None:
            gaps_p99.append(report.gap_p99_ms)
            stats["worst_gap_p99_ms"] = max(stats["worst_gap_p99_ms"], report.gap_p99_ms)
        stats["frames_owed"] += max(0, report.frames_owed)

    class Webhook(resource.Resource):
        isLeaf = True

        def __init__(self, reactor):
            super().__init__()
            self.reactor = reactor
            self.n = 0

        def render_POST(self, request):
            body = json.loads(request.content.read())
            request.setHeader(b"content-type", b"application/json")
            if body.get("event") == "cancel":
                stats["cancels"] += 1
                return b'{"cancelled": true}'
            stats["dials"] += 1
            self.n += 1
            digit = "1" if self.n % 2 else "2"
            host, port = body["audiosocket"].rsplit(":", 1)
            options = CallOptions(
                host=host, port=int(port), uuid=body["leg_uuid"],
                dtmf=[(at, digit) for at in PRESS_AT], hangup_after=60, keep_audio=False,
            )
            d = defer.Deferred.fromCoroutine(place_call(options, self.reactor))
            d.addCallback(account, "resident_calls")
            return b'{"accepted": true}'

    async def slot(reactor, i, ports, deadline):
        rng = random.Random(i)
        while reactor.seconds() < deadline:
            leaves = rng.random() < 0.1
            options = CallOptions(
                host="127.0.0.1", port=ports[i % len(ports)],
                dtmf=() if leaves else [(1.0, "101#")],
                hangup_after=3.0 if leaves else 90.0, keep_audio=False,
            )
            account(await place_call(options, reactor), "visitor_calls")

    async def run(reactor):
        web = await TCP4ServerEndpoint(reactor, args.webhook_port, interface="127.0.0.1").listen(
            server.Site(Webhook(reactor))
        )
        ports = [int(p) for p in args.ports.split(",")]
        deadline = reactor.seconds() + args.minutes * 60
        slots = []
        for i in range(args.calls):
            slots.append(defer.Deferred.fromCoroutine(slot(reactor, i, ports, deadline)))
            await task.deferLater(reactor, args.ramp / max(1, args.calls), lambda: None)
        await defer.gatherResults(slots)
        await task.deferLater(reactor, 5, lambda: None)  # resident legs still hanging up
        await web.stopListening()
        gaps_p99.sort()
        stats["median_call_gap_p99_ms"] = gaps_p99[len(gaps_p99) // 2] if gaps_p99 else None
        print(json.dumps(stats), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0


# -- the orchestrator --------------------------------------------------------------------------


def snapshot(server: Server, label: str, t0: float) -> dict:
    status = server.status()
    process = status.get("process", {})
    metrics = server.metrics()
    legs = sum(metrics.get("audiosocket_legs_active", {}).values())
    return {
        "at": label,
        "minute": round((time.monotonic() - t0) / 60.0, 1),
        "open_fds": len(os.listdir("/proc/{}/fd".format(server.pid))),
        "rss_mb": rss_kb(server.pid) / 1024.0,
        "delayed_calls": process.get("delayed_calls"),
        "sessions": status["sessions"]["active"],
        "legs": legs,
        "clock_legs": status["clock"]["legs"],
        "leg_routes": process.get("leg_routes"),
        "settling": process.get("settling"),
        "records_unsaved": process.get("records_unsaved"),
        "finished": status["sessions"]["finished"],
        "late_ticks": status["clock"]["late_ticks"],
    }


COLUMNS = [
    ("at", "when"),
    ("minute", "min"),
    ("sessions", "sessions"),
    ("legs", "legs"),
    ("open_fds", "open fds"),
    ("delayed_calls", "DelayedCalls"),
    ("leg_routes", "leg routes"),
    ("settling", "settling"),
    ("records_unsaved", "unsaved"),
    ("rss_mb", "RSS MB"),
    ("finished", "calls done"),
    ("late_ticks", "late ticks"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Soak: N calls cycling for M minutes.")
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds to start all calls")
    parser.add_argument("--extensions", type=int, default=10)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds idle before 'after'")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--webhook-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        return driver(args)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        tmp = Path(tmp)
        api_port, webhook_port = free_ports(2)
        ports = write_config(
            tmp / "soak.toml",
            extensions=args.extensions,
            api_port=api_port,
            dialer={
                "kind": "http",
                "url": "http://127.0.0.1:{}/dial".format(webhook_port),
                "timeout_s": 5.0,
            },
            flow={"ring_timeout_s": 15, "attempts": 1, "decision_timeout_s": 10.0},
        )["ai_ports"]
        server = Server(tmp / "soak.toml", api_port, cpu=args.server_cpu)
        try:
            server.wait_ready()
            t0 = time.monotonic()
            time.sleep(2.0)
            rows.append(snapshot(server, "before", t0))
            argv = [
                PYTHON, str(Path(__file__).resolve()), "--driver",
                "--calls", str(args.calls), "--minutes", str(args.minutes),
                "--ramp", str(args.ramp), "--ports", ",".join(map(str, ports)),
                "--webhook-port", str(webhook_port),
            ]
            drive = subprocess.Popen(
                pinned(argv, args.client_cpu), cwd=str(ROOT), stdout=subprocess.PIPE,
                text=True,
            )
            next_at = 60.0
            while drive.poll() is None:
                time.sleep(1.0)
                if time.monotonic() - t0 >= next_at:
                    rows.append(snapshot(server, "during", t0))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    next_at += 60.0
            out = drive.stdout.read().strip().splitlines()
            load = json.loads(out[-1]) if out else {"error": "driver printed nothing"}
            time.sleep(args.settle)
            rows.append(snapshot(server, "after", t0))
            outcomes = {}
            for labels, n in server.metrics().get("audiosocket_calls_total", {}).items():
                outcome = dict(labels).get("outcome", "?")
                outcomes[outcome] = outcomes.get(outcome, 0) + int(n)
        finally:
            server.stop()
    before, after = rows[0], rows[-1]
    print("machine: " + machine())
    print("{} calls cycling for {} min; server on CPU {}, driver on CPU {}".format(
        args.calls, args.minutes, args.server_cpu, args.client_cpu))
    print()
    print(table(rows, COLUMNS))
    print()
    print("driver: " + json.dumps(load))
    print("outcomes: " + json.dumps(outcomes))
    delta = {k: after[k] - before[k] for k in
             ("open_fds", "delayed_calls", "sessions", "legs", "leg_routes", "settling",
              "records_unsaved", "rss_mb") if before[k] is not None and after[k] is not None}
    print("after - before: " + json.dumps(delta))
    write_json(args.json, {"machine": machine(), "calls": args.calls,
                           "minutes": args.minutes, "rows": rows, "driver": load, "outcomes": outcomes,
                           "delta": delta})
    return 0


if __name__ == "__main__":
    sys.exit(main())
