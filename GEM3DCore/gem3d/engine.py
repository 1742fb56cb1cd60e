"""The engine: a generation request in, a stream of events out (DESIGN.md, "Engine event stream").

read -> pipeline -> write: the reference, the mask and the informed scan are read from the
request's files, `gem3d.pipeline` generates in memory and yields the `started` and `window`
events, and the engine writes the synthetic volume in the reference's geometry, marked
synthetic, with a provenance JSON, then yields `finished`.

Events are plain dicts; `window` carries its slab as a numpy array (the stdio worker turns it
into a file). Every failure becomes an `error` event with a sentence a user can act on; the
traceback goes to the log.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from gem3d import conventions as conventions_lib
from gem3d.bundle import Bundle, load_bundle
from gem3d.io import provenance_path, write_volume
from gem3d.outputs import write_text_atomically
from gem3d.pipeline import SYNTHETIC_DESCRIPTION, SYNTHETIC_MASK, Generated, Pipeline, Switches
from gem3d.preflight import check_request, read_input
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
                 switches: Switches = Switches()) -> Iterator[dict]:
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
        for event in self.pipeline.run(reference, mask, request, scan, cancel, switches=switches):
            if event["event"] == "window" and "first_window" not in timings:
                timings["first_window"] = time.perf_counter() - t0
            if event["event"] != "generated":
                yield event
                continue
            timings.update(event["timings"])
            outputs = write_outputs(event["result"], request, timings, t0)
            yield {"event": "finished", "job_id": request.job_id, "outputs": outputs, "timings": timings}


def write_outputs(generated: Generated, request: GenerateRequest, timings: dict, t0: float) -> dict:
    """The synthetic image (marked synthetic), the mask if asked for, and the provenance JSON
    beside the image; adds the write and total times to ``timings``."""
    t3 = time.perf_counter()
    record = generated.record
    metadata = {"gem3d_synthetic": "true", "gem3d_bundle": record["bundle"]["name"],
                "gem3d_seed": str(record["seed"])}
    image_path = write_volume(generated.image, request.out, description=SYNTHETIC_DESCRIPTION,
                              metadata=metadata, overwrite=request.overwrite)
    outputs = {"image": str(image_path)}
    if request.mask_out:
        outputs["mask"] = str(write_volume(generated.mask, request.mask_out, description=SYNTHETIC_MASK,
                                           metadata={"gem3d_synthetic": "true"}, overwrite=request.overwrite))
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
