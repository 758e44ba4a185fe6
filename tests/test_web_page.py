"""The page at `GET /`, driven in a real headless Chromium: it loads with no outside resources and nothing its
Content-Security-Policy blocks, lists the model's samplers, and a generation started from it shows the image the
API gives for the same request. Pages of other web sites cannot make the server work; a listed one can."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.test_server import Server, free_port

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see Content-Security-Policy reports
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
        results = d.find_elements(By.ID, "result")  # the first result's image, there once a result is shown
        return bool(results and results[0].is_displayed()) or bool(d.find_element(By.ID, "error").text)

    WebDriverWait(driver, 60).until(finished)
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "generate").is_enabled())


def test_page_is_self_contained_and_public(keyed_server: Server) -> None:
    response = httpx.get(keyed_server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text), "page must not load outside resources"
    assert "{{" not in response.text
    assert httpx.get(keyed_server.url + "/sdapi/v1/samplers").status_code == 401  # the API itself stays closed


def test_page_has_security_headers_and_its_policy_blocks_nothing_of_its_own(
    keyed_server: Server, browser: webdriver.Chrome
) -> None:
    response = httpx.get(keyed_server.url + "/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe" not in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    browser.get_log("browser")  # drop earlier messages
    browser.get(keyed_server.url + "/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error").text)  # samplers: 401, shown by JS
    assert browser.execute_script("return getComputedStyle(document.body).maxWidth") == "960px"  # the inline style
    blocked = [
        entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]
    ]
    assert not blocked, blocked


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
    assert not browser.find_elements(By.ID, "result")


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
    step = r"step \d+/40\d, \d+ s(, about \d+ s left)?"  # the step, time elapsed and time left
    assert previews and all(re.fullmatch(step, text) for text in previews), previews
    assert not browser.find_element(By.ID, "preview").is_displayed()  # gone once the result is there


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A plain web server on another port: its pages are another origin, as http://127.0.0.1:PORT (listed with
    --allow-origin below) and as http://localhost:PORT (not listed: the hostile site)."""
    root = tmp_path_factory.mktemp("other-site")
    (root / "index.html").write_text("<!doctype html><title>another site</title><p>another site</p>")
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def open_server(tiny_export: Path, other_site: int) -> Iterator[Server]:
    """No API key, as most local installs run: only the browser rules stand between a web page and the API."""
    srv = Server(tiny_export, "--allow-origin", f"http://127.0.0.1:{other_site}", "--max-pixels", str(64 * 64))
    yield srv
    srv.stop()


ATTACK = """
const [server, png, done] = arguments;
const form = new FormData();
form.append("prompt", "from another site");
form.append("steps", "2");
form.append("image", new Blob([Uint8Array.from(atob(png), (c) => c.charCodeAt(0))], {type: "image/png"}), "i.png");
const tries = [
  ["/v1/images/edits", {method: "POST", body: form}],  // multipart: a "simple" request, no preflight
  ["/sdapi/v1/interrupt", {method: "POST", headers: {"Content-Type": "text/plain"}, body: "{}"}],
];
const outcomes = [];
for (const [path, init] of tries) {
  for (const mode of ["cors", "no-cors"]) {
    try {
      const r = await fetch(server + path, {...init, mode});
      outcomes.push(`${path} ${mode}: ${r.type} ${r.status}`);
    } catch (e) {
      outcomes.push(`${path} ${mode}: failed`);
    }
  }
}
done(outcomes);
"""


def transparent_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def refusals(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/v1/images/edits"' not in metrics and 'endpoint="/sdapi/v1/interrupt"' not in metrics
    found = re.search(r'sd_requests_total\{endpoint="unmatched",status="403"\} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("sandboxed", [False, True], ids=["other-origin", "null-origin"])
def test_pages_of_other_sites_cannot_make_the_server_work(
    open_server: Server, browser: webdriver.Chrome, other_site: int, sandboxed: bool
) -> None:
    """A multipart POST to /v1/images/edits and a text/plain POST to /sdapi/v1/interrupt need no preflight, so
    the browser sends them, from another site's page or from a sandboxed frame in one (Origin: null, as a data:
    page has; Chromium itself blocks a data: page's requests to local addresses); the server refuses them (403)
    before any route runs."""
    before = refusals(open_server)
    browser.switch_to.default_content()
    browser.get(f"http://localhost:{other_site}/")
    if sandboxed:
        browser.execute_script(
            "const f = document.createElement('iframe'); f.sandbox = 'allow-scripts'; f.srcdoc = '<p>sandboxed</p>';"
            "document.body.append(f);"
        )
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))
        browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    browser.set_script_timeout(60)
    outcomes = browser.execute_async_script(ATTACK, open_server.url, transparent_png())
    browser.switch_to.default_content()
    assert all(not outcome.endswith(" 200") for outcome in outcomes), outcomes
    assert refusals(open_server) == before + 4, outcomes  # each try reached the server and was refused there
    progress = httpx.get(open_server.url + "/sdapi/v1/progress").json()
    assert progress["state"]["job_count"] == 0


def test_a_listed_origin_reads_the_api(open_server: Server, browser: webdriver.Chrome, other_site: int) -> None:
    browser.get(f"http://127.0.0.1:{other_site}/")
    browser.set_script_timeout(60)
    script = """
    const [server, done] = arguments;
    const samplers = await (await fetch(server + "/sdapi/v1/samplers")).json();
    const r = await fetch(server + "/sdapi/v1/txt2img", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({prompt: "from a listed app", steps: 2})});  // JSON: preflighted
    done([samplers.length, r.status, (await r.json()).images.length]);
    """
    count, status, images = browser.execute_async_script(script, open_server.url)
    assert count > 0 and status == 200 and images == 1


def test_results_are_large_kept_in_history_downloadable_and_reusable(
    keyed_server: Server, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """Ctrl+Enter generates; a batch shows side by side, each image the API's (small ones scaled up with crisp
    pixels), with a download of the server's PNG (parameters included) and "use these settings"; results stay
    in this browser's history across reloads, and an earlier one can be shown again."""
    from selenium.webdriver.common.keys import Keys

    browser.get(keyed_server.url + "/")
    browser.execute_script("localStorage.clear()")
    fill(browser, api_key=KEY, prompt="a blue square", steps="2", seed="11", batch_size="2")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    images = browser.find_elements(By.CSS_SELECTOR, "#results img")
    body = {"prompt": "a blue square", "steps": 2, "seed": 11, "batch_size": 2}
    api = httpx.post(keyed_server.url + "/sdapi/v1/txt2img", json=body, headers={"X-API-Key": KEY}, timeout=60).json()
    assert [base64.b64decode(i.get_attribute("src").split(",", 1)[1]) for i in images] == [
        base64.b64decode(png) for png in api["images"]
    ]
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.getElementById('result').width") > 32)
    assert "small" in images[0].get_attribute("class")  # 32 pixels shown at 384, pixelated
    links = browser.find_elements(By.CSS_SELECTOR, "#results a[download]")
    assert [a.get_attribute("download") for a in links] == ["sd-onnx-11.png", "sd-onnx-12.png"]  # A1111: seed + i
    downloaded = Image.open(io.BytesIO(base64.b64decode(links[1].get_attribute("href").split(",", 1)[1])))
    assert downloaded.text["parameters"] == json.loads(api["info"])["infotexts"][1]
    browser.get(keyed_server.url + "/")  # a reload keeps the history
    earlier = browser.find_elements(By.CSS_SELECTOR, "#history button.earlier")
    assert len(earlier) == 2
    earlier[1].click()
    browser.find_element(By.CSS_SELECTOR, "#results figcaption button").click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "12"
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a blue square"
    assert browser.find_element(By.ID, "batch_size").get_attribute("value") == "1"
    (tmp_path / "page-history.png").write_bytes(browser.get_screenshot_as_png())  # the test's artifact


def test_a_mask_painted_in_the_page_is_the_servers_mask(
    keyed_server: Server, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """img2img from an uploaded picture with a mask painted by dragging the brush: the request goes to
    /sdapi/v1/img2img with the picture and the painted mask (white under the stroke, black elsewhere), and the
    image shown is the API's for that picture and mask."""
    from selenium.webdriver.common.action_chains import ActionChains

    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    picture.save(tmp_path / "picture.png")
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a green triangle", steps="2", seed="4")
    browser.find_element(By.CSS_SELECTOR, "#img2img summary").click()
    browser.find_element(By.ID, "init_file").send_keys(str(tmp_path / "picture.png"))
    canvas = browser.find_element(By.ID, "mask_canvas")
    WebDriverWait(browser, 10).until(lambda d: canvas.is_displayed() and canvas.size["width"] > 0)
    fill(browser, brush="4")
    width = canvas.size["width"]
    ActionChains(browser).move_to_element_with_offset(canvas, -width // 4, 0).click_and_hold().move_by_offset(
        width // 2, 0
    ).release().perform()  # a horizontal stroke across the middle
    mask_url = browser.execute_script("return maskDataURL()")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1]))).convert("L"))
    assert mask.shape == (32, 32) and mask[16, 16] == 255 and mask[0, 0] == 0 and mask[31, 31] == 0
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    shown = browser.find_element(By.ID, "result").get_attribute("src")
    with open(tmp_path / "picture.png", "rb") as f:
        init = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {"prompt": "a green triangle", "steps": 2, "seed": 4, "batch_size": 1, "negative_prompt": "",
            "init_images": [init], "denoising_strength": 0.75, "mask": mask_url}  # fmt: skip
    api = httpx.post(keyed_server.url + "/sdapi/v1/img2img", json=body, headers={"X-API-Key": KEY}, timeout=60)
    assert api.status_code == 200, api.text
    assert base64.b64decode(shown.split(",", 1)[1]) == base64.b64decode(api.json()["images"][0])
    assert "Inpaint" in json.loads(api.json()["info"])["infotexts"][0]
    (tmp_path / "page-inpaint.png").write_bytes(browser.get_screenshot_as_png())


def test_the_page_reads_defaults_and_limits_from_the_server_and_names_every_control(
    keyed_server: Server, browser: webdriver.Chrome
) -> None:
    """No numbers in the page: its hints and bounds are /sd-onnx/limits' (the model's defaults, the server's
    limits); and every control has an accessible name in Chromium's own accessibility tree."""
    limits = httpx.get(keyed_server.url + "/sd-onnx/limits", headers={"X-API-Key": KEY}).json()
    assert limits["max_steps"] == 1000 and limits["max_pixels"] == 64 * 64 and limits["size_multiple"] > 0
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY)
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    steps = browser.find_element(By.ID, "steps")
    WebDriverWait(browser, 10).until(lambda d: steps.get_attribute("max") == "1000")
    assert steps.get_attribute("placeholder") == f"{limits['steps']} (model default)"
    width = browser.find_element(By.ID, "width")
    assert width.get_attribute("step") == str(limits["size_multiple"])
    assert width.get_attribute("placeholder") == f"{limits['width']} (model default)"
    assert browser.find_element(By.ID, "batch_size").get_attribute("max") == str(limits["max_batch"])
    tree = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    roles = {"textbox", "spinbutton", "combobox", "button", "checkbox"}
    unnamed = [n for n in tree if n.get("role", {}).get("value") in roles and not n.get("ignored")
               and not n.get("name", {}).get("value")]  # fmt: skip
    assert unnamed == [], unnamed


def test_accelerators_and_prompt_features_reach_the_server(keyed_server: Server, browser: webdriver.Chrome) -> None:
    """The advanced fields go into the request as the API names them: a guidance interval shows in the result's
    parameters, a DeepCache interval on a model without its graphs is the server's 422, shown; the LoRA and
    embedding lists are the server's (none here)."""
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a red circle", steps="3", seed="2")
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    lora = Select(browser.find_element(By.ID, "lora"))
    WebDriverWait(browser, 10).until(lambda d: len(lora.options) == 1)
    assert [o.text for o in lora.options] == ["none"]  # the server has no --lora-dir
    fill(browser, guidance_interval="0.5,5")
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    assert "Guidance interval: 0.5-5" in browser.find_element(By.ID, "parameters").text
    fill(browser, guidance_interval="", deepcache_interval="3")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("422: deepcache_interval: this model has no DeepCache")


CONTRAST = """
const luminance = (rgb) => {
  const [r, g, b] = rgb.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number).map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const background = (el) => {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (c && !c.startsWith("rgba(0, 0, 0, 0)") && c !== "transparent") return c;
  }
  return "rgb(255, 255, 255)";
};
const low = [];
for (const el of document.querySelectorAll("body *")) {
  const text = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!text || !el.offsetParent) continue;
  const a = luminance(getComputedStyle(el).color), b = luminance(background(el));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) low.push(`${el.tagName}#${el.id}: ${ratio.toFixed(2)}`);
}
return low;
"""


def test_the_page_fits_a_phone_and_its_text_has_contrast(
    keyed_server: Server, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """At a phone's width (375 CSS pixels) nothing scrolls sideways; every visible text has a WCAG AA contrast
    (4.5:1) against its background."""
    browser.set_window_size(375, 800)
    try:
        browser.get(keyed_server.url + "/")
        for summary in browser.find_elements(By.TAG_NAME, "summary"):
            if summary.is_displayed():  # the folded groups too (ControlNet's shows only with ControlNets)
                summary.click()
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        assert browser.execute_script(CONTRAST) == []
        (tmp_path / "page-phone.png").write_bytes(browser.get_screenshot_as_png())
        browser.execute_script("document.body.style.color = '#bbb'")  # the check finds pale text
        assert "H1#: 1.92" in browser.execute_script(CONTRAST)
    finally:
        browser.set_window_size(1280, 1024)


def test_the_hires_fix_from_the_page(keyed_server: Server, browser: webdriver.Chrome) -> None:
    """The hires fields as A1111 names them: the upscaler list is the server's, the result twice the size with
    the API's pixels for the same body."""
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a red circle", steps="2", seed="6")
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    upscaler = Select(browser.find_element(By.ID, "hr_upscaler"))
    WebDriverWait(browser, 10).until(lambda d: len(upscaler.options) > 1)
    modes = httpx.get(keyed_server.url + "/sdapi/v1/latent-upscale-modes", headers={"X-API-Key": KEY}).json()
    assert upscaler.options[0].get_attribute("value") == modes[0]["name"]
    upscaler.select_by_value("Lanczos")
    browser.find_element(By.ID, "enable_hr").click()
    fill(browser, hr_second_pass_steps="2")
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    shown = base64.b64decode(browser.find_element(By.ID, "result").get_attribute("src").split(",", 1)[1])
    body = {"prompt": "a red circle", "negative_prompt": "", "steps": 2, "seed": 6, "batch_size": 1, "enable_hr": True,
            "hr_scale": 2, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2, "denoising_strength": 0.7}  # fmt: skip
    api = httpx.post(keyed_server.url + "/sdapi/v1/txt2img", json=body, headers={"X-API-Key": KEY}, timeout=60).json()
    assert shown == base64.b64decode(api["images"][0])
    assert Image.open(io.BytesIO(shown)).size == (64, 64)


def test_interrupt_stops_a_generation_from_the_page(keyed_server: Server, browser: webdriver.Chrome) -> None:
    """Interrupt, once the first steps are shown, stops the generation: the page says so and is ready again."""
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a slow one", steps="900", seed="1")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith("step "))
    browser.find_element(By.ID, "interrupt").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "409: generation was interrupted"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    assert not browser.find_elements(By.ID, "result")


def test_sampling_fields_from_the_page_are_the_apis(keyed_server: Server, browser: webdriver.Chrome) -> None:
    """Schedule type, eta, clip skip and tiled VAE from the folded group: the same image as the API's for the same
    body, and the result's parameters name them; a model without ControlNets shows no ControlNet group."""
    browser.get(keyed_server.url + "/")
    fill(browser, api_key=KEY, prompt="a blue square", steps="3", seed="3")
    browser.execute_script("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    schedule = Select(browser.find_element(By.ID, "scheduler"))
    WebDriverWait(browser, 10).until(lambda d: len(schedule.options) > 1)
    headers = {"X-API-Key": KEY}
    labels = [s["label"] for s in httpx.get(keyed_server.url + "/sdapi/v1/schedulers", headers=headers).json()]
    assert [o.get_attribute("value") for o in schedule.options][1:] == labels
    schedule.select_by_value(labels[-1])
    sampler = Select(browser.find_element(By.ID, "sampler_name"))
    ddim = next(o.get_attribute("value") for o in sampler.options if o.get_attribute("value").lower() == "ddim")
    sampler.select_by_value(ddim)
    fill(browser, eta="0.5", clip_skip="2")
    browser.find_element(By.ID, "vae_tiling").click()
    assert not browser.find_element(By.ID, "controlnet").is_displayed()
    browser.find_element(By.ID, "generate").click()
    wait_for_result_or_error(browser)
    assert browser.find_element(By.ID, "error").text == ""
    parameters = browser.find_element(By.ID, "parameters").text
    assert "Eta: 0.5" in parameters and "Clip skip: 2" in parameters and "Tiled VAE: True" in parameters
    body = {"prompt": "a blue square", "steps": 3, "seed": 3, "sampler_name": ddim, "scheduler": labels[-1],
            "eta": 0.5, "clip_skip": 2, "vae_tiling": True}  # fmt: skip
    api = httpx.post(keyed_server.url + "/sdapi/v1/txt2img", json=body, headers=headers, timeout=60).json()
    src = browser.find_element(By.ID, "result").get_attribute("src")
    assert base64.b64decode(src.split(",", 1)[1]) == base64.b64decode(api["images"][0])


def test_a_controlnet_and_a_model_from_the_page_are_the_apis(browser: webdriver.Chrome, tmp_path: Path) -> None:
    """A server with two models (the shipped one, which has the `outline` ControlNet, in fp32 and int8): a control
    picture chosen in the page, the model and preprocessor from the extension's lists, reach the server as one
    unit; the other model chosen in the page draws the next image; each is the API's image for the same body."""
    from sd_onnx.models.shapes import shipped_model

    outline = Path(__file__).parents[1] / "docs" / "controlnet-outline.png"
    for name, precision in (("shapes", "fp32"), ("shapes-int8", "int8")):
        shutil.copytree(shipped_model(precision), tmp_path / "models" / name)
    server = Server(None, "--models-dir", str(tmp_path / "models"), "--max-steps", "1000")
    try:
        browser.get(server.url + "/")
        control = browser.find_element(By.ID, "controlnet")
        WebDriverWait(browser, 10).until(lambda d: control.is_displayed())
        control.find_element(By.TAG_NAME, "summary").click()
        assert [o.text for o in Select(browser.find_element(By.ID, "control_model")).options] == ["outline"]
        modules = [o.text for o in Select(browser.find_element(By.ID, "control_module")).options]
        assert modules[:2] == ["none", "canny"]
        browser.find_element(By.ID, "control_file").send_keys(str(outline))
        fill(browser, prompt="a red triangle on a blue background", steps="4", seed="5", control_weight="0.9")
        browser.find_element(By.ID, "generate").click()
        wait_for_result_or_error(browser)
        assert browser.find_element(By.ID, "error").text == ""
        assert (
            'ControlNet 0: "Module: none, Model: outline, Weight: 0.9' in browser.find_element(By.ID, "parameters").text
        )
        unit = {"image": base64.b64encode(outline.read_bytes()).decode(), "module": "none", "model": "outline",
                "weight": 0.9, "guidance_start": 0, "guidance_end": 1}  # fmt: skip
        body = {"prompt": "a red triangle on a blue background", "steps": 4, "seed": 5,
                "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
        api = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60).json()
        src = browser.find_element(By.ID, "result").get_attribute("src")
        assert base64.b64decode(src.split(",", 1)[1]) == base64.b64decode(api["images"][0])
        plain = httpx.post(server.url + "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {}}, timeout=60)
        assert plain.json()["images"][0] != api["images"][0]  # the unit was applied, not dropped
        models = Select(browser.find_element(By.ID, "model"))
        titles = {o.text: o.get_attribute("value") for o in models.options}
        assert set(titles) == {"current model", "shapes", "shapes-int8"}
        models.select_by_visible_text("shapes-int8")
        browser.execute_script("document.getElementById('control_model').replaceChildren()")  # no unit this time
        browser.find_element(By.ID, "generate").click()
        wait_for_result_or_error(browser)
        assert browser.find_element(By.ID, "error").text == ""
        assert "Model: shapes-int8" in browser.find_element(By.ID, "parameters").text
        body = {**body, "alwayson_scripts": {}, "override_settings": {"sd_model_checkpoint": titles["shapes-int8"]}}
        api = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60).json()
        src = browser.find_element(By.ID, "result").get_attribute("src")
        assert base64.b64decode(src.split(",", 1)[1]) == base64.b64decode(api["images"][0])
    finally:
        server.stop()
