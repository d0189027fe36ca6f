"""The web page in a real browser: `moa serve` in its own process on the fake upstream, driven
through headless Chromium (the system's, installed by the Makefile) with Playwright.

Screenshots go to $MOA_SCREENSHOT_DIR when set (`MOA_SCREENSHOT_DIR=docs` refreshes the one the
README shows), else to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moa.testing import FakeOpenAIServer, Reply
from tests.test_server_process import ServeProcess

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROPOSERS = ("qwen2.5-72b", "llama-3.3-70b", "mixtral-8x22b")
AGGREGATOR = "qwen2.5-72b-agg"
KEY = "browser-test-key-0123456789"
#: Fails the test if it ever runs: set by each payload below, were it executed.
XSS = (
    'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
    "[click me](javascript:window.__pwned=3) [also](JaVaScRiPt:window.__pwned=4) "
    "![pic](javascript:window.__pwned=5) [safe](https://example.com/a?b=1)"
)


def write_config(path: Path, fake: FakeOpenAIServer) -> Path:
    config = {
        "providers": {
            "fake": {"base_url": fake.base_url, "prices": {"*": {"input": 0.9, "output": 0.9}}}
        },
        "proposers": [{"model": m} for m in PROPOSERS],
        "aggregator": {"model": AGGREGATOR},
        "layers": 3,
        "max_attempts": 1,
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start(tmp: Path, fake: FakeOpenAIServer, env: dict[str, str] | None = None) -> ServeProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp / "moa.yaml", fake)
    return ServeProcess(
        ["serve", "--config", str(config)], {"MOA_API_KEYS": "", **(env or {})}, tmp
    )


@pytest.fixture(scope="module")
def served(
    fake_server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    server = start(tmp_path_factory.mktemp("serve"), fake_server)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []

    def open_(url: str, **options: Any) -> Any:
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MOA_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ask(page: Any, question: str) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")


def card(page: Any, layer: int, index: int) -> Any:
    return page.locator(f".turn >> nth=-1 >> .card[data-layer='{layer}'][data-index='{index}']")


def wait_until_finished(page: Any, turns: int = 1) -> None:
    # (Locators, not wait_for_function: the page's CSP forbids the eval it would need.)
    page.locator(".run.finished").nth(turns - 1).wait_for(timeout=20_000)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_run_fills_every_card_then_the_answer_and_the_conversation_stays(
    fake: FakeOpenAIServer, served: ServeProcess, open_page: Callable[..., Any]
) -> None:
    draft = "Light scatters off the air, blue the most."
    fake.script(PROPOSERS[0], Reply(text=draft, chunk_delay=0.15))
    fake.script(AGGREGATOR, Reply(text="**Rayleigh** scattering.", chunk_delay=0.02))
    page = open_page(served.url)
    assert page.locator("#model").input_value() == "moa"
    # Shift+Enter starts a new line; Enter sends.
    page.fill("#prompt", "Why is the sky")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("blue?")
    assert page.locator("#prompt").input_value() == "Why is the sky\nblue?"
    assert page.locator(".turn").count() == 0
    page.fill("#prompt", "Why is the sky blue?")
    page.press("#prompt", "Enter")
    # The slow proposer's card shows its words while it is still writing them.
    streaming = page.locator(".card[data-layer='1'][data-index='0'][data-status='streaming']")
    streaming.locator(".card-body").wait_for()
    assert draft.startswith(streaming.locator(".card-body").inner_text())
    wait_until_finished(page)
    layers = page.locator("details.layers")
    assert layers.get_attribute("open") is None  # the agents fold away after the run
    layers.locator("summary").click()

    for layer in (1, 2):
        for index, model in enumerate(PROPOSERS):
            agent = card(page, layer, index)
            assert agent.get_attribute("data-status") == "done"
            assert agent.locator(".card-model").inner_text() == model
            expected = draft if (layer, index) == (1, 0) else f"{model} answer {layer - 1}"
            assert agent.locator(".card-body").inner_text() == expected
            assert "tok" in agent.locator(".card-meta").inner_text()
    assert card(page, 3, 0).get_attribute("data-status") == "done"
    answer = page.locator(".answer")
    assert answer.inner_text() == "Rayleigh scattering."
    assert answer.locator("strong").inner_text() == "Rayleigh"
    summary = page.locator(".summary").inner_text()
    assert "7 calls" in summary
    assert "first token" in summary
    assert "$0.00" in summary  # prices are set in the config
    assert page.locator(".wf-row").count() == 7
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".copy")
    assert page.evaluate("navigator.clipboard.readText()") == "**Rayleigh** scattering."
    # The question went upstream as the user wrote it.
    assert fake.requests_for(PROPOSERS[0])[0].messages[-1]["content"] == "Why is the sky blue?"

    # A reload shows the same conversation, kept in local storage; the next question carries it.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(".answer").inner_text() == "Rayleigh scattering."
    assert page.locator(".card[data-status='done']").count() == 7
    ask(page, "And at sunset?")
    wait_until_finished(page, 2)
    history = fake.requests_for(AGGREGATOR)[-1].messages
    assert {"role": "assistant", "content": "**Rayleigh** scattering."} in history
    assert history[-1]["content"].endswith("And at sunset?")

    # Regenerate runs the last question again; Clear forgets everything.
    before = len(fake.requests_for(AGGREGATOR))
    page.locator(".turn >> nth=-1 >> .regenerate").click()
    wait_until_finished(page, 2)
    assert len(fake.requests_for(AGGREGATOR)) == before + 1
    assert page.locator(".turn").count() == 2
    page.click("#clear")
    assert page.locator(".turn").count() == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator(".turn").count() == 0
    assert page.errors == []


def test_a_failed_proposer_shows_as_failed_while_the_answer_arrives(
    fake: FakeOpenAIServer, served: ServeProcess, open_page: Callable[..., Any]
) -> None:
    fake.script(PROPOSERS[1], Reply(status=500))
    page = open_page(served.url)
    ask(page, "hello")
    wait_until_finished(page)
    page.locator("details.layers summary").click()  # expandable after the run
    failed = card(page, 1, 1)
    assert failed.get_attribute("data-status") == "failed"
    assert "500" in failed.locator(".card-error").inner_text()
    assert card(page, 1, 0).get_attribute("data-status") == "done"
    assert page.locator(".answer").inner_text() == f"{AGGREGATOR} answer 0"


def test_stop_cancels_the_run_and_every_upstream_call(
    fake: FakeOpenAIServer, served: ServeProcess, open_page: Callable[..., Any]
) -> None:
    for model in PROPOSERS:
        fake.script(model, Reply(hang=30))
    page = open_page(served.url)
    ask(page, "a slow question")
    wait_for(lambda: len(fake.requests) == 3)
    assert card(page, 1, 0).get_attribute("data-status") == "waiting"
    page.click("#stop")
    wait_for(lambda: all(r.disconnected for r in fake.requests))
    wait_until_finished(page)
    assert card(page, 1, 0).get_attribute("data-status") == "cut"
    assert page.locator(".run-error").inner_text() == "stopped"
    assert len(fake.requests) == 3  # nothing after the stop

    # Ask again: the page and the server are ready for the next run.
    ask(page, "now a quick one")
    wait_until_finished(page, 2)
    assert page.locator(".turn >> nth=-1 >> .answer").inner_text() == f"{AGGREGATOR} answer 0"
    # The stopped turn is not sent as history (it has no answer).
    assert "a slow question" not in fake.requests_for(AGGREGATOR)[-1].text


def test_markup_and_script_links_in_model_output_stay_inert(
    fake: FakeOpenAIServer, served: ServeProcess, open_page: Callable[..., Any]
) -> None:
    fake.script(PROPOSERS[0], Reply(text=XSS))
    fake.script(AGGREGATOR, Reply(text=XSS))
    page = open_page(served.url)
    ask(page, "show me markup")
    wait_until_finished(page)
    page.locator("details.layers summary").click()
    page.wait_for_timeout(300)  # time for an onerror handler to fire, were there one
    assert page.evaluate("window.__pwned") is None
    # The answer, the aggregator's card and the first proposer's card all show the payload.
    for where in (".answer", ".card[data-layer='1'][data-index='0'] .card-body"):
        rendered = page.locator(where)
        assert "<img src=x onerror=" in rendered.inner_text()  # shown as text
        assert rendered.locator("img, script").count() == 0
    links = page.locator(".md a")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert hrefs == ["https://example.com/a?b=1"] * 3
    for i in range(links.count()):
        assert links.nth(i).get_attribute("rel") == "noopener noreferrer"
    assert page.locator(".md .unsafe-link").count() == 9  # the javascript: links, as text
    clicked = page.locator(".answer .unsafe-link").first
    clicked.click()
    page.wait_for_timeout(100)
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []


def test_with_api_keys_the_page_asks_for_a_key_kept_in_session_storage(
    fake: FakeOpenAIServer, tmp_path: Path, browser: Any
) -> None:
    server = start(tmp_path / "keyed", fake, {"MOA_API_KEYS": KEY})
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url)
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.fill("#key-input", "not-the-right-key")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-error:visible")
        assert "refused" in page.locator("#key-error").inner_text()
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready=true]")
        assert not dialog.is_visible()
        ask(page, "hello with a key")
        wait_until_finished(page)
        assert page.locator(".answer").inner_text() == f"{AGGREGATOR} answer 0"
        assert page.evaluate("sessionStorage.getItem('moa.apiKey')") == KEY
        stored = page.evaluate("JSON.stringify(localStorage)")
        assert KEY not in stored
        assert "hello with a key" in stored
        # A new tab (a new session) asks again.
        other = context.new_page()
        other.goto(server.url)
        other.locator("#key-dialog").wait_for(state="visible")
    finally:
        context.close()
        server.terminate()
    assert KEY not in server.logs()


def test_screenshots_mid_run_on_desktop_and_phone_in_dark_mode(
    fake: FakeOpenAIServer,
    served: ServeProcess,
    open_page: Callable[..., Any],
    screenshots: Path,
) -> None:
    drafts = {
        PROPOSERS[0]: "Sunlight scatters off air molecules; **blue** light, with its short "
        "wavelength, scatters the most (Rayleigh scattering), so it reaches us from every "
        "direction of the sky.",
        PROPOSERS[1]: "Because of Rayleigh scattering: intensity goes as 1/λ⁴, so blue "
        "(~450 nm) scatters about 5× more than red (~700 nm).",
        PROPOSERS[2]: "Short wavelengths scatter more. Violet scatters even more than blue, but "
        "the Sun emits less of it and our eyes are less sensitive to it.",
    }
    fake.script(PROPOSERS[2], Reply(status=503, latency=0.3))  # one failed card in the picture
    for n, (model, text) in enumerate(drafts.items()):
        fake.script(
            model,
            Reply(text=text, latency=0.2 * n, chunk_delay=0.03),
            Reply(text=text, latency=0.1 * n, chunk_delay=0.04),
        )
    answer = (
        "The sky looks blue because of **Rayleigh scattering**:\n\n"
        "1. Sunlight holds every colour; air molecules are far smaller than its wavelengths.\n"
        "2. Scattering grows as 1/λ⁴, so blue light (~450 nm) is scattered about five times "
        "more than red (~700 nm).\n"
        "3. Violet scatters more still, but sunlight carries less of it and our eyes are less "
        "sensitive to it.\n\n"
        "At sunset the light crosses much more air, the blue is scattered away, and reds remain."
    )
    fake.script(AGGREGATOR, Reply(text=answer, chunk_delay=0.12))
    page = open_page(served.url, viewport={"width": 1200, "height": 980})
    ask(page, "Why is the sky blue?")
    page.locator(".answer li").nth(1).wait_for(timeout=20_000)  # two points of the answer
    desktop = screenshots / "webui.png"
    page.screenshot(path=str(desktop))
    wait_until_finished(page)

    phone = open_page(  # the same browser storage: the same conversation
        served.url,
        viewport={"width": 390, "height": 844},
        color_scheme="dark",
        is_mobile=True,
        storage_state=page.context.storage_state(),
    )
    assert phone.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    background = phone.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 22, 27)"  # the dark palette
    phone.locator("details.layers summary").first.click()
    phone.locator("details.timeline summary").first.click()
    # Nothing wider than the screen: no sideways scrolling on a phone.
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.locator(".answer").scroll_into_view_if_needed()
    phone.screenshot(path=str(screenshots / "webui-phone-dark.png"))
    for name in ("webui.png", "webui-phone-dark.png"):
        data = (screenshots / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
