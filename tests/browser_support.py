"""A headless Chromium driven by selenium, for the console's tests.

The browser and its driver are the system's (Debian's ``chromium`` and ``chromium-driver``,
which ``scripts/services.sh chromium`` installs): their paths are given to selenium, so
Selenium Manager never runs and nothing is downloaded. Missing, they fail the test naming what
is missing; they are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path(os.environ.get("AMQP_QUEUE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("AMQP_QUEUE_CHROMEDRIVER", "/usr/bin/chromedriver"))


def _missing() -> list[str]:
    wanted = {CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver"}
    return [
        f"{package} ({path})"
        for path, package in wanted.items()
        if not (path.is_file() and os.access(path, os.X_OK))
    ]


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A headless Chromium, closed on exit."""
    missing = _missing()
    if missing:
        pytest.fail(
            f"the browser tests need {' and '.join(missing)}: run scripts/services.sh chromium "
            "(as root it installs them with apt-get; scripts/test.sh does), or set "
            "AMQP_QUEUE_CHROMIUM / AMQP_QUEUE_CHROMEDRIVER to where they are"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        # Root in a container has no user namespace for the sandbox.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,720",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    # The page's console messages (script errors, refused loads), for browser_errors().
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def browser_errors(driver: webdriver.Chrome, *expected: str) -> list[str]:
    """The page's errors since the last call (script errors, refused or failed loads), but
    those holding one of the ``expected`` texts."""
    # selenium leaves get_log untyped: each entry is {"level", "message", "source", "timestamp"}.
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [
        entry["message"]
        for entry in entries
        if (entry["level"] == "SEVERE" or "Content-Security-Policy" in entry["message"])
        and not any(text in entry["message"] for text in expected)
    ]
