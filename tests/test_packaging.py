"""
The packaging files hold: the systemd unit passes C{systemd-analyze verify} and its command
lines are ones twistd and our plugin accept (the pre-start check passes on the shipped
config); the logrotate file passes C{logrotate --debug}; the container's entry point is the
same command.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.scripts._twistd_unix import ServerOptions

from audiosocket.logs import json_lines

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "systemd" / "audiosocket.service"
LOGROTATE = ROOT / "etc" / "logrotate.d" / "audiosocket"
CONTAINERFILE = ROOT / "etc" / "container" / "Containerfile"
VENV_BIN = Path(sys.executable).parent


def unit_value(key: str) -> str:
    (line,) = [l for l in UNIT.read_text().splitlines() if l.startswith(key + "=")]
    return line.split("=", 1)[1]


def local(command: str) -> list[str]:
    """A unit command line with this checkout and its venv in place of /opt/audiosocket."""
    args = shlex.split(command)
    args[0] = str(VENV_BIN / Path(args[0]).name)
    return [a.replace("/etc/audiosocket/", str(ROOT / "etc") + "/") for a in args]


def parsed(args: list[str]) -> ServerOptions:
    """twistd's own parsing of C{args} (after the program name), with our plugin's options."""
    options = ServerOptions()
    options.parseOptions(args)
    return options


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path):
    """systemd-analyze verify finds nothing to say (the paths made local, as it checks them)."""
    text = UNIT.read_text().replace("/opt/audiosocket/.venv/bin", str(VENV_BIN))
    text = text.replace("User=audiosocket", "User=root").replace("Group=audiosocket", "Group=root")
    unit = tmp_path / "audiosocket.service"
    unit.write_text(text)
    run = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [l for l in (run.stdout + run.stderr).splitlines() if "audiosocket.service" in l]
    assert run.returncode == 0 and problems == [], run.stdout + run.stderr


def test_unit_start_is_a_foreground_twistd_without_pidfile_with_json_logs():
    """ExecStart: twistd -n, no pidfile, the JSON-lines logger, our plugin with the config."""
    options = parsed(local(unit_value("ExecStart"))[1:])
    assert options["nodaemon"] and options["pidfile"] == ""
    assert options["logger"] is json_lines
    assert options.subCommand == "audiosocket"
    assert options.subOptions["config"] == str(ROOT / "etc" / "audiosocket.toml")
    # The state (embedded Redis, lock) goes where the unit may write, not under /etc.
    assert options.subOptions["state-dir"] == "/var/lib/audiosocket"
    assert str(options.subOptions["loaded"].server.state_dir) == "/var/lib/audiosocket"
    assert unit_value("StateDirectory") == "audiosocket"
    assert unit_value("Restart") == "on-failure" and unit_value("KillSignal") == "SIGTERM"
    assert unit_value("User") == "audiosocket" and unit_value("NoNewPrivileges") == "yes"


def test_unit_pre_start_check_passes_on_the_shipped_config():
    """ExecStartPre (twistd audiosocket --check) exits 0 on etc/audiosocket.toml."""
    run = subprocess.run(
        local(unit_value("ExecStartPre")), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(not shutil.which("logrotate"), reason="logrotate is not installed")
def test_logrotate_config_is_valid(tmp_path):
    """logrotate --debug reads the file without an error (it rotates nothing in debug mode)."""
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "audiosocket.json").write_text(json.dumps({"message": "x"}) + "\n")
    text = LOGROTATE.read_text().replace("/var/log/audiosocket", str(logs))
    text = re.sub(r"\n\s*su .*", "", text)
    text = re.sub(r"\n\s*create .*", "", text)
    config = tmp_path / "audiosocket"
    config.write_text(text)
    run = subprocess.run(
        ["logrotate", "--debug", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True, text=True, timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "error" not in output.lower(), output
    assert "copytruncate" in LOGROTATE.read_text()


def test_container_runs_the_same_command():
    """The Containerfile's ENTRYPOINT + CMD is the unit's ExecStart (bar the config path)."""
    text = CONTAINERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry + cmd == shlex.split(unit_value("ExecStart"))
    assert "USER audiosocket" in text and "STOPSIGNAL SIGTERM" in text
