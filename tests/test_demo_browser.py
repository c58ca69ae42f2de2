"""`keyseg demo` in a real headless Chromium: upload, ask, see the overlay and the answer.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install -y chromium``); the test is
skipped, saying so, when it is missing. Playwright drives that binary; no browser download.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian chromium missing at /usr/bin/chromium "
                              "(apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"keyseg demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"keyseg demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture
def demo_server(tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyseg.cli", "demo", "--host", "127.0.0.1",
             "--port", str(port), "--max-new-tokens", "16"],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_upload_and_ask_shows_overlay_and_answer(demo_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    upload = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(upload)
    query = "Which shape looks like a stop sign?"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo_browser.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(demo_server, wait_until="domcontentloaded")
            page.locator("#keyseg-image input[type=file]").set_input_files(str(upload))
            expect(page.locator("#keyseg-image img").first).to_be_visible()
            page.locator("#keyseg-query textarea").fill(query)
            page.locator("#keyseg-submit").click()

            overlay = page.locator("#keyseg-overlay img").first
            expect(overlay).to_be_visible()
            answer = page.locator("#keyseg-answer textarea")
            expect(answer).not_to_have_value("")
            size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            text = answer.input_value()
            chat = page.locator("#keyseg-chat")
            expect(chat).to_contain_text(query)
            expect(chat).to_contain_text(text.splitlines()[0].strip()[:20])
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert size == [120, 80]  # the overlay is drawn at the uploaded image's own size
    assert shot.stat().st_size > 0
