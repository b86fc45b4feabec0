"""The operator console in a real headless Chromium, over the API on a socket, the real broker
and SQLite state: sign in, the fleet-wide inbox, approve, cancel, hostile payloads, a viewer's
page, the device list, history and a command's timeline, and a four-eyes refusal.

Selenium blocks, and the API serves in this test's event loop: every browser step runs in a
thread (``asyncio.to_thread``) so the API answers the page meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from amqp_queue import CommandStatus
from amqp_queue.auth import Tokens
from tests.api_support import Api, running
from tests.browser_support import browser_errors, chromium

APPROVER, VIEWER, OPERATOR = "approver-token-0123", "viewer-token-4567", "operator-token-89ab"
TOKENS = Tokens.parse(f"ada:{APPROVER}:approver,val:{VIEWER}:viewer,otto:{OPERATOR}:operator")
HOSTILE = "<img src=x onerror=alert(1)>"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "console-inbox.png"
WAIT = 10
REFUSED_CONFIRM = "/confirm - Failed to load resource: the server responded with a status of 403"
T = TypeVar("T")


@pytest.fixture(scope="module")
def chromium_once() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def browser(chromium_once: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The module's browser on a blank page: the last test's page, polling an API that has
    stopped, is gone, and so are its failed loads."""
    chromium_once.get("about:blank")
    browser_errors(chromium_once)
    yield chromium_once
    chromium_once.get("about:blank")


class Console:
    """The console's page in the browser, as an operator uses it."""

    def __init__(self, driver: webdriver.Chrome, url: str) -> None:
        self.driver = driver
        self.url = url

    def wait(self) -> WebDriverWait[webdriver.Chrome]:
        # The page's poll re-renders the inbox: an element found a moment ago may be gone, and
        # the wait asks again.
        return WebDriverWait(self.driver, WAIT, ignored_exceptions=[StaleElementReferenceException])

    def settled(self, read: Callable[[], T]) -> T:
        """What ``read`` returns, read again if a poll re-rendered what it found meanwhile."""
        found: tuple[T] = self.wait().until(lambda _: (read(),))
        return found[0]

    def sign_in(self, token: str) -> None:
        self.driver.get(self.url + "/")
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        self.wait().until(expected_conditions.visibility_of_element_located((By.ID, "console")))

    def ids(self, count: int) -> list[str]:
        """The listed commands' ids, once there are ``count``, read in one script so that no
        poll re-renders the rows between finding them and reading them."""

        def listed(driver: webdriver.Chrome) -> list[str] | Literal[False]:
            found: list[str] = driver.execute_script(
                "return [...document.querySelectorAll('#inbox tbody tr')]"
                ".map((row) => row.dataset.id)"
            )
            return found if len(found) == count else False

        ids: list[str] = self.wait().until(listed)
        return ids

    def text(self, selector: str) -> str:
        return self.settled(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).text)

    def text_of(self, command_id: str, column: str) -> str:
        return self.text(f'#inbox tr[data-id="{command_id}"] td.{column}')

    def buttons(self, command_id: str) -> list[str]:
        selector = f'#inbox tr[data-id="{command_id}"] button'
        return self.settled(
            lambda: [button.text for button in self.driver.find_elements(By.CSS_SELECTOR, selector)]
        )

    def click_and_accept(self, command_id: str, button: str) -> str:
        self.driver.find_element(
            By.CSS_SELECTOR, f'#inbox tr[data-id="{command_id}"] button.{button}'
        ).click()
        dialog = self.wait().until(expected_conditions.alert_is_present())
        question = dialog.text
        dialog.accept()
        return question

    def click_and_confirm(self, command_id: str, button: str) -> str:
        question = self.click_and_accept(command_id, button)
        self.wait().until(
            expected_conditions.invisibility_of_element_located(
                (By.CSS_SELECTOR, f'#inbox tr[data-id="{command_id}"]')
            )
        )
        return question

    def no_alert(self) -> bool:
        try:
            self.driver.switch_to.alert  # noqa: B018 - the property raises when there is none
        except NoAlertPresentException:
            return True
        return False


@asynccontextmanager
async def _as_approver(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on a socket, its test client calling as the approver ada."""
    async with running(tmp_path, tokens=TOKENS) as api:
        api.client.headers["Authorization"] = f"Bearer {APPROVER}"
        yield api


async def _enqueue(api: Api, device: str, payload: str, command_type: str, **body: str) -> str:
    response = await api.enqueue(
        device, payload=payload, mode="confirm", command_type=command_type, ttl=600, **body
    )
    assert response.status_code == 201, response.text
    command_id: str = response.json()["id"]
    return command_id


async def test_an_approver_approves_one_cancels_one_and_a_hostile_payload_stays_text(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    async with _as_approver(tmp_path) as api:
        unlock = await _enqueue(api, "dev-1", "door-1", "unlock")
        hostile = await _enqueue(api, "dev-1", HOSTILE, "reboot")
        binary = base64.b64encode(b"\x00\xff\x10firmware").decode()
        firmware = await _enqueue(api, "dev-2", binary, "firmware", encoding="base64")
        console = Console(browser, api.url)

        def sign_in_and_look() -> None:
            console.sign_in(APPROVER)
            # The fleet-wide inbox: every device's waiting commands, oldest first.
            assert not browser.find_element(By.ID, "picker").is_displayed()
            assert console.ids(3) == [unlock, hostile, firmware]
            assert console.text_of(unlock, "enqueued-by") == "ada"
            # The hostile payload is shown as its text; no element was made of it, nothing ran.
            assert console.text_of(hostile, "payload") == HOSTILE
            assert browser.find_elements(By.CSS_SELECTOR, "#inbox img") == []
            assert console.no_alert()
            assert console.text_of(firmware, "payload") == f"base64, 11 bytes: {binary}"
            assert browser.find_element(By.ID, "who").text == "ada (approver)"
            # The countdown runs: TTL 600 s reads 10 minutes or just under (the fleet-wide
            # inbox may show it within half a second of the enqueue), and goes down.
            first = console.text_of(unlock, "time-left")
            assert re.fullmatch(r"9 min \d+ s|10 min 0 s", first), first
            assert console.wait().until(lambda _: console.text_of(unlock, "time-left") != first)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(SCREENSHOT))

        await asyncio.to_thread(sign_in_and_look)

        question = await asyncio.to_thread(console.click_and_confirm, unlock, "approve")
        assert question == f"Approve command {unlock} for device dev-1?"
        async with api.backends.store.consume("dev-1") as stream:
            async with asyncio.timeout(10):
                delivered = await anext(stream)
        assert (delivered.id, delivered.payload) == (unlock, b"door-1")

        await asyncio.to_thread(console.click_and_confirm, hostile, "cancel")
        assert await api.backends.store.get_status(hostile) == CommandStatus.CANCELLED
        assert await api.backends.store.get_status(firmware) == (
            CommandStatus.AWAITING_CONFIRMATION
        )
        # The next polls keep the inbox at what is still waiting.
        assert await asyncio.to_thread(console.ids, 1) == [firmware]
        assert console.no_alert()
        # No script error, no refused load.
        assert browser_errors(browser) == []


async def test_a_viewer_sees_no_buttons_and_the_api_refuses_its_confirm(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    async with _as_approver(tmp_path) as api:
        waiting = await _enqueue(api, "dev-1", "door-1", "unlock")
        console = Console(browser, api.url)

        def look_and_try_to_confirm() -> int:
            console.sign_in(VIEWER)
            console.ids(1)
            assert browser.find_element(By.ID, "who").text == "val (viewer)"
            assert browser.find_elements(By.CSS_SELECTOR, "#inbox button") == []
            assert not browser.find_element(By.CSS_SELECTOR, "[data-view=enqueue]").is_displayed()
            # The page's own token, used as the page would: the API says no.
            status: int = browser.execute_async_script(
                """
                const done = arguments[arguments.length - 1];
                fetch(`/commands/${arguments[0]}/confirm`, {
                  method: "POST",
                  headers: {Authorization: `Bearer ${sessionStorage.getItem("amqp-queue.token")}`},
                }).then((response) => done(response.status));
                """,
                waiting,
            )
            return status

        assert await asyncio.to_thread(look_and_try_to_confirm) == 403
        assert browser_errors(browser, REFUSED_CONFIRM) == []
        assert await api.backends.store.get_status(waiting) == CommandStatus.AWAITING_CONFIRMATION


async def test_an_operator_enqueues_from_the_form_and_stays_signed_in_across_a_reload(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    async with running(tmp_path, tokens=TOKENS) as api:
        console = Console(browser, api.url)

        def enqueue_from_the_form() -> None:
            console.sign_in(OPERATOR)
            browser.find_element(By.CSS_SELECTOR, "[data-view=enqueue]").click()
            browser.find_element(By.ID, "enqueue-device").send_keys("dev-3")
            browser.find_element(By.CSS_SELECTOR, "#enqueue-mode option[value=confirm]").click()
            browser.find_element(By.ID, "enqueue-type").send_keys("unlock")
            browser.find_element(By.ID, "enqueue-payload").send_keys("gate-2")
            browser.find_element(By.CSS_SELECTOR, "#enqueue-form button").click()
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(
                    (By.ID, "enqueue-result"), "awaiting_confirmation"
                )
            )
            # Signed in for the rest of the tab's session: a reload asks no token again.
            browser.refresh()
            console.wait().until(
                expected_conditions.visibility_of_element_located((By.ID, "console"))
            )
            (waiting,) = console.ids(1)
            # An operator cancels but cannot approve.
            assert console.buttons(waiting) == ["Cancel"]
            # The device view lists what is pending for the device now.
            browser.find_element(By.CSS_SELECTOR, "[data-view=device]").click()
            browser.find_element(By.ID, "device-id").send_keys("dev-3")
            browser.find_element(By.CSS_SELECTOR, "#device-form button").click()
            state = (By.CSS_SELECTOR, "#device-commands tbody td.state")
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(state, "awaiting confirmation")
            )
            assert console.text("#device-commands tbody td.payload") == "gate-2"
            # The device list counts it; the history lists it; its link opens its timeline.
            listed = (By.CSS_SELECTOR, "#devices tbody td.awaiting")
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(listed, "1")
            )
            assert console.text("#devices tbody td.device") == "dev-3"
            status = (By.CSS_SELECTOR, "#device-history tbody td.status")
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(status, "awaiting confirmation")
            )
            browser.find_element(By.CSS_SELECTOR, "#device-history tbody a.command-link").click()
            steps = (By.CSS_SELECTOR, "#command-timeline li")
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(steps, "enqueued by otto")
            )
            assert console.text("#command-facts dd.payload") == "gate-2"

        await asyncio.to_thread(enqueue_from_the_form)
        (command,) = await api.backends.store.get_pending_confirmations("dev-3")
        assert command.payload == b"gate-2"
        assert browser_errors(browser) == []


async def test_four_eyes_refuses_a_self_approval_in_the_page_and_another_approver_approves(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    tokens = Tokens.parse(f"ada:{APPROVER}:approver,bea:{OPERATOR}:approver")
    async with running(tmp_path, tokens=tokens, four_eyes=True) as api:
        api.client.headers["Authorization"] = f"Bearer {APPROVER}"
        unlock = await _enqueue(api, "dev-1", "door-1", "unlock")
        console = Console(browser, api.url)

        def try_to_approve_own_command() -> str:
            console.sign_in(APPROVER)
            console.ids(1)
            assert console.text_of(unlock, "enqueued-by") == "ada"
            console.click_and_accept(unlock, "approve")
            refusal = (By.ID, "status")
            assert console.wait().until(
                expected_conditions.text_to_be_present_in_element(refusal, "four-eyes")
            )
            # Still waiting, still listed, the refusal still shown after more polls.
            assert console.ids(1) == [unlock]
            text: str = browser.find_element(By.ID, "status").text
            return text

        shown = await asyncio.to_thread(try_to_approve_own_command)
        assert shown.startswith("confirm failed:")
        assert "enqueued by 'ada'" in shown
        assert await api.backends.store.get_status(unlock) == CommandStatus.AWAITING_CONFIRMATION
        assert browser_errors(browser, REFUSED_CONFIRM) == []

        def another_approver_approves() -> None:
            browser.find_element(By.ID, "sign-out").click()
            console.sign_in(OPERATOR)
            console.ids(1)
            console.click_and_confirm(unlock, "approve")

        await asyncio.to_thread(another_approver_approves)
        record = await api.backends.store.get_command(unlock)
        assert (record.enqueued_by, record.confirmed_by) == ("ada", "bea")
        assert browser_errors(browser) == []


# Holds the answer of the inbox's next poll back 1.5 s after the server gave it, and counts
# the polls answered; marks each step in window.heldPoll.
HOLD_NEXT_POLL = """
window.heldPoll = "armed";
window.polls = 0;
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const response = await realFetch(url, options);
  if (String(url).includes("/confirmations")) {
    if (window.heldPoll === "armed") {
      window.heldPoll = "asked";
      await new Promise((resolve) => setTimeout(resolve, 1500));
      window.heldPoll = "answered";
    }
    window.polls += 1;
  }
  return response;
};
"""

# Notes whether a row for the command arguments[0] is ever put back in the inbox.
WATCH_FOR_ROW = """
window.cameBack = false;
const selector = `#inbox tr[data-id="${arguments[0]}"]`;
new MutationObserver(() => {
  if (document.querySelector(selector)) window.cameBack = true;
}).observe(document.querySelector("#inbox tbody"), {childList: true});
"""


async def test_a_poll_answered_before_a_cancel_does_not_bring_the_command_back(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    async with _as_approver(tmp_path) as api:
        first = await _enqueue(api, "dev-1", "door-1", "unlock")
        second = await _enqueue(api, "dev-1", "door-2", "unlock-2")
        console = Console(browser, api.url)

        def cancel_while_an_older_poll_is_on_its_way() -> bool:
            console.sign_in(APPROVER)
            assert console.ids(2) == [first, second]
            browser.execute_script(HOLD_NEXT_POLL)
            # The server has answered a poll that still lists ``first``; the page has not
            # seen the answer yet.
            console.wait().until(
                lambda driver: driver.execute_script("return window.heldPoll === 'asked'")
            )
            console.click_and_confirm(first, "cancel")
            browser.execute_script(WATCH_FOR_ROW, first)
            console.wait().until(
                lambda driver: driver.execute_script("return window.heldPoll === 'answered'")
            )
            answered: int = browser.execute_script("return window.polls")
            # Two more polls answered: whatever the held answer did, the page has done.
            console.wait().until(
                lambda driver: driver.execute_script("return window.polls") >= answered + 2
            )
            assert console.ids(1) == [second]
            came_back: bool = browser.execute_script("return window.cameBack")
            return came_back

        assert not await asyncio.to_thread(cancel_while_an_older_poll_is_on_its_way)
        assert await api.backends.store.get_status(first) == CommandStatus.CANCELLED
        assert browser_errors(browser) == []
