"""Client of `gem3d serve` for scripts, notebooks and the Slicer module.

`RemoteClient` is an engine client (`gem3d.events.EngineClient`, like the in-process and the
stdio worker's): `submit(request)` takes the same request dict with local paths and returns
its job id, `poll()` hands over the same events (`started`, `window` with its slab,
`finished` with local output paths and the volume, `cancelled`, `error`), `cancel(job_id)`
stops a job. Each job runs in a thread that uploads the inputs (`upload` progress events),
submits the job, follows its event stream (`queued`, `heartbeat` events too) and downloads
the outputs to the request's `out` (atomically, `gem3d.outputs.write_atomically`).

Whatever happens to the network or the server, a job ends with exactly one terminal
event whose message is a sentence; nothing raises out of the job thread and nothing
waits for ever. Standard library and numpy only, so that it imports in Slicer's Python
without torch.
"""
from __future__ import annotations

import copy
import http.client
import json
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from gem3d import typed
from gem3d.events import TERMINAL, StreamError, read_event
from gem3d.io import extension, provenance_path
from gem3d.outputs import write_atomically
from gem3d.queues import take
from gem3d.request import GenerateRequest, RequestError

SERVER_PREFIX = "server:"  # an input already on the server, under its --data-root
WHAT = "The GEM-3D server"


class RemoteError(RuntimeError):
    """The server could not be used; the message says why in one sentence."""


class _Cancelled(Exception):
    pass


class _Job:
    def __init__(self, job_id: str, request: dict):
        self.id = job_id
        self.request = request
        self.remote_id: Optional[str] = None
        self.cancel_requested = False
        self.last_seq = -1
        self.response: Optional[http.client.HTTPResponse] = None


def server_url_parts(url: str):
    """The parts of a `gem3d serve` address: http or https and a host, else ValueError."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the server URL must look like http://host:8000 or https://host, got {url!r}")
    return parts


class RemoteClient:
    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0,
                 cancel_timeout: float = 10.0, chunk_bytes: int = 1 << 20, client_id: Optional[str] = None):
        self._parts = server_url_parts(url)
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = float(timeout)
        self.cancel_timeout = float(cancel_timeout)
        self.chunk_bytes = int(chunk_bytes)
        self.client_id = client_id or uuid.uuid4().hex
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._log: "queue.Queue[str]" = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: Dict[str, _Job] = {}
        self._server_info: Optional[dict] = None

    # ---------------------------------------------------------------- the engine client
    @property
    def running(self) -> bool:
        return True                                       # every job opens its own connection

    @property
    def active_jobs(self) -> List[str]:
        with self._lock:
            return list(self._jobs)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel this client's unfinished jobs on the server and stop following them."""
        for job_id in self.active_jobs:
            self.cancel(job_id)
        deadline = time.monotonic() + timeout
        while self.active_jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """Stop following every job at once (each ends with a `cancelled` event)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self._end(job, {"event": "cancelled", "message": "The connection to the GEM-3D server was closed."})

    def submit(self, request: dict) -> str:
        """Check the request's local side, then run it on the server in a thread; returns its job id.
        An invalid request, or a job id already running here, ends at once with an `error` event."""
        job = _Job(str(request.get("job_id") or "j" + uuid.uuid4().hex[:12]), dict(request))
        problems = request_problems(request)
        with self._lock:
            if job.id in self._jobs:
                problems.append(f"job {job.id!r} is already running")
            if not problems:
                self._jobs[job.id] = job
        if problems:
            self._put(job, {"event": "error", "message": "Invalid generate request: " + "; ".join(problems) + "."})
            return job.id
        threading.Thread(target=self._run, args=(job,), name=f"gem3d-remote-{job.id}", daemon=True).start()
        return job.id

    def cancel(self, job_id: str) -> None:
        """Ask the server to cancel; if the job has not ended within cancel_timeout, stop following it."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return
        job.cancel_requested = True
        threading.Thread(target=self._cancel_remote, args=(job,), daemon=True).start()

    def poll(self, timeout: float = 0.0, max_events: Optional[int] = None) -> List[dict]:
        """Events received so far, in order; waits up to `timeout` seconds for the first one."""
        return take(self._events, timeout, max_events)

    def log_lines(self) -> List[str]:
        """Notes of this client (reconnections, failed cancels), for the caller's thread to log."""
        return take(self._log)

    # ---------------------------------------------------------------- server information
    def check(self) -> dict:
        """{"ok", "message", and when ok "version", "bundles"}: for a "Test connection" button; never raises."""
        try:
            info = self.server_info(refresh=True)
            bundles = self.bundles()
        except RemoteError as err:
            return {"ok": False, "message": str(err)}
        names = ", ".join(b["name"] for b in bundles) or "none"
        return {"ok": True, "version": info["version"], "bundles": bundles,
                "message": f"Connected to the GEM-3D server {info['version']} at {self.url} (bundles: {names})."}

    def server_info(self, refresh: bool = False) -> dict:
        if self._server_info is None or refresh:
            self._server_info = self._json("GET", "/v1/info")
        return self._server_info

    def bundles(self) -> List[dict]:
        return self._json("GET", "/v1/bundles")

    # ---------------------------------------------------------------- HTTP
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        host, port = self._parts.hostname, self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        headers = {"X-GEM3D-Client": self.client_id, "Accept": "*/*"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _open(self, method: str, path: str, body: Optional[bytes] = None,
              headers: Optional[dict] = None, timeout: Optional[float] = None):
        """(connection, response) of a request whose status is 2xx, else RemoteError."""
        conn = self._connection(self.timeout if timeout is None else timeout)
        try:
            conn.request(method, self._parts.path + path, body=body, headers=self._headers(headers))
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise RemoteError(self._network_message(err)) from None
        self._check_status(response, conn)
        return conn, response

    def _check_status(self, response: http.client.HTTPResponse, conn) -> None:
        if 200 <= response.status < 300:
            return
        try:
            data = typed.loads(response.read() or b"{}", f"{WHAT}'s answer")
            detail = data.get("error") or data.get("detail") if isinstance(data, dict) else None
        except (ValueError, OSError, http.client.HTTPException):
            detail = None
        conn.close()
        detail = detail or response.reason
        if response.status == 401:
            raise RemoteError(f"{WHAT} at {self.url} refused the connection: {detail} "
                              "(set the server's token in the module's settings).")
        raise RemoteError(f"{WHAT} at {self.url} refused the request (HTTP {response.status}): {detail}.")

    def _json(self, method: str, path: str, data=None):
        body = None if data is None else json.dumps(data).encode()
        conn, response = self._open(method, path, body, {"Content-Type": "application/json"} if body else None)
        try:
            return typed.loads(response.read(), f"{WHAT}'s answer")
        except (ValueError, OSError, http.client.HTTPException) as err:
            raise RemoteError(self._network_message(err)) from None
        finally:
            conn.close()

    def _network_message(self, err: BaseException) -> str:
        if isinstance(err, ConnectionRefusedError):
            return (f"Cannot reach the GEM-3D server at {self.url}: the connection was refused "
                    "(is `gem3d serve` running there, on that port?).")
        if isinstance(err, socket.gaierror):
            return f"Cannot reach the GEM-3D server at {self.url}: the host name {self._parts.hostname!r} is unknown."
        if isinstance(err, (socket.timeout, TimeoutError)):
            return f"{WHAT} at {self.url} did not answer within {self.timeout:g} s."
        if isinstance(err, ssl.SSLError):
            return f"The TLS connection to the GEM-3D server at {self.url} failed: {err}."
        if isinstance(err, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead)):
            return f"{WHAT} at {self.url} closed the connection ({type(err).__name__})."
        return f"The connection to the GEM-3D server at {self.url} failed: {err}."

    # ---------------------------------------------------------------- a job
    def _run(self, job: _Job) -> None:
        try:
            remote = self._remote_request(job)
            submitted = self._json("POST", "/v1/jobs", remote)
            job.remote_id = submitted["job_id"]
            if job.cancel_requested:
                self._cancel_remote(job)
            self._follow(job)
        except _Cancelled:
            self._end(job, {"event": "cancelled", "message": "Cancelled before the job reached the server."})
        except RemoteError as err:
            self._end(job, {"event": "error", "message": str(err)})
        except Exception as err:  # a bug here must still end the job
            self._end(job, {"event": "error", "message": f"internal error in the remote client: "
                                                         f"{type(err).__name__}: {err}"})

    def _remote_request(self, job: _Job) -> dict:
        """The request as the server takes it: uploads for local inputs, no local paths at all."""
        request = job.request
        remote = {k: v for k, v in request.items() if k not in ("out", "mask_out", "overwrite", "job_id")}
        ext = extension(request["out"])
        remote["out"] = "synthetic" + ext
        if request.get("mask_out"):
            remote["mask_out"] = "mask" + ext
        bundle = request.get("bundle")
        if bundle and ("/" in bundle or os.sep in bundle):
            remote["bundle"] = os.path.basename(os.path.normpath(bundle))
        remote["device"] = "auto" if request.get("device", "auto") in ("auto", "cuda") else request["device"]
        informed = dict(request.get("informed") or {})
        inputs = [("reference", request["reference"]), ("mask", request["mask"])]
        if informed.get("scan"):
            inputs.append(("informed", informed["scan"]))
        local = {path for _, path in inputs if not path.startswith(SERVER_PREFIX)}
        total = sum(os.path.getsize(path) for path in local)
        limit = self.server_info()["limits"]["max_upload_bytes"]
        uploaded: Dict[str, str] = {}
        progress = [0, total]
        for role, path in inputs:
            if path.startswith(SERVER_PREFIX):
                value = path[len(SERVER_PREFIX):]
            else:
                if path not in uploaded:
                    uploaded[path] = "upload:" + self._upload(job, role, path, limit, progress)
                value = uploaded[path]
            if role == "informed":
                informed["scan"] = value
            else:
                remote[role] = value
        if informed:
            remote["informed"] = informed
        return remote

    def _upload(self, job: _Job, role: str, path: str, limit: int, progress: List[int]) -> str:
        size = os.path.getsize(path)
        if size > limit:
            raise RemoteError(f"The {role} file is {size / 2**20:.1f} MiB, above the server's upload limit of "
                              f"{limit / 2**20:.1f} MiB.")
        conn = self._connection(self.timeout)
        target = f"{self._parts.path}/v1/uploads?suffix={quote(extension(path))}"
        try:
            conn.putrequest("POST", target)
            for key, value in self._headers({"Content-Type": "application/octet-stream",
                                             "Content-Length": str(size)}).items():
                conn.putheader(key, value)
            conn.endheaders()
            with open(path, "rb") as f:
                while True:
                    if job.cancel_requested:
                        raise _Cancelled()
                    chunk = f.read(self.chunk_bytes)
                    if not chunk:
                        break
                    conn.send(chunk)
                    progress[0] += len(chunk)
                    self._emit(job, {"event": "upload", "file": role, "done": progress[0], "total": progress[1]})
            response = conn.getresponse()
            self._check_status(response, conn)
            return typed.loads(response.read(), f"{WHAT}'s answer")["upload_id"]
        except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
            raise RemoteError(f"Uploading the {role} file failed: " + self._network_message(err)) from None
        finally:
            conn.close()

    def _follow(self, job: _Job) -> None:
        """Read the job's events to its end; one reconnection (from the last event seen) if the
        stream drops, then an error naming what happened."""
        for attempt in (1, 2):
            try:
                if self._read_stream(job):
                    return
                problem = f"{WHAT} at {self.url} ended job {job.id}'s event stream before the job ended"
            except RemoteError as err:
                problem = str(err).rstrip(".")
            except (OSError, http.client.HTTPException, StreamError) as err:
                problem = self._network_message(err).rstrip(".")
            if not self._is_active(job):
                return
            if attempt == 1:
                self._log.put(f"{problem}; reconnecting once")
                time.sleep(1.0)
        self._end(job, {"event": "error", "message": f"{problem}; job {job.id} was lost (was the server stopped?)."})

    def _read_stream(self, job: _Job) -> bool:
        """True once the job's terminal event was handled."""
        read_timeout = max(self.timeout, 15.0)  # the server sends a heartbeat every 5 s
        conn, response = self._open("GET", f"/v1/jobs/{job.remote_id}/events?after={job.last_seq}",
                                    timeout=read_timeout)
        job.response = response
        try:
            while self._is_active(job):
                event = read_event(response)
                if event is None:
                    return False
                if event.get("seq") is not None:
                    if event["seq"] <= job.last_seq:
                        continue
                    job.last_seq = event["seq"]
                self._handle(job, event)
                if event["event"] in TERMINAL:
                    return True
            return True
        finally:
            conn.close()

    def _handle(self, job: _Job, event: dict) -> None:
        kind = event["event"]
        if kind == "finished":
            event["outputs"] = self._download_outputs(job, event.get("outputs") or {})
        if kind in TERMINAL:
            self._end(job, event)
        else:
            self._emit(job, event)

    def _download_outputs(self, job: _Job, outputs: Dict[str, str]) -> Dict[str, str]:
        request = job.request
        targets = {"image": request["out"], "mask": request.get("mask_out"),
                   "provenance": str(provenance_path(request["out"]))}
        local = {}
        for name, url in outputs.items():
            target = targets.get(name)
            if target:
                self._download(url, target, bool(request.get("overwrite")))
                local[name] = target
        return local

    def _download(self, url: str, target: str, overwrite: bool) -> None:
        """Atomically (`write_atomically`); never over a file unless asked."""
        if os.path.exists(target) and not overwrite:
            raise RemoteError(f"{target} exists; the result was left on the server")
        conn, response = self._open("GET", url[len(self._parts.path):] if url.startswith(self._parts.path)
                                    else url)

        def copy(tmp) -> None:
            with open(tmp, "wb") as f:
                while True:
                    chunk = response.read(self.chunk_bytes)
                    if not chunk:
                        break
                    f.write(chunk)

        try:
            write_atomically(target, copy)
        except (OSError, http.client.HTTPException) as err:
            raise RemoteError("Downloading the result failed: " + self._network_message(err)) from None
        finally:
            conn.close()

    def _cancel_remote(self, job: _Job) -> None:
        if job.remote_id is not None:
            try:
                self._json("POST", f"/v1/jobs/{job.remote_id}/cancel")
            except RemoteError as err:
                self._log.put(f"cancel of job {job.id}: {err}")
        timer = threading.Timer(self.cancel_timeout, self._abandon, args=(job,))
        timer.daemon = True
        timer.start()

    def _abandon(self, job: _Job) -> None:
        if self._is_active(job):
            self._end(job, {"event": "cancelled", "message": f"{WHAT} did not confirm the cancel within "
                                                             f"{self.cancel_timeout:g} s; the job was abandoned."})

    # ---------------------------------------------------------------- events
    def _is_active(self, job: _Job) -> bool:
        with self._lock:
            return self._jobs.get(job.id) is job

    def _emit(self, job: _Job, event: dict) -> None:
        if self._is_active(job):
            self._put(job, event)

    def _end(self, job: _Job, event: dict) -> None:
        """The job's one terminal event; later ones (a late stream, a timer) are dropped."""
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return
            del self._jobs[job.id]
        self._put(job, event)
        response = job.response
        if response is not None:
            try:
                response.close()
            except OSError:
                pass

    def _put(self, job: _Job, event: dict) -> None:
        event = dict(event, job_id=job.id)
        event["type"] = event["event"]
        self._events.put(event)


def request_problems(request: dict) -> List[str]:
    """What makes a request unusable on this side: the contract's checks (`GenerateRequest`) with
    inputs already on the server (``server:...``) and the bundle (a server's name) left to the server."""
    try:
        parsed = GenerateRequest.from_dict(request)
    except (RequestError, TypeError) as err:
        return [str(err)]
    local, local.informed = copy.copy(parsed), copy.copy(parsed.informed)
    local.bundle = None
    for owner, key in ((local, "reference"), (local, "mask"), (local.informed, "scan")):
        if (getattr(owner, key) or "").startswith(SERVER_PREFIX):
            setattr(owner, key, None)
    return local.path_problems()


def run_job(client: RemoteClient, request: dict, on_event: Optional[Callable[[dict], None]] = None,
            timeout: Optional[float] = None) -> Tuple[dict, List[dict]]:
    """Run one request to its end (for scripts): (terminal event, all events)."""
    job_id = client.submit(request)
    events: List[dict] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is not None and time.monotonic() > deadline:
            client.cancel(job_id)
            deadline = None
        for event in client.poll(timeout=0.2):
            if event.get("job_id") != job_id:
                continue
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event["event"] in TERMINAL:
                return event, events
