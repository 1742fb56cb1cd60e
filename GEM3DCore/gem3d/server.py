"""`gem3d serve`: the engine behind HTTP, for a GPU server (docs/worker-protocol.md, "HTTP").

The same requests and events as the stdio worker. The server is the file edge: inputs are
uploaded (or named under --data-root), each job gets its own folder, outputs are
downloaded. Secure by default: loopback only unless a bearer token is set, the token
compared in constant time, upload size and jobs per client limited, every path confined to
the data root, no CORS unless asked, and no token or file name in the logs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

import gem3d
from gem3d import typed
from gem3d.access import token_matches
from gem3d.events import MEDIA_TYPE, encode_event
from gem3d.io import WRITE_EXTENSIONS, OutsideRootError, check_self_contained, confined_input, extension, read_volume
from gem3d.jobs import Job, JobStore, LimitError, Upload, as_client_sees
from gem3d.protocol import request_from_dict
from gem3d.request import GenerateRequest, RequestError

log = logging.getLogger("gem3d.serve")
UPLOAD_PREFIX = "upload:"
WORK_PREFIX = "gem3d-serve-"  # + the server's pid + "-": a killed server's folder is found by its pid
READ_EXTENSIONS = WRITE_EXTENSIONS  # one file per upload: DICOM folders are not uploaded
HEARTBEAT_S = 5.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Settings:
    """What the server was started with (the `gem3d serve` options, which hold the defaults)."""

    bundles: Dict[str, Path]
    devices: List[str]
    work_dir: Path
    token: Optional[str]
    data_root: Optional[Path]
    max_upload_bytes: int
    max_jobs_per_client: int
    max_queued: int
    keep_s: float
    cors_origins: List[str]


def confined(path: str, root: Optional[Path]) -> Path:
    """`path` (relative to the data root, or absolute inside it) as an existing file in the root."""
    if root is None:
        raise RequestError("this server has no --data-root, so it cannot read server paths; upload the file")
    try:
        return confined_input(path, root)
    except OutsideRootError as err:
        raise RequestError(str(err)) from None


def output_extension(out: Optional[str]) -> str:
    ext = extension(out or "synthetic.nii.gz")
    if ext not in WRITE_EXTENSIONS:
        raise RequestError(f"out must end in one of {', '.join(WRITE_EXTENSIONS)}, got {ext!r}")
    return ext


class JobIntake:
    """The job store plus what turns an HTTP request into a job."""

    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store

    def client_key(self, request: Request) -> str:
        """Who a job belongs to for the per-client limit: the address plus the client's id header
        (a fairness limit between tools sharing a token, not an identity)."""
        host = request.client.host if request.client else "?"
        return f"{host}/{request.headers.get('x-gem3d-client', '')[:64]}"

    def server_paths(self) -> Dict[str, str]:
        """The server's folders as a client names the files in them: data-root files by their path
        under the root, uploads by their id; a message never shows where the server keeps them."""
        paths = {f"{self.settings.work_dir}{os.sep}": ""}
        if self.settings.data_root:
            paths[f"{self.settings.data_root}{os.sep}"] = ""
        return paths

    def job_request(self, data, job_id: str, folder: Path) -> Tuple[GenerateRequest, str]:
        """A remote request as the engine's, and its bundle's name: inputs from uploads or the data root,
        outputs in the job's folder. (The stdio worker takes paths as they are; here none is trusted.)"""
        if not isinstance(data, dict):
            raise RequestError(f"a request is a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.pop("type", "generate") != "generate":
            raise RequestError("POST /v1/jobs takes a 'generate' request")
        data.pop("job_id", None)
        data.pop("overwrite", None)
        ext = output_extension(data.pop("out", None))
        mask_out = data.pop("mask_out", None)
        bundle = data.pop("bundle", None) or next(iter(self.settings.bundles))
        if bundle not in self.settings.bundles:
            raise RequestError(f"unknown bundle {bundle!r}; this server has {sorted(self.settings.bundles)}")
        device = data.pop("device", "auto")
        if device != "auto" and device not in self.settings.devices:
            raise RequestError(f"device {device!r} is not served here; devices: {self.settings.devices}")
        for key in ("reference", "mask"):
            if not data.get(key):
                raise RequestError(f"request needs {key!r} (an upload:ID or a path under the data root)")
            data[key] = self.input_path(data[key], key, folder)
        informed = data.get("informed")
        if isinstance(informed, dict) and informed.get("scan"):
            data["informed"] = dict(informed, scan=self.input_path(informed["scan"], "informed", folder))
        request = request_from_dict(dict(
            data, job_id=job_id, bundle=str(self.settings.bundles[bundle]), device=device,
            out=str(folder / f"synthetic{ext}"), mask_out=str(folder / f"synthetic_mask{ext}") if mask_out else None))
        return request, bundle

    def input_path(self, value, role: str, folder: Path) -> str:
        if not isinstance(value, str):
            raise RequestError(f"{role} must be a string (upload:ID or a path under the data root)")
        if not value.startswith(UPLOAD_PREFIX):
            return str(confined(value, self.settings.data_root))
        upload = self.store.upload(value[len(UPLOAD_PREFIX):])
        if upload is None or not upload.path.is_file():
            raise RequestError(f"{role}: unknown or expired upload {value!r}; upload the file again")
        target = folder / f"input_{role}{extension(upload.path)}"
        if not target.exists():
            try:
                os.link(upload.path, target)
            except OSError:
                target.write_bytes(upload.path.read_bytes())
        return str(target)


def build_app(settings: Settings, store: JobStore) -> FastAPI:
    intake = JobIntake(settings, store)
    app = FastAPI(title="GEM-3D engine", version=gem3d.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)

    def authorised(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPError(401, "this server needs a token: send 'Authorization: Bearer <token>'")
        if not token_matches(given.strip(), settings.token):
            raise HTTPError(401, "the token was refused; check the token the server was started with")

    def job_or_404(job_id: str) -> Job:
        job = store.job(job_id)
        if job is None:
            raise HTTPError(404, f"job {job_id!r} is unknown here or its results expired "
                                 f"(results are kept {settings.keep_s:g} s after a job ends)")
        return job

    @app.get("/health")
    def health():
        return {"status": "ok", "service": "gem3d", "version": gem3d.__version__}

    @app.get("/v1/info", dependencies=[Depends(authorised)])
    def info():
        return {"version": gem3d.__version__, "bundles": sorted(settings.bundles),
                "devices": [{"device": q.device, "pending": q.pending} for q in store.queues.values()],
                "data_root": settings.data_root is not None,
                "limits": {"max_upload_bytes": settings.max_upload_bytes,
                           "max_jobs_per_client": settings.max_jobs_per_client,
                           "max_queued": settings.max_queued, "keep_results_s": settings.keep_s},
                "upload_extensions": list(READ_EXTENSIONS)}

    @app.get("/v1/bundles", dependencies=[Depends(authorised)])
    def bundles():
        return [bundle_summary(name, path) for name, path in settings.bundles.items()]

    @app.post("/v1/uploads", status_code=201, dependencies=[Depends(authorised)])
    async def upload(request: Request, suffix: str = ".nii.gz"):
        if suffix.lower() not in READ_EXTENSIONS:
            raise HTTPError(400, f"uploads must be one of {', '.join(READ_EXTENSIONS)} files, got {suffix!r}")
        chunks = request_chunks(request, settings.max_upload_bytes)
        upload_id, path = store.new_upload_path(suffix.lower())
        size = 0
        try:
            with open(path, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    f.write(chunk)
            if size == 0:
                raise HTTPError(400, "the upload is empty")
            try:
                check_self_contained(path)
            except ValueError as err:
                raise HTTPError(400, str(err)) from None
            try:
                volume = await anyio.to_thread.run_sync(read_volume, path)
            except (ValueError, OSError, RuntimeError):
                raise HTTPError(400, f"the upload is not a readable 3D {suffix} volume") from None
        except ClientDisconnect:
            path.unlink(missing_ok=True)
            log.info("an upload was cut off by its client after %d bytes; nothing was kept", size)
            return JSONResponse({"error": "the upload was cut off"}, status_code=400)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        store.add_upload(Upload(upload_id, intake.client_key(request), path))
        return {"upload_id": upload_id, "bytes": size, "shape": list(volume.shape)}

    @app.post("/v1/jobs", status_code=201, dependencies=[Depends(authorised)])
    async def submit(request: Request):
        body = b""
        async for chunk in request_chunks(request, settings.max_upload_bytes):
            body += chunk
        try:
            data = typed.loads(body, "the request body")
        except typed.DocumentError as err:
            text = str(err).replace("the request body: not valid JSON", "the request body is not JSON")
            raise HTTPError(400, f"{text}; send the generate request as a JSON object")
        client = intake.client_key(request)
        try:
            store.check_limits(client)
        except LimitError as err:
            raise HTTPError(429, str(err))
        job_id, folder = store.new_job_folder()
        try:
            generate, bundle = intake.job_request(data, job_id, folder)
        except (RequestError, ValueError, TypeError) as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPError(400, as_client_sees(str(err), {f"{folder}{os.sep}": "", **intake.server_paths()}))
        queue = store.pick_device(generate.device)
        job = Job(job_id, client, queue.device, bundle, generate, folder, server_paths=intake.server_paths())
        position = store.submit(job)
        return {"job_id": job_id, "device": queue.device, "position": position,
                "events": f"/v1/jobs/{job_id}/events"}

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(authorised)])
    def status(job_id: str):
        return dict(job_or_404(job_id).status(), expires_in_s=settings.keep_s)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=[Depends(authorised)])
    def cancel(job_id: str):
        job = job_or_404(job_id)
        if not job.done:
            job.cancel_requested = True
        return {"job_id": job_id, "state": job.state}

    @app.get("/v1/jobs/{job_id}/events", dependencies=[Depends(authorised)])
    def events(job_id: str, after: int = -1, slabs: bool = True):
        job = job_or_404(job_id)
        return StreamingResponse(stream(job, after + 1, slabs), media_type=MEDIA_TYPE,
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/outputs/{name}", dependencies=[Depends(authorised)])
    def output(job_id: str, name: str):
        job = job_or_404(job_id)
        path = job.outputs.get(name)
        if path is None or not path.is_file():
            raise HTTPError(404, f"job {job_id!r} has no output {name!r} (outputs: {sorted(job.outputs)})")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{name}{extension(path)}")

    return app


async def request_chunks(request: Request, limit: int):
    """A POST body's chunks, refused (413) once it is over ``limit`` bytes (--max-upload-mb)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, _too_large(int(declared), limit))
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, _too_large(size, limit))
        yield chunk


async def stream(job: Job, seq: int, slabs: bool):
    """The job's events from `seq` on, then new ones as they come, until its last; heartbeats
    while nothing happens (a client tells a busy server from a stuck one)."""
    quiet_since = time.monotonic()
    while True:
        for event, slab in job.events_from(seq):
            yield encode_event(dict(event, slab=slab) if slabs and slab is not None else event)
            seq = event["seq"] + 1
            quiet_since = time.monotonic()
        if job.done and not job.events_from(seq):
            return
        if time.monotonic() - quiet_since > HEARTBEAT_S:
            yield encode_event({"event": "heartbeat", "job_id": job.id, "state": job.state})
            quiet_since = time.monotonic()
        await asyncio.sleep(0.02)


def bundle_summary(name: str, path: Path) -> dict:
    from gem3d.bundle import read_info

    info = read_info(path)
    keys = ("modality", "label_map", "intensity", "slice_size", "window_length", "latent_scale",
            "informed_slice", "sampler", "volumetric", "provenance")
    return {"name": name, **{k: info[k] for k in keys if k in info},
            "slice_model": "slice_model" in info["weights"]}


def _too_large(size: int, limit: int) -> str:
    return (f"the request body is {size / 2**20:.1f} MiB, above this server's limit of {limit / 2**20:.1f} MiB "
            "(--max-upload-mb)")


@contextlib.contextmanager
def temporary_work_folder() -> Iterator[Path]:
    """The server's work folder in the temp folder (it holds patients' uploads): removed when the server
    stops, and, if it was killed instead, at the next server's start."""
    temp = Path(tempfile.gettempdir())
    for folder in temp.glob(f"{WORK_PREFIX}*-*"):
        found = re.match(rf"{WORK_PREFIX}(\d+)-", folder.name)
        if found and folder.is_dir() and not _alive(int(found.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the work folder of a stopped server: %s", folder)
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as work:
        yield Path(work)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would stop it: never swept there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def run(settings: Settings, host: str, port: int) -> None:
    """Load every bundle on every device, then serve until interrupted."""
    import uvicorn

    from gem3d.engine import Engine
    from gem3d.jobs import DeviceQueue

    queues = []
    for device in settings.devices:
        engines = {}
        for name, path in settings.bundles.items():
            log.info("loading bundle %s on %s", name, device)
            engines[name] = Engine(path, device)
        queues.append(DeviceQueue(device, engines, settings.keep_s))
    store = JobStore(settings.work_dir, queues, settings.keep_s, settings.max_jobs_per_client,
                     settings.max_queued)
    store.start()
    log.info("serving %d bundle(s) on %s at http://%s:%d (token %s)", len(settings.bundles),
             ", ".join(settings.devices), host, port, "required" if settings.token else "not required")
    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            store.begin_stop()  # running jobs end within uvicorn's graceful shutdown
            super().handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    config = uvicorn.Config(build_app(settings, store), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=3)
    try:
        StoppingServer(config).run()
    finally:
        store.stop()


def _stopped(signum, frame) -> None:
    """uvicorn re-raises the signal that stopped it, once it has stopped; the signal's default
    action would end the process before the jobs are cancelled and the temporary work folder
    (uploaded scans) is removed, so it is only logged."""
    log.info("stopped by %s", signal.Signals(signum).name)
