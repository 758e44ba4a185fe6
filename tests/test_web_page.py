"""The page at `GET /`, driven in a real headless Chromium: it loads with no outside resources, lists the
model's samplers, and a generation started from it shows the image the API gives for the same request."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_server import Server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)
KEY = "page-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--disable-background-networking")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def keyed_server(tiny_export: Path) -> Iterator[Server]:
    srv = Server(tiny_export, "--api-key", KEY, "--max-pixels", str(64 * 64), "--max-steps", "1000")
    yield srv
    srv.stop()


def fill(driver: webdriver.Chrome, **fields: str) -> None:
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)


def wait_for_result_or_error(driver: webdriver.Chrome) -> None:
    def finished(d: webdriver.Chrome) -> bool:
        return d.find_element(By.ID, "result").is_displayed() or bool(d.find_element(By.ID, "error").text)

    WebDriverWait(driver, 60).until(finished)
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "generate").is_enabled())


def test_page_is_self_contained_and_public(keyed_server: Server) -> None:
    response = httpx.get(keyed_server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text), "page must not load outside resources"
    assert "{{" not in response.text
    assert httpx.get(keyed_server.url + "/sdapi/v1/samplers").status_code == 401  # the API itself stays closed


def test_generation_from_the_page_shows_the_apis_image(keyed_server: Server, browser: webdriver.Chrome) -> None:
    browser.get(keyed_server.url + "/")
    key_field = browser.find_element(By.ID, "api_key")
    assert key_field.is_displayed()

    fill(browser, prompt="a red circle", steps="3", seed="7")
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert "401" in browser.find_element(By.ID, "error").text  # no key yet: the server's refusal, shown

    fill(browser, api_key=KEY)
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    select = Select(browser.find_element(By.ID, "sampler_name"))
    WebDriverWait(browser, 10).until(lambda d: len(select.options) > 1)
    names = [o.get_attribute("value") for o in select.options][1:]
    headers = {"X-API-Key": KEY}
    assert names == [s["name"] for s in httpx.get(keyed_server.url + "/sdapi/v1/samplers", headers=headers).json()]
    select.select_by_value(names[-1])

    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    src = browser.find_element(By.ID, "result").get_attribute("src")
    assert browser.execute_script("return document.getElementById('result').naturalWidth") > 0
    parameters = browser.find_element(By.ID, "parameters").text
    assert "Seed: 7" in parameters and "Steps: 3" in parameters and names[-1] in parameters

    body = {"prompt": "a red circle", "steps": 3, "seed": 7, "sampler_name": names[-1]}
    api = httpx.post(keyed_server.url + "/sdapi/v1/txt2img", json=body, headers=headers, timeout=60).json()
    assert base64.b64decode(src.split(",", 1)[1]) == base64.b64decode(api["images"][0])


def test_bad_field_shows_the_servers_message(keyed_server: Server, browser: webdriver.Chrome) -> None:
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="x", steps="2", width="4096", height="4096")
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("422") and "pixels" in error
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_a_long_generation_shows_live_previews(keyed_server: Server, browser: webdriver.Chrome) -> None:
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a slow one", steps="400", seed="3")
    browser.execute_script(
        """window.previews = [];
        new MutationObserver(() => window.previews.push(document.getElementById('status').textContent))
          .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});"""
    )
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    previews = browser.execute_script("return window.previews")
    assert previews and all(re.fullmatch(r"step \d+/40\d", text) for text in previews), previews
    assert not browser.find_element(By.ID, "preview").is_displayed()  # gone once the result is there
