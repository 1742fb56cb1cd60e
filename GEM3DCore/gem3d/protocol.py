"""Parsing of protocol messages (stdio worker, HTTP server): any line in, a request or an
`error` event out, never an exception.

Limits, stated once (docs/worker-protocol.md): a line is at most MAX_LINE bytes, job ids match
JOB_ID (they become parts of file names); depth, string and number rules are the typed layer's
(`gem3d.typed`). Every field is type-checked against `GenerateRequest`'s own
annotations, so a wrong type is an error naming the field, not a crash later on.
"""
from __future__ import annotations

import re
import typing
from typing import IO, Iterator, Optional, Union

from gem3d import typed
from gem3d.request import GenerateRequest, InformedSpec, RequestError, check_keys

MAX_LINE = 1 << 20
MAX_STEPS = 1000
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TYPES = ("generate", "cancel")


def error_event(message: str, job_id: Optional[str] = None) -> dict:
    return {"event": "error", "job_id": job_id, "message": message}


def parse_message(line: Union[str, bytes]) -> dict:
    """{"type": "generate", "job_id", "request": GenerateRequest}, {"type": "cancel", "job_id"},
    or an `error` event (with the job id when one could be read safely)."""
    try:
        return _parse(line)
    except RequestError as err:
        return error_event(str(err), _safe_job_id(line))
    except Exception as err:  # a parser bug must still be an answer, not a dead reader
        return error_event(f"could not read the request ({type(err).__name__}: {err})")


def _parse(line) -> dict:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"not UTF-8 text (byte {err.start}); send one JSON object per line") from None
    if len(line.encode("utf-8", "surrogatepass")) > MAX_LINE:
        raise RequestError(f"the line is longer than {MAX_LINE} bytes; requests are small JSON objects")
    try:
        message = typed.loads(line, "the message")
    except typed.DocumentError as err:
        text = str(err).replace("the message: not valid JSON", "not a JSON line")
        raise RequestError(f"{text}: {line[:80]!r}" if text.startswith("not a JSON line") else text) from None
    if not isinstance(message, dict):
        raise RequestError(f"a message is a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if kind not in TYPES:
        raise RequestError(f"field 'type': expected one of {TYPES}, got {typed.show(kind)}")
    job_id = check_job_id(message.get("job_id", "job" if kind == "generate" else None))
    if kind == "cancel":
        extra = sorted(set(message) - {"type", "job_id"})
        if extra:
            raise RequestError(f"unknown cancel key(s) {extra}; a cancel is {{\"type\": \"cancel\", \"job_id\": ...}}")
        return {"type": "cancel", "job_id": job_id}
    data = {k: v for k, v in message.items() if k != "type"}
    return {"type": "generate", "job_id": job_id, "request": request_from_dict(data)}


def request_from_dict(data: dict) -> GenerateRequest:
    """A `GenerateRequest` from untrusted JSON: unknown keys, wrong types and out-of-range
    values are a RequestError naming the field."""
    check_keys(data)
    _check_types(data, GenerateRequest, "")
    if isinstance(data.get("informed"), dict):
        _check_types(data["informed"], InformedSpec, "informed.")
    if data.get("steps") is not None and data["steps"] > MAX_STEPS:
        raise RequestError(f"field 'steps': at most {MAX_STEPS}, got {data['steps']}")
    if "job_id" in data:
        check_job_id(data["job_id"])
    try:
        return GenerateRequest.from_dict(data)
    except RequestError:
        raise
    except (TypeError, ValueError) as err:
        raise RequestError(f"invalid request: {err}") from None


def check_job_id(job_id) -> str:
    """A job id safe to use in file names and as a dict key."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise RequestError(f"field 'job_id': 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter "
                           f"or digit), got {typed.show(job_id)}")
    return job_id


def _check_types(data: dict, cls, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        expected = hints[name]
        if expected is InformedSpec:
            expected = Optional[dict]
        if not typed.matches(value, expected):
            raise RequestError(f"field '{prefix}{name}': expected {typed.describe(expected)}, got {typed.show(value)}")


def _safe_job_id(line) -> Optional[str]:
    """The job id of a line that failed elsewhere, when it is itself valid (for the error event)."""
    match = re.search(r'"job_id"\s*:\s*"([A-Za-z0-9._-]{1,64})"', line if isinstance(line, str) else "")
    return match.group(1) if match and JOB_ID.match(match.group(1)) else None


def read_lines(stream: IO[str], limit: int = MAX_LINE) -> Iterator[str]:
    """Lines of `stream`; a line longer than `limit` is consumed in chunks and given as a
    marker the parser refuses, so one huge line never fills the memory."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith("\n"):
            while True:
                rest = stream.readline(limit)
                if not rest or rest.endswith("\n"):
                    break
            yield "x" * (limit + 1)
            continue
        yield line
