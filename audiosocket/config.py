"""
The TOML configuration file, loaded and validated whole into frozen objects.

Every mistake is a L{ConfigError} naming the file and the dotted key (C{server.max_calls},
C{condominiums[0].greeting}, C{speech.whisper.url}), so an operator can fix it without reading
code. Validation is table-driven: each section is a frozen attrs class whose fields carry their
default and a check; L{_build} walks the class, refuses unknown keys and runs the checks. Rules
that join two settings (a provider needs its URL, the API off loopback needs a token, AudioSocket
ports off loopback need C{allowed_peers}, no port used twice) run afterwards in L{_check_rules}.

Secrets are never in the file (C{api.token} is refused outright): keys ending in C{_env} name environment variables, read with
L{secret} when the secret is used, so a rotated key needs no reload.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import zoneinfo
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs
from attrs import frozen

from audiosocket import peers
from audiosocket.flow.prompts import check_overrides
from audiosocket.model import EXTENSION_FIELDS, Extension, InvalidField, valid_host
from audiosocket.wire import KIND_OF_RATE

__all__ = [
    "ApiConfig",
    "AudioConfig",
    "Condominium",
    "Config",
    "ConfigError",
    "DialerConfig",
    "FlowConfig",
    "PrivacyConfig",
    "LimitsConfig",
    "RedisConfig",
    "ServerConfig",
    "SpeechConfig",
    "host_name",
    "load_config",
    "parse_config",
    "secret",
]


class ConfigError(Exception):
    """
    The configuration cannot be used. C{str()} is one line:
    C{etc/x.toml: server.max_calls: must be an integer between 1 and 100000, not "abc"}.

    @ivar path: the config file, as it was named.
    @ivar key: the dotted key at fault, or L{None} for the file as a whole.
    @ivar message: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike, key: str | None, message: str):
        self.path = os.fspath(path)
        self.key = key
        self.message = re.sub(r"\s*\n\s*", " ", str(message)).strip()
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {self.message}")


def secret(env_name: str) -> str | None:
    """
    The secret held by environment variable C{env_name}, read now; L{None} when no variable is
    named or it is unset or empty.
    """
    return (os.environ.get(env_name) or None) if env_name else None


# --- checks: (raw TOML value, config directory) -> typed value, or raise _Invalid ----------


class _Invalid(Exception):
    """
    A value failed a check. C{key} is the dotted key, or while still inside a check the suffix
    to append to the field's key (C{"[1]"} for a list item, C{".name"} for a table entry).
    """

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.message = message
        self.key = key


Check = Callable[[Any, Path], Any]


def _show(value: Any) -> str:
    # TOML-looking rendering: "abc", true, [1, 2]; short, so the error stays one line.
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(lo: int, hi: int | None = None) -> Check:
    want = f"an integer between {lo} and {hi}" if hi is not None else f"an integer of at least {lo}"

    def check(value: Any, base: Path) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            raise _Invalid(f"must be {want}, not {_show(value)}")
        return value

    return check


def _positive(value: Any, base: Path) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _Invalid(f"must be a number greater than 0, not {_show(value)}")
    return float(value)


def _bool(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {_show(value)}")
    return value


def _str(*, empty: bool = True, show: bool = True) -> Check:
    want = "a string" if empty else "a non-empty string"

    def check(value: Any, base: Path) -> str:
        if not isinstance(value, str) or not (empty or value.strip()):
            raise _Invalid(f"must be {want}" + (f", not {_show(value)}" if show else ""))
        return value

    return check


def _choice(*options: str) -> Check:
    listed = ", ".join(f'"{o}"' for o in options)

    def check(value: Any, base: Path) -> str:
        if value not in options:
            raise _Invalid(f"must be one of {listed}, not {_show(value)}")
        return value

    return check


def _env_name(value: Any, base: Path) -> str:
    # Never echo the value: the usual mistake here is pasting the secret itself.
    if not isinstance(value, str) or not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)?", value):
        raise _Invalid(
            "must be the name of an environment variable (letters, digits, _), "
            "not the secret itself"
        )
    return value


def _url(*schemes: str) -> Check:
    def check(value: Any, base: Path) -> str:
        url = _str()(value, base)
        if url:
            parts = urlsplit(url)
            if parts.scheme not in schemes or not parts.netloc:
                raise _Invalid(f"must be an {' or '.join(schemes)} URL, not {_show(url)}")
        return url

    return check


def _path(*, optional: bool = False, must_be_file: bool = False) -> Check:
    """Relative to the config file's directory; C{""} is L{None} when optional."""

    def check(value: Any, base: Path) -> Path | None:
        if optional and value == "":
            return None
        _str(empty=False)(value, base)
        path = Path(os.path.normpath(base / Path(value).expanduser()))
        if must_be_file and not path.is_file():
            raise _Invalid(f"no such file: {path}")
        if not must_be_file and path.exists() and not path.is_dir():
            raise _Invalid(f"is not a directory: {path}")
        return path

    return check


def _optional(check: Check) -> Check:
    return lambda value, base: None if value is None else check(value, base)


def _ip(value: Any, base: Path) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(f"must be an IP address, not {_show(value)}") from None
    return value


def _networks(value: Any, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of IP addresses or networks, not {_show(value)}")
    for i, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            raise _Invalid(
                f"must be an IP address or network, not {_show(item)}", f"[{i}]"
            ) from None
    return tuple(value)


def _port_range(value: Any, base: Path) -> tuple[int, int]:
    port = _int(1, 65535)
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(f"must be two port numbers [low, high], not {_show(value)}")
    for i, v in enumerate(value):
        try:
            port(v, base)
        except _Invalid as e:
            raise _Invalid(e.message, f"[{i}]") from None
    lo, hi = value
    if lo > hi:
        raise _Invalid(f"must be [low, high] with low <= high, not {_show(value)}")
    return lo, hi


_ENDPOINT_OPTIONS = {
    "tcp": {"interface", "backlog"},
    "ssl": {
        "interface",
        "backlog",
        "privateKey",
        "certKey",
        "sslmethod",
        "extraCertChain",
        "dhParameters",
    },
    "unix": {"mode", "lockfile", "backlog"},
}


def _endpoint_parts(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    An endpoint string's kind, positional arguments and options, split the way
    C{serverFromString} splits it: on C{:}, a part holding C{=} is C{option=value} (a further
    C{=} belongs to the value), and a backslash makes the next character literal
    (C{unix:/tmp/a\\:b}).
    """
    args: list[str] = []
    options: dict[str, str] = {}
    part = [""]  # the current part's strings: [arg] or [option, value]
    chars = iter(description)
    for c in chars:
        if c == ":":
            _add_part(part, args, options)
            part = [""]
        elif c == "=" and len(part) == 1:
            part.append("")
        elif c == "\\":
            part[-1] += next(chars, "")
        else:
            part[-1] += c
    _add_part(part, args, options)
    return args[0].lower(), args[1:], options


def _add_part(part: list[str], args: list[str], options: dict[str, str]) -> None:
    if len(part) == 1:
        args.append(part[0])
    else:
        options[part[0]] = part[1]


def _endpoint(value: Any, base: Path) -> str:
    """
    A Twisted server endpoint string of kind tcp, ssl or unix. Checked without side effects:
    C{ssl:} key files are read by the API service when it listens, not here.
    """
    description = _str(empty=False)(value, base)
    kind, args, options = _endpoint_parts(description)
    if kind not in _ENDPOINT_OPTIONS:
        raise _Invalid(f"must be a tcp:, ssl: or unix: endpoint string, not {_show(value)}")
    if len(args) != 1 or not args[0]:
        what = "path" if kind == "unix" else "port"
        raise _Invalid(f"must be {kind}:<{what}>[:option=value...], not {_show(value)}")
    for name in options:
        if name not in _ENDPOINT_OPTIONS[kind]:
            raise _Invalid(f'unknown {kind}: endpoint option "{name}" in {_show(value)}')
    if kind != "unix" and not (re.fullmatch("[0-9]{1,5}", args[0]) and int(args[0]) <= 65535):
        raise _Invalid(f"must give a port between 0 and 65535, not {_show(args[0])}")
    if kind == "ssl" and "privateKey" not in options:
        raise _Invalid(f"must name a privateKey= for an ssl: endpoint, not {_show(value)}")
    return description


def _redis_url(value: Any, base: Path) -> str:
    url = _str()(value, base)
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password:
        # Not echoed: it holds a secret.
        raise _Invalid("must not contain a password; name its variable in redis.password_env")
    if parts.scheme == "unix":
        ok = not parts.netloc and parts.path not in ("", "/")
    else:
        try:
            parts.port  # raises for a port that is not a number in range
        except ValueError:
            ok = False
        else:
            ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname)
            ok = ok and re.fullmatch(r"/?|/[0-9]+", parts.path) is not None
    if not ok:
        raise _Invalid(
            'must be "" (embedded), redis://host[:port][/db], rediss://host[:port][/db] '
            f"(TLS) or unix:///path, not {_show(url)}"
        )
    return url


#: The longest greeting or prompt text the file may give: with its fields filled in, a prompt
#: stays well under C{speech.max_text_chars} (whose least value is 200 more than this).
MAX_PROMPT_CHARS = 500


def _prompt_text(value: Any, base: Path) -> str:
    text = _str(empty=False)(value, base)
    if len(text) > MAX_PROMPT_CHARS:
        raise _Invalid(f"must be at most {MAX_PROMPT_CHARS} characters, not {len(text)}")
    return text


def _prompts(value: Any, base: Path) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of prompt texts, not {_show(value)}")
    for name, text in value.items():
        if not isinstance(text, str) or not text.strip():
            raise _Invalid(f"must be a non-empty string, not {_show(text)}", f".{name}")
        try:
            _prompt_text(text, base)
        except _Invalid as e:
            raise _Invalid(e.message, f".{name}") from None
    # A name or a field the flow does not know would otherwise fail mid-call; a field the
    # default lacks may be caller data (no prompt reads back what the visitor typed).
    for name, text in value.items():
        try:
            check_overrides({name: text})
        except ValueError as e:
            raise _Invalid(str(e), f".{name}") from None
    return MappingProxyType(dict(value))


# --- the schema ---------------------------------------------------------------------------


def _field(default: Any, check: Check, *, repr: bool = True) -> Any:
    """A setting: its default (run through C{check} like a value from the file) and check."""
    return attrs.field(default=default, metadata={"check": check}, repr=repr)


def _required(check: Check) -> Any:
    return attrs.field(metadata={"check": check})


def _table(cls: type) -> Any:
    """A sub-table, built from its own defaults when the file leaves it out."""
    return attrs.field(factory=cls, metadata={"table": cls})


_ms = _int(0, 60000)


def _advertise(value: Any, base: Path) -> str:
    if not isinstance(value, str) or (value and not valid_host(value)):
        raise _Invalid(
            f"must be an IP address or a host name, without a port, or empty, not {_show(value)}"
        )
    return value


def _node_name(value: Any, base: Path) -> str:
    if not isinstance(value, str) or (value and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value)):
        raise _Invalid(
            f"must be 1 to 64 of A-Z a-z 0-9 . _ - (or empty: the host name), not {_show(value)}"
        )
    return value


@frozen(kw_only=True)
class ServerConfig:
    """C{[server]}: the AudioSocket listeners and the process."""

    # Loopback by default: the PBX on the same host. Any other bind needs allowed_peers.
    bind: str = _field("127.0.0.1", _ip)
    max_calls: int = _field(100, _int(1, 100000))
    allowed_peers: tuple[str, ...] = _field([], _networks)  # as written; see allowed_networks
    state_dir: Path = _field("var", _path())
    port_fallback: bool = _field(False, _bool)
    port_fallback_range: tuple[int, int] = _field([20000, 20999], _port_range)
    handshake_timeout_s: float = _field(5.0, _positive)
    #: The host Asterisk connects resident calls to (the dial request's C{audiosocket},
    #: AMI's C{AUDIOSOCKET_HOST}): this node's own address. Empty: see L{return_host}.
    advertise: str = _field("", _advertise)
    #: This node's name in call records and C{/api/sessions}; empty: the host name.
    node: str = _field("", _node_name)

    def return_host(self, extension_host: str) -> str:
        """
        The host the PBX must connect a resident's call to, so that it comes back to this
        node (the one holding the visitor's session): C{advertise} when set; else C{bind}
        when it is a specific address (not C{0.0.0.0} / C{::}); else the extension's C{host},
        as when every node shared one address.
        """
        if self.advertise:
            return self.advertise
        if not ipaddress.ip_address(self.bind).is_unspecified:
            return self.bind
        return extension_host

    @property
    def node_name(self) -> str:
        """C{node}, or this machine's host name when it is empty."""
        return self.node or socket.gethostname()

    @property
    def allowed_networks(self) -> tuple[peers.Network, ...]:
        """C{allowed_peers} as networks (an address is a /32 or /128)."""
        return peers.networks(self.allowed_peers)

    def peer_allowed(self, host: str) -> bool:
        """
        May a peer at C{host} (an address string, as from C{getPeer().host}) connect to an
        AudioSocket port? Any may when C{allowed_peers} is empty. The rule is
        L{audiosocket.peers.peer_allowed}, the one the listeners apply.
        """
        return peers.peer_allowed(host, self.allowed_networks)


def _host_names(value: Any, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of host names or IP addresses, not {_show(value)}")
    names = []
    for i, item in enumerate(value):
        bracketed = isinstance(item, str) and item.startswith("[") and item.endswith("]")
        bare = item[1:-1] if bracketed else item
        if not valid_host(bare) or (bracketed and ":" not in bare):
            raise _Invalid(
                f"must be a host name or an IP address, without a port, not {_show(item)}",
                f"[{i}]",
            )
        names.append(host_name(item))
    return tuple(names)


def host_name(value: str) -> str | None:
    """
    The host part of a C{Host} header or an C{Origin}'s authority, normalized for comparing:
    lower case, an IPv6 address compressed and in brackets; the port, if any, dropped.
    L{None} when C{value} is not a host name or an IP address, with an optional port.

        >>> host_name("LocalHost:8082"), host_name("[0:0::1]"), host_name("::1")
        ('localhost', '[::1]', '[::1]')
    """
    if not isinstance(value, str):
        return None
    if value.startswith("["):
        address, bracket, port = value[1:].partition("]")
        if not bracket or (port and not re.fullmatch(r":[0-9]{1,5}", port)):
            return None
    elif value.count(":") > 1:  # a bare IPv6 address (only in the config)
        address = value
    else:
        address, colon, port = value.partition(":")
        if colon and not re.fullmatch(r"[0-9]{1,5}", port):
            return None
    if not valid_host(address):
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower()
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


#: The names the API always answers to, besides its endpoint's interface.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _rates(value: Any, base: Path) -> tuple[int, ...]:
    known = sorted(KIND_OF_RATE)
    if not isinstance(value, list) or not value:
        raise _Invalid(f"must be a non-empty list of sample rates from {known}, not {_show(value)}")
    for i, rate in enumerate(value):
        if isinstance(rate, bool) or rate not in KIND_OF_RATE:
            raise _Invalid(f"must be one of {known}, not {_show(rate)}", f"[{i}]")
    return tuple(sorted(set(value)))


@frozen(kw_only=True)
class LimitsConfig:
    """
    C{[limits]}: what one peer may make the server hold or do. Hitting a bound closes that
    one connection with a logged reason code, counted in C{audiosocket_refused_connections}.
    """

    max_connections_per_port: int = _field(200, _int(1, 1000000))
    max_connections_per_peer: int = _field(400, _int(1, 1000000))
    max_handshakes_per_port: int = _field(64, _int(1, 1000000))
    events_per_s: float = _field(20.0, _positive)
    event_burst: int = _field(40, _int(1, 100000))
    audio_burst_s: float = _field(2.0, _positive)
    max_unsent_kb: int = _field(64, _int(1, 1048576))
    slow_reader_s: float = _field(5.0, _positive)
    rates: tuple[int, ...] = _field([8000, 12000, 16000, 24000, 32000, 44100, 48000], _rates)
    max_rate_switches: int = _field(5, _int(0, 1000))
    max_busy: int = _field(20, _int(0, 100000))
    busy_max_s: float = _field(15.0, _positive)

    @property
    def leg_options(self) -> dict[str, Any]:
        """The bounds of one connection and one port: L{audiosocket.leg.LegFactory}'s keywords."""
        options = attrs.asdict(self)
        del options["max_busy"], options["busy_max_s"]  # the session registry's
        return options


@frozen(kw_only=True)
class ApiConfig:
    """
    C{[api]}: the HTTP API's endpoint, the names it answers to, its body cap and where its
    bearer token comes from (an environment variable, never the file).
    """

    endpoint: str = _field("tcp:8082:interface=127.0.0.1", _endpoint)
    token_env: str = _field("", _env_name)
    #: C{Host} names (and C{Origin} hosts) the API accepts, with any port; the endpoint's
    #: interface is always accepted too.
    allowed_hosts: tuple[str, ...] = _field(list(LOOPBACK_NAMES), _host_names)
    max_body_kb: int = _field(64, _int(1, 10240))

    @property
    def is_loopback(self) -> bool:
        """Only this host can reach the API: a unix socket, or tcp/ssl on a loopback interface."""
        kind, _, options = _endpoint_parts(self.endpoint)
        if kind == "unix":
            return True
        interface = options.get("interface", "")
        try:
            return interface == "localhost" or ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return False

    @property
    def host_names(self) -> frozenset[str]:
        """
        The normalized names (see L{host_name}) a request's C{Host} may carry: C{allowed_hosts}
        and the endpoint's interface, unless that is a wildcard (C{0.0.0.0}, C{::}).
        """
        names = set(self.allowed_hosts)
        _, _, options = _endpoint_parts(self.endpoint)
        interface = host_name(options.get("interface", ""))
        if interface is not None and interface not in ("0.0.0.0", "[::]"):
            names.add(interface)
        return frozenset(names)

    @property
    def max_body(self) -> int:
        """The request body cap in bytes."""
        return self.max_body_kb * 1024

    @property
    def requires_token(self) -> bool:
        """
        A token is configured, so every request must carry it. When this is true and
        L{bearer_token} is L{None} (its variable unset), the API must refuse every request.
        """
        return bool(self.token_env)

    def bearer_token(self) -> str | None:
        """The token requests must carry, read now from C{token_env}'s variable."""
        return secret(self.token_env)


@frozen(kw_only=True)
class RedisConfig:
    """C{[redis]}: an external server, or C{url = ""} for an embedded redis-server."""

    url: str = _field("", _redis_url)
    password_env: str = _field("", _env_name)
    timeout_s: float = _field(2.0, _positive)
    #: C{rediss://}: the CA certificate (PEM) the server's must chain to; "": the system's.
    ca_file: Path | None = _field(None, _optional(_path(must_be_file=True)))
    #: The embedded redis-server's memory cap, in MiB (its C{maxmemory}). Its policy is
    #: C{noeviction}: when full, writes fail loudly instead of keys vanishing.
    embedded_maxmemory_mb: int = _field(256, _int(16, 1048576))

    @property
    def embedded(self) -> bool:
        return not self.url


@frozen(kw_only=True)
class EspeakConfig:
    voice: str = _field("pt-br", _str(empty=False))
    speed: int = _field(165, _int(80, 450))  # words per minute
    pitch: int = _field(50, _int(0, 99))


@frozen(kw_only=True)
class WhisperConfig:
    """Any OpenAI-compatible transcription API: the client POSTs to {url}/audio/transcriptions."""

    url: str = _field("", _url("http", "https"))
    model: str = _field("whisper-1", _str())
    language: str = _field("pt", _str())
    api_key_env: str = _field("", _env_name)
    timeout_s: float = _field(10.0, _positive)


@frozen(kw_only=True)
class OpenAIConfig:
    url: str = _field("https://api.openai.com/v1", _url("http", "https"))
    model: str = _field("gpt-4o-mini-tts", _str())
    voice: str = _field("alloy", _str())
    api_key_env: str = _field("OPENAI_API_KEY", _env_name)
    timeout_s: float = _field(10.0, _positive)


@frozen(kw_only=True)
class AzureConfig:
    region: str = _field("", _str())
    key_env: str = _field("AZURE_SPEECH_KEY", _env_name)
    voice: str = _field("pt-BR-FranciscaNeural", _str())
    language: str = _field("pt-BR", _str())
    timeout_s: float = _field(10.0, _positive)


@frozen(kw_only=True)
class VoskConfig:
    model_dir: Path | None = _field("", _path(optional=True))


@frozen(kw_only=True)
class LlmConfig:
    url: str = _field("", _url("http", "https"))
    model: str = _field("", _str())
    api_key_env: str = _field("", _env_name)
    timeout_s: float = _field(5.0, _positive)


@frozen(kw_only=True)
class SpeechConfig:
    """C{[speech]}: which providers speak, listen and understand, and their settings."""

    tts: str = _field("espeak", _choice("espeak", "openai", "azure"))
    stt: str = _field("none", _choice("none", "whisper", "vosk", "azure"))
    nlu: str = _field("rules", _choice("rules", "llm"))
    cache_size: int = _field(256, _int(0))  # synthesized prompts kept in memory
    cache_mb: int = _field(32, _int(0, 4096))  # and at most this many MiB of them
    #: Longer texts are refused before synthesis (no prompt comes near it).
    max_text_chars: int = _field(1000, _int(MAX_PROMPT_CHARS + 200, 100000))
    espeak: EspeakConfig = _table(EspeakConfig)
    whisper: WhisperConfig = _table(WhisperConfig)
    openai: OpenAIConfig = _table(OpenAIConfig)
    azure: AzureConfig = _table(AzureConfig)
    vosk: VoskConfig = _table(VoskConfig)
    llm: LlmConfig = _table(LlmConfig)


@frozen(kw_only=True)
class AmiConfig:
    host: str = _field("127.0.0.1", _str())
    port: int = _field(5038, _int(1, 65535))
    username: str = _field("audiosocket", _str())
    secret_env: str = _field("AMI_SECRET", _env_name)
    context: str = _field("audiosocket-resident", _str(empty=False))


@frozen(kw_only=True)
class DialerConfig:
    """C{[dialer]}: how the resident's call is originated."""

    kind: str = _field("log", _choice("log", "http", "ami"))
    url: str = _field("", _url("http", "https"))
    timeout_s: float = _field(5.0, _positive)
    ami: AmiConfig = _table(AmiConfig)


@frozen(kw_only=True)
class EventsConfig:
    """
    C{[events]}: the call-end webhook. With C{url} set, each finished call's record is POSTed
    there as JSON, signed with HMAC-SHA256 under the secret in C{secret_env}; a failure is
    tried again C{retries} more times (after 1, 2, 4 ... s), C{timeout_s} each.
    """

    url: str = _field("", _url("http", "https"))
    secret_env: str = _field("", _env_name)
    timeout_s: float = _field(5.0, _positive)
    retries: int = _field(3, _int(0, 10))


@frozen(kw_only=True)
class AudioConfig:
    """C{[audio]}: voice activity detection and endpointing; durations in milliseconds."""

    vad_aggressiveness: int = _field(2, _int(0, 3))
    visitor_silence_ms: int = _field(700, _ms)
    resident_silence_ms: int = _field(600, _ms)
    speech_start_ms: int = _field(60, _ms)
    preroll_ms: int = _field(300, _ms)
    min_utterance_ms: int = _field(200, _ms)
    max_utterance_ms: int = _field(15000, _ms)
    barge_in: bool = _field(True, _bool)  # the visitor may talk over our prompts
    resident_barge_in: bool = _field(True, _bool)  # and the resident
    barge_in_greeting: bool = _field(True, _bool)  # false: the greeting always plays whole
    barge_in_ms: int = _field(250, _ms)
    echo_guard_ms: int = _field(200, _ms)


@frozen(kw_only=True)
class FlowConfig:
    """C{[flow]}: the conversation's timings and limits; C{prompts} overrides default texts."""

    ring_timeout_s: float = _field(30, _positive)
    attempts: int = _field(2, _int(1, 10))
    max_call_s: float = _field(180, _positive)
    dtmf_timeout_s: float = _field(3.0, _positive)
    decision_timeout_s: float = _field(10.0, _positive)
    max_retries: int = _field(2, _int(0, 10))
    wait_message_interval_s: float = _field(15.0, _positive)
    #: More keypad digits than this make the entry invalid (never an apartment).
    max_digits: int = _field(8, _int(1, 32))
    prompts: Mapping[str, str] = _field({}, _prompts)


@frozen(kw_only=True)
class PrivacyConfig:
    """
    C{[privacy]}: what a caller said may be kept. By default logs and call records say only the
    kind of input ("voice", "dtmf:1") and how many words, never the words.
    """

    log_speech: bool = _field(False, _bool)  # true: transcripts go to the log (debugging)
    record_speech: bool = _field(False, _bool)  # true: the resident's words go to the record
    #: true: the visitor's name goes to the call record and the access audit (false: neither
    #: keeps it; the announcement to the resident still says it).
    keep_visitor_names: bool = _field(True, _bool)
    #: Call records older than this many days are deleted (0: kept until the stream's cap).
    calls_retention_days: int = _field(90, _int(0, 36500))
    #: Access audit entries older than this many days are deleted (0: kept until the cap).
    access_retention_days: int = _field(180, _int(0, 36500))


@frozen(kw_only=True)
class AccessConfig:
    """
    C{[access]}: entering with a pre-authorisation code (C{*} + 6 digits + C{#} at the gate).
    A call gets C{code_tries_per_call} tries; C{lockout_failures} wrong codes on one extension
    within C{lockout_window_s} lock that extension's code entry for C{lockout_s} (brute force).
    """

    code_tries_per_call: int = _field(3, _int(1, 10))
    lockout_failures: int = _field(10, _int(1, 1000))
    lockout_window_s: float = _field(900.0, _positive)
    lockout_s: float = _field(900.0, _positive)
    #: Pre-authorisations a condominium may hold (a bound on the store and on each code check).
    max_preauths: int = _field(1000, _int(1, 100000))
    #: Entries the access audit stream keeps at most (trimmed approximately, oldest first).
    audit_maxlen: int = _field(100000, _int(100, 10_000_000))


def _dial_string(value: Any, base: Path) -> str:
    """A dial string, or C{""}: no comma (a C{Dial()} argument separator) and no line break."""
    text = _str()(value, base)
    if any(c in text for c in ",\r\n"):
        raise _Invalid(f"must be a dial string without commas or line breaks, not {_show(text)}")
    return text.strip()


@frozen(kw_only=True)
class DialStrategyConfig:
    """
    C{[condominiums.dial]}: whom a visitor's call rings. C{unit}: the apartment's
    C{voip_number}; C{sequential}: each distinct phone of the unit in turn (the resident named
    first), C{ring_timeout_s} each; C{parallel}: all at once, the first to answer decides.
    """

    strategy: str = _field("unit", _choice("unit", "sequential", "parallel"))


@frozen(kw_only=True)
class OperatorConfig:
    """
    C{[condominiums.operator]}: the human the call is handed to (C{dial}, empty: none) when the
    visitor presses 0 or asks for a person, recognition fails twice, and, as chosen here, when
    nobody answered or the apartment is unknown.
    """

    dial: str = _field("", _dial_string)
    on_no_answer: str = _field("goodbye", _choice("operator", "goodbye"))
    on_unknown_apartment: str = _field("goodbye", _choice("operator", "goodbye"))


def _timezone(value: Any, base: Path) -> str:
    name = _str(empty=False)(value, base)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _Invalid(f'must be an IANA time zone such as "America/Sao_Paulo", not {_show(name)}') from None
    return name


def _gate_digits(value: Any, base: Path) -> str:
    text = _str(show=False)(value, base)
    if not re.fullmatch(r"[0-9*#A-Dw]{0,32}", text):
        # Never echo it: the gate's code is a secret of the building.
        raise _Invalid("must be up to 32 DTMF characters (0-9 * # A-D, w for a pause)")
    return text


@frozen(kw_only=True)
class GateConfig:
    """
    C{[condominiums.gate]}: what opens the gate once the visitor may enter. C{none}: nothing
    (the decision is only recorded); C{dtmf}: the PBX sends C{digits} on the visitor's intercom
    line after the goodbye (the hand-off C{open,<digits>}); C{http}: a relay controller at
    C{url} is called (C{method}, JSON body, HMAC-SHA256 signature with the secret named by
    C{secret_env}), C{timeout_s} per try, C{retries} more tries after a failure.
    """

    kind: str = _field("none", _choice("none", "dtmf", "http"))
    digits: str = _field("", _gate_digits, repr=False)
    url: str = _field("", _url("http", "https"))
    method: str = _field("POST", _choice("POST", "PUT"))
    secret_env: str = _field("", _env_name)
    timeout_s: float = _field(3.0, _positive)
    retries: int = _field(2, _int(0, 5))
    #: Pre-authorisation codes (C{*} + code + C{#}) are offered and accepted at this gate.
    codes: bool = _field(True, _bool)


@frozen(kw_only=True)
class Condominium:
    """One C{[[condominiums]]} item: a building, its greeting and its residents directory."""

    id: int = _required(_int(1, 2**31 - 1))
    name: str = _required(_str(empty=False))
    directory: Path = _required(_path(must_be_file=True))
    greeting: str = attrs.field(
        default=attrs.Factory(lambda self: f"{self.name}, em que posso ajudar?", takes_self=True),
        metadata={"check": _prompt_text},
    )
    max_calls: int | None = _field(None, _optional(_int(1, 100000)))
    #: C{[condominiums.audio]}: this building's own [audio] settings (a noisy gate may need a
    #: longer silence); any key of [audio], the others taken from it.
    audio: Mapping[str, Any] = _field({}, lambda value, base: _audio_overrides(value, base))
    dial: DialStrategyConfig = _table(DialStrategyConfig)
    operator: OperatorConfig = _table(OperatorConfig)
    gate: GateConfig = _table(GateConfig)
    #: The building's local time zone: pre-authorisation hours and weekdays are read in it.
    timezone: str = _field("America/Sao_Paulo", _timezone)

    def audio_config(self, audio: "AudioConfig") -> "AudioConfig":
        """The global C{[audio]} with this condominium's overrides."""
        return attrs.evolve(audio, **self.audio) if self.audio else audio


def _audio_overrides(value: Any, base: Path) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of [audio] settings, not {_show(value)}")
    fields = attrs.fields_dict(AudioConfig)
    checked = {}
    for name, raw in value.items():
        if name not in fields:
            raise _Invalid(_unknown(name, fields), f".{name}")
        try:
            checked[name] = fields[name].metadata["check"](raw, base)
        except _Invalid as e:
            raise _Invalid(e.message, f".{name}" + e.key) from None
    return MappingProxyType(checked)


_SECTIONS = {
    "server": ServerConfig,
    "api": ApiConfig,
    "redis": RedisConfig,
    "speech": SpeechConfig,
    "dialer": DialerConfig,
    "audio": AudioConfig,
    "flow": FlowConfig,
    "privacy": PrivacyConfig,
    "limits": LimitsConfig,
    "access": AccessConfig,
    "events": EventsConfig,
}


@frozen(kw_only=True)
class Config:
    """The whole file. Build it with L{load_config} or L{parse_config}."""

    path: Path
    server: ServerConfig
    api: ApiConfig
    redis: RedisConfig
    speech: SpeechConfig
    dialer: DialerConfig
    audio: AudioConfig
    flow: FlowConfig
    privacy: PrivacyConfig
    limits: LimitsConfig
    access: AccessConfig
    events: EventsConfig
    condominiums: tuple[Condominium, ...]
    extensions: tuple[Extension, ...]

    def condominium(self, id: int) -> Condominium:
        """@raise KeyError: no condominium has this id."""
        for condominium in self.condominiums:
            if condominium.id == id:
                return condominium
        raise KeyError(id)

    @staticmethod
    def secret(env_name: str) -> str | None:
        """See L{secret}."""
        return secret(env_name)

    def unset_secrets(self) -> list["UnsetSecret"]:
        """
        The secrets this configuration uses whose environment variable is unset or empty, read
        now. C{required} ones stop start-up (and fail C{--check}): the API token when the API
        is reachable from other hosts, the AMI secret with C{dialer.kind = "ami"}, the Azure
        key when Azure speaks or listens. The others are warnings: the API token on loopback
        (every API request would be refused), the external Redis password, the OpenAI,
        Whisper and LLM keys of the providers in use (sent without a key).
        """
        wanted = []
        api = self.api
        if api.token_env:
            wanted.append(
                ("api.token_env", api.token_env, not api.is_loopback,
                 "the API refuses every request (401)")
            )
        if self.redis.password_env and not self.redis.embedded:
            wanted.append(
                ("redis.password_env", self.redis.password_env, False,
                 "Redis is used without a password")
            )
        if self.dialer.kind == "ami":
            wanted.append(
                ("dialer.ami.secret_env", self.dialer.ami.secret_env, True,
                 "the AMI login fails")
            )
        speech = self.speech
        if "azure" in (speech.tts, speech.stt):
            wanted.append(
                ("speech.azure.key_env", speech.azure.key_env, True, "Azure speech fails")
            )
        if self.events.url and self.events.secret_env:
            wanted.append(
                ("events.secret_env", self.events.secret_env, True,
                 "call records cannot be signed (none is sent)")
            )
        for i, condominium in enumerate(self.condominiums):
            gate = condominium.gate
            if gate.kind == "http" and gate.secret_env:
                wanted.append(
                    (f"condominiums[{i}].gate.secret_env", gate.secret_env, True,
                     "the gate relay cannot be signed (the gate never opens)")
                )
        optional = [
            (speech.tts == "openai", "speech.openai.api_key_env", speech.openai.api_key_env),
            (speech.stt == "whisper", "speech.whisper.api_key_env", speech.whisper.api_key_env),
            (speech.nlu == "llm", "speech.llm.api_key_env", speech.llm.api_key_env),
        ]
        for used, key, env_name in optional:
            if used and env_name:
                wanted.append((key, env_name, False, "requests are sent without a key"))
        return [
            UnsetSecret(key, env_name, required, effect)
            for key, env_name, required, effect in wanted
            if not secret(env_name)
        ]


@frozen
class UnsetSecret:
    """A secret the configuration uses whose variable is unset (see L{Config.unset_secrets})."""

    key: str
    variable: str
    required: bool
    effect: str

    def __str__(self) -> str:
        return "{}: environment variable {} is not set ({})".format(
            self.key, self.variable, self.effect
        )


# --- building -----------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    """C{server} + C{bind} is C{server.bind}; C{allowed_peers} + C{[1]} is C{allowed_peers[1]}."""
    if not prefix or name.startswith("["):
        return prefix + name
    return f"{prefix}.{name}"


def _unknown(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return "unknown key" + (f'; did you mean "{close[0]}"?' if close else "")


#: Keys that once existed and must not come back, with what to do instead.
_REFUSED = {
    "api.token": "a token is not kept in the config file (anyone who can read the file, or a "
    "backup of it, could use the API): put it in an environment variable and name that "
    "variable in api.token_env",
}


def _check_keys(data: dict, known, key: str) -> None:
    for name in data:
        if _join(key, name) in _REFUSED:
            raise _Invalid(_REFUSED[_join(key, name)], _join(key, name))
        if name not in known:
            raise _Invalid(_unknown(name, known), _join(key, name))


def _build(cls: type, data: Any, key: str, base: Path) -> Any:
    """Check table C{data} (at dotted C{key}) against C{cls}'s fields and build one."""
    if not isinstance(data, dict):
        raise _Invalid(f"must be a table, not {_show(data)}", key)
    fields = attrs.fields_dict(cls)
    _check_keys(data, fields, key)
    values = {}
    for name, field in fields.items():
        where = _join(key, name)
        if "table" in field.metadata:
            values[name] = _build(field.metadata["table"], data.get(name, {}), where, base)
            continue
        if name in data:
            raw = data[name]
        elif field.default is attrs.NOTHING:
            raise _Invalid("is required", where)
        elif isinstance(field.default, attrs.Factory):
            continue  # computed from other fields by attrs
        else:
            raw = field.default
        try:
            values[name] = field.metadata["check"](raw, base)
        except _Invalid as e:
            raise _Invalid(e.message, where + e.key) from None
    return cls(**values)


def _items(data: dict, name: str) -> list[dict]:
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise _Invalid(f"must be an array of tables ([[{name}]]), not {_show(items)}", name)
    return items


def _extension(data: dict, key: str) -> Extension:
    # Unknown keys are refused here, in the config's words; the rest is the model's validation,
    # shared with the HTTP API and the store.
    _check_keys(data, EXTENSION_FIELDS, key)
    try:
        return Extension.from_dict(data)
    except InvalidField as e:
        raise _Invalid(e.message, _join(key, e.field)) from None


# Choosing a provider makes some of its settings mandatory: (setting, choice) -> settings.
_NEEDS = {
    ("speech.tts", "openai"): ("speech.openai.url", "speech.openai.model", "speech.openai.voice"),
    ("speech.tts", "azure"): ("speech.azure.region", "speech.azure.voice"),
    ("speech.stt", "whisper"): ("speech.whisper.url", "speech.whisper.model"),
    ("speech.stt", "vosk"): ("speech.vosk.model_dir",),
    ("speech.stt", "azure"): ("speech.azure.region", "speech.azure.language"),
    ("speech.nlu", "llm"): ("speech.llm.url", "speech.llm.model"),
    ("dialer.kind", "http"): ("dialer.url",),
    ("dialer.kind", "ami"): ("dialer.ami.host", "dialer.ami.username"),
}


#: Providers that may carry a key: (URL setting, key setting).
_KEYED_URLS = (
    ("speech.whisper.url", "speech.whisper.api_key_env"),
    ("speech.openai.url", "speech.openai.api_key_env"),
    ("speech.llm.url", "speech.llm.api_key_env"),
)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _get(config: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), config)


def _check_rules(config: Config) -> None:
    """The rules that join two or more settings."""
    for (setting, choice), needed in _NEEDS.items():
        if _get(config, setting) == choice:
            for key in needed:
                if not _get(config, key):
                    raise _Invalid(f'is required when {setting} = "{choice}"', key)
    for url_key, key_env in _KEYED_URLS:
        url = _get(config, url_key)
        if url and _get(config, key_env) and urlsplit(url).scheme == "http":
            if not _is_loopback(urlsplit(url).hostname):
                raise _Invalid(
                    f"must be https:// when {key_env} is set: the key would cross the network "
                    f"in clear (plain http:// is only for a server on loopback), not {_show(url)}",
                    url_key,
                )
    vosk = config.speech.vosk.model_dir
    if config.speech.stt == "vosk" and not vosk.is_dir():
        raise _Invalid(f"no such directory: {vosk}", "speech.vosk.model_dir")

    if not peers.is_loopback(config.server.bind) and not config.server.allowed_peers:
        # Any host that can reach the AudioSocket ports could otherwise play Asterisk.
        raise _Invalid(
            "must list the PBX's address(es) when server.bind is not a loopback address "
            f'("{config.server.bind}"); or bind "127.0.0.1" with the PBX on this host',
            "server.allowed_peers",
        )

    if not config.api.is_loopback and not config.api.requires_token:
        raise _Invalid(
            "must name the environment variable holding the API token when the API is not "
            f'on loopback ("{config.api.endpoint}")',
            "api.token_env",
        )

    audio = config.audio
    if audio.max_utterance_ms < audio.min_utterance_ms:
        raise _Invalid(
            f"must be at least audio.min_utterance_ms ({audio.min_utterance_ms}), "
            f"not {audio.max_utterance_ms}",
            "audio.max_utterance_ms",
        )

    events = config.events
    if events.url:
        if not events.secret_env:
            raise _Invalid(
                "is required when events.url is set: the receiver must be able to tell the "
                "server's records from anyone else's (HMAC-SHA256 signature)",
                "events.secret_env",
            )
        parts = urlsplit(events.url)
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            # A call record holds personal data (who came to see whom).
            raise _Invalid(
                "must be https:// for a receiver on another host (plain http:// is only for "
                f"one on loopback), not {_show(events.url)}",
                "events.url",
            )

    condominium_ids: dict[int, str] = {}
    for i, condominium in enumerate(config.condominiums):
        key = f"condominiums[{i}].id"
        if condominium.id in condominium_ids:
            raise _Invalid(
                f"duplicate id {condominium.id} (also {condominium_ids[condominium.id]})", key
            )
        condominium_ids[condominium.id] = key
        gate = condominium.gate
        if gate.kind == "dtmf" and not gate.digits:
            raise _Invalid('is required when gate.kind = "dtmf"', f"condominiums[{i}].gate.digits")
        if gate.kind == "http":
            if not gate.url:
                raise _Invalid('is required when gate.kind = "http"', f"condominiums[{i}].gate.url")
            if not gate.secret_env:
                raise _Invalid(
                    'is required when gate.kind = "http": the relay must be able to tell the '
                    "server's calls from anyone else's (HMAC-SHA256 signature)",
                    f"condominiums[{i}].gate.secret_env",
                )
            parts = urlsplit(gate.url)
            if parts.scheme == "http" and not _is_loopback(parts.hostname):
                # The signature does not hide the body, and a replayed request is another
                # open: off this host the relay is reached over TLS.
                raise _Invalid(
                    "must be https:// for a relay on another host (plain http:// is only for "
                    f"a relay on loopback), not {_show(gate.url)}",
                    f"condominiums[{i}].gate.url",
                )
        operator = condominium.operator
        for when in ("on_no_answer", "on_unknown_apartment"):
            if getattr(operator, when) == "operator" and not operator.dial:
                raise _Invalid(
                    f'needs condominiums[{i}].operator.dial: "operator" is nobody without it',
                    f"condominiums[{i}].operator.{when}",
                )

    kind, args, _ = _endpoint_parts(config.api.endpoint)
    api_port = 0 if kind == "unix" else int(args[0])
    ports = {api_port: "api.endpoint"} if api_port else {}
    extension_ids: dict[int, str] = {}
    for i, extension in enumerate(config.extensions):
        key = f"extensions[{i}]"
        if extension.id in extension_ids:
            raise _Invalid(
                f"duplicate id {extension.id} (also {extension_ids[extension.id]})", f"{key}.id"
            )
        extension_ids[extension.id] = f"{key}.id"
        if extension.condominium_id not in condominium_ids:
            raise _Invalid(
                f"no condominium has id {extension.condominium_id}", f"{key}.condominium_id"
            )
        for name in ("ai_port", "return_port"):
            port = getattr(extension, name)
            if port in ports:
                raise _Invalid(f"port {port} is already used by {ports[port]}", f"{key}.{name}")
            ports[port] = f"{key}.{name}"


def parse_config(data: dict, path: str | os.PathLike) -> Config:
    """
    Validate C{data} (as from C{tomllib}) read from C{path}; relative paths in it are relative
    to C{path}'s directory.

    @raise ConfigError: naming C{path} and the first bad key.
    """
    absolute = Path(os.path.abspath(path))
    base = absolute.parent
    try:
        _check_keys(data, [*_SECTIONS, "condominiums", "extensions"], "")
        sections = {
            name: _build(cls, data.get(name, {}), name, base) for name, cls in _SECTIONS.items()
        }
        condominiums = tuple(
            _build(Condominium, item, f"condominiums[{i}]", base)
            for i, item in enumerate(_items(data, "condominiums"))
        )
        if not condominiums:
            raise _Invalid("at least one [[condominiums]] table is required", "condominiums")
        extensions = tuple(
            _extension(item, f"extensions[{i}]")
            for i, item in enumerate(_items(data, "extensions"))
        )
        config = Config(path=absolute, condominiums=condominiums, extensions=extensions, **sections)
        _check_rules(config)
    except _Invalid as e:
        raise ConfigError(path, e.key or None, e.message) from None
    return config


def load_config(path: str | os.PathLike) -> Config:
    """
    Read, parse and validate the TOML file at C{path}.

    @raise ConfigError: the file cannot be read, is not TOML, or has a bad setting.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"invalid TOML: not UTF-8 ({e.reason})") from None
    return parse_config(data, path)
