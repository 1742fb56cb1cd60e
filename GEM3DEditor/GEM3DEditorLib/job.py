"""What the module knows about a running job, updated by the events that arrive: pure Python.

One reducer for both kinds of job: a generation (events of the gem3d worker, docs/worker-protocol.md)
and a batch run (events of process.CommandRunner). The widget only shows `JobState.status` and
`progress`; the logic applies windows to the output node.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from gem3d.events import TERMINAL


class EventKind(enum.Enum):
    STARTED = "started"
    WINDOW = "window"
    HEARTBEAT = "heartbeat"
    LOG = "log"
    PROGRESS = "progress"
    UPLOAD = "upload"  # a remote engine: an input being sent
    QUEUED = "queued"  # a remote engine: jobs ahead on the server's device
    FINISHED = "finished"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        return self.value in TERMINAL


class JobKind(enum.Enum):
    GENERATE = "generate"
    BATCH = "batch"


@dataclasses.dataclass(frozen=True)
class JobState:
    job_id: str
    kind: JobKind = JobKind.GENERATE
    done: bool = False
    progress: float = 0.0  # 0..1
    windows: int = 0
    planned_windows: Optional[int] = None
    status: str = ""
    error: Optional[str] = None
    error_details: str = ""
    outputs: dict = dataclasses.field(default_factory=dict)
    seconds: Optional[float] = None


def event_kind(event: dict) -> Optional[EventKind]:
    try:
        return EventKind(event.get("event"))
    except ValueError:
        return None


def reduce(state: JobState, event: dict) -> JobState:
    """The state after one event. Events of another job, unknown events and anything after the
    end leave the state as it is."""
    kind = event_kind(event)
    if state.done or kind is None or event.get("job_id") not in (state.job_id, None):
        return state
    change = dataclasses.replace
    if kind is EventKind.STARTED:
        planned = len(event.get("plan") or [])
        return change(state, planned_windows=planned, status=f"Generating {planned} windows...")
    if kind is EventKind.WINDOW:
        return change(state, windows=state.windows + 1, progress=float(event.get("progress", state.progress)),
                      status=f"Window {event['start']}-{event['stop']} ({event.get('direction', '')})")
    if kind is EventKind.PROGRESS:
        total = max(int(event["total"]), 1)
        return change(state, progress=int(event["done"]) / total, status=event.get("line", ""))
    if kind is EventKind.LOG:
        return change(state, status=event.get("line", state.status))
    if kind is EventKind.HEARTBEAT:
        return state
    if kind is EventKind.UPLOAD:
        done, total = int(event["done"]), max(int(event["total"]), 1)
        return change(state, status=f"Uploading the {event.get('file', 'input')}: "
                                    f"{done / 2**20:.1f} of {total / 2**20:.1f} MB")
    if kind is EventKind.QUEUED:
        return change(state, status=f"Queued on the server ({int(event.get('position', 0))} jobs ahead)")
    if kind is EventKind.FINISHED:
        seconds = (event.get("timings") or {}).get("total")
        status = f"Done in {seconds:.1f} s." if seconds is not None else "Done."
        return change(state, done=True, progress=1.0, outputs=dict(event.get("outputs") or {}),
                      seconds=seconds, status=status)
    if kind is EventKind.CANCELLED:
        return change(state, done=True, status=event.get("message") or "Cancelled.")
    return change(state, done=True, status=event.get("message", "The engine failed."),
                  error=event.get("message", "The engine failed."), error_details=event.get("stderr", ""))
