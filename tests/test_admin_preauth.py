"""
Tests for C{audiosocket-admin preauth add|list|delete} (L{audiosocket.admin}) against the
L{Api}'s own C{ApiSite} on 127.0.0.1:0, its pre-authorisations on a memory store.
"""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet import reactor

from audiosocket.api import Api
from audiosocket.control import ExtensionControl
from preauthkit import Setup as PreauthSetup
from test_admin import TOKEN, Server, Sessions, serving

ADD = [
    "preauth", "add", "--condominium-id", "1", "--apartment", "101", "--name", "Maria Silva",
    "--from", "2026-12-01T00:00:00-03:00", "--until", "2027-01-01T00:00:00-03:00",
]


class PreauthServer(Server):
    def __init__(self):
        super().__init__()
        self.pre = PreauthSetup()
        control = ExtensionControl(self.manager, self.store, reactor=self.reactor)
        self.api = Api(
            control, Sessions(), self.store, token=lambda: TOKEN, preauths=self.pre.preauths
        )


@pytest_twisted.async_yield_fixture
async def server():
    async with serving(PreauthServer()) as s:
        yield s


def code_in(text: str) -> str:
    [code] = re.findall(r"code: ([0-9]{6})", text)
    return code


@pytest_twisted.ensureDeferred
async def test_add_prints_the_code_once(server):
    """preauth add creates the item and prints its code; list then never shows it."""
    code, out, err = await server.cli(
        *ADD, "--weekdays", "1,3", "--hours", "08:00-17:00", "--uses", "8"
    )
    assert code == 0, err
    assert "Maria Silva" in out and "8 use(s)" in out and "weekdays 1,3" in out
    secret = code_in(out)
    [stored] = server.pre.store.hub.preauths.values()
    assert stored["uses"] == 8 and stored["hours"] == "08:00-17:00"
    code, listed, err = await server.cli("preauth", "list", "--condominium-id", "1")
    assert code == 0, err
    assert stored["id"] in listed and "Maria Silva" in listed
    assert secret not in listed


@pytest_twisted.ensureDeferred
async def test_list_by_apartment(server):
    """preauth list --apartment shows only that apartment's items."""
    await server.cli(*ADD)
    await server.cli(*[a if a != "101" else "202" for a in ADD])
    code, out, _ = await server.cli(
        "preauth", "list", "--condominium-id", "1", "--apartment", "202"
    )
    rows = out.strip().splitlines()
    assert code == 0 and len(rows) == 2 and "202" in rows[1]


@pytest_twisted.ensureDeferred
async def test_delete(server):
    """preauth delete removes the item; a second delete fails with the 404 (exit 1)."""
    await server.cli(*ADD)
    [preauth_id] = server.pre.store.hub.preauths
    code, out, _ = await server.cli("preauth", "delete", preauth_id)
    assert (code, out) == (0, "deleted pre-authorisation {}\n".format(preauth_id))
    code, _, err = await server.cli("preauth", "delete", preauth_id)
    assert code == 1 and "404" in err


@pytest_twisted.ensureDeferred
async def test_invalid_field_reported(server):
    """A refused field is reported in one line naming it (exit 1); nothing is created."""
    code, _, err = await server.cli(*ADD[:-2], "--until", "2027-01-01T00:00:00")
    assert code == 1
    assert "422" in err and "valid_until" in err
    assert server.pre.store.hub.preauths == {}


@pytest_twisted.ensureDeferred
async def test_bad_weekdays_usage_error(server):
    """--weekdays that are not numbers are a usage error (exit 2), nothing sent."""
    code, _, err = await server.cli(*ADD, "--weekdays", "tue")
    assert code == 2 and "--weekdays" in err
    assert server.pre.store.hub.preauths == {}
