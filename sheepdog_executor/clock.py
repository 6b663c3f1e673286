"""The clock that judges workers' silence: it keeps counting while this computer sleeps.

``time.monotonic`` stops while a laptop is suspended (Linux's CLOCK_MONOTONIC, macOS's
mach_absolute_time), so after an hour's sleep a worker silent for that hour looks silent for a
second, and the client cannot tell how long it was away from the cluster. This clock counts the
sleep too (Linux's CLOCK_BOOTTIME, macOS's CLOCK_MONOTONIC), and falls back to ``time.monotonic``
where neither exists.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable


def _pick() -> Callable[[], float]:
    if hasattr(time, "CLOCK_BOOTTIME"):
        return functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if sys.platform == "darwin":  # there CLOCK_MONOTONIC counts sleep, unlike time.monotonic
        return functools.partial(time.clock_gettime, time.CLOCK_MONOTONIC)
    return time.monotonic


#: Seconds, counting any time this computer was suspended; only differences mean anything.
awake_or_asleep: Callable[[], float] = _pick()
