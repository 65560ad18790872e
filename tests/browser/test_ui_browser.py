"""The Gradio demo at /ui driven in real headless Chromium (Playwright with the system Chromium).

Starts `quickstep-serve` exactly as `make demo` does (the bundled default model), opens /ui, picks steps and a
class, clicks Generate, waits for the images and checks they rendered: the right count, not blank.  The
screenshot is written to docs/images/ui.png when QUICKSTEP_UPDATE_DOCS=1 (the README shows it).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
N_IMAGES = 4


def _chromium() -> str:
    for c in CHROMIUM_CANDIDATES:
        if Path(c).exists():
            return c
    msg = "no system Chromium (apt-get install chromium); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def demo_server():
    port = free_port()
    exe = Path(sys.executable).with_name("quickstep-serve")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"quickstep-serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the demo server did not become ready within 90 s")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _not_blank(png: bytes) -> float:
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return float(arr.std())


def test_ui_generates_images_in_chromium(demo_server, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "ui.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo_server + "/ui/", wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("button", name="Generate").wait_for(timeout=60_000)

            # steps = 2 and class = 7 through the dropdowns, the number of images through the slider's box
            for label, value in (("Steps", "2"), ("Class label", "7")):
                box = page.get_by_label(label, exact=True)
                box.click()
                page.get_by_role("option", name=value, exact=True).click()
            page.get_by_role("checkbox", name="Randomise seed").uncheck()
            seed = page.get_by_label("Seed", exact=True)
            seed.fill("3")
            num = page.get_by_role("spinbutton", name="number input for Number of images")
            num.fill(str(N_IMAGES))
            num.press("Enter")

            page.get_by_role("button", name="Generate").click()
            latency = page.get_by_label("Latency", exact=True)
            page.wait_for_function(
                "el => el.value && el.value.includes('ms')", arg=latency.element_handle(), timeout=60_000)
            text = latency.input_value()
            assert f"{N_IMAGES} image(s), 2 step(s)" in text, text

            imgs = page.locator(".gallery-container img, [data-testid='gallery'] img, .grid-container img")
            imgs.first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            count = imgs.count()
            assert count == N_IMAGES, f"expected {N_IMAGES} images in the gallery, found {count}"
            for i in range(count):
                img = imgs.nth(i)
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
                std = _not_blank(img.screenshot())
                assert std > 10.0, f"image {i} looks blank (pixel std {std:.1f})"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert shot.stat().st_size > 10_000
    if os.environ.get("QUICKSTEP_UPDATE_DOCS") == "1":
        dest = ROOT / "docs" / "images" / "ui.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest)
