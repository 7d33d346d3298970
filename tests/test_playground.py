"""The playground page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium, against a live glm-serve on 127.0.0.1 (tests/conftest.py's live_server). A query typed with the
[MASK] button and run greedy is highlighted with the API's own greedy answer; a long stream stopped from the
page frees its row (/health); an out-of-range value shows the server's own message; the page is labelled
and fits a phone. Skipped where chromium, chromedriver or selenium are missing.

GLM_PLAYGROUND_SCREENSHOT=docs/playground.png also writes the screenshot (the README's) there."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from test_serve import MODEL, get, post, wait_for_health

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the dev extra installs it
    webdriver = None

pytestmark = pytest.mark.skipif(
    webdriver is None or not (CHROMIUM and CHROMEDRIVER),
    reason="the browser tests need chromium, chromedriver (apt-get install chromium chromium-driver) "
    "and selenium (pip install -e '.[dev]')",
)
QUERY = "Tsinghua University is located in [MASK]."


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(flag)
    # chromedriver named explicitly: Selenium Manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def until(driver, condition, what: str, timeout: float = 60):
    """Wait for `condition(driver)` to be truthy (a deadline, not a sleep, decides)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, f"never saw {what}")


@pytest.fixture
def page(browser, live_server):
    browser.set_window_size(1100, 1000)
    browser.get(f"{live_server}/")
    until(browser, lambda d: d.find_element(By.ID, "model").text == MODEL, "the model's name")
    return browser


def field(page, name: str, value: str) -> None:
    element = page.find_element(By.ID, name)
    element.clear()
    element.send_keys(value)


def status(page) -> str:
    return page.find_element(By.ID, "status").text


def test_greedy_answer_is_highlighted_in_place_and_is_the_apis(page, live_server, tmp_path):
    query = page.find_element(By.ID, "query")
    query.send_keys("Tsinghua University is located in ")
    page.find_element(By.CSS_SELECTOR, "button[data-insert='[MASK]']").click()
    query.send_keys(".")
    assert query.get_attribute("value") == QUERY
    field(page, "max_tokens", "8")
    query.send_keys(Keys.CONTROL, Keys.ENTER)  # runs from the keyboard; greedy is the default strategy
    until(page, lambda d: status(d) == "Done.", "the answer")

    api = post(f"{live_server}/v1/completions", {"prompt": QUERY, "temperature": 0, "max_tokens": 8})
    expected = api.json()["choices"][0]["text"]
    (mark,) = page.find_elements(By.CSS_SELECTOR, "#answers mark.blank")
    assert mark.get_attribute("textContent") == expected
    filled = page.find_element(By.CSS_SELECTOR, "#answers .filled").get_attribute("textContent")
    assert filled == QUERY.replace("[MASK]", expected)  # in place: the text around the blank as typed
    # each token carries its log-prob (shown on hover), and they add up to the answer
    tokens = mark.find_elements(By.CSS_SELECTOR, ".token")
    assert "".join(t.get_attribute("textContent") for t in tokens) == expected
    assert all(re.match(r"log-prob -?\d+\.\d{3} \(p = ", t.get_attribute("title")) for t in tokens)
    stats = page.find_element(By.ID, "stats").text
    assert re.search(r"tokens/s; first token after \d+ ms", stats), stats
    # "copy as curl" shows the request just sent
    curl = page.find_element(By.ID, "curl").get_attribute("textContent")
    assert curl.startswith(f"curl -sN {live_server}/v1/completions")
    assert f'"prompt":"{QUERY}"' in curl and '"temperature":0' in curl
    screenshot = tmp_path / "playground.png"
    page.set_window_size(1000, 1250)  # the answer in view
    page.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("GLM_PLAYGROUND_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(target))
    # the history re-runs the query: the same greedy answer again
    page.find_element(By.ID, "query").clear()
    (again,) = page.find_elements(By.CSS_SELECTOR, "#history button")
    again.click()
    until(page, lambda d: status(d) == "Done." and d.find_elements(By.CSS_SELECTOR, "mark.blank"), "a re-run")
    assert page.find_element(By.ID, "query").get_attribute("value") == QUERY
    assert page.find_element(By.CSS_SELECTOR, "mark.blank").get_attribute("textContent") == expected


def test_stop_cancels_the_stream_and_frees_the_row(page, live_server):
    field(page, "query", "Once upon a time")
    field(page, "max_tokens", "500")
    page.find_element(By.ID, "ignore_eos").click()

    def streaming(driver) -> bool:  # the answer grows while the request still runs
        # read in one script: each delta re-renders the answer, so a found element may go stale
        text = driver.execute_script("return document.querySelector('mark.blank')?.textContent || ''")
        return bool(text.strip())

    page.find_element(By.ID, "run").click()
    until(page, streaming, "the first tokens")
    wait_for_health(live_server, running=1)
    page.find_element(By.ID, "stop-button").click()
    until(page, lambda d: status(d) == "Stopped.", "the page stop")
    wait_for_health(live_server, running=0, waiting=0)  # the server freed the row
    assert page.find_element(By.ID, "error").get_attribute("hidden") is not None


def test_an_out_of_range_value_shows_the_servers_message(page, live_server):
    field(page, "query", QUERY)
    page.find_element(By.CSS_SELECTOR, "input[name=strategy][value=sampling]").click()
    temperature = page.find_element(By.ID, "temperature")
    assert temperature.get_attribute("max") == "2"  # the server's limit is the input's bound
    field(page, "temperature", "5")
    page.find_element(By.ID, "run").click()
    error = page.find_element(By.ID, "error")
    until(page, lambda d: error.is_displayed(), "the error")
    api = post(f"{live_server}/v1/completions", {"prompt": QUERY, "temperature": 5})
    assert api.status_code == 400 and error.text == api.json()["error"]["message"]
    assert status(page) == "Failed." and get(f"{live_server}/health").json()["running"] == 0


def test_labelled_controls_and_a_phone_sized_window(page, tmp_path):
    unlabelled = page.execute_script(
        "return [...document.querySelectorAll('input, textarea')]"
        ".filter(e => !e.labels.length).map(e => e.outerHTML)"
    )
    assert unlabelled == []
    page.set_window_size(390, 844)
    until(page, lambda d: d.execute_script("return innerWidth") <= 390, "the narrow window")
    overflow = page.execute_script("return document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0
    page.save_screenshot(str(tmp_path / "phone.png"))


def test_beams_side_by_side_each_blank_filled_in_turn(page, live_server):
    query = "The [MASK] is in [MASK]."
    field(page, "query", query)
    page.find_element(By.CSS_SELECTOR, "input[name=strategy][value=beam]").click()
    field(page, "num_beams", "2")
    field(page, "n", "2")
    field(page, "max_tokens", "6")
    page.find_element(By.ID, "run").click()
    until(page, lambda d: status(d) == "Done.", "the answers")
    answers = page.find_elements(By.CSS_SELECTOR, "#answers .answer")
    assert [a.find_element(By.TAG_NAME, "h3").text for a in answers] == ["Beam 1", "Beam 2"]
    # the documented rule: blank 1 with the n best beams, then each beam's blank 2 after its blank 1
    beams = {"temperature": 0, "num_beams": 2, "max_tokens": 6}
    first = post(f"{live_server}/v1/completions", {"prompt": query, "n": 2, **beams}).json()["choices"]
    for answer, choice in zip(answers, first, strict=True):
        marks = [m.get_attribute("textContent") for m in answer.find_elements(By.CSS_SELECTOR, "mark")]
        prompt = query.replace("[MASK]", choice["text"], 1)
        second = post(f"{live_server}/v1/completions", {"prompt": prompt, **beams}).json()["choices"][0]
        assert marks == [choice["text"], second["text"]]


def test_seeded_samples_side_by_side_are_the_apis(page, live_server):
    field(page, "query", "The river")  # no mask: [gMASK] appended, the answer highlighted at the end
    page.find_element(By.CSS_SELECTOR, "input[name=strategy][value=sampling]").click()
    for name, value in (("temperature", "0.9"), ("top_p", "0.8"), ("top_k", "40"), ("seed", "5"), ("n", "2")):
        field(page, name, value)
    field(page, "max_tokens", "6")
    page.find_element(By.ID, "run").click()
    until(page, lambda d: status(d) == "Done.", "the samples")
    body = {"prompt": "The river", "temperature": 0.9, "top_p": 0.8, "top_k": 40, "seed": 5, "n": 2}
    api = post(f"{live_server}/v1/completions", {**body, "max_tokens": 6, "logprobs": 3}).json()
    answers = page.find_elements(By.CSS_SELECTOR, "#answers .answer")
    assert [a.find_element(By.TAG_NAME, "h3").text for a in answers] == ["Sample 1", "Sample 2"]
    for answer, choice in zip(answers, api["choices"], strict=True):
        filled = answer.find_element(By.CSS_SELECTOR, ".filled").get_attribute("textContent")
        assert filled == "The river" + choice["text"]
        assert answer.find_element(By.CSS_SELECTOR, "mark").get_attribute("textContent") == choice["text"]
