"""A runner for long `gem3d` commands (batch enhancement / harmonisation) whose output is read by a thread.
"""
from __future__ import annotations

import collections
import queue
import re
import subprocess
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from gem3d.processes import exit_message, kill_tree, popen_group


_PROGRESS = (re.compile(r"\[(\d+)\s*/\s*(\d+)\]"),  # "[3/10] case ..."
             re.compile(r"\|\s*(\d+)\s*/\s*(\d+)\s*\["))  # tqdm: " 30%|###   | 3/10 [00:01<...]"


def parse_progress(line: str) -> Optional[Tuple[int, int]]:
    """(done, total) announced by a progress line, or None."""
    for pattern in _PROGRESS:
        found = pattern.search(line)
        if found and int(found.group(2)) > 0:
            return int(found.group(1)), int(found.group(2))
    return None


class CommandRunner:
    """Runs a command; `poll()` returns events {"event": "log", "line"}, {"event": "progress",
    "done", "total", "line"} and finally {"event": "finished"} (exit 0), {"event": "cancelled"}
    or {"event": "error", "returncode", "message"}."""

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, what: str = "The command", tail_lines: int = 40):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.what = what
        self._tail = collections.deque(maxlen=tail_lines)
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._process: Optional[subprocess.Popen] = None
        self._cancelled = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "CommandRunner":
        self._process = popen_group(self.command, self.env, self.cwd, merge_stderr=True)
        self._thread = threading.Thread(target=self._read, name="gem3d-command", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def cancel(self) -> None:
        self._cancelled = True
        kill_tree(self._process)

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def poll(self, timeout: float = 0.0) -> List[dict]:
        events = []
        try:
            if timeout > 0:
                events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            return events

    def _read(self) -> None:
        process = self._process
        for raw in process.stdout:
            for line in raw.replace("\r", "\n").splitlines():  # tqdm redraws with \r
                line = line.rstrip()
                if not line:
                    continue
                self._tail.append(line)
                progress = parse_progress(line)
                if progress:
                    self._events.put({"event": "progress", "done": progress[0], "total": progress[1],
                                      "line": line})
                else:
                    self._events.put({"event": "log", "line": line})
        returncode = process.wait()
        if self._cancelled:
            self._events.put({"event": "cancelled"})
        elif returncode == 0:
            self._events.put({"event": "finished"})
        else:
            self._events.put({"event": "error", "returncode": returncode,
                              "message": exit_message(self.what, returncode, list(self._tail))})
