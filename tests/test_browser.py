"""The web page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
which .ci/run installs) driven by Selenium against a running tmt-serve, and the standalone
attention file of tmt-translate --attention-html."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select

from conftest import BIN, run_cli
from test_serve import checkpoint  # noqa: F401 (a fixture)
from transformer_mt.decoding import SearchOptions, Translator

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(checkpoint: Path, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "tmt-serve"), str(checkpoint), "--port", str(port), "--beam", "3"],
        stdout=subprocess.DEVNULL,
        stderr=(log := (tmp_path / "server.log").open("w+b")),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError((tmp_path / "server.log").read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,1400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def lines_drawn(driver: WebDriver) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, "svg.head-view line.attn"))


def tokens(driver: WebDriver, side: str) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, f"svg.head-view text.token.{side}"))


def wait_for(condition: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


@needs_chromium
def test_page_translates_and_draws_the_attention(
    server: str,
    browser: WebDriver,
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    driver = browser
    driver.get(server + "/")
    source = driver.find_element(By.ID, "source")
    source.clear()
    source.send_keys("the red ball on the street")
    driver.find_element(By.ID, "translate").click()
    best = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".translation .best"))
    expected = Translator.from_checkpoint(checkpoint).translate(
        ["the red ball on the street"], SearchOptions(beam_size=3)
    )[0]
    assert best[0].text == expected.strip()

    wait_for(lambda: lines_drawn(driver))
    n_src = tokens(driver, "left")
    assert lines_drawn(driver) == n_src * n_src  # encoder: source × source, one head
    Select(driver.find_element(By.CSS_SELECTOR, "select.kind")).select_by_value("cross")
    view = driver.find_element(By.CSS_SELECTOR, "svg.head-view")
    assert view.get_attribute("data-kind") == "cross"
    n_tgt, n_src = tokens(driver, "left"), tokens(driver, "right")
    assert n_tgt >= 1 and lines_drawn(driver) == n_tgt * n_src
    Select(driver.find_element(By.CSS_SELECTOR, "select.head")).select_by_value("all")
    heads = len(driver.find_elements(By.CSS_SELECTOR, "select.head option")) - 1
    assert heads >= 2 and lines_drawn(driver) == heads * n_tgt * n_src
    screenshot = tmp_path / "explorer.png"
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if target := os.environ.get("TMT_SCREENSHOT"):  # docs: the picture of the explorer
        shutil.copyfile(screenshot, target)


@needs_chromium
def test_standalone_attention_file_draws_offline(
    browser: WebDriver,
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "attention.html"
    result = run_cli(
        "tmt-translate", str(checkpoint), "--attention-html", str(out), stdin="a dog runs\n"
    )
    assert result.returncode == 0, result.stderr
    driver = browser
    driver.get(out.as_uri())
    wait_for(lambda: lines_drawn(driver))
    assert lines_drawn(driver) == tokens(driver, "left") ** 2
