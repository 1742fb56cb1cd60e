"""The worker's JSON `generate` request, built from plain values and validated before it is sent.

See docs/worker-protocol.md. All paths are made absolute: the worker may run in another folder.
"""
from __future__ import annotations

import os
import uuid
from typing import Dict, Iterable, List, Optional

INFORMED_SOURCES = ("same", "other", "generated", "fixed")
SAMPLERS = ("dpm++", "ddim", "unipc")
DEVICES = ("auto", "cpu", "cuda")
MAX_STEPS = 1000


class RequestError(ValueError):
    """A request the worker would refuse; the message lists every problem."""


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:12]


def job_paths(work_dir: str, job_id: str, extension: str = ".nrrd") -> Dict[str, str]:
    """Where the module writes a job's inputs and where the worker writes its output.

    NRRD: Slicer writes it with the volume's geometry converted from RAS to the file's LPS.
    """
    folder = os.path.abspath(os.path.join(work_dir, job_id))
    return {"folder": folder,
            "reference": os.path.join(folder, "reference" + extension),
            "mask": os.path.join(folder, "mask" + extension),
            "informed": os.path.join(folder, "informed" + extension),
            "out": os.path.join(folder, "synthetic.nii.gz")}


def slice_to_position(index: int, count: int) -> float:
    """Normalised height of slice `index` as gem3d reads it: round(p * (count - 1)) == index."""
    if count <= 0 or not 0 <= index < count:
        raise RequestError(f"slice {index} is outside a volume of {count} slices")
    return index / max(count - 1, 1)


def _abs(path: Optional[str]) -> Optional[str]:
    return None if path in (None, "") else os.path.abspath(os.fspath(path))


def build_generate_request(job_id: str, bundle: str, reference: str, mask: str, out: str,
                           informed_source: str = "same", informed_scan: Optional[str] = None,
                           informed_slice: Optional[int] = None,
                           informed_position: Optional[float] = None,
                           start: Optional[float] = 0.5, edits: Iterable[dict] = (),
                           augment: Optional[str] = None, sampler: Optional[str] = None,
                           steps: Optional[int] = None, seed: int = 0, device: str = "auto") -> dict:
    """A `generate` request (a dict ready for json.dumps). sampler/steps None: the bundle's;
    start None: around the informed slice picked on the reference, else random (seeded)."""
    return {
        "type": "generate", "job_id": job_id,
        "bundle": _abs(bundle), "reference": _abs(reference), "mask": _abs(mask),
        "informed": {"source": informed_source, "scan": _abs(informed_scan),
                     "slice": None if informed_slice is None else int(informed_slice),
                     "position": None if informed_position is None else float(informed_position)},
        "start": None if start is None else float(start), "edits": [dict(e) for e in edits], "augment": augment,
        "sampler": sampler or None, "steps": int(steps) if steps else None, "seed": int(seed),
        "device": device,
        "out": _abs(out),
    }


def cancel_request(job_id: str) -> dict:
    return {"type": "cancel", "job_id": job_id}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def request_problems(request: dict) -> List[str]:
    """Every reason the request is unusable (empty when it is fine)."""
    problems = []
    if request.get("type") != "generate":
        problems.append(f"type must be 'generate', got {request.get('type')!r}")
    if not request.get("job_id"):
        problems.append("job_id is empty")
    bundle = request.get("bundle")
    if not bundle or not os.path.isfile(os.path.join(bundle, "bundle.json")):
        problems.append(f"model bundle folder {bundle!r} has no bundle.json")
    for key in ("reference", "mask"):
        path = request.get(key)
        if not path or not os.path.isfile(path):
            problems.append(f"{key} file {path!r} does not exist")
    out = request.get("out")
    if not out:
        problems.append("out (the output path) is empty")
    else:
        if os.path.exists(out):
            problems.append(f"output {out!r} exists already; it is never overwritten")
        inputs = [request.get("reference"), request.get("mask"),
                  (request.get("informed") or {}).get("scan")]
        if any(p and os.path.abspath(p) == os.path.abspath(out) for p in inputs):
            problems.append(f"output {out!r} is one of the inputs")
    start = request.get("start")
    if start is not None and (not _is_number(start) or not 0.0 <= start <= 1.0):
        problems.append(f"start position must be null (around the informed slice, else random) or in [0, 1], "
                        f"got {start!r}")
    steps = request.get("steps")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
        problems.append(f"steps must be null (the bundle's) or an integer in [1, {MAX_STEPS}], got {steps!r}")
    seed = request.get("seed")
    if not _is_int(seed) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if request.get("sampler") is not None and request.get("sampler") not in SAMPLERS:
        problems.append(f"sampler must be null (the bundle's) or one of {', '.join(SAMPLERS)}, "
                        f"got {request.get('sampler')!r}")
    device = request.get("device")
    if not isinstance(device, str) or not (device in DEVICES or device.startswith("cuda:")):
        problems.append(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if request.get("augment") not in (None, "paper"):
        problems.append(f"augment must be null or 'paper', got {request.get('augment')!r}")
    if not isinstance(request.get("edits"), list):
        problems.append("edits must be a list of mask-edit specs")
    else:
        for edit in request["edits"]:
            if not isinstance(edit, dict) or "op" not in edit:
                problems.append(f"mask edit {edit!r} has no 'op'")
    problems.extend(_informed_problems(request.get("informed")))
    return problems


def _informed_problems(informed) -> List[str]:
    if not isinstance(informed, dict):
        return ["informed must be an object with source, scan, slice, position"]
    problems = []
    source = informed.get("source")
    if source not in INFORMED_SOURCES:
        problems.append(f"informed source must be one of {', '.join(INFORMED_SOURCES)}, got {source!r}")
    index, position = informed.get("slice"), informed.get("position")
    if index is not None and (not _is_int(index) or index < 0):
        problems.append(f"informed slice must be a non-negative integer, got {index!r}")
    if position is not None and (not _is_number(position) or not 0.0 <= position <= 1.0):
        problems.append(f"informed position must be in [0, 1], got {position!r}")
    if source in ("other", "fixed"):
        scan = informed.get("scan")
        if not scan or not os.path.isfile(scan):
            problems.append(f"informed scan {scan!r} does not exist (needed for source '{source}')")
        if index is None and position is None:
            problems.append(f"informed source '{source}' needs a slice index or a position")
    return problems


def validate_request(request: dict) -> dict:
    """The request itself, or RequestError naming every problem."""
    problems = request_problems(request)
    if problems:
        raise RequestError("Invalid generate request: " + "; ".join(problems) + ".")
    return request
