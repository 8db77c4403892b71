"""``/dashboard``: sign-in and cookie rules over HTTP, then the page in real headless Chromium
(Debian's ``chromium`` + ``chromium-driver``, driven by selenium; no browser download).

Screenshots go to ``$DISTILLGATE_TEST_ARTIFACTS/dashboard/`` (default ``artifacts/`` at the
repository root, which git ignores).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.store import SQLiteStore, reporting
from gateway.auth import ADMIN_COOKIE
from tests.helpers import ROOT, UvicornThread, log_rows, sdk
from tests.operators import STUDENT_SETTINGS, UTTERANCES, messages, operator_app, wait_for

ROUTE = "clinc-intents"
ADMIN = {"authorization": "Bearer admin-secret"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("DISTILLGATE_TEST_ARTIFACTS", ROOT / "artifacts")) / "dashboard"


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLGATE_ADMIN_TOKEN", "admin-secret")


@pytest.fixture
def served_gateway(make_settings: Callable[..., Settings], replay_teacher: str,
                   admin_env: None) -> Iterator[tuple[str, Settings]]:
    """A gateway that has served every test utterance (student and teacher) with shadows logged."""
    settings = make_settings(replay_teacher, route=STUDENT_SETTINGS)
    with UvicornThread(operator_app(settings)) as server:
        client = sdk(server.url)
        for utterance, _, _ in UTTERANCES:
            client.chat.completions.create(model=ROUTE, messages=messages(utterance))
        log_rows(settings, len(UTTERANCES))
        shadowed = sum(1 for _, _, score in UTTERANCES if score <= STUDENT_SETTINGS["ood_threshold"])
        wait_for(lambda: _store_count(settings, "shadow_results") == shadowed)
        yield server.url, settings


def _store_count(settings: Settings, table: str) -> int:
    store = SQLiteStore(settings.store.path)
    try:
        return store.query(f"select count(*) as n from {table}")[0]["n"]
    finally:
        store.close()


# -- HTTP: sign-in, cookie, empty store ------------------------------------------------------
def test_sign_in_sets_an_httponly_cookie_that_needs_the_header_to_change_state(
        make_settings: Callable[..., Settings], replay_teacher: str, admin_env: None) -> None:
    with UvicornThread(operator_app(make_settings(replay_teacher))) as server:
        anonymous = httpx.get(f"{server.url}/dashboard")
        wrong = httpx.post(f"{server.url}/dashboard/login", data={"token": "nope", "next": "/dashboard"})
        in_url = httpx.get(f"{server.url}/dashboard", params={"token": "admin-secret"})
        signed = httpx.post(f"{server.url}/dashboard/login", data={"token": "admin-secret", "next": "/dashboard"})
        cookie = signed.cookies[ADMIN_COOKIE]
        jar = {ADMIN_COOKIE: cookie}
        page = httpx.get(f"{server.url}/dashboard", cookies=jar)
        read = httpx.get(f"{server.url}/admin/routes/{ROUTE}", cookies=jar)
        forged = httpx.patch(f"{server.url}/admin/routes/{ROUTE}", cookies=jar, json={"ood_threshold": 0.1})
        allowed = httpx.patch(f"{server.url}/admin/routes/{ROUTE}", cookies=jar, json={"ood_threshold": 0.3},
                              headers={"x-distillgate-dashboard": "1"})
        offsite = httpx.post(f"{server.url}/dashboard/login", data={"token": "admin-secret", "next": "//evil.test/"})
    assert anonymous.status_code == 401 and 'name="token"' in anonymous.text
    assert wrong.status_code == 401 and "not the admin token" in wrong.text
    assert in_url.status_code == 401 and "set-cookie" not in in_url.headers, "a token in a URL never signs in"
    assert signed.status_code == 303 and signed.headers["location"] == "/dashboard"
    set_cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "admin-secret" not in set_cookie
    assert page.status_code == 200 and ROUTE in page.text
    assert read.status_code == 200
    assert forged.status_code == 401, "a cookie alone must not change state (CSRF)"
    assert allowed.status_code == 200 and allowed.json()["ood_threshold"] == 0.3
    assert offsite.status_code == 303 and offsite.headers["location"] == "/dashboard"


def test_dashboard_is_off_without_an_admin_token(make_settings: Callable[..., Settings], replay_teacher: str) -> None:
    with UvicornThread(operator_app(make_settings(replay_teacher))) as server:
        response = httpx.get(f"{server.url}/dashboard", params={"token": "anything"})
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"


def test_empty_store_and_no_student(make_settings: Callable[..., Settings], replay_teacher: str,
                                    admin_env: None) -> None:
    with UvicornThread(operator_app(make_settings(replay_teacher))) as server:
        index = httpx.get(f"{server.url}/dashboard", headers=ADMIN)
        page = httpx.get(f"{server.url}/dashboard/routes/{ROUTE}", headers=ADMIN, params={"since": "all"})
        bad_window = httpx.get(f"{server.url}/dashboard/routes/{ROUTE}", headers=ADMIN, params={"since": "soon"})
        unknown = httpx.get(f"{server.url}/dashboard/routes/nope", headers=ADMIN)
        library = httpx.get(f"{server.url}/dashboard/static/uPlot.iife.min.js")
        traversal = httpx.get(f"{server.url}/dashboard/static/..%2Froutes.py")
    assert index.status_code == 200 and "No requests logged" in index.text
    assert page.status_code == 200
    for text in ('id="no-student"', 'id="cost-empty"', 'id="calibration-empty"', 'id="no-versions"', "$0.000000"):
        assert text in page.text
    assert bad_window.status_code == 400 and bad_window.json()["error"]["param"] == "since"
    assert unknown.status_code == 404
    assert library.status_code == 200 and "uPlot" in library.text
    assert traversal.status_code == 404


def test_sessions_are_server_side_expire_and_can_be_revoked(
        make_settings: Callable[..., Settings], replay_teacher: str, admin_env: None) -> None:
    settings = make_settings(replay_teacher, auth={"session_idle_s": 3.0})
    with UvicornThread(operator_app(settings)) as server:
        def sign_in() -> dict[str, str]:
            response = httpx.post(f"{server.url}/dashboard/login", data={"token": "admin-secret", "next": "/dashboard"})
            assert response.status_code == 303
            return {ADMIN_COOKIE: response.cookies[ADMIN_COOKIE]}

        def page(jar: dict[str, str]) -> int:
            return httpx.get(f"{server.url}/dashboard", cookies=jar).status_code

        first, second = sign_in(), sign_in()
        assert first != second and page(first) == page(second) == 200
        signed_out = httpx.post(f"{server.url}/dashboard/logout", cookies=first)
        assert signed_out.status_code == 303 and page(first) == 401, "sign-out ends the session on the server"
        assert page(second) == 200
        revoked = httpx.post(f"{server.url}/admin/sessions/revoke", headers=ADMIN)
        assert revoked.json() == {"revoked": 1} and page(second) == 401
        idle = sign_in()
        time.sleep(3.5)
        assert page(idle) == 401, "an idle session expires"


def test_sign_in_is_rate_limited_per_address(make_settings: Callable[..., Settings], replay_teacher: str,
                                             admin_env: None) -> None:
    settings = make_settings(replay_teacher, auth={"sign_in_per_minute": 3})
    with UvicornThread(operator_app(settings)) as server:
        guesses = [httpx.post(f"{server.url}/dashboard/login", data={"token": f"guess-{index}"})
                   for index in range(3)]
        limited = httpx.post(f"{server.url}/dashboard/login", data={"token": "admin-secret"})
    assert [guess.status_code for guess in guesses] == [401, 401, 401]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert ADMIN_COOKIE not in limited.cookies, "even the right token waits its turn"


# -- the page in headless Chromium -----------------------------------------------------------
@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,2400", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    # An explicit driver path: selenium's manager never tries to download a browser or driver.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


@pytest.mark.integration
def test_dashboard_in_chromium_shows_savings_and_moves_the_threshold(
        served_gateway: tuple[str, Settings], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, settings = served_gateway
    store = SQLiteStore(settings.store.path)
    [summary] = reporting.route_summaries(store, [ROUTE], reporting.parse_since("7d"))
    store.close()
    assert summary.savings_usd > 0

    browser.get(f"{url}/dashboard")
    browser.find_element(By.ID, "token").send_keys("admin-secret")
    browser.find_element(By.ID, "sign-in").click()
    assert browser.current_url == f"{url}/dashboard"
    browser.find_element(By.LINK_TEXT, ROUTE).click()
    wait = WebDriverWait(browser, 15)
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".uplot")) == 3)
    from gateway.dashboard.endpoints import _money

    assert browser.find_element(By.ID, "savings").text == _money(summary.savings_usd)
    assert browser.find_element(By.ID, "student-share").text == f"{summary.student_share * 100:.1f}%"
    assert browser.find_element(By.ID, "live-version").text == "base"

    slider = browser.find_element(By.ID, "threshold")
    slider.click()  # focus, then move it with the keyboard as an operator would
    start = float(slider.get_attribute("value"))
    slider.send_keys(Keys.ARROW_RIGHT * 8)
    moved = float(slider.get_attribute("value"))
    assert moved > start
    assert "expected agreement" in browser.find_element(By.ID, "threshold-estimate").text
    _screenshot(browser, "route-threshold-moved.png")
    browser.find_element(By.ID, "threshold-apply").click()
    wait.until(lambda driver: driver.find_element(By.ID, "threshold-status").text.startswith("saved"))
    shot = _screenshot(browser, "route.png")

    live = httpx.get(f"{url}/admin/routes/{ROUTE}", headers=ADMIN).json()
    assert live["ood_threshold"] == pytest.approx(moved) and live["ood_threshold"] != 0.5
    audit = httpx.get(f"{url}/admin/routes/{ROUTE}/audit", headers=ADMIN).json()["data"]
    assert audit[0]["field"] == "ood_threshold" and audit[0]["actor"].startswith("dashboard:")
    assert shot.stat().st_size > 10_000


@pytest.mark.integration
def test_dashboard_in_chromium_with_an_empty_store(make_settings: Callable[..., Settings], replay_teacher: str,
                                                   admin_env: None, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    with UvicornThread(operator_app(make_settings(replay_teacher))) as server:
        browser.get(f"{server.url}/dashboard/routes/{ROUTE}")
        browser.find_element(By.ID, "token").send_keys("admin-secret")
        browser.find_element(By.ID, "sign-in").click()
        assert browser.find_element(By.ID, "savings").text == "$0.000000"
        assert browser.find_element(By.ID, "no-student").is_displayed()
        # The login page itself answers 401 (a network entry); script errors are what matter.
        errors = [entry for entry in browser.get_log("browser")
                  if entry["level"] == "SEVERE" and entry.get("source") != "network"]
        _screenshot(browser, "route-empty.png")
    assert browser.current_url.endswith(f"/dashboard/routes/{ROUTE}")
    assert errors == [], errors


def test_chromium_is_the_system_one(browser: Any) -> None:
    """The browser tests must never fetch a browser: the one driven is Debian's, by its driver."""
    system_browser = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True, check=True).stdout
    system_driver = subprocess.run([str(CHROMEDRIVER), "--version"], capture_output=True, text=True, check=True).stdout
    assert browser.capabilities["browserVersion"] in system_browser
    assert browser.capabilities["chrome"]["chromedriverVersion"].split()[0] in system_driver


def test_route_page_calibration_comes_from_the_score_rollups(served_gateway: tuple[str, Settings]) -> None:
    """Traffic and shadows written by the gateway's own writers: the route page's counts and
    curve (read from the score rollups) equal the raw rows, the curve at the snapped edges."""
    from core.store.score_rollups import SCORE_EDGES, snap
    from router import calibration

    url, settings = served_gateway
    page = httpx.get(f"{url}/dashboard/routes/{ROUTE}", headers=ADMIN, params={"since": "all"})
    store = SQLiteStore(settings.store.path)
    try:
        scores, shadow = reporting.calibration_scores(store, ROUTE)
        result = calibration.route_calibration(store, ROUTE, 0.5)
    finally:
        store.close()
    assert page.status_code == 200 and scores and shadow
    assert f"{len(scores)} scored requests" in page.text and f"{len(shadow)} shadow comparisons" in page.text
    edges = [SCORE_EDGES[snap(point["threshold"])] for point in result["points"]]
    raw = calibration.calibration_curve(scores, shadow, edges)
    assert [(p["student_share"], p["expected_agreement"]) for p in result["points"]] == \
           [(r.student_share, r.expected_agreement) for r in raw]
