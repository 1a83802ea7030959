# -*- test-case-name: tests.test_dashboard -*-
"""
The operator's screen: pages in pt-BR served by the API's own site at C{/}.

  - C{/} I{Ao vivo}: calls in progress (extension, condominium, state, elapsed time,
    apartment, visitor, the resident's leg, each leg's audio level in and out, the latest
    line understood when C{[privacy] log_speech} allows it), with a "desligar" button;
  - C{/ramais}: extensions, with forms to add, change, remove and restart them;
  - C{/chamadas}: finished calls with filters, and C{/chamadas/<uuid>} for one call;
  - C{/acessos}: the access audit (every gate opening, attempted or done) with filters;
  - C{/saude}: Redis, the dialer, providers, pacing, version and uptime.

Templates are rendered on the server (Jinja2, autoescaped); the pages update themselves by
fetching fragments (C{/parts/...}) when C{GET /api/events} says something changed (htmx and
its SSE extension, vendored in C{static/} with their licences; no CDN, no build step). Every
change a page makes is a call to the JSON API with the login's CSRF token (C{static/app.js}):
the dashboard has no way to change anything the API does not offer.

Access is the API's: every page and static file is behind the same guard
(L{audiosocket.api.Api.authorize}), except C{/login} and the two static files it needs, which
are in L{audiosocket.api.Api.open_routes}. An anonymous browser asking for a page gets the
401 as a small HTML page pointing to C{/login} (see L{audiosocket.dashboard.auth}).
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from klein import Klein
from twisted.logger import Logger

from ..model import InvalidField
from ..store import StoreUnavailable
from .auth import SESSION_COOKIE

HERE = pathlib.Path(__file__).resolve().parent
STATIC = HERE / "static"
#: Static files served without a login (the login page's own).
OPEN_STATIC = ("style.css", "login.js")
_API_PATHS = (b"/api/", b"/healthz", b"/metrics")
_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
    ".LICENSE": b"text/plain; charset=utf-8",
}
_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

STATES = {
    "greeting": "saudação",
    "collecting": "ouvindo o visitante",
    "dialing": "chamando o morador",
    "announcing": "anunciando",
    "deciding": "aguardando decisão",
    "finishing": "encerrando",
    "ended": "encerrada",
}
OUTCOMES = {
    "authorized": "autorizado",
    "denied": "negado",
    "no_decision": "sem decisão",
    "no_answer": "sem resposta",
    "unknown_apartment": "apartamento desconhecido",
    "abandoned": "abandonada",
    "busy": "linhas ocupadas",
    "error": "erro",
    "transferred": "transferida",
    "preauthorized": "pré-autorizado",
}
EXT_STATUS = {
    "listening": "ouvindo",
    "failed": "falhou",
    "draining": "encerrando chamadas",
    "stopped": "parado",
}
ENDED_BY = {
    "visitor": "visitante",
    "resident": "morador",
    "operator": "operador (painel ou API)",
    "max_call": "tempo máximo da chamada",
    "shutdown": "desligamento do servidor",
    "server": "servidor",
}
HISTORY_LIMIT = 1000
ACCESS_LIMIT = 500
ACCESS_RESULTS = {
    "opened": "aberto",
    "handed_off": "enviado ao PABX",
    "failed": "falhou",
    "not_opened": "não aberto",
}
AUTHORIZED_BY = {"resident": "morador", "preauth": "pré-autorização", "operator": "operador"}


def is_page(path: bytes) -> bool:
    """Is C{path} the dashboard's (not the JSON API's)?"""
    return not (path == b"/api" or path.startswith(_API_PATHS))


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return "{}:{:02d}".format(seconds // 60, seconds % 60)


def _level(dbfs: int | None) -> int:
    """A level meter's value, 0–100, from dBFS (-60 dBFS and below is 0)."""
    if dbfs is None:
        return 0
    return max(0, min(100, round((dbfs + 60) * 100 / 60)))


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "{} d {} h {} min".format(days, hours, minutes)
    if hours:
        return "{} h {} min".format(hours, minutes)
    return "{} min {} s".format(minutes, secs)


class Health:
    """Each check's consecutive failures: yellow after one, red only after two."""

    def __init__(self):
        self.failures: dict[str, int] = {}
        self._late_ticks: int | None = None

    def judge(self, name: str, ok: bool) -> str:
        count = 0 if ok else self.failures.get(name, 0) + 1
        self.failures[name] = count
        return "ok" if count == 0 else ("warn" if count == 1 else "fail")

    def pacing_ok(self, late_ticks: int) -> bool:
        before, self._late_ticks = self._late_ticks, late_ticks
        return before is None or late_ticks <= before


class Dashboard:
    """
    The pages, as a Klein app of their own; L{audiosocket.api.Api} builds one and serves
    it behind its guard for every path outside C{/api/}, C{/healthz} and C{/metrics}.
    """

    app = Klein()
    log = Logger()

    def __init__(self, api, *, privacy=None, dialer=None):
        self.api = api
        # The privacy settings in effect: a callable (the flow's, swapped by a reload) or a
        # fixed value.
        self._privacy = privacy if callable(privacy) else (lambda: privacy)
        self.dialer = dialer
        self.health = Health()
        self.env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters.update(
            state=lambda s: STATES.get(s, s or "—"),
            outcome=lambda s: OUTCOMES.get(s, s or "—"),
            ext_status=lambda s: EXT_STATUS.get(s, s or "—"),
            ended_by=lambda s: ENDED_BY.get(s, s or "—"),
            elapsed=_elapsed,
            level=_level,
            access_result=lambda s: ACCESS_RESULTS.get(s, s or "—"),
            authorized_by=lambda s: AUTHORIZED_BY.get(s, s or "—"),
        )

    # ------------------------------------------------------------ helpers


    @property
    def log_speech(self) -> bool:
        """Whether the screen may show what callers said (C{[privacy] log_speech} now)."""
        return bool(getattr(self._privacy(), "log_speech", False))

    def render(self, request, name: str, **context) -> bytes:
        login = getattr(request, "dashboard_login", None)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", _CSP)
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        context.setdefault("csrf", login.csrf if login is not None else "")
        context.setdefault("logged_in", login is not None)
        context.setdefault("log_speech", self.log_speech)
        return self.env.get_template(name).render(**context).encode("utf-8")

    def unauthorized_page(self, request, error) -> bytes:
        """The guard's 401 for a page: the same status, with a way to the login page."""
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setResponseCode(401)
        return self.render(request, "unauthorized.html", page="login", detail=error.detail)

    def _extensions(self) -> list[dict]:
        return self.api._describe_all()

    def _sessions(self) -> list[dict]:
        extensions = {e["id"]: e for e in self._extensions()}
        rows = []
        for data in sorted(
            self.api._sessions.describe_all(), key=lambda d: d.get("started_at") or ""
        ):
            ext = extensions.get(data.get("extension_id"), {})
            legs = data.get("legs") or {}
            resident = legs.get("resident")
            if resident is None:
                resident_state = "chamando" if data.get("state") == "dialing" else "—"
            else:
                resident_state = "desligou" if resident.get("closed") else "em linha"
            rows.append(
                dict(
                    data,
                    ai_extension=ext.get("ai_extension", "?"),
                    resident_state=resident_state,
                    visitor_leg=legs.get("visitor") or {},
                    resident_leg=resident or {},
                    elapsed_s=(data.get("timings") or {}).get("total_s"),
                )
            )
        return rows

    # ------------------------------------------------------------ pages

    @app.route("/", methods=["GET"])
    def live(self, request):
        return self.render(request, "live.html", page="live", sessions=self._sessions())

    @app.route("/parts/live", methods=["GET"])
    def live_part(self, request):
        return self.render(request, "parts/live.html", sessions=self._sessions())

    @app.route("/ramais", methods=["GET"])
    def extensions(self, request):
        return self.render(
            request, "extensions.html", page="extensions", extensions=self._extensions()
        )

    @app.route("/parts/ramais", methods=["GET"])
    def extensions_part(self, request):
        return self.render(request, "parts/extensions.html", extensions=self._extensions())

    @app.route("/chamadas", methods=["GET"])
    async def calls(self, request):
        filters = {
            name: (_text_arg(request, name) or "").strip()
            for name in ("outcome", "condominium_id", "apartment", "date")
        }
        calls = await self._history()
        shown = [c for c in calls if _matches(c, filters)]
        return self.render(
            request,
            "calls.html",
            page="calls",
            calls=shown,
            total=len(calls),
            filters=filters,
            outcomes=OUTCOMES,
        )

    @app.route("/chamadas/<string:call_id>", methods=["GET"])
    async def call_detail(self, request, call_id):
        calls = await self._history()
        call = next((c for c in calls if c.get("uuid") == call_id), None)
        if call is None:
            request.setResponseCode(404)
        return self.render(
            request, "call.html", page="calls", call=call, call_id=call_id,
            timeline=_timeline(call) if call else [],
            record_json=json.dumps(call, ensure_ascii=False, indent=2) if call else "",
        )

    async def _history(self) -> list[dict]:
        try:
            return list(await self.api._store.recent_calls(HISTORY_LIMIT))
        except Exception:
            self.log.failure("reading the call history failed")
            return []

    @app.route("/acessos", methods=["GET"])
    async def access_page(self, request):
        filters = {
            name: (_text_arg(request, name) or "").strip()
            for name in ("condominium_id", "apartment", "date")
        }
        entries: list[dict] = []
        problem = None
        try:
            query = _access_query(filters)
        except ValueError as e:
            problem = str(e)
        else:
            try:
                entries = list(await self.api._store.access_events(limit=ACCESS_LIMIT, **query))
            except StoreUnavailable:
                problem = "O registro de acessos está indisponível agora (Redis)."
        return self.render(
            request, "access.html", page="access", entries=entries, filters=filters,
            problem=problem, limit=ACCESS_LIMIT,
        )

    @app.route("/autorizacoes", methods=["GET"])
    async def preauth_page(self, request):
        filters = {
            name: (_text_arg(request, name) or "").strip() for name in ("condominium_id", "apartment")
        }
        items, problem = await self._preauth_items(filters)
        return self.render(
            request, "preauths.html", page="preauths", items=items, filters=filters,
            problem=problem, condominiums=self._condominium_ids(),
        )

    @app.route("/parts/autorizacoes", methods=["GET"])
    async def preauth_part(self, request):
        filters = {
            name: (_text_arg(request, name) or "").strip() for name in ("condominium_id", "apartment")
        }
        items, problem = await self._preauth_items(filters)
        return self.render(request, "parts/preauths.html", items=items, problem=problem)

    def _condominium_ids(self) -> list[int]:
        """The condominiums the extensions serve (the ones a pre-authorisation can be for)."""
        return sorted({e["condominium_id"] for e in self._extensions()})

    async def _preauth_items(self, filters: dict) -> tuple[list[dict], str | None]:
        """The live pre-authorisations (never a code) of the condominium asked, or of all."""
        preauths = self.api._preauths
        if preauths is None:
            return [], "Este servidor não guarda pré-autorizações."
        raw = filters["condominium_id"]
        if raw and not raw.isdigit():
            return [], "Condomínio deve ser um número."
        ids = [int(raw)] if raw else self._condominium_ids()
        items: list[dict] = []
        try:
            for cid in ids:
                for item in await preauths.list(cid, filters["apartment"] or None):
                    items.append(item.to_public())
        except StoreUnavailable:
            return [], "As pré-autorizações estão indisponíveis agora (Redis)."
        except (InvalidField, KeyError) as e:
            return [], "Filtro inválido: {}".format(e)
        return items, None

    @app.route("/saude", methods=["GET"])
    def health_page(self, request):
        return self.render(request, "health.html", page="health", checks=self._checks())

    @app.route("/parts/saude", methods=["GET"])
    def health_part(self, request):
        return self.render(request, "parts/health.html", checks=self._checks())

    def _checks(self) -> dict[str, Any]:
        status = dict(self.api._status())
        store_ok = bool(self.api._store.available)
        clock = status.get("clock") or {}
        speech = status.get("speech") or {}
        dialer_kind = status.get("dialer") or "?"
        ready = getattr(self.dialer, "ready", None)
        if ready is None:
            dialer_ok, dialer_text = True, "{} (sem conexão a vigiar)".format(dialer_kind)
        else:
            dialer_ok = bool(ready)
            dialer_text = "{}: {}".format(
                dialer_kind, "conectado" if dialer_ok else "sem conexão com o AMI"
            )
        late = clock.get("late_ticks")
        pacing_ok = self.health.pacing_ok(late) if late is not None else True
        extensions = self._extensions()
        failed = [e["id"] for e in extensions if e.get("status") == "failed"]
        checks = [
            ("Redis", self.health.judge("redis", store_ok),
             "disponível" if store_ok else "indisponível"),
            ("Discador", self.health.judge("dialer", dialer_ok), dialer_text),
            ("Provedores", "ok", "voz: {} · transcrição: {} · compreensão: {}".format(
                speech.get("tts", "?"), speech.get("stt", "?"), speech.get("nlu", "?"))),
            ("Ritmo do áudio", self.health.judge("pacing", pacing_ok),
             "ticks atrasados: {} · atraso p99: {} ms · máx.: {} ms".format(
                 late if late is not None else "—",
                 _num(clock.get("lateness_p99_ms")), _num(clock.get("lateness_max_ms")))),
            ("Ramais", self.health.judge("extensions", not failed),
             "{} ramal(is); falharam: {}".format(
                 len(extensions), ", ".join(map(str, failed)) or "nenhum")),
        ]
        sessions = status.get("sessions") or {}
        return {
            "checks": checks,
            "version": status.get("version", "?"),
            "uptime": _uptime(status.get("uptime_s")),
            "node": status.get("node_id", "—"),
            "sessions": sessions,
        }

    # ------------------------------------------------------------ login

    @app.route("/login", methods=["GET"])
    def login_page(self, request):
        return self.render(request, "login.html", page="login",
                           token_required=self.api._token is not None)

    @app.route("/login", methods=["POST"])
    def login(self, request):
        """Reached only with the token (the guard judged it): give the session cookie."""
        request.setResponseCode(204)
        if self.api._token is None:
            return b""
        login = self.api.logins.create(self.api._token())
        cookie = SESSION_COOKIE + b"=" + login.cookie.encode("ascii")
        cookie += b"; Path=/; HttpOnly; SameSite=Strict"
        if request.isSecure():
            cookie += b"; Secure"
        request.setHeader(b"Set-Cookie", cookie)
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    @app.route("/logout", methods=["POST"])
    def logout(self, request):
        login = getattr(request, "dashboard_login", None)
        if login is not None:
            self.api.logins.remove(login)
        request.setHeader(
            b"Set-Cookie",
            SESSION_COOKIE + b"=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        )
        request.setResponseCode(204)
        return b""

    # ------------------------------------------------------------ static files

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request, name):
        path = STATIC / name
        suffix = ".LICENSE" if name.endswith(".LICENSE") else path.suffix
        if "/" in name or name.startswith(".") or not path.is_file() or suffix not in _TYPES:
            from werkzeug.exceptions import NotFound

            raise NotFound()
        request.setHeader(b"Content-Type", _TYPES[suffix])
        request.setHeader(b"Cache-Control", b"max-age=300")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return path.read_bytes()

    # ------------------------------------------------------------ errors

    @app.handle_errors(Exception)
    def error(self, request, failure):
        return self.api.answer_error(request, self.api._api_error(request, failure))


def _text_arg(request, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    return values[-1].decode("utf-8", "replace")[:64]


def _num(value) -> str:
    return "—" if value is None else "{:g}".format(round(float(value), 1))


def _matches(call: dict, filters: dict) -> bool:
    if filters["outcome"] and call.get("outcome") != filters["outcome"]:
        return False
    if filters["condominium_id"] and str(call.get("condominium_id")) != filters["condominium_id"]:
        return False
    apartment = ((call.get("facts") or {}).get("apartment") or "")
    if filters["apartment"] and str(apartment) != filters["apartment"]:
        return False
    if filters["date"] and not str(call.get("started_at") or "").startswith(filters["date"]):
        return False
    return True


def _access_query(filters: dict) -> dict:
    """
    The page's filters as C{access_events} arguments (a date is a whole UTC day).

    @raise ValueError: a filter that is not valid, said in pt-BR.
    """
    query: dict[str, Any] = {}
    if filters["condominium_id"]:
        if not filters["condominium_id"].isdigit():
            raise ValueError("Condomínio deve ser um número.")
        query["condominium_id"] = int(filters["condominium_id"])
    if filters["apartment"]:
        query["apartment"] = filters["apartment"]
    if filters["date"]:
        try:
            day = datetime.datetime.strptime(filters["date"], "%Y-%m-%d")
        except ValueError:
            raise ValueError("Data deve ser AAAA-MM-DD.") from None
        start = day.replace(tzinfo=datetime.timezone.utc).timestamp()
        query.update(since=start, until=start + 86400 - 0.001)
    return query


def _timeline(call: dict) -> list[tuple[str, str]]:
    timings = call.get("timings") or {}
    items = [("0,0 s", "início da chamada ({})".format(call.get("started_at", "?")))]
    if timings.get("to_resident_s") is not None:
        items.append((_secs(timings["to_resident_s"]), "morador atendeu"))
    if timings.get("to_decision_s") is not None:
        items.append((_secs(timings["to_decision_s"]), "decisão"))
    if timings.get("total_s") is not None:
        items.append((_secs(timings["total_s"]), "fim ({})".format(call.get("ended_at", "?"))))
    return items


def _secs(value: float) -> str:
    return "{:.1f} s".format(value).replace(".", ",")


__all__ = ["Dashboard", "is_page"]
