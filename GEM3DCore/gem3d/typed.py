"""The one typed layer every document crosses before code uses it: requests, edits,
bundle.json, dataset.json, configs, protocol messages and HTTP bodies.

JSON and YAML are read here (and only here): a regular file of bounded size, UTF-8, nesting at
most MAX_DEPTH levels, no NaN/Infinity constants. The field helpers check a value's type,
finiteness and range. Every problem is a `DocumentError`: one sentence naming the file (or
message) and the field, so no caller sees a RecursionError, a KeyError or an AttributeError.
Torch-free and pydantic-free (numpy + stdlib), because the editor runs it inside Slicer.
"""
from __future__ import annotations

import json
import math
import os
import stat
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Union

MAX_DEPTH = 16
MAX_STRING = 4096
MAX_INT = 2 ** 63 - 1
MAX_DOCUMENT_BYTES = 16 << 20


class DocumentError(ValueError):
    """A document (file or message) that is not what its reader expects, as one sentence."""


def regular_file(path: Union[str, Path], what: str = "file") -> Path:
    """`path` if it is an existing regular file (after symlinks); FIFOs, devices, folders,
    symlink loops and too-long names are one sentence, never a hang or a traceback."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DocumentError(f"the {what} {path} does not exist") from None
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES...
        raise DocumentError(f"cannot open the {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise DocumentError(f"the {what} {path} is {kind}; give a regular file")
    return path


def loads(text: Union[str, bytes], where: str) -> Any:
    """JSON text as Python values, depth and constants checked; `where` names the source."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DocumentError(f"{where}: not UTF-8 text (byte {err.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise DocumentError(f"{where}: the JSON nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, or a NaN/Infinity constant
        detail = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) \
            else str(err)
        raise DocumentError(f"{where}: not valid JSON ({detail})") from None
    check_depth(value, where)
    return value


def load_json(path: Union[str, Path], what: str = "JSON file") -> Any:
    """A JSON file: regular, at most MAX_DOCUMENT_BYTES, valid, not too deep."""
    return loads(_read(path, what), str(path))


def load_yaml(path: Union[str, Path], what: str = "YAML file") -> Any:
    """A YAML file (safe loader), or JSON when it ends in .json."""
    if str(path).lower().endswith(".json"):
        return load_json(path, what)
    import yaml  # only configs are YAML; the editor never needs PyYAML

    text = _read(path, what)
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise DocumentError(f"{path}: the YAML nests deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise DocumentError(f"{path}: not valid YAML ({problem}{place})") from None
    check_depth(value, str(path))
    _check_finite_tree(value, str(path), "")
    return value


def _read(path: Union[str, Path], what: str) -> bytes:
    path = regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as err:
        raise DocumentError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"the {what} {path} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB; "
                            "it is not a document gem3d writes")
    return data


def check_depth(value: Any, where: str) -> None:
    if depth(value) > MAX_DEPTH:
        raise DocumentError(f"{where}: the document nests deeper than {MAX_DEPTH} levels")


def depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of containers, not looking deeper than `limit`."""
    if not isinstance(value, (dict, list)):
        return 0
    if limit <= 1:
        return 1
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((depth(v, limit - 1) for v in children), default=0)


def _check_finite_tree(value: Any, where: str, name: str) -> None:
    """YAML allows .nan and .inf; no document gem3d reads means them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise DocumentError(f"{where}: field '{name}' is {value}, not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        _check_finite_tree(child, where, f"{name}.{key}" if name else str(key))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# ------------------------------------------------------------------ fields
def obj(value: Any, where: str, name: str = "") -> dict:
    """`value` as a JSON object (the document itself when `name` is empty)."""
    if not isinstance(value, dict):
        raise DocumentError(f"{where}: {_field(name)} must be an object, got {show(value)}")
    return value


def array(value: Any, where: str, name: str) -> list:
    if not isinstance(value, list):
        raise DocumentError(f"{where}: {_field(name)} must be a list, got {show(value)}")
    return value


def string(value: Any, where: str, name: str) -> str:
    if not matches(value, str):
        raise DocumentError(f"{where}: {_field(name)} must be {describe(str)}, got {show(value)}")
    return value


def number(value: Any, where: str, name: str, low: Optional[float] = None, high: Optional[float] = None,
           integer: bool = False) -> Union[int, float]:
    """A finite number (an integer when `integer`; 3.0 counts) in [low, high]."""
    ok = matches(value, float) and (not integer or float(value).is_integer())
    if ok and integer:
        value = int(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = "" if low is None and high is None else \
            f" in [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise DocumentError(f"{where}: {_field(name)} must be {'an integer' if integer else 'a finite number'}"
                            f"{bounds}, got {show(value)}")
    return value


def numbers(value: Any, where: str, name: str, count: int, **bounds) -> list:
    """A list of exactly `count` numbers (each checked like `number`)."""
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise DocumentError(f"{where}: {_field(name)} must be a list of {count} numbers, got {show(value)}")
    return [number(v, where, f"{name}[{i}]", **bounds) for i, v in enumerate(value)]


def choice(value: Any, where: str, name: str, options: Sequence) -> Any:
    if not isinstance(value, (str, int, float, type(None))) or value not in options:
        raise DocumentError(f"{where}: {_field(name)} must be one of {list(options)}, got {show(value)}")
    return value


def _field(name: str) -> str:
    return f"field '{name}'" if name else "the document"


def matches(value: Any, expected: Any) -> bool:
    """`value` (from JSON) fits the annotation `expected` (Optional/Union/List of bool, int,
    float, str, dict): ints are bounded, floats finite, strings non-empty, short and NUL-free."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Union:
        return any(matches(value, a) for a in args)
    if expected is type(None):
        return value is None
    if origin in (list, typing.List):
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_INT \
            and math.isfinite(value)
    if expected is str:
        return isinstance(value, str) and 0 < len(value) <= MAX_STRING and "\x00" not in value
    if expected is dict:
        return isinstance(value, dict)
    return isinstance(value, expected)


def describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Union:
        return " or ".join(describe(a) for a in args)
    if origin in (list, typing.List):
        return f"a list of {describe(args[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: f"a non-empty string (at most {MAX_STRING} characters)", dict: "an object"}.get(
        expected, getattr(expected, "__name__", str(expected)))


def show(value: Any) -> str:
    """A short, safe rendering of a value for an error message."""
    try:
        text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
