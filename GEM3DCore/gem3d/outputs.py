"""Outputs: planned and checked before any work, written atomically and verified.

`check_outputs` runs when a job starts, so a read-only folder, a full disk or an output that
would replace an input is found before minutes of sampling, not after. `write_atomically`
writes into a temporary file in the destination folder, fsyncs it, verifies it and renames it
into place: a reader sees the old file or the complete new one, never a partial one, and a
failed write leaves nothing behind (leftovers of a killed process are removed by the next
write to the same path, or by the next probe of the folder).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Union

PathLike = Union[str, Path]
PARTIAL = ".gem3d-partial."  # prefix of temporary files: recognisable, hidden, same ending
PROBE_LIMIT = 64 << 20


class OutputError(ValueError):
    """An output that must not or cannot be written, with what to do instead."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(outputs: Dict[str, PathLike], inputs: Iterable[Optional[PathLike]] = (),
                  overwrite: bool = False, expected_bytes: int = 0,
                  protected: Iterable[PathLike] = ()) -> None:
    """Refuse, before any work, outputs that equal an input, lie inside a `protected` folder
    (a source dataset), exist without `overwrite`, collide with each other, or whose folder is
    missing, not writable or short of `expected_bytes` of free space. `outputs`: {name: path},
    the name is what the user typed (e.g. "--mask-out")."""
    try:
        sources = {Path(p).resolve(): Path(p) for p in inputs if p}
        folders = [Path(p).resolve() for p in protected if p]
    except (OSError, RuntimeError) as err:  # a symlink loop or a name too long among the inputs
        raise OutputError(f"cannot resolve an input path: {getattr(err, 'strerror', None) or err}") from None
    seen: Dict[Path, str] = {}
    for name, path in outputs.items():
        path = Path(path)
        try:
            _check_one(name, path, sources, folders, seen, overwrite)
        except (OSError, RuntimeError) as err:
            raise OutputError(f"cannot write {name} {path}: {getattr(err, 'strerror', None) or err}; "
                              "choose another path") from None
    for folder in {Path(p).resolve().parent for p in outputs.values()}:
        check_folder(folder, expected_bytes)


def _check_one(name: str, path: Path, sources: Dict[Path, Path], folders: list, seen: Dict[Path, str],
               overwrite: bool) -> None:
    """`check_outputs`' rules for one output."""
    resolved = path.resolve()
    if resolved in sources:
        raise OutputError(f"{name} {path} would overwrite an input ({sources[resolved]}); "
                          "choose another output path")
    for folder in folders:
        if _inside(resolved, folder):
            raise OutputError(f"{name} {path} is inside the source dataset {folder}, which is never "
                              "written to; choose an output outside it")
    if resolved in seen:
        raise OutputError(f"{name} and {seen[resolved]} are the same file {path}; give them different paths")
    seen[resolved] = name
    if path.is_dir():
        raise OutputError(f"{name} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{name} {path} exists; choose another path or allow overwriting (--overwrite)")


def check_folder(folder: Path, expected_bytes: int = 0) -> None:
    """The folder exists, a file can be created in it, and it has `expected_bytes` free."""
    if not folder.is_dir():
        raise OutputError(f"the output folder {folder} does not exist; create it first")
    problem = _probe(folder, 0)
    if problem:
        raise OutputError(f"cannot write in the output folder {folder}: {problem}; "
                          "choose a folder you can write to")
    free = shutil.disk_usage(folder).free
    if free < expected_bytes:
        raise OutputError(f"the output folder {folder} has {free / 2**20:.1f} MiB free but the outputs "
                          f"need up to {expected_bytes / 2**20:.1f} MiB; free some space or choose another folder")


def partial_files(folder: Path) -> list:
    """Temporary files of unfinished writes in `folder` (for cleanup and for tests)."""
    return sorted(folder.glob(PARTIAL + "*")) if folder.is_dir() else []


def write_atomically(path: PathLike, write: Callable[[Path], None],
                     verify: Optional[Callable[[Path], None]] = None, expected_bytes: int = 0) -> Path:
    """`write(tmp)` into a temporary file next to `path`, fsync, check it is not empty and
    passes `verify(tmp)`, then rename it to `path`. On any failure the temporary file is
    removed and the error says why; when the writer's own message hides a full disk, the
    OS's message (e.g. "No space left on device") is reported instead."""
    path = Path(path)
    for stale in path.parent.glob(f"{PARTIAL}*.{path.name}"):
        stale.unlink()
    tmp = path.with_name(f"{PARTIAL}{uuid.uuid4().hex[:12]}.{path.name}")  # same ending: same format
    try:
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if tmp.stat().st_size == 0:
                raise OSError(f"cannot write {path}: the written file is empty")
            if verify is not None:
                verify(tmp)
        except (OSError, RuntimeError, ValueError) as err:
            reason = _probe(path.parent, expected_bytes or PROBE_LIMIT)
            if reason:
                raise OSError(f"cannot write {path}: {reason}") from None
            if isinstance(err, OSError) and err.strerror:
                raise OSError(f"cannot write {path}: {err.strerror}") from None
            raise
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_folder(path.parent)
    return path


class Landing:
    """Outputs that land together or not at all: `with Landing() as landed: landed.add(write(...))`;
    when a later write fails (a full disk), the files written before it are removed, so no image
    is left without its mask and provenance."""

    def __init__(self):
        self.written: list = []

    def add(self, path: PathLike) -> Path:
        self.written.append(Path(path))
        return Path(path)

    def __enter__(self) -> "Landing":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            for path in self.written:
                path.unlink(missing_ok=True)


def write_text_atomically(path: PathLike, text: str) -> Path:
    """A text file (provenance, dataset.json) written the same way, its size checked."""
    data = text.encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise OSError(f"{tmp.stat().st_size} of {len(data)} bytes written")

    return write_atomically(path, write, verify, len(data))


def _probe(folder: Path, size: int) -> Optional[str]:
    """The OS's error when a file of `size` bytes cannot be written in `folder` (read-only,
    full disk, quota, file size limit); None when it can. The probe's name is fixed before it
    is created, so an interruption at any point (Ctrl-C) still removes it; probes a killed
    process left are removed first (removing another process's live probe is harmless: its
    writes go on into the unlinked file)."""
    probe = folder / f"{PARTIAL}{uuid.uuid4().hex[:12]}.probe"
    try:
        for stale in folder.glob(f"{PARTIAL}*.probe"):
            stale.unlink(missing_ok=True)
        with open(probe, "xb") as f:
            block = b"\0" * (1 << 20)
            left = min(size, PROBE_LIMIT)
            while left > 0:
                f.write(block[:left])
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as err:
        return err.strerror or str(err)
    finally:
        probe.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
