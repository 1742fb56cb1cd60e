"""`gem3d serve` as a real server on loopback, and gem3d.remote.RemoteClient against it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from gem3d.io import read_description, read_volume
from gem3d.events import TERMINAL

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "GEM3DCore" / "gem3d" / "resources" / "demo_bundle"
TOKEN = "test-token-0123456789abcdef"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the 2 shared cores: one thread per process is fastest
_spec = importlib.util.spec_from_file_location("remote_bench", ROOT / "benchmarks" / "remote.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def client(url, token=TOKEN, **kw):
    from gem3d.remote import RemoteClient

    return RemoteClient(url, token, **kw)


def run(c, request, timeout=120):
    from gem3d.remote import run_job

    start = time.monotonic()
    end, events = run_job(c, request)
    assert time.monotonic() - start < timeout
    return end, events


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, brain_phantom):
    """The server's --data-root: one case, and a link that points out of it."""
    root = tmp_path_factory.mktemp("data_root")
    (root / "cases").mkdir()
    for src, name in ((brain_phantom / "imagesTr" / "brain_000_0000.nii.gz", "scan.nii.gz"),
                      (brain_phantom / "labelsTr" / "brain_000.nii.gz", "mask.nii.gz")):
        (root / "cases" / name).write_bytes(src.read_bytes())
    (root / "escape.nii.gz").symlink_to(brain_phantom / "imagesTr" / "brain_001_0000.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(tiny_bundle, data_root, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    temp = tmp_path_factory.mktemp("server_temp")
    s = bench.ServerProcess([tiny_bundle, DEMO_BUNDLE], "--token-file", str(token_file), "--data-root",
                            str(data_root), "--max-upload-mb", "1", "--max-jobs-per-client", "3",
                            "--keep-results", "120", env=dict(ONE_THREAD, TMPDIR=str(temp)))
    assert [p.name[:12] for p in temp.iterdir()] == ["gem3d-serve-"]  # its work folder: uploads, results
    yield s
    s.stop()
    log = s.output()
    assert TOKEN not in log and "brain_000" not in log and "scan.nii.gz" not in log, log
    assert list(temp.iterdir()) == [], "a stopped server must not leave uploaded scans in the temp folder"


def tiny_request(phantom, out, job_id="j", **extra):
    return {"type": "generate", "job_id": job_id, "bundle": "tiny",
            "reference": str(phantom / "imagesTr" / "brain_000_0000.nii.gz"),
            "mask": str(phantom / "labelsTr" / "brain_000.nii.gz"), "out": str(out), "start": 0.5, "seed": 0,
            "steps": 1, **extra}


def http(server, token=TOKEN, client_id="pytest"):
    headers = {"X-GEM3D-Client": client_id}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_help_and_no_public_host_without_token():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    shown = subprocess.run([sys.executable, "-m", "gem3d", "serve", "--help"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert shown.returncode == 0 and "--token-file" in shown.stdout and "--data-root" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "gem3d", "serve", "--host", "0.0.0.0"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "without a token" in refused.stderr


def test_client_imports_without_torch():
    code = "import sys, gem3d.remote; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_and_wrong_token(server, brain_phantom, tmp_path):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for token, words in ((None, "needs a token"), ("wrong-token", "token was refused")):
        with http(server, token) as h:
            for method, path in (("GET", "/v1/bundles"), ("POST", "/v1/jobs"), ("POST", "/v1/uploads")):
                response = h.request(method, path)
                assert response.status_code == 401 and words in response.json()["error"]
                assert response.headers["www-authenticate"] == "Bearer"
    with http(server) as h:
        names = {b["name"]: b for b in h.get("/v1/bundles").json()}
    assert set(names) == {"tiny", "demo_bundle"} and names["tiny"]["window_length"] == 4
    checked = client(server.url, "wrong-token").check()
    assert not checked["ok"] and "token" in checked["message"]
    end, events = run(client(server.url, "wrong-token"), tiny_request(brain_phantom, tmp_path / "o.nii.gz"))
    assert end["event"] == "error" and "token" in end["message"] and len(events) == 1


def test_unreachable_server_is_an_error_event(brain_phantom, tmp_path):
    url = f"http://127.0.0.1:{bench.free_port()}"
    assert "refused" in client(url).check()["message"]
    end, _ = run(client(url), tiny_request(brain_phantom, tmp_path / "o.nii.gz"), timeout=20)
    assert end["event"] == "error" and "connection was refused" in end["message"]


def test_demo_job_equals_local_generation(server, tmp_path):
    """The README's demo job through the server: the reference's geometry, the same voxels as
    Engine.generate in this process with the same seed, streamed windows equal to the output."""
    from gem3d import phantom
    from gem3d.demo import COUNTERFACTUAL
    from gem3d.engine import Engine
    from gem3d.request import GenerateRequest

    data = tmp_path / "phantom"
    phantom.write_dataset(data, "brain", cases=1, size=64, slices=24, seed=0)
    reference, mask = data / "imagesTr" / "brain_000_0000.nii.gz", data / "labelsTr" / "brain_000.nii.gz"
    request = {"type": "generate", "job_id": "demo", "bundle": str(DEMO_BUNDLE), "reference": str(reference),
               "mask": str(mask), "edits": list(COUNTERFACTUAL), "start": 0.5, "seed": 3, "steps": 4,
               "out": str(tmp_path / "remote.nii.gz"), "mask_out": str(tmp_path / "remote_mask.nii.gz")}
    c = client(server.url)
    end, events = run(c, request)
    assert end["event"] == "finished", end
    kinds = [e["event"] for e in events]
    assert kinds[0] == "upload" and kinds.index("queued") < kinds.index("started") < kinds.index("window")
    uploads = [e for e in events if e["event"] == "upload"]
    assert uploads[-1]["done"] == uploads[-1]["total"] == reference.stat().st_size + mask.stat().st_size
    assert end["outputs"] == {"image": request["out"], "mask": request["mask_out"],
                              "provenance": str(tmp_path / "remote.provenance.json")}

    local = dict(request, out=str(tmp_path / "local.nii.gz"), mask_out=None)
    local.pop("type")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs: the same thread count, the same arithmetic
    try:
        finished = list(Engine(DEMO_BUNDLE, "cpu").generate(GenerateRequest.from_dict(local)))[-1]
    finally:
        torch.set_num_threads(threads)
    assert finished["event"] == "finished", finished
    remote, ref, expected = (read_volume(p) for p in (request["out"], reference, local["out"]))
    assert remote.shape == ref.shape and remote.geometry.allclose(ref.geometry)
    np.testing.assert_array_equal(remote.array, expected.array)
    assert "SYNTHETIC" in read_description(request["out"])
    assert json.loads(Path(end["outputs"]["provenance"]).read_text())["synthetic"] is True
    windows = [e for e in events if e["event"] == "window"]
    assert len(windows) == len(events[kinds.index("started")]["plan"])
    assembled = np.full(remote.shape, np.nan, np.float32)   # in order, last write wins: a window's
    for w in windows:                                        # edge slice is sent again by the next one
        index = [slice(None)] * 3
        index[w["axis"]] = slice(w["start"], w["stop"])
        assembled[tuple(index)] = w["slab"]
    np.testing.assert_allclose(assembled, remote.array, atol=1e-4)


def test_the_editors_remote_engine_runs_a_job_and_keeps_the_token_out_of_the_settings_key(
        server, brain_phantom, tmp_path):
    """The RemoteClient the module uses when an engine server is set, end to end, its events read by
    the module's own job reducer; a wrong token ends the job with a sentence."""
    sys.path.insert(0, str(ROOT / "GEM3DEditor"))
    from GEM3DEditorLib.job import JobState, reduce
    from GEM3DEditorLib.settings import EngineSettings

    for token, out in ((TOKEN, tmp_path / "remote.nii.gz"), ("wrong-token-0123456789", tmp_path / "no.nii.gz")):
        engine = client(server.url, token)
        try:
            job_id = engine.submit(tiny_request(brain_phantom, out, job_id="editor"))
            state, kinds, deadline = JobState(job_id), [], time.monotonic() + 120
            while not state.done and time.monotonic() < deadline:
                for event in engine.poll():
                    kinds.append(event["event"])
                    state = reduce(state, event)
                time.sleep(0.05)
        finally:
            engine.close()
        assert state.done, kinds
        if token == TOKEN:
            assert "upload" in kinds and kinds.count("window") == state.windows == state.planned_windows >= 1
            assert state.error is None and Path(state.outputs["image"]).is_file()
            assert read_description(state.outputs["image"]).startswith("SYNTHETIC")
        else:
            assert state.error and "token" in state.error.lower() and not out.exists()
    local, remote = EngineSettings(), EngineSettings(server_url=server.url, server_token=TOKEN)
    assert local.engine_key != remote.engine_key and TOKEN not in repr(EngineSettings(server_url=server.url))


def first_event(c, kinds, deadline: float):
    """The first event of one of `kinds` that client `c` reports before `deadline` (monotonic), or None."""
    while time.monotonic() < deadline:
        event = next((e for e in c.poll(timeout=0.2) if e["event"] in kinds), None)
        if event is not None:
            return event
    return None


def test_cancel_mid_job(server, brain_phantom, tmp_path):
    c = client(server.url)
    out = tmp_path / "c.nii.gz"
    job = c.submit(tiny_request(brain_phantom, out, "c", sampler="ddim", steps=400))
    deadline = time.monotonic() + 60
    assert first_event(c, ("started",), deadline) is not None
    c.cancel(job)
    end = first_event(c, TERMINAL, deadline)
    assert end is not None and end["event"] == "cancelled", end
    assert not out.exists() and c.active_jobs == []


def test_server_killed_mid_job_is_an_error_event(tiny_bundle, brain_phantom, tmp_path):
    s = bench.ServerProcess([tiny_bundle], env=dict(ONE_THREAD, TMPDIR=str(tmp_path)))  # SIGKILL: no clean-up
    try:
        c = client(s.url, None)
        job = c.submit(tiny_request(brain_phantom, tmp_path / "k.nii.gz", "k", sampler="ddim", steps=400))
        deadline = time.monotonic() + 60
        first_event(c, ("started",), deadline)
        s.process.kill()
        s.process.wait()
        end = first_event(c, TERMINAL, deadline)
    finally:
        s.stop()
    assert end is not None and end["event"] == "error" and end["job_id"] == job, end
    assert "lost" in end["message"] and s.url in end["message"]


def test_server_stopped_mid_job_cancels_it_and_removes_its_work_folder(tiny_bundle, brain_phantom, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    s = bench.ServerProcess([tiny_bundle], env=dict(ONE_THREAD, TMPDIR=str(temp)))
    try:
        c = client(s.url, None)
        c.submit(tiny_request(brain_phantom, tmp_path / "t.nii.gz", "t", sampler="ddim", steps=400))
        deadline = time.monotonic() + 60
        first_event(c, ("started",), deadline)
        assert [p.name[:12] for p in temp.iterdir()] == ["gem3d-serve-"]
        s.process.terminate()
        end = first_event(c, TERMINAL, deadline)
        code = s.process.wait(timeout=30)
    finally:
        s.stop()
    log = s.output()
    assert code == 0 and "stopped by SIGTERM" in log and "Traceback" not in log, log
    assert end is not None and end["event"] == "cancelled", end
    assert list(temp.iterdir()) == [] and not (tmp_path / "t.nii.gz").exists()


def test_malformed_and_oversized_uploads_and_requests(server, brain_phantom, tmp_path):
    scan = (brain_phantom / "imagesTr" / "brain_000_0000.nii.gz").read_bytes()
    with http(server) as h:
        def upload(body, suffix=".nii.gz"):
            response = h.post("/v1/uploads", params={"suffix": suffix}, content=body)
            return response.status_code, response.json()

        status, body = upload(scan)
        assert status == 201 and body["shape"] == [12, 32, 32]
        upload_id = body["upload_id"]
        for body, suffix, code, words in ((b"not a volume at all", ".nii.gz", 400, "not a readable"),
                                          (b"", ".nii.gz", 400, "empty"),
                                          (scan, ".exe", 400, ".nii.gz"),
                                          (os.urandom(int(1.5 * 2**20)), ".nii.gz", 413, "limit of 1.0 MiB")):
            status, answer = upload(body, suffix)
            assert status == code and words in answer["error"], answer

        def submit(payload):
            response = h.post("/v1/jobs", **({"content": payload} if isinstance(payload, bytes) else {"json": payload}))
            return response.status_code, response.json().get("error", "")

        status, error = submit(b"{not json")
        assert status == 400 and "not JSON" in error
        ok = {"reference": f"upload:{upload_id}", "mask": f"upload:{upload_id}", "bundle": "tiny"}
        for bad, words in ((dict(ok, colour="red"), "unknown request key"),
                           (dict(ok, bundle="nope"), "unknown bundle"),
                           (dict(ok, mask="upload:0123"), "unknown or expired upload"),
                           (dict(ok, device="cuda:7"), "not served here"),
                           (dict(ok, out="x.exe"), "out must end in"),
                           (dict(ok, steps=0), "steps must be"),
                           (dict(ok, start=[1]), "field 'start'"),  # the worker's type checks apply
                           (dict(ok, seed="x"), "field 'seed'"),
                           ({"mask": ok["mask"]}, "needs 'reference'"),
                           ([1, 2], "JSON object")):
            status, error = submit(bad)
            assert status == 400 and words in error, (bad, error)
        assert h.get("/v1/jobs/0000/events").status_code == 404
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(int(1.5 * 2**20)))
    end, _ = run(client(server.url), dict(tiny_request(brain_phantom, tmp_path / "o.nii.gz"), reference=str(big)))
    assert end["event"] == "error" and "upload limit" in end["message"]


def test_paths_confined_to_the_data_root(server, data_root, brain_phantom, tmp_path):
    with http(server) as h:
        for path in ("../escape.nii.gz", "cases/../../etc/passwd", "/etc/passwd", "escape.nii.gz",
                     str(brain_phantom / "labelsTr" / "brain_000.nii.gz")):
            response = h.post("/v1/jobs", json={"reference": path, "mask": "cases/mask.nii.gz", "bundle": "tiny"})
            assert response.status_code == 400 and "outside the server's data root" in response.json()["error"], path
        response = h.post("/v1/jobs", json={"reference": "cases/none.nii.gz", "mask": "cases/mask.nii.gz"})
        assert response.status_code == 400 and "no such file" in response.json()["error"]
    request = tiny_request(brain_phantom, tmp_path / "d.nii.gz", "d", reference="server:cases/scan.nii.gz",
                           mask=str(data_root / "cases" / "mask.nii.gz"))
    end, events = run(client(server.url), request)
    assert end["event"] == "finished", end
    assert sum(e["event"] == "upload" for e in events) == 1  # only the mask travelled
    assert read_volume(tmp_path / "d.nii.gz").shape == (12, 32, 32)


def test_jobs_per_client_limit(server, data_root):
    job = {"reference": "cases/scan.nii.gz", "mask": "cases/mask.nii.gz", "bundle": "tiny", "sampler": "ddim",
           "steps": 400}
    with http(server, client_id="greedy") as h:
        ids = [h.post("/v1/jobs", json=job).json()["job_id"] for _ in range(3)]
        response = h.post("/v1/jobs", json=job)
        assert response.status_code == 429 and "--max-jobs-per-client 3" in response.json()["error"]
        with http(server, client_id="other") as h2:
            assert h2.get("/v1/info").json()["limits"]["max_jobs_per_client"] == 3
        for job_id in ids:
            assert h.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(h.get(f"/v1/jobs/{i}").json()["state"] != "cancelled" for i in ids):
            time.sleep(0.2)
        states = [h.get(f"/v1/jobs/{i}").json() for i in ids]
        assert [s["state"] for s in states] == ["cancelled"] * 3, states


def test_load_8_clients_x_3_jobs(server, brain_phantom, tmp_path):
    """Every job finishes and each window of its plan arrives exactly once."""
    result = bench.load_test(server.url, TOKEN, lambda c, j: tiny_request(
        brain_phantom, tmp_path / f"l{c}_{j}.nii.gz", f"c{c}j{j}"), clients=8, jobs=3, timeout_s=240)
    print(f"\nload 8x3: time to first window p50 {result['first_window_p50_s']:.2f} s, "
          f"p95 {result['first_window_p95_s']:.2f} s, {result['jobs_per_minute']:.0f} jobs/min")
    assert result["jobs"] == 24
    assert result["finished"] == 24, [r.get("message") for r in result["records"] if r["terminal"] != "finished"]
    assert result["windows_exact"] == 24
    assert all(Path(tmp_path / f"l{c}_{j}.nii.gz").is_file() for c in range(8) for j in range(3))


def test_results_expire_after_keep_s(tmp_path):
    """Ended jobs and uploads are deleted keep_s seconds after they end, not before; running ones stay."""
    from gem3d.jobs import Job, JobStore, Upload
    from gem3d.request import GenerateRequest

    now = [1000.0]
    store = JobStore(tmp_path, [], keep_s=60, max_jobs_per_client=1, max_queued=1, clock=lambda: now[0])
    jobs = []
    for _ in range(2):
        job_id, folder = store.new_job_folder()
        job = Job(job_id, "c", "cpu", "tiny", GenerateRequest(reference="r", mask="m", out="o"), folder)
        store.jobs[job_id] = job
        jobs.append(job)
    (jobs[0].folder / "synthetic.nii.gz").write_bytes(b"x")
    jobs[0].add({"event": "finished", "outputs": {"image": str(jobs[0].folder / "synthetic.nii.gz")}}, 60)
    jobs[0].add({"event": "error", "message": f"{jobs[0].folder}/input_mask.nii.gz: bad"}, 60)
    assert jobs[0].events[-1]["message"] == "input_mask.nii.gz: bad"
    assert jobs[0].events[0]["outputs"] == {"image": f"/v1/jobs/{jobs[0].id}/outputs/image"}
    jobs[0].ended = now[0]
    upload_id, path = store.new_upload_path(".nii.gz")
    path.write_bytes(b"x")
    store.add_upload(Upload(upload_id, "c", path, created=now[0]))
    now[0] += 59
    assert store.expire() == 0 and jobs[0].folder.is_dir() and path.is_file()
    now[0] += 2
    assert store.expire() == 2
    assert not jobs[0].folder.exists() and not path.exists() and store.job(jobs[0].id) is None
    assert store.job(jobs[1].id) is jobs[1] and jobs[1].folder.is_dir()


@pytest.mark.slow
def test_remote_benchmark_smoke_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remote.py"), "--smoke", "--out-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "remote_smoke.json").read_text())
    assert report["remote_output_equals_local"] and report["load"]["finished"] == report["load"]["jobs"] == 4
    assert "Remote / local" in (tmp_path / "remote_smoke.md").read_text()


def test_a_job_request_body_is_bounded_by_the_upload_limit(server):
    """Failed before: POST /v1/jobs read a body of any size (the server's limit is 1 MiB here)."""
    with http(server) as h:
        huge = b'{"reference": "' + b"x" * int(1.5 * 2**20) + b'"}'
        response = h.post("/v1/jobs", content=huge)
        assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"], response.text


def test_a_client_dropping_mid_upload_is_one_log_line(server):
    """Failed before: the cut-off upload left a traceback in the server's log."""
    import socket
    from urllib.parse import urlsplit

    before = server.output()
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"POST /v1/uploads?suffix=.nii.gz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: 500000\r\n\r\n".encode() + b"x" * 1000)
    deadline = time.monotonic() + 10
    while "cut off" not in server.output()[len(before):] and time.monotonic() < deadline:
        time.sleep(0.1)
    added = server.output()[len(before):]
    assert added.count("cut off") == 1 and "Traceback" not in added, added


def test_a_killed_servers_work_folder_is_swept_at_the_next_start(tiny_bundle, tmp_path):
    """Failed before: a SIGKILLed server left its work folder (patients' uploads) for ever."""
    first = bench.ServerProcess([tiny_bundle], env=dict(ONE_THREAD, TMPDIR=str(tmp_path)))
    first.process.kill()
    first.process.wait()
    (stale,) = tmp_path.iterdir()
    (stale / "uploads" / "scan.nii.gz").write_bytes(b"a patient")
    alive = tmp_path / f"gem3d-serve-{os.getpid()}-other"  # a running server's folder stays
    alive.mkdir()
    second = bench.ServerProcess([tiny_bundle], env=dict(ONE_THREAD, TMPDIR=str(tmp_path)))
    try:
        folders = sorted(p.name for p in tmp_path.iterdir())
    finally:
        second.stop()
    assert not stale.exists() and alive.name in folders and len(folders) == 2, folders
    assert "removed the work folder of a stopped server" in second.output()
