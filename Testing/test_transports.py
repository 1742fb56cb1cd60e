"""One request through every engine client (DESIGN.md, "Engine event stream"): in-process, the stdio
worker as a real subprocess, `gem3d serve` on loopback. Same events, same volumes, bit for bit;
and the contract itself: one terminal set, the protocol document in step with `gem3d.events`."""
from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gem3d import events as contract
from gem3d.engine import Engine, InProcessClient
from gem3d.io import read_volume
from gem3d.remote import RemoteClient
from gem3d.worker_client import WorkerClient, environment_with_path, worker_command

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "GEM3D_THREADS": "1"}  # every transport computes with one thread: the same arithmetic
_spec = importlib.util.spec_from_file_location("remote_bench", ROOT / "benchmarks" / "remote.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def run_to_end(client, request: dict, timeout: float = 240.0) -> list:
    job_id = client.submit(request)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.poll(timeout=0.1):
            if event.get("job_id") == job_id and event["event"] not in ("heartbeat", "upload", "queued"):
                seen.append(event)
        if seen and contract.is_terminal(seen[-1]):
            return seen
    raise AssertionError(f"job {job_id} did not end within {timeout:g} s: {[e['event'] for e in seen]}")


def sequence(events: list) -> list:
    """What every transport must agree on: kinds, z-ranges, directions, progress, in order."""
    keys = ("event", "axis", "start", "stop", "direction", "progress")
    return [tuple(e.get(k) for k in keys) for e in events]


def test_one_request_gives_the_same_events_and_volume_on_every_transport(tiny_bundle, brain_phantom, tmp_path):
    def request(name: str, bundle: str) -> dict:
        return {"type": "generate", "job_id": "same", "bundle": bundle,
                "reference": str(brain_phantom / "imagesTr" / "brain_000_0000.nii.gz"),
                "mask": str(brain_phantom / "labelsTr" / "brain_000.nii.gz"),
                "out": str(tmp_path / f"{name}.nii.gz"), "start": 0.5, "seed": 5, "steps": 2, "device": "cpu"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local = InProcessClient(Engine(tiny_bundle, "cpu"))
    try:
        runs = {"in-process": run_to_end(local, request("in-process", str(tiny_bundle)))}
    finally:
        local.close()
        torch.set_num_threads(threads)
    env = environment_with_path(dict(os.environ, **ONE_THREAD, HF_HUB_OFFLINE="1"), [str(ROOT / "GEM3DCore")])
    worker = WorkerClient(worker_command(sys.executable), env=env).start()
    try:
        runs["worker"] = run_to_end(worker, request("worker", str(tiny_bundle)))
    finally:
        worker.close(timeout=30)
    server = bench.ServerProcess([tiny_bundle], env=dict(ONE_THREAD, TMPDIR=str(tmp_path)))
    remote = RemoteClient(server.url)
    try:
        runs["serve"] = run_to_end(remote, request("serve", tiny_bundle.name))
    finally:
        remote.close()
        server.stop()

    expected = runs["in-process"]
    assert [e["event"] for e in expected][0] == "started" and expected[-1]["event"] == "finished", expected[-1]
    assert len([e for e in expected if e["event"] == "window"]) == len(expected[0]["plan"]) >= 2
    for name, events in runs.items():
        assert sequence(events) == sequence(expected), name
        assert events[0]["plan"] == expected[0]["plan"] and events[0]["shape"] == expected[0]["shape"], name
        for event, first in zip(events, expected):
            if first.get("slab") is not None:
                assert event["slab"].dtype == first["slab"].dtype, name
                np.testing.assert_array_equal(event["slab"], first["slab"], err_msg=name)
        written = read_volume(events[-1]["outputs"]["image"]).array
        np.testing.assert_array_equal(written, events[-1]["slab"], err_msg=name)  # the result is the file
    assert not list(tmp_path.glob("*.windows")), "no window side files"


def test_framing_round_trips_events_with_and_without_arrays():
    slab = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    volume = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    sent = [{"event": "started", "job_id": "j", "shape": [3, 4, 5], "axis": 0, "plan": []},
            {"event": "window", "job_id": "j", "axis": 0, "start": 0, "stop": 2, "slab": slab},
            {"event": "finished", "job_id": "j", "outputs": {}, "timings": {}, "slab": volume}]
    stream = io.BytesIO(b"".join(contract.encode_event(e) for e in sent))
    got = list(iter(lambda: contract.read_event(stream), None))
    assert [e["event"] for e in got] == ["started", "window", "finished"]
    np.testing.assert_array_equal(got[1]["slab"], slab)
    assert got[2]["slab"].dtype == np.int16 and np.array_equal(got[2]["slab"], volume)
    with pytest.raises(contract.StreamError, match="middle"):
        contract.read_event(io.BytesIO(contract.encode_event(sent[1])[:-1]))


def test_the_terminal_set_is_defined_once():
    """No copy of ("finished", "cancelled", "error") in the code but gem3d.events (tests may wait for them)."""
    terminal = set(contract.TERMINAL)
    copies = []
    for path in [*ROOT.glob("GEM3DCore/gem3d/**/*.py"), *ROOT.glob("GEM3DEditor/**/*.py"),
                 *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.Set, ast.List)) and len(node.elts) == 3 and \
                    {getattr(e, "value", None) for e in node.elts} == terminal:
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert copies == ["GEM3DCore/gem3d/events.py:" + str(_line_of("TERMINAL = "))], copies


def _line_of(text: str) -> int:
    lines = (ROOT / "GEM3DCore" / "gem3d" / "events.py").read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.startswith(text))


def test_the_protocol_document_lists_every_event_and_field_of_the_contract():
    doc = (ROOT / "docs" / "worker-protocol.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", doc, re.M)}
    assert set(contract.KINDS) <= set(rows), sorted(set(contract.KINDS) - set(rows))
    for kind, fields in contract.FIELDS.items():
        missing = [f for f in ("job_id", *fields) if f"`{f}`" not in rows[kind]]
        assert not missing, (kind, missing)
    assert "`TERMINAL`" in doc and "`EngineClient`" in doc and ".npy" not in doc


def test_the_clients_import_without_torch():
    code = ("import sys\nfor name in ('torch', 'diffusers', 'safetensors'):\n    sys.modules[name] = None\n"
            "import gem3d.events, gem3d.worker_client, gem3d.remote\nprint('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "GEM3DCore"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_developers_guide_lists_every_module():
    guide = (ROOT / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([\w.]+/?)`", guide.split("## Layout", 1)[1].split("## Rules", 1)[0]))
    core = ROOT / "GEM3DCore" / "gem3d"
    modules = {p.name for p in core.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.name + "/" for p in core.iterdir() if p.is_dir() and not p.name.startswith("__")}
    modules |= {p.name for p in (ROOT / "GEM3DEditor" / "GEM3DEditorLib").glob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, sorted(modules - listed)
