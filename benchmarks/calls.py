"""
Received-gap figures of a few calls (issue 2): the real server pinned to CPU 0, the call
generator (C{audiosocket-call --calls N --seconds S}) pinned to CPU 1, one run per N. For
each: the gaps between frames as the generator received them (p50, p99, max, over every
gap of every call, and the worst call's p99), frames owed, and the server's own gap p99
bucket differenced between two C{/metrics} scrapes around the run.

    python benchmarks/calls.py                     # 1 call, then 50, 20 s each
    python benchmarks/calls.py --calls 1,50,100 --seconds 30 --json calls.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    above,
    bucket_quantile,
    client_result,
    histogram_delta,
    machine,
    run_client,
    table,
    write_json,
)
from benchmarks.legs import GAP, Ours  # noqa: E402


def measure(server: Ours, calls: int, seconds: float, client_cpu: int, nice: int) -> dict:
    ports = ",".join(str(p) for p in server.ports)
    ramp = calls / 200.0
    before = server.server.metrics()
    client = run_client(
        [
            "127.0.0.1:{}".format(server.ports[0]),
            "--ports",
            ports,
            "--calls",
            str(calls),
            "--ramp",
            str(ramp),
            "--seconds",
            str(seconds),
        ],
        cpu=client_cpu,
        nice=nice,
    )
    totals = client_result(client, timeout=seconds + 60)["aggregate"]
    gaps = histogram_delta(before, server.server.metrics(), GAP)
    return {
        "calls": calls,
        "seconds": seconds,
        "completed": totals["completed"],
        "gap_p50_ms": totals["gap_p50_ms"],
        "gap_p99_ms": totals["gap_p99_ms"],
        "gap_max_ms": totals["gap_max_ms"],
        "worst_leg_gap_p99_ms": totals["worst_leg_gap_p99_ms"],
        "frames_owed": totals["frames_owed"],
        "client_late_ticks": (totals.get("client") or {}).get("late_ticks"),
        "server_gap_p99_ms": bucket_quantile(gaps, 0.99),
        "server_gaps_over_60ms": above(gaps, 60.0),
    }


COLUMNS = [
    ("calls", "calls"),
    ("seconds", "s"),
    ("completed", "completed"),
    ("gap_p50_ms", "received gap p50 ms"),
    ("gap_p99_ms", "received gap p99 ms"),
    ("gap_max_ms", "received gap max ms"),
    ("worst_leg_gap_p99_ms", "worst call p99 ms"),
    ("frames_owed", "frames owed"),
    ("client_late_ticks", "client late ticks"),
    ("server_gap_p99_ms", "server gap p99 ms (bucket)"),
    ("server_gaps_over_60ms", "server gaps > 60 ms"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Received-gap figures of 1 and 50 calls.")
    parser.add_argument("--calls", default="1,50", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--extensions", type=int, default=10)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        server = Ours(Path(tmp), args.extensions, args.server_cpu, "none", args.nice)
        try:
            for n in (int(c) for c in args.calls.split(",")):
                rows.append(measure(server, n, args.seconds, args.client_cpu, args.nice))
        finally:
            server.stop()
    print("machine: " + machine())
    print("server on CPU {}, generator on CPU {}, nice {}".format(
        args.server_cpu, args.client_cpu, args.nice))
    print()
    print(table(rows, COLUMNS))
    write_json(args.json, {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
