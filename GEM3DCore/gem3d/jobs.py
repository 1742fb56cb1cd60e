"""The jobs of `gem3d serve`: one queue and one thread per device, events kept for replay.

Each device's thread owns that device's engines (one per bundle, loaded once at start) and
runs its queue's jobs one at a time. A job keeps every event it produced (with its slab in
memory, as the engine made it), so a client can read the stream from any point and several
clients can watch one job. Finished jobs, and uploads, are deleted `keep_s` seconds after
they end; until then their results can be downloaded.
"""
from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np

from gem3d.events import TERMINAL
from gem3d.request import GenerateRequest

if TYPE_CHECKING:
    from gem3d.engine import Engine

log = logging.getLogger("gem3d.serve")


class LimitError(RuntimeError):
    """A client or the server is at a configured limit; the message names it."""


def as_client_sees(text: str, server_paths: Dict[str, str]) -> str:
    """`text` with the server's own folders (job folder, data root, uploads) as the client names them."""
    for path, shown in server_paths.items():
        text = text.replace(path, shown)
    return text


@dataclass
class Job:
    id: str
    client: str
    device: str
    bundle: str
    request: GenerateRequest
    folder: Path
    created: float = field(default_factory=time.time)
    ended: Optional[float] = None
    state: str = "queued"
    cancel_requested: bool = False
    outputs: Dict[str, Path] = field(default_factory=dict)
    events: List[dict] = field(default_factory=list)
    slabs: Dict[int, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server_paths: Dict[str, str] = field(default_factory=dict)  # server folder -> as the client names it

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def add(self, event: dict, keep_s: float) -> None:
        """Record an event: its slab kept aside, its outputs kept for download, its seq number set."""
        event = dict(event, job_id=self.id)
        slab = event.pop("slab", None)
        kind = event["event"]
        if "message" in event:  # the client knows its files as reference, mask...: no server paths
            event["message"] = as_client_sees(str(event["message"]),
                                              {f"{self.folder}{os.sep}": "", **self.server_paths})
        if kind == "finished":
            self.outputs = {name: Path(path) for name, path in event.get("outputs", {}).items()}
            event["outputs"] = {name: f"/v1/jobs/{self.id}/outputs/{name}" for name in self.outputs}
        if kind in TERMINAL:
            event["expires_in_s"] = keep_s
        with self.lock:
            seq = len(self.events)
            if slab is not None:
                self.slabs[seq] = slab
            event["seq"] = seq
            self.events.append(event)
            if kind in TERMINAL:
                self.state, self.ended = kind, time.time()
            elif kind == "started":
                self.state = "running"

    def events_from(self, seq: int) -> List[Tuple[dict, Optional[np.ndarray]]]:
        with self.lock:
            return [(e, self.slabs.get(e["seq"])) for e in self.events[seq:]]

    def status(self) -> dict:
        with self.lock:
            message = self.events[-1].get("message") if self.done else None
            return {"job_id": self.id, "state": self.state, "message": message, "device": self.device, "bundle": self.bundle,
                    "events": len(self.events), "created": self.created, "ended": self.ended,
                    "outputs": sorted(self.outputs)}


@dataclass
class Upload:
    id: str
    client: str
    path: Path
    created: float = field(default_factory=time.time)


class DeviceQueue:
    """A device's engines and its job queue, served by one thread."""

    def __init__(self, device: str, engines: Dict[str, "Engine"], keep_s: float):
        self.device = device
        self.engines = engines
        self.keep_s = keep_s
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.pending = 0  # queued or running
        self.stopping = False  # the server is stopping: every job is cancelled
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"gem3d-{device}", daemon=True)

    def submit(self, job: Job) -> int:
        """Queue the job; returns how many jobs are ahead of it."""
        with self.lock:
            ahead = self.pending
            self.pending += 1
        job.add({"event": "queued", "device": self.device, "position": ahead}, self.keep_s)
        self.queue.put(job)
        return ahead

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                self._generate(job)
            except Exception as err:  # a bug must not stop the device's queue
                log.exception("job %s crashed", job.id)
                job.add({"event": "error", "message": f"internal error: {type(err).__name__}: {err}"},
                        self.keep_s)
            finally:
                with self.lock:
                    self.pending -= 1

    def _generate(self, job: Job) -> None:
        def cancelled() -> bool:
            return job.cancel_requested or self.stopping

        if cancelled():
            job.add({"event": "cancelled"}, self.keep_s)
            return
        job.state = "running"
        log.info("job %s runs on %s", job.id, self.device)
        for event in self.engines[job.bundle].generate(job.request, cancel=cancelled):
            job.add(event, self.keep_s)
        log.info("job %s ended: %s", job.id, job.state)


class JobStore:
    """All jobs and uploads, the per-client and queue limits, and their expiry."""

    def __init__(self, work_dir: Path, queues: List[DeviceQueue], keep_s: float,
                 max_jobs_per_client: int, max_queued: int, clock: Callable[[], float] = time.time):
        self.work_dir = work_dir
        self.queues = {q.device: q for q in queues}
        self.keep_s = keep_s
        self.max_jobs_per_client = max_jobs_per_client
        self.max_queued = max_queued
        self.clock = clock
        self.jobs: Dict[str, Job] = {}
        self.uploads: Dict[str, Upload] = {}
        self.lock = threading.Lock()
        (work_dir / "uploads").mkdir(parents=True, exist_ok=True)
        (work_dir / "jobs").mkdir(exist_ok=True)

    def start(self) -> None:
        for q in self.queues.values():
            q.thread.start()
        threading.Thread(target=self._expire_forever, name="gem3d-expiry", daemon=True).start()

    def begin_stop(self) -> None:
        """Cancel every job, queued or running (safe in a signal handler: it only sets flags),
        so that their event streams end with "cancelled" instead of being cut."""
        for q in self.queues.values():
            q.stopping = True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel every job and wait for the device threads, so that no job writes into a work
        folder that is about to be removed."""
        self.begin_stop()
        for q in self.queues.values():
            q.queue.put(None)
        for q in self.queues.values():
            q.thread.join(timeout_s)

    # ------------------------------------------------------------------ uploads
    def new_upload_path(self, suffix: str) -> Tuple[str, Path]:
        upload_id = secrets.token_hex(16)
        return upload_id, self.work_dir / "uploads" / f"{upload_id}{suffix}"

    def add_upload(self, upload: Upload) -> None:
        with self.lock:
            self.uploads[upload.id] = upload

    def upload(self, upload_id: str) -> Optional[Upload]:
        with self.lock:
            return self.uploads.get(upload_id)

    # ------------------------------------------------------------------ jobs
    def new_job_folder(self) -> Tuple[str, Path]:
        job_id = secrets.token_hex(16)
        folder = self.work_dir / "jobs" / job_id
        folder.mkdir()
        return job_id, folder

    def check_limits(self, client: str) -> None:
        with self.lock:
            active = [j for j in self.jobs.values() if not j.done]
        mine = sum(j.client == client for j in active)
        if mine >= self.max_jobs_per_client:
            raise LimitError(f"you have {mine} jobs queued or running, the server's limit per client "
                             f"(--max-jobs-per-client {self.max_jobs_per_client}); wait for one to end")
        if len(active) >= self.max_queued:
            raise LimitError(f"the server has {len(active)} jobs queued or running, its limit "
                             f"(--max-queued {self.max_queued}); try again later")

    def pick_device(self, wanted: str) -> DeviceQueue:
        if wanted != "auto":
            return self.queues[wanted]
        return min(self.queues.values(), key=lambda q: q.pending)

    def submit(self, job: Job) -> int:
        with self.lock:
            self.jobs[job.id] = job
        return self.queues[job.device].submit(job)

    def job(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    # ------------------------------------------------------------------ expiry
    def expire(self) -> int:
        """Delete ended jobs and uploads older than keep_s; returns how many went."""
        now = self.clock()
        with self.lock:
            jobs = [j for j in self.jobs.values() if j.ended is not None and now - j.ended > self.keep_s]
            uploads = [u for u in self.uploads.values() if now - u.created > self.keep_s]
            for job in jobs:
                del self.jobs[job.id]
            for upload in uploads:
                del self.uploads[upload.id]
        for job in jobs:
            shutil.rmtree(job.folder, ignore_errors=True)
        for upload in uploads:
            upload.path.unlink(missing_ok=True)
        return len(jobs) + len(uploads)

    def _expire_forever(self) -> None:
        while True:
            time.sleep(min(30.0, max(self.keep_s / 4, 0.5)))
            self.expire()
