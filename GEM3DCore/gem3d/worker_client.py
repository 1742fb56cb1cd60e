"""Client of the `gem3d worker` stdio protocol (docs/worker-protocol.md).

An engine client (`gem3d.events.EngineClient`). The worker runs as a subprocess in its own
session / process group, so that it and anything it starts can be killed together. A reader
thread parses stdout (`gem3d.events` frames: window slabs and the final volume in-band) onto a
queue; `poll()` hands the events, in order, to the caller (a QTimer on Slicer's GUI thread).
Log lines (stderr, stray stdout text) wait in another queue for `log_lines()`, so that only the
caller's thread logs; the last stderr lines are kept for error messages.

Each event dict carries its kind under "event" (as gem3d's engine and worker write it), and
again under "type".

Guarantees: a worker that dies yields an `error` event for each unfinished job (exit code, last
stderr lines), never a hang; `cancel()` sends the cancel message and, if the job has not ended
within `cancel_timeout` seconds, kills the process tree and reports the job `cancelled`; a worker
that sends nothing (no event, no `heartbeat`) for `stall_timeout` seconds while a job runs is
reported stuck with an `error` event per job and killed. Problems on the client side (an invalid
request, a worker that is not running) are `error` events too, never exceptions.
"""
from __future__ import annotations

import collections
import io
import json
import os
import queue
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from gem3d import request as requests
from gem3d.events import MAX_HEADER, TERMINAL, StreamError, parse_header, read_slab
from gem3d.processes import exit_message, kill_tree, popen_group
from gem3d.queues import take

WHAT = "The GEM-3D engine"
STALL_TIMEOUT = 60.0  # the worker sends a heartbeat every 5 s while a job runs


def worker_command(python: str, *args: str) -> List[str]:
    """`<python> -m gem3d worker ...` (python: PythonSlicer or a user-chosen interpreter)."""
    return [python, "-m", "gem3d", "worker", *args]


def environment_with_path(base: Optional[Dict[str, str]], paths: Sequence[str]) -> Dict[str, str]:
    """A copy of `base` (default os.environ) with `paths` in front of PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(list(paths) + [p for p in existing if p not in paths])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def python_executable_default() -> str:
    """PythonSlicer inside Slicer (it is on PATH there), else the running interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable),
                             "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    return candidate if os.path.isfile(candidate) else sys.executable


class WorkerClient:
    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, cancel_timeout: float = 10.0, stderr_lines: int = 40,
                 stall_timeout: float = STALL_TIMEOUT):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.cancel_timeout = float(cancel_timeout)
        self.stall_timeout = float(stall_timeout)
        self._last_heard = time.monotonic()
        self._killed_for_stall = False
        self._stderr = collections.deque(maxlen=stderr_lines)
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._log: "queue.Queue[str]" = queue.Queue()
        self._lock = threading.Lock()
        self._active: Dict[str, bool] = {}  # job id -> cancel requested
        self._killed_for_cancel = False
        self._closing = False
        self._process = None
        self._threads: List[threading.Thread] = []
        self._timers: List[threading.Timer] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "WorkerClient":
        if self.running:
            return self
        self._process = popen_group(self.command, self.env, self.cwd, stdin=True, text=False)
        self._stdin = io.TextIOWrapper(self._process.stdin, encoding="utf-8", line_buffering=True)
        self._closing = False
        self._killed_for_cancel = False
        self._killed_for_stall = False
        self._stderr.clear()
        stderr_thread = threading.Thread(target=self._read_stderr, args=(self._process,),
                                         name="gem3d-worker-stderr", daemon=True)
        stdout_thread = threading.Thread(target=self._read_stdout, args=(self._process, stderr_thread),
                                         name="gem3d-worker-stdout", daemon=True)
        watchdog = threading.Thread(target=self._watch, args=(self._process,), name="gem3d-worker-watchdog",
                                    daemon=True)
        self._threads = [stderr_thread, stdout_thread, watchdog]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    @property
    def active_jobs(self) -> List[str]:
        with self._lock:
            return list(self._active)

    def stderr_tail(self) -> List[str]:
        return list(self._stderr)

    def close(self, timeout: float = 5.0) -> None:
        """End the worker: EOF on stdin (it exits after the running job), killed if it does not."""
        if self._process is None:
            return
        self._closing = True
        for timer in self._timers:
            timer.cancel()
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=timeout)
        except Exception:  # subprocess.TimeoutExpired
            self.kill()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def kill(self) -> None:
        """Kill the worker and everything it started."""
        kill_tree(self._process)

    # ---------------------------------------------------------------- requests
    def send(self, message: dict) -> None:
        """Write one message; a worker that is not running gives an `error` event for its job."""
        if not self.running:
            job_id = message.get("job_id")
            self._client_error(job_id if isinstance(job_id, str) else None, f"{WHAT} is not running; start it again.")
            return
        try:
            self._stdin.write(json.dumps(message) + "\n")
            self._stdin.flush()
        except (OSError, ValueError) as e:  # broken pipe: the reader thread reports the exit
            self._log.put(f"the GEM-3D engine did not take the message: {e}")

    def submit(self, request: dict) -> str:
        """Validate and send a generate request; returns its job id. An invalid request gives an
        `error` event instead of an exception."""
        job_id = request.get("job_id") if isinstance(request, dict) else None
        job_id = job_id if isinstance(job_id, str) else None
        try:
            if job_id is None:
                raise ValueError("Invalid generate request: job_id must be a non-empty string.")
            requests.GenerateRequest.from_dict(request)  # the contract's checks
        except Exception as err:  # RequestError, or a request too broken to validate
            self._client_error(job_id, str(err))
            return job_id
        with self._lock:
            duplicate = job_id in self._active
            if not duplicate:
                self._active[job_id] = False
                self._last_heard = time.monotonic()
        if duplicate:  # refused here, and the running job of that id stays followed
            self._events.put({"event": "error", "type": "error", "job_id": job_id,
                              "message": f"job {job_id} is already queued or running; give the new job another id"})
            return job_id
        self.send(request)
        return job_id

    def cancel(self, job_id: str) -> None:
        """Ask the worker to cancel; kill it if the job has not ended within cancel_timeout."""
        with self._lock:
            if job_id not in self._active:
                return
            self._active[job_id] = True
        if not self.running:  # the reader thread reports how it ended
            return
        self.send(requests.cancel_message(job_id))
        timer = threading.Timer(self.cancel_timeout, self._kill_if_still_active, args=(job_id,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _kill_if_still_active(self, job_id: str) -> None:
        with self._lock:
            still_active = job_id in self._active
        if still_active and self.running:
            self._log.put(f"the GEM-3D engine did not cancel job {job_id} within "
                          f"{self.cancel_timeout:g} s: killing it")
            self._killed_for_cancel = True
            self.kill()

    # ---------------------------------------------------------------- events
    def poll(self, timeout: float = 0.0, max_events: Optional[int] = None) -> List[dict]:
        """Events received so far, in order; waits up to `timeout` seconds for the first one."""
        return take(self._events, timeout, max_events)

    def log_lines(self) -> List[str]:
        """Log lines received so far (engine stderr, stray stdout text, client notes)."""
        return take(self._log)

    def _emit(self, event: dict) -> None:
        kind = event["event"]
        if kind in TERMINAL:
            with self._lock:
                if event.get("job_id") is not None:
                    self._active.pop(event["job_id"], None)
                elif kind == "error":  # an unreadable request: nothing that was sent will finish
                    self._active.clear()
        self._events.put(event)

    def _client_error(self, job_id: Optional[str], message: str) -> None:
        """An `error` event about one request that never reached the worker (other jobs go on)."""
        event = {"event": "error", "type": "error", "job_id": job_id, "message": message}
        if job_id is None:
            self._events.put(event)
        else:
            self._emit(event)

    def _watch(self, process) -> None:
        """Watchdog thread: a running job from which nothing is heard for stall_timeout is stuck."""
        period = min(1.0, self.stall_timeout / 4)
        while process.poll() is None:
            time.sleep(period)
            with self._lock:
                silent = time.monotonic() - self._last_heard
                stuck = list(self._active) if silent > self.stall_timeout else []
            if stuck and process.poll() is None:
                self._killed_for_stall = True
                for job_id in stuck:
                    self._emit({"event": "error", "type": "error", "job_id": job_id,
                                "message": f"{WHAT} sent nothing for {silent:.0f} s (not even a heartbeat): it "
                                           "seems stuck and was stopped; try again, or check its log."})
                kill_tree(process)
                return

    def _read_stdout(self, process, stderr_thread: threading.Thread) -> None:
        stdout = process.stdout
        try:
            for line in iter(lambda: stdout.readline(MAX_HEADER), b""):
                with self._lock:
                    self._last_heard = time.monotonic()
                if not line.strip():
                    continue
                try:
                    event = parse_header(line)
                except StreamError:  # stray text on stdout: a log line
                    self._log.put(line.decode("utf-8", "replace").strip())
                    continue
                event["type"] = event["event"]
                self._emit(read_slab(stdout, event))
        except (StreamError, OSError) as err:
            self._log.put(f"stopped reading the GEM-3D engine's events: {err}")
        returncode = process.wait()
        stderr_thread.join(timeout=5.0)
        self._report_exit(returncode)

    def _read_stderr(self, process) -> None:
        for line in io.TextIOWrapper(process.stderr, encoding="utf-8", errors="replace"):
            line = line.rstrip()
            if line:
                self._stderr.append(line)
                self._log.put(line)

    def _report_exit(self, returncode: int) -> None:
        with self._lock:
            unfinished = dict(self._active)
        tail = list(self._stderr)
        for job_id, cancel_requested in unfinished.items():
            if cancel_requested:
                how = (f"was killed: it did not answer the cancel request within {self.cancel_timeout:g} s"
                       if self._killed_for_cancel else "stopped")
                self._emit({"event": "cancelled", "type": "cancelled", "job_id": job_id,
                            "message": f"{WHAT} {how}."})
            else:
                self._emit({"event": "error", "type": "error", "job_id": job_id, "returncode": returncode,
                            "stderr": "\n".join(tail), "message": exit_message(WHAT, returncode, tail)})
        if not unfinished and returncode != 0 and not (self._closing or self._killed_for_cancel
                                                       or self._killed_for_stall):
            self._emit({"event": "error", "type": "error", "job_id": None, "returncode": returncode,
                        "stderr": "\n".join(tail), "message": exit_message(WHAT, returncode, tail)})
