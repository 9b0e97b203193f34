"""Vast's per-endpoint minimum intervals between calls of one API key.

Vast answers a call that arrives sooner than an endpoint's threshold after the previous
accepted call of that endpoint (same identity) with HTTP 429 and a plain-text body
``API requests too frequent endpoint threshold=X``, without a ``Retry-After`` header
(as Vast's OpenAPI spec says; variant ``retry_after_s`` adds one). The thresholds below are the OpenAPI examples; search has
none published, so it gets a lenient 0.5 s. Bulk create/destroy share the single-call
endpoint's budget, as they are the same route family on Vast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

#: endpoint name -> minimum seconds between accepted calls of one key
DEFAULT_INTERVALS_S: dict[str, float] = {
    "search": 0.5,
    "create": 4.5,
    "destroy": 3.0,
    "show": 2.0,
    "list": 1.0,
    "update": 1.0,  # PUT /instances/{id}/ state and label, and bulk state
    "reboot": 1.0,
    "command": 1.5,
    "logs": 1.0,
    "ssh": 1.0,
}


class RateLimiter:
    """Remembers the last accepted call per (identity, endpoint) and refuses early ones."""

    def __init__(self, intervals_s: Mapping[str, float] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: None or {} switches limiting off (unit tests)
        self.intervals_s = dict(intervals_s or {})
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}

    def check(self, identity: str, endpoint: str) -> float | None:
        """None when the call may go ahead (and is recorded), else the endpoint's threshold."""
        interval = self.intervals_s.get(endpoint)
        if not interval:
            return None
        now = self._clock()
        last = self._last.get((identity, endpoint))
        if last is not None and now - last < interval:
            return interval
        self._last[(identity, endpoint)] = now
        return None


def too_frequent_body(threshold_s: float) -> str:
    """The plain-text 429 body Vast sends."""
    return f"API requests too frequent endpoint threshold={threshold_s}"
