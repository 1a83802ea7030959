"""
The operator's screen in a real headless Chromium (Debian's C{chromium}, driven by
Playwright for Python) against the real service (L{makeService}, real redis-server, real
TCP): calls placed with L{audiosocket.callclient.place_call} appear live and end in the
history, extensions are added through the form, a call is hung up from the page, a change
without the CSRF token is refused, and axe-core (vendored in C{tests/data/axe}) finds no
label or contrast violation. Screenshots of each page go to C{docs/screenshots/}.

The browser runs in a thread (Playwright's sync API), the server on the reactor; the
browser's script reaches the reactor with C{blockingCallFromThread}. Waits are Playwright's
auto-waiting assertions, never sleeps.

Skipped, saying why, without chromium or playwright; C{AUDIOSOCKET_REQUIRE_BROWSER=1} (set by
CI) makes that a failure instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.threads import blockingCallFromThread

from audiosocket.callclient import CallOptions, place_call
from test_service import config_for, free_ports, started, stopped

REQUIRE_ENV = "AUDIOSOCKET_REQUIRE_BROWSER"
TOKEN_ENV = "AUDIOSOCKET_TEST_DASHBOARD_TOKEN"
TOKEN = "painel-de-teste-0123456789"
ROOT = pathlib.Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
AXE = pathlib.Path(__file__).resolve().parent / "data" / "axe" / "axe.min.js"
#: The axe-core rules held: every control named, and text contrast (WCAG 2 AA).
AXE_RULES = [
    "label",
    "color-contrast",
    "button-name",
    "link-name",
    "select-name",
    "aria-input-field-name",
    "form-field-multiple-labels",
    "document-title",
    "html-has-lang",
]
TIMEOUT_MS = 15000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if shutil.which("chromium") is None:
        return "no chromium on PATH (apt-get install chromium)"
    return None


@pytest.fixture
def browser_ok():
    reason = _missing()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail("{} is set but the browser tests cannot run: {}".format(REQUIRE_ENV, reason))
        pytest.skip(reason)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


async def serve(redis_server, tmp_path, **sections):
    """The real service with an API token; returns (service, base URL, ai port)."""
    ai, ret = free_ports(2)
    sections.setdefault("api", {})["token_env"] = TOKEN_ENV
    config = config_for(redis_server.path, tmp_path, ai, ret, **sections)
    svc = await started(config)
    return svc, "http://127.0.0.1:{}".format(svc.api_port.getHost().port), ai


def browse(script, *args):
    """
    Run C{script(page, *args)} in a fresh headless Chromium, in a thread; a Deferred of its
    result. The context bypasses the page's CSP only so the tests can inject axe-core.
    """

    def run():
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            try:
                context = browser.new_context(
                    viewport={"width": 1360, "height": 800}, locale="pt-BR", bypass_csp=True
                )
                context.set_default_timeout(TIMEOUT_MS)
                page = context.new_page()
                return script(page, *args)
            finally:
                browser.close()

    return threads.deferToThread(run)


def on_reactor(f, *args, **kwargs):
    """From the browser's thread: run C{f} on the reactor and wait for its result."""
    return blockingCallFromThread(reactor, f, *args, **kwargs)


def login(page, base: str) -> None:
    from playwright.sync_api import expect

    page.goto(base + "/login")
    page.get_by_label("Token da API").fill(TOKEN)
    page.get_by_role("button", name="Entrar").click()
    expect(page).to_have_url(base + "/")
    expect(page.get_by_role("heading", name="Chamadas em andamento")).to_be_visible()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def axe_violations(page) -> list:
    """axe-core's violations of L{AXE_RULES} on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    return page.evaluate(
        """rules => axe.run(document, {runOnly: {type: "rule", values: rules}})
               .then(r => r.violations.map(v => [v.id, v.nodes.map(n => n.target.join(" "))]))""",
        AXE_RULES,
    )


def start_call(ai: int, **options) -> defer.Deferred:
    """On the reactor: place a visitor call; a Deferred of its report."""
    return defer.Deferred.fromCoroutine(
        place_call(CallOptions(host="127.0.0.1", port=ai, **options), reactor)
    )


class Pending:
    """A call placed from the browser's thread, awaited from the test afterwards."""

    def __init__(self):
        self.calls: list[defer.Deferred] = []

    def start(self, ai: int, **options) -> None:
        def go():
            self.calls.append(start_call(ai, **options))

        on_reactor(go)

    async def wait(self) -> list:
        return await defer.gatherResults(self.calls).addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_login_page_is_open_and_pages_need_it(browser_ok, token, redis_server, tmp_path):
    """
    The login page opens without a token and passes axe-core; a page asked for without a
    login is a 401 pointing to it; a wrong token is refused on the page; the right one
    gives an HttpOnly, SameSite=Strict session cookie, and logging out ends it.
    """
    svc, base, _ = await serve(redis_server, tmp_path)

    def script(page):
        from playwright.sync_api import expect

        response = page.goto(base + "/ramais")
        status_before = response.status
        page.get_by_role("link", name="Entrar com o token da API").click()
        expect(page.get_by_label("Token da API")).to_be_visible()
        violations = axe_violations(page)
        page.get_by_label("Token da API").fill("errado")
        page.get_by_role("button", name="Entrar").click()
        expect(page.get_by_role("alert")).to_have_text("Token inválido.")
        shoot(page, "login.png")
        login(page, base)
        cookies = {c["name"]: c for c in page.context.cookies()}
        page.get_by_role("button", name="Sair").click()
        expect(page).to_have_url(base + "/login")
        after = page.goto(base + "/").status
        return status_before, violations, cookies, after

    try:
        status_before, violations, cookies, after = await browse(script)
    finally:
        await stopped(svc)
    assert status_before == 401
    assert violations == []
    cookie = cookies["audiosocket_session"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert after == 401


@pytest_twisted.ensureDeferred
async def test_live_call_appears_ends_and_shows_in_history(
    browser_ok, token, redis_server, tmp_path
):
    """
    A call placed while Ao vivo is open appears there with its state within the page's
    own updates, leaves when the caller hangs up, and then shows in Chamadas with its
    outcome; its detail page shows the timeline. No page has a label or contrast violation.
    """
    svc, base, ai = await serve(redis_server, tmp_path)
    pending = Pending()

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        expect(page.locator("#no-calls")).to_be_visible()
        pending.start(ai, hangup_after=6.0)
        row = page.locator("tr.session")
        expect(row).to_have_count(1)
        expect(row.locator("td.state")).to_have_text(
            re.compile("saudação|ouvindo o visitante")
        )
        expect(row.locator("meter").first).to_be_attached()
        expect(page.get_by_role("button", name="Desligar")).to_be_visible()
        shoot(page, "ao-vivo.png")
        found = {"live": axe_violations(page)}
        expect(row).to_have_count(0, timeout=30000)
        expect(page.locator("#no-calls")).to_be_visible()
        page.get_by_role("link", name="Chamadas").click()
        history = page.locator("#calls-table tbody tr")
        expect(history).to_have_count(1)
        outcome = history.locator("td.outcome").inner_text()
        shoot(page, "chamadas.png")
        found["calls"] = axe_violations(page)
        history.get_by_role("link").click()
        expect(page.get_by_role("heading", name="Linha do tempo")).to_be_visible()
        expect(page.locator("ol.timeline li").last).to_contain_text("fim")
        shoot(page, "chamada.png")
        found["call"] = axe_violations(page)
        api = page.request.get(base + "/api/calls").json()
        return outcome, found, api

    try:
        outcome, found, api = await browse(script)
        reports = await pending.wait()
    finally:
        await stopped(svc)
    assert reports[0].error is None
    from audiosocket.dashboard import OUTCOMES

    assert outcome == OUTCOMES[api["calls"][0]["outcome"]]
    assert found == {"live": [], "calls": [], "call": []}


@pytest_twisted.ensureDeferred
async def test_hangup_from_the_page(browser_ok, token, redis_server, tmp_path):
    """
    "Desligar" (after its confirmation) hangs up a call in progress: the server says
    goodbye and closes the call, which leaves the page; its record says the operator
    ended it.
    """
    svc, base, ai = await serve(redis_server, tmp_path)
    pending = Pending()

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        pending.start(ai, hangup_after=25.0)
        row = page.locator("tr.session")
        expect(row).to_have_count(1)
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        row.get_by_role("button", name="Desligar").click()
        expect(row).to_have_count(0, timeout=20000)
        return dialogs

    try:
        dialogs = await browse(script)
        reports = await pending.wait()
        calls = await svc.store.recent_calls(5)
    finally:
        await stopped(svc)
    assert dialogs == ["Desligar esta chamada?"]
    assert reports[0].hung_up_by == "server"
    assert calls[0]["ended_by"] == "operator"


@pytest_twisted.ensureDeferred
async def test_add_extension_through_the_form(browser_ok, token, redis_server, tmp_path):
    """
    The Ramais form adds an extension that is listening when the table shows it; a port
    another extension holds is refused next to its field, and nothing is added.
    """
    svc, base, ai = await serve(redis_server, tmp_path)
    new_ai, new_ret = free_ports(2)

    def fill(page, **values):
        form = page.locator("#add-form")
        for name, value in values.items():
            form.locator('[name="{}"]'.format(name)).fill(str(value))
        form.get_by_role("button", name="Adicionar").click()
        return form

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        page.get_by_role("link", name="Ramais").click()
        form = fill(
            page, id=2, ai_extension="2001", ai_port=new_ai, return_extension="2002",
            return_port=new_ret, host="127.0.0.1", condominium_id=1,
        )
        expect(form.locator("[data-ok]")).to_have_text("Salvo: ramal 2 ouvindo.")
        row = page.locator('tr[data-ext="2"]')
        expect(row.locator("td.status")).to_have_text("ouvindo")
        form = fill(
            page, id=3, ai_extension="3001", ai_port=ai, return_extension="3002",
            return_port=new_ret + 1 if new_ret < 65535 else new_ret - 1, host="127.0.0.1",
            condominium_id=1,
        )
        error = form.locator('[data-error-for="ai_port"]')
        expect(error).to_contain_text("is used by another extension")
        expect(form.locator('[name="ai_port"]')).to_have_attribute("aria-invalid", "true")
        shoot(page, "ramais.png")
        form.locator('[name="condominium_id"]').fill("99")
        form.locator('[name="ai_port"]').fill(str(free_ports(1)[0]))
        form.get_by_role("button", name="Adicionar").click()
        expect(form.locator('[data-error-for="condominium_id"]')).to_contain_text("99")
        violations = axe_violations(page)
        return violations

    try:
        violations = await browse(script)
        listening = {e: svc.manager.extensions[e].bound_ai_port for e in svc.manager.extensions}
    finally:
        await stopped(svc)
    assert listening == {1: ai, 2: new_ai}
    assert violations == []


@pytest_twisted.ensureDeferred
async def test_change_without_csrf_token_is_refused(browser_ok, token, redis_server, tmp_path):
    """
    With the session cookie, a change made without the page's CSRF token is a 403 (with
    or without a body), and the same change with it goes through: a page elsewhere, which
    cannot read the token, cannot use the login. (The change: hanging up a call that does
    not exist, a 404 once past the guard.)
    """
    svc, base, _ = await serve(redis_server, tmp_path)

    def script(page):
        login(page, base)
        return page.evaluate(
            """async () => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const send = (headers, body) => fetch("/api/sessions/00000000-0000-4000-8000-000000000000/hangup",
                    {method: "POST", credentials: "same-origin", headers, body})
                    .then(r => r.status, () => "network error");
                return [
                    await send({}),
                    await send({"X-CSRF-Token": "forged"}),
                    await send({"Content-Type": "application/json"}, "{}"),
                    await send({"X-CSRF-Token": csrf}),
                ];
            }"""
        )

    try:
        statuses = await browse(script)
    finally:
        await stopped(svc)
    # The refusal with a body is judged on the request's head and closes the connection.
    assert statuses[:2] == [403, 403]
    assert statuses[2] in (403, "network error")
    assert statuses[3] == 404  # past the guard: there is no such call


@pytest_twisted.ensureDeferred
async def test_health_page(browser_ok, token, redis_server, tmp_path):
    """Saúde shows Redis, the dialer, providers and pacing as ok, the version and uptime."""
    svc, base, _ = await serve(redis_server, tmp_path)

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        page.get_by_role("link", name="Saúde").click()
        checks = page.locator("li.check")
        expect(checks).to_have_count(5)
        # Pacing may be "atenção" if this busy machine ran a tick late meanwhile.
        for name in ("Redis", "Discador", "Provedores", "Ramais"):
            expect(checks.filter(has_text=name)).to_have_class(re.compile("check-ok"))
        expect(page.locator("dl.facts")).to_contain_text("Versão")
        shoot(page, "saude.png")
        return axe_violations(page), checks.all_inner_texts()

    try:
        violations, texts = await browse(script)
    finally:
        await stopped(svc)
    assert violations == []
    assert [t.split()[0] for t in texts] == ["Redis", "Discador", "Provedores", "Ritmo", "Ramais"]
