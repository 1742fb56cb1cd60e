"""Fault suite, worker side (docs/faults.md): a real `gem3d worker` subprocess fed hostile lines,
EOF and heartbeat semantics, property-based fuzzing of the request parser, and the editor's
client library facing a stalled worker."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gem3d.events import read_event
from gem3d.protocol import JOB_ID, MAX_LINE, TYPES, check_job_id, parse_message
from gem3d.request import GenerateRequest, RequestError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "GEM3DEditor"))
from gem3d.worker_client import WorkerClient  # noqa: E402


class Worker:
    """`gem3d worker` over binary pipes (so that invalid UTF-8 can be sent too)."""

    def __init__(self, bundle, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "gem3d", "worker", "--bundle", str(bundle),
                                      "--device", "cpu", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.events: "queue.Queue" = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for event in iter(lambda: read_event(self.proc.stdout), None):
            self.events.put(event)
        self.events.put(None)

    def send(self, line):
        self.proc.stdin.write((line.encode() if isinstance(line, str) else line) + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout=240):
        event = self.events.get(timeout=timeout)
        assert event is not None, b"".join(self.stderr[-20:]).decode(errors="replace")
        return event

    def answer(self):
        """The next event that is not a heartbeat."""
        event = self.next()
        while event["event"] == "heartbeat":
            event = self.next()
        return event

    def until(self, kinds, timeout=300):
        seen, deadline = [], time.monotonic() + timeout
        while not seen or seen[-1]["event"] not in kinds:
            seen.append(self.next(max(deadline - time.monotonic(), 0.1)))
        return seen

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def request(phantom, out, job_id, **extra):
    return {"type": "generate", "job_id": job_id,
            "reference": str(phantom / "imagesTr" / "brain_000_0000.nii.gz"),
            "mask": str(phantom / "labelsTr" / "brain_000.nii.gz"), "out": str(out), "start": 0.5,
            "seed": 0, "steps": 1, **extra}


@pytest.fixture(scope="module")
def worker(tiny_bundle):
    w = Worker(tiny_bundle, "--heartbeat", "0.1")
    yield w
    w.stop()


def hostile_lines(phantom, out, broken_bundle):
    ok = request(phantom, out, "j")
    deep = "[" * 100000 + "]" * 100000
    return [
        ("not json", "{this is not json", None, "not a JSON line"),
        ("deep nesting (100000)", deep, None, "nests deeper"),
        ("nesting 17 levels", json.dumps({**ok, "edits": [{"a": json.loads("[" * 15 + "]" * 15)}]}), "j",
         "nests deeper"),
        ("line over the size limit", json.dumps({**ok, "out": "x" * (MAX_LINE + 10)}), None, "longer than"),
        ("invalid UTF-8", b'{"type": "generate", "job_id": "\xff\xfe"}', None, "job_id"),
        ("top-level array", "[1, 2]", None, "JSON object"),
        ("top-level number", "42", None, "JSON object"),
        ("unknown type", json.dumps({"type": "explode"}), None, "field 'type'"),
        ("unhashable job id", json.dumps({**ok, "job_id": [1]}), None, "field 'job_id'"),
        ("300-character job id", json.dumps({**ok, "job_id": "a" * 300}), None, "field 'job_id'"),
        ("path-traversal job id", json.dumps({**ok, "job_id": "../../x"}), None, "field 'job_id'"),
        ("cancel with object job id", json.dumps({"type": "cancel", "job_id": {}}), None, "field 'job_id'"),
        ("start is a list", json.dumps({**ok, "start": [1]}), "j", "field 'start'"),
        ("out is a number", json.dumps({**ok, "out": 123}), "j", "field 'out'"),
        ("seed is a string", json.dumps({**ok, "seed": "x"}), "j", "field 'seed'"),
        ("steps is a boolean", json.dumps({**ok, "steps": True}), "j", "field 'steps'"),
        ("steps too many", json.dumps({**ok, "steps": 10 ** 30}), "j", "field 'steps'"),
        ("start is NaN", json.dumps(ok).replace('"start": 0.5', '"start": NaN'), "j", "NaN"),
        ("informed.slice is a string", json.dumps({**ok, "informed": {"slice": "x"}}), "j",
         "field 'informed.slice'"),
        ("unknown key", json.dumps({**ok, "colour": "red"}), "j", "unknown request key"),
        ("NUL in a path", json.dumps({**ok, "mask": "a\x00b"}), "j", "field 'mask'"),
        ("corrupt safetensors bundle", json.dumps({**ok, "bundle": str(broken_bundle)}), "j", "unet.safetensors"),
    ]


def test_no_line_crashes_or_hangs_the_worker(worker, tiny_bundle, brain_phantom, tmp_path):
    broken = Path(shutil.copytree(tiny_bundle, tmp_path / "broken"))
    (broken / "unet.safetensors").write_bytes((broken / "unet.safetensors").read_bytes()[:1000])
    for name, line, job_id, words in hostile_lines(brain_phantom, tmp_path / "x.nii.gz", broken):
        worker.send(line)
        event = worker.answer()
        assert event["event"] == "error", (name, event)
        assert words in event["message"] and "Traceback" not in event["message"], (name, event["message"])
        assert event["job_id"] == job_id, (name, event)
    assert list(tmp_path.iterdir()) == [broken], "no output for a refused request"
    out = tmp_path / "ok.nii.gz"
    worker.send(json.dumps(request(brain_phantom, out, "ok", steps=6)))
    events = worker.until({"finished", "error"})
    assert events[-1]["event"] == "finished", events[-1]
    assert any(e["event"] == "heartbeat" and e["job_id"] == "ok" for e in events), "heartbeats while it runs"
    for e in (e for e in events if e["event"] == "window"):
        assert e["slab"].shape[e["axis"]] == e["stop"] - e["start"], "the slab arrives in-band"
    assert not (tmp_path / "ok.nii.gz.windows").exists(), "no side files"
    assert worker.proc.poll() is None


def test_eof_finishes_the_running_job_and_answers_the_queued_ones(tiny_bundle, brain_phantom, tmp_path):
    w = Worker(tiny_bundle)
    try:
        w.send(json.dumps(request(brain_phantom, tmp_path / "a.nii.gz", "a", sampler="ddim", steps=20)))
        assert w.until({"started", "error"})[-1]["event"] == "started"
        w.send(json.dumps(request(brain_phantom, tmp_path / "b.nii.gz", "b")))
        w.proc.stdin.close()
        events = w.until({"finished", "error"})
        assert events[-1]["event"] == "finished" and events[-1]["job_id"] == "a", events[-1]
        queued = w.answer()
        assert queued["event"] == "error" and queued["job_id"] == "b" and "EOF" in queued["message"]
        assert w.proc.wait(timeout=30) == 0
        assert (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()
    finally:
        w.stop()


def test_one_id_one_job_and_cancelled_ids_are_forgotten(worker, brain_phantom, tmp_path):
    """Failed before: a cancel for an id with no job made a later job of that id end `cancelled` at
    once, a cancelled job's id stayed cancelled for ever, and a second job with a queued or running
    id was run as well."""
    worker.send(json.dumps({"type": "cancel", "job_id": "early"}))  # no such job yet: a no-op
    worker.send(json.dumps(request(brain_phantom, tmp_path / "early.nii.gz", "early")))
    assert worker.until({"finished", "cancelled", "error"})[-1]["event"] == "finished"
    worker.send(json.dumps(request(brain_phantom, tmp_path / "c1.nii.gz", "c", sampler="ddim", steps=400)))
    assert worker.until({"started", "error"})[-1]["event"] == "started"
    worker.send(json.dumps(request(brain_phantom, tmp_path / "c2.nii.gz", "c")))  # the same id, still running
    refused = worker.until({"error", "finished", "cancelled"})[-1]
    assert refused["event"] == "error" and refused["job_id"] == "c", refused
    assert "already queued or running" in refused["message"] and "Traceback" not in refused["message"]
    worker.send(json.dumps({"type": "cancel", "job_id": "c"}))
    assert worker.until({"finished", "cancelled", "error"})[-1]["event"] == "cancelled"
    worker.send(json.dumps(request(brain_phantom, tmp_path / "c3.nii.gz", "c")))  # the id is free again
    events = worker.until({"finished", "cancelled", "error"})
    assert events[-1]["event"] == "finished" and events[-1]["job_id"] == "c", events[-1]
    assert not (tmp_path / "c1.nii.gz").exists() and not (tmp_path / "c2.nii.gz").exists()


# ----------------------------------------------------------------------------- fuzzing the parser
FIELDS = [f for f in GenerateRequest.__dataclass_fields__]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


def assert_answer(result):
    assert isinstance(result, dict)
    if result.get("event") == "error":
        assert isinstance(result["message"], str) and result["message"]
        assert result["job_id"] is None or JOB_ID.match(result["job_id"])
    else:
        assert result["type"] in TYPES and JOB_ID.match(result["job_id"])
        if result["type"] == "generate":
            assert isinstance(result["request"], GenerateRequest)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_fuzz_any_text_is_an_answer(line):
    assert_answer(parse_message(line))


@settings(max_examples=60, deadline=None)
@given(JSON)
def test_fuzz_any_json_is_an_answer(value):
    assert_answer(parse_message(json.dumps(value)))


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["type", "bogus"]), JSON, max_size=6))
def test_fuzz_request_fields_of_any_type(fields):
    message = {"type": "generate", "reference": "r.nii.gz", "mask": "m.nii.gz", "out": "o.nii.gz", **fields}
    result = parse_message(json.dumps(message))
    assert_answer(result)
    if result.get("event") == "error" and isinstance(message.get("type"), str) and message["type"] == "generate":
        named = [k for k in message if f"'{k}" in result["message"] or k in result["message"]]
        assert named, result["message"]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_job_ids_never_escape_a_folder(job_id):
    try:
        safe = check_job_id(job_id)
    except RequestError:
        return
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and len(safe) <= 64


# ----------------------------------------------------------------------------- client library
SILENT_WORKER = "import sys, time\nsys.stdin.readline()\ntime.sleep(120)\n"


def client_request(tmp_path, job_id="j1"):
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "bundle.json").write_text("{}")
    for name in ("reference.nrrd", "mask.nrrd"):
        (tmp_path / name).write_bytes(b"x")
    return {"type": "generate", "job_id": job_id, "bundle": str(bundle), "reference": str(tmp_path / "reference.nrrd"),
            "mask": str(tmp_path / "mask.nrrd"), "out": str(tmp_path / "out.nii.gz"), "seed": 0, "device": "auto",
            "edits": [], "informed": {"source": "same", "scan": None, "slice": None, "position": None}}


def wait_for(client, kinds, timeout):
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += client.poll(timeout=0.1)
        if events and events[-1]["event"] in kinds:
            return events
    raise AssertionError(f"no {kinds} within {timeout} s: {events}")


def test_client_reports_a_stalled_worker_as_an_error(tmp_path):
    client = WorkerClient([sys.executable, "-c", SILENT_WORKER], stall_timeout=1.0).start()
    try:
        job = client.submit(client_request(tmp_path))
        started = time.monotonic()
        events = wait_for(client, ("error",), timeout=15)
        assert time.monotonic() - started < 10
        assert events[-1]["job_id"] == job and "stuck" in events[-1]["message"]
        deadline = time.monotonic() + 10
        while client.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.running and client.active_jobs == []
        time.sleep(0.3)
        assert client.poll() == [], "one error per job, no second report of the kill"
    finally:
        client.kill()
        client.close(timeout=2)


@pytest.mark.parametrize("job_id", [7, None, ["x"]])
def test_client_side_problems_are_events_not_exceptions(tmp_path, job_id):
    client = WorkerClient([sys.executable, "-c", SILENT_WORKER])
    bad = dict(client_request(tmp_path), job_id=job_id)
    assert client.submit(bad) is None  # not started, and an invalid request: events only
    event = client.poll(timeout=1)[0]
    assert event["event"] == "error" and event["job_id"] is None and "job_id" in event["message"]
    assert client.submit(client_request(tmp_path, "ok")) == "ok"  # the worker is not running
    event = client.poll(timeout=1)[0]
    assert event["event"] == "error" and event["job_id"] == "ok" and "not running" in event["message"]
