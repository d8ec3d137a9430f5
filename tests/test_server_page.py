"""The page at `/`, driven in headless Chromium (Debian's chromium + chromium-driver, which
`make test` installs): a prompt typed and sent streams an answer whose tokens are coloured by
how they were produced; with "compare plain decoding", both speeds and the same text.

In CI a missing browser fails these tests; elsewhere they are skipped with the reason.
ONEPASS_SCREENSHOT=docs/server.png writes the real-model session's screenshot there."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_server import greedy, live_server

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # runs as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1000",
]


@pytest.fixture(scope="module")
def browser():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        message = "headless Chromium is missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="onepass-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, url: str, max_tokens: int) -> None:
    browser.get(url + "/")
    WebDriverWait(browser, 20).until(
        lambda b: "context" in b.find_element(By.ID, "model").text, "the page did not load"
    )
    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))


def send(browser, prompt: str) -> None:
    # set, not typed: Enter in the box sends, and a prompt may hold new lines
    box = browser.find_element(By.ID, "prompt")
    browser.execute_script("arguments[0].value = arguments[1]", box, prompt)
    browser.find_element(By.ID, "send").click()


def reply(browser, kind: str = "main", seconds: float = 120):
    """The assistant message of this kind, once it has finished."""
    selector = f".msg.assistant.{kind}"
    WebDriverWait(browser, seconds).until(
        lambda b: any(
            e.get_attribute("data-state") != "streaming"
            for e in b.find_elements(By.CSS_SELECTOR, selector)
        ),
        f"no finished {kind} reply",
    )
    message = browser.find_element(By.CSS_SELECTOR, selector)
    assert message.get_attribute("data-state") == "done", message.text
    return message


def test_page_streams_tokens_coloured_by_source(browser, tiny_llm):
    prompt = ("one two three four " * 8).strip()  # the page trims what is typed
    messages = [{"role": "user", "content": prompt}]
    ngram = {"method": "ngram"}
    want = tiny_llm.chat(messages, greedy(150), speculative_config=ngram)[0].outputs[0]
    assert "ngram" in want.token_sources  # the prompt is one whose drafts get accepted
    with live_server(tiny_llm) as s:
        open_page(browser, s.url, 150)
        Select(browser.find_element(By.ID, "method")).select_by_value("ngram")
        browser.find_element(By.ID, "prompt").send_keys(prompt)  # typed, as a person would
        browser.find_element(By.ID, "send").click()
        message = reply(browser)
        text = message.find_element(By.CSS_SELECTOR, ".text")
        assert text.get_attribute("textContent") == want.text
        tokens = text.find_elements(By.CSS_SELECTOR, ".tok")
        classes = {c for t in tokens for c in t.get_attribute("class").split()}
        assert classes <= {"tok", "drafted", "src-target", "src-ngram"}
        drafted = text.find_elements(By.CSS_SELECTOR, ".tok.drafted.src-ngram")
        assert drafted and len(drafted) < len(tokens)
        colour = drafted[0].value_of_css_property("background-color")
        assert colour != tokens[0].value_of_css_property("background-color") or tokens[0] in drafted
        stats = message.find_element(By.CSS_SELECTOR, ".stats").text
        assert f"{len(want.token_ids)} tokens" in stats and "mean acceptance length" in stats


@pytest.mark.real_model
def test_page_compares_with_plain_decoding(browser, llm, tmp_path):
    prompt = (
        "Rewrite this Python function so that it uses a list comprehension:\n\n"
        "def squares(xs):\n    out = []\n    for x in xs:\n        if x % 2 == 0:\n"
        "            out.append(x * x)\n    return out"
    )
    with live_server(llm, speculative_config={"method": "auto"}) as s:
        browser.set_window_size(1100, 1250)
        open_page(browser, s.url, 96)
        browser.find_element(By.ID, "compare").click()
        send(browser, prompt)
        fast = reply(browser, "main")
        reply(browser, "compare")
        result = WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.ID, "compare-result"), "no comparison line"
        )[0]
        assert "identical text" in result.text and "tokens/s" in result.text
        assert fast.find_elements(By.CSS_SELECTOR, ".tok.drafted")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1100, height + 20)  # the whole page, no scrolling
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "server.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("ONEPASS_SCREENSHOT"):
            shutil.copy(shot, os.environ["ONEPASS_SCREENSHOT"])
