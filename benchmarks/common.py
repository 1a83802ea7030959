"""
What the benchmarks share: free ports, a generated config, the server as a pinned
subprocess, readings from /proc, a /metrics scrape, and the table they print.

The benchmarks are scripts, not tests, and not reactor code: they orchestrate processes
from the outside with blocking calls (urllib, subprocess), which is the point — the
server and the load generator each run alone on their own core.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_ports(n: int) -> list[int]:
    """Ports free right now (bound to 0 and released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, *, extensions: int, api_port: int, **sections) -> dict:
    """
    A config with C{extensions} extensions (AI and return port each, on 127.0.0.1),
    embedded Redis in a state_dir beside it, and C{sections} overriding any table.

    @return: C{{"ai_ports": [...], "return_ports": [...]}}.
    """
    ports = free_ports(2 * extensions)
    ai_ports, return_ports = ports[0::2], ports[1::2]
    data = {
        "server": {
            "bind": "127.0.0.1",
            "max_calls": 100000,
            "state_dir": str(path.parent / "var"),
        },
        "api": {"endpoint": "tcp:{}:interface=127.0.0.1".format(api_port)},
        "redis": {"url": ""},
        "flow": {"max_call_s": 600, "max_retries": 10, "dtmf_timeout_s": 3.0},
        # The load generator is one peer carrying every call, like Asterisk.
        "limits": {
            "max_connections_per_peer": 1000000,
            "max_connections_per_port": 1000000,
            "max_handshakes_per_port": 1000000,
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines = []
    for name, values in data.items():
        lines.append("[{}]".format(name))
        lines += [
            "{} = {}".format(k, _toml(v)) for k, v in values.items() if not isinstance(v, dict)
        ]
        for sub, table in values.items():
            if isinstance(table, dict):
                lines.append("[{}.{}]".format(name, sub))
                lines += ["{} = {}".format(k, _toml(v)) for k, v in table.items()]
    lines += [
        "[[condominiums]]",
        "id = 1",
        'name = "Condomínio Apoena"',
        'greeting = "Condomínio Apoena, em que posso ajudar?"',
        "directory = {}".format(_toml(ETC / "apartments.json")),
    ]
    for i, (ai, ret) in enumerate(zip(ai_ports, return_ports), start=1):
        lines += [
            "[[extensions]]",
            "id = {}".format(i),
            'ai_extension = "{}"'.format(1000 + 2 * i),
            "ai_port = {}".format(ai),
            'return_extension = "{}"'.format(1001 + 2 * i),
            "return_port = {}".format(ret),
            'host = "127.0.0.1"',
            "condominium_id = 1",
        ]
    path.write_text("\n".join(lines) + "\n")
    return {"ai_ports": ai_ports, "return_ports": return_ports}


def http(url: str, method: str = "GET", body=None, timeout: float = 10.0):
    """(status, parsed JSON or text) of one request."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, kind = (
                response.status,
                response.read(),
                response.headers.get("Content-Type", ""),
            )
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    text = raw.decode("utf-8", "replace")
    return status, (json.loads(text) if "json" in kind else text)


class Server:
    """The real server (C{twistd -n audiosocket}) as a subprocess pinned to C{cpu}."""

    def __init__(
        self,
        config: Path,
        api_port: int,
        cpu: int | None = 0,
        log: Path | None = None,
        nice: int = 0,
    ):
        self.config = config
        self.api = "http://127.0.0.1:{}".format(api_port)
        self.log = log or config.with_suffix(".log")
        argv = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "-l",
            str(self.log),
            "audiosocket",
            "--config",
            str(config),
        ]
        argv = pinned(argv, cpu, nice)
        self.proc = subprocess.Popen(
            argv, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "server exited ({}); see {}".format(self.proc.returncode, self.log)
                )
            try:
                if http(self.api + "/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready after {} s; see {}".format(timeout, self.log))

    def status(self) -> dict:
        return http(self.api + "/api/status")[1]

    def metrics(self) -> dict:
        return parse_metrics(http(self.api + "/metrics")[1])

    def active(self) -> int:
        return self.status()["sessions"]["active"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FakeWhisper:
    """
    A local OpenAI-compatible transcription endpoint (C{POST {url}/audio/transcriptions}) in
    a thread of the benchmark's own process, so a server configured with
    C{speech.stt = "whisper"} can run without a provider: it reads the upload and answers
    C{{"text": <text>}}. It counts the requests; it recognises nothing.
    """

    def __init__(self, text: str = "sim"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.requests = 0
        body = json.dumps({"text": text}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = "http://127.0.0.1:{}/v1".format(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def speech_sections(stt: str) -> tuple[dict, "FakeWhisper | None"]:
    """
    The config sections for C{speech.stt = stt} (C{"none"}: keypad only) and, for
    C{"whisper"}, the L{FakeWhisper} started for it (stop it after the run).
    """
    if stt == "none":
        return {}, None
    if stt == "whisper":
        fake = FakeWhisper()
        return {"speech": {"stt": "whisper", "whisper": {"url": fake.url}}}, fake
    return {"speech": {"stt": stt}}, None


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid} so far (its threads included)."""
    fields = Path("/proc/{}/stat".format(pid)).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy(cpu: int) -> tuple[float, float]:
    """(busy, total) jiffies of one CPU so far, from /proc/stat (steal counts as busy)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu{} ".format(cpu)):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + v[4]
            return (sum(v[:8]) - idle) / CLK_TCK, sum(v[:8]) / CLK_TCK
    raise ValueError("no cpu{} in /proc/stat".format(cpu))


def rss_kb(pid: int) -> int:
    for line in Path("/proc/{}/status".format(pid)).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def parse_metrics(text: str) -> dict:
    """C{{sample name: {labels tuple: value}}} through prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def histogram_delta(before: dict, after: dict, name: str) -> list[tuple[float, float]]:
    """Per-bucket (upper bound in s, count) of C{name} observed between two scrapes."""
    b, a = before.get(name + "_bucket", {}), after.get(name + "_bucket", {})
    cumulative = []
    for labels, value in a.items():
        le = dict(labels)["le"]
        cumulative.append((float("inf") if le == "+Inf" else float(le), value - b.get(labels, 0.0)))
    cumulative.sort()
    out, prev = [], 0.0
    for bound, value in cumulative:
        out.append((bound, value - prev))
        prev = value
    return out


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile C{q}; inf for the open bucket."""
    total = sum(n for _, n in buckets)
    if not total:
        return None
    seen = 0.0
    for bound, n in buckets:
        seen += n
        if seen >= q * total and n:
            return bound * 1000.0
    return buckets[-1][0] * 1000.0


def above(buckets: list[tuple[float, float]], ms: float) -> int:
    """Observations in buckets whose lower bound is at least C{ms}."""
    count, lower = 0, 0.0
    for bound, n in buckets:
        if lower >= ms / 1000.0:
            count += n
        lower = bound
    return int(count)


def pinned(argv: list[str], cpu: int | None, nice: int = 0) -> list[str]:
    """C{argv} run on CPU C{cpu} only, at scheduling priority C{nice} (negative: favoured)."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    if nice:
        argv = ["nice", "-n", str(nice)] + argv
    return argv


def run_client(args: list[str], cpu: int | None = 1, nice: int = 0) -> subprocess.Popen:
    """C{audiosocket-call} (the load mode) as a subprocess pinned to C{cpu}, JSON out."""
    argv = pinned([PYTHON, "-m", "audiosocket.calltool"] + args + ["--json"], cpu, nice)
    return subprocess.Popen(argv, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def client_result(proc: subprocess.Popen, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    try:
        return json.loads(out)
    except ValueError:
        raise RuntimeError("load generator failed: {}".format(err.decode()[-2000:])) from None


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of C{rows} with C{(key, heading)} columns."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if v == float("inf") else "{:.1f}".format(v)
        return str(v)

    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return "{} × {}, Python {}, {}".format(
        os.cpu_count(),
        model,
        sys.version.split()[0],
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
