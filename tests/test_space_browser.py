"""The deploy page in a real browser: Playwright driving Debian's Chromium against `hubdeploy up`.

badge link `/deploy?model=…` → model box and report filled (the card's script / onerror /
javascript: payloads inert) → CPU target → Deploy → phases → URL and key → a streamed chat
answer → delete from My endpoints. Screenshots of each stage go to test-artifacts/space/.
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
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    work = tmp_path_factory.mktemp("space_browser")
    repo = push_hostile_repo(local_hub, tiny_models("mixtral", "awq", adapters=1), work)
    with start_space_service(local_hub, work / "data") as svc:
        yield svc, repo


@pytest.fixture(scope="module")
def page(env: tuple[SpaceService, str]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        pg.dialogs = []  # type: ignore[attr-defined]
        pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            ctx.close()
            browser.close()


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


def connect(page: Any, svc: SpaceService) -> None:
    """First visit: give the service token once (kept, encrypted, in this browser's local storage)."""
    page.goto(svc.url + "/")
    page.wait_for_function("() => document.querySelector('#hd-status')?.innerText.includes('Connect to the deploy')")
    page.locator("#hd-service-token input").fill(svc.token)
    page.locator("#hd-connect").click()
    page.wait_for_function("() => document.querySelector('#hd-status')?.innerText.includes('Token saved')")


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

    # Deploy: watch the phases go by.
    page.locator("#hd-deploy").click()
    phases: list[str] = []
    took_progress_shot = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        el = page.locator("#hd-progress .hd-progress")
        if el.count():
            ph = el.first.get_attribute("data-phase") or ""
            if ph and (not phases or phases[-1] != ph):
                phases.append(ph)
                if ph != "running" and not took_progress_shot:
                    page.locator("#hd-logs-acc button").first.click()
                    shot(page, "03-deploy-progress")
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
    assert len(phases) >= 2, phases  # at least one phase before running was shown
    page.wait_for_selector("#hd-result", state="visible")
    url, key = value(page, "hd-url"), value(page, "hd-key")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and len(key) >= 20
    assert url in page.locator("#hd-snippet-curl").inner_text()
    shot(page, "04-endpoint-ready")
    spec = httpx.get(f"{svc.url}/api/endpoints/mixtral-awq-card", headers=svc.headers).json()["spec"]
    assert spec["gpu"] == "cpu" and spec["engine"]["max_model_len"] == 512  # the badge's choices were deployed
    assert spec["adapters"] == {"mixtral-awq-card-lora-0": f"{repo}-lora-0"}

    # Playground: a streamed answer from the endpoint.
    page.locator("#hd-chat-input textarea, #hd-chat-input input").first.fill("Hello there")
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
    answer = bot.last.inner_text()
    assert answer.strip() and "⚠️" not in answer, answer
    print(f"\nphases seen: {phases}; answer lengths while streaming: {sorted(set(lengths))[:12]}")
    shot(page, "05-chat")

    # My endpoints: listed as running, then deleted.
    page.locator("button[role=tab]", has_text="My endpoints").click()
    page.wait_for_function("() => document.querySelector('#hd-endpoints')?.innerText.includes('running')")
    assert "mixtral-awq-card" in page.locator("#hd-endpoints").inner_text()
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
