"""
Value objects shared by config, store and API: what an extension (*ramal*) is.

Validation lives here once, so the config file, the HTTP API and the Redis store refuse the
same things with the same words. Errors name the field.

These values end up in dial strings and Asterisk channel variables (C{host:return_port} is
where Asterisk connects the resident's leg, the numbers are dialed), so they are held to the
characters that can mean nothing else there:

  - C{host}: an IPv4 or IPv6 address (no brackets, no zone) or a DNS host name of RFC 1123
    labels (letters, digits, inner hyphens; 63 per label, 253 in all; the last label not all
    digits). No port, no comma, no space, no control character: C{10.0.0.2:8081,X=Y} would
    otherwise smuggle a channel variable into an AMI Originate.
  - C{ai_extension}, C{return_extension}: 1 to 32 of C{0-9 A-Z a-z * # + -}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from attrs import asdict, field, frozen


class InvalidField(ValueError):
    """
    A value object was given a bad field. C{field} names it (for a config error or a 422).
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


EXTENSION_FIELDS = (
    "id",
    "ai_extension",
    "ai_port",
    "return_extension",
    "return_port",
    "host",
    "condominium_id",
    "max_calls",
)
_REQUIRED = EXTENSION_FIELDS[:-1]


def _int(data: dict, name: str, lo: int, hi: int) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(name, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidField(name, f"must be between {lo} and {hi}, not {value}")
    return value


def _str(data: dict, name: str) -> str:
    value = data[name]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # the original stored extension numbers as numbers
    if not isinstance(value, str) or not value.strip():
        raise InvalidField(name, "must be a non-empty string")
    return value.strip()


_NUMBER = re.compile(r"[0-9A-Za-z*#+-]{1,32}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def valid_host(value: str) -> bool:
    """
    Is C{value} an IP address (v4, or v6 without brackets or zone) or an RFC 1123 host name?
    Nothing else: no port, no brackets, no separator of any kind.
    """
    if not isinstance(value, str) or not value.isascii() or "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    labels = value.split(".")
    return (
        len(value) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()  # "10.0.0.300" is a bad address, not a name
    )


def _check_number(instance, attribute, value) -> None:
    if not isinstance(value, str) or not _NUMBER.fullmatch(value):
        raise InvalidField(
            attribute.name, "must be 1 to 32 of the characters 0-9 A-Z a-z * # + -"
        )


def _check_host(instance, attribute, value) -> None:
    if not valid_host(value):
        raise InvalidField(
            attribute.name,
            "must be an IP address or a DNS host name, without a port "
            "(no commas, spaces or control characters)",
        )


@frozen
class Extension:
    """
    One condominium entry point: an AI port where visitors arrive and a return port where
    the resident's call comes back, with the leg UUID the server made for that dial.
    """

    id: int
    ai_extension: str = field(validator=_check_number)
    ai_port: int
    return_extension: str = field(validator=_check_number)
    return_port: int
    host: str = field(validator=_check_host)
    condominium_id: int
    max_calls: int | None = None  # per-extension admission limit; None = only the global one

    @classmethod
    def from_dict(cls, data: Any) -> "Extension":
        """
        Build from untrusted input (JSON body, TOML table, Redis hash). Constructing one
        directly runs the same checks on C{host} and the extension numbers.

        @raise InvalidField: naming the first bad, missing or unknown field.
        """
        if not isinstance(data, dict):
            raise InvalidField("extension", "must be an object")
        for name in data:
            if name not in EXTENSION_FIELDS:
                raise InvalidField(name, "unknown field")
        for name in _REQUIRED:
            if name not in data:
                raise InvalidField(name, "is required")
        ai_port = _int(data, "ai_port", 1, 65535)
        return_port = _int(data, "return_port", 1, 65535)
        if ai_port == return_port:
            raise InvalidField("return_port", "must differ from ai_port")
        max_calls = data.get("max_calls")
        if max_calls is not None:
            max_calls = _int(data, "max_calls", 1, 100000)
        return cls(
            id=_int(data, "id", 1, 2**31 - 1),
            ai_extension=_str(data, "ai_extension"),
            ai_port=ai_port,
            return_extension=_str(data, "return_extension"),
            return_port=return_port,
            host=_str(data, "host"),
            condominium_id=_int(data, "condominium_id", 1, 2**31 - 1),
            max_calls=max_calls,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def address(self, port: int) -> str:
        """
        C{host:port} as Asterisk's C{AudioSocket()} parses it: an IPv6 host in brackets
        (C{[2001:db8::5]:8081}), anything else as it is.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"
