"""`gem3d worker`: the engine behind a stdio JSON-lines protocol (docs/worker-protocol.md).

A reader thread parses stdin so that a `cancel` reaches a running job between
two sampler steps; jobs run one at a time on the main thread. stdout carries
only protocol lines (everything else that prints is sent to stderr), window
slabs travel as `.npy` files next to the output.
"""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from pathlib import Path
from typing import Dict, IO, Optional

import numpy as np

from gem3d.request import GenerateRequest, RequestError

log = logging.getLogger("gem3d.worker")
_EOF = object()


class Worker:
    def __init__(self, events: IO[str], bundle: Optional[str] = None, device: str = "auto"):
        self.events = events
        self.default_bundle = bundle
        self.device = device
        self.requests: "queue.Queue" = queue.Queue()
        self.cancelled = set()
        self.engines: Dict[tuple, object] = {}

    def emit(self, event: dict) -> None:
        self.events.write(json.dumps(event) + "\n")
        self.events.flush()

    def read(self, stdin: IO[str]) -> None:
        """Reader thread: cancels take effect at once, everything else is queued in order."""
        for line in stdin:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError as err:
                self.requests.put({"type": "invalid", "message": f"not a JSON line ({err.msg}): {line[:80]}"})
                continue
            if isinstance(message, dict) and message.get("type") == "cancel":
                self.cancelled.add(message.get("job_id"))
            self.requests.put(message)
        self.requests.put(_EOF)

    def serve(self, stdin: IO[str]) -> int:
        threading.Thread(target=self.read, args=(stdin,), daemon=True).start()
        while True:
            message = self.requests.get()
            if message is _EOF:
                return 0
            self.handle(message)

    def handle(self, message) -> None:
        kind = message.get("type") if isinstance(message, dict) else None
        job_id = message.get("job_id") if isinstance(message, dict) else None
        if kind == "cancel":
            return  # already noted by the reader; a cancel for a finished job is a no-op
        if kind == "invalid":
            self.emit({"event": "error", "job_id": None, "message": message["message"]})
            return
        if kind != "generate":
            self.emit({"event": "error", "job_id": job_id,
                       "message": f"unknown request type {kind!r}; expected 'generate' or 'cancel'"})
            return
        try:
            request = GenerateRequest.from_dict(message)
            bundle = request.bundle or self.default_bundle
            if not bundle:
                raise RequestError("the request names no bundle and the worker was started without one")
            engine = self.engine(bundle, request.device if request.device != "auto" else self.device)
        except (ValueError, OSError, RuntimeError) as err:
            self.emit({"event": "error", "job_id": job_id, "message": str(err)})
            return
        if request.job_id in self.cancelled:
            self.emit({"event": "cancelled", "job_id": request.job_id})
            return
        folder = Path(request.out).with_name(Path(request.out).name + ".windows")
        for index, event in enumerate(engine.generate(request, cancel=lambda: request.job_id in self.cancelled)):
            if "slab" in event:
                folder.mkdir(exist_ok=True)
                path = folder / f"{request.job_id}_{index:04d}.npy"
                np.save(path, event.pop("slab"))
                event["path"] = str(path)
            self.emit(event)

    def engine(self, bundle: str, device: str):
        from gem3d.engine import Engine

        key = (str(Path(bundle).resolve()), device)
        if key not in self.engines:
            self.engines[key] = Engine(bundle, device)
        return self.engines[key]


def main(bundle: Optional[str] = None, device: str = "auto") -> int:
    """Serve until EOF on stdin. stdout is reserved for events."""
    events = sys.stdout
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="gem3d-worker %(levelname)s %(message)s")
    return Worker(events, bundle, device).serve(sys.stdin)
