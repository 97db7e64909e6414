"""The ops console in a real browser (Debian's chromium and chromium-driver, through Selenium)
against the running platform: log in with an operator token, look at the overview, search a paid
and released order and read its timeline, follow its buyer, and replay a malformed OrderPlaced
from the dead-letters page, edited, until the payment succeeds. Screenshots of every step go to
.data/artifacts/console/."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from deploy.ops import dlq, story
from shared.auth import fingerprint
from tests.integration.conftest import API_TOKEN, LOGS, ROOT, envelope, eventually, new_id, types

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / ".data" / "artifacts" / "console"
SECOND_TOKEN = "console-test-second-operator-token"  # any token of the list logs in

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs a browser: Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def console(service_env, services):
    """The console as `./danbao console` runs it, on a free port, with the services' settings."""
    port = _free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / "test-console.log", "ab")
    env = {**service_env, "CONSOLE_PORT": str(port), "DANBAO_API_TOKEN": f"{API_TOKEN},{SECOND_TOKEN}"}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.ops.console"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            async def healthy():
                assert proc.poll() is None, f"the console exited: see {LOGS}/test-console.log"
                try:
                    return (await http.get(f"{url}/health")).status_code == 200
                except httpx.HTTPError:
                    return False
            await eventually(healthy, timeout=20)
            # /health needs no token, every page does.
            assert (await http.get(f"{url}/")).status_code == 303
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1300,1600", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(driver: WebDriver, css: str, timeout: float = 20):
    """The element once the page that has it is loaded: a click on a form or link returns before
    the next page is there, so reading at once may read the old page (or nothing)."""
    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))


def text_of(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


async def test_console_shows_an_order_timeline_and_replays_a_fixed_dead_letter(shop, console, browser, ops_env):
    # A paid and released order.
    seller, buyer = await shop.user("s"), await shop.user("b", balance=50_000)
    order = await shop.place(buyer, seller, 10_000)
    assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    await shop.send("OrderConfirmed", {"order_id": order})
    assert types(await shop.events(order, 2, settle=0)) == ["PaymentSucceeded", "FundsReleased"]

    async def settled():
        s = await story.order_story(order)
        return s["status"]["escrow"] and s["status"]["escrow"]["status"] == "RELEASED" and not s["problems"]
    await eventually(settled, timeout=15)

    # A malformed OrderPlaced, dead-lettered.
    broken = new_id("o")
    await shop.kafka.send("orders.events", envelope("OrderPlaced", {
        "order_id": broken, "buyer_id": buyer, "seller_id": seller, "amount": "lots", "currency": "CNY",
        "payment_method": "balance"}), key=broken)

    async def dead_lettered():
        return [d for d in await dlq.read(["orders.events.dlq"]) if d.key == broken.encode()]
    [letter] = await eventually(dead_lettered)

    b = browser
    started = time.monotonic()
    try:
        # Log in: a wrong token is refused, the second token of the list is let in.
        b.get(console + "/dead-letters")
        wait_for(b, "#token").send_keys("not-the-token")
        b.find_element(By.ID, "login").click()
        assert "not an operator token" in wait_for(b, "#login-error").text
        shot(b, "01-login-refused")
        b.find_element(By.ID, "token").send_keys(SECOND_TOKEN)
        b.find_element(By.ID, "login").click()
        wait_for(b, "#dead-letters")
        assert b.current_url.endswith("/dead-letters"), b.current_url  # back where it was going
        cookie = b.get_cookie("danbao_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and SECOND_TOKEN not in cookie["value"]

        # The overview: services, sagas by state, money through escrow, the doctor.
        b.find_element(By.LINK_TEXT, "Overview").click()
        wait_for(b, "#sagas")
        assert "COMPLETED" in text_of(b, "#sagas") and "RELEASED" in text_of(b, "#sagas")
        assert "gateway" in text_of(b, "#health") and "up" in text_of(b, "#health")
        money = text_of(b, "#money")
        assert "held" in money and "fee revenue" in money and "all time" in money.lower()
        assert b.find_elements(By.CSS_SELECTOR, "#money svg rect")
        assert "audit" in text_of(b, "#doctor")
        shot(b, "02-overview")

        # Search the order: its story as a timeline.
        search = b.find_element(By.ID, "search")
        search.send_keys(order)
        search.submit()
        wait_for(b, "#timeline")
        assert text_of(b, "#order-id") == order
        entries = [e.text for e in b.find_elements(By.CSS_SELECTOR, "#timeline li.entry")]
        for expected in ("OrderPlaced received (applied)", "OrderConfirmed received", "PaymentSucceeded -> payments.events",
                         "FundsReleased -> payments.events", "hold:"):
            assert any(expected in e for e in entries), (expected, entries)
        assert [e for e in entries if "PaymentSucceeded ->" in e] and \
            entries.index(next(e for e in entries if "PaymentSucceeded ->" in e)) < \
            entries.index(next(e for e in entries if "FundsReleased ->" in e))
        assert "Consistent across services" in text_of(b, "#consistent")
        shot(b, "03-order-timeline")

        # Its buyer, one click away.
        b.find_element(By.LINK_TEXT, buyer).click()
        wait_for(b, "#payments")
        assert text_of(b, "#user-id") == buyer and order in text_of(b, "#payments")
        shot(b, "04-user")

        # The dead letter: listed, replayed as it is (refused: still invalid), then fixed.
        b.find_element(By.LINK_TEXT, "Dead letters").click()
        row = wait_for(b, f'tr.letter[data-position="{letter.position}"]')
        assert "INVALID_DATA" in row.text and "OrderPlaced" in row.text
        shot(b, "05-dead-letters")
        row.find_element(By.LINK_TEXT, letter.position).click()
        value = wait_for(b, "#value")
        assert json.loads(value.get_attribute("value"))["data"]["amount"] == "lots"
        b.find_element(By.ID, "replay").click()
        assert "INVALID_DATA" in wait_for(b, "#replay-error").text
        shot(b, "06-replay-refused")

        fixed = json.loads(b.find_element(By.ID, "value").get_attribute("value"))
        fixed["data"]["amount"] = 7000
        value = b.find_element(By.ID, "value")
        value.clear()
        value.send_keys(json.dumps(fixed, indent=2))
        b.find_element(By.ID, "replay").click()
        ok = wait_for(b, "#replay-ok").text
        assert "Replayed to orders.events" in ok and "edited" in ok, ok
        shot(b, "07-replayed")
        assert types(await shop.events(broken, 1, settle=0)) == ["PaymentSucceeded"]
        assert (await shop.payment(broken))["amount"] == 7000
        [done] = [h for h in await dlq.history() if h["dead_letter"] == letter.position]
        assert done["operator"] == f"console:{fingerprint(SECOND_TOKEN)}" and done["edited"]

        # A second replay of the same dead letter is refused and says by whom the first was done.
        b.find_element(By.ID, "replay").click()
        error = wait_for(b, "#replay-error").text
        assert "ALREADY_REPLAYED" in error and fingerprint(SECOND_TOKEN) in error, error
        shot(b, "08-replay-again-refused")

        # The replayed order's story (its key links to it): paid.
        b.find_element(By.LINK_TEXT, broken).click()
        for _ in range(20):
            if "PaymentSucceeded -> payments.events" in wait_for(b, "#timeline").text:
                break
            await asyncio.sleep(0.5)
            b.refresh()
        assert "PaymentSucceeded -> payments.events" in text_of(b, "#timeline")
        shot(b, "09-replayed-order")
        b.find_element(By.LINK_TEXT, "Dead letters").click()
        row = wait_for(b, f'tr.letter[data-position="{letter.position}"]')
        assert "replayed" in row.text and f"console:{fingerprint(SECOND_TOKEN)}" in row.text
    except BaseException:
        shot(b, "failure")
        raise
    assert time.monotonic() - started < 60
