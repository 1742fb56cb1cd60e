"""`gem3d worker`: the engine behind a stdio JSON-lines protocol (docs/worker-protocol.md).

A reader thread parses stdin (`gem3d.protocol.parse_message`: any line gives a request or an
`error` event, never an exception), so that a `cancel` reaches a running job between two
sampler steps; jobs run one at a time on the main thread, with `heartbeat` events while they
run. stdout carries only event frames (`gem3d.events`: window slabs and the final volume
in-band; everything else that prints is sent to stderr).

EOF on stdin: the running job finishes, every job still queued is answered with an `error`
event, and the worker exits 0.
"""
from __future__ import annotations

import io
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Dict, IO, Optional, Set

from gem3d.events import encode_event, is_terminal
from gem3d.protocol import error_event, parse_message, read_lines
from gem3d.request import RequestError

if TYPE_CHECKING:
    from gem3d.engine import Engine

log = logging.getLogger("gem3d.worker")
_EOF = object()
HEARTBEAT_S = 5.0


class Worker:
    def __init__(self, events: BinaryIO, bundle: Optional[str] = None, device: str = "auto",
                 heartbeat: float = HEARTBEAT_S):
        self.events = events
        self.default_bundle = bundle
        self.device = device
        self.heartbeat = heartbeat
        self.requests: "queue.Queue" = queue.Queue()
        self.jobs: Set[str] = set()  # ids of the jobs queued or running: one id, one job
        self.cancelled: Set[str] = set()  # ids among them whose cancel arrived
        self._jobs_lock = threading.Lock()
        self.engines: Dict[tuple, "Engine"] = {}
        self.eof = threading.Event()
        self._emit_lock = threading.Lock()

    def emit(self, event: dict) -> None:
        frame = encode_event(event)
        with self._emit_lock:
            self.events.write(frame)
            self.events.flush()

    def read(self, stdin: IO[str]) -> None:
        """Reader thread: cancels take effect at once, everything else is queued in order."""
        try:
            for line in read_lines(stdin):
                if not line.strip():
                    continue
                message = self._admit(parse_message(line))
                if message is None:
                    continue
                self.requests.put(message)
        except (OSError, ValueError) as err:  # stdin broken or undecodable: treated as its end
            log.warning("stopped reading stdin: %s", err)
        finally:
            self.eof.set()
            self.requests.put(_EOF)

    def _admit(self, message: dict) -> Optional[dict]:
        """Note a job's id or its cancel (a cancel for no queued or running job is a no-op); a second
        job with the id of one queued or running is refused at once (None: nothing to queue)."""
        job_id = message.get("job_id")
        with self._jobs_lock:
            if message.get("type") == "cancel" and job_id in self.jobs:
                self.cancelled.add(job_id)
            elif message.get("type") == "generate":
                if job_id in self.jobs:
                    self.emit(error_event(f"job {job_id} is already queued or running in this worker; give "
                                          "the new job another id", job_id))
                    return None
                self.jobs.add(job_id)
        return message

    def _end(self, event: dict) -> None:
        """A job's terminal event: its id (and its cancel) are forgotten first, so that a job sent
        with that id once the client has this event is a new job."""
        with self._jobs_lock:
            self.jobs.discard(event["job_id"])
            self.cancelled.discard(event["job_id"])
        self.emit(event)

    def serve(self, stdin: IO[str]) -> int:
        threading.Thread(target=self.read, args=(stdin,), daemon=True).start()
        while True:
            message = self.requests.get()
            if message is _EOF:
                return 0
            try:
                self.handle(message)
            except BrokenPipeError:  # stdout gone: nobody left to answer
                return 1

    def handle(self, message: dict) -> None:
        if message.get("event") == "error":
            self.emit(message)
            return
        if message["type"] == "cancel":
            return  # already noted by the reader
        job_id = message["job_id"]
        if self.eof.is_set():
            self._end(error_event(f"job {job_id} was not started: the worker's input closed (EOF) before "
                                  "it began; send it again to a running worker", job_id))
            return
        if job_id in self.cancelled:
            self._end({"event": "cancelled", "job_id": job_id})
            return
        beat = threading.Event()
        beating = threading.Thread(target=self._heartbeats, args=(job_id, beat), daemon=True)
        beating.start()
        try:
            self._run(message["request"])
        except Exception as err:  # a bug: still an answer, the traceback in the log
            log.exception("job %s crashed", job_id)
            self._end(error_event(f"internal error: {type(err).__name__}: {err}", job_id))
        finally:
            beat.set()
            beating.join()  # no heartbeat after the job's last event, nor during shutdown

    def _run(self, request) -> None:
        job_id = request.job_id
        try:
            bundle = request.bundle or self.default_bundle
            if not bundle:
                raise RequestError("the request names no bundle and the worker was started without one")
            engine = self.engine(bundle, request.device if request.device != "auto" else self.device)
        except Exception as err:
            log.debug("job %s: no engine", job_id, exc_info=True)
            self._end(error_event(str(err) or type(err).__name__, job_id))
            return
        for event in engine.generate(request, cancel=lambda: job_id in self.cancelled):
            (self._end if is_terminal(event) else self.emit)(event)

    def _heartbeats(self, job_id: str, stop: threading.Event) -> None:
        start = time.monotonic()
        while not stop.wait(self.heartbeat):
            self.emit({"event": "heartbeat", "job_id": job_id, "elapsed": round(time.monotonic() - start, 1)})

    def engine(self, bundle: str, device: str):
        from gem3d.engine import Engine

        key = (str(Path(bundle).resolve()), device)
        if key not in self.engines:
            self.engines[key] = Engine(bundle, device)
        return self.engines[key]


def main(bundle: Optional[str] = None, device: str = "auto", heartbeat: float = HEARTBEAT_S) -> int:
    """Serve until EOF on stdin. stdout is reserved for events."""
    events = sys.stdout.buffer
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="gem3d-worker %(levelname)s %(message)s")
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")  # bad bytes: a bad line
    code = Worker(events, bundle, device, heartbeat).serve(stdin)
    try:
        events.flush()
        sys.stderr.flush()
    except OSError:  # the client is gone
        pass
    # Every output is already written and synced. Interpreter shutdown with a daemon thread (the stdin
    # reader) still alive aborted the worker now and then (exit -6 after EOF): skip it.
    os._exit(code)
