"""How many threads an engine process computes with: chosen once, at its start.

Why: torch and numpy size their pools to the machine's cores, and OpenMP's default wait policy
keeps idle pool threads spinning. Beside other busy processes (Slicer, a second job, a test run)
those threads fight for the same cores: beside two busy torch processes the demo ran 3.5x, a small
enhancement more than 4x slower than with one thread (benchmarks/results/under_load_cpu.md). So gem3d sets the pools itself, through the
environment, before numpy and torch create them:

- `--threads N` or GEM3D_THREADS=N: N threads per process (per device queue for `gem3d serve`);
- else, when the user set OMP_NUM_THREADS (or MKL_/OPENBLAS_NUM_THREADS) themselves: theirs, untouched;
- else the default: the cores this process may run on, less the machine's load (one-minute load
  average, rounded), at least one; idle pool threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE).

Torch-free: it only writes os.environ, and sets torch's count too when torch is already loaded.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

ENV = "GEM3D_THREADS"
POOLS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
         "VECLIB_MAXIMUM_THREADS")
NO_SPINNING = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}  # GNU and Intel OpenMP


class ThreadsError(ValueError):
    """A thread count that is not a positive whole number (nor 'auto')."""


def parse(value, where: str = "--threads") -> Optional[int]:
    """The thread count `value` asks for; None for 'auto' or nothing (the default policy)."""
    text = "" if value is None else str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ThreadsError(f"{where} must be a whole number of threads of at least 1, or auto; got {value!r}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """The usable cores less the one-minute load average, rounded, at least one: all the cores on an
    idle machine, one thread as soon as about one core's worth of other work runs."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): the cores, which then sleep when idle
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def user_threads() -> Optional[int]:
    """The pool size the user set in the environment (OMP_NUM_THREADS first), if any."""
    for name in POOLS:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def configure(threads: Optional[int] = None) -> int:
    """Size every pool of this process to `threads` (None: the user's OMP_NUM_THREADS, else the
    default); returns the count. Call before numpy and torch load; a loaded torch is set too."""
    if threads is None and user_threads() is not None:
        threads = user_threads()
    else:
        threads = threads or default_threads()
        os.environ.update({name: str(threads) for name in POOLS})
        for name, value in NO_SPINNING.items():
            os.environ.setdefault(name, value)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
