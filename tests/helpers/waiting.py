"""Waiting in tests: every wait has a timeout and, when it gives up, says what it waited for.

:func:`until` polls on the event loop (inside ``async`` tests, never blocking it);
:func:`wait_until` is the same for plain threads. Both return the predicate's first truthy
value, so a wait can also fetch what it waited for. :func:`eventually` only reports whether
the predicate came true, for tests that state the failure themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _gave_up(timeout_s: float, what: str, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


async def until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.1) -> T:
    """Poll ``predicate`` every ``interval_s`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise _gave_up(timeout_s, what, result)
        await asyncio.sleep(interval_s)
    return result


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.1) -> T:
    """:func:`until` for synchronous code: sleeps between polls."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise _gave_up(timeout_s, what, result)
        time.sleep(interval_s)
    return result


def eventually(predicate: Callable[[], object], timeout_s: float, *, interval_s: float = 0.1) -> bool:
    """Whether ``predicate`` comes true within ``timeout_s`` (polled every ``interval_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_until_showing(predicate: Callable[[], T], timeout_s: float, what: str, show: Callable[[], str]) -> T:
    """:func:`wait_until`; when it gives up, the failure also carries ``show()`` as it is then
    (a cluster's log, say: what happened while it waited)."""
    try:
        return wait_until(predicate, timeout_s, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{show()}") from None
