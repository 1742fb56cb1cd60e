"""Reading a client's event and log queues without blocking the caller (Slicer's GUI thread polls
them from a QTimer): one rule for the local worker client and the remote client."""
from __future__ import annotations

import queue
from typing import List, Optional


def take(source: "queue.Queue", timeout: float = 0.0, limit: Optional[int] = None) -> List:
    """The items queued so far, in order, at most `limit`; waits up to `timeout` seconds for the first."""
    items = []
    try:
        if timeout > 0:
            items.append(source.get(timeout=timeout))
        while limit is None or len(items) < limit:
            items.append(source.get_nowait())
    except queue.Empty:
        pass
    return items
