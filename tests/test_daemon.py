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


def start_twistd(tmp_path: Path, config: Path, log: Path, *options: str) -> subprocess.Popen:
    """C{twistd -n [options] audiosocket --config config} in C{tmp_path}, its output into
    C{log}."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            TWISTD + ["-n", *options, "audiosocket", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path),
        )


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
    process = start_twistd(tmp_path, path, log)
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


def _twistd(tmp_path, *args, timeout=60):
    return subprocess.run(
        [*TWISTD, *args], capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path)
    )


def _lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def test_busy_api_port_exits_nonzero_with_one_line(tmp_path):
    """
    In the foreground, a busy API port ends twistd with status 1 and one line naming the
    endpoint and the reason (not a traceback and status 0); the embedded Redis is not started.
    """
    import socket

    path, api = write_config(tmp_path, "Bom dia.")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", api))
    squatter.listen(1)
    try:
        result = _twistd(tmp_path, "-n", "audiosocket", "--config", str(path))
    finally:
        squatter.close()
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert "API endpoint tcp:{}".format(api) in errors[0] and "in use" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "redis-server" not in result.stdout


def test_busy_api_port_in_daemon_mode_exits_nonzero(tmp_path):
    """Daemonizing, a busy API port makes twistd itself exit 1 with the reason, no pidfile left."""
    import socket

    path, api = write_config(tmp_path, "Bom dia.")
    pidfile = tmp_path / "audiosocket.pid"
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", api))
    squatter.listen(1)
    try:
        result = _twistd(
            tmp_path,
            "--pidfile", str(pidfile), "--logfile", str(tmp_path / "audiosocket.log"),
            "audiosocket", "--config", str(path),
        )
    finally:
        squatter.close()
    assert result.returncode == 1
    assert "API endpoint" in result.stderr
    assert not pidfile.exists()


def test_second_server_on_same_state_dir_refuses_and_first_keeps_its_redis(tmp_path):
    """
    A second server on the same state_dir exits 1 with one line naming the directory, and
    the first one's embedded Redis goes on (its API still reads the store).
    """
    path, api = write_config(tmp_path, "Bom dia.")
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second_path, _ = write_config(second_dir, "Bom dia.")
    second_path.write_text(
        second_path.read_text().replace('state_dir = "var"', 'state_dir = "{}"'.format(tmp_path / "var"))
    )
    log = tmp_path / "out.log"
    first = start_twistd(tmp_path, path, log, "--pidfile", "")
    try:
        wait_for_text(log, "ready:")
        result = _twistd(
            second_dir, "-n", "--pidfile", "", "audiosocket", "--config", str(second_path), timeout=30
        )
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1, result.stderr
        assert "state_dir {} is in use".format(tmp_path / "var") in errors[0]
        assert str(first.pid) in errors[0]
        assert (tmp_path / "var" / "redis" / "redis.sock").exists()
        assert get(api, "/api/calls") == {"calls": []}  # read from the first one's Redis
        assert get(api, "/healthz") == {"status": "ok"}
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)


def test_state_dir_that_cannot_be_made_exits_with_one_line(tmp_path):
    """
    --state-dir (what a packaged install uses instead of the config's state_dir) naming a
    place that cannot be a directory: exit 1 with one line saying so, not a traceback.
    """
    path, _ = write_config(tmp_path, "Bom dia.")
    (tmp_path / "afile").write_text("")
    result = _twistd(
        tmp_path, "-n", "--pidfile", "", "audiosocket", "--config", str(path),
        "--state-dir", str(tmp_path / "afile" / "var"), timeout=30,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [
        "audiosocket: state_dir {} cannot be used: Not a directory (set [server] state_dir or "
        "--state-dir to a directory this user may write)".format(tmp_path / "afile" / "var")
    ], result.stderr


def test_failure_after_the_reactor_runs_exits_nonzero_with_one_line(tmp_path):
    """
    A start-up failure once the reactor runs (here the embedded redis-server cannot open its
    log file, so it never answers) is logged as one line, stops the server, and twistd exits 1.
    """
    path, _ = write_config(tmp_path, "Bom dia.")
    (tmp_path / "var" / "redis" / "redis.log").mkdir(parents=True)
    result = _twistd(tmp_path, "-n", "--pidfile", "", "audiosocket", "--config", str(path))
    assert result.returncode == 1, result.stdout[-2000:]
    failed = [line for line in result.stdout.splitlines() if "failed to start" in line]
    assert len(failed) == 1 and "did not accept connections" in failed[0]
    assert "Traceback" not in result.stdout


#: The README's "A whole call without a PBX" recipe, on this test's ports: the record is read
#: once it is there (the call's record is written when both legs have ended: the resident
#: still hears the goodbye after the visitor's audiosocket-call has returned).
RECIPE = """
set -e
sed 's|^kind = "log"|kind = "http"|; s|^url = "" *#.*|url = "http://127.0.0.1:{pbx}/"|' audiosocket.toml > http.toml
{bin}/twistd -n --pidfile "" audiosocket --config http.toml > server.log 2>&1 &
server=$!
trap 'kill $server $pbx_pid 2>/dev/null; wait $server || true' EXIT
{bin}/audiosocket-fake-pbx --listen {pbx} --dtmf 8:1 --dtmf 12:1 --dtmf 16:1 --dtmf 20:1 > pbx.log 2>&1 &
pbx_pid=$!
until grep -q "ready:" server.log; do sleep 0.2; done
{bin}/audiosocket-call 127.0.0.1:{ai} --dtmf 1:101# --seconds 40 > call.log
for i in $(seq 20); do curl -s 'localhost:{api}/api/calls?limit=1' | grep -q '"outcome"' && break; sleep 0.5; done
curl -s 'localhost:{api}/api/calls?limit=1'
"""


def test_readme_whole_call_recipe_prints_the_record(tmp_path):
    """
    The README's whole-call recipe (http dialer → fake PBX pressing 1, visitor typing 101#),
    run as a shell script, prints the call's record: authorized, apartment 101, Ana Souza.
    """
    ai, ret, api, pbx = free_ports(4)
    shutil.copy(ETC / "apartments.json", tmp_path / "apartments.json")
    text = (ETC / "audiosocket.toml").read_text()
    text = text.replace("8080", str(ai)).replace("8081", str(ret)).replace("8082", str(api))
    (tmp_path / "audiosocket.toml").write_text(text)
    script = RECIPE.format(bin=Path(sys.executable).parent, ai=ai, api=api, pbx=pbx)
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr + (tmp_path / "server.log").read_text()[-3000:]
    (record,) = json.loads(result.stdout)["calls"]
    assert record["outcome"] == "authorized"
    assert record["facts"]["apartment"] == "101"
    assert record["facts"]["resident"] == "Ana Souza"
