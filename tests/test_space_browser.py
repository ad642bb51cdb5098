"""The deploy page in a real browser: Playwright driving Debian's Chromium against `hubdeploy up`.

badge link `/deploy?model=…` → model box and report filled (the card's script / onerror /
javascript: payloads inert) → CPU target → Deploy → phases → URL and key → a streamed chat
answer → delete from My endpoints. Screenshots of each stage go to test-artifacts/space/.

The newcomer's first minute, each in a fresh browser (no saved token) and without a reload:
`/` → paste the token → Connect → the demo model prefilled and inspected → Deploy → chat;
the badge link → Connect → its model's report; `hubdeploy up`'s sign-in link → signed in.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.fixtures.local_hub import LocalHub
from tests.test_space_gradio_client import SpaceService, push_hostile_repo, start_space_service

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "space"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, local_hub: LocalHub,
        tiny_models: Any) -> Iterator[tuple[SpaceService, str]]:
    """`hubdeploy up` as a newcomer starts it (with the demo model), plus the hostile-card repo on the Hub."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    work = tmp_path_factory.mktemp("space_browser")
    repo = push_hostile_repo(local_hub, tiny_models("mixtral", "awq", adapters=1), work)
    with start_space_service(local_hub, work / "data", demo=True) as svc:
        yield svc, repo


@pytest.fixture(scope="module")
def browser(env: tuple[SpaceService, str]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any) -> Any:
    """A tab in a new browser context: no local storage, no cookies, as on a first visit."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []  # type: ignore[attr-defined]
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    pg.set_default_timeout(60_000)
    return pg


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    pg = new_page(browser)
    try:
        yield pg
    finally:
        pg.context.close()


@pytest.fixture
def fresh(browser: Any, env: tuple[SpaceService, str]) -> Iterator[Any]:
    """A first-time visitor's tab; whatever it deployed is deleted afterwards (one CPU slot)."""
    pg = new_page(browser)
    try:
        yield pg
    finally:
        pg.context.close()
        env[0].delete_all()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def value(page: Any, elem_id: str) -> str:
    return page.locator(f"#{elem_id} :is(input, textarea)").first.input_value()


def assert_inert(page: Any) -> None:
    """No payload of the hostile card ran, and none of its active parts reached the DOM."""
    assert page.evaluate("() => window.__pwned") is None
    assert page.dialogs == []
    card = page.locator("#hd-card")
    assert card.locator("script, iframe, [onerror], a[href^='javascript'], a[href^='data:']").count() == 0
    assert "click for prizes" in card.inner_text()


def wait_text(page: Any, elem_id: str, text: str, timeout: float = 60_000) -> None:
    page.wait_for_function("([id, t]) => document.getElementById(id)?.innerText.includes(t)",
                           arg=[elem_id, text], timeout=timeout)


def mark_document(page: Any) -> None:
    """Tag the loaded document: a reload or a navigation would drop the tag (see `same_document`)."""
    page.evaluate("() => { window.__hdFirstDocument = true; }")


def same_document(page: Any) -> bool:
    return page.evaluate("() => window.__hdFirstDocument === true")


def asks_for_token(page: Any) -> None:
    """What a first visit shows: the access box open, the page asking for the service token."""
    wait_text(page, "hd-status", "Connect to the deploy service")
    assert "sign-in link" in page.locator("#hd-status").inner_text()
    assert page.locator("#hd-service-token input").is_visible()


def sign_in(page: Any, svc: SpaceService) -> None:
    """Paste the token and press Connect, as the README says (no reload afterwards)."""
    page.locator("#hd-service-token input").fill(svc.token)
    page.locator("#hd-connect").click()


def connect(page: Any, svc: SpaceService) -> None:
    """First visit: give the service token once (kept, encrypted, in this browser's local storage)."""
    page.goto(svc.url + "/")
    asks_for_token(page)
    sign_in(page, svc)
    wait_text(page, "hd-facts", "MixtralForCausalLM")  # the demo model, inspected on Connect


def demo_model(svc: SpaceService) -> str:
    model = httpx.get(svc.url + "/api/defaults", headers=svc.headers, timeout=30).json()["model"]
    assert model, "the service was started without its demo model"
    return model


def deploy_until_running(page: Any, svc: SpaceService, shots: str | None = None) -> list[str]:
    """Press Deploy and follow the phases shown until `running`; the phases seen, in order."""
    page.locator("#hd-deploy").click()
    phases: list[str] = []
    took_progress_shot = shots is None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        el = page.locator("#hd-progress .hd-progress")
        if el.count():
            ph = el.first.get_attribute("data-phase") or ""
            if ph and (not phases or phases[-1] != ph):
                phases.append(ph)
                if ph != "running" and not took_progress_shot:
                    page.locator("#hd-logs-acc button").first.click()
                    shot(page, shots)
                    took_progress_shot = True
            if ph == "running":
                break
        toast = page.locator("[data-testid='toast-body'], .toast-body")
        if toast.count():
            pytest.fail("error toast: " + toast.first.inner_text() + "\n" + svc.log_tail())
        if page.locator("#hd-progress .hd-error").count():
            pytest.fail(page.locator("#hd-progress").inner_text() + "\n" + svc.log_tail())
        time.sleep(0.1)
    assert phases and phases[-1] == "running", (phases, svc.log_tail())
    page.wait_for_selector("#hd-result", state="visible")
    return phases


def chat_answer(page: Any, message: str = "Hello there") -> tuple[str, list[int]]:
    """Send one message in the playground; the settled answer and its lengths while streaming."""
    page.locator("#hd-chat-input textarea, #hd-chat-input input").first.fill(message)
    page.locator("#hd-send").click()
    bot = page.locator("#hd-chatbot .bot, #hd-chatbot [data-testid='bot']")
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if bot.count():
            lengths.append(len(bot.last.inner_text()))
            if page.locator("#hd-chat-input textarea, #hd-chat-input input").first.input_value() == "" and \
                    lengths[-1] > 0 and len(lengths) > 3 and lengths[-1] == lengths[-2] == lengths[-3]:
                break
        time.sleep(0.05)
    return (bot.last.inner_text() if bot.count() else ""), lengths


def test_badge_to_chat_to_delete(env: tuple[SpaceService, str], page: Any) -> None:
    svc, repo = env
    connect(page, svc)

    # The badge link: everything prefilled from the query, report and card shown.
    page.goto(f"{svc.url}/deploy?model={repo}&adapters={repo}-lora-0&gpu=cpu&max_model_len=512")
    page.wait_for_function("() => document.querySelector('#hd-facts')?.innerText.includes('MixtralForCausalLM')")
    assert value(page, "hd-model") == repo
    assert "?model=" in page.url  # /deploy kept the query string
    assert "Ready to deploy" in page.locator("#hd-verdict").inner_text()
    page.locator("#hd-card-acc button").first.click()  # open the card
    page.wait_for_function("() => document.querySelector('#hd-card')?.innerText.includes('Hostile section')")
    assert_inert(page)
    page.locator("#hd-card a", has_text="click for prizes").click()  # a link without href: nothing happens
    assert_inert(page)
    assert page.locator("#hd-adapters input[type=checkbox]:checked").count() == 1
    assert value(page, "hd-name") == "mixtral-awq-card" and value(page, "hd-max-len") == "512"
    shot(page, "01-prefilled-report")

    # Hardware: the CPU target (the badge asked for it; pick it again as a user would).
    page.locator("#hd-gpu label", has_text="cpu").click()
    page.wait_for_function("() => document.querySelector('#hd-plan')?.innerText.includes('CPU target')")
    assert page.locator("#hd-gpu input[value='cpu']").is_checked()
    shot(page, "02-hardware-cpu")

    # Scale-to-zero from the form (long enough not to sleep during this test).
    page.locator("#hd-scale-to-zero input").fill("900")

    # Deploy: watch the phases go by.
    phases = deploy_until_running(page, svc, shots="03-deploy-progress")
    assert len(phases) >= 2, phases  # at least one phase before running was shown
    url, key = value(page, "hd-url"), value(page, "hd-key")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and len(key) >= 20
    curl = page.locator("#hd-snippet-curl").inner_text()
    assert url in curl
    # the panel shows scale-to-zero; the private endpoint's snippets send its key and the wake-up header
    assert value(page, "hd-scale-now").startswith("after 900 s")
    assert 'Authorization: Bearer $HUBDEPLOY_API_KEY' in curl and "X-Scale-Up-Timeout: 120" in curl
    page.locator("#hd-result button[role=tab]", has_text="openai").click()
    assert '"X-Scale-Up-Timeout": "120"' in page.locator("#hd-snippet-openai").inner_text()
    shot(page, "04-endpoint-ready")
    spec = httpx.get(f"{svc.url}/api/endpoints/mixtral-awq-card", headers=svc.headers).json()["spec"]
    assert spec["gpu"] == "cpu" and spec["engine"]["max_model_len"] == 512  # the badge's choices were deployed
    assert spec["scale_to_zero_after_s"] == 900
    assert spec["adapters"] == {"mixtral-awq-card-lora-0": f"{repo}-lora-0"}

    # Playground: a streamed answer from the endpoint.
    answer, lengths = chat_answer(page)
    assert answer.strip() and "⚠️" not in answer, answer
    print(f"\nphases seen: {phases}; answer lengths while streaming: {sorted(set(lengths))[:12]}")
    shot(page, "05-chat")

    # My endpoints: listed as running, then deleted.
    page.locator("button[role=tab]", has_text="My endpoints").click()
    page.wait_for_function("() => document.querySelector('#hd-endpoints')?.innerText.includes('running')")
    assert "mixtral-awq-card" in page.locator("#hd-endpoints").inner_text()
    assert "after 900 s idle" in page.locator("#hd-endpoints").inner_text()
    page.wait_for_timeout(700)  # let the refresh spinners settle for the screenshot
    shot(page, "06-my-endpoints")
    page.locator("#hd-delete").click()
    page.wait_for_function("() => document.querySelector('#hd-ep-status')?.innerText.includes('deleted')")
    assert "mixtral-awq-card" not in page.locator("#hd-endpoints").inner_text()
    shot(page, "07-deleted")
    assert_inert(page)


def test_badge_link_opens_prefilled_page(env: tuple[SpaceService, str], page: Any, local_hub: LocalHub) -> None:
    svc, repo = env
    page.context.clear_cookies()
    page.goto(svc.url + "/gradio_api/info")
    page.evaluate("() => localStorage.clear()")  # a fresh browser: no saved token
    connect(page, svc)
    page.goto(f"{svc.url}/?model={repo}")
    page.wait_for_function("() => document.querySelector('#hd-facts')?.innerText.includes('MixtralForCausalLM')")
    page.locator("#hd-badge-acc button").first.click()
    link = page.locator("#hd-badge-preview a").first
    href = link.get_attribute("href")
    assert href == f"{svc.url}/deploy?model={repo}", href
    img = page.locator("#hd-badge-preview img").first
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    # Search suggestions from the Hub while typing in the model box: first what the page's
    # handler gets from the Hub, then what the browser shows.
    from hubdeploy.space.hub import search_models

    hits = search_models("mixtral-awq-ca", endpoint=local_hub.endpoint)
    assert repo in hits, hits
    box = page.locator("#hd-model input")
    suggestion = f"ul[role=listbox] li:has-text('{repo}')"
    box.click()
    # The whole query, then one key-up: typing it key by key fires a search per key, and on the
    # session's crowded test Hub the early, broad ones ("mi") are slow; the handler keeps only
    # the last (trigger_mode="always_last"), so one full query is what a settled input sends.
    box.fill("mixtral-awq-ca")
    box.press("End")
    deadline = time.monotonic() + 90
    while True:
        try:
            page.wait_for_selector(suggestion, timeout=10_000)
            break
        except Exception as e:  # noqa: BLE001 - playwright's TimeoutError
            if time.monotonic() > deadline:
                shot(page, "09-search-suggestions-missing")
                raise AssertionError(f"no suggestion listed; model box {box.input_value()!r}, lists: "
                                     f"{page.locator('ul[role=listbox]').all_inner_texts()!r}") from e
            page.mouse.click(5, 5)  # blur: a click on the empty page corner
            box.click()  # focus: the dropdown lists its current choices
            box.press("End")  # and one more key-up with the full query
    shot(page, "09-search-suggestions")
    page.goto("about:blank")
    page.goto(href)
    page.wait_for_function("() => document.querySelector('#hd-facts')?.innerText.includes('MixtralForCausalLM')")
    assert value(page, "hd-model") == repo
    page.locator("#hd-card-acc button").first.click()
    page.wait_for_function("() => document.querySelector('#hd-card')?.innerText.includes('Hostile section')")
    shot(page, "08-badge-target")
    assert_inert(page)


def form_state(page: Any) -> dict[str, Any]:
    """What a visitor sees of the form: model, the target picked, the suggested name, the verdict."""
    return {"model": value(page, "hd-model"), "name": value(page, "hd-name"),
            "gpu": page.locator("#hd-gpu input:checked").first.get_attribute("value"),
            "verdict": page.locator("#hd-verdict").inner_text(), "facts": page.locator("#hd-facts").inner_text(),
            "asks_token": page.locator("#hd-service-token input").is_visible()}


def test_newcomer_home_connect_deploy_chat(env: tuple[SpaceService, str], fresh: Any) -> None:
    """The README's path in a fresh browser: `/` → paste the token → Connect → the demo model is
    there and inspected (as after a reload) → Deploy → chat; never a reload."""
    svc, _ = env
    svc.delete_all()  # the one CPU slot is the demo's
    demo = demo_model(svc)
    fresh.goto(svc.url + "/")
    mark_document(fresh)
    asks_for_token(fresh)
    assert value(fresh, "hd-model") == ""  # nothing to show before the service lets us in
    sign_in(fresh, svc)
    wait_text(fresh, "hd-facts", "MixtralForCausalLM")
    connected = form_state(fresh)
    assert connected["model"] == demo and connected["gpu"] == "cpu", connected
    assert "Ready to deploy" in connected["verdict"] and not connected["asks_token"], connected
    shot(fresh, "10-newcomer-connected")

    # What a reload shows (a second tab of this browser, the token now saved): the same form.
    tab = fresh.context.new_page()
    tab.goto(svc.url + "/")
    wait_text(tab, "hd-facts", "MixtralForCausalLM")
    assert form_state(tab) == connected
    tab.close()

    phases = deploy_until_running(fresh, svc)
    assert value(fresh, "hd-url").endswith("/v1") and len(value(fresh, "hd-key")) >= 20, phases
    assert value(fresh, "hd-scale-now").startswith("off")  # the default: no wake-up header in the snippets
    assert "X-Scale-Up-Timeout" not in fresh.locator("#hd-snippet-curl").inner_text()
    answer, _ = chat_answer(fresh)
    assert answer.strip() and "⚠️" not in answer, answer
    shot(fresh, "11-newcomer-chat")
    assert same_document(fresh), "the page was reloaded"
    eps = httpx.get(svc.url + "/api/endpoints", headers=svc.headers, timeout=30).json()["endpoints"]
    assert [(e["spec"]["model"], e["spec"]["gpu"], e["status"]) for e in eps] == [(demo, "cpu", "running")]


def test_newcomer_badge_link_connect_shows_report(env: tuple[SpaceService, str], fresh: Any) -> None:
    """A badge link in a fresh browser: the model is prefilled but the service asks for its token;
    Connect alone (no Inspect press, no reload) shows the model's report with the link's choices."""
    svc, repo = env
    fresh.goto(f"{svc.url}/deploy?model={repo}&gpu=cpu&max_model_len=512")
    mark_document(fresh)
    asks_for_token(fresh)
    assert value(fresh, "hd-model") == repo
    assert "MixtralForCausalLM" not in fresh.locator("#hd-facts").inner_text()  # not inspected without a token
    sign_in(fresh, svc)
    wait_text(fresh, "hd-facts", "MixtralForCausalLM")
    state = form_state(fresh)
    assert state["model"] == repo and state["gpu"] == "cpu" and state["name"] == "mixtral-awq-card", state
    assert "Ready to deploy" in state["verdict"] and not state["asks_token"], state
    assert value(fresh, "hd-max-len") == "512" and "?model=" in fresh.url
    assert same_document(fresh), "the page was reloaded"
    shot(fresh, "12-newcomer-badge-connected")


def test_sign_in_link(env: tuple[SpaceService, str], fresh: Any, browser: Any) -> None:
    """`hubdeploy up`'s sign-in link: one click signs a fresh browser in (the token saved as Connect
    saves it, then gone from the address bar); the token never reaches the server's log."""
    from hubdeploy.commands.up import sign_in_url

    svc, _ = env
    printed = svc.log.read_text(errors="replace")
    assert "sign in: " + svc.url + "/#token=<HUBDEPLOY_ADMIN_TOKEN>" in printed, printed[-2000:]
    assert svc.token not in printed  # a token the operator gave is not echoed into a log file
    fresh.goto(sign_in_url(svc.url, svc.token))
    mark_document(fresh)
    wait_text(fresh, "hd-facts", "MixtralForCausalLM")
    state = form_state(fresh)
    assert state["model"] == demo_model(svc) and not state["asks_token"], state
    assert fresh.evaluate("() => window.location.hash") == "" and "token" not in fresh.url, fresh.url
    stored = fresh.evaluate("() => window.localStorage.getItem('hubdeploy-service-token')")
    assert stored and svc.token not in stored  # where Connect keeps it: encrypted local storage
    tab = fresh.context.new_page()  # so another tab of this browser is signed in too
    tab.goto(svc.url + "/")
    wait_text(tab, "hd-facts", "MixtralForCausalLM")
    assert value(tab, "hd-model") == state["model"] and not form_state(tab)["asks_token"]
    assert same_document(fresh)
    assert svc.token not in svc.log.read_text(errors="replace")  # the fragment was never sent

    wrong = new_page(browser)  # a link with a wrong token: refused, said so, nothing prefilled
    try:
        wrong.goto(sign_in_url(svc.url, "hdadm_not_the_token"))
        wait_text(wrong, "hd-status", "401")
        assert wrong.evaluate("() => window.location.hash") == ""
        assert value(wrong, "hd-model") == "" and form_state(wrong)["asks_token"]
    finally:
        wrong.context.close()
