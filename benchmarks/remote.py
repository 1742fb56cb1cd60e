"""Remote vs local generation, and `gem3d serve` under load, on one machine.

1. The demo job (README: a phantom brain, tumour moved clear of where it was, demo
   bundle, seed 0) run in-process (`Engine.generate`, bundle already loaded) and through
   a `gem3d serve` on loopback (`RemoteClient`: upload, queue, event stream with binary
   slabs, download), each `--repeats` times; the ratio remote / local of the medians is
   the cost of the HTTP edge.
2. A load test: `--clients` clients, each with its own connection, submit `--jobs` jobs at
   once; every job must finish with every planned window exactly once. Reported: time to
   the first window per job (p50, p95), job wall time and throughput.

  python benchmarks/remote.py                 # CPU: 3 repeats, 8 clients x 3 jobs
  python benchmarks/remote.py --threads 1     # the same on a CPU shared with other work
  python benchmarks/remote.py --device cuda   # on a GPU server
  python benchmarks/remote.py --smoke --out-dir /tmp/remote   # seconds (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "GEM3DCore"))
from gem3d.processes import terminate  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gem3d serve` in a subprocess on a free loopback port, ready when /health answers."""

    def __init__(self, bundles: List[Path], *args: str, device: str = "cpu", startup_s: float = 120.0,
                 env: Optional[Dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "gem3d", "serve", "--port", str(self.port), "--devices", device]
        for bundle in bundles:
            command += ["--bundle", str(bundle)]
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(command + list(args), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gem3d serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gem3d serve did not answer within {startup_s:g} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        terminate(self.process, timeout=10)


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load_test(url: str, token: Optional[str], request_for: Callable[[int, int], dict], clients: int,
              jobs: int, timeout_s: float = 600.0) -> dict:
    """`clients` threads, one RemoteClient each, submit `jobs` requests at once and follow them to
    their ends. Per job: terminal event, time to first window, wall time, and whether its window
    events were exactly its plan (none lost, none duplicated, seq numbers increasing)."""
    from gem3d.events import TERMINAL
    from gem3d.remote import RemoteClient

    records: List[dict] = []
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        client = RemoteClient(url, token, client_id=f"load-{c}")
        submitted: Dict[str, dict] = {}
        for j in range(jobs):
            job_id = client.submit(request_for(c, j))
            submitted[job_id] = {"client": c, "job": j, "t0": time.perf_counter(), "windows": [], "seqs": [],
                                 "plan": None, "terminal": None, "first_window_s": None}
        deadline = time.monotonic() + timeout_s
        while any(r["terminal"] is None for r in submitted.values()) and time.monotonic() < deadline:
            for event in client.poll(timeout=0.02):
                record = submitted.get(event.get("job_id"))
                if record is None:
                    continue
                now = time.perf_counter() - record["t0"]
                if event["event"] == "started":
                    record["plan"] = [(w["start"], w["stop"], w["direction"]) for w in event["plan"]]
                elif event["event"] == "window":
                    record["windows"].append((event["start"], event["stop"], event["direction"]))
                    record["seqs"].append(event["seq"])
                    if record["first_window_s"] is None:
                        record["first_window_s"] = now
                elif event["event"] in TERMINAL:
                    record["terminal"] = event["event"]
                    record["message"] = event.get("message")
                    record["total_s"] = now
        client.close(timeout=1.0)
        with lock:
            records.extend(submitted.values())

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    for record in records:
        record.pop("t0")
        record["windows_exact"] = (record["plan"] is not None and sorted(record["windows"]) == sorted(record["plan"])
                                   and record["seqs"] == sorted(set(record["seqs"])))
    first = [r["first_window_s"] for r in records if r["first_window_s"] is not None]
    totals = [r["total_s"] for r in records if r.get("total_s") is not None]
    return {"clients": clients, "jobs_per_client": jobs, "jobs": len(records),
            "finished": sum(r["terminal"] == "finished" for r in records),
            "windows_exact": sum(r["windows_exact"] for r in records),
            "first_window_p50_s": percentile(first, 50), "first_window_p95_s": percentile(first, 95),
            "job_p50_s": percentile(totals, 50), "job_p95_s": percentile(totals, 95),
            "wall_s": wall, "jobs_per_minute": 60 * len(records) / wall, "records": records}


def demo_request(reference: Path, mask: Path, out: Path, steps: Optional[int]) -> dict:
    from gem3d.demo import COUNTERFACTUAL

    return {"type": "generate", "job_id": out.stem.split(".")[0], "reference": str(reference), "mask": str(mask),
            "out": str(out), "edits": list(COUNTERFACTUAL), "informed": {"source": "same"}, "start": 0.5,
            "seed": 0, "steps": steps, "bundle": "demo_bundle"}


def time_local(engine, request: dict) -> dict:
    from gem3d.events import is_terminal
    from gem3d.request import GenerateRequest

    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    for event in engine.generate(GenerateRequest.from_dict(request)):
        if event["event"] == "window" and first is None:
            first = time.perf_counter() - t0
        if is_terminal(event):
            assert event["event"] == "finished", event
    return {"total_s": time.perf_counter() - t0, "first_window_s": first, "cpu_s": time.process_time() - c0}


def time_remote(client, request: dict, server: ServerProcess) -> dict:
    """Wall time as the client sees it; CPU time of the client and the server together."""
    from gem3d.remote import run_job

    t0, c0, s0 = time.perf_counter(), time.process_time(), server.cpu_seconds()
    marks = {}

    def note(event):
        if event["event"] == "window" and "first_window_s" not in marks:
            marks["first_window_s"] = time.perf_counter() - t0

    end, _ = run_job(client, request, on_event=note)
    assert end["event"] == "finished", end
    return {"total_s": time.perf_counter() - t0, **marks,
            "cpu_s": time.process_time() - c0 + server.cpu_seconds() - s0}


def machine() -> dict:
    import platform
    import re

    import torch

    cpu = platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--load-steps", type=int, default=5, help="sampler steps of each load-test job")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, here and in the server (default: torch's); 1 on a shared machine")
    parser.add_argument("--smoke", action="store_true", help="1 repeat, 2 clients x 2 jobs, 1 step")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.clients, args.jobs, args.load_steps = 1, 2, 2, 1
    import torch

    from gem3d import phantom
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.engine import Engine
    from gem3d.remote import RemoteClient

    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = DEMO_BUNDLE
    work = Path(tempfile.mkdtemp(prefix="gem3d-remote-bench-"))
    engine = Engine(bundle, args.device)
    data = work / "phantom"
    phantom.write_dataset(data, "brain", cases=1, size=engine.bundle.slice_size,
                          slices=2 * engine.bundle.window_length + 8, seed=0)
    reference, mask = data / "imagesTr" / "brain_000_0000.nii.gz", data / "labelsTr" / "brain_000.nii.gz"
    demo_steps = 1 if args.smoke else None
    load_average = {"start": os.getloadavg()[0]}
    server = ServerProcess([bundle], "--max-jobs-per-client", str(max(args.jobs, 1)), device=args.device,
                           env={"OMP_NUM_THREADS": str(args.threads)} if args.threads else None)
    try:
        client = RemoteClient(server.url)
        time_local(engine, demo_request(reference, mask, work / "warm_local.nii.gz", 1))  # first-call costs
        time_remote(client, demo_request(reference, mask, work / "warm_remote.nii.gz", 1), server)
        local, remote = [], []
        for r in range(args.repeats):  # alternate, so that drift hits both alike
            local.append(time_local(engine, demo_request(reference, mask, work / f"local{r}.nii.gz", demo_steps)))
            remote.append(time_remote(client, demo_request(reference, mask, work / f"remote{r}.nii.gz", demo_steps), server))
        equal = bool(np.array_equal(*(read(work / f"{k}0.nii.gz") for k in ("local", "remote"))))
        load = load_test(server.url, None, lambda c, j: dict(
            demo_request(reference, mask, work / f"load_{c}_{j}.nii.gz", args.load_steps), job_id=f"c{c}j{j}"),
            args.clients, args.jobs)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_average["end"] = os.getloadavg()[0]
    med = {name: {k: statistics.median(run[k] for run in runs) for k in ("total_s", "first_window_s", "cpu_s")}
           for name, runs in (("local", local), ("remote", remote))}
    report = {"machine": machine(), "device": args.device, "threads": torch.get_num_threads(), "bundle": bundle.name, "repeats": args.repeats,
              "demo_steps": demo_steps or engine.bundle.info["sampler"]["steps"],
              "local": local, "remote": remote, "median": med,
              "ratio_remote_over_local": med["remote"]["total_s"] / med["local"]["total_s"],
              "cpu_ratio_remote_over_local": med["remote"]["cpu_s"] / med["local"]["cpu_s"],
              "load_average_1min": load_average,
              "remote_output_equals_local": equal, "load": load}
    name = "remote_smoke" if args.smoke else f"remote_{args.device.replace(':', '')}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = render(report)
    print(table)
    (args.out_dir / f"{name}.md").write_text(table)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if load["finished"] == load["jobs"] == load["windows_exact"] and equal else 1


def read(path: Path) -> np.ndarray:
    from gem3d.io import read_volume

    return read_volume(path).array


def render(report: dict) -> str:
    m, med, load = report["machine"], report["median"], report["load"]
    lines = [f"# gem3d serve: remote vs local ({report['device']}; {m['cpu']}, {m['cores']} cores"
             f"{', ' + m['gpu'] if m['gpu'] else ''}; {report['threads']} torch thread(s) per process)", "",
             f"Demo job ({report['bundle']}, {report['demo_steps']} steps), median of {report['repeats']}:", "",
             "| path | total s | first window s | CPU s (client + server) |", "| --- | --- | --- | --- |"]
    for name in ("local", "remote"):
        lines.append(f"| {name} | {med[name]['total_s']:.2f} | {med[name]['first_window_s']:.2f} | "
                     f"{med[name]['cpu_s']:.2f} |")
    lines += ["", f"Remote / local: **{report['ratio_remote_over_local']:.2f}x** wall time, "
                  f"**{report['cpu_ratio_remote_over_local']:.2f}x** CPU time; remote output identical to "
                  f"local: {report['remote_output_equals_local']}. 1-min load average "
                  f"{report['load_average_1min']['start']:.1f} at the start, "
                  f"{report['load_average_1min']['end']:.1f} at the end.", "",
              f"Load: {load['clients']} clients x {load['jobs_per_client']} jobs at once, one device queue:", "",
              "| jobs | finished | windows exact | first window p50 s | p95 s | job p50 s | p95 s | jobs/min |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |",
              f"| {load['jobs']} | {load['finished']} | {load['windows_exact']} | {load['first_window_p50_s']:.2f} | "
              f"{load['first_window_p95_s']:.2f} | {load['job_p50_s']:.2f} | {load['job_p95_s']:.2f} | "
              f"{load['jobs_per_minute']:.1f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
