"""A generation request: what the CLI, the stdio worker and Slicer ask the engine for.

Parsed strictly from JSON-able dicts (docs/worker-protocol.md), so a misspelt
key is an error naming it rather than a silently ignored option.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from gem3d.sampling import SAMPLERS

INFORMED_SOURCES = ("same", "other", "generated", "fixed")


class RequestError(ValueError):
    """A request that cannot be run, with the reason."""


@dataclass
class InformedSpec:
    """Where the informed slice comes from.

    ``slice``: an index along the scan's slice axis, in the scan's own array;
    ``position``: a normalised height in [0, 1] (used when ``slice`` is None).
    """

    source: str = "same"
    scan: Optional[str] = None
    slice: Optional[int] = None
    position: Optional[float] = None

    def __post_init__(self):
        if self.source not in INFORMED_SOURCES:
            raise RequestError(f"informed.source must be one of {INFORMED_SOURCES}, got {self.source!r}")
        if self.source in ("other", "fixed") and not self.scan:
            raise RequestError(f"informed.source {self.source!r} needs informed.scan (a scan file)")
        if self.position is not None and not 0.0 <= float(self.position) <= 1.0:
            raise RequestError(f"informed.position must be in [0, 1], got {self.position}")
        if self.slice is not None and (isinstance(self.slice, bool) or int(self.slice) != self.slice
                                       or self.slice < 0):
            raise RequestError(f"informed.slice must be a non-negative integer, got {self.slice!r}")


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
    seed: int = 0
    overlap: int = 1
    device: str = "auto"
    overwrite: bool = False
    allow_empty_mask: bool = False

    def __post_init__(self):
        if self.start is not None and not 0.0 <= float(self.start) <= 1.0:
            raise RequestError(f"start must be in [0, 1] or null (random), got {self.start}")
        if self.augment not in (None, "paper"):
            raise RequestError(f"augment must be null or 'paper', got {self.augment!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise RequestError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise RequestError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.edits, list) or not all(isinstance(e, dict) for e in self.edits):
            raise RequestError("edits must be a list of edit objects such as {\"op\": \"flip\", \"axis\": \"LR\"}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise RequestError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "GenerateRequest":
        if not isinstance(data, dict):
            raise RequestError(f"a request is a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "type"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(f"unknown request key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("reference", "mask", "out") if not data.get(k)]
        if missing:
            raise RequestError(f"request needs {missing}")
        informed = data.get("informed") or {}
        if not isinstance(informed, dict):
            raise RequestError("informed must be an object like {\"source\": \"same\"}")
        unknown = sorted(set(informed) - {f.name for f in fields(InformedSpec)})
        if unknown:
            raise RequestError(f"unknown informed key(s) {unknown}")
        return cls(**dict(data, informed=InformedSpec(**informed)))

    def to_dict(self) -> dict:
        return asdict(self)
