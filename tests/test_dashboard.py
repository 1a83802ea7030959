"""
The operator's screen in a real headless Chromium (Debian's C{chromium}, driven by
Playwright for Python) against the real service (L{makeService}, real redis-server, real
TCP): calls placed with L{audiosocket.callclient.place_call} appear live and end in the
history, extensions are added through the form, a call is hung up from the page, a change
without the CSRF token is refused, and axe-core (vendored in C{tests/data/axe}) finds no
label or contrast violation. Screenshots of each page go to C{$AUDIOSOCKET_SCREENSHOTS}
(C{docs/screenshots/} to refresh the README's), else to a directory of the test run.

The browser runs in a thread (Playwright's sync API), the server on the reactor; the
browser's script reaches the reactor with C{blockingCallFromThread}. Waits are Playwright's
auto-waiting assertions, never sleeps.

Skipped, saying why, without chromium or playwright; C{AUDIOSOCKET_REQUIRE_BROWSER=1} (set by
CI) makes that a failure instead.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import tempfile

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.threads import blockingCallFromThread

from audiosocket.callclient import CallOptions, place_call
from test_service import config_for, free_ports, started, stopped

REQUIRE_ENV = "AUDIOSOCKET_REQUIRE_BROWSER"
TOKEN_ENV = "AUDIOSOCKET_TEST_DASHBOARD_TOKEN"
TOKEN = "painel-de-teste-0123456789"
#: Where the screenshots go: the README's own only when asked (a test run leaves the checkout
#: as it was), else the system's temporary directory.
SHOTS = (
    pathlib.Path(os.environ["AUDIOSOCKET_SCREENSHOTS"]).resolve()
    if os.environ.get("AUDIOSOCKET_SCREENSHOTS")
    else pathlib.Path(tempfile.gettempdir()) / "audiosocket-screenshots"
)
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
    ended it. (Privacy mode, switched on first, hides the caller's details on screen.)
    """
    svc, base, ai = await serve(redis_server, tmp_path)
    pending = Pending()

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        pending.start(ai, hangup_after=25.0)
        row = page.locator("tr.session")
        expect(row).to_have_count(1)
        toggle = page.get_by_role("button", name="Modo privacidade")
        toggle.click()
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(row.locator(".pii").first).to_have_css("font-size", "0px")
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
    another extension holds, or an unknown condominium, is refused next to its field, and
    nothing is added; "Alterar" fills the change form, which saves; "Remover" (forced,
    confirmed) removes it.
    """
    svc, base, ai = await serve(redis_server, tmp_path)
    new_ai, new_ret, spare_ai, spare_ret = free_ports(4)

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
            return_port=spare_ret, host="127.0.0.1", condominium_id=1,
        )
        error = form.locator('[data-error-for="ai_port"]')
        expect(error).to_have_text("A porta {} já é usada por outro ramal.".format(ai))
        expect(form.locator('[name="ai_port"]')).to_have_attribute("aria-invalid", "true")
        shoot(page, "ramais.png")
        form.locator('[name="condominium_id"]').fill("99")
        form.locator('[name="ai_port"]').fill(str(spare_ai))
        form.get_by_role("button", name="Adicionar").click()
        expect(form.locator('[data-error-for="condominium_id"]')).to_have_text(
            "Não há condomínio 99."
        )
        violations = axe_violations(page)
        row.get_by_role("button", name="Alterar").click()
        edit = page.locator("#edit-form")
        expect(edit.locator('[name="ai_port"]')).to_have_value(str(new_ai))
        edit.locator('[name="max_calls"]').fill("3")
        edit.get_by_role("button", name="Salvar").click()
        expect(edit.locator("[data-ok]")).to_have_text("Salvo: ramal 2 ouvindo.")
        expect(row.locator("td").nth(8)).to_have_text("0 / 3")
        listening.update(on_reactor(lambda: {
            e: s.bound_ai_port for e, s in svc.manager.extensions.items()}))
        page.on("dialog", lambda d: d.accept())
        row.get_by_label("forçar").check()
        row.get_by_role("button", name="Remover").click()
        expect(row).to_have_count(0)
        return violations

    listening = {}
    try:
        violations = await browse(script)
        after = sorted(svc.manager.extensions)
    finally:
        await stopped(svc)
    assert listening == {1: ai, 2: new_ai}
    assert after == [1]
    assert violations == []


@pytest_twisted.ensureDeferred
async def test_preauth_created_on_the_page_shows_its_code_once(
    browser_ok, token, redis_server, tmp_path
):
    """
    Autorizações: the form creates a pre-authorisation and shows its 6-digit code once; the
    table lists it without the code; the code opens at the gate (the server's own redeem);
    an apartment not in the directory is refused next to its field; "Excluir" (confirmed)
    removes it and its code stops working.
    """
    import uuid

    import attrs

    from audiosocket.config import GateConfig
    from audiosocket.gate import OpenRequest

    ai, ret = free_ports(2)
    config = config_for(redis_server.path, tmp_path, ai, ret, api={"token_env": TOKEN_ENV})
    # Codes are taken where a gate acts.
    gated = attrs.evolve(config.condominiums[0], gate=GateConfig(kind="dtmf", digits="9"))
    svc = await started(attrs.evolve(config, condominiums=(gated,)))
    base = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        page.get_by_role("link", name="Autorizações").click()
        expect(page.get_by_role("heading", name="Autorizações")).to_be_visible()
        form = page.locator("#preauth-form")
        form.get_by_label("Apartamento").fill("999")
        form.get_by_label("Nome do visitante").fill("Maria Diarista")
        now = datetime.datetime.now()
        form.get_by_label("Válida a partir de").fill((now - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"))
        form.get_by_label("Válida até").fill((now + datetime.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M"))
        form.get_by_role("button", name="Criar").click()
        expect(form.locator('[data-error-for="apartment"]')).to_contain_text("999")
        form.get_by_label("Apartamento").fill("101")
        form.get_by_label("Usos").fill("5")
        form.get_by_role("button", name="Criar").click()
        code = form.locator("[data-code]")
        expect(code).to_have_text(re.compile(r"^\d{6}$"))
        row = page.locator("tr[data-preauth]")
        expect(row).to_have_count(1)
        expect(row.locator("td").nth(5)).to_have_text("todos")
        expect(row.locator("td").nth(7)).to_have_text("5")
        shoot(page, "autorizacoes.png")
        violations = axe_violations(page)
        typed = code.inner_text()
        table = page.locator("#preauths").inner_html()
        tz = svc.config.condominium(1).timezone
        opened = on_reactor(svc.preauths.redeem, 1, typed, tz)
        page.reload()
        listed = page.content()
        expect(page.locator("tr[data-preauth]").locator("td").nth(7)).to_have_text("4")
        page.on("dialog", lambda d: d.accept())
        page.locator("tr[data-preauth]").get_by_role("button", name="Excluir").click()
        expect(page.locator("tr[data-preauth]")).to_have_count(0)
        # The gate opened for her (the server's opener, through the log dialer's hand-off):
        # the Acessos page lists it.
        request = OpenRequest(
            condominium_id=1, authorized_by="preauth", evidence="code", who=opened.id,
            uuid=str(uuid.uuid4()), extension_id=1, apartment="101", visitor="Maria Diarista",
        )
        on_reactor(svc.gate.open, svc.site(1).gate, request)
        on_reactor(svc.access.when_saved)
        page.get_by_role("link", name="Acessos").click()
        access_row = page.locator("#access-table tbody tr")
        expect(access_row).to_have_count(1)
        expect(access_row.locator("td").nth(4)).to_have_text("Maria Diarista")
        shoot(page, "acessos.png")
        violations += axe_violations(page)
        return typed, table, listed, opened, violations

    try:
        code, table, listed, opened, violations = await browse(script)
        tz = svc.config.condominium(1).timezone
        after_delete = await svc.preauths.redeem(1, code, tz).addTimeout(10, reactor)
    finally:
        await stopped(svc)
    assert code not in table and code not in listed  # shown once, in the answer only
    assert opened is not None and opened.visitor_name == "Maria Diarista"
    assert after_delete is None
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


@pytest_twisted.ensureDeferred
async def test_page_recovers_after_a_restart(browser_ok, token, redis_server, tmp_path):
    """
    Ao vivo stays open while the server restarts on the same port: its event stream
    reconnects by itself, the login still holds, and a call placed on the new server
    appears without reloading the page.
    """
    ai, ret, api = free_ports(3)
    config = config_for(
        redis_server.path, tmp_path, ai, ret,
        api={"token_env": TOKEN_ENV, "endpoint": "tcp:{}:interface=127.0.0.1".format(api)},
    )
    base = "http://127.0.0.1:{}".format(api)
    services = [await started(config)]
    pending = Pending()

    async def restart():
        await stopped(services.pop())
        services.append(await started(config))

    def script(page):
        from playwright.sync_api import expect

        login(page, base)
        expect(page.locator("#no-calls")).to_be_visible()
        on_reactor(lambda: defer.Deferred.fromCoroutine(restart()))
        # Long enough to outlast the event stream's back-off (0.5 s, doubling per failure).
        pending.start(ai, hangup_after=10.0)
        expect(page.locator("tr.session")).to_have_count(1, timeout=20000)
        expect(page.locator("tr.session")).to_have_count(0, timeout=30000)
        return page.url

    try:
        url = await browse(script)
        await pending.wait()
    finally:
        for svc in services:
            await stopped(svc)
    assert url == base + "/"


# ---------------------------------------------------------------- without a browser


async def http(method, url, headers=None, data=None):
    """One request over real TCP (no connection kept); (status, headers, body)."""
    import treq

    response = await treq.request(
        method, url, headers=headers or {}, data=data, persistent=False
    )
    body = await treq.content(response)
    return response.code, response.headers, body


async def logged_in(base):
    """Log in with the token; (cookie header value, the page's CSRF token)."""
    status, headers, _ = await http(
        "POST", base + "/login", {"Authorization": "Bearer " + TOKEN}
    )
    assert status == 204
    set_cookie = headers.getRawHeaders("set-cookie")[0]
    cookie = set_cookie.split(";")[0]
    _, _, page = await http("GET", base + "/", {"Cookie": cookie})
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()
    return set_cookie, cookie, csrf


@pytest_twisted.ensureDeferred
async def test_tcp_cookie_change_without_csrf_is_403(token, redis_server, tmp_path):
    """
    Over real TCP: the login cookie is HttpOnly and SameSite=Strict; with it, a change
    without the CSRF token (or with a wrong one) is a 403 csrf_token_required, counted;
    with it the change reaches its route; reading needs no CSRF token.
    """
    svc, base, _ = await serve(redis_server, tmp_path)
    hangup = base + "/api/sessions/00000000-0000-4000-8000-000000000000/hangup"
    try:
        set_cookie, cookie, csrf = await logged_in(base)
        bare = await http("POST", hangup, {"Cookie": cookie})
        forged = await http("POST", hangup, {"Cookie": cookie, "X-CSRF-Token": "x" * 43})
        good = await http("POST", hangup, {"Cookie": cookie, "X-CSRF-Token": csrf})
        read = await http("GET", base + "/api/sessions", {"Cookie": cookie})
    finally:
        await stopped(svc)
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP here; Secure under TLS
    assert (bare[0], json.loads(bare[2])["error"]) == (403, "csrf_token_required")
    assert forged[0] == 403
    assert good[0] == 404  # past the guard: no such call
    assert read[0] == 200
    assert svc.manager.refused["api_csrf_token_required"] == 2


@pytest_twisted.ensureDeferred
async def test_tcp_cookie_change_with_body_without_csrf_refused_on_head(
    token, redis_server, tmp_path
):
    """
    Over real TCP: a change with a JSON body, the cookie and no CSRF token is refused on
    the request's head (403), and nothing is created.
    """
    svc, base, _ = await serve(redis_server, tmp_path)
    ai, ret = free_ports(2)
    body = json.dumps(
        {"id": 5, "ai_extension": "5001", "ai_port": ai, "return_extension": "5002",
         "return_port": ret, "host": "127.0.0.1", "condominium_id": 1}
    ).encode()
    try:
        _, cookie, _ = await logged_in(base)
        status, _, answer = await http(
            "POST", base + "/api/extensions",
            {"Cookie": cookie, "Content-Type": "application/json"}, body,
        )
        extensions = sorted(svc.manager.extensions)
    finally:
        await stopped(svc)
    assert (status, json.loads(answer)["error"]) == (403, "csrf_token_required")
    assert extensions == [1]


@pytest_twisted.ensureDeferred
async def test_tcp_login_void_after_logout_or_token_change(
    token, monkeypatch, redis_server, tmp_path
):
    """
    A login ends with its logout, and every login made with a token is void once the
    token changes; a wrong token gets no cookie.
    """
    svc, base, _ = await serve(redis_server, tmp_path)
    try:
        wrong = await http("POST", base + "/login", {"Authorization": "Bearer nope"})
        _, first, csrf = await logged_in(base)
        await http("POST", base + "/logout", {"Cookie": first, "X-CSRF-Token": csrf})
        after_logout = (await http("GET", base + "/api/sessions", {"Cookie": first}))[0]
        _, second, _ = await logged_in(base)
        monkeypatch.setenv(TOKEN_ENV, "a-new-token")
        after_change = (await http("GET", base + "/api/sessions", {"Cookie": second}))[0]
    finally:
        await stopped(svc)
    assert wrong[0] == 401 and wrong[1].getRawHeaders("set-cookie") is None
    assert after_logout == 401
    assert after_change == 401


@pytest_twisted.ensureDeferred
async def test_tcp_pages_need_a_login(token, redis_server, tmp_path):
    """
    Without a credential every page and script is a 401 (a page says where to log in);
    the login page and its two files are open.
    """
    svc, base, _ = await serve(redis_server, tmp_path)
    try:
        answers = {
            path: (await http("GET", base + path))[0]
            for path in ("/", "/ramais", "/chamadas", "/saude", "/parts/live",
                         "/static/app.js", "/static/htmx.min.js", "/api/events",
                         "/login", "/static/style.css", "/static/login.js")
        }
        page = (await http("GET", base + "/ramais"))[2]
    finally:
        await stopped(svc)
    assert answers == {
        "/": 401, "/ramais": 401, "/chamadas": 401, "/saude": 401, "/parts/live": 401,
        "/static/app.js": 401, "/static/htmx.min.js": 401, "/api/events": 401,
        "/login": 200, "/static/style.css": 200, "/static/login.js": 200,
    }
    assert b'href="/login"' in page


@pytest_twisted.ensureDeferred
async def test_tcp_open_without_a_token(redis_server, tmp_path):
    """With no token configured (loopback), the dashboard is open like the API."""
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    base = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)
    try:
        statuses = [(await http("GET", base + p))[0] for p in ("/", "/ramais", "/saude")]
    finally:
        await stopped(svc)
    assert statuses == [200, 200, 200]


# ---------------------------------------------------------------- pages, without sockets


def page_setup(privacy=None, sessions=(), calls=()):
    """The API (and its dashboard) on StubTreq with fake sessions and stored calls."""
    from test_api import Setup, run

    s = Setup(privacy=privacy)
    for data in sessions:
        s.sessions.sessions[data["uuid"]] = data
    for record in calls:
        run(s.store.append_call(record))
    return s


def live_session(**facts):
    return {
        "uuid": "11111111-1111-4111-8111-111111111111",
        "extension_id": 1,
        "condominium_id": 1,
        "state": "collecting",
        "busy": False,
        "outcome": None,
        "started_at": "2026-12-05T10:00:00.000Z",
        "facts": dict({"intent": None, "visitor_name": None, "apartment": None,
                       "resident": None}, **facts),
        "attempts": 0,
        "legs": {"visitor": {"closed": False, "level_in_dbfs": -30, "level_out_dbfs": -20},
                 "resident": None},
        "timings": {"total_s": 65.2},
        "last_heard": "sou o joão do 101",
    }


def record(uuid, outcome, apartment, started_at):
    return {
        "uuid": uuid, "extension_id": 1, "condominium_id": 1, "started_at": started_at,
        "ended_at": started_at, "outcome": outcome, "ended_by": "visitor",
        "facts": {"intent": None, "visitor_name": "Ana", "apartment": apartment,
                  "resident": None},
        "decision_input": "key:1", "attempts": 1, "resident_leg_uuid": None,
        "dial_failures": [], "timings": {"to_resident_s": 3.2, "to_decision_s": 9.0,
                                         "total_s": 12.5},
    }


def test_live_hides_what_was_said_by_default():
    """
    Without [privacy] log_speech, Ao vivo shows a placeholder for the latest line, never
    its text (even if a session carried one); the rest of the call is shown.
    """
    s = page_setup(sessions=[live_session(apartment="101", visitor_name="João")])
    status, _, body = s.request("GET", "/parts/live")
    assert status == 200
    assert b"sou o jo" not in body
    assert "(oculto)".encode() in body
    assert "ouvindo o visitante".encode() in body and b"1:05" in body
    assert "João".encode() in body and b"101" in body


def test_live_shows_the_latest_line_with_log_speech():
    """With [privacy] log_speech on, Ao vivo shows the latest line understood."""
    from audiosocket.config import PrivacyConfig

    s = page_setup(privacy=PrivacyConfig(log_speech=True), sessions=[live_session()])
    body = s.request("GET", "/parts/live")[2]
    assert "sou o joão do 101".encode() in body


def test_history_filters():
    """Chamadas filters by outcome, apartment and date; a call's page shows its timeline."""
    s = page_setup(calls=[
        record("a0000000-0000-4000-8000-000000000001", "authorized", "101",
               "2026-12-04T10:00:00.000Z"),
        record("a0000000-0000-4000-8000-000000000002", "denied", "202",
               "2026-12-05T10:00:00.000Z"),
    ])

    def rows(query):
        body = s.request("GET", "/chamadas" + query)[2].decode()
        return re.findall(r'<tr data-uuid="a0+-0000-4000-8000-0+(\d)">', body)

    assert sorted(rows("")) == ["1", "2"]
    assert rows("?outcome=denied") == ["2"]
    assert rows("?apartment=101") == ["1"]
    assert rows("?date=2026-12-05") == ["2"]
    assert rows("?condominium_id=7") == []
    status, _, body = s.request("GET", "/chamadas/a0000000-0000-4000-8000-000000000001")
    assert status == 200
    text = body.decode()
    assert "morador atendeu" in text and "3,2 s" in text and "key:1" in text
    assert "nenhum portão acionado" in text
    assert s.request("GET", "/chamadas/nope")[0] == 404


def test_call_page_shows_what_the_gate_did():
    """A call whose gate failed says so on its page, with the relay's error."""
    call = record("a0000000-0000-4000-8000-000000000003", "authorized", "101",
                  "2026-12-05T10:00:00.000Z")
    call["gate"] = {"kind": "http", "result": "failed", "error": "the relay answered 503",
                    "attempts": 3}
    s = page_setup(calls=[call])
    text = s.request("GET", "/chamadas/a0000000-0000-4000-8000-000000000003")[2].decode()
    assert "http: <span class=\"access-failed\">falhou</span>" in text
    assert "(the relay answered 503)" in text


def test_health_turns_red_only_after_two_failures():
    """A failing check is "atenção" once, "falha" from the second time in a row on."""
    s = page_setup()
    s.store.available = False
    first = s.request("GET", "/parts/saude")[2].decode()
    second = s.request("GET", "/parts/saude")[2].decode()
    s.store.available = True
    third = s.request("GET", "/parts/saude")[2].decode()
    redis = lambda page: re.search(r'class="check check-(\w+)">.*?<strong>Redis', page, re.S)
    assert [redis(p).group(1) for p in (first, second, third)] == ["warn", "fail", "ok"]


def test_pages_carry_no_framing_or_inline_script():
    """Pages forbid framing and inline scripts (CSP), and are never cached."""
    s = page_setup()
    _, headers, _ = s.request("GET", "/")
    csp = headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert headers.getRawHeaders("cache-control") == ["no-store"]


def test_static_refuses_other_files():
    """Only files of the static directory are served: no path tricks."""
    s = page_setup()
    assert s.request("GET", "/static/app.js")[0] == 200
    assert s.request("GET", "/static/..%2F__init__.py")[0] == 404
    assert s.request("GET", "/static/.hidden")[0] == 404
    assert s.request("GET", "/static/nope.js")[0] == 404


def test_login_cookie_is_secure_under_tls():
    """Over TLS the login cookie is also Secure; over plain HTTP (loopback) it cannot be."""
    from test_api import Setup, _result

    s = Setup(token=lambda: "s3cret")
    cookies = {}
    for scheme in ("http", "https"):
        d = s.treq.request(
            "POST", scheme + "://api.test/login", headers={"Authorization": "Bearer s3cret"}
        )
        cookies[scheme] = _result(s.treq, d).headers.getRawHeaders("set-cookie")[0]
    assert cookies["https"].endswith("; HttpOnly; SameSite=Strict; Secure")
    assert "Secure" not in cookies["http"]


def test_login_needs_the_token():
    """POST /login without the token, or with a wrong one, is a 401 and sets no cookie."""
    from test_api import Setup

    s = Setup(token=lambda: "s3cret")
    for token in (None, "wrong"):
        status, headers, _ = s.request("POST", "/login", token=token)
        assert status == 401 and headers.getRawHeaders("set-cookie") is None


def test_access_page_lists_the_audit_with_filters():
    """
    Acessos lists the audit newest first, with who authorized and the result in pt-BR, and
    filters by condominium, apartment and UTC day; a bad filter is said, not a crash.
    """
    from twisted.internet.task import Clock

    from test_api import run

    s = page_setup()
    clock = Clock()
    s.store._reactor = clock  # when the store takes each entry
    day = 1796428800.0  # 2026-12-05T00:00:00Z
    for n, (condominium_id, apartment, at) in enumerate(
        [(1, "101", day - 60), (1, "202", day + 60), (2, "101", day + 120)]
    ):
        clock.advance(at - clock.seconds())
        run(s.store.append_access({
            "at": "2026-12-0{}T00:0{}:00.000Z".format(4 if n == 0 else 5, n),
            "condominium_id": condominium_id, "gate": "http", "apartment": apartment,
            "visitor": "Pedro", "authorized_by": ("resident", "preauth", "operator")[n],
            "who": "Ana", "evidence": "dtmf:1", "result": ("opened", "failed", "opened")[n],
            "error": "timeout" if n == 1 else None,
        }))

    def rows(query):
        body = s.request("GET", "/acessos" + query)[2].decode()
        return re.findall(r'<tr data-at="2026-12-0\dT00:0(\d):00.000Z">', body)

    assert rows("") == ["2", "1", "0"]
    assert rows("?condominium_id=1") == ["1", "0"]
    assert rows("?apartment=101") == ["2", "0"]
    assert rows("?date=2026-12-05") == ["2", "1"]
    body = s.request("GET", "/acessos")[2].decode()
    assert "pré-autorização" in body and "falhou" in body and "(timeout)" in body
    status, _, body = s.request("GET", "/acessos?condominium_id=x")
    assert status == 200 and "Condomínio deve ser um número." in body.decode()
    s.store.available = False
    assert "indisponível" in s.request("GET", "/acessos")[2].decode()


def test_access_page_needs_a_login():
    """Acessos is behind the token like every page."""
    from test_api import Setup

    s = Setup(token=lambda: "s3cret")
    assert s.request("GET", "/acessos")[0] == 401
    assert s.request("GET", "/acessos", token="s3cret")[0] == 200
