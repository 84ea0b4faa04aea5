"""The span store's work runs below auth: its threads and worker processes yield the CPU.

On a 2-CPU machine, converting and inserting at full speed leaves auth (`ValidateApiKey`,
served on the event loop) waiting for a core: auth p99 104 ms at 16 callers while storing.
The store is batch work that can wait a few milliseconds; an auth call holds up an app's
export. So the store's worker processes and its DuckDB thread raise their niceness
(Linux: niceness is per thread). A process may always lower its own priority; where it
cannot (another OS), the work runs as it is.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Final

# Added to the backend's own niceness: CFS gives a task 10 steps nicer about a tenth of the
# other's share when both want the CPU.
STORE_NICENESS: Final = 10
_NICEST: Final = 19


def yield_to_auth() -> None:
    """Lower the calling thread's priority (on Linux, where niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(_NICEST, niceness + STORE_NICENESS))
