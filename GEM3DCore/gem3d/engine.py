"""The engine: a generation request in, a stream of events out (DESIGN.md, "Engine event stream").

read -> pipeline -> write: the reference, the mask and the informed scan are read from the
request's files, `gem3d.pipeline` generates in memory and yields the `started` and `window`
events, and the engine writes the synthetic volume in the reference's geometry, marked
synthetic, with a provenance JSON, then yields `finished` with that volume.

Events are plain dicts (`gem3d.events`); `window` carries its slab and `finished` the whole
synthetic image as numpy arrays under "slab" (the transports frame them in-band). Every failure becomes an `error` event with a sentence a user can act on; the
traceback goes to the log.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Union

import torch

from gem3d import conventions as conventions_lib
from gem3d.bundle import Bundle, load_bundle
from gem3d.events import Event
from gem3d.io import provenance_path, write_volume
from gem3d.outputs import Landing, write_text_atomically
from gem3d.pipeline import SYNTHETIC_DESCRIPTION, SYNTHETIC_MASK, Generated, Pipeline, Switches
from gem3d.preflight import check_request, read_input
from gem3d.queues import take
from gem3d.request import GenerateRequest, RequestError
from gem3d.sampling import Cancelled

log = logging.getLogger("gem3d.engine")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("no CUDA GPU found: generating on the CPU, which is slow for large models")
        return torch.device("cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RequestError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return torch.device(device)


class Engine:
    """Loads a bundle once; `generate(request)` yields events for each request."""

    def __init__(self, bundle: Union[str, Path, Bundle], device: str = "auto", conventions: Optional[str] = None):
        """``conventions``: "gem3d" or "official" (gem3d.conventions); None: the bundle's."""
        conv = conventions_lib.get(conventions) if conventions else None   # a bad name fails before loading
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device) if isinstance(bundle, Bundle) else load_bundle(bundle, self.device)
        self.cfg = self.bundle.config
        self.pipeline = Pipeline(self.bundle, self.device, conv)

    def generate(self, request: GenerateRequest, cancel: Optional[Callable[[], bool]] = None, *,
                 switches: Switches = Switches()) -> Iterator[Event]:
        """``switches``: benchmark and ablation switches (`gem3d.pipeline.Switches`)."""
        job = request.job_id
        try:
            yield from self._generate(request, cancel, switches)
        except Cancelled:
            yield {"event": "cancelled", "job_id": job}
        except (ValueError, OSError, RuntimeError) as err:
            log.debug("job %s failed", job, exc_info=True)
            yield {"event": "error", "job_id": job, "message": _sentence(err)}
        except Exception as err:  # a bug: still an event, with the traceback in the log
            log.exception("job %s crashed", job)
            yield {"event": "error", "job_id": job, "message": f"internal error: {type(err).__name__}: {err}"}

    def _generate(self, request: GenerateRequest, cancel, switches: Switches) -> Iterator[dict]:
        t0 = time.perf_counter()
        check_request(request)
        reference, mask = read_input(request.reference, "reference"), read_input(request.mask, "mask")
        scan = (read_input(request.informed.scan, "informed scan")
                if request.informed.source in ("other", "fixed") else None)
        timings = {"read": time.perf_counter() - t0}
        run = self.pipeline.run(reference, mask, request, scan, cancel, switches=switches)
        for event in run:
            if event["event"] == "window" and "first_window" not in timings:
                timings["first_window"] = time.perf_counter() - t0
            yield event
        timings.update(run.result.timings)
        outputs = write_outputs(run.result, request, timings, t0)
        yield {"event": "finished", "job_id": request.job_id, "outputs": outputs, "timings": timings,
               "slab": run.result.image.array}


class InProcessClient:
    """An `Engine` in this process as an engine client (`gem3d.events.EngineClient`): jobs run one
    at a time on a thread of their own, their events are queued for `poll`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._cancelled: Set[str] = set()
        self._one_at_a_time = threading.Lock()
        self._jobs: Dict[str, threading.Thread] = {}

    def submit(self, request: dict) -> str:
        """Returns the job id; an invalid request ends at once with an `error` event."""
        try:
            parsed = GenerateRequest.from_dict(request)
        except (RequestError, TypeError) as err:
            job_id = request.get("job_id") if isinstance(request, dict) else None
            self._events.put({"event": "error", "job_id": job_id, "message": _sentence(err)})
            return job_id
        thread = threading.Thread(target=self._run, args=(parsed,), name=f"gem3d-{parsed.job_id}", daemon=True)
        self._jobs[parsed.job_id] = thread
        thread.start()
        return parsed.job_id

    def _run(self, request: GenerateRequest) -> None:
        with self._one_at_a_time:
            for event in self.engine.generate(request, cancel=lambda: request.job_id in self._cancelled):
                self._events.put(event)
        self._cancelled.discard(request.job_id)

    def poll(self, timeout: float = 0.0, max_events: Optional[int] = None) -> List[dict]:
        return take(self._events, timeout, max_events)

    def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    @property
    def running(self) -> bool:
        return True                                       # the engine lives as long as this process

    def log_lines(self) -> List[str]:
        return []  # the engine logs through `logging` itself

    def close(self) -> None:
        for job_id in list(self._jobs):
            self.cancel(job_id)
        for thread in list(self._jobs.values()):
            thread.join()


def write_outputs(generated: Generated, request: GenerateRequest, timings: dict, t0: float) -> dict:
    """The synthetic image (marked synthetic), the mask if asked for, and the provenance JSON
    beside the image; adds the write and total times to ``timings``."""
    t3 = time.perf_counter()
    record = generated.record
    metadata = {"gem3d_synthetic": "true", "gem3d_bundle": record["bundle"]["name"],
                "gem3d_seed": str(record["seed"])}
    with Landing() as landed:
        image_path = landed.add(write_volume(generated.image, request.out, description=SYNTHETIC_DESCRIPTION,
                                             metadata=metadata, overwrite=request.overwrite))
        outputs = {"image": str(image_path)}
        if request.mask_out:
            outputs["mask"] = str(landed.add(write_volume(
                generated.mask, request.mask_out, description=SYNTHETIC_MASK,
                metadata={"gem3d_synthetic": "true"}, overwrite=request.overwrite)))
        timings["write"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        path = provenance_path(image_path)
        write_text_atomically(path, json.dumps(dict(record, outputs=outputs, timings=timings), indent=2,
                                               default=str) + "\n")
    outputs["provenance"] = str(path)
    return outputs


def _sentence(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError)) and getattr(err, "filename", None):
        text = f"{err.strerror}: {err.filename}"
    return text
