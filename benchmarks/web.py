"""The browser editor, timed in Debian's chromium (Playwright), for each engine:

- server start: `gem3d-web` (wslink's launcher) spawned -> its address printed;
- session start: a page opened -> its session process started and the page drawn (first and second page);
- click -> first window painted: Generate clicked -> the axial view in the browser shows generated voxels
  (pixel check, as in Testing/test_web_browser.py), cold (engine starting) and warm (engine kept);
- memory: resident set of a session process with the sample loaded (idle), and of the session with its
  engine after a generation (active; the local worker is the session's child, `gem3d serve` is shared and
  reported once).

Engines: the local `gem3d worker` per session, and a `gem3d serve` on loopback shared by all sessions.

  python benchmarks/web.py                          # demo bundle, 10 steps
  python benchmarks/web.py --smoke --out-dir /tmp/web   # 2 steps, local engine only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "Testing"))

from remote import ServerProcess, machine  # noqa: E402
from web_fixtures import (CHROMIUM, CHROMIUM_ARGS, DEMO_BUNDLE, WebServer, axial_pixels, free_ports,  # noqa: E402
                          load_sample, open_page)


def rss_mb(pid: int, children: bool = False) -> float:
    """Resident memory of a process (and, optionally, of its children), in MB."""
    pids = [pid]
    if children:
        pids += [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024.0


def first_window(page, steps: int, seed: int) -> float:
    """Seconds from the Generate click to generated voxels in the browser's axial view (another seed than
    the last run's, so that the new window differs from what was shown); waits for the end."""
    before = axial_pixels(page)
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    t0 = time.perf_counter()
    page.click("#generate")
    painted = None
    while time.perf_counter() - t0 < 300:
        shown = axial_pixels(page)
        grey = (np.ptp(shown, axis=2) < 12) & (shown.mean(axis=2) > 40)
        if grey.mean() > 0.05 and np.abs(shown - before).mean() > 3.0:
            painted = time.perf_counter() - t0
            break
        time.sleep(0.05)
    page.wait_for_function("() => document.querySelector('#windows').textContent.includes('100 %')",
                           timeout=300000)
    if painted is None:
        raise RuntimeError("the axial view never showed a generated window")
    return painted


def run_engine(browser, name: str, steps: int, work: Path, extra=()) -> dict:
    port, session_port = free_ports(2)
    t0 = time.perf_counter()
    server = WebServer(work, "--sessions", "2", "--port", str(port), "--session-port", str(session_port), *extra)
    row = {"engine": name, "server_start_s": time.perf_counter() - t0}
    try:
        t0 = time.perf_counter()
        page = open_page(browser, server.url)
        row["session_start_s"] = time.perf_counter() - t0
        load_sample(page)
        session = server.session_processes()[0]
        row["idle_session_mb"] = rss_mb(session)
        row["first_window_cold_s"] = first_window(page, steps, seed=1)
        row["first_window_warm_s"] = first_window(page, steps, seed=2)
        row["active_session_mb"] = rss_mb(session, children=True)
        t0 = time.perf_counter()
        second = open_page(browser, server.url)
        row["second_session_start_s"] = time.perf_counter() - t0
        row["empty_session_mb"] = rss_mb(next(p for p in server.session_processes() if p != session))
        second.close()
        page.close()
    finally:
        server.stop()
    return row


COLUMNS = [("engine", "engine", "{}"), ("server_start_s", "server start (s)", "{:.1f}"),
           ("session_start_s", "session start (s)", "{:.1f}"),
           ("second_session_start_s", "2nd session start (s)", "{:.1f}"),
           ("first_window_cold_s", "click -> 1st window, cold (s)", "{:.1f}"),
           ("first_window_warm_s", "click -> 1st window, warm (s)", "{:.1f}"),
           ("empty_session_mb", "empty session (MB)", "{:.0f}"), ("idle_session_mb", "idle session (MB)", "{:.0f}"),
           ("active_session_mb", "active session (MB)", "{:.0f}"), ("engine_mb", "shared engine (MB)", "{:.0f}")]


def table(rows, info, steps) -> str:
    lines = [f"# Browser editor ({info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'})", "",
             f"Demo bundle, sample phantom 64x64x16, {steps} sampler steps, Debian chromium headless; "
             "memory = resident set (VmRSS).", "",
             "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS) + " |")
    if len(rows) == 2:
        ratio = rows[1]["first_window_warm_s"] / rows[0]["first_window_warm_s"]
        lines += ["", f"Warm click -> first window, `gem3d serve` / local worker: {ratio:.2f} (same run)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2 steps, local engine only")
    parser.add_argument("--out-dir", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="gem3d-web-bench-") as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            rows.append(run_engine(browser, "local worker", steps, Path(tmp)))
            if not args.smoke:
                engine = ServerProcess([DEMO_BUNDLE])
                try:
                    row = run_engine(browser, "gem3d serve", steps, Path(tmp), ["--engine", engine.url])
                    row["engine_mb"] = rss_mb(engine.process.pid, children=True)
                    rows.append(row)
                finally:
                    engine.stop()
        finally:
            browser.close()
    info = machine()
    name = "web_smoke" if args.smoke else "web"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, info, steps)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "steps": steps, "runs": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
