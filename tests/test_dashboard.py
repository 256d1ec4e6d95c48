"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Selenium against a live
`logitfuse serve` with real jobs, a real fusion report and a real training run in its store.

Checks the rendered content of every page, the live jobs table, cancel by the owning team (and no cancel
for another team), login with a token kept in the browser session, keyboard navigation, labels, and
layout at 1280 px and at phone width. Screenshots go to pytest's tmp dir, or to
`$LOGITFUSE_SCREENSHOTS` when set (that is how README's pictures are made).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from clients.client import TeacherClient, run_local_service
from clients.corpus import chat_samples, write_jsonl

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKENS = {"team-a": "token-a-write", "team-b": "token-b-write", "viewers": "token-viewers-read"}


def _token_entries() -> list[dict]:
    scope = {"team-a": "write", "team-b": "write", "viewers": "read"}
    return [{"team": team, "sha256": hashlib.sha256(tok.encode()).hexdigest(), "scope": scope[team]}
            for team, tok in TOKENS.items()]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A store with a logits dataset made by a service job, targets fused from it with a report, a
    training run, and a live server; yields (url, root)."""
    from clients.tiny_models import make_teacher
    from datastore.chat import load_dataset
    from fusion.pipeline import fuse_logits
    from teacher_server.backends.hf import HFBackend
    from teacher_server.extract import ExtractSettings, extract
    from teacher_server.render import TEMPLATE_DIR
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("dashboard")
    teacher = make_teacher(root / "teacher", "llama", "spm32k", (TEMPLATE_DIR / "inst.jinja").read_text(),
                           steps=5)
    data = write_jsonl(chat_samples(16, seed=3), root / "chat.jsonl")
    store = root / "store"
    backend = HFBackend(teacher, device="cpu")
    pivot, source = (extract(backend, load_dataset(data), str(store), "tiny", ExtractSettings(k=k, shard_rows=4),
                             progress=False) for k in (8, 4))
    targets = str(store / "targets" / "demo")
    fuse_logits(pivot.uri, [source.uri], targets, progress=False)
    train(TrainConfig(targets=targets, model=str(teacher), out=str(root / "runs" / "target-a"), max_steps=3,
                      batch_size=2, max_length=256, lr=1e-4, tensorboard=False, plot=False))
    cfg = {"store": str(store), "state_dir": str(root / "state"), "runs": [str(root / "runs")],
           "tokens": _token_entries(),
           "teachers": [{"name": "tiny", "model": str(teacher), "backend": "hf", "max_k": 16, "max_length": 256,
                         "shard_rows": 4, "batch_tokens": 256}]}
    with run_local_service(cfg, log_path=root / "serve.log") as url:
        with TeacherClient(url, token=TOKENS["team-a"]) as client:
            ds = client.upload(data)
            job = client.submit(ds["id"], "tiny", k=6)
            client.wait(job["id"], timeout=300)
        yield url, root


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the dashboard tests need Debian's chromium and chromium-driver packages (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("LOGITFUSE_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _login(driver, url: str, token: str, next_path: str = "/") -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(url + next_path)
    assert "/login" in driver.current_url, driver.current_url  # no token yet: sent to the login page
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()
    _wait(lambda: "/login" not in driver.current_url, "login redirect")


def _wait(cond, what: str, timeout: float = 60) -> None:
    """Poll `cond()` until true. The pages update parts of themselves in place, so an element `cond` found
    can be replaced before it reads it (StaleElementReferenceException): that poll counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "main").text


def test_login_and_overview(site, browser, shots):
    url, _ = site
    _login(browser, url, TOKENS["viewers"])
    text = _text(browser)
    assert "Overview" in text and "logits datasets" in text
    assert "2 logits" not in text  # three logits datasets: k=8, k=4 and the service job's k=6
    assert "3\nlogits datasets" in text, text
    assert "team viewers" in browser.find_element("css selector", "header").text
    browser.save_screenshot(str(shots / "overview.png"))


def test_catalog_filter_sort_and_dataset_page(site, browser, shots):
    from selenium.webdriver.common.by import By

    url, _ = site
    _login(browser, url, TOKENS["viewers"], "/catalog")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.catalog tbody tr")
    assert len(rows) == 4, [r.text for r in rows]  # 3 logits + 1 targets
    browser.save_screenshot(str(shots / "catalog.png"))

    Select = __import__("selenium.webdriver.support.select", fromlist=["Select"]).Select
    Select(browser.find_element(By.ID, "f-kind")).select_by_value("logits")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    _wait(lambda: "kind=logits" in browser.current_url, "filter")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.catalog tbody tr")
    assert len(rows) == 3 and all(r.text.startswith("logits") for r in rows)

    browser.find_element(By.LINK_TEXT, "k").click()  # sort by k, descending first
    _wait(lambda: "sort=k" in browser.current_url, "sort")
    ks = [int(r.find_elements(By.TAG_NAME, "td")[3].text) for r in
          browser.find_elements(By.CSS_SELECTOR, "table.catalog tbody tr")]
    assert ks == [8, 6, 4], ks

    browser.find_element(By.CSS_SELECTOR, "table.catalog tbody tr td a").click()
    _wait(lambda: "/catalog/logits/" in browser.current_url, "dataset page")
    text = _text(browser)
    assert "Logits dataset" in text and "Teacher" in text and "Shards" in text
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart[role=img]")
    assert len(charts) == 2
    labels = " ".join(c.get_attribute("aria-label") for c in charts)
    assert "Entropy" in labels and "gold token" in labels
    assert "gold token is in the top-8" in text
    browser.save_screenshot(str(shots / "dataset.png"))


def test_json_twins_match_the_api(site):
    url, _ = site
    headers = {"Authorization": f"Bearer {TOKENS['viewers']}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        cat = c.get("/catalog.json").json()["datasets"]
        assert sorted(r["kind"] for r in cat) == ["logits", "logits", "logits", "targets"]
        ks = sorted(r["k"] for r in cat if r["kind"] == "logits")
        assert ks == [4, 6, 8]
        logits = next(r for r in cat if r["kind"] == "logits" and r["k"] == 8)
        detail = c.get(f"/catalog/logits/{logits['id']}.json").json()
        hist = detail["histograms"]
        assert hist["positions"] == sum(hist["entropy"]["counts"]) == sum(hist["gold_rank"]["counts"])
        assert hist["positions"] > 0 and len(hist["gold_rank"]["labels"]) == 9
        assert c.get("/jobs.json").json()["finished"] == []  # team viewers submitted nothing
        jobs = c.get("/jobs.json", headers={"Authorization": f"Bearer {TOKENS['team-a']}"}).json()
        assert [j["state"] for j in jobs["finished"]] == ["done"]
        assert c.get("/fusion.json").json()["reports"][0]["report"]["sources"][0]["examples"]
        runs = c.get("/runs.json").json()["runs"]
        assert [r["name"] for r in runs] == ["target-a"] and runs[0]["steps"] == 3
    with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as c:
        r = c.get("/catalog.json")
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = c.get("/catalog")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_jobs_live_progress_and_cancel(site, browser, shots, tmp_path):
    from selenium.webdriver.common.by import By

    url, root = site
    big = write_jsonl(chat_samples(400, seed=11, max_turns=3), tmp_path / "big.jsonl")
    with TeacherClient(url, token=TOKENS["team-a"]) as client:
        ds = client.upload(big)
        job = client.submit(ds["id"], "tiny", k=5)
    job_id = job["id"]

    # team B does not see team A's jobs (as on GET /v1/jobs), and the server refuses a forged cancel
    _login(browser, url, TOKENS["team-b"], "/jobs")
    assert "Running (0)" in _text(browser) and not browser.find_elements(By.ID, f"job-{job_id}")
    r = httpx.post(f"{url}/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {TOKENS['team-b']}"})
    assert r.status_code == 403 and "error" in r.json()

    _login(browser, url, TOKENS["team-a"], "/jobs")
    browser.execute_script("window.__notReloaded = true;")
    progress = f"#job-{job_id} progress"
    seen: list[float] = []

    def progress_read() -> bool:
        bars = browser.find_elements(By.CSS_SELECTOR, progress)
        if bars:
            seen.append(float(bars[0].get_attribute("value")))
        return bool(bars)

    _wait(progress_read, "the job to run", timeout=120)
    first = seen[-1]
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, progress)
          and float(browser.find_element(By.CSS_SELECTOR, progress).get_attribute("value")) > first,
          "progress to advance", timeout=120)
    assert browser.execute_script("return window.__notReloaded === true;")  # updated in place
    row = browser.find_element(By.ID, f"job-{job_id}").text
    assert "tiny" in row and "team-a" in row and "/400" in row
    browser.save_screenshot(str(shots / "jobs.png"))

    browser.find_element(By.CSS_SELECTOR, f"form[action='/jobs/{job_id}/cancel'] button").click()
    browser.switch_to.alert.accept()
    _wait(lambda: "cancelled" in _text(browser), "cancel")
    state = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKENS['team-a']}"}).json()
    assert state["state"] == "cancelled" and state["samples_done"] < 400


def test_fusion_and_training_pages(site, browser, shots):
    from selenium.webdriver.common.by import By

    url, _ = site
    _login(browser, url, TOKENS["viewers"], "/fusion")
    text = _text(browser)
    assert "Alignment of each source to the pivot" in text
    assert "100.0%" in text  # same tokenizer: every character aligned, every group 1-1
    assert "MinCE winners" in text and "Example alignments" in text
    pairs = browser.find_elements(By.CSS_SELECTOR, "table.align tbody tr")
    assert pairs and all(td.text for td in pairs[0].find_elements(By.TAG_NAME, "td")[:2])
    browser.save_screenshot(str(shots / "fusion.png"))

    browser.get(url + "/runs")
    assert "target-a" in _text(browser)
    browser.find_element(By.LINK_TEXT, "target-a").click()
    _wait(lambda: "/runs/target-a" in browser.current_url, "run page")
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart[role=img]")
    assert "loss" in chart.get_attribute("aria-label") and "sft" in chart.get_attribute("aria-label")
    browser.save_screenshot(str(shots / "training.png"))


def test_keyboard_labels_and_phone_width(site, browser, shots):
    from selenium.webdriver.common.keys import Keys

    url, _ = site
    _login(browser, url, TOKENS["viewers"], "/catalog")
    from selenium.webdriver.common.action_chains import ActionChains

    browser.get(url + "/catalog")  # a fresh load: focus starts at the top of the document
    browser.execute_script("document.activeElement && document.activeElement.blur();")
    ActionChains(browser).send_keys(Keys.TAB).perform()
    active = browser.switch_to.active_element
    assert active.text == "Skip to content"
    active.send_keys(Keys.ENTER)
    visited = []
    for _ in range(12):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        visited.append(browser.switch_to.active_element.get_attribute("id") or
                       browser.switch_to.active_element.text)
    assert {"f-kind", "f-teacher", "f-q"} <= set(visited), visited  # the filters are reachable by keyboard
    unlabeled = browser.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]), select')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.outerHTML);")
    assert unlabeled == []

    browser.set_window_size(390, 844)
    try:
        for path in ("/catalog", "/jobs", "/fusion", "/runs/target-a"):
            browser.get(url + path)
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
            assert overflow <= 1, (path, overflow)  # wide tables scroll inside their box, not the page
        browser.get(url + "/catalog")
        browser.save_screenshot(str(shots / "catalog-phone.png"))
    finally:
        browser.set_window_size(1280, 900)
