"""
Extension churn: add 1000 extensions through the API (one C{POST /api/extensions} after
another, as an admin script would), while one live call streams on extension 1.

Reports the total time, the per-request p50/p99/max, the server's RSS before and after
(→ KB per idle extension: two listening ports, two factories, a Redis hash), and the
received-gap p99 / max of the live call during the churn (the generator pinned to CPU 1,
the server to CPU 0).

    python benchmarks/extensions.py
    python benchmarks/extensions.py --count 500 --json ext.json
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Server,
    client_result,
    free_ports,
    http,
    machine,
    rss_kb,
    run_client,
    table,
    write_config,
    write_json,
)


def port_block(n: int, start: int = 22000) -> list[int]:
    """C{n} ports from C{start} up that nobody listens on now (outside the ephemeral range)."""
    ports = []
    port = start
    while len(ports) < n:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            ports.append(port)
        except OSError:
            pass
        finally:
            s.close()
        port += 1
    return ports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="1000 extensions added through the API.")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ext-") as tmp:
        tmp = Path(tmp)
        api_port = free_ports(1)[0]
        ai = write_config(tmp / "ext.toml", extensions=1, api_port=api_port)["ai_ports"][0]
        server = Server(tmp / "ext.toml", api_port, cpu=0)
        try:
            server.wait_ready()
            time.sleep(2.0)  # prompt preload
            ports = port_block(2 * args.count)
            rss_before = rss_kb(server.pid)
            # The live call: longer than the churn can take; hung up by the client.
            live = run_client(["127.0.0.1:{}".format(ai), "--seconds", "40"], cpu=1)
            time.sleep(2.0)
            times = []
            failures = 0
            started = time.monotonic()
            for i in range(args.count):
                body = {
                    "id": 1000 + i,
                    "ai_extension": str(20000 + 2 * i),
                    "ai_port": ports[2 * i],
                    "return_extension": str(20001 + 2 * i),
                    "return_port": ports[2 * i + 1],
                    "host": "127.0.0.1",
                    "condominium_id": 1,
                }
                t0 = time.monotonic()
                status, reply = http(server.api + "/api/extensions", "POST", body)
                times.append((time.monotonic() - t0) * 1000.0)
                if status != 201:
                    failures += 1
                    print(
                        "POST {} failed: {} {}".format(body["id"], status, reply), file=sys.stderr
                    )
            total = time.monotonic() - started
            time.sleep(1.0)
            rss_after = rss_kb(server.pid)
            listed = len(http(server.api + "/api/extensions")[1])
            call = client_result(live, timeout=120)
        finally:
            server.stop()
    t = np.array(times)
    row = {
        "extensions": args.count,
        "failed": failures,
        "listed": listed,
        "total_s": total,
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "max_ms": float(t.max()),
        "rss_before_mb": rss_before / 1024.0,
        "rss_after_mb": rss_after / 1024.0,
        "kb_per_extension": (rss_after - rss_before) / args.count,
        "live_gap_p99_ms": call["gap_p99_ms"],
        "live_gap_max_ms": call["gap_max_ms"],
        "live_frames_owed": call["frames_owed"],
        "live_late_sends": call["late_sends"],
    }
    print("machine: " + machine())
    print()
    print(
        table(
            [row],
            [
                ("extensions", "added"),
                ("failed", "failed"),
                ("total_s", "total s"),
                ("p50_ms", "p50 ms"),
                ("p99_ms", "p99 ms"),
                ("max_ms", "max ms"),
                ("rss_before_mb", "RSS before MB"),
                ("rss_after_mb", "RSS after MB"),
                ("kb_per_extension", "KB/extension"),
                ("live_gap_p99_ms", "live call gap p99 ms"),
                ("live_gap_max_ms", "live gap max ms"),
                ("live_frames_owed", "live frames owed"),
            ],
        )
    )
    write_json(args.json, {"machine": machine(), "result": row, "request_ms": times})
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
