"""
Fixtures for the real-PBX tests: one private Asterisk per module (L{tests.pbx.asterisk}), and
per test a L{Rig} — the doorman server configured with the AMI dialer pointed at that
Asterisk, a test AMI connection, and phones.

Without C{ASTERISK_PREFIX} these tests are skipped, saying why; with
C{AUDIOSOCKET_REQUIRE_PBX=1} (set by CI) a missing PBX fails them instead.

Each test's per-leg report (who hung up, RTP inter-arrival p50/p99/max, stalls inside speech,
digits pressed, Asterisk's warnings) is printed in pytest's terminal summary; figures are
reported, never asserted against a wall-clock threshold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from audiosocket.config import parse_config
from audiosocket.service import makeService
from pbx.asterisk import Asterisk, Phone, connect_ami
from test_service import free_ports  # noqa: F401  (the PBX tests import it from here)

REQUIRE_ENV = "AUDIOSOCKET_REQUIRE_PBX"
SECRET_ENV = "PBX_TEST_AMI_SECRET"

#: Per test: the legs' reports, printed at the end of the run.
#: The user_properties key of a rig's report (what its phones heard).
PBX_REPORT = "pbx_report"


@pytest.fixture(scope="module")
def asterisk():
    """A private Asterisk from C{ASTERISK_PREFIX}, booted once per module."""
    prefix = os.environ.get("ASTERISK_PREFIX")
    if not prefix:
        reason = (
            "ASTERISK_PREFIX is not set: no Asterisk to run the real-PBX tests against "
            "(point it at an install, e.g. ASTERISK_PREFIX=/opt/asterisk)"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason + "; {}=1 makes them required".format(REQUIRE_ENV))
        pytest.skip(reason)
    if not (Path(prefix) / "sbin" / "asterisk").exists():
        pytest.fail("ASTERISK_PREFIX={} has no sbin/asterisk".format(prefix))
    pbx = Asterisk(prefix)
    pbx.start()
    try:
        yield pbx
    finally:
        pbx.stop()
        pbx.remove()


def _reports(terminalreporter) -> list[tuple[str, dict]]:
    """Each rig's report, from the teardown reports (in order, each test once)."""
    found: dict[str, tuple[str, dict]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "teardown":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key == PBX_REPORT:
                    found[report.nodeid] = (report.nodeid.rsplit("::", 1)[-1], value)
    return list(found.values())


def pbx_summary(terminalreporter):
    """
    What the phones heard, after the run (called by tests/conftest.py's
    C{pytest_terminal_summary}: under pytest-xdist the controller loads only that conftest).
    """
    REPORTS = _reports(terminalreporter)
    if not REPORTS:
        return
    import numpy as np

    write = terminalreporter.write_line
    terminalreporter.section("real PBX: what the phones heard (RTP inter-arrival, ms)")
    gaps = []
    for name, report in REPORTS:
        write(name)
        for leg in report["legs"]:
            gaps.extend(leg.pop("gaps_ms", []))
            write(
                "  {phone:<14} hung up by {hung_up_by!s:<5} in {packets_in:>4} out {packets_out:>4} "
                "speech {speech_s:>5.2f} s  p50 {p50} p99 {p99} max {max}  "
                "stalls in speech {stalls}  keys {keys!r}".format(
                    phone=leg["phone"], hung_up_by=leg["hung_up_by"],
                    packets_in=leg["packets_in"], packets_out=leg["packets_out"],
                    speech_s=leg["speech_s"], p50=leg.get("p50_ms"), p99=leg.get("p99_ms"),
                    max=leg.get("max_ms"), stalls=leg["stalls_in_speech"] or "none",
                    keys=leg["digits_pressed"],
                )
            )
        for line in report["asterisk_warnings"]:
            write("  asterisk: " + line)
        for line in report["server_warnings"]:
            write("  server: " + line)
    if gaps:
        g = np.asarray(gaps)
        write(
            "all legs: {} gaps, p50 {:.2f} p99 {:.2f} max {:.2f} ms".format(
                g.size, np.percentile(g, 50), np.percentile(g, 99), g.max()
            )
        )


# -- the server's config -------------------------------------------------------------------------

#: Short prompts and timeouts: the whole layer should take a couple of minutes.
PROMPTS = {
    "keypad_hint": "Digite o apartamento.",
    "calling": "Aguarde.",
    "still_calling": "Aguarde.",
    "no_answer": "O morador não atendeu. Até logo.",
    "authorized": "Entrada autorizada.",
    "denied": "Entrada negada.",
    "no_decision": "Sem resposta do morador.",
    "goodbye": "Até logo.",
    "announce": "Visita no {apartment}.",
    "announce_unknown": "Visita no {apartment}.",
    "ask_decision_keypad": "Tecle 1 ou 2.",
    "visitor_left": "O visitante desligou.",
    "resident_authorized": "Autorizado. Até logo.",
    "resident_denied": "Negado. Até logo.",
    "resident_no_decision": "Sem resposta. Até logo.",
}

#: Apartments and their dial strings, as a deployment's directory would have them: 101..110
#: ring a test phone, 201 is busy, 202 rings unanswered, 901 answers after 2 s of ringing.
def directory() -> list[dict]:
    rows = [
        {
            "apartment_number": str(n),
            "residents": ["Morador {}".format(n)],
            "voip_number": "Local/{}@pbx-phones/n".format(n),
        }
        for n in range(101, 111)
    ]
    rows += [
        {"apartment_number": "201", "residents": ["Ocupado"], "voip_number": "Local/busy@pbx-phones/n"},
        {"apartment_number": "202", "residents": ["Ausente"], "voip_number": "Local/noanswer@pbx-phones/n"},
        {"apartment_number": "901", "residents": ["Demorado"], "voip_number": "Local/901@pbx-phones/n"},
    ]
    return rows


def extension(id: int, ai_extension: str, ai: int, ret: int) -> dict:
    return {
        "id": id,
        "ai_extension": ai_extension,
        "ai_port": ai,
        "return_extension": str(int(ai_extension) + 1),
        "return_port": ret,
        "host": "127.0.0.1",
        "condominium_id": 1,
    }


# -- the rig ------------------------------------------------------------------------------------


class Rig:
    """
    One test's doorman server, AMI connection and phones, on the module's Asterisk.

    @ivar records: the call records, by visitor phone name, once L{finish} ran.
    """

    def __init__(self, asterisk: Asterisk, tmp_path: Path, name: str):
        self.asterisk = asterisk
        self.tmp_path = tmp_path
        self.name = name
        self.phones: list[Phone] = []
        self.ami = None
        self.svc = None
        self.server_problems: list[str] = []
        self.seen_channels: list[str] = []
        self.mark = asterisk.log_mark()

    def _observe(self, event):
        level = event.get("log_level")
        if level is not None and level.name in ("warn", "error", "critical"):
            from twisted.logger import formatEvent

            self.server_problems.append("{}: {}".format(level.name, formatEvent(event)))

    async def start(
        self,
        extensions: list[dict],
        server: dict | None = None,
        *,
        rows: list[dict] | None = None,
        condominium: dict | None = None,
        **flow,
    ) -> None:
        """
        Start the server with these extensions: C{server} adds to its C{[server]} table (e.g.
        C{bind}, C{node}); C{rows} replace the directory's apartments, C{condominium} adds
        keys to the condominium's table (C{dial}, C{operator}), C{flow} to C{[flow]}. Each
        extension is routed to C{bind}.
        """
        self.ami = await connect_ami(reactor, self.asterisk)
        self.ami.listeners.append(self._event)
        path = self.tmp_path / "apartments.json"
        path.write_text(json.dumps(directory() if rows is None else rows))
        data = {
            "server": {
                "bind": "127.0.0.1", "state_dir": str(self.tmp_path / "var"), **(server or {})
            },
            "api": {"endpoint": "tcp:0:interface=127.0.0.1"},
            "redis": {"url": "unix://" + self.redis_path},
            "dialer": {
                "kind": "ami",
                "ami": {
                    "host": "127.0.0.1",
                    "port": self.asterisk.ami_port,
                    "username": self.asterisk.server_user,
                    "secret_env": SECRET_ENV,
                },
            },
            "flow": {
                "ring_timeout_s": 3,
                "attempts": 2,
                "dtmf_timeout_s": 1.0,
                "decision_timeout_s": 4.0,
                "max_retries": 0,
                "prompts": PROMPTS,
                **flow,
            },
            "condominiums": [
                {
                    "id": 1,
                    "name": "Teste",
                    "greeting": "Portaria.",
                    "directory": str(path),
                    **(condominium or {}),
                }
            ],
            "extensions": extensions,
        }
        config = parse_config(data, str(self.tmp_path / "audiosocket.toml"))
        globalLogPublisher.addObserver(self._observe)
        self.svc = makeService(config, reactor=reactor)
        self.svc.startService()
        await self.svc.ready.addTimeout(30, reactor)
        await self.svc.dialer.when_ready().addTimeout(10, reactor)
        for ext in extensions:
            await self.route(ext["ai_extension"], ext["ai_port"], config.server.bind)

    async def route(self, ai_extension: str, port: int, host: str = "127.0.0.1") -> None:
        """Point the dialplan's AUDIOSOCKET_AI_<extension> global at the server."""
        await self.ami.checked(
            "Setvar", Variable="AUDIOSOCKET_AI_{}".format(ai_extension),
            Value="{}:{}".format(host, port),
        )

    def _event(self, message: dict) -> None:
        if message.get("event", "").lower() == "newchannel":
            self.seen_channels.append(message.get("channel", ""))
        for phone in self.phones:
            phone.event(message)

    def local_channels(self, dial: str) -> list[str]:
        """The Local channels Asterisk created for C{Local/<dial>} so far."""
        return [c for c in self.seen_channels if c.startswith("Local/" + dial)]

    def phone(self, name: str) -> Phone:
        phone = Phone(reactor, name).listen()
        self.phones.append(phone)
        return phone

    async def resident(self, apartment: str) -> Phone:
        """A resident's phone that apartment's dial string rings."""
        phone = self.phone("resident " + apartment)
        phone.audiosocket_channel = "Local/{}@pbx-phones-".format(apartment)
        await self.ami.checked("DBPut", Family="pbxphone", Key=apartment, Val=str(phone.port))
        return phone

    async def visitor(self, ai_extension: str, name: str = "visitor") -> Phone:
        """A visitor's phone calling the AI extension through the project's dialplan."""
        phone = self.phone(name)
        await self.ami.checked(
            "Originate", Channel=phone.dial, Context="audiosocket-visitor",
            Exten=ai_extension, Priority="1", Async="true",
        )
        try:
            await phone.channel_seen.addTimeout(10, reactor)
            await phone.answered.addTimeout(10, reactor)
        except defer.TimeoutError:
            raise AssertionError(
                "the visitor's call to {} was not answered with audio; server: {}; "
                "asterisk: {}".format(
                    ai_extension, self.server_problems, self.asterisk.problems_since(self.mark)
                )
            ) from None
        return phone

    async def records(self, n: int, timeout: float = 30.0) -> list[dict]:
        """The last C{n} call records, once there are C{n} (newest first)."""
        for _ in range(int(timeout / 0.1)):
            calls = await self.svc.store.recent_calls(n)
            if len(calls) >= n:
                return calls
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("{} call record(s) not written in {} s".format(n, timeout))

    async def channels(self) -> list[str]:
        """Asterisk's channels right now (CLI C{core show channels concise}, over AMI)."""
        response = await self.ami.checked("Command", Command="core show channels concise")
        return [line.split("!")[0] for line in response.get("output", []) if "!" in line]

    def audiosocket_problems(self) -> list[str]:
        """
        Asterisk's AudioSocket warnings and errors during this test, but those a caller
        hanging up in AudioSocket() makes app_audiosocket log, expected for a phone the test
        hung up: "Failed to receive frame from channel '<it>'", and, when a frame of the
        server's arrives just after, "Failed to forward frame from AudioSocket server ... to
        channel '<it>'".
        """
        expected = [
            text.format(p.audiosocket_channel)
            for p in self.phones
            if p.hung_up_by == "phone" and p.audiosocket_channel
            for text in ("Failed to receive frame from channel '{}", "to channel '{}")
        ]
        return [
            line
            for line in self.asterisk.problems_since(self.mark)
            if "audiosocket" in line.lower() and not any(e in line for e in expected)
        ]

    def report(self) -> dict:
        return {
            "legs": [p.report() for p in self.phones],
            "asterisk_warnings": self.asterisk.problems_since(self.mark),
            "server_warnings": self.server_problems,
        }

    async def stop(self) -> None:
        for phone in self.phones:
            if not phone.hung_up.called and phone.channel is not None:
                try:
                    await phone.hangup(self.ami)
                    await phone.hung_up.addTimeout(10, reactor)
                except Exception:
                    pass
        if self.svc is not None:
            await defer.maybeDeferred(self.svc.stopService).addTimeout(30, reactor)
        globalLogPublisher.removeObserver(self._observe)
        for phone in self.phones:
            await phone.close()
        if self.ami is not None:
            self.ami.transport.loseConnection()
            await self.ami.lost.addTimeout(10, reactor)
        # Let the server side of closed connections finish closing.
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.async_yield_fixture
async def rig(asterisk, redis_server, tmp_path, request, monkeypatch):
    """A L{Rig} on the module's Asterisk; stopped (server, phones, AMI) after the test."""
    monkeypatch.setenv(SECRET_ENV, asterisk.server_secret)
    r = Rig(asterisk, tmp_path, request.node.name)
    r.redis_path = redis_server.path
    try:
        yield r
    finally:
        await r.stop()
        # On the test's report (user_properties), so the summary below has it also when
        # pytest-xdist ran the test in a worker process.
        request.node.user_properties.append((PBX_REPORT, r.report()))
