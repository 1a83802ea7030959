"""
The residents directories kept in the store (L{audiosocket.directories}): the store's methods
on a real redis-server and in memory, the C{/api/condominiums} routes, a reload, a real server
over TCP whose next call dials what a PUT said, and C{audiosocket-admin directory}.
"""

from __future__ import annotations

import json

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web import server as web_server

from audiosocket.directories import MAX_APARTMENTS, DirectoryControl, to_rows
from audiosocket.flow.call import Site
from audiosocket.flow.directory import Directory
from audiosocket.flow.prompts import Prompts
from audiosocket.store import DirectoryChange, MemoryHub, MemoryStore
from extkit import run
from test_admin import Server as AdminServer
from test_admin import serving
from test_api import Setup
from test_reload import served, write_config  # noqa: F401 (a fixture)
from test_service import DialCapture, ETC, call, config_for, finished, free_ports, started, stopped
from test_store import Changes, other, store, wait  # noqa: F401 (fixtures)

ROWS = [
    {"apartment_number": "101", "residents": ["Ana Souza"], "voip_number": "SIP/1101"},
    {
        "apartment_number": "102",
        "residents": ["João Pereira", {"name": "Maria Pereira", "phone": "PJSIP/maria"}],
        "voip_number": "SIP/1102",
    },
]


# ---------------------------------------------------------------- the store, on real Redis


@pytest_twisted.ensureDeferred
async def test_redis_seed_writes_only_condominiums_never_stored(store):
    """
    Seeding writes a condominium's rows once: a second seed (a restart with an edited file)
    leaves it, and writes only a condominium added since.
    """
    assert await wait(store.seed_directories({1: ROWS})) == [1]
    other = [dict(ROWS[0], voip_number="SIP/9999")]
    assert await wait(store.seed_directories({1: other, 2: other})) == [2]
    assert await wait(store.load_directories()) == {1: ROWS, 2: other}


@pytest_twisted.ensureDeferred
async def test_redis_save_replaces_the_whole_directory(store):
    """save_directory replaces the rows whole and counts versions; an emptied one stays stored."""
    await wait(store.seed_directories({1: ROWS}))
    assert await wait(store.save_directory(1, ROWS[:1])) == 1
    assert await wait(store.load_directory(1)) == ROWS[:1]
    assert await wait(store.save_directory(1, [])) == 2
    assert await wait(store.load_directory(1)) == []
    assert await wait(store.load_directory(7)) is None
    assert await wait(store.seed_directories({1: ROWS})) == []  # emptied is not "never stored"


@pytest_twisted.ensureDeferred
async def test_redis_change_notice_reaches_another_store(store, other):
    """
    A save on one node reaches the other's directory subscribers with the rows and the
    version, and neither the saving node nor any extension subscriber.
    """
    theirs, mine, extensions = Changes(), Changes(), Changes()
    other.subscribe_directories(theirs)
    other.subscribe(extensions)
    store.subscribe_directories(mine)
    version = await wait(store.save_directory(3, ROWS))
    change = await theirs.next()
    assert change == DirectoryChange(3, ROWS, version, "a")
    # The extension channel still carries extension changes only, and our own is not echoed.
    assert mine.seen == [] and extensions.seen == []


def test_memory_store_directories_as_redis():
    """MemoryStore: seed once, replace whole, versions, and the notice to another store."""
    hub = MemoryHub()
    a, b = MemoryStore(hub, node_id="a"), MemoryStore(hub, node_id="b")
    seen = []
    b.subscribe_directories(seen.append)
    assert run(a.seed_directories({1: ROWS})) == [1]
    assert run(b.seed_directories({1: [], 2: []})) == [2]
    assert run(a.save_directory(1, ROWS[:1])) == 1
    assert run(b.load_directories()) == {1: ROWS[:1], 2: []}
    assert seen == [DirectoryChange(1, ROWS[:1], 1, "a")]


# ---------------------------------------------------------------- the control and the API


def make_site(cid: int, rows) -> Site:
    return Site(cid, "Condomínio {}".format(cid), "Olá", Directory.from_data(rows), Prompts())


class Sites:
    """What the server keeps: the sites, swapped whole."""

    def __init__(self, rows=ROWS):
        self.sites = {1: make_site(1, rows), 2: make_site(2, [])}

    def swap(self, cid, directory):
        self.sites = {**self.sites, cid: attrs.evolve(self.sites[cid], directory=directory)}

    def dial(self, cid, number):
        apartment = self.sites[cid].directory.apartment(number)
        return apartment.dial if apartment is not None else None


def controlled(store, sites, reactor_=None) -> DirectoryControl:
    control = DirectoryControl(store, sites=lambda: sites.sites, swap=sites.swap, reactor=reactor_)
    run(control.start())
    return control


@pytest.fixture
def api():
    s = Setup()
    s.sites = Sites()
    s.directories = controlled(s.store, s.sites, s.reactor)
    s.api.directories = s.directories
    yield s
    s.directories.stop()


def test_start_seeds_the_store_then_serves_it():
    """At start a condominium never stored is seeded from its file; a stored one is served."""
    store = MemoryStore()
    run(store.save_directory(1, [dict(ROWS[0], voip_number="SIP/7101")]))
    sites = Sites()
    with capturedLogs() as logs:
        controlled(store, sites)
    assert sites.dial(1, "101") == "SIP/7101" and sites.dial(1, "102") is None
    assert run(store.load_directory(2)) == []
    assert any("differ from the store" in (e.get("log_format") or "") for e in logs)


def test_store_down_at_start_serves_the_files_then_retries():
    """
    The store down at start: the files' directories are served; a retry once it answers
    seeds it and serves the store's.
    """
    store = MemoryStore()
    run(store.save_directory(1, [dict(ROWS[0], voip_number="SIP/7101")]))
    store.available = False
    clock = Clock()
    sites = Sites()
    control = controlled(store, sites, clock)
    assert sites.dial(1, "101") == "SIP/1101"
    store.available = True
    clock.advance(10)
    assert sites.dial(1, "101") == "SIP/7101"
    assert run(store.load_directory(2)) == []
    assert not clock.getDelayedCalls()
    control.stop()


def test_list_condominiums(api):
    """GET /api/condominiums: id, name and apartments count of each."""
    status, _, body = api.request("GET", "/api/condominiums")
    assert status == 200
    assert body == {
        "condominiums": [
            {"id": 1, "name": "Condomínio 1", "apartments": 2},
            {"id": 2, "name": "Condomínio 2", "apartments": 0},
        ]
    }


def test_get_apartments_and_unknown_condominium(api):
    """GET .../apartments gives the rows (the original format); an unknown condominium is 404."""
    status, _, body = api.request("GET", "/api/condominiums/1/apartments")
    assert (status, body["apartments"]) == (200, ROWS)
    assert api.request("GET", "/api/condominiums/9/apartments")[0] == 404


@pytest.mark.parametrize("wrapped", [False, True])
def test_put_replaces_the_directory_for_the_next_call(api, wrapped):
    """A PUT of the original file's list (or {"apartments": [...]}) is stored and served."""
    rows = [{"apartment_number": "0301", "residents": "Rui  Lima", "voip_number": 1301}]
    body = {"apartments": rows} if wrapped else rows
    status, _, answer = api.request("PUT", "/api/condominiums/1/apartments", body)
    canonical = [{"apartment_number": "301", "residents": ["Rui Lima"], "voip_number": "1301"}]
    assert (status, answer["apartments"]) == (200, canonical)
    assert api.sites.dial(1, "301") == "1301" and api.sites.dial(1, "101") is None
    assert run(api.store.load_directory(1)) == canonical


def test_put_invalid_row_is_422_naming_row_and_field_nothing_changes(api):
    """A dial string with a comma in the second row: 422 naming entry 1 and voip_number."""
    before = api.sites.sites
    rows = [ROWS[0], dict(ROWS[1], voip_number="SIP/1,evil")]
    status, _, body = api.request("PUT", "/api/condominiums/1/apartments", rows)
    assert status == 422
    assert (body["error"], body["field"], body["index"]) == ("invalid_field", "voip_number", 1)
    assert "entry 1" in body["detail"]
    assert api.sites.sites is before
    assert run(api.store.load_directory(1)) == ROWS


def test_put_over_the_bounds_is_422(api):
    """More than MAX_APARTMENTS apartments, or more than 20 residents in one: 422."""
    many = [
        {"apartment_number": str(i), "residents": [], "voip_number": "1"}
        for i in range(1, MAX_APARTMENTS + 2)
    ]
    status, _, body = api.request("PUT", "/api/condominiums/1/apartments", many)
    assert (status, body["field"]) == (422, "apartments")
    crowded = [dict(ROWS[0], residents=["Pessoa {}".format(i) for i in range(21)])]
    status, _, body = api.request("PUT", "/api/condominiums/1/apartments", crowded)
    assert (status, body["field"], body["index"]) == (422, "residents", 0)
    assert run(api.store.load_directory(1)) == ROWS


def test_put_one_apartment_adds_then_replaces(api):
    """PUT .../apartments/{number}: 201 with Location when new, 200 when replaced."""
    path = "/api/condominiums/1/apartments/ap%20201"
    status, headers, body = api.request(
        "PUT", path, {"residents": ["Rui"], "voip_number": "PJSIP/201"}
    )
    assert status == 201
    assert headers.getRawHeaders("location") == ["/api/condominiums/1/apartments/201"]
    assert body == {"apartment_number": "201", "residents": ["Rui"], "voip_number": "PJSIP/201"}
    status, _, body = api.request(
        "PUT", "/api/condominiums/1/apartments/101", {"residents": [], "voip_number": "SIP/7"}
    )
    assert (status, body["voip_number"]) == (200, "SIP/7")
    assert api.sites.dial(1, "101") == "SIP/7" and api.sites.dial(1, "201") == "PJSIP/201"
    assert [r["apartment_number"] for r in run(api.store.load_directory(1))] == [
        "101", "102", "201"
    ]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"residents": ["Rui"]}, "voip_number"),
        ({"residents": ["Rui"], "voip_number": "SIP/1\r\nAction: Originate"}, "voip_number"),
        ({"residents": [{"name": "Rui", "phone": ""}], "voip_number": "1"}, "residents[0].phone"),
        ({"residents": ["Rui"], "voip_number": "1", "apartment_number": "102"}, "apartment_number"),
    ],
)
def test_put_one_invalid_apartment_is_422_naming_the_field(api, body, field):
    """An invalid apartment is a 422 whose field names what is wrong; nothing changes."""
    status, _, answer = api.request("PUT", "/api/condominiums/1/apartments/101", body)
    assert (status, answer["error"], answer["field"]) == (422, "invalid_field", field)
    assert api.sites.dial(1, "101") == "SIP/1101"


def test_put_one_apartment_unknown_condominium_404(api):
    """An apartment of a condominium the config does not have: 404."""
    status, _, _ = api.request(
        "PUT", "/api/condominiums/9/apartments/101", {"residents": [], "voip_number": "1"}
    )
    assert status == 404


def test_delete_apartment_204_then_404(api):
    """DELETE removes the apartment (204); again, or an unknown one, is 404."""
    assert api.request("DELETE", "/api/condominiums/1/apartments/0101")[0] == 204
    assert api.sites.dial(1, "101") is None
    assert api.request("DELETE", "/api/condominiums/1/apartments/101")[0] == 404
    assert run(api.store.load_directory(1)) == ROWS[1:]


def test_store_down_503_nothing_changes(api):
    """With the store down every change is a 503 and the next call's directory is unchanged."""
    before = api.sites.sites
    api.store.available = False
    assert api.request("PUT", "/api/condominiums/1/apartments", ROWS[:1])[0] == 503
    status, _, body = api.request(
        "PUT", "/api/condominiums/1/apartments/101", {"residents": [], "voip_number": "9"}
    )
    assert (status, body["error"]) == (503, "store_unavailable")
    assert api.request("DELETE", "/api/condominiums/1/apartments/101")[0] == 503
    assert api.sites.sites is before
    api.store.available = True
    assert run(api.store.load_directory(1)) == ROWS


def test_change_on_one_node_reaches_the_other():
    """A change on node a swaps node b's site too; an older version arriving late is ignored."""
    hub = MemoryHub()
    a_sites, b_sites = Sites(), Sites()
    a = controlled(MemoryStore(hub, node_id="a"), a_sites)
    b = controlled(MemoryStore(hub, node_id="b"), b_sites)
    run(a.put_apartment(1, "101", {"residents": [], "voip_number": "SIP/new"}))
    assert b_sites.dial(1, "101") == "SIP/new"
    b.apply_remote(DirectoryChange(1, ROWS, 0 + 1, "a"))  # version 1 again: stale
    assert b_sites.dial(1, "101") == "SIP/new"


def test_change_for_a_condominium_added_later_is_kept_for_the_reload():
    """
    Node b's config lacks condominium 2 when node a changes it; a reload adding it to b
    serves a's change, not b's file.
    """
    hub = MemoryHub()
    a_sites, b_sites = Sites(), Sites()
    del b_sites.sites[2]
    a = controlled(MemoryStore(hub, node_id="a"), a_sites)
    b = controlled(MemoryStore(hub, node_id="b"), b_sites)
    run(a.replace(2, ROWS[:1]))
    reloaded = b.overlay({**b_sites.sites, 2: make_site(2, [])})
    assert reloaded[2].directory.apartment("101").dial == "SIP/1101"


# ---------------------------------------------------------------- reload


def test_reload_keeps_the_stored_directory(served):  # noqa: F811
    """
    SIGHUP after a change by API and an edit of the file: the next call still gets the
    stored directory, and the log says the file is a seed only.
    """
    bench, svc, tmp_path = served
    run(svc.directories.start())
    run(svc.directories.put_apartment(1, "101", {"residents": ["Ana"], "voip_number": "SIP/7101"}))
    write_config(tmp_path, "Olá", "SIP/9101")
    with capturedLogs() as logs:
        assert svc.reload().result is True
    assert svc.site(1).directory.apartment("101").dial == "SIP/7101"
    assert svc.site(1).greeting == "Olá"  # the rest of the file did apply
    assert any("only seeds the store" in (e.get("log_format") or "") for e in logs)
    svc.directories.stop()


# ---------------------------------------------------------------- a real server over TCP


@pytest_twisted.ensureDeferred
async def test_tcp_put_changes_the_next_calls_dial_and_survives_a_restart(redis_server, tmp_path):
    """
    On a real server: PUT apartment 101 with a new voip_number; the next call to 101 dials it
    (the HTTP dialer's request says so), the directory file is untouched, and a restart on
    the same Redis still serves the stored directory.
    """
    file_before = (ETC / "apartments.json").read_bytes()
    capture = DialCapture()
    web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        web_server.Site(capture)
    )
    url = "http://127.0.0.1:{}/dial".format(web.getHost().port)
    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, dialer={"kind": "http", "url": url})
    try:
        await _put_then_call_then_restart(config, capture, file_before)
    finally:
        await web.stopListening()


async def _put_then_call_then_restart(config, capture, file_before):
    ai = config.extensions[0].ai_port
    svc = await started(config)
    try:
        api = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)
        response = await treq.put(
            api + "/api/condominiums/1/apartments/101",
            json.dumps({"residents": ["Ana Souza"], "voip_number": "PJSIP/novo-101"}).encode(),
            headers={"Content-Type": "application/json"},
            persistent=False,
        )
        assert response.code == 200, await response.text()
        visitor = call(ai, 12, dtmf=[(1.0, "101#")])
        request = await capture.requests.get().addTimeout(30, reactor)
        await visitor.addTimeout(30, reactor)
        await finished(svc)
    finally:
        await stopped(svc)
    assert request["dial"] == "PJSIP/novo-101"
    assert (ETC / "apartments.json").read_bytes() == file_before
    again = await started(config)
    try:
        api = "http://127.0.0.1:{}".format(again.api_port.getHost().port)
        response = await treq.get(api + "/api/condominiums/1/apartments", persistent=False)
        listed = await response.json()
    finally:
        await stopped(again)
    (row,) = [r for r in listed["apartments"] if r["apartment_number"] == "101"]
    assert row["voip_number"] == "PJSIP/novo-101"
    assert again.site(1).directory.apartment("101").dial == "PJSIP/novo-101"


# ---------------------------------------------------------------- audiosocket-admin directory


class DirectoryServer(AdminServer):
    def __init__(self):
        super().__init__()
        self.sites = Sites()
        self.directories = controlled(self.store, self.sites, self.reactor)
        self.api.directories = self.directories


@pytest_twisted.async_yield_fixture
async def admin():
    async with serving(DirectoryServer()) as s:
        yield s
    s.directories.stop()


@pytest_twisted.ensureDeferred
async def test_admin_list_and_show(admin):
    """directory list shows the condominiums; show, an apartment per line with its phones."""
    code, out, err = await admin.cli("directory", "list")
    assert code == 0, err
    assert out.splitlines()[1].split() == ["1", "Condomínio", "1", "2"]
    code, out, err = await admin.cli("directory", "show", "1")
    assert code == 0, err
    assert "João Pereira, Maria Pereira=PJSIP/maria" in out and "SIP/1102" in out


@pytest_twisted.ensureDeferred
async def test_admin_export_then_import_round_trip(admin, tmp_path):
    """export prints the original format; a file in it imports as is."""
    code, out, err = await admin.cli("directory", "export", "1")
    assert code == 0, err
    assert json.loads(out) == ROWS
    path = tmp_path / "apartments.json"
    path.write_text(json.dumps(ROWS[:1]))
    code, out, err = await admin.cli("directory", "import", "2", str(path))
    assert code == 0, err
    assert "1 apartment(s) imported" in out
    assert admin.sites.dial(2, "101") == "SIP/1101"


@pytest_twisted.ensureDeferred
async def test_admin_import_invalid_names_entry_and_field(admin, tmp_path):
    """An invalid file: exit 1, one line naming the entry and the field; nothing changes."""
    path = tmp_path / "apartments.json"
    path.write_text(json.dumps([ROWS[0], {"apartment_number": "102", "residents": []}]))
    code, out, err = await admin.cli("directory", "import", "1", str(path))
    assert code == 1
    assert "422" in err and "entry 1" in err and "voip_number" in err
    assert admin.sites.dial(1, "102") == "SIP/1102"


@pytest_twisted.ensureDeferred
async def test_admin_set_and_remove(admin):
    """set adds (then replaces) an apartment with residents and their phones; remove deletes."""
    code, out, err = await admin.cli(
        "directory", "set", "1", "201", "--voip", "PJSIP/201",
        "--resident", "Rui Lima", "--resident", "Ana Lima=PJSIP/ana",
    )
    assert code == 0, err
    assert out.startswith("added apartment 201")
    assert admin.sites.sites[1].directory.apartment("201").phone_of("Ana Lima") == "PJSIP/ana"
    code, out, _ = await admin.cli("directory", "set", "1", "201", "--voip", "PJSIP/9")
    assert (code, out.split()[0]) == (0, "replaced")
    code, out, _ = await admin.cli("directory", "remove", "1", "201")
    assert code == 0 and admin.sites.dial(1, "201") is None
    code, _, err = await admin.cli("directory", "remove", "1", "201")
    assert code == 1 and "404" in err
