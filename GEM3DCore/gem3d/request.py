"""A generation request: what the CLI, the stdio worker, the server and Slicer ask the engine for.

The one schema and the one set of rules (torch-free: the editor builds and checks its
requests with it before starting a job). Parsed strictly from JSON-able dicts
(docs/worker-protocol.md), so a misspelt key is an error naming it rather than a silently
ignored option; every problem of a request is reported at once.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, List, Optional

from gem3d.io import input_files, provenance_path
from gem3d.outputs import OutputError, check_outputs
from gem3d.sampler_settings import SAMPLERS
from gem3d.typed import DocumentError

INFORMED_SOURCES = ("same", "other", "generated", "fixed")
DEVICES = ("auto", "cpu", "cuda")


class RequestError(DocumentError):
    """A request that cannot be run, with the reason."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_unit_interval(value) -> bool:
    return _is_number(value) and 0.0 <= float(value) <= 1.0


@dataclass
class InformedSpec:
    """Where the informed slice comes from.

    ``slice``: an index along the scan's slice axis, in the scan's own array;
    ``position``: a normalised height in [0, 1] (used when ``slice`` is None). With neither,
    the slice is taken at the first window's centre (same or another scan), and a generated
    slice at that window's position.
    """

    source: str = "same"
    scan: Optional[str] = None
    slice: Optional[int] = None
    position: Optional[float] = None

    def __post_init__(self):
        _raise(self.problems())

    def problems(self) -> List[str]:
        problems = []
        if self.source not in INFORMED_SOURCES:
            problems.append(f"informed.source must be one of {INFORMED_SOURCES}, got {self.source!r}")
        if self.source in ("other", "fixed") and not self.scan:
            problems.append(f"informed.source {self.source!r} needs informed.scan (a scan file)")
        if self.position is not None and not _in_unit_interval(self.position):
            problems.append(f"informed.position must be in [0, 1], got {self.position!r}")
        if self.slice is not None and not (_is_int(self.slice) and self.slice >= 0):
            problems.append(f"informed.slice must be a non-negative integer, got {self.slice!r}")
        return problems


@dataclass
class GenerateRequest:
    reference: str
    mask: str
    out: str
    mask_out: Optional[str] = None
    bundle: Optional[str] = None
    job_id: str = "job"
    informed: InformedSpec = field(default_factory=InformedSpec)
    start: Optional[float] = None
    edits: List[dict] = field(default_factory=list)
    augment: Optional[str] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    eta: Optional[float] = None
    strength: float = 1.0
    seed: int = 0
    overlap: int = 1
    device: str = "auto"
    overwrite: bool = False
    allow_empty_mask: bool = False

    def __post_init__(self):
        _raise(self.problems())

    def problems(self) -> List[str]:
        """Every reason the request's values are unusable (files are `path_problems`)."""
        problems = [f"{key} is empty" for key in ("reference", "mask", "out", "job_id") if not getattr(self, key)]
        if self.start is not None and not _in_unit_interval(self.start):
            problems.append(f"start must be in [0, 1] or null (random), got {self.start!r}")
        if self.augment not in (None, "paper"):
            problems.append(f"augment must be null or 'paper', got {self.augment!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 1):
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if self.eta is not None and not (_is_number(self.eta) and self.eta >= 0):
            problems.append(f"eta must be a non-negative number, got {self.eta!r}")
        if not (_is_number(self.strength) and 0.0 < float(self.strength) <= 1.0):
            problems.append(f"strength must be a number in (0, 1] (1: sample from noise; lower keeps more of "
                            f"the reference), got {self.strength!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (_is_int(self.overlap) and self.overlap >= 1):
            problems.append(f"overlap must be a positive integer, got {self.overlap!r}")
        if not isinstance(self.edits, list) or not all(isinstance(e, dict) and "op" in e for e in self.edits):
            problems.append("edits must be a list of edit objects such as {\"op\": \"flip\", \"axis\": \"LR\"}")
        if not isinstance(self.device, str) or not (self.device in DEVICES or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.informed, InformedSpec):
            problems.append("informed must be an InformedSpec")
        return problems

    def path_problems(self, expected_bytes: int = 0, protected=()) -> List[str]:
        """Every reason the request's files are unusable: missing inputs, or an output (the
        image, --mask-out, the provenance beside the image) that would replace an input or an
        existing file without ``overwrite``, lie in a `protected` folder or not fit on disk."""
        problems = []
        scan = self.informed.scan if self.informed.source in ("other", "fixed") else None
        for key, path in (("reference", self.reference), ("mask", self.mask), ("informed.scan", scan)):
            if path and not (os.path.isfile(path) or os.path.isdir(path)):  # a folder: a DICOM series
                problems.append(f"the {key} file {path} does not exist")
        if self.bundle and not os.path.isfile(os.path.join(self.bundle, "bundle.json")):
            problems.append(f"the model bundle folder {self.bundle} has no bundle.json")
        try:
            check_outputs(self.outputs(), self.inputs(), self.overwrite, expected_bytes, protected)
        except OutputError as err:
            problems.append(str(err))
        return problems

    def inputs(self) -> List[str]:
        """Every file the request reads: edits may name a source mask, and a header's detached
        data files are read too."""
        sources = [e.get("source") for e in self.edits if isinstance(e, dict) and isinstance(e.get("source"), str)]
        return [str(f) for p in (self.reference, self.mask, self.informed.scan, *sources) if p for f in input_files(p)]

    def outputs(self) -> Dict[str, str]:
        """{what the user typed: path} of every file the request writes."""
        outputs = {"--out": self.out, "provenance": str(provenance_path(self.out))}
        if self.mask_out:
            outputs["--mask-out"] = self.mask_out
        return outputs

    def with_absolute_paths(self) -> "GenerateRequest":
        """The same request with absolute paths (the worker may run in another folder)."""
        absolute = {key: os.path.abspath(getattr(self, key)) if getattr(self, key) else getattr(self, key)
                    for key in ("reference", "mask", "out", "mask_out", "bundle")}
        scan = os.path.abspath(self.informed.scan) if self.informed.scan else self.informed.scan
        return replace(self, informed=replace(self.informed, scan=scan), **absolute)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerateRequest":
        if not isinstance(data, dict):
            raise RequestError(f"a request is a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "type"}
        check_keys(data)
        missing = [k for k in ("reference", "mask", "out") if not data.get(k)]
        if missing:
            raise RequestError(f"request needs {missing}")
        return cls(**dict(data, informed=InformedSpec(**(data.get("informed") or {}))))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_message(self) -> dict:
        """The worker's JSON `generate` line (docs/worker-protocol.md)."""
        return {"type": "generate", **self.to_dict()}


def check_keys(data: dict) -> None:
    """Unknown keys of a request or of its informed spec are an error that names them."""
    known = {f.name for f in fields(GenerateRequest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RequestError(f"unknown request key(s) {unknown}; known: {sorted(known)}")
    informed = data.get("informed") or {}
    if not isinstance(informed, dict):
        raise RequestError("informed must be an object like {\"source\": \"same\"}")
    unknown = sorted(set(informed) - {f.name for f in fields(InformedSpec)})
    if unknown:
        raise RequestError(f"unknown informed key(s) {unknown}")


def cancel_message(job_id: str) -> dict:
    """The worker's JSON `cancel` line."""
    return {"type": "cancel", "job_id": job_id}


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:12]


def _raise(problems: List[str]) -> None:
    if problems:
        raise RequestError("; ".join(problems))
