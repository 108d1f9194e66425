"""A real browser for the portal's tests: headless Chromium (Debian ``chromium``) driven through its
WebDriver (Debian ``chromium-driver``) by selenium.

Selenium blocks, and the relay under test runs in the test's own trio loop: every browser call goes through
``trio.to_thread``, and every wait is a bounded ``WebDriverWait``. Screenshots go to the test's temporary
directory, or to ``$PRINTRELAY_SCREENSHOTS`` when set (``PRINTRELAY_SCREENSHOTS=docs/images`` renews the
pictures in docs/portal.md).
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 15.0  # seconds any one wait for the page may take

T = TypeVar("T")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (its own profile: no cookies from another test)."""
    for tool, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not tool.exists():
            pytest.fail(
                f"{tool} is missing: install the Debian package {package} (scripts/install-system-deps.sh)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900", "--lang=en-US",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations show in its console
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Browser:
    """The browser as a person uses it: open a page, fill fields by their labels' ids, press buttons."""

    def __init__(self, driver: WebDriver, base_url: str, shots: Path) -> None:
        self.driver = driver
        self.base_url = base_url
        self.shots = shots

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args))

    async def get(self, path: str) -> None:
        await self.run(self.driver.get, path if "://" in path else self.base_url + path)

    async def path(self) -> str:
        url = await self.run(lambda: self.driver.current_url)
        parts = urllib.parse.urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def find(self, css: str) -> WebElement:
        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[WebElement]:
        return await self.run(self.driver.find_elements, By.CSS_SELECTOR, css)

    async def fill(self, css: str, text: str) -> None:
        def fill() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, css)
            field.clear()
            field.send_keys(text)

        await self.run(fill)

    async def click(self, css: str) -> None:
        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def submit(self, form_css: str) -> None:
        """Press the submit button of the form, and wait for the page it leads to."""

        def submit() -> None:
            old = self.driver.find_element(By.TAG_NAME, "html")
            self.driver.find_element(By.CSS_SELECTOR, f"{form_css} button[type=submit]").click()
            WebDriverWait(self.driver, WAIT).until(lambda d: _stale(old))
            WebDriverWait(self.driver, WAIT).until(
                lambda d: d.execute_script("return document.readyState") == "complete"
            )

        await self.run(submit)

    async def text(self, css: str = "main") -> str:
        return await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    async def wait(self, condition: Callable[[WebDriver], Any], what: str, within: float = WAIT) -> Any:
        def wait() -> Any:
            try:
                return WebDriverWait(self.driver, within).until(condition)
            except TimeoutException:
                page = self.driver.find_element(By.TAG_NAME, "body").text[:2000]
                raise AssertionError(
                    f"waited {within:g} s for {what}; the page: {self.driver.current_url}\n{page}"
                ) from None

        return await self.run(wait)

    async def wait_text(self, css: str, text: str, within: float = WAIT) -> None:
        def shows(driver: WebDriver) -> bool:
            return any(text in e.text for e in driver.find_elements(By.CSS_SELECTOR, css))

        await self.wait(shows, f"{text!r} in {css}", within)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def screenshot(self, name: str) -> Path:
        """The whole page (not only the window), as a PNG."""
        path = self.shots / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)

        def capture() -> bytes:
            size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            shot = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
            )
            return base64.b64decode(shot["data"])

        path.write_bytes(await self.run(capture))
        return path

    async def console_errors(self) -> list[str]:
        """What the page's console said at level SEVERE since last asked (CSP violations among them)."""
        logs = await self.run(self.driver.get_log, "browser")
        return [entry["message"] for entry in logs if entry["level"] == "SEVERE"]

    async def cookie(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.run(self.driver.get_cookie, name)
        return found


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
        return False
    except Exception:  # StaleElementReferenceException: the page was replaced
        return True


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    return Path(os.environ.get("PRINTRELAY_SCREENSHOTS") or tmp_path / "screenshots")
