"""
Tests for the twistd plugin options (L{audiosocket.tap}) and the config reload on SIGHUP
(L{audiosocket.service.DoormanService.reload}).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from audiosocket.store import MemoryStore
from audiosocket.service import makeService
from audiosocket.tap import Options

ETC = Path(__file__).resolve().parent.parent / "etc"


@pytest.fixture
def etc(tmp_path):
    """A copy of the shipped etc/ to edit."""
    shutil.copy(ETC / "audiosocket.toml", tmp_path / "audiosocket.toml")
    shutil.copy(ETC / "apartments.json", tmp_path / "apartments.json")
    return tmp_path


def test_shipped_config_parses():
    """--config etc/audiosocket.toml loads as it is."""
    options = Options()
    options.parseOptions(["--config", str(ETC / "audiosocket.toml")])
    assert options["loaded"].extensions[0].ai_port == 8080


def test_bad_config_is_a_usage_error_naming_file_and_key(etc):
    """A wrong value stops the options with one line naming the file and the key."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace("max_calls = 100", 'max_calls = "abc"'))
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--config", str(path)])
    assert str(path) in str(e.value)
    assert "server.max_calls" in str(e.value)
    assert "\n" not in str(e.value)


def test_token_in_config_file_is_a_usage_error(etc):
    """An [api] token in the file stops the options, pointing to token_env, not echoing it."""
    path = etc / "audiosocket.toml"
    text = path.read_text()
    assert 'token_env = ""' in text
    path.write_text(text.replace('token_env = ""', 'token = "s3cret-value"'))
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--config", str(path)])
    assert "api.token:" in str(e.value) and "api.token_env" in str(e.value)
    assert "s3cret-value" not in str(e.value)


def test_no_option_takes_a_token():
    """twistd audiosocket has no --token: a secret on a command line shows in process lists."""
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--config", str(ETC / "audiosocket.toml"), "--token", "x"])


def test_twistd_exits_nonzero_on_bad_config(etc):
    """`twistd -n audiosocket` with a broken file exits non-zero and says which key."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text() + "\n[server2]\nx = 1\n")
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "audiosocket", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(etc),
    )
    assert result.returncode != 0
    assert "server2" in result.stderr + result.stdout


def test_check_flag_validates_and_exits_zero(etc):
    """--check validates the file and exits 0 without starting anything."""
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "audiosocket", "--check", "--config", str(etc / "audiosocket.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(etc),
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _service(etc):
    options = Options()
    options.parseOptions(["--config", str(etc / "audiosocket.toml")])
    return makeService(options["loaded"], store=MemoryStore())


def test_reload_applies_new_greeting_and_directory(etc):
    """SIGHUP's reload: a changed greeting and directory apply to the next call."""
    svc = _service(etc)
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace(
        'greeting = "Condomínio Apoena, em que posso ajudar?"', 'greeting = "Bom dia, Apoena."'
    ))
    (etc / "apartments.json").write_text(
        '[{"apartment_number": "901", "residents": ["Zé"], "voip_number": "SIP/1901"}]'
    )
    assert svc.reload().result is True
    site = svc.site(1)
    assert site.greeting == "Bom dia, Apoena."
    assert site.directory.apartment("901") is not None
    assert site.directory.apartment("101") is None


def test_invalid_reload_changes_nothing(etc):
    """An invalid file (here a broken directory) is refused whole; the old settings stay."""
    svc = _service(etc)
    before = svc.site(1)
    (etc / "apartments.json").write_text("[{")
    assert svc.reload().result is False
    assert svc.site(1) is before


def test_reload_refuses_to_drop_a_condominium_in_use(etc):
    """A new file without the condominium an extension belongs to is refused."""
    svc = _service(etc)
    before = svc.site(1)
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace("id = 1\nname", "id = 2\nname").replace("condominium_id = 1", "condominium_id = 2"))
    svc.manager.extensions[1] = type("S", (), {"extension": svc.config.extensions[0]})()
    assert svc.reload().result is False
    assert svc.site(1) is before


def test_json_lines_logger_writes_one_json_event_per_line(tmp_path, monkeypatch):
    """--logger audiosocket.logs.json_lines: each event is a JSON object with its fields."""
    import json

    from twisted.logger import Logger

    from audiosocket.logs import json_lines

    target = tmp_path / "events.json"
    monkeypatch.setenv("AUDIOSOCKET_JSON_LOG", str(target))
    observer = json_lines()
    Logger(namespace="audiosocket.test", observer=observer).info(
        "call {uuid} ended: {outcome}", uuid="u-1", outcome="authorized"
    )
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines[0]["uuid"] == "u-1" and lines[0]["outcome"] == "authorized"
