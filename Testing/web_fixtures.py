"""A real `gem3d-web` server on loopback and Debian's chromium driven by Playwright (no browser
download: executable_path is the system's chromium, installed by the README's test command)."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for _part in ("GEM3DEditor", "GEM3DWeb"):  # importable without an install, as mrml_fixtures does
    if str(ROOT / _part) not in sys.path:
        sys.path.insert(0, str(ROOT / _part))
from gem3d.processes import terminate  # noqa: E402
DEMO_BUNDLE = ROOT / "GEM3DCore" / "gem3d" / "resources" / "demo_bundle"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TOKEN = "web-test-token-0123456789"


def free_ports(count: int) -> list:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def web_available() -> str:
    """Why the browser tests cannot run here ('' when they can): the [web] extra or chromium missing."""
    try:
        import playwright  # noqa: F401
        import trame_slicer  # noqa: F401
    except ImportError as e:
        return f"the [web] extra is not installed ({e.name}): pip install -e '.[test,web]'"
    if not os.path.isfile(CHROMIUM):
        return "chromium is not installed: apt-get install -y chromium"
    return ""


class WebServer:
    """`python -m gem3d_web` in a subprocess; the address comes from the line it prints when ready."""

    def __init__(self, tmp: Path, *extra: str, token: bool = True):
        if web_available():
            pytest.fail(web_available())  # never skipped: CI installs the extra and chromium
        self.log = tmp / "server.log"
        args = [sys.executable, "-m", "gem3d_web", "--bundle", str(DEMO_BUNDLE), *extra]
        if "--sessions" not in extra:
            args += ["--sessions", "0", "--port", "0"]
        if token:
            token_file = tmp / "token"
            token_file.write_text(TOKEN)
            args += ["--token-file", str(token_file)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "GEM3DCore"), str(ROOT / "GEM3DEditor"),
                                               str(ROOT / "GEM3DWeb")]))
        self.process = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                        cwd=str(tmp))
        deadline = time.time() + 90
        while time.time() < deadline and self.process.poll() is None:
            found = re.search(r"gem3d-web: open (http://\S+)", self.log.read_text())
            if found:
                self.url = found.group(1)
                self.base = self.url.split("?")[0]
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gem3d-web did not start:\n{self.log.read_text()}")

    def session_processes(self) -> list:
        """Process ids of the session processes this server's launcher started."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "--", "--session-key"],
                               capture_output=True, text=True).stdout.split()
        return [int(p) for p in found]

    def stop(self) -> None:
        terminate(self.process, timeout=15)


@pytest.fixture(scope="module")
def browser():
    reason = web_available()
    if reason:
        pytest.fail(reason)  # never skipped: CI installs the extra and chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("#sample", timeout=60000)
    return page


def wait_text(page, selector: str, needle: str, timeout_s: float = 60.0) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = page.inner_text(selector)
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{selector} never showed {needle!r}; it shows {page.inner_text(selector)!r}")


def mask_voxels(page) -> int:
    return int(re.search(r"\((\d+) mapped", page.inner_text("#mask_voxels")).group(1))


def lesion_centre(page) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"-?\d+\.?\d*", page.inner_text("#lesion_centre"))[:3]])


def axial_pixels(page) -> np.ndarray:
    """The axial view as the browser shows it (RGB)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#views img:visible").first.screenshot())).convert("RGB"),
                      dtype=np.float32)


def load_sample(page) -> None:
    page.click("#sample")
    wait_text(page, "#status", "Sample phantom loaded")
    deadline = time.time() + 10
    while mask_voxels(page) == 0 and time.time() < deadline:
        time.sleep(0.1)
