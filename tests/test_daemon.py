"""
The real `twistd audiosocket` process: in the foreground it reloads its config on SIGHUP
(twistd installs no SIGHUP handler of its own; without ours SIGHUP would kill it) and stops
cleanly on SIGTERM; without -n it daemonizes with a pidfile and a logfile.

These start a subprocess and wait for it (bounded polls on its log): integration, not unit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from test_service import free_ports

ETC = Path(__file__).resolve().parent.parent / "etc"
# twistd itself (python -m twisted is `twist`, which never daemonizes).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write_config(tmp_path: Path, greeting: str) -> tuple[Path, int]:
    ai, ret, api = free_ports(3)
    shutil.copy(ETC / "apartments.json", tmp_path / "apartments.json")
    path = tmp_path / "audiosocket.toml"
    path.write_text(
        f"""
[server]
bind = "127.0.0.1"
state_dir = "var"

[api]
endpoint = "tcp:{api}:interface=127.0.0.1"

[[condominiums]]
id = 1
name = "Condomínio Apoena"
greeting = "{greeting}"
directory = "apartments.json"

[[extensions]]
id = 1
ai_extension = "1001"
ai_port = {ai}
return_extension = "1002"
return_port = {ret}
host = "127.0.0.1"
condominium_id = 1
"""
    )
    return path, api


def wait_for_text(path: Path, text: str, seconds: float = 30.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError("{!r} not in {} after {} s:\n{}".format(text, path, seconds, content[-3000:]))


def get(api: int, route: str) -> dict:
    with urllib.request.urlopen("http://127.0.0.1:{}{}".format(api, route), timeout=5) as r:
        return json.loads(r.read())


def test_sighup_reloads_and_sigterm_stops(tmp_path):
    """SIGHUP applies a new config without stopping the server; SIGTERM shuts it down cleanly."""
    path, api = write_config(tmp_path, "Bom dia.")
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            TWISTD + ["-n", "audiosocket", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path),
        )
    try:
        wait_for_text(log, "ready:")
        path.write_text(path.read_text().replace("Bom dia.", "Boa noite."))
        process.send_signal(signal.SIGHUP)
        wait_for_text(log, "reloaded")
        assert process.poll() is None
        assert get(api, "/healthz") == {"status": "ok"}
        # An invalid file is refused whole and the server goes on.
        path.write_text(path.read_text().replace('name = "Condomínio Apoena"', "name = 3"))
        process.send_signal(signal.SIGHUP)
        wait_for_text(log, "aborted without making any changes")
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    # twistd ends by re-raising the signal that stopped it, so the status says "SIGTERM".
    assert code == -signal.SIGTERM
    content = log.read_text()
    assert "Traceback" not in content
    assert "embedded redis-server stopped" in content
    assert content.rstrip().endswith("Server Shut Down.")


def test_daemon_mode_writes_pidfile_and_logfile(tmp_path):
    """Without -n, twistd daemonizes: a pidfile, a logfile, the API answering; SIGTERM ends it."""
    path, api = write_config(tmp_path, "Bom dia.")
    pidfile = tmp_path / "audiosocket.pid"
    logfile = tmp_path / "audiosocket.log"
    subprocess.run(
        [
            *TWISTD,
            "--pidfile", str(pidfile), "--logfile", str(logfile),
            "audiosocket", "--config", str(path),
        ],
        check=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    wait_for_text(logfile, "ready:")
    pid = int(pidfile.read_text())
    try:
        assert get(api, "/api/status")["sessions"]["active"] == 0
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not pidfile.exists()
