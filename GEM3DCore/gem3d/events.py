"""The engine's event stream as a contract (DESIGN.md, "Engine event stream"; docs/worker-protocol.md).

One set of event kinds and their fields, one terminal set, and one framing used by every
transport (the stdio worker's stdout and `gem3d serve`'s event stream alike): each event is a
JSON header line; an event with an array (a `window`'s slab, `finished`'s volume) names it in
the header's ``"slab"`` field (dtype, shape, nbytes) and is followed by exactly those bytes,
C order, so the array travels in-band without a side file and without base64. In-process
engines yield the same dicts with the array itself under ``"slab"``.

numpy only: the clients import this inside Slicer, where torch may be absent.
"""
from __future__ import annotations

import json
from typing import BinaryIO, Dict, List, Optional, Protocol, Tuple, TypedDict

import numpy as np

from gem3d import typed

MEDIA_TYPE = "application/vnd.gem3d.events"
MAX_HEADER = 1 << 20  # a header line longer than this is a broken stream

class Event(TypedDict):
    event: str  # the kind: a key of EVENTS
    job_id: Optional[str]


class Started(Event):
    shape: List[int]  # the reference array's (z, y, x)
    geometry: dict  # `gem3d.volume.Geometry.to_dict()`
    axis: int  # the reference array axis of the model's slice axis
    plan: List[dict]  # {"start", "stop", "direction"} per window, in reference indices along `axis`


class Window(Event):
    axis: int
    start: int
    stop: int
    direction: str  # "first", "up", "down"
    progress: float  # 0..1
    slab: np.ndarray  # the output between start and stop along axis, float32, output units


class Heartbeat(Event, total=False):
    elapsed: float  # the stdio worker: seconds since the job started
    state: str  # `gem3d serve`: the job's state


class Upload(Event):
    file: str  # reference, mask, informed
    done: int  # bytes of all the job's uploads
    total: int


class Queued(Event):
    device: str
    position: int  # jobs ahead


class Finished(Event):
    outputs: Dict[str, str]  # image, provenance, mask: paths
    timings: Dict[str, float]  # seconds
    slab: np.ndarray  # the synthetic image as written to outputs["image"]


class Cancelled(Event):
    pass


class Error(Event):
    message: str  # one sentence a user can act on


#: Every event kind and its type. `queued` and `upload` come from `gem3d serve` and `gem3d.remote` only.
EVENTS = {"started": Started, "window": Window, "heartbeat": Heartbeat, "upload": Upload, "queued": Queued,
          "finished": Finished, "cancelled": Cancelled, "error": Error}
#: The fields of each kind besides ``event`` and ``job_id`` (``slab``: an array, in-band on the wire).
FIELDS: Dict[str, Tuple[str, ...]] = {kind: tuple(k for k in cls.__annotations__ if k not in Event.__annotations__)
                                      for kind, cls in EVENTS.items()}
KINDS = tuple(FIELDS)
#: The kinds that end a job: exactly one of them is a job's last event.
TERMINAL = frozenset({"finished", "cancelled", "error"})


class EngineClient(Protocol):
    """What a consumer (the Slicer module, the browser editor, a script) needs of an engine, wherever
    it runs: `gem3d.engine.InProcessClient`, `gem3d.worker_client.WorkerClient` (the stdio worker),
    `gem3d.remote.RemoteClient` (`gem3d serve`). None of them raises for a job's failure: every
    submitted job ends with exactly one event of `TERMINAL`."""

    def submit(self, request: dict) -> str:
        """Start a `generate` request (`gem3d.request` as a dict, local paths); returns its job id."""

    def poll(self, timeout: float = 0.0, max_events: Optional[int] = None) -> List[Event]:
        """The events that arrived so far, in order (waits up to ``timeout`` s for the first)."""

    def cancel(self, job_id: str) -> None:
        """Ask the job to stop; it ends with `cancelled` (or whatever it reached first)."""

    def log_lines(self) -> List[str]:
        """The client's log lines so far (engine output, reconnections), for the caller's thread to log."""

    def close(self) -> None:
        """Stop every job and release the engine (process, connection)."""

    @property
    def running(self) -> bool:
        """False once the engine is gone for good (a worker process that exited): a caller that
        keeps a client between jobs makes a new one. A server that cannot be reached is not
        gone: its jobs end with `error` events, and the next job tries again."""


class StreamError(ValueError):
    """The event stream ended in the middle of an event or is not this format."""


def is_terminal(event: dict) -> bool:
    return event.get("event") in TERMINAL


def encode_event(event: dict) -> bytes:
    """One frame: the event as a JSON line, then its ``"slab"`` array's bytes if it has one."""
    header = dict(event)
    slab = header.pop("slab", None)
    if slab is None:
        return (json.dumps(header, default=str) + "\n").encode()
    slab = np.ascontiguousarray(slab)
    header["slab"] = {"dtype": slab.dtype.str, "shape": list(slab.shape), "nbytes": int(slab.nbytes)}
    return (json.dumps(header, default=str) + "\n").encode() + slab.tobytes()


def parse_header(line: bytes) -> dict:
    """An event from its header line (its slab, if any, still to be read with `read_slab`)."""
    try:
        event = typed.loads(line, "the event stream")
    except ValueError:
        raise StreamError("the event stream holds a line that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise StreamError("the event stream holds a line that is not an event")
    return event


def read_slab(stream: BinaryIO, event: dict) -> dict:
    """Replace the header's ``"slab"`` description by the array that follows it in ``stream``."""
    header = event.get("slab")
    if header is None:
        return event
    try:
        dtype, shape, nbytes = np.dtype(header["dtype"]), tuple(header["shape"]), int(header["nbytes"])
    except (KeyError, TypeError, ValueError):
        raise StreamError("an event has an unreadable slab header") from None
    if dtype.hasobject or int(np.prod(shape)) * dtype.itemsize != nbytes:
        raise StreamError("an event's slab header does not describe its bytes")
    event["slab"] = np.frombuffer(_read_exactly(stream, nbytes), dtype=dtype).reshape(shape)
    return event


def read_event(stream: BinaryIO) -> Optional[dict]:
    """The next event (with its slab as an array under ``"slab"``), or None at a clean end."""
    line = stream.readline(MAX_HEADER)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise StreamError("the event stream ended in the middle of an event")
    return read_slab(stream, parse_header(line))


def _read_exactly(stream: BinaryIO, nbytes: int) -> bytes:
    chunks, left = [], nbytes
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise StreamError("the event stream ended in the middle of an event's slab")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

