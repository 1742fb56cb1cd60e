"""The engine behind one small interface: submit a request, poll its events, cancel, close.

LocalEngine runs `gem3d worker` as a child process (worker_client.WorkerClient); RemoteEngine
talks to `gem3d serve` (gem3d.remote.RemoteClient: inputs uploaded, events streamed, outputs
downloaded). Both emit the same events, so logic.EditorLogic does not know which it has.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .worker_client import WorkerClient, worker_command


class LocalEngine:
    """`<python> -m gem3d worker`, started on the first request and kept (its models stay loaded)."""

    def __init__(self, python: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
        self.python = python
        self.env = env
        self.cwd = cwd
        self._client: Optional[WorkerClient] = None

    def submit(self, request: dict) -> str:
        if self._client is None or not self._client.running:
            self._client = WorkerClient(worker_command(self.python), env=self.env, cwd=self.cwd).start()
        return self._client.generate(request)

    def poll(self) -> List[dict]:
        return self._client.poll() if self._client is not None else []

    def log_lines(self) -> List[str]:
        return self._client.drain_log() if self._client is not None else []

    def cancel(self, job_id: str) -> None:
        if self._client is not None:
            self._client.cancel(job_id)

    def close(self) -> None:
        if self._client is not None:
            self._client.close(timeout=2.0)
            self._client = None


class RemoteEngine:
    """A `gem3d serve` engine; connection problems arrive as `error` events, never exceptions."""

    def __init__(self, url: str, token: str = ""):
        from gem3d.remote import RemoteClient

        self._client = RemoteClient(url, token or None).start()

    def submit(self, request: dict) -> str:
        return self._client.generate(request)

    def poll(self) -> List[dict]:
        return self._client.poll()

    def log_lines(self) -> List[str]:
        return self._client.drain_log()

    def cancel(self, job_id: str) -> None:
        self._client.cancel(job_id)

    def close(self) -> None:
        self._client.close()
