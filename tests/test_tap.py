"""
Tests for the twistd plugin options (L{audiosocket.tap}) and the config reload on SIGHUP
(L{audiosocket.service.DoormanService.reload}).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.python import usage

from audiosocket.store import MemoryStore
from audiosocket.service import makeService
from audiosocket.tap import Options

ETC = Path(__file__).resolve().parent.parent / "etc"


def test_shipped_config_parses():
    """--config etc/audiosocket.toml loads as it is."""
    options = Options()
    options.parseOptions(["--config", str(ETC / "audiosocket.toml")])
    assert options["loaded"].extensions[0].ai_port == 8080


def test_bad_config_exits_with_one_line_naming_file_and_key(etc):
    """A wrong value stops the options with one line naming the file and the key."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace("max_calls = 100", 'max_calls = "abc"'))
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(["--config", str(path)])
    assert str(path) in str(e.value.code)
    assert "server.max_calls" in str(e.value.code)
    assert "\n" not in str(e.value.code)


def test_token_in_config_file_is_refused(etc):
    """An [api] token in the file stops the options, pointing to token_env, not echoing it."""
    path = etc / "audiosocket.toml"
    text = path.read_text()
    assert 'token_env = ""' in text
    path.write_text(text.replace('token_env = ""', 'token = "s3cret-value"'))
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(["--config", str(path)])
    assert "api.token:" in str(e.value.code) and "api.token_env" in str(e.value.code)
    assert "s3cret-value" not in str(e.value.code)


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


def _twistd(etc, *args, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "audiosocket", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(etc),
        env={**os.environ, **(env or {})},
    )


def test_config_error_is_one_line_without_the_usage_text(etc):
    """A config mistake prints one line naming the file and the key, not twistd's usage block."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace("max_calls = 100", 'max_calls = "abc"'))
    result = _twistd(etc, "--check", "--config", str(path))
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "server.max_calls" in lines[0] and str(path) in lines[0]


def test_check_fails_on_an_unset_required_secret(etc):
    """--check with the API off loopback and its token variable unset exits 1 naming it."""
    path = etc / "audiosocket.toml"
    text = path.read_text()
    text = text.replace('endpoint = "tcp:8082:interface=127.0.0.1"', 'endpoint = "tcp:8082:interface=0.0.0.0"')
    path.write_text(text.replace('token_env = ""', 'token_env = "AUDIOSOCKET_TEST_UNSET_TOKEN"'))
    result = _twistd(etc, "--check", "--config", str(path), env={"AUDIOSOCKET_TEST_UNSET_TOKEN": ""})
    assert result.returncode == 1
    assert "api.token_env" in result.stderr and "AUDIOSOCKET_TEST_UNSET_TOKEN" in result.stderr
    assert "ok" not in result.stdout


def test_check_fails_on_an_unset_ami_secret(etc):
    """--check with dialer.kind = "ami" and AMI_SECRET unset exits 1 naming the variable."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace('kind = "log"', 'kind = "ami"'))
    result = _twistd(etc, "--check", "--config", str(path), env={"AMI_SECRET": ""})
    assert result.returncode == 1
    assert "dialer.ami.secret_env" in result.stderr and "AMI_SECRET" in result.stderr


def test_check_warns_on_an_unset_optional_secret(etc):
    """An unset token variable on a loopback API is a warning: --check says so and exits 0."""
    path = etc / "audiosocket.toml"
    path.write_text(path.read_text().replace('token_env = ""', 'token_env = "AUDIOSOCKET_TEST_UNSET_TOKEN"'))
    result = _twistd(etc, "--check", "--config", str(path), env={"AUDIOSOCKET_TEST_UNSET_TOKEN": ""})
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "AUDIOSOCKET_TEST_UNSET_TOKEN" in result.stderr
    assert "ok" in result.stdout


@pytest_twisted.ensureDeferred
async def test_start_up_says_when_file_extensions_differ_from_the_store(tmp_path):
    """
    [[extensions]] only seed an empty store: when the file says something else for an
    extension (here another port), start-up logs which ones differ and that the store is used.
    """
    import attrs
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    from test_service import config_for, free_ports, stopped

    ai, ret, other = free_ports(3)
    config = config_for("/unused.sock", tmp_path, ai, ret)
    store = MemoryStore()
    store.hub.seeded = True  # started before, then the file was edited
    store.save_extension(attrs.evolve(config.extensions[0], ai_port=other))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        from audiosocket.service import makeService as make

        svc = make(config, reactor=reactor, store=store)
        svc.startService()
        await svc.ready.addTimeout(20, reactor)
        await stopped(svc)
    finally:
        globalLogPublisher.removeObserver(events.append)
    drift = [e for e in events if "differ from the store" in e.get("log_format", "")]
    assert len(drift) == 1 and drift[0]["ids"] == "1"


def test_unset_secrets_lists_only_the_secrets_in_use(tmp_path, monkeypatch):
    """
    Config.unset_secrets names the variables of the providers in use only: the Azure key is
    required when Azure speaks, the OpenAI key (speech.tts = "openai") a warning, and a Redis
    password of an embedded Redis (never used) is not listed.
    """
    from test_service import config_for

    monkeypatch.delenv("AZURE_SPEECH_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AUDIOSOCKET_TEST_REDIS_PW", raising=False)
    azure = config_for("/r.sock", tmp_path, 1, 2, speech={"tts": "azure", "azure": {"region": "brazilsouth"}})
    assert [(u.key, u.required) for u in azure.unset_secrets()] == [("speech.azure.key_env", True)]
    openai = config_for("/r.sock", tmp_path, 1, 2, speech={"tts": "openai"})
    assert [(u.key, u.variable, u.required) for u in openai.unset_secrets()] == [
        ("speech.openai.api_key_env", "OPENAI_API_KEY", False)
    ]
    embedded = config_for("/r.sock", tmp_path, 1, 2, redis={"url": "", "password_env": "AUDIOSOCKET_TEST_REDIS_PW"})
    assert embedded.unset_secrets() == []
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert openai.unset_secrets() == []
