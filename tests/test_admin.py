"""
Tests for L{audiosocket.admin}: the CLI against the L{Api}'s own C{ApiSite} on 127.0.0.1:0
(its extension manager on a MemoryReactor, so no AudioSocket ports open).
"""

import contextlib
import io
import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from audiosocket import admin
from audiosocket.api import Api
from audiosocket.clock import AudioClock
from audiosocket.control import ExtensionControl
from audiosocket.extension import ExtensionManager
from audiosocket.model import Extension
from audiosocket.store import MemoryStore
from httpkit import Tracking

TOKEN = "t0ken"


class FakeReactor(MemoryReactor, Clock):
    def __init__(self):
        MemoryReactor.__init__(self)
        Clock.__init__(self)


class Sessions:
    def describe_all(self):
        return []

    def describe(self, uid):
        return None

    def hangup(self, uid):
        raise KeyError(uid)


class Server:
    def __init__(self, real=False):
        self.reactor = reactor if real else FakeReactor()
        self.clock = clock = AudioClock(reactor=self.reactor)
        clock.startService()
        self.manager = ExtensionManager(
            clock=clock,
            on_leg=lambda svc, leg: None,
            reactor=self.reactor,
            bind="127.0.0.1",
            condominium_exists=lambda c: c in (1, 2),
        )
        self.manager.startService()
        self.store = MemoryStore(reactor=self.reactor, node_id="node-a")
        control = ExtensionControl(self.manager, self.store, reactor=self.reactor)
        self.api = Api(control, Sessions(), self.store, token=lambda: TOKEN)
        self.url = None

    async def cli(self, *argv, token=TOKEN):
        """Run the CLI; return (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        env = {admin.TOKEN_ENV: token} if token else {}
        d = defer.Deferred.fromCoroutine(
            admin.run(reactor, ["--url", self.url, *argv], out=out, err=err, env=env)
        )
        code = await d.addTimeout(5, reactor)
        return code, out.getvalue(), err.getvalue()


@contextlib.asynccontextmanager
async def serving(s):
    """C{s}'s API on 127.0.0.1 (C{s.url}) while the block runs; every connection closed after."""
    factory = Tracking(s.api.site())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    s.url = "http://127.0.0.1:{}".format(port.getHost().port)
    try:
        yield s
    finally:
        await factory.all_closed().addTimeout(5, reactor)
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def server():
    async with serving(Server()) as s:
        yield s


@pytest_twisted.async_yield_fixture
async def real_server():
    """The API with its extension manager and audio clock on the real reactor."""
    async with serving(Server(real=True)) as s:
        yield s
    await s.manager.stopService().addTimeout(5, reactor)
    s.clock.stopService()


ADD = [
    "add",
    "--id",
    "3",
    "--ai-extension",
    "1003",
    "--ai-port",
    "8090",
    "--return-extension",
    "1004",
    "--return-port",
    "8091",
    "--host",
    "10.0.0.5",
    "--condominium-id",
    "1",
]


def ramal(ramal_ia, porta_ia, **kw):
    entry = {
        "ramal_ia": ramal_ia,
        "porta_ia": porta_ia,
        "ramal_retorno": str(int(ramal_ia) + 1),
        "porta_retorno": porta_ia + 1,
        "ip_servidor": "192.168.0.10",
        "condominio_id": 1,
    }
    entry.update(kw)
    return entry


@pytest_twisted.ensureDeferred
async def test_add_then_list(server):
    """add creates a listening extension; list shows it in a table."""
    code, out, err = await server.cli(*ADD)
    assert (code, err) == (0, "")
    assert "created extension 3 (1003): AI port 8090, return port 8091" in out
    assert server.manager.get(3).status == "listening"
    code, out, _ = await server.cli("list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["ID", "AI"]
    assert row.split()[:3] == ["3", "1003", "8090"]


@pytest_twisted.ensureDeferred
async def test_add_from_json_file(server, tmp_path):
    """add --json posts the extension read from a file."""
    path = tmp_path / "ext.json"
    ext = {
        "id": 4,
        "ai_extension": "1005",
        "ai_port": 8092,
        "return_extension": "1006",
        "return_port": 8093,
        "host": "10.0.0.5",
        "condominium_id": 2,
    }
    path.write_text(json.dumps(ext))
    code, out, _ = await server.cli("add", "--json", str(path))
    assert code == 0
    assert server.store.hub.extensions[4] == Extension.from_dict(ext)


@pytest_twisted.ensureDeferred
async def test_add_missing_options(server):
    """add without all the field options is a usage error naming what is missing."""
    code, _, err = await server.cli("add", "--id", "3")
    assert code == 2
    assert "--ai-extension" in err and "--condominium-id" in err


@pytest_twisted.ensureDeferred
async def test_add_conflict_one_line_error(server):
    """A 409 from the server is reported in one line, no traceback, exit 1."""
    await server.cli(*ADD)
    code, out, err = await server.cli(*ADD)
    assert code == 1
    assert err.startswith("audiosocket-admin: HTTP 409 conflict:")
    assert "Traceback" not in err and err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_remove_and_restart(server):
    """restart reopens an extension's ports; remove --force deletes it."""
    await server.cli(*ADD)
    code, out, _ = await server.cli("restart", "3")
    assert (code, "restarted extension 3" in out) == (0, True)
    code, out, _ = await server.cli("remove", "3", "--force")
    assert code == 0
    assert "removed extension 3" in out
    assert server.manager.extensions == {}


@pytest_twisted.ensureDeferred
async def test_remove_unknown(server):
    """Removing an unknown extension reports the 404 and exits 1."""
    code, _, err = await server.cli("remove", "9")
    assert code == 1
    assert "HTTP 404 not_found: no extension with id 9" in err


@pytest_twisted.ensureDeferred
async def test_missing_token(server):
    """Without a token the 401 is reported with a hint about the variable."""
    code, _, err = await server.cli("list", token=None)
    assert code == 1
    assert "HTTP 401" in err and admin.TOKEN_ENV in err


@pytest_twisted.ensureDeferred
async def test_token_file_wins(server, tmp_path):
    """--token-file is read (first line, whitespace stripped), over the environment."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    code, _, err = await server.cli("--token-file", str(path), "list", token="wrong")
    assert code == 0, err


@pytest_twisted.ensureDeferred
async def test_token_file_unreadable_or_empty(server, tmp_path):
    """A token file that cannot be read, or is empty, is one line and exit 2."""
    code, _, err = await server.cli("--token-file", str(tmp_path / "nope"), "list")
    assert code == 2 and "cannot read the token file" in err
    (tmp_path / "empty").write_text("\n")
    code, _, err = await server.cli("--token-file", str(tmp_path / "empty"), "list")
    assert code == 2 and "is empty" in err


@pytest_twisted.ensureDeferred
async def test_token_on_command_line_refused(server, capsys):
    """
    --token is refused (a process list would show it), naming the two ways that work and
    without repeating the value.
    """
    code, out, _ = await server.cli("--token", "s3cret-value", "list", token=None)
    assert code == 2 and out == ""
    usage = capsys.readouterr().err
    assert admin.TOKEN_ENV in usage and "--token-file" in usage
    assert "s3cret-value" not in usage


@pytest_twisted.ensureDeferred
async def test_unreachable_server():
    """An API that does not answer is one clear line and exit 2."""
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        WrappingFactory(Site(Api.app.resource()))
    )
    url = "http://127.0.0.1:{}".format(port.getHost().port)
    await port.stopListening()  # nothing listens there now
    err = io.StringIO()
    d = defer.Deferred.fromCoroutine(
        admin.run(reactor, ["--url", url, "list"], out=io.StringIO(), err=err, env={})
    )
    assert await d.addTimeout(5, reactor) == 2
    assert err.getvalue().startswith("audiosocket-admin: cannot reach the API at " + url)


@pytest_twisted.ensureDeferred
async def test_import_ramais_config(server, tmp_path):
    """
    import creates every good entry of a ramais_config.json (ids assigned skipping taken
    ones), reports the bad one naming its original field, and exits 1.
    """
    await server.cli(*ADD)  # id 3 exists on the server
    path = tmp_path / "ramais_config.json"
    entries = [
        ramal("1001", 8080),
        ramal("1011", 8110, id=2, nome="Bloco B"),
        dict(ramal("1021", 8120), porta_ia="oito"),
        ramal("1031", 8130),
        dict(ramal("1041", 8140), porta_ia="8140"),  # numbers as strings are accepted
    ]
    path.write_text(json.dumps({"ramais": entries}))
    code, out, err = await server.cli("import", str(path))
    assert code == 1, err
    lines = out.splitlines()
    assert "entry 1 (ramal_ia 1001): created extension 1 (1001)" in lines[0]
    assert "ignoring unused field(s) nome" in out
    assert "entry 3 (ramal_ia 1021): invalid: porta_ia: must be an integer" in out
    assert lines[-1] == "imported 4 of 5: 0 already existed, 1 invalid"
    assert sorted(server.manager.extensions) == [1, 2, 3, 4, 5]
    assert server.manager.get(4).extension.ai_port == 8130  # id 3 was skipped
    assert server.manager.get(5).extension.ai_port == 8140


@pytest_twisted.ensureDeferred
async def test_import_again_reports_existing(server, tmp_path):
    """Importing the same list twice reports each entry as already existing."""
    path = tmp_path / "ramais_config.json"
    path.write_text(json.dumps([ramal("1001", 8080, id=1)]))
    assert (await server.cli("import", str(path)))[0] == 0
    code, out, _ = await server.cli("import", str(path))
    assert code == 1
    assert "entry 1 (ramal_ia 1001): already exists: extension id 1" in out


@pytest_twisted.ensureDeferred
async def test_import_not_a_list(server, tmp_path):
    """A file that is neither a list nor {"ramais": [...]} is a clear error, exit 2."""
    path = tmp_path / "ramais_config.json"
    path.write_text(json.dumps({"extensions": []}))
    code, _, err = await server.cli("import", str(path))
    assert code == 2
    assert "expected a JSON list" in err


@pytest_twisted.ensureDeferred
async def test_import_missing_file(server, tmp_path):
    """A missing file is reported by name, exit 2."""
    code, _, err = await server.cli("import", str(tmp_path / "nope.json"))
    assert code == 2
    assert "cannot read" in err and "nope.json" in err


def test_usage_error_exit_2(capsys):
    """An unknown command is an argparse usage error with exit status 2."""
    d = defer.Deferred.fromCoroutine(admin.run(None, ["explode"]))
    results = []
    d.addBoth(results.append)
    assert results == [2]
    assert "invalid choice" in capsys.readouterr().err


def _free_port():
    from ports import free_ports

    return free_ports(1)[0]


def _is_listening(port):
    """Whether something listens on 127.0.0.1:port (binding it ourselves fails)."""
    try:
        p = reactor.listenTCP(port, Factory(), interface="127.0.0.1")
    except CannotListenError:
        return True
    p.stopListening()
    return False


@pytest_twisted.ensureDeferred
async def test_real_ports_listen_on_add_and_close_on_remove(real_server):
    """Over real TCP: once add succeeds both ports listen; once remove succeeds neither does."""
    ai, ret = _free_port(), _free_port()
    argv = list(ADD)
    argv[argv.index("--ai-port") + 1] = str(ai)
    argv[argv.index("--return-port") + 1] = str(ret)
    code, out, err = await real_server.cli(*argv)
    assert code == 0, err
    assert (_is_listening(ai), _is_listening(ret)) == (True, True)
    code, _, err = await real_server.cli("remove", "3")
    assert code == 0, err
    assert (_is_listening(ai), _is_listening(ret)) == (False, False)


@pytest_twisted.ensureDeferred
async def test_dialplan_prints_the_globals_of_every_extension(server):
    """dialplan: one AUDIOSOCKET_AI_<ai_extension> = host:port line per extension, IPv6 in
    brackets, with the extension and its return port in a comment."""
    assert (await server.cli(*ADD))[0] == 0
    v6 = ["add", "--id", "4", "--ai-extension", "1005", "--ai-port", "8092", "--return-extension",
          "1006", "--return-port", "8093", "--host", "fd00::5", "--condominium-id", "2"]
    assert (await server.cli(*v6))[0] == 0
    code, out, err = await server.cli("dialplan")
    assert code == 0, err
    lines = out.splitlines()
    assert "[globals]" in lines
    assert "AUDIOSOCKET_AI_1003 = 10.0.0.5:8090  ; extension 3, condominium 1, residents come back to 10.0.0.5:8091" in lines
    assert any(l.startswith("AUDIOSOCKET_AI_1005 = [fd00::5]:8092  ;") for l in lines)
    code, out, err = await server.cli("dialplan", "--cli")
    assert out.splitlines() == [
        "asterisk -rx 'dialplan set global AUDIOSOCKET_AI_1003 10.0.0.5:8090'",
        "asterisk -rx 'dialplan set global AUDIOSOCKET_AI_1005 [fd00::5]:8092'",
    ]
