"""
C{audiosocket-admin}: manage a running server's extensions over its HTTP API.

    audiosocket-admin [--url URL] [--token-file FILE] list
    audiosocket-admin add --id 2 --ai-extension 1003 --ai-port 8090 \\
        --return-extension 1004 --return-port 8091 --host 10.0.0.5 --condominium-id 1
    audiosocket-admin add --json extension.json
    audiosocket-admin remove 2 [--force]
    audiosocket-admin restart 2
    audiosocket-admin import ramais_config.json
    audiosocket-admin preauth add --condominium-id 1 --apartment 101 --name "Maria" \
        --from 2026-12-01T00:00:00-03:00 --until 2027-03-01T00:00:00-03:00 \
        [--weekdays 1,3] [--hours 08:00-17:00] [--uses 24]
    audiosocket-admin preauth list --condominium-id 1 [--apartment 101]
    audiosocket-admin preauth delete ID
    audiosocket-admin directory list
    audiosocket-admin directory show CONDOMINIUM_ID
    audiosocket-admin directory import CONDOMINIUM_ID apartments.json
    audiosocket-admin directory export CONDOMINIUM_ID > apartments.json
    audiosocket-admin directory set CONDOMINIUM_ID 101 --voip PJSIP/1101 \
        --resident "Ana Souza" --resident "Carlos Souza=PJSIP/carlos"
    audiosocket-admin directory remove CONDOMINIUM_ID 101

C{preauth add} prints the visitor's 6-digit code: the only time it is shown (the server keeps
only its hash). C{preauth list} never shows a code.

C{directory} manages the residents directories the server keeps in its store (the config's
directory files only seed it): C{import} replaces a condominium's whole directory with a file
in the original system's format (C{apartments.json}, as is), C{export} prints it in that
format, C{set} adds or replaces one apartment (C{--resident NAME=PHONE}: a resident with a
phone of their own), C{remove} deletes one. The next call uses the change; no reload.

C{import} reads the original system's C{ramais_config.json}: a JSON list (or
C{{"ramais": [...]}}) of objects with C{ramal_ia}, C{porta_ia}, C{ramal_retorno},
C{porta_retorno}, C{ip_servidor}, C{condominio_id} and optionally C{id}; entries without an id
get 1, 2, ... skipping ids already on the server or in the file. Each entry is reported as
created, already existing (409) or invalid (422, naming the original field); the exit status
is 0 only if every entry was created.

The bearer token comes from the environment variable C{AUDIOSOCKET_API_TOKEN}, or from a file
named with C{--token-file} (its first line; surrounding whitespace ignored). Never from the
command line: every user of the machine can read a process's arguments (C{ps}), so C{--token}
is refused with a pointer to both.

Exit status: 0 success, 1 the server refused something, 2 usage error, bad file or server
unreachable. HTTP errors are reported in one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO
from urllib.parse import quote

from twisted.internet import defer, task

DEFAULT_URL = "http://127.0.0.1:8082"
TOKEN_ENV = "AUDIOSOCKET_API_TOKEN"
REQUEST_TIMEOUT_S = 30

#: The original system's field names → ours.
ORIGINAL_FIELDS = {
    "id": "id",
    "ramal_ia": "ai_extension",
    "porta_ia": "ai_port",
    "ramal_retorno": "return_extension",
    "porta_retorno": "return_port",
    "ip_servidor": "host",
    "condominio_id": "condominium_id",
}
_OURS_TO_ORIGINAL = {v: k for k, v in ORIGINAL_FIELDS.items()}
_INTEGER_FIELDS = ("id", "ai_port", "return_port", "condominium_id")


class AdminError(Exception):
    """A failure reported to the user in one line (exit status C{code})."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class HttpError(AdminError):
    def __init__(self, status: int, data: Any):
        if isinstance(data, dict) and "error" in data:
            message = "HTTP {} {}: {}".format(status, data["error"], data.get("detail", ""))
        else:
            message = "HTTP {}: {}".format(status, str(data)[:200])
        super().__init__(message, 1)
        self.status = status
        self.data = data if isinstance(data, dict) else {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audiosocket-admin",
        description="Manage audiosocket extensions (ramais). The bearer token is read from "
        "${} or --token-file.".format(TOKEN_ENV),
        allow_abbrev=False,  # "--token X" must not become "--token-file X"
    )
    p.add_argument("--url", default=DEFAULT_URL, help="API base URL (default %(default)s)")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the bearer token from FILE (default: ${})".format(TOKEN_ENV),
    )
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list extensions")
    add = sub.add_parser("add", help="add an extension")
    add.add_argument("--json", metavar="FILE", help="read the extension from a JSON file")
    add.add_argument("--id", type=int)
    add.add_argument("--ai-extension")
    add.add_argument("--ai-port", type=int)
    add.add_argument("--return-extension")
    add.add_argument("--return-port", type=int)
    add.add_argument("--host")
    add.add_argument("--condominium-id", type=int)
    add.add_argument("--max-calls", type=int)
    remove = sub.add_parser("remove", help="remove an extension")
    remove.add_argument("id", type=int)
    remove.add_argument(
        "--force", action="store_true", help="hang up its calls instead of draining them"
    )
    restart = sub.add_parser("restart", help="reopen an extension's ports")
    restart.add_argument("id", type=int)
    imp = sub.add_parser("import", help="import the original ramais_config.json")
    imp.add_argument("file")
    dialplan = sub.add_parser(
        "dialplan", help="print the Asterisk [globals] lines that route each AI extension here"
    )
    dialplan.add_argument(
        "--cli",
        action="store_true",
        help='print "asterisk -rx \'dialplan set global ...\'" commands (no reload) instead',
    )
    _preauth_parser(sub)
    _directory_parser(sub)
    return p


def _preauth_parser(sub) -> None:
    pre = sub.add_parser("preauth", help="pre-authorised visitors (access codes)")
    cmds = pre.add_subparsers(dest="preauth_command", required=True, metavar="ACTION")
    add = cmds.add_parser("add", help="pre-authorise a visitor; prints the code once")
    add.add_argument("--condominium-id", type=int, required=True)
    add.add_argument("--apartment", required=True)
    add.add_argument("--name", required=True, help="the visitor's name")
    add.add_argument(
        "--from", dest="valid_from", required=True, metavar="ISO8601",
        help="valid from (with Z or an offset, e.g. 2026-12-01T08:00:00-03:00)",
    )
    add.add_argument(
        "--until", dest="valid_until", required=True, metavar="ISO8601",
        help="valid until (exclusive; with Z or an offset)",
    )
    add.add_argument(
        "--weekdays", metavar="DAYS", help="comma-separated days, 0 = Monday ... 6 = Sunday"
    )
    add.add_argument("--hours", metavar="HH:MM-HH:MM", help="local hours, e.g. 08:00-17:00")
    add.add_argument("--uses", type=int, default=1, help="entries allowed (default 1)")
    lst = cmds.add_parser("list", help="a condominium's pre-authorisations (never a code)")
    lst.add_argument("--condominium-id", type=int, required=True)
    lst.add_argument("--apartment")
    delete = cmds.add_parser("delete", help="delete a pre-authorisation")
    delete.add_argument("id")


class _RefuseToken(argparse.Action):
    """C{--token VALUE}: refused, without repeating the value."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            "--token is not accepted: a command line is visible to every user of this "
            "machine; set ${} or use --token-file FILE".format(TOKEN_ENV)
        )


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AdminError(
            "cannot read the token file {}: {}".format(path, getattr(e, "strerror", None) or e), 2
        ) from None
    if not token:
        raise AdminError("the token file {} is empty".format(path), 2)
    return token


class _Client:
    """JSON over treq, with the bearer token and a timeout on every request."""

    def __init__(self, reactor, url: str, token: str | None):
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self._reactor = reactor
        self._url = url.rstrip("/")
        self._token = token
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Accept": ["application/json"]}
        if self._token:
            headers["Authorization"] = ["Bearer " + self._token]
        kwargs = {}
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            kwargs["data"] = json.dumps(body).encode("utf-8")
        url = self._url + path
        try:
            response = await self._http.request(
                method,
                url,
                headers=headers,
                timeout=REQUEST_TIMEOUT_S,
                **kwargs,
            )
            raw = await response.content()
        except Exception as e:
            raise AdminError(
                "cannot reach the API at {}: {}".format(self._url, _reason(e)), 2
            ) from None
        try:
            data = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            data = raw.decode("utf-8", "replace")
        return response.code, data

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, body)
        if not 200 <= status < 300:
            error = HttpError(status, data)
            if status == 401:
                error.args = (
                    str(error) + " (set ${} or give --token-file)".format(TOKEN_ENV),
                )
            raise error
        return data

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _reason(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)  # ResponseNeverReceived and friends
    if reasons:
        return "; ".join(str(r.value) for r in reasons)
    return str(e) or type(e).__name__


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise AdminError("cannot read {}: {}".format(path, e.strerror or e), 2)
    except ValueError as e:
        raise AdminError("{} is not valid JSON: {}".format(path, e), 2)


# ---------------------------------------------------------------- commands


async def _list(client: _Client, args, out: TextIO) -> int:
    data = await client.ok("GET", "/api/extensions")
    rows = [
        (
            "ID",
            "AI EXT",
            "AI PORT",
            "RETURN EXT",
            "RETURN PORT",
            "HOST",
            "CONDO",
            "STATUS",
            "CALLS",
        )
    ]
    for e in data.get("extensions", []):
        rows.append(
            tuple(
                str(x)
                for x in (
                    e["id"],
                    e["ai_extension"],
                    e.get("bound_ai_port") or e["ai_port"],
                    e["return_extension"],
                    e.get("bound_return_port") or e["return_port"],
                    e["host"],
                    e["condominium_id"],
                    e["status"] + (" ({})".format(e["error"]) if e.get("error") else ""),
                    e.get("active_calls", 0),
                )
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    return 0


def _describe(e: dict) -> str:
    return "extension {} ({}): AI port {}, return port {}, {}".format(
        e["id"],
        e["ai_extension"],
        e.get("bound_ai_port") or e["ai_port"],
        e.get("bound_return_port") or e["return_port"],
        e["status"],
    )


async def _add(client: _Client, args, out: TextIO) -> int:
    flags = {
        "id": args.id,
        "ai_extension": args.ai_extension,
        "ai_port": args.ai_port,
        "return_extension": args.return_extension,
        "return_port": args.return_port,
        "host": args.host,
        "condominium_id": args.condominium_id,
        "max_calls": args.max_calls,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if args.json:
        if given:
            raise AdminError("add: give either --json or the field options, not both", 2)
        body = _read_json(args.json)
    else:
        missing = [
            "--" + k.replace("_", "-")
            for k in flags
            if k != "max_calls" and flags[k] is None
        ]
        if missing:
            raise AdminError("add: missing {}".format(", ".join(missing)), 2)
        body = given
    data = await client.ok("POST", "/api/extensions", body)
    out.write("created " + _describe(data) + "\n")
    return 0


async def _remove(client: _Client, args, out: TextIO) -> int:
    path = "/api/extensions/{}".format(args.id)
    if args.force:
        path += "?force=true"
    data = await client.ok("DELETE", path)
    out.write("removed extension {} ({})\n".format(data["id"], data["status"]))
    return 0


async def _restart(client: _Client, args, out: TextIO) -> int:
    data = await client.ok("POST", "/api/extensions/{}/restart".format(args.id))
    out.write("restarted " + _describe(data) + "\n")
    return 0


def _original_entries(data: Any, path: str) -> list:
    if isinstance(data, dict) and "ramais" in data:
        data = data["ramais"]
    if not isinstance(data, list):
        raise AdminError(
            '{}: expected a JSON list of extensions or {{"ramais": [...]}}'.format(path), 2
        )
    return data


def _convert(entry: Any) -> tuple[dict | None, str | None, list[str]]:
    """
    An original entry in our field names, or (None, why it is invalid); plus the names of
    fields the original had that we do not use (reported, not fatal).
    """
    if not isinstance(entry, dict):
        return None, "must be a JSON object, not {}".format(type(entry).__name__), []
    body, ignored = {}, []
    for key, value in entry.items():
        ours = ORIGINAL_FIELDS.get(key)
        if ours is None:
            ignored.append(key)
            continue
        # The original sometimes wrote numbers as strings.
        if ours in _INTEGER_FIELDS and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        body[ours] = value
    return body, None, ignored


async def _import(client: _Client, args, out: TextIO) -> int:
    entries = _original_entries(_read_json(args.file), args.file)
    existing = {e["id"] for e in (await client.ok("GET", "/api/extensions"))["extensions"]}
    bodies = [_convert(entry) for entry in entries]
    taken = existing | {
        b["id"] for b, _, _ in bodies if b is not None and isinstance(b.get("id"), int)
    }
    next_id = 1
    created = exists = invalid = 0
    for n, (body, why, ignored) in enumerate(bodies, 1):
        label = "entry {}".format(n)
        if body is not None and "ai_extension" in body:
            label += " (ramal_ia {})".format(body["ai_extension"])
        if ignored:
            out.write("{}: ignoring unused field(s) {}\n".format(label, ", ".join(ignored)))
        if body is None:
            invalid += 1
            out.write("{}: invalid: {}\n".format(label, why))
            continue
        assigned = "id" not in body
        if assigned:
            while next_id in taken:
                next_id += 1
            body["id"] = next_id
            taken.add(next_id)
        status, data = await client.call("POST", "/api/extensions", body)
        data = data if isinstance(data, dict) else {}
        if assigned and status != 201:
            # An entry that did not go in does not use up the id it was given.
            taken.discard(body["id"])
            next_id = min(next_id, body["id"])
        if status == 201:
            created += 1
            out.write("{}: created {}\n".format(label, _describe(data)))
        elif status == 409:
            exists += 1
            out.write("{}: already exists: {}\n".format(label, data.get("detail", "")))
        elif status == 422:
            invalid += 1
            field = data.get("field", "")
            detail = data.get("detail", "")
            original = _OURS_TO_ORIGINAL.get(field)
            if original and detail.startswith(field + ":"):
                detail = original + detail[len(field) :]
            out.write("{}: invalid: {}\n".format(label, detail))
        else:
            raise HttpError(status, data)
    out.write(
        "imported {} of {}: {} already existed, {} invalid\n".format(
            created, len(bodies), exists, invalid
        )
    )
    return 0 if created == len(bodies) else 1


def _audiosocket_address(host: str, port: int) -> str:
    """C{host:port} as C{AudioSocket()} parses it: an IPv6 address in brackets."""
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


async def _dialplan(client: _Client, args, out: TextIO) -> int:
    """
    The globals the shipped visitor context reads (C{AUDIOSOCKET_AI_<ai_extension>} =
    C{host:ai_port}, the port actually listening), one per extension, from the server itself:
    paste them into C{[globals]} of extensions.conf, or apply them live with C{--cli}.
    """
    data = await client.ok("GET", "/api/extensions")
    extensions = sorted(data.get("extensions", []), key=lambda e: e["ai_extension"])
    lines = []
    for e in extensions:
        name = "AUDIOSOCKET_AI_{}".format(e["ai_extension"])
        address = _audiosocket_address(e["host"], e.get("bound_ai_port") or e["ai_port"])
        if args.cli:
            lines.append("asterisk -rx 'dialplan set global {} {}'".format(name, address))
        else:
            lines.append(
                "{} = {}  ; extension {}, condominium {}, residents come back to {}:{}{}".format(
                    name, address, e["id"], e["condominium_id"], e["host"],
                    e.get("bound_return_port") or e["return_port"],
                    "" if e["status"] == "listening" else " (now {})".format(e["status"]),
                )
            )
    if not args.cli:
        out.write(
            "; Generated by audiosocket-admin dialplan: the visitor context of\n"
            "; etc/asterisk/extensions.conf sends a call to AI extension N to AUDIOSOCKET_AI_N.\n"
            "[globals]\n"
        )
    for line in lines:
        out.write(line + "\n")
    return 0


async def _preauth(client: _Client, args, out: TextIO) -> int:
    return await _PREAUTH_COMMANDS[args.preauth_command](client, args, out)


def _days(text: str) -> list[int]:
    try:
        return [int(day) for day in text.split(",")]
    except ValueError:
        raise AdminError(
            "preauth add: --weekdays must be comma-separated numbers, 0 = Monday ... 6 = Sunday",
            2,
        ) from None


def _window(p: dict) -> str:
    text = "{} to {}".format(p["valid_from"], p["valid_until"])
    if p.get("weekdays") is not None:
        text += ", weekdays " + ",".join(str(d) for d in p["weekdays"])
    if p.get("hours"):
        text += ", " + p["hours"]
    return text


async def _preauth_add(client: _Client, args, out: TextIO) -> int:
    body = {
        "condominium_id": args.condominium_id,
        "apartment": args.apartment,
        "visitor_name": args.name,
        "valid_from": args.valid_from,
        "valid_until": args.valid_until,
        "uses": args.uses,
    }
    if args.weekdays is not None:
        body["weekdays"] = _days(args.weekdays)
    if args.hours is not None:
        body["hours"] = args.hours
    p = await client.ok("POST", "/api/preauth", body)
    out.write(
        "created pre-authorisation {} for {} (apartment {}), {} use(s), {}\n".format(
            p["id"], p["visitor_name"], p["apartment"], p["uses"], _window(p)
        )
    )
    out.write("code: {}  (shown only now: give it to the visitor, who types * code #)\n".format(
        p["code"]
    ))
    return 0


async def _preauth_list(client: _Client, args, out: TextIO) -> int:
    path = "/api/preauth?condominium_id={}".format(args.condominium_id)
    if args.apartment:
        path += "&apartment=" + quote(args.apartment)
    data = await client.ok("GET", path)
    rows = [("ID", "APT", "VISITOR", "USES", "VALID")]
    for p in data.get("preauths", []):
        rows.append((p["id"], p["apartment"], p["visitor_name"], str(p["uses"]), _window(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    return 0


async def _preauth_delete(client: _Client, args, out: TextIO) -> int:
    await client.ok("DELETE", "/api/preauth/" + quote(args.id, safe=""))
    out.write("deleted pre-authorisation {}\n".format(args.id))
    return 0


_PREAUTH_COMMANDS = {
    "add": _preauth_add,
    "list": _preauth_list,
    "delete": _preauth_delete,
}

_COMMANDS = {
    "list": _list,
    "add": _add,
    "remove": _remove,
    "restart": _restart,
    "import": _import,
    "dialplan": _dialplan,
    "preauth": _preauth,
    "directory": lambda client, args, out: _DIRECTORY_COMMANDS[args.directory_command](
        client, args, out
    ),
}


# ---------------------------------------------------------------- residents directories


def _directory_parser(sub) -> None:
    directory = sub.add_parser("directory", help="the residents directories (apartments)")
    cmds = directory.add_subparsers(dest="directory_command", required=True, metavar="ACTION")
    cmds.add_parser("list", help="the condominiums and their apartments count")
    show = cmds.add_parser("show", help="a condominium's apartments")
    show.add_argument("condominium_id", type=int)
    imp = cmds.add_parser(
        "import", help="replace a condominium's whole directory with a JSON file (apartments.json)"
    )
    imp.add_argument("condominium_id", type=int)
    imp.add_argument("file")
    export = cmds.add_parser("export", help="print a condominium's directory as JSON (importable)")
    export.add_argument("condominium_id", type=int)
    put = cmds.add_parser("set", help="add or replace one apartment")
    put.add_argument("condominium_id", type=int)
    put.add_argument("number")
    put.add_argument("--voip", required=True, help="the apartment's dial string (voip_number)")
    put.add_argument(
        "--resident",
        action="append",
        default=[],
        metavar="NAME[=PHONE]",
        help="a resident (repeat for each); =PHONE: their own dial string",
    )
    remove = cmds.add_parser("remove", help="remove one apartment")
    remove.add_argument("condominium_id", type=int)
    remove.add_argument("number")


def _apartments_path(cid: int, number: str | None = None) -> str:
    path = "/api/condominiums/{}/apartments".format(cid)
    return path if number is None else path + "/" + quote(number, safe="")


def _resident_text(resident: Any) -> str:
    if isinstance(resident, dict):
        return "{}={}".format(resident.get("name"), resident.get("phone"))
    return str(resident)


def _table(out: TextIO, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


async def _directory_list(client: _Client, args, out: TextIO) -> int:
    data = await client.ok("GET", "/api/condominiums")
    rows = [("ID", "NAME", "APARTMENTS")]
    for c in data.get("condominiums", []):
        rows.append((str(c["id"]), c["name"], str(c["apartments"])))
    _table(out, rows)
    return 0


async def _directory_show(client: _Client, args, out: TextIO) -> int:
    data = await client.ok("GET", _apartments_path(args.condominium_id))
    rows = [("APT", "VOIP", "RESIDENTS")]
    for a in data.get("apartments", []):
        residents = ", ".join(_resident_text(r) for r in a["residents"])
        rows.append((a["apartment_number"], a["voip_number"], residents))
    _table(out, rows)
    return 0


async def _directory_import(client: _Client, args, out: TextIO) -> int:
    data = _read_json(args.file)
    stored = await client.ok("PUT", _apartments_path(args.condominium_id), data)
    out.write(
        "condominium {}: {} apartment(s) imported from {}; the next call uses them\n".format(
            args.condominium_id, len(stored.get("apartments", [])), args.file
        )
    )
    return 0


async def _directory_export(client: _Client, args, out: TextIO) -> int:
    data = await client.ok("GET", _apartments_path(args.condominium_id))
    out.write(json.dumps(data.get("apartments", []), ensure_ascii=False, indent=2) + "\n")
    return 0


async def _directory_set(client: _Client, args, out: TextIO) -> int:
    residents: list[Any] = []
    for text in args.resident:
        name, sep, phone = text.partition("=")
        residents.append({"name": name, "phone": phone} if sep else name)
    body = {"residents": residents, "voip_number": args.voip}
    status, data = await client.call(
        "PUT", _apartments_path(args.condominium_id, args.number), body
    )
    if status not in (200, 201):
        raise HttpError(status, data)
    out.write(
        "{} apartment {} of condominium {}: {} ({})\n".format(
            "added" if status == 201 else "replaced",
            data["apartment_number"],
            args.condominium_id,
            data["voip_number"],
            ", ".join(_resident_text(r) for r in data["residents"]) or "no residents",
        )
    )
    return 0


async def _directory_remove(client: _Client, args, out: TextIO) -> int:
    await client.ok("DELETE", _apartments_path(args.condominium_id, args.number))
    out.write("removed apartment {} of condominium {}\n".format(args.number, args.condominium_id))
    return 0


_DIRECTORY_COMMANDS = {
    "list": _directory_list,
    "show": _directory_show,
    "import": _directory_import,
    "export": _directory_export,
    "set": _directory_set,
    "remove": _directory_remove,
}


async def run(
    reactor,
    argv: list[str],
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    env: dict | None = None,
) -> int:
    """Run one command; returns the exit status (errors are written to C{err})."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    env = env if env is not None else os.environ
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error
        return e.code if isinstance(e.code, int) else 2
    try:
        token = _read_token(args.token_file) if args.token_file else env.get(TOKEN_ENV) or None
    except AdminError as e:
        err.write("audiosocket-admin: {}\n".format(e))
        return e.code
    client = _Client(reactor, args.url, token)
    try:
        return await _COMMANDS[args.command](client, args, out)
    except AdminError as e:
        err.write("audiosocket-admin: {}\n".format(e))
        return e.code
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    """Console entry point C{audiosocket-admin}."""
    argv = sys.argv[1:] if argv is None else argv

    async def _main(reactor):
        code = await run(reactor, argv)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":  # pragma: no cover
    main()
