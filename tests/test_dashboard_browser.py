"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``
and ``chromium-driver``; selenium never downloads one) against
tests/dashboard_app.py served in a subprocess. It signs in through the login
form, watches the numbers move over the live stream and agree with the app's
own stats, retries a failed task from the failures table, checks the console
has no errors, and takes a screenshot: to ``$CATZILLA_SCREENSHOT`` when set
(``CATZILLA_SCREENSHOT=docs/dashboard.png`` makes the README's), else to
``tmp_path``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Client, ServerProcess, free_port, wait_until
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver on PATH (Debian: apt install chromium chromium-driver)",
)

TESTS = Path(__file__).resolve().parent
TOKEN = "browser-test-token"  # dashboard_app.TOKEN
FLAKY_KEY = "order-17"  # dashboard_app.FLAKY_KEY
WAIT = 20.0  # generous bound for anything the page should show
WIDTH = 1400


@pytest.fixture
def served(spawn: Callable[..., ServerProcess]) -> Iterator[tuple[ServerProcess, Client]]:
    """tests/dashboard_app.py on a free port; stopped with SIGTERM at teardown."""
    port = free_port()
    p = spawn(["-c", f"import dashboard_app; dashboard_app.main({port})"], cwd=str(TESTS))
    host, port = p.wait_serving()
    yield p, Client(host, port)
    if p.proc.poll() is None:
        code = p.stop(signal.SIGTERM)  # kills it and fails if it outlives the deadline
        assert code == 0, f"the app exited {code} on SIGTERM:\n{p.output()}"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},1800")
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(cond, f"waiting for {what}")


def shown(driver: webdriver.Chrome, *names: str) -> list[str]:
    """The text of #stat-<name> for each name, read in one go (one render)."""
    script = "return arguments[0].map((n) => document.getElementById('stat-' + n).textContent)"
    texts: list[str] = driver.execute_script(script, list(names))
    return texts


def count(driver: webdriver.Chrome, name: str) -> int:
    text = shown(driver, name)[0]
    return int(text) if text.isdigit() else -1  # "–" until the first snapshot


def app_state(client: Client) -> dict[str, Any]:
    state: dict[str, Any] = client.get("/test/state").json()
    return state


def snapshot(client: Client) -> dict[str, Any]:
    r = client.get("/_catzilla/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r
    data: dict[str, Any] = r.json()
    return data


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_dashboard_in_a_browser(
    served: tuple[ServerProcess, Client], browser: webdriver.Chrome, tmp_path: Path
):
    p, client = served
    driver = browser
    base = f"http://{client.host}:{client.port}"

    # Sign in: the page answers 401 with the login form, which sets the cookie.
    driver.get(f"{base}/_catzilla")
    assert "sign in" in driver.title, driver.page_source
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    until(driver, lambda d: d.find_element(By.ID, "live-status").text == "live", "the live stream")
    assert driver.current_url == f"{base}/_catzilla"
    driver.execute_script("window.sameDocument = true")

    # Live numbers: the count moves twice with no reload, over the stream.
    seen = [until(driver, lambda d: count(d, "processed") >= 0, "a first snapshot")]
    for _ in range(2):
        rise = lambda d, last=seen[-1]: (n := count(d, "processed")) > last and n  # noqa: E731
        seen.append(until(driver, rise, f"the processed count to rise above {seen[-1]}"))
    assert driver.execute_script("return window.sameDocument === true"), "the page reloaded"

    # ... and agree with the app's stats. A count above `before` comes from a
    # snapshot taken after it (the counts only grow), so each of the page's
    # counts, read in the same render, lies between `before` and `after`.
    keys = {"processed": "total_tasks_processed", "failed": "failed_tasks"}
    keys["submitted"] = "total_tasks_submitted"
    before = app_state(client)["stats"]
    low = before["total_tasks_processed"]
    until(driver, lambda d: count(d, "processed") > low, "the page to pass the app's count")
    page = dict(zip(keys, map(int, shown(driver, *keys)), strict=True))
    after = app_state(client)["stats"]
    for name, key in keys.items():
        assert before[key] <= page[name] <= after[key], (name, before[key], page, after[key])
    assert page["failed"] >= 1, page  # flaky's first attempt, at least

    # Retry the failed flaky task from the failures table.
    row = until(
        driver,
        lambda d: d.find_element(
            By.XPATH, "//table[@id='failures']//tr[@data-task-id][td[contains(., '.flaky')]]"
        ),
        "flaky in the failures table",
    )
    failed_id = row.get_attribute("data-task-id")
    assert "ValueError: first attempt fails" in row.text, row.text
    assert FLAKY_KEY not in app_state(client)["flaky_succeeded"]
    row.find_element(By.CSS_SELECTOR, "button.retry").click()
    notice = until(
        driver,
        lambda d: "Retried" in (text := d.find_element(By.ID, "notice").text) and text,
        "the Retried notice",  # (.text is "" while the notice is hidden)
    )
    match = re.fullmatch(r"Retried task (\S+) as (\S+)", notice)
    assert match and match[1] == failed_id, notice
    new_id = match[2]
    assert new_id != failed_id
    wait_until(
        lambda: FLAKY_KEY in app_state(client)["flaky_succeeded"], WAIT, 0.05, "flaky's retry"
    )
    task = wait_until(
        lambda: (
            (r := client.get(f"/test/task/{new_id}")).status == 200
            and r.json()["status"] == "completed"
            and r.json()
        ),
        WAIT,
        0.05,
        f"the retried task {new_id} to complete",
    )
    assert task["name"] == "dashboard_app.flaky" and task["result"] == FLAKY_KEY, task
    original = client.get(f"/test/task/{failed_id}").json()
    assert original["status"] == "failed", original  # the retry is a new task
    driver.find_element(By.ID, "notice").click()  # dismisses it
    until(driver, lambda d: not d.find_element(By.ID, "notice").is_displayed(), "no notice")

    # Screenshot: charts with some history, a running task with progress, failures.
    # (The README's screenshot waits for half a chart of it.)
    points = 30 if os.environ.get("CATZILLA_SCREENSHOT") else 5
    history = lambda: len(snapshot(client)["history"]) >= points  # noqa: E731
    wait_until(history, points + WAIT, 0.1, f"{points} s of history")
    ready = """
        const bars = [...document.querySelectorAll('#running tr[data-task-id] .progress > .bar')];
        return bars.some((b) => parseFloat(b.style.width) > 0)
            && document.querySelectorAll('#failures tr[data-task-id]').length > 0;
    """
    until(driver, lambda d: d.execute_script(ready), "a task with progress and failures")
    # The whole page: a window as tall as the page plus what the window adds to it.
    extra = "return document.body.scrollHeight + outerHeight - innerHeight"
    driver.set_window_size(WIDTH, driver.execute_script(extra))
    assert driver.execute_script("return document.body.scrollHeight <= innerHeight")
    target = Path(os.environ.get("CATZILLA_SCREENSHOT") or tmp_path / "dashboard.png")
    assert driver.save_screenshot(str(target))
    width, height = png_size(target.read_bytes())
    assert width == WIDTH and height >= 800, (width, height)

    # No errors in the console, but for the 401 of the first load and a favicon.
    first_load = (
        f"{base}/_catzilla - Failed to load resource: the server responded with a status of 401"
    )
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "favicon.ico" not in e["message"]
        and not e["message"].startswith(first_load)
    ]
    assert not errors, errors
    assert p.proc.poll() is None, p.output()
