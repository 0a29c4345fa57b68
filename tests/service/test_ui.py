"""The playground (/ui) end to end in a real headless Chromium driven by Selenium, against the session's
Serve test server: each page loads, a generation streams tokens in, images are sampled and drawn, a
CSV upload gives a histogram and flags, API errors are shown as readable text, and model or user text is
inserted as text, never as HTML. Screenshots of every page go to build/ui-screenshots/.

The browser is Debian's `chromium` with `chromium-driver` (`make install` installs them as root); Selenium
is given the driver's path, so Selenium Manager downloads nothing. Without them these tests skip.

`python -m tests.service.test_ui [URL] [OUT]` takes the README's screenshots (docs/images/ui-*.png) of a
running server with the five default models (`make serve`)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import GAN, IMAGE_COND, SINGLE, TEXT, VAE

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "ui" / "static"
SHOTS = ROOT / "build" / "ui-screenshots"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).exists()),
                    None)
NO_BROWSER = ("no headless browser: install Debian's chromium and chromium-driver (`make install` does, as root: "
              "apt-get install --no-install-recommends chromium chromium-driver) and the dev extra (selenium)")

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

needs_browser = pytest.mark.skipif(webdriver is None or CHROMIUM is None or CHROMEDRIVER is None, reason=NO_BROWSER)
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # the first test may wait for the server


# ---- no HTML from data, anywhere -----------------------------------------------------------------------------


def test_scripts_never_parse_html():
    """Model and user text reach the page through textContent/createElement only: no script uses an HTML sink."""
    sinks = re.compile(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|createContextualFragment|"
                       r"DOMParser|\beval\(|new Function\(")
    scripts = sorted((STATIC / "js").glob("*.js"))
    assert scripts
    for path in scripts:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not sinks.search(line), f"{path.name}:{number} uses an HTML sink: {line.strip()}"
    page = (STATIC / "index.html").read_text()
    assert "Content-Security-Policy" in page and "script-src 'self'" in page
    assert not re.search(r"https?://", page.replace("http-equiv", "")), "the page must fetch nothing from outside"


# ---- the routes the playground adds ----------------------------------------------------------------------------


def test_ui_is_served_and_root_redirects(server):
    root = httpx.get(f"{server.url}/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
    page = httpx.get(f"{server.url}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "genserve playground" in page.text
    script = httpx.get(f"{server.url}/ui/js/main.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    missing = httpx.get(f"{server.url}/ui/js/nothing.js")
    assert missing.status_code == 404
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
    files = paths["/v1/models/{name}/files/{filename}"]["get"]["responses"]
    assert "image/png" in files["200"]["content"] and "404" in files


def test_pictures_route_serves_only_the_manifests_pngs(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    with_pictures = [name for name, m in models.items() if m["pictures"]]
    assert VAE in with_pictures, {n: m["pictures"] for n, m in models.items()}
    for name in with_pictures:
        manifest = json.loads(next((server.store / name).glob("*/manifest.json")).read_text())
        for filename in models[name]["pictures"]:
            r = httpx.get(f"{server.url}/v1/models/{name}/files/{filename}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
            assert hashlib.sha256(r.content).hexdigest() == manifest["files"][filename]["sha256"]
    for filename in ("weights.safetensors", "manifest.json", "calibration.json", "..%2Fmanifest.json", "nope.png"):
        r = httpx.get(f"{server.url}/v1/models/{VAE}/files/{filename}")
        assert r.status_code == 404, filename
        assert r.json()["error"]["type"] in ("file_not_found", "not_found")
    r = httpx.get(f"{server.url}/v1/models/no-such-model/files/loss_curve.png")
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"


def test_calibration_quantiles_describe_the_heldout_scores(server):
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    calibrated = [m for m in models if m["calibration"]]
    assert calibrated
    for m in calibrated:
        cal = m["calibration"]
        assert set(cal["quantiles"]) == set(cal["thresholds"])
        for score, q in cal["quantiles"].items():
            assert len(q) == 101 and all(np.diff(q) >= 0), (m["name"], score)
            # the threshold at 1% lies between the 99th quantile and the largest held-out score
            if cal["false_positive_rate"] == 0.01:
                assert q[99] - 1e-3 * abs(q[99]) <= cal["thresholds"][score] <= q[100] + 1e-3 * abs(q[100]) + 1e-9


# ---- the browser -----------------------------------------------------------------------------------------------


def make_driver(width: int = 1280, height: int = 1000):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}", "--hide-scrollbars",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    if width < 500:  # a phone: headless windows are at least 500 pixels wide, so emulate its screen instead
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser():
    if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(NO_BROWSER)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = make_driver()
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 90, what: str = "the page"):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.is_displayed()]
        pytest.fail(f"timed out waiting for {what}; errors shown: {errors}; console: {console(driver)}")


def console(driver) -> list[str]:
    try:
        return [e["message"] for e in driver.get_log("browser")]
    except Exception:
        return []


def script_errors(driver) -> list[str]:
    """Uncaught exceptions in the page's scripts (not the failed requests a test provokes on purpose)."""
    kinds = ("Uncaught", "TypeError", "ReferenceError", "SyntaxError", "RangeError")
    return [m for m in console(driver) if any(k in m for k in kinds)]


def open_page(driver, url: str, page: str, model: str | None = None):
    driver.get(f"{url}/ui/#{page}" + (f"/{model}" if model else ""))
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#page-{page}"), 60, f"the {page} page")
    return driver.find_element(By.CSS_SELECTOR, f"#page-{page}")


def set_value(element, value) -> None:
    element.clear()
    element.send_keys(str(value))


def canvas_ink(driver, element) -> float:
    """Sum of a canvas's RGB over all its pixels (0: nothing drawn)."""
    return driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s;", element)


def white_pixels(driver, element) -> int:
    """Pixels of a canvas that are (nearly) white: drawn strokes, not the pad's tinted rows."""
    return driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 200 && d[i + 1] > 200 ? 1 : 0; return n;",
        element)


def shot(driver, name: str, folder: Path = SHOTS) -> Path:
    """A screenshot of the whole page, beyond the window, at the page's width."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")  # the sticky header at the top, where it belongs
    width, height = driver.execute_script(
        "return [window.innerWidth, Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)]")
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 8000), "scale": 1}})["data"]
    path = folder / f"{name}.png"
    path.write_bytes(base64.b64decode(data))
    return path


@needs_browser
def test_models_page_lists_every_model(server, browser):
    names = [m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]]
    page = open_page(browser, server.url, "models")
    wait(browser, lambda d: len(page.find_elements(By.CSS_SELECTOR, "article.model")) == len(names), 30, "model cards")
    for name in names:
        card = page.find_element(By.ID, f"model-{name}")
        assert name in card.find_element(By.TAG_NAME, "h2").text
        assert "density:" in card.text
    vae = page.find_element(By.ID, f"model-{VAE}")
    wait(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                                for img in vae.find_elements(By.CSS_SELECTOR, "img.picture")), 30, "pictures")
    assert vae.find_elements(By.CSS_SELECTOR, "img.picture")
    wine = page.find_element(By.ID, f"model-{SINGLE}")
    assert "Default score ensemble" in wine.text and "threshold" in wine.text
    assert canvas_ink(browser, wine.find_element(By.CSS_SELECTOR, "canvas.chart")) > 0
    shot(browser, "models")
    assert not script_errors(browser)


@needs_browser
def test_text_streams_tokens_shaded_by_probability(server, browser):
    page = open_page(browser, server.url, "text", TEXT)
    assert Select(page.find_element(By.ID, "text-model")).first_selected_option.get_attribute("value") == TEXT
    prompt = page.find_element(By.CSS_SELECTOR, "textarea.prompt")
    set_value(prompt, "to be or not to be, ")
    set_value(page.find_element(By.NAME, "max_new_tokens"), 30)
    set_value(page.find_element(By.NAME, "seed"), 1)
    # Watch the stream: what the page asked for, what came back, and the output each time it grew (events that
    # arrive in one network read land together, so a fast stream may show few steps).
    browser.execute_script("""
        window.__counts = [];
        window.__calls = [];
        const original = window.fetch;
        window.fetch = async (url, init) => {
          const response = await original(url, init);
          window.__calls.push([String(url), JSON.parse(init.body), response.headers.get('content-type')]);
          return response;
        };
        new MutationObserver(() => window.__counts.push(document.querySelectorAll('#text-output .tok').length))
          .observe(document.getElementById('text-output'), {childList: true, subtree: true});""")
    page.find_element(By.NAME, "generate").click()
    wait(browser, lambda d: "finished" in d.find_element(By.ID, "text-stats").text, 120, "the end of the stream")
    tokens = page.find_elements(By.CSS_SELECTOR, "#text-output .tok")
    assert len(tokens) >= 5
    assert page.find_element(By.CSS_SELECTOR, "#text-output .prompt-echo").text.strip() == "to be or not to be,"
    [(called, body, content_type)] = browser.execute_script("return window.__calls")
    assert called.endswith(f"/v1/models/{TEXT}/generate") and content_type.startswith("text/event-stream")
    assert body["stream"] is True and body["logprobs"] is True and body["top_logprobs"] == 5 and body["seed"] == 1
    counts = browser.execute_script("return window.__counts")
    assert counts and max(counts) == len(tokens), counts
    assert tokens[0].value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    tokens[0].click()
    details = page.find_element(By.CSS_SELECTOR, ".token-details")
    wait(browser, lambda d: "Most likely here" in details.text, 10, "the token's alternatives")
    assert "p = " in details.text
    shot(browser, "text-stream")

    Select(page.find_element(By.NAME, "mode")).select_by_value("beam")
    set_value(page.find_element(By.NAME, "num_beams"), 3)
    set_value(page.find_element(By.NAME, "num_return_sequences"), 2)
    page.find_element(By.NAME, "generate").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#text-output .completion.beam")) == 2, 120,
         "two beams")
    assert "score" in page.find_element(By.CSS_SELECTOR, ".completion.beam h4").text
    shot(browser, "text-beams")

    set_value(page.find_element(By.NAME, "score-text"), "to be or not to be, that is the question.\nqqq")
    page.find_element(By.NAME, "score").click()
    out = page.find_element(By.ID, "score-output")
    wait(browser, lambda d: "bits per character" in out.text, 60, "the scores")
    assert len(out.find_elements(By.CSS_SELECTOR, ".tok")) == len("to be or not to be, that is the question.\nqqq")
    assert "q" in out.find_element(By.CSS_SELECTOR, ".surprises li code.surprise").text
    shot(browser, "text-score")
    assert not script_errors(browser)


@needs_browser
def test_api_errors_are_shown_and_markup_stays_text(server, browser):
    page = open_page(browser, server.url, "text", TEXT)
    Select(page.find_element(By.NAME, "mode")).select_by_value("sample")
    set_value(page.find_element(By.CSS_SELECTOR, "textarea.prompt"), "to be")
    set_value(page.find_element(By.NAME, "max_new_tokens"), 1000)  # the test server's limit is 40
    page.find_element(By.NAME, "generate").click()
    error = wait(browser, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "#page-text .error")
                                         if e.is_displayed()), None), 30, "the error")
    assert "HTTP 400" in error.text and "max_new_tokens" in error.text and "40" in error.text

    markup = '<img src=x onerror="window.__xss=1"><b>bold</b>'
    set_value(page.find_element(By.NAME, "max_new_tokens"), 5)
    set_value(page.find_element(By.CSS_SELECTOR, "textarea.prompt"), markup)
    page.find_element(By.NAME, "generate").click()
    wait(browser, lambda d: "unknown" in error.text, 30, "the unknown-characters error")
    assert "'<'" in error.text
    assert browser.execute_script("return window.__xss") is None
    assert not page.find_elements(By.CSS_SELECTOR, "img, b")
    shot(browser, "text-error")
    assert not script_errors(browser)


@needs_browser
def test_api_key_is_kept_for_the_session_and_sent(server, browser):
    """The key typed at the top lives in sessionStorage and goes out as a Bearer token on every API call; every
    error shape the API answers with (genserve's, OpenAI's, /v2's) reads as one line of text."""
    open_page(browser, server.url, "models")
    set_value(browser.find_element(By.ID, "api-key"), "test-key-123")
    browser.execute_script("""
        window.__auth = [];
        const original = window.fetch;
        window.fetch = (url, init) => {
          window.__auth.push([String(url), (init && init.headers && init.headers.Authorization) || null]);
          return original(url, init);
        };""")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: d.execute_script("return window.__auth.length") > 0, 10, "a call with the key")
    assert browser.execute_script("return sessionStorage.getItem('genserve.apiKey')") == "test-key-123"
    calls = browser.execute_script("return window.__auth")
    assert calls and all(auth == "Bearer test-key-123" for _, auth in calls), calls
    browser.refresh()
    wait(browser, lambda d: d.find_element(By.ID, "api-key").get_attribute("value") == "test-key-123", 10, "the key")
    shapes = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/ui/js/api.js').then((m) => done([
          m.errorFrom(401, {error: {type: 'authentication_error', message: 'the API key is not valid',
                                    request_id: 'r1'}}).describe(),
          m.errorFrom(400, {error: {message: 'bad prompt', type: 'invalid_request', param: 'prompt', code: null}})
            .describe(),
          m.errorFrom(404, {error: 'Model not found'}).describe()]));""")
    assert shapes == ["HTTP 401 authentication_error: the API key is not valid (request r1)",
                      "HTTP 400 invalid_request: bad prompt", "HTTP 404: Model not found"]
    set_value(browser.find_element(By.ID, "api-key"), " ")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: d.execute_script("return sessionStorage.getItem('genserve.apiKey')") is None, 10,
         "the key removed")
    assert not script_errors(browser)


@needs_browser
def test_images_sample_complete_and_heat_map(server, browser):
    page = open_page(browser, server.url, "images", IMAGE_COND)
    set_value(page.find_element(By.NAME, "per-class"), 2)
    page.find_element(By.NAME, "sample").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sample-output canvas")) == 20, 120, "20 samples")
    rows = page.find_elements(By.CSS_SELECTOR, "#sample-output .class-col")
    assert [r.find_element(By.CSS_SELECTOR, ".class-label").text for r in rows] == [str(d) for d in range(10)]
    assert all(canvas_ink(browser, c) > 0 for c in page.find_elements(By.CSS_SELECTOR, "#sample-output canvas"))

    pad = page.find_element(By.ID, "draw-pad")
    from selenium.webdriver import ActionChains

    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)  # clear of the sticky header
    ActionChains(browser).move_to_element_with_offset(pad, -30, -60).click_and_hold() \
        .move_by_offset(0, 40).move_by_offset(0, 40).release().perform()
    assert white_pixels(browser, pad) > 0
    page.find_element(By.NAME, "complete").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#complete-output canvas")) == 4, 120, "completions")
    page.find_element(By.NAME, "log-prob").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#heat-output figure.heat canvas.pixels"), 60, "heat map")
    assert "bits per pixel" in page.find_element(By.ID, "heat-output").text
    shot(browser, "images-digits")

    page = open_page(browser, server.url, "images", VAE)
    wait(browser, lambda d: d.find_elements(By.NAME, "interpolate"), 10, "the VAE section")
    page.find_element(By.NAME, "interpolate").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#interpolate-output canvas")) == 8, 120, "8 steps")
    shot(browser, "images-vae")

    page = open_page(browser, server.url, "images", GAN)
    wait(browser, lambda d: "only samples" in d.find_element(By.ID, "page-images").text, 10, "the GAN note")
    page.find_element(By.NAME, "sample").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#page-images .image-model canvas"), 120, "GAN samples")
    assert not script_errors(browser)


@needs_browser
def test_anomaly_csv_upload_histogram_and_flags(server, browser, tmp_path):
    from sklearn.datasets import load_wine

    x = load_wine().data
    names = load_wine().feature_names
    rows = [[f"wine-{i}", *x[i]] for i in range(0, 160, 8)]
    rows.append(['<img src=x onerror="window.__xss=1">', *(x[0] * 5)])
    rows.append(["<b>far,away</b>", *(x[1] * -4)])
    csv = tmp_path / "wine.csv"
    lines = [",".join(["id", *names])]
    for row in rows:
        ident = '"' + row[0].replace('"', '""') + '"'
        lines.append(",".join([ident, *(f"{v:.6g}" for v in row[1:])]))
    csv.write_text("\n".join(lines) + "\n")

    page = open_page(browser, server.url, "anomaly", SINGLE)
    page.find_element(By.NAME, "records-file").send_keys(str(csv))
    area = page.find_element(By.NAME, "records-csv")
    wait(browser, lambda d: "wine-0" in area.get_attribute("value"), 10, "the CSV in the text box")
    page.find_element(By.NAME, "detect").click()
    results = wait(browser, lambda d: d.find_elements(By.ID, "anomaly-results"), 60, "the results")[0]
    histogram = results.find_element(By.ID, "anomaly-histogram")
    wait(browser, lambda d: canvas_ink(d, histogram) > 0, 10, "the histogram")
    flagged = results.find_elements(By.CSS_SELECTOR, "tr.flagged")
    assert len(flagged) >= 2
    text = results.text
    assert '<img src=x onerror="window.__xss=1">' in text and "<b>far,away</b>" in text
    assert browser.execute_script("return window.__xss") is None
    assert not results.find_elements(By.CSS_SELECTOR, "img, b")
    assert f"{len(rows)} items scored by ensemble" in text
    assert results.find_element(By.NAME, "download").is_displayed()
    shot(browser, "anomaly-wine")

    # A bad CSV is refused in the page with a readable message naming the line.
    browser.execute_script("arguments[0].value = 'id,a\\n1,2,3'", area)
    page.find_element(By.NAME, "detect").click()
    error = wait(browser, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "#page-anomaly .error")
                                         if e.is_displayed()), None), 10, "the CSV error")
    assert "CSV line 2" in error.text
    assert not script_errors(browser)


@needs_browser
def test_phone_sized_screen(server):
    driver = make_driver(390, 844)
    try:
        for page, model in (("models", None), ("text", TEXT), ("anomaly", SINGLE), ("images", IMAGE_COND)):
            open_page(driver, server.url, page, model)
            time.sleep(0.5)
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, f"{page} is {overflow}px wider than a phone's screen"
            shot(driver, f"phone-{page}")
        assert not script_errors(driver)
    finally:
        driver.quit()


# ---- the README's screenshots of the default models -------------------------------------------------------------


def capture_default_screenshots(url: str, out: Path) -> list[Path]:
    """Screenshots of a server with the default models (make serve): models, text, images, anomaly."""
    driver = make_driver(1200, 900)
    shots = []
    try:
        open_page(driver, url, "models")
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "article.model img.picture"), 30, "the cards")
        time.sleep(2)
        shots.append(shot(driver, "ui-models", out))

        page = open_page(driver, url, "text", "shakespeare")
        set_value(page.find_element(By.CSS_SELECTOR, "textarea.prompt"), "ROMEO:\n")
        set_value(page.find_element(By.NAME, "max_new_tokens"), 100)
        set_value(page.find_element(By.NAME, "seed"), 7)
        page.find_element(By.NAME, "generate").click()
        wait(driver, lambda d: "finished" in d.find_element(By.ID, "text-stats").text, 300, "the stream")
        toks = page.find_elements(By.CSS_SELECTOR, "#text-output .tok")
        low = min(toks, key=lambda t: float(t.get_attribute("title").split("log p=")[1].split()[0]))
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", low)
        low.click()
        shots.append(shot(driver, "ui-text", out))

        page = open_page(driver, url, "images", "mnist")
        set_value(page.find_element(By.NAME, "per-class"), 2)
        page.find_element(By.NAME, "sample").click()
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sample-output canvas")) == 20, 600, "samples")
        use_sample = page.find_element(By.NAME, "use-sample")
        use_sample.click()
        wait(driver, lambda d: use_sample.is_enabled() and white_pixels(d, d.find_element(By.ID, "draw-pad")) > 0,
             300, "a sample on the pad")
        page.find_element(By.NAME, "complete").click()
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#complete-output canvas")) == 4, 600,
             "completions")
        page.find_element(By.NAME, "log-prob").click()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#heat-output figure.heat"), 120, "the heat map")
        shots.append(shot(driver, "ui-images", out))

        page = open_page(driver, url, "anomaly", "breast-cancer")
        page.find_element(By.NAME, "demo").click()
        area = page.find_element(By.NAME, "records-csv")
        wait(driver, lambda d: "scaled-x4" in area.get_attribute("value"), 60, "example records")
        page.find_element(By.NAME, "detect").click()
        wait(driver, lambda d: d.find_elements(By.ID, "anomaly-results"), 60, "the results")
        time.sleep(1)
        shots.append(shot(driver, "ui-anomaly", out))

        driver.quit()
        driver = make_driver(390, 844)
        page = open_page(driver, url, "text", "shakespeare")
        set_value(page.find_element(By.NAME, "max_new_tokens"), 60)
        set_value(page.find_element(By.NAME, "seed"), 3)
        page.find_element(By.NAME, "generate").click()
        wait(driver, lambda d: "finished" in d.find_element(By.ID, "text-stats").text, 300, "the stream")
        page.find_elements(By.CSS_SELECTOR, "#text-output .tok")[8].click()
        shots.append(shot(driver, "ui-phone", out))
    finally:
        driver.quit()
    from PIL import Image

    for path in shots:  # 256 colours, no dithering: a third of the size, the same to the eye
        image = Image.open(path).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return shots


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "images"
    for p in capture_default_screenshots(target, folder):
        print(p)


def test_docs_page_loads_swagger_ui_from_the_server(server):
    """/docs is Swagger UI from the vendored copy: the page names no outside URL, and its files are served."""
    page = httpx.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    scripts = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/ui/vendor/swagger-ui/swagger-ui-bundle.js" in scripts and "/ui/vendor/swagger-ui/swagger-ui.css" in scripts
    assert not [u for u in scripts if u.startswith(("http:", "https:", "//"))], scripts
    for url in scripts:
        assert httpx.get(f"{server.url}{url}", timeout=30).status_code == 200, url


@needs_browser
def test_docs_page_renders_the_schema(server, browser):
    browser.get(f"{server.url}/docs")
    title = wait(browser, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
                                          if "genserve" in e.text), None), 60, "Swagger UI's title")
    assert "genserve" in title.text
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 20, 30, "the operations")
    assert not script_errors(browser)
