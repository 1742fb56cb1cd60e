"""The README's browser-editor screenshot: gem3d-web with the demo bundle, the sample phantom, a
Generate caught after its first windows arrived and before the end (Debian chromium, Playwright).

  python Resources/Screenshots/make_web_screenshot.py
"""
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing"))

from web_fixtures import CHROMIUM, CHROMIUM_ARGS, WebServer, load_sample, open_page  # noqa: E402


def main() -> int:
    from playwright.sync_api import sync_playwright

    out = Path(__file__).with_name("GEM3DWeb-1.png")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        server = WebServer(Path(tmp), token=False)
        try:
            page = open_page(browser, server.url)
            load_sample(page)
            page.fill("#steps", "60")
            page.click("#generate")
            deadline = time.time() + 300
            while time.time() < deadline:
                windows = int(page.inner_text("#windows").split()[0])
                if windows >= 1:
                    time.sleep(1.0)  # the views' images follow the state
                    page.screenshot(path=str(out))
                    break
                time.sleep(0.1)
            print(out, page.inner_text("#windows"))
        finally:
            server.stop()
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
