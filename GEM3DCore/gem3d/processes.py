"""Child processes that can be killed with everything they started (the stdio worker, batch runs).

Standard library only: the editor starts them from Slicer's Python.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Dict, Optional, Sequence


def popen_group(command: Sequence[str], env: Optional[Dict[str, str]] = None,
                cwd: Optional[str] = None, stdin: bool = False,
                merge_stderr: bool = False, text: bool = True) -> subprocess.Popen:
    """Start `command` in its own session (POSIX) / process group (Windows); text pipes in UTF-8,
    or binary ones (``text=False``)."""
    kwargs = {}
    if os.name == "nt":
        kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                   | getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        kwargs["start_new_session"] = True
    try:
        return subprocess.Popen(
            list(command), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=env, cwd=cwd, **(dict(text=True, encoding="utf-8", errors="replace", bufsize=1) if text else {}),
            **kwargs)
    except OSError as e:
        raise RuntimeError(f"Could not start {' '.join(command)}: {e}") from e


def kill_tree(process: Optional[subprocess.Popen]) -> None:
    """Kill a process started by popen_group and all its descendants."""
    if process is None or process.poll() is not None:
        return
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: process group id == pid
    except OSError:
        pass
    try:
        process.kill()
    except OSError:
        pass


def terminate(process: Optional[subprocess.Popen], timeout: float) -> None:
    """Ask a process to stop (SIGTERM: a server shuts down cleanly) and kill it if it has not
    within ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def exit_message(what: str, returncode: Optional[int], tail: Sequence[str]) -> str:
    """'The GEM-3D engine stopped unexpectedly with exit code 3. Last output: ...'"""
    if returncode is not None and returncode < 0 and os.name != "nt":
        try:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"stopped unexpectedly with exit code {returncode}"
    message = f"{what} {how}."
    lines = [line.strip() for line in tail if line.strip()]
    if lines:
        message += " Last output: " + lines[-1]
    return message
