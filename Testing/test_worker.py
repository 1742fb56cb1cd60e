"""`gem3d worker` as a real subprocess speaking its protocol (JSON lines in, `gem3d.events` frames out)."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gem3d.events import read_event
from gem3d.io import read_volume


class WorkerProcess:
    def __init__(self, bundle):
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "gem3d", "worker", "--bundle", str(bundle),
                                      "--device", "cpu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        self.events: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for event in iter(lambda: read_event(self.proc.stdout), None):
            self.events.put(event)
        self.events.put(None)

    def send(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout=120):
        return self.events.get(timeout=timeout)

    def until(self, kinds, timeout=120):
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(deadline - time.monotonic(), 0.1))
            assert event is not None, f"worker exited; events so far: {seen}"
            if event["event"] == "heartbeat":
                continue
            seen.append(event)
            if event["event"] in kinds:
                return seen


def request(phantom, out, job_id, **extra):
    return json.dumps({"type": "generate", "job_id": job_id,
                       "reference": str(phantom / "imagesTr" / "brain_000_0000.nii.gz"),
                       "mask": str(phantom / "labelsTr" / "brain_000.nii.gz"),
                       "out": str(out), "start": 0.5, "seed": 0, **extra})


@pytest.fixture
def worker(tiny_bundle):
    w = WorkerProcess(tiny_bundle)
    yield w
    if w.proc.poll() is None:
        w.proc.kill()
    w.proc.wait(timeout=10)


def test_streams_windows_then_finishes_and_eof_exits_cleanly(worker, brain_phantom, tmp_path):
    out = tmp_path / "a.nii.gz"
    worker.send(request(brain_phantom, out, "a", steps=2))
    events = worker.until({"finished", "error"})
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", events[-1]
    windows = [e for e in events if e["event"] == "window"]
    assert len(windows) >= 2
    output = read_volume(out).array
    assembled = np.full(output.shape, np.nan, np.float32)   # in order, each slab over the earlier ones
    for w in windows:
        index = [slice(None)] * 3
        index[w["axis"]] = slice(w["start"], w["stop"])
        assembled[tuple(index)] = w["slab"]
    np.testing.assert_allclose(assembled, output, atol=1e-4)
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=30) == 0


def test_cancel_mid_job(worker, brain_phantom, tmp_path):
    out = tmp_path / "c.nii.gz"
    worker.send(request(brain_phantom, out, "c", sampler="ddim", steps=400))
    worker.until({"started"})
    worker.send(json.dumps({"type": "cancel", "job_id": "c"}))
    events = worker.until({"cancelled", "finished", "error"}, timeout=60)
    assert events[-1]["event"] == "cancelled", events[-1]
    assert not out.exists()


def test_malformed_line_then_valid_request(worker, brain_phantom, tmp_path):
    worker.send("{this is not json")
    error = worker.until({"error"})[-1]
    assert error["event"] == "error" and "JSON" in error["message"]
    worker.send(json.dumps({"type": "generate", "job_id": "x", "reference": "r.nii.gz"}))
    error = worker.next()
    assert error["event"] == "error" and error["job_id"] == "x" and "mask" in error["message"]
    out = tmp_path / "ok.nii.gz"
    worker.send(request(brain_phantom, out, "ok", steps=1))
    assert worker.until({"finished", "error"})[-1]["event"] == "finished"
    assert out.exists()
