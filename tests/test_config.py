"""
Tests for L{audiosocket.config}: the shipped files, defaults, and one error per kind of mistake,
each naming the file and the exact dotted key.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path

import pytest

from audiosocket.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from audiosocket.model import Extension

ETC = Path(__file__).resolve().parent.parent / "etc"

CONDOMINIUM = """
[[condominiums]]
id = 1
name = "Condomínio Teste"
directory = "apartments.json"
"""


def extension(**fields) -> str:
    """An [[extensions]] table: extension 1 on 8080/8081, with C{fields} changed or removed."""
    values = dict(
        id=1,
        ai_extension="1001",
        ai_port=8080,
        return_extension="1002",
        return_port=8081,
        host="127.0.0.1",
        condominium_id=1,
    )
    values.update(fields)
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "[[extensions]]\n" + "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str) -> Path:
    """
    Write a config file (and an empty apartments.json beside it). C{text} is put before a
    minimal condominium unless it sets condominiums itself.
    """
    (tmp_path / "apartments.json").write_text("[]")
    if not re.search(r"^\[*condominiums\b", text, re.M):
        text += CONDOMINIUM
    path = tmp_path / "audiosocket.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str = "") -> Config:
    return load_config(write(tmp_path, text))


def error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --- the shipped files ----------------------------------------------------------------------


def test_shipped_config_loads():
    """
    etc/audiosocket.toml runs as is: one condominium with its directory beside the file, one
    extension on 8080/8081, API on loopback 8082, embedded Redis, espeak, DTMF only, log dialer.
    """
    config = load_config(ETC / "audiosocket.toml")
    (condominium,) = config.condominiums
    assert condominium.name == "Condomínio Apoena"
    assert condominium.greeting == "Condomínio Apoena, em que posso ajudar?"
    assert condominium.directory == ETC / "apartments.json"
    assert config.extensions == (
        Extension(
            id=1,
            ai_extension="1001",
            ai_port=8080,
            return_extension="1002",
            return_port=8081,
            host="127.0.0.1",
            condominium_id=1,
        ),
    )
    assert config.api.endpoint == "tcp:8082:interface=127.0.0.1"
    assert config.api.is_loopback and not config.api.requires_token
    assert config.redis.embedded
    assert (config.speech.tts, config.speech.stt, config.speech.nlu) == ("espeak", "none", "rules")
    assert config.dialer.kind == "log"
    assert config.server.state_dir == ETC / "var"
    # The AudioSocket ports listen on loopback only: the PBX on this host.
    assert (config.server.bind, config.server.allowed_peers) == ("127.0.0.1", ())


def test_shipped_commented_examples_are_valid(tmp_path):
    """
    The provider sub-tables shown commented out in the shipped file use only known keys and
    valid values, so an integrator can uncomment them as they are.
    """
    text = (ETC / "audiosocket.toml").read_text(encoding="utf-8")
    example = re.compile(r'^# (\[[\w.]+\]|\w+ = ["\d\[].*)$')
    uncommented = "\n".join(line[2:] if example.match(line) else line for line in text.splitlines())
    assert uncommented.count("[speech.") > text.count("\n[speech.")  # something was uncommented
    path = tmp_path / "audiosocket.toml"
    path.write_text(uncommented, encoding="utf-8")
    (tmp_path / "apartments.json").write_text("[]")
    (tmp_path / "redis-ca.pem").write_text("")
    config = load_config(path)
    assert config.speech.whisper.url == "http://127.0.0.1:9000/v1"
    assert config.dialer.ami.secret_env == "AMI_SECRET"
    assert "busy" in config.flow.prompts


def test_shipped_directory_format():
    """
    etc/apartments.json is the original's format: a list of apartments with a plain-digit
    number, one or more resident names and a dial string; numbers are unique.
    """
    apartments = json.loads((ETC / "apartments.json").read_text(encoding="utf-8"))
    assert len(apartments) >= 10
    for apartment in apartments:
        assert set(apartment) == {"apartment_number", "residents", "voip_number"}
        assert apartment["apartment_number"].isdigit()
        assert apartment["residents"] and all(isinstance(r, str) for r in apartment["residents"])
        assert apartment["voip_number"].startswith("SIP/")
    numbers = [a["apartment_number"] for a in apartments]
    assert len(set(numbers)) == len(numbers)
    assert any(len(a["residents"]) > 1 for a in apartments)


# --- defaults and values --------------------------------------------------------------------


def test_defaults(tmp_path):
    """A file with only a condominium gets every documented default."""
    config = load(tmp_path)
    assert config.path == tmp_path / "audiosocket.toml"
    server = config.server
    assert (server.bind, server.max_calls, server.allowed_peers) == ("127.0.0.1", 100, ())
    assert server.state_dir == tmp_path / "var"
    assert (server.port_fallback, server.port_fallback_range) == (False, (20000, 20999))
    assert server.handshake_timeout_s == 5.0
    api = config.api
    assert (api.endpoint, api.token_env, api.allowed_hosts, api.max_body_kb) == (
        "tcp:8082:interface=127.0.0.1",
        "",
        ("localhost", "127.0.0.1", "[::1]"),
        64,
    )
    assert api.max_body == 65536
    assert (config.redis.url, config.redis.timeout_s) == ("", 2.0)
    speech = config.speech
    assert (speech.tts, speech.stt, speech.nlu, speech.cache_size) == (
        "espeak",
        "none",
        "rules",
        256,
    )
    assert (speech.espeak.voice, speech.espeak.speed, speech.espeak.pitch) == ("pt-br", 165, 50)
    assert (speech.whisper.url, speech.whisper.model, speech.whisper.language) == (
        "",
        "whisper-1",
        "pt",
    )
    assert speech.openai.api_key_env == "OPENAI_API_KEY"
    assert speech.azure.key_env == "AZURE_SPEECH_KEY"
    assert speech.vosk.model_dir is None
    assert (speech.llm.url, speech.llm.timeout_s) == ("", 5.0)
    dialer = config.dialer
    assert (dialer.kind, dialer.url, dialer.timeout_s) == ("log", "", 5.0)
    assert (dialer.ami.host, dialer.ami.port, dialer.ami.context) == (
        "127.0.0.1",
        5038,
        "audiosocket-resident",
    )
    assert config.audio.vad_aggressiveness == 2 and config.audio.barge_in is True
    assert (config.audio.visitor_silence_ms, config.audio.max_utterance_ms) == (700, 15000)
    flow = config.flow
    assert (flow.ring_timeout_s, flow.attempts, flow.max_call_s) == (30.0, 2, 180.0)
    assert dict(flow.prompts) == {}
    assert flow.max_digits == 8
    assert (speech.cache_mb, speech.max_text_chars) == (32, 1000)
    assert config.redis.embedded_maxmemory_mb == 256
    assert (config.privacy.log_speech, config.privacy.record_speech) == (False, False)
    assert config.extensions == ()


def test_limits_defaults(tmp_path):
    """
    Without a [limits] table every bound takes its documented production default, and
    leg_options hands the per-connection ones to the leg factory (the busy ones stay out).
    """
    limits = load(tmp_path).limits
    assert (
        limits.max_connections_per_port,
        limits.max_connections_per_peer,
        limits.max_handshakes_per_port,
    ) == (200, 400, 64)
    assert (limits.events_per_s, limits.event_burst, limits.audio_burst_s) == (20.0, 40, 2.0)
    assert (limits.max_unsent_kb, limits.slow_reader_s) == (64, 5.0)
    assert limits.rates == (8000, 12000, 16000, 24000, 32000, 44100, 48000)
    assert (limits.max_rate_switches, limits.max_busy, limits.busy_max_s) == (5, 20, 15.0)
    options = limits.leg_options
    assert "max_busy" not in options and "busy_max_s" not in options
    assert options["rates"] == limits.rates and options["event_burst"] == 40


def test_limits_leg_options_are_leg_factory_keywords(tmp_path):
    """Every key leg_options gives is a keyword LegFactory takes (no wiring by hand)."""
    import inspect

    from audiosocket.leg import LegFactory

    keywords = inspect.signature(LegFactory).parameters
    assert set(load(tmp_path).limits.leg_options) <= set(keywords)


def test_limits_rates_sorted_and_deduplicated(tmp_path):
    """[limits] rates keep each allowed sample rate once, in order."""
    limits = load(tmp_path, "[limits]\nrates = [16000, 8000, 16000]\n").limits
    assert limits.rates == (8000, 16000)


def test_greeting_defaults_to_name(tmp_path):
    """A condominium without a greeting is greeted with its name."""
    (condominium,) = load(tmp_path).condominiums
    assert condominium.greeting == "Condomínio Teste, em que posso ajudar?"
    assert condominium.max_calls is None


def test_integers_accepted_as_floats(tmp_path):
    """Where a number of seconds is expected, an integer is accepted and stored as a float."""
    config = load(tmp_path, "[flow]\ndtmf_timeout_s = 4\n[redis]\ntimeout_s = 1\n")
    assert config.flow.dtmf_timeout_s == 4.0 and isinstance(config.flow.dtmf_timeout_s, float)
    assert isinstance(config.redis.timeout_s, float)


def test_prompts_are_a_read_only_mapping(tmp_path):
    """[flow.prompts] overrides are kept by name and cannot be changed after loading."""
    prompts = load(tmp_path, '[flow.prompts]\ngreeting = "Olá!"\n').flow.prompts
    assert dict(prompts) == {"greeting": "Olá!"}
    with pytest.raises(TypeError):
        prompts["greeting"] = "x"


def test_dial_and_operator_defaults(tmp_path):
    """
    Without [condominiums.dial] and [condominiums.operator]: the unit's voip_number is rung,
    there is no operator, and nobody answering or an unknown apartment ends in goodbye.
    """
    (condominium,) = load(tmp_path).condominiums
    assert condominium.dial.strategy == "unit"
    assert condominium.operator.dial == ""
    assert condominium.operator.on_no_answer == "goodbye"
    assert condominium.operator.on_unknown_apartment == "goodbye"


def test_dial_and_operator_set(tmp_path):
    """A condominium's strategy and operator are read from its own sub-tables."""
    text = CONDOMINIUM + (
        '[condominiums.dial]\nstrategy = "parallel"\n'
        '[condominiums.operator]\ndial = "PJSIP/portaria"\non_no_answer = "operator"\n'
        'on_unknown_apartment = "operator"\n'
    )
    (condominium,) = load(tmp_path, text).condominiums
    assert condominium.dial.strategy == "parallel"
    assert condominium.operator.dial == "PJSIP/portaria"
    assert condominium.operator.on_no_answer == "operator"
    assert condominium.operator.on_unknown_apartment == "operator"


def test_gate_access_and_privacy_defaults(tmp_path):
    """
    Without [condominiums.gate], [access] or the new [privacy] keys: no gate acts, codes
    get 3 tries a call and lock an extension after 10 failures in 15 min, records are kept
    90 days and the access audit 180, with the visitor's name.
    """
    config = load(tmp_path)
    (condominium,) = config.condominiums
    assert condominium.gate.kind == "none"
    assert condominium.gate.retries == 2 and condominium.gate.timeout_s == 3.0
    assert condominium.timezone == "America/Sao_Paulo"
    assert (config.access.code_tries_per_call, config.access.lockout_failures) == (3, 10)
    assert (config.access.lockout_window_s, config.access.lockout_s) == (900.0, 900.0)
    privacy = config.privacy
    assert (privacy.calls_retention_days, privacy.access_retention_days) == (90, 180)
    assert privacy.keep_visitor_names is True


def test_http_gate_secret_is_a_required_secret(tmp_path, monkeypatch):
    """An http gate's signing secret unset stops start-up (listed as required)."""
    monkeypatch.delenv("GATE_SECRET", raising=False)
    text = CONDOMINIUM + (
        '[condominiums.gate]\nkind = "http"\nurl = "http://127.0.0.1:9/open"\n'
        'secret_env = "GATE_SECRET"\n'
    )
    config = load(tmp_path, text)
    unset = {u.key: u for u in config.unset_secrets()}
    assert unset["condominiums[0].gate.secret_env"].required is True
    monkeypatch.setenv("GATE_SECRET", "s3cret")
    assert "condominiums[0].gate.secret_env" not in {u.key for u in config.unset_secrets()}


def test_condominium_lookup(tmp_path):
    """Config.condominium(id) finds a condominium by id and raises KeyError for others."""
    config = load(tmp_path)
    assert config.condominium(1).name == "Condomínio Teste"
    with pytest.raises(KeyError):
        config.condominium(2)


def test_parse_config_takes_a_dict(tmp_path):
    """parse_config validates an already-parsed dict, resolving paths against C{path}."""
    (tmp_path / "apartments.json").write_text("[]")
    data = tomllib.loads(CONDOMINIUM + extension())
    config = parse_config(data, tmp_path / "x.toml")
    assert config.extensions[0].ai_port == 8080
    assert config.condominiums[0].directory == tmp_path / "apartments.json"


# --- paths ----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_directory(tmp_path, monkeypatch):
    """
    state_dir and a condominium's directory are relative to the config file's directory, not
    the working directory; absolute paths are kept.
    """
    etc = tmp_path / "etc"
    (etc / "dirs").mkdir(parents=True)
    (etc / "dirs" / "apoena.json").write_text("[]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (etc / "audiosocket.toml").write_text(
        '[server]\nstate_dir = "../state"\n'
        '[speech.vosk]\nmodel_dir = "%s"\n'
        '[[condominiums]]\nid = 1\nname = "A"\ndirectory = "dirs/apoena.json"\n' % elsewhere
    )
    config = load_config(Path("../etc/audiosocket.toml"))
    assert config.path == etc / "audiosocket.toml"
    assert config.server.state_dir == tmp_path / "state"
    assert config.condominiums[0].directory == etc / "dirs" / "apoena.json"
    assert config.speech.vosk.model_dir == elsewhere


# --- secrets --------------------------------------------------------------------------------


def test_secrets_come_from_environment_at_use_time(tmp_path, monkeypatch):
    """
    Keys ending in _env name variables; Config.secret reads them when called, so a value set
    after loading is seen, and an unset or unnamed variable is None.
    """
    monkeypatch.delenv("TEST_WHISPER_KEY", raising=False)
    config = load(tmp_path, '[speech.whisper]\napi_key_env = "TEST_WHISPER_KEY"\n')
    name = config.speech.whisper.api_key_env
    assert config.secret(name) is None
    monkeypatch.setenv("TEST_WHISPER_KEY", "sk-123")
    assert config.secret(name) == "sk-123"
    assert config.secret("") is None


def test_api_token_from_environment(tmp_path, monkeypatch):
    """
    An API off loopback takes its token from the variable token_env names, read when asked
    for (a rotated token needs no reload) and never shown in the config's repr.
    """
    config = load(
        tmp_path,
        '[api]\nendpoint = "tcp:8082"\ntoken_env = "TEST_API_TOKEN"\n',
    )
    assert not config.api.is_loopback and config.api.requires_token
    monkeypatch.setenv("TEST_API_TOKEN", "s3cret")
    assert config.api.bearer_token() == "s3cret"
    monkeypatch.setenv("TEST_API_TOKEN", "rotated")
    assert config.api.bearer_token() == "rotated"
    assert "rotated" not in repr(config)


@pytest.mark.parametrize("value", ['"in-file"', '""'])
def test_api_token_in_file_refused(tmp_path, value):
    """
    A token in the file (even an empty one) is an error on api.token that points to
    api.token_env and does not repeat the value.
    """
    e = error(write(tmp_path, f'[api]\nendpoint = "tcp:8082"\ntoken = {value}\n'))
    assert e.key == "api.token"
    assert "api.token_env" in e.message and "environment variable" in e.message
    assert "in-file" not in str(e)


@pytest.mark.parametrize(
    "endpoint, names",
    [
        ("tcp:8082:interface=127.0.0.1", {"localhost", "127.0.0.1", "[::1]"}),
        ("tcp:8082:interface=192.168.0.10", {"localhost", "127.0.0.1", "[::1]", "192.168.0.10"}),
        (r"tcp:8082:interface=\:\:1", {"localhost", "127.0.0.1", "[::1]"}),
        (r"tcp:8082:interface=fd00\:\:5", {"localhost", "127.0.0.1", "[::1]", "[fd00::5]"}),
        ("tcp:8082:interface=0.0.0.0", {"localhost", "127.0.0.1", "[::1]"}),
        ("tcp:8082", {"localhost", "127.0.0.1", "[::1]"}),
        ("unix:/run/audiosocket.sock", {"localhost", "127.0.0.1", "[::1]"}),
    ],
)
def test_api_host_names_add_the_interface(tmp_path, endpoint, names):
    """The API answers to allowed_hosts and its endpoint's interface, unless that is a wildcard."""
    config = load(tmp_path, f'[api]\nendpoint = {json.dumps(endpoint)}\ntoken_env = "T"\n')
    assert config.api.host_names == names


def test_api_allowed_hosts_normalized(tmp_path):
    """allowed_hosts are kept lower case, IPv6 addresses compressed and bracketed."""
    config = load(
        tmp_path, '[api]\nallowed_hosts = ["Doorman.Example", "0:0::1", "[fd00:0::5]", "10.0.0.5"]\n'
    )
    assert config.api.allowed_hosts == ("doorman.example", "[::1]", "[fd00::5]", "10.0.0.5")


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp:8082:interface=127.0.0.1", True),
        ("tcp:8082:interface=127.0.0.53", True),
        (r"tcp:8082:interface=\:\:1", True),
        ("tcp:8082:interface=localhost", True),
        ("unix:/run/audiosocket.sock", True),
        ("tcp:8082", False),
        ("tcp:8082:interface=0.0.0.0", False),
        ("ssl:8443:privateKey=key.pem:interface=192.168.0.10", False),
    ],
)
def test_api_is_loopback(tmp_path, endpoint, loopback):
    """ApiConfig.is_loopback is true only for unix sockets and loopback interfaces."""
    config = load(tmp_path, f'[api]\nendpoint = {json.dumps(endpoint)}\ntoken_env = "T"\n')
    assert config.api.is_loopback is loopback


def test_peer_allowed(tmp_path):
    """
    allowed_peers keeps the addresses and networks as written, allowed_networks parses them;
    a peer is allowed when in one of them; an empty list allows anyone.
    """
    server = load(
        tmp_path, '[server]\nallowed_peers = ["10.0.0.5", "192.168.1.0/24", "fd00::/8"]\n'
    ).server
    assert server.allowed_peers == ("10.0.0.5", "192.168.1.0/24", "fd00::/8")
    assert server.allowed_networks[0] == ipaddress.ip_network("10.0.0.5/32")
    assert server.peer_allowed("10.0.0.5")
    assert server.peer_allowed("192.168.1.77")
    assert server.peer_allowed("fd00::1")
    assert not server.peer_allowed("10.0.0.6")
    assert not server.peer_allowed("not-an-ip")
    assert load(tmp_path).server.peer_allowed("203.0.113.9")


def test_peer_allowed_unwraps_an_ipv4_mapped_peer(tmp_path):
    """
    With bind = "::" an IPv4 PBX arrives as ::ffff:a.b.c.d: allowed when a.b.c.d is, by the
    config and by the listener alike (one rule, audiosocket.peers).
    """
    from twisted.internet.address import IPv6Address

    from audiosocket.leg import _peer_allowed

    server = load(tmp_path, '[server]\nbind = "::"\nallowed_peers = ["10.0.0.5"]\n').server
    assert server.peer_allowed("::ffff:10.0.0.5")
    assert not server.peer_allowed("::ffff:10.0.0.6")
    assert _peer_allowed(IPv6Address("TCP", "::ffff:10.0.0.5", 40000), server.allowed_networks)
    assert not _peer_allowed(
        IPv6Address("TCP", "::ffff:10.0.0.6", 40000), server.allowed_networks
    )


def test_peer_allowed_ignores_an_ipv6_zone_id(tmp_path):
    """A link-local peer carries its zone (fe80::1%eth0); the address alone is judged."""
    from twisted.internet.address import IPv6Address

    from audiosocket.leg import _peer_allowed

    server = load(tmp_path, '[server]\nbind = "::"\nallowed_peers = ["fe80::1"]\n').server
    assert server.peer_allowed("fe80::1%eth0")
    assert not server.peer_allowed("fe80::2%eth0")
    assert _peer_allowed(IPv6Address("TCP", "fe80::1%eth0", 40000), server.allowed_networks)
    assert not _peer_allowed(IPv6Address("TCP", "fe80::2%eth0", 40000), server.allowed_networks)


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_bind_may_leave_allowed_peers_empty(tmp_path, bind):
    """On a loopback bind only this host can connect: no allowed_peers needed."""
    assert load(tmp_path, f'[server]\nbind = "{bind}"\n').server.bind == bind


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.0.10"])
def test_non_loopback_bind_with_allowed_peers_is_valid(tmp_path, bind):
    """Off loopback, naming the PBX in allowed_peers makes the bind valid."""
    config = load(tmp_path, f'[server]\nbind = "{bind}"\nallowed_peers = ["10.0.0.5"]\n')
    assert config.server.bind == bind


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://10.0.0.2:6380/3",
        "redis://user@host/0",
        "unix:///run/redis.sock",
    ],
)
def test_redis_urls_accepted(tmp_path, url):
    """Redis URLs without a password, by host or unix socket, are accepted as written."""
    config = load(tmp_path, f"[redis]\nurl = {json.dumps(url)}\n")
    assert config.redis.url == url and not config.redis.embedded


# --- errors about the file ------------------------------------------------------------------


def test_missing_file(tmp_path):
    """A config file that does not exist is a ConfigError naming the file, with no key."""
    path = tmp_path / "nope.toml"
    e = error(path)
    assert (e.path, e.key) == (str(path), None)
    assert str(e) == f"{path}: cannot read config: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    """Naming a directory as the config file is a ConfigError saying so."""
    assert str(error(tmp_path)) == f"{tmp_path}: cannot read config: Is a directory"


def test_bad_toml_names_line_and_column(tmp_path):
    """Invalid TOML is a ConfigError carrying TOML's own message with line and column."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nmax_calls = = 3\n")
    e = error(path)
    assert e.key is None
    assert str(e).startswith(f"{path}: invalid TOML: ")
    assert "line 2, column 13" in str(e)


def test_not_utf8(tmp_path):
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[condominiums]]\nname = "Condomínio"\n'.encode("latin-1"))
    assert str(error(path)).startswith(f"{path}: invalid TOML: not UTF-8")


def test_error_is_one_line():
    """ConfigError keeps path, key and message, and its text is one line whatever the message."""
    e = ConfigError("etc/x.toml", "server.bind", "bad\n  value")
    assert (e.path, e.key, e.message) == ("etc/x.toml", "server.bind", "bad value")
    assert str(e) == "etc/x.toml: server.bind: bad value"


# --- one error per kind of mistake, naming the exact key --------------------------------------

SECOND_CONDOMINIUM = CONDOMINIUM.replace("Teste", "Outro")

MISTAKES = {
    # unknown keys, at every level
    "unknown top-level key": ("bogus = 1\n", "bogus", "unknown key"),
    "unknown section key": (
        "[server]\nmax_call = 5\n",
        "server.max_call",
        'unknown key; did you mean "max_calls"?',
    ),
    "unknown sub-table key": (
        '[speech.whisper]\nurll = "http://x"\n',
        "speech.whisper.urll",
        'unknown key; did you mean "url"?',
    ),
    "unknown sub-table": ("[speech.festival]\n", "speech.festival", "unknown key"),
    "unknown condominium key": (
        CONDOMINIUM + 'gretting = "Oi"\n',
        "condominiums[0].gretting",
        'unknown key; did you mean "greeting"?',
    ),
    "unknown extension key": (
        extension(hots="x"),
        "extensions[0].hots",
        'unknown key; did you mean "host"?',
    ),
    # wrong types
    "string for int": (
        '[server]\nmax_calls = "abc"\n',
        "server.max_calls",
        'must be an integer between 1 and 100000, not "abc"',
    ),
    "bool for int": (
        "[server]\nmax_calls = true\n",
        "server.max_calls",
        "must be an integer between 1 and 100000, not true",
    ),
    "bool for float": (
        "[flow]\nring_timeout_s = true\n",
        "flow.ring_timeout_s",
        "must be a number greater than 0, not true",
    ),
    "int for bool": ("[audio]\nbarge_in = 1\n", "audio.barge_in", "must be true or false, not 1"),
    "int for string": (
        "[speech.espeak]\nvoice = 5\n",
        "speech.espeak.voice",
        "must be a non-empty string, not 5",
    ),
    "value for section": ("server = 5\n", "server", "must be a table, not 5"),
    "table for array of tables": (
        "[condominiums]\nid = 1\n",
        "condominiums",
        'must be an array of tables ([[condominiums]]), not {"id": 1}',
    ),
    # out of range and bad values
    "int too small": (
        "[server]\nmax_calls = 0\n",
        "server.max_calls",
        "must be an integer between 1 and 100000, not 0",
    ),
    "int too large": (
        "[speech.espeak]\nspeed = 1000\n",
        "speech.espeak.speed",
        "must be an integer between 80 and 450, not 1000",
    ),
    "negative cache": (
        "[speech]\ncache_size = -1\n",
        "speech.cache_size",
        "must be an integer of at least 0, not -1",
    ),
    "zero seconds": (
        "[redis]\ntimeout_s = 0\n",
        "redis.timeout_s",
        "must be a number greater than 0, not 0",
    ),
    "nan seconds": (
        "[flow]\nmax_call_s = nan\n",
        "flow.max_call_s",
        "must be a number greater than 0, not NaN",
    ),
    "rate not an AudioSocket rate": (
        "[limits]\nrates = [8000, 11025]\n",
        "limits.rates[1]",
        "must be one of [8000, 12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000], "
        "not 11025",
    ),
    "no rates": (
        "[limits]\nrates = []\n",
        "limits.rates",
        "must be a non-empty list of sample rates from [8000, 12000, 16000, 24000, 32000, "
        "44100, 48000, 96000, 192000], not []",
    ),
    "zero events a second": (
        "[limits]\nevents_per_s = 0\n",
        "limits.events_per_s",
        "must be a number greater than 0, not 0",
    ),
    "zero connections": (
        "[limits]\nmax_connections_per_peer = 0\n",
        "limits.max_connections_per_peer",
        "must be an integer between 1 and 1000000, not 0",
    ),
    "ms too large": (
        "[audio]\npreroll_ms = 60001\n",
        "audio.preroll_ms",
        "must be an integer between 0 and 60000, not 60001",
    ),
    "unknown choice": (
        '[speech]\ntts = "festival"\n',
        "speech.tts",
        'must be one of "espeak", "openai", "azure", not "festival"',
    ),
    "reversed port range": (
        "[server]\nport_fallback_range = [2000, 1000]\n",
        "server.port_fallback_range",
        "must be [low, high] with low <= high, not [2000, 1000]",
    ),
    "bad port in range": (
        "[server]\nport_fallback_range = [0, 1000]\n",
        "server.port_fallback_range[0]",
        "must be an integer between 1 and 65535, not 0",
    ),
    "bad bind": (
        '[server]\nbind = "example.com"\n',
        "server.bind",
        'must be an IP address, not "example.com"',
    ),
    "bad peer": (
        '[server]\nallowed_peers = ["10.0.0.1", "gateway"]\n',
        "server.allowed_peers[1]",
        'must be an IP address or network, not "gateway"',
    ),
    "redis url scheme": (
        '[redis]\nurl = "http://localhost"\n',
        "redis.url",
        'must be "" (embedded), redis://host[:port][/db], rediss://host[:port][/db] (TLS) or unix:///path, not "http://localhost"',
    ),
    "redis url db": (
        '[redis]\nurl = "redis://localhost/zero"\n',
        "redis.url",
        'must be "" (embedded), redis://host[:port][/db], rediss://host[:port][/db] (TLS) or unix:///path, not "redis://localhost/zero"',
    ),
    "redis url password": (
        '[redis]\nurl = "redis://:hunter2@localhost"\n',
        "redis.url",
        "must not contain a password; name its variable in redis.password_env",
    ),
    "secret pasted into _env": (
        '[speech.openai]\napi_key_env = "sk-abc123"\n',
        "speech.openai.api_key_env",
        "must be the name of an environment variable (letters, digits, _), not the secret itself",
    ),
    "endpoint kind": (
        '[api]\nendpoint = "udp:8082"\n',
        "api.endpoint",
        'must be a tcp:, ssl: or unix: endpoint string, not "udp:8082"',
    ),
    "endpoint port": (
        '[api]\nendpoint = "tcp:http"\n',
        "api.endpoint",
        'must give a port between 0 and 65535, not "http"',
    ),
    "endpoint option": (
        '[api]\nendpoint = "tcp:8082:interfac=127.0.0.1"\n',
        "api.endpoint",
        'unknown tcp: endpoint option "interfac" in "tcp:8082:interfac=127.0.0.1"',
    ),
    "ssl without key": (
        '[api]\nendpoint = "ssl:8443"\ntoken_env = "T"\n',
        "api.endpoint",
        'must name a privateKey= for an ssl: endpoint, not "ssl:8443"',
    ),
    "empty prompt": (
        '[flow.prompts]\ngreeting = ""\n',
        "flow.prompts.greeting",
        'must be a non-empty string, not ""',
    ),
    # rules joining settings
    "AudioSocket ports open to any host": (
        '[server]\nbind = "0.0.0.0"\n',
        "server.allowed_peers",
        "must list the PBX's address(es) when server.bind is not a loopback address "
        '("0.0.0.0"); or bind "127.0.0.1" with the PBX on this host',
    ),
    "AudioSocket ports open to any IPv6 host": (
        '[server]\nbind = "::"\nallowed_peers = []\n',
        "server.allowed_peers",
        "must list the PBX's address(es) when server.bind is not a loopback address "
        '("::"); or bind "127.0.0.1" with the PBX on this host',
    ),
    "public API without token": (
        '[api]\nendpoint = "tcp:8082:interface=0.0.0.0"\n',
        "api.token_env",
        "must name the environment variable holding the API token when the API is not on "
        'loopback ("tcp:8082:interface=0.0.0.0")',
    ),
    "allowed host with a port": (
        '[api]\nallowed_hosts = ["localhost", "doorman.example:8082"]\n',
        "api.allowed_hosts[1]",
        'must be a host name or an IP address, without a port, not "doorman.example:8082"',
    ),
    "allowed host with a comma": (
        '[api]\nallowed_hosts = ["a,b"]\n',
        "api.allowed_hosts[0]",
        'must be a host name or an IP address, without a port, not "a,b"',
    ),
    "allowed hosts not a list": (
        '[api]\nallowed_hosts = "localhost"\n',
        "api.allowed_hosts",
        'must be a list of host names or IP addresses, not "localhost"',
    ),
    "body cap too small": (
        "[api]\nmax_body_kb = 0\n",
        "api.max_body_kb",
        "must be an integer between 1 and 10240, not 0",
    ),
    "whisper without url": (
        '[speech]\nstt = "whisper"\n',
        "speech.whisper.url",
        'is required when speech.stt = "whisper"',
    ),
    "llm without model": (
        '[speech]\nnlu = "llm"\n[speech.llm]\nurl = "http://127.0.0.1:8000/v1"\n',
        "speech.llm.model",
        'is required when speech.nlu = "llm"',
    ),
    "azure tts without region": (
        '[speech]\ntts = "azure"\n',
        "speech.azure.region",
        'is required when speech.tts = "azure"',
    ),
    "vosk without model": (
        '[speech]\nstt = "vosk"\n',
        "speech.vosk.model_dir",
        'is required when speech.stt = "vosk"',
    ),
    "vosk model missing": (
        '[speech]\nstt = "vosk"\n[speech.vosk]\nmodel_dir = "models/vosk"\n',
        "speech.vosk.model_dir",
        "no such directory: {dir}/models/vosk",
    ),
    "http dialer without url": (
        '[dialer]\nkind = "http"\n',
        "dialer.url",
        'is required when dialer.kind = "http"',
    ),
    "dialer url scheme": (
        '[dialer]\nurl = "ftp://example.com/"\n',
        "dialer.url",
        'must be an http or https URL, not "ftp://example.com/"',
    ),
    "utterance bounds": (
        "[audio]\nmin_utterance_ms = 500\nmax_utterance_ms = 400\n",
        "audio.max_utterance_ms",
        "must be at least audio.min_utterance_ms (500), not 400",
    ),
    # condominiums
    "no condominiums": (
        "condominiums = []\n",
        "condominiums",
        "at least one [[condominiums]] table is required",
    ),
    "condominium without name": (
        '[[condominiums]]\nid = 1\ndirectory = "apartments.json"\n',
        "condominiums[0].name",
        "is required",
    ),
    "missing directory file": (
        '[[condominiums]]\nid = 1\nname = "A"\ndirectory = "missing.json"\n',
        "condominiums[0].directory",
        "no such file: {dir}/missing.json",
    ),
    "unknown dial strategy": (
        CONDOMINIUM + '[condominiums.dial]\nstrategy = "all"\n',
        "condominiums[0].dial.strategy",
        'must be one of "unit", "sequential", "parallel", not "all"',
    ),
    "operator dial with a comma": (
        CONDOMINIUM + '[condominiums.operator]\ndial = "PJSIP/op,30"\n',
        "condominiums[0].operator.dial",
        'must be a dial string without commas or line breaks, not "PJSIP/op,30"',
    ),
    "operator on no answer without a dial": (
        CONDOMINIUM + '[condominiums.operator]\non_no_answer = "operator"\n',
        "condominiums[0].operator.on_no_answer",
        'needs condominiums[0].operator.dial: "operator" is nobody without it',
    ),
    "operator choice unknown": (
        CONDOMINIUM + '[condominiums.operator]\non_unknown_apartment = "human"\n',
        "condominiums[0].operator.on_unknown_apartment",
        'must be one of "operator", "goodbye", not "human"',
    ),
    "gate kind unknown": (
        CONDOMINIUM + '[condominiums.gate]\nkind = "relay"\n',
        "condominiums[0].gate.kind",
        'must be one of "none", "dtmf", "http", not "relay"',
    ),
    "dtmf gate without digits": (
        CONDOMINIUM + '[condominiums.gate]\nkind = "dtmf"\n',
        "condominiums[0].gate.digits",
        'is required when gate.kind = "dtmf"',
    ),
    "gate digits not dtmf, never echoed": (
        CONDOMINIUM + '[condominiums.gate]\nkind = "dtmf"\ndigits = "12;Set(X=1)"\n',
        "condominiums[0].gate.digits",
        "must be up to 32 DTMF characters (0-9 * # A-D, w for a pause)",
    ),
    "http gate without url": (
        CONDOMINIUM + '[condominiums.gate]\nkind = "http"\nsecret_env = "GATE"\n',
        "condominiums[0].gate.url",
        'is required when gate.kind = "http"',
    ),
    "http gate without a secret": (
        CONDOMINIUM + '[condominiums.gate]\nkind = "http"\nurl = "https://relay/open"\n',
        "condominiums[0].gate.secret_env",
        'is required when gate.kind = "http": the relay must be able to tell the '
        "server's calls from anyone else's (HMAC-SHA256 signature)",
    ),
    "http gate in clear off this host": (
        CONDOMINIUM
        + '[condominiums.gate]\nkind = "http"\nurl = "http://10.0.0.9/open"\nsecret_env = "G"\n',
        "condominiums[0].gate.url",
        "must be https:// for a relay on another host (plain http:// is only for a relay on "
        'loopback), not "http://10.0.0.9/open"',
    ),
    "unknown time zone": (
        CONDOMINIUM + 'timezone = "Brasil/Centro"\n',
        "condominiums[0].timezone",
        'must be an IANA time zone such as "America/Sao_Paulo", not "Brasil/Centro"',
    ),
    "retention negative": (
        "[privacy]\ncalls_retention_days = -1\n" + CONDOMINIUM,
        "privacy.calls_retention_days",
        "must be an integer between 0 and 36500, not -1",
    ),
    "code tries zero": (
        "[access]\ncode_tries_per_call = 0\n" + CONDOMINIUM,
        "access.code_tries_per_call",
        "must be an integer between 1 and 10, not 0",
    ),
    "duplicate condominium id": (
        CONDOMINIUM + SECOND_CONDOMINIUM,
        "condominiums[1].id",
        "duplicate id 1 (also condominiums[0].id)",
    ),
    # extensions
    "extension field invalid": (
        extension(ai_port=70000),
        "extensions[0].ai_port",
        "must be between 1 and 65535, not 70000",
    ),
    "extension field missing": (extension(host=None), "extensions[0].host", "is required"),
    "extension host with a channel variable": (
        extension(host="10.0.0.2:8081,AUDIOSOCKET_UUID=x"),
        "extensions[0].host",
        "must be an IP address or a DNS host name, without a port "
        "(no commas, spaces or control characters)",
    ),
    "extension number with a comma": (
        extension(ai_extension="1001,X=1"),
        "extensions[0].ai_extension",
        "must be 1 to 32 of the characters 0-9 A-Z a-z * # + -",
    ),
    "duplicate extension id": (
        extension() + extension(ai_port=9080, return_port=9081),
        "extensions[1].id",
        "duplicate id 1 (also extensions[0].id)",
    ),
    "duplicate port": (
        extension() + extension(id=2, ai_port=8081, return_port=9081),
        "extensions[1].ai_port",
        "port 8081 is already used by extensions[0].return_port",
    ),
    "port taken by API": (
        extension(return_port=8082),
        "extensions[0].return_port",
        "port 8082 is already used by api.endpoint",
    ),
    "unknown condominium": (
        extension(condominium_id=7),
        "extensions[0].condominium_id",
        "no condominium has id 7",
    ),
    # typed input and synthesis are bounded; nothing a caller said is read back
    "max_digits zero": (
        "[flow]\nmax_digits = 0\n",
        "flow.max_digits",
        "must be an integer between 1 and 32, not 0",
    ),
    "prompt reads the apartment back": (
        '[flow.prompts]\nunknown_apartment = "Não encontrei o {apartment}."\n',
        "flow.prompts.unknown_apartment",
        "prompt 'unknown_apartment' uses unknown field 'apartment' (allowed: none)",
    ),
    "unknown prompt": (
        '[flow.prompts]\ngreting = "Oi"\n',
        "flow.prompts.greting",
        "unknown prompt 'greting'",
    ),
    "prompt too long": (
        '[flow.prompts]\nbusy = "' + "a" * 501 + '"\n',
        "flow.prompts.busy",
        "must be at most 500 characters, not 501",
    ),
    "greeting too long": (
        CONDOMINIUM + 'greeting = "' + "a" * 501 + '"\n',
        "condominiums[0].greeting",
        "must be at most 500 characters, not 501",
    ),
    "max_text_chars too small": (
        "[speech]\nmax_text_chars = 100\n",
        "speech.max_text_chars",
        "must be an integer between 700 and 100000, not 100",
    ),
    "cache_mb negative": (
        "[speech]\ncache_mb = -1\n",
        "speech.cache_mb",
        "must be an integer between 0 and 4096, not -1",
    ),
    "embedded maxmemory too small": (
        "[redis]\nembedded_maxmemory_mb = 1\n",
        "redis.embedded_maxmemory_mb",
        "must be an integer between 16 and 1048576, not 1",
    ),
    "privacy not a bool": (
        '[privacy]\nlog_speech = "yes"\n',
        "privacy.log_speech",
        'must be true or false, not "yes"',
    ),
    # a key never crosses the network in clear
    "whisper key over http": (
        '[speech.whisper]\nurl = "http://stt.example.com/v1"\napi_key_env = "STT_KEY"\n',
        "speech.whisper.url",
        "must be https:// when speech.whisper.api_key_env is set: the key would cross the "
        "network in clear (plain http:// is only for a server on loopback), not "
        '"http://stt.example.com/v1"',
    ),
    "openai key over http": (
        '[speech.openai]\nurl = "http://10.0.0.5/v1"\n',
        "speech.openai.url",
        "must be https:// when speech.openai.api_key_env is set: the key would cross the "
        "network in clear (plain http:// is only for a server on loopback), not "
        '"http://10.0.0.5/v1"',
    ),
    "llm key over http": (
        '[speech.llm]\nurl = "http://llm.lan:8000/v1"\nmodel = "m"\napi_key_env = "K"\n',
        "speech.llm.url",
        "must be https:// when speech.llm.api_key_env is set: the key would cross the "
        "network in clear (plain http:// is only for a server on loopback), not "
        '"http://llm.lan:8000/v1"',
    ),
}


@pytest.mark.parametrize("text, key, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistake_names_file_and_key(tmp_path, text, key, message):
    """
    Each kind of mistake is a ConfigError whose one line names the file, the exact dotted key
    and what is wrong.
    """
    path = write(tmp_path, text)
    e = error(path)
    message = message.replace("{dir}", str(tmp_path))
    assert (e.path, e.key, e.message) == (str(path), key, message)
    assert str(e) == f"{path}: {key}: {message}"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000/v1", "http://localhost:9000/v1", "http://[::1]:9000/v1", "http://127.8.0.1/v1"],
)
def test_plain_http_with_a_key_is_fine_on_loopback(tmp_path, url):
    """A local faster-whisper server on 127.0.0.1 needs no TLS, key or not."""
    config = load(tmp_path, f'[speech.whisper]\nurl = "{url}"\napi_key_env = "STT_KEY"\n')
    assert config.speech.whisper.url == url


def test_plain_http_without_a_key_is_fine(tmp_path):
    """No key, nothing to leak: a keyless server on the LAN may be plain http://."""
    config = load(tmp_path, '[speech.whisper]\nurl = "http://10.0.0.9:9000/v1"\n')
    assert config.speech.whisper.url == "http://10.0.0.9:9000/v1"


def test_secrets_are_not_echoed_in_errors(tmp_path):
    """A secret written where it does not belong is not repeated in the error message."""
    for text, leaked in [
        ('[redis]\nurl = "redis://:hunter2@localhost"\n', "hunter2"),
        ('[speech.openai]\napi_key_env = "sk-abc123"\n', "sk-abc123"),
        ("[api]\ntoken = 123456\n", "123456"),
    ]:
        assert leaked not in str(error(write(tmp_path, text)))


# --- several nodes: the return address and the node name ------------------------------------


@pytest.mark.parametrize(
    "server, want",
    [
        ('bind = "127.0.0.2"', "127.0.0.2"),
        ('bind = "0.0.0.0"\nallowed_peers = ["10.0.0.5"]', "10.0.0.9"),
        ('bind = "::"\nallowed_peers = ["10.0.0.5"]', "10.0.0.9"),
        ('bind = "0.0.0.0"\nallowed_peers = ["10.0.0.5"]\nadvertise = "node-b.lan"', "node-b.lan"),
        ('bind = "127.0.0.2"\nadvertise = "fd00::2"', "fd00::2"),
    ],
)
def test_return_host_rule(tmp_path, server, want):
    """
    [server] advertise is where the PBX connects resident calls; empty, it is the bind when
    that is a specific address, else the extension's host (here 10.0.0.9).
    """
    assert load(tmp_path, "[server]\n" + server + "\n").server.return_host("10.0.0.9") == want


def test_advertise_and_node_defaults(tmp_path):
    """By default nothing is advertised and the node is named after the host."""
    import socket

    server = load(tmp_path).server
    assert (server.advertise, server.node) == ("", "")
    assert server.node_name == socket.gethostname()
    assert load(tmp_path, '[server]\nnode = "portaria-b"\n').server.node_name == "portaria-b"


@pytest.mark.parametrize(
    "line", ['advertise = "10.0.0.2:8081"', 'advertise = "a,b"', 'advertise = 3', 'node = "a b"']
)
def test_advertise_and_node_invalid(tmp_path, line):
    """An advertised host with a port or separator, or a node name with a space, is refused."""
    e = error(write(tmp_path, "[server]\n" + line + "\n"))
    key = line.split(" ")[0]
    assert "server." + key in str(e)
