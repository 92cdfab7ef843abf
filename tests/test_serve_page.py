"""The chat page of `python -m internlm_fast.serve`, driven in headless Chromium against the real server:
the answer streams in, Stop keeps the partial answer in the conversation, the next turn sends it back,
New chat clears; the API key field and the server's error messages. Leaves a screenshot of a streamed
answer in test-output/serve_page.png.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and chromium-driver) and selenium;
without them the tests skip, unless IFAST_REQUIRE_BROWSER is set (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .serve_helpers import running_server, served_model_dir  # noqa: F401 (fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds for any one thing the page must do; generous for a slow, shared 2-core machine
POLL = 0.05

# Records every body the page POSTs, so the test can read the conversation it sends.
RECORD_REQUESTS = """
window.__sent = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, init) => {
  if (init && init.method === "POST") window.__sent.push(JSON.parse(init.body));
  return realFetch(url, init);
};
"""


def _missing_browser() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


# skipped before the served model is built; with IFAST_REQUIRE_BROWSER the `browser` fixture fails instead
if _missing_browser() is not None and not os.environ.get("IFAST_REQUIRE_BROWSER"):
    pytest.skip(_missing_browser(), allow_module_level=True)


@pytest.fixture
def browser() -> Iterator[object]:
    reason = _missing_browser()
    if reason is not None:
        pytest.fail(f"IFAST_REQUIRE_BROWSER is set but {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition: Callable[[object], object], what: str, timeout: float = TIMEOUT) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=POLL).until(condition, f"timed out waiting for {what}")


def _model_id(base_url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/v1/models", headers=headers), timeout=TIMEOUT) as r:
        return json.load(r)["data"][0]["id"]


def _set_slider(driver, element_id: str, value: int | float | str) -> str:
    """Moves a range input as a user would (an input event); returns the value it took."""
    return driver.execute_script(
        "const el = document.getElementById(arguments[0]);"
        "el.value = arguments[1] === 'max' ? el.max : arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));"
        "return el.value;",
        element_id,
        str(value),
    )


def _answer_state(driver, index: int) -> tuple[str | None, int]:
    """(data-state, length of the text) of the index-th assistant message."""
    return tuple(
        driver.execute_script(
            "const m = document.querySelectorAll('#messages .message.assistant')[arguments[0]];"
            "return m ? [m.dataset.state || null, m.querySelector('.content').textContent.length] : [null, 0];",
            index,
        )
    )


def _message_count(driver, role: str) -> int:
    return driver.execute_script("return document.querySelectorAll('#messages .message.' + arguments[0]).length;", role)


def _idle(driver) -> bool:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()


def _throttle(driver, bytes_per_s: int | None) -> None:
    """Limits how fast the browser receives responses (None: no limit)."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": bytes_per_s or -1, "uploadThroughput": -1},
    )


def _error_text(driver) -> str | None:
    """The page's error banner, None while it is hidden."""
    from selenium.webdriver.common.by import By

    error = driver.find_element(By.ID, "error")
    return None if error.get_attribute("hidden") is not None else error.text


def _server_error(base_url: str, path: str, body: dict | None = None, api_key: str | None = None) -> str:
    """The message of the OpenAI error the server answers `body` (POST) or a GET of `path` with."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    data = None if body is None else json.dumps(body).encode()
    try:
        urllib.request.urlopen(urllib.request.Request(base_url + path, data, headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        return json.load(e)["error"]["message"]
    raise AssertionError(f"{path} did not fail")


def test_chat_page_streams_stops_and_keeps_the_conversation(served_model_dir, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    with running_server(served_model_dir) as base_url:
        model_id = _model_id(base_url)
        driver.get(f"{base_url}/")
        driver.execute_script(RECORD_REQUESTS)
        _wait(driver, lambda d: d.find_element(By.ID, "model-name").text == model_id, f"the model name {model_id!r}")
        assert _idle(driver)
        assert _error_text(driver) is None
        assert driver.find_element(By.ID, "top-p-value").text == "0.80"

        # the longest answer the page allows (the model's context), greedy so that it is the same every run
        max_tokens = int(_set_slider(driver, "max-tokens", "max"))
        assert max_tokens >= 16
        assert driver.find_element(By.ID, "max-tokens-value").text == str(max_tokens)
        assert float(_set_slider(driver, "temperature", 0)) == 0
        assert driver.find_element(By.ID, "temperature-value").text == "0.00"

        prompt = driver.find_element(By.ID, "prompt")
        # Shift+Enter is a new line, not a send
        prompt.send_keys("Tell me")
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        prompt.send_keys("a long story.")
        assert prompt.get_attribute("value") == "Tell me\na long story."
        assert _message_count(driver, "user") == 0

        # The tiny model writes its whole answer in tens of milliseconds, too fast to watch or to stop;
        # a slow link (about 250 bytes an event) makes the same stream arrive over seconds.
        _throttle(driver, 2000)
        driver.find_element(By.ID, "send").click()
        _wait(driver, lambda d: _answer_state(d, 0)[1] > 0, "the first token of the answer")
        assert not driver.find_element(By.ID, "send").is_enabled()
        assert driver.find_element(By.ID, "stop").is_enabled()

        # the answer grows while it streams: at least two samples, each longer than the one before
        lengths: list[int] = []

        def grew_twice(d) -> bool:
            state, length = _answer_state(d, 0)
            assert state == "streaming", f"the answer ended ({state}) after {lengths} before it was seen growing"
            if not lengths or length > lengths[-1]:
                lengths.append(length)
            return len(lengths) >= 3

        _wait(driver, grew_twice, "the answer to grow while streaming")
        driver.find_element(By.ID, "stop").click()
        _wait(driver, lambda d: _answer_state(d, 0)[0] == "stopped", "the answer to be marked stopped")
        _wait(driver, _idle, "Send enabled and Stop disabled after Stop")
        _throttle(driver, None)
        stopped_length = _answer_state(driver, 0)[1]
        assert stopped_length >= lengths[-1]
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert _answer_state(driver, 0) == ("stopped", stopped_length), "the answer kept growing after Stop"
            time.sleep(POLL)
        partial = driver.execute_script(
            "return document.querySelector('#messages .message.assistant .content').textContent;"
        )

        # the second turn, with a system prompt: a short answer to its end, sent with Enter
        driver.find_element(By.ID, "system-prompt").send_keys("You are brief.")
        _set_slider(driver, "max-tokens", 32)
        prompt.send_keys("And another one?", Keys.ENTER)
        _wait(driver, lambda d: _answer_state(d, 1)[0] in ("done", "error", "stopped"), "the second answer to finish")
        assert _answer_state(driver, 1)[0] == "done", _error_text(driver)
        _wait(driver, _idle, "Send enabled and Stop disabled after the answer")
        assert _message_count(driver, "user") == 2
        assert _message_count(driver, "assistant") == 2
        assert _error_text(driver) is None

        # what the page sent: the whole conversation each turn, the stopped answer included
        sent = driver.execute_script("return window.__sent;")
        assert len(sent) == 2
        assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
        assert sent[0]["max_tokens"] == max_tokens and sent[0]["temperature"] == 0 and sent[0]["top_p"] == 0.8
        assert sent[0]["model"] == model_id
        assert sent[0]["messages"] == [{"role": "user", "content": "Tell me\na long story."}]
        assert sent[1]["max_tokens"] == 32
        assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
        assert sent[1]["messages"][0]["content"] == "You are brief."
        assert sent[1]["messages"][3]["content"] == "And another one?"
        _assert_shows(partial, sent[1]["messages"][2]["content"])

        # tokens/s of the last answer, from the usage the server reported
        speed = driver.find_element(By.ID, "tokens-per-second")
        assert "tokens/s" in speed.text, speed.text
        assert float(speed.get_attribute("data-rate")) > 0
        assert 1 <= int(speed.get_attribute("data-tokens")) <= 32

        # model text is only ever text: no element inside an answer but the page's own <pre>/<code>
        tags = driver.execute_script(
            "return [...document.querySelectorAll('#messages .content *')].map(e => e.tagName.toLowerCase());"
        )
        assert set(tags) <= {"pre", "code"}, tags

        out_dir = REPO_ROOT / "test-output"
        out_dir.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(tmp_path / "serve_page.png"))
        shutil.copyfile(tmp_path / "serve_page.png", out_dir / "serve_page.png")

        driver.find_element(By.ID, "new-chat").click()
        _wait(driver, lambda d: _message_count(d, "user") + _message_count(d, "assistant") == 0, "New chat to clear")
        assert speed.text == "–"


def test_chat_page_api_key_and_server_errors(served_model_dir, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    driver = browser
    key = "page-test-key"
    with running_server(served_model_dir, "--api-key", key) as base_url:
        driver.get(f"{base_url}/")
        # without the key the page shows the server's own message from its error JSON
        refused = _server_error(base_url, "/v1/models")
        _wait(driver, lambda d: refused in (_error_text(d) or ""), "the refused /v1/models to be shown")

        driver.find_element(By.ID, "api-key").send_keys(key)
        model_id = _model_id(base_url, key)
        _wait(driver, lambda d: d.find_element(By.ID, "model-name").text == model_id, "the model name with the key")
        assert _error_text(driver) is None
        assert driver.execute_script("return localStorage.getItem('internlm_fast.apiKey');") == key

        # the key outlives the page
        driver.refresh()
        _wait(driver, lambda d: d.find_element(By.ID, "model-name").text == model_id, "the model name after reload")
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == key

        # a refused question shows the server's message and goes back into the prompt, out of the conversation
        too_long = "hello world " * 400
        question = too_long.strip()
        driver.execute_script("document.getElementById('prompt').value = arguments[0];", too_long)
        driver.find_element(By.ID, "send").click()
        body = {"messages": [{"role": "user", "content": question}], "stream": True}
        refused = _server_error(base_url, "/v1/chat/completions", body, api_key=key)
        _wait(driver, lambda d: refused in (_error_text(d) or ""), "the refused question's error to be shown")
        _wait(driver, _idle, "Send enabled after the error")
        assert _message_count(driver, "user") + _message_count(driver, "assistant") == 0
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == question

        # and with the key a question is answered
        _set_slider(driver, "max-tokens", 16)
        _set_slider(driver, "temperature", 0)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("hi")
        driver.find_element(By.ID, "send").click()
        _wait(driver, lambda d: _answer_state(d, 0)[0] in ("done", "error", "stopped"), "the answer to finish")
        assert _answer_state(driver, 0)[0] == "done", _error_text(driver)
        assert _error_text(driver) is None


FENCE = re.compile(r"^ {0,3}`{3,}")


def _assert_shows(shown: str, text: str) -> None:
    """`shown` (an answer's textContent) is `text` as the page lays it out: the backticks of `code` and
    the fence lines of code blocks go, nothing else changes and nothing is added."""
    assert text, "the stopped answer is not in the conversation"
    if not any(FENCE.match(line) for line in text.split("\n")):
        assert shown.replace("`", "") == text.replace("`", "")
    else:
        rest = iter(text)
        assert all(c in rest for c in shown), "the page shows text that is not in the answer"


def test_chat_page_renders_code_blocks_as_escaped_text(served_model_dir, browser):  # noqa: F811
    """A fenced block becomes <pre><code> holding the code as text: markup in it is shown, not run."""
    from selenium.webdriver.common.by import By

    driver = browser
    with running_server(served_model_dir) as base_url:
        driver.get(f"{base_url}/")
        _wait(driver, lambda d: d.find_element(By.ID, "model-name").text, "the model name")
        _set_slider(driver, "max-tokens", 16)
        code = "print('<b>hi</b>')"
        driver.execute_script(
            "document.getElementById('prompt').value = arguments[0];", f"Run this:\n```python\n{code}\n```"
        )
        driver.find_element(By.ID, "send").click()
        _wait(driver, lambda d: _answer_state(d, 0)[0] in ("done", "stopped", "error"), "the answer to finish")
        blocks = driver.find_elements(By.CSS_SELECTOR, "#messages .message.user .content pre code")
        assert [b.text for b in blocks] == [code]
        assert not driver.find_elements(By.CSS_SELECTOR, "#messages .content b")
