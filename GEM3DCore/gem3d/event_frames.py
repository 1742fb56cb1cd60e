"""Wire format of `gem3d serve`'s event stream (docs/worker-protocol.md, "HTTP").

One JSON line per event; a `window` event's slab follows its line as raw bytes
(C order, the dtype and shape named in the line's ``"slab"`` header), so a
512 x 512 slab costs its bytes and no base64. numpy only: the remote client
imports this inside Slicer, where torch may be absent.
"""
from __future__ import annotations

import json
from typing import BinaryIO, Optional

import numpy as np

MEDIA_TYPE = "application/vnd.gem3d.events"
MAX_HEADER = 1 << 20  # a header line longer than this is a broken stream


class StreamError(ValueError):
    """The event stream ended in the middle of an event or is not this format."""


def encode_event(event: dict, slab: Optional[np.ndarray] = None) -> bytes:
    """One frame: the event as a JSON line, then the slab's bytes if there is one."""
    header = dict(event)
    header.pop("slab", None)
    if slab is None:
        return (json.dumps(header) + "\n").encode()
    slab = np.ascontiguousarray(slab)
    header["slab"] = {"dtype": slab.dtype.str, "shape": list(slab.shape), "nbytes": int(slab.nbytes)}
    return (json.dumps(header) + "\n").encode() + slab.tobytes()


def read_event(stream: BinaryIO) -> Optional[dict]:
    """The next event (with its slab as an array under ``"slab"``), or None at a clean end."""
    line = stream.readline(MAX_HEADER)
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise StreamError("the event stream ended in the middle of an event")
    try:
        event = json.loads(line)
    except ValueError:
        raise StreamError("the event stream holds a line that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise StreamError("the event stream holds a line that is not an event")
    header = event.get("slab")
    if header is not None:
        try:
            dtype, shape, nbytes = np.dtype(header["dtype"]), tuple(header["shape"]), int(header["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise StreamError("a window event has an unreadable slab header") from None
        if dtype.hasobject or int(np.prod(shape)) * dtype.itemsize != nbytes:
            raise StreamError("a window event's slab header does not describe its bytes")
        data = _read_exactly(stream, nbytes)
        event["slab"] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return event


def _read_exactly(stream: BinaryIO, nbytes: int) -> bytes:
    chunks, left = [], nbytes
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise StreamError("the event stream ended in the middle of a window's slab")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
