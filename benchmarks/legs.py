"""
How many concurrent legs one core holds: the real server pinned to CPU 0, the load
generator (C{audiosocket-call --calls N}) pinned to CPU 1, and the same load against
L{baseline_asyncio} (the original's per-leg C{sleep(20 ms)} pacing) in the same run.

For each N: N calls spread over the extensions' AI ports, ramped in, then a steady window
during which every call streams silence (no DTMF: calls stay in the greeting / question
state). Over that window: server CPU % (utime+stime from /proc), RSS at its end, the gaps
between frames the server sent (from its own per-leg histograms, differenced between two
scrapes of /metrics: p99 bucket and gaps over 60 ms), the clock's late ticks; and from the
generator, the received-gap p99 and whether it kept its own real time.

    python benchmarks/legs.py                       # 100,250,500,750,1000, both servers
    python benchmarks/legs.py --legs 500 --json legs.json --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    PYTHON,
    ROOT,
    Server,
    above,
    bucket_quantile,
    client_result,
    cpu_busy,
    cpu_seconds,
    free_ports,
    histogram_delta,
    machine,
    pinned,
    rss_kb,
    run_client,
    speech_sections,
    table,
    write_config,
    write_json,
)

GAP = "audiosocket_frame_gap_seconds"


class Ours:
    name = "audiosocket"

    def __init__(self, tmp: Path, extensions: int, cpu: int, stt: str, nice: int = 0):
        api_port = free_ports(1)[0]
        # With "whisper", a local fake answers (the legs stream silence: the VAD runs on
        # every frame, the provider is asked only if it hears speech).
        sections, self.fake_stt = speech_sections(stt)
        self.ports = write_config(
            tmp / "legs.toml", extensions=extensions, api_port=api_port, **sections
        )["ai_ports"]
        self.server = Server(tmp / "legs.toml", api_port, cpu=cpu, nice=nice)
        self.pid = self.server.pid
        self.server.wait_ready()
        self.idle_rss = rss_kb(self.pid)

    def active(self) -> int:
        return self.server.active()

    def snapshot(self) -> dict:
        return {"metrics": self.server.metrics(), "status": self.server.status()}

    def window(self, before: dict, after: dict) -> dict:
        gaps = histogram_delta(before["metrics"], after["metrics"], GAP)
        late = lambda s: s["status"]["clock"]["late_ticks"]  # noqa: E731
        skipped = lambda s: s["status"]["clock"]["skipped_frames"]  # noqa: E731
        return {
            "server_gap_p99_ms": bucket_quantile(gaps, 0.99),
            "server_gaps_over_60ms": above(gaps, 60.0),
            "server_gaps": int(sum(n for _, n in gaps)),
            "late_ticks": late(after) - late(before),
            "skipped_frames": skipped(after) - skipped(before),
        }

    def stop(self) -> None:
        self.server.stop()
        if self.fake_stt is not None:
            self.fake_stt.stop()


class Baseline:
    name = "baseline (asyncio sleep 20 ms)"

    def __init__(self, tmp: Path, extensions: int, cpu: int, nice: int = 0):
        self.ports = free_ports(extensions)
        self.stats = tmp / "baseline.json"
        spec = ",".join(str(p) for p in self.ports)
        argv = [
            PYTHON,
            str(ROOT / "benchmarks" / "baseline_asyncio.py"),
            "--ports",
            spec,
            "--stats",
            str(self.stats),
        ]
        import subprocess

        self.proc = subprocess.Popen(pinned(argv, cpu, nice), cwd=str(ROOT))
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while not self.stats.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("baseline server did not start")
            time.sleep(0.1)
        self.idle_rss = rss_kb(self.pid)

    def _read(self) -> dict:
        before = self.stats.stat().st_mtime_ns
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while self.stats.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.02)
        return json.loads(self.stats.read_text())

    def active(self) -> int:
        return self._read()["active"]

    def snapshot(self) -> dict:
        return self._read()

    def window(self, before: dict, after: dict) -> dict:
        bounds = [b / 1000.0 for b in after["gap_bounds_ms"]] + [float("inf")]
        gaps = [(b, a - p) for b, a, p in zip(bounds, after["gap_counts"], before["gap_counts"])]
        return {
            "server_gap_p99_ms": bucket_quantile(gaps, 0.99),
            "server_gaps_over_60ms": above(gaps, 60.0),
            "server_gaps": int(sum(n for _, n in gaps)),
            "late_ticks": None,
            "skipped_frames": None,
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def measure(
    target, legs: int, window_s: float, client_cpu: int, server_cpu: int, nice: int = 0
) -> dict:
    ramp = max(1.0, legs / 200.0)
    hold = ramp + window_s + 8.0
    ports = ",".join(str(p) for p in target.ports)
    client = run_client(
        [
            "127.0.0.1:{}".format(target.ports[0]),
            "--ports",
            ports,
            "--calls",
            str(legs),
            "--ramp",
            str(ramp),
            "--seconds",
            str(hold),
        ],
        cpu=client_cpu,
        nice=nice,
    )
    started = time.monotonic()
    while target.active() < legs:
        if client.poll() is not None or time.monotonic() - started > ramp + 5.0:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # let the last connections settle
    before, cpu0, t0 = target.snapshot(), cpu_seconds(target.pid), time.monotonic()
    busy0, wall0 = cpu_busy(server_cpu), time.time()
    time.sleep(window_s)
    after, cpu1, t1 = target.snapshot(), cpu_seconds(target.pid), time.monotonic()
    busy1, wall1 = cpu_busy(server_cpu), time.time()
    load = Path("/proc/loadavg").read_text().split()[0]
    rss = rss_kb(target.pid)
    active = target.active()
    result = client_result(client, timeout=hold + 60)
    totals = result["aggregate"]
    late_at = (totals.get("client") or {}).get("late_at", [])
    window_late = sum(wall0 <= t <= wall1 for t in late_at)
    server_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
    cpu_pct_total = 100.0 * (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])
    row = {
        "server": target.name,
        "legs": legs,
        "active": active,
        "cpu_pct": server_pct,
        "cpu_others_pct": max(0.0, cpu_pct_total - server_pct),
        "loadavg": float(load),
        "rss_mb": rss / 1024.0,
        "kb_per_leg": (rss - target.idle_rss) / legs,
        "client_gap_p99_ms": totals["gap_p99_ms"],
        "client_gap_max_ms": totals["gap_max_ms"],
        "frames_owed": totals["frames_owed"],
        "errors": totals["errors"],
        "client_valid": window_late == 0,
        "client_late_ticks": window_late,
        "client_late_ticks_run": (totals.get("client") or {}).get("late_ticks"),
    }
    row.update(target.window(before, after))
    time.sleep(1.0)
    return row


COLUMNS = [
    ("server", "server"),
    ("legs", "legs"),
    ("active", "held"),
    ("cpu_pct", "CPU %"),
    ("cpu_others_pct", "others on its CPU %"),
    ("rss_mb", "RSS MB"),
    ("kb_per_leg", "KB/leg"),
    ("server_gap_p99_ms", "server gap p99 ms (bucket)"),
    ("server_gaps_over_60ms", "gaps > 60 ms"),
    ("late_ticks", "late ticks"),
    ("client_gap_p99_ms", "client gap p99 ms"),
    ("client_gap_max_ms", "client gap max ms"),
    ("frames_owed", "frames owed"),
    ("client_late_ticks", "client late ticks"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Concurrent legs per core, vs the asyncio baseline."
    )
    parser.add_argument("--legs", default="100,250,500,750,1000", help="comma-separated N")
    parser.add_argument("--window", type=float, default=6.0, help="steady window, seconds")
    parser.add_argument("--extensions", type=int, default=10)
    parser.add_argument(
        "--stt",
        default="none",
        help="speech.stt of the server (none: keypad only; whisper: against a local fake "
        "Whisper server the benchmark starts)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--only-baseline", action="store_true")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run server and generator at this priority (e.g. -5 on a shared machine, as root)",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.legs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-legs-") as tmp:
        tmp = Path(tmp)
        makers = []
        if not args.only_baseline:
            makers.append(lambda: Ours(tmp, args.extensions, args.server_cpu, args.stt, args.nice))
        if not args.no_baseline:
            makers.append(lambda: Baseline(tmp, args.extensions, args.server_cpu, args.nice))
        # Both servers up at once (an idle one costs next to nothing) and measured in turn
        # for each N, so that both see the same machine: on a shared one, what else runs
        # changes from minute to minute.
        targets = []
        try:
            for make in makers:
                targets.append(make())
            for n in counts:
                for target in targets:
                    row = measure(
                        target, n, args.window, args.client_cpu, args.server_cpu, args.nice
                    )
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for target in targets:
                target.stop()
        rows.sort(key=lambda r: (r["server"] != Ours.name, r["legs"]))
    print("machine: " + machine())
    print(
        "window: {} s per N; server on CPU {}, generator on CPU {}, nice {}".format(
            args.window, args.server_cpu, args.client_cpu, args.nice
        )
    )
    print()
    print(table(rows, COLUMNS))
    write_json(args.json, {"machine": machine(), "window_s": args.window, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
