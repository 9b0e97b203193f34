"""Pacing: no call of an endpoint sooner than Vast's interval after the previous one.

Vast rate-limits per *account*, not per process: two clusters of one user and a
``dask-vastai ls`` beside them share the intervals (create 4.5 s, destroy 3 s, list 1 s,
...). So a call takes its turn twice:

* in this process, one :class:`asyncio.Lock` per endpoint: one call of an endpoint at a time;
* across this user's processes, a small schedule file per account (:class:`SharedSchedule`,
  under the user's cache folder, locked with ``fcntl.flock``): when the next call of an
  endpoint may go out, and whether a call of it is in flight somewhere.

The interval counts from the previous call's *answer* (Vast stamps a call somewhere between
our send and its answer, so counting from the answer is never too early). A process that
dies mid-call leaves its "in flight" mark, which expires after the request timeout.

Where ``fcntl`` does not exist (Windows) the schedule is per process, and the transport's
429 retries absorb what two processes of one account still collide on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

try:  # POSIX (Linux and macOS); absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: a schedule file untouched this long belongs to an account no longer used here
_STALE_S = 7 * 24 * 3600.0
#: while another process's call of the endpoint is in flight, look again this often
_BUSY_POLL_S = 0.05


def schedule_folder() -> Path:
    """Where the per-account schedule files live (the user's cache folder, per platform)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("dask-vastai")) / "pacing"


class SharedSchedule:
    """One account's per-endpoint schedule, shared by this user's processes through a file.

    The file holds ``{endpoint: {"next": t, "busy": t, "by": token}}`` in wall-clock
    seconds: no call before ``next``; a call in flight until ``busy`` (by the holder of
    ``token``). Every read-modify-write happens under an exclusive ``flock`` and takes
    microseconds. The lock is only ever *tried* (``LOCK_NB``): a method raises
    :class:`BlockingIOError` while another process holds it, and the async caller tries again
    a millisecond later, so the event loop never waits on another process (and no thread is
    needed, which an exit handler could not start after interpreter shutdown).
    The file is named by a hash of the API origin and key: the key itself is never written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"SharedSchedule({str(self.path)!r})"

    @classmethod
    def for_account(cls, api_url: str, api_key: str, folder: Path | None = None) -> SharedSchedule | None:
        """The schedule of this account, or None where files cannot be locked (no fcntl)."""
        if fcntl is None:
            return None
        folder = folder or schedule_folder()
        digest = hashlib.sha256(f"{api_url}\0{api_key}".encode()).hexdigest()[:32]
        path = folder / f"{digest}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                _prune(folder)
        except OSError as e:
            logger.info("no shared pacing (cannot use %s: %s); pacing this process only", folder, e)
            return None
        return cls(path)

    def _update(self, change: Any) -> Any:
        """Apply ``change(state, now)`` to the file's state under the lock; its return value."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while another holds it
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
            try:
                state = json.loads(raw) if raw else {}
            except ValueError:
                state = {}
            if not isinstance(state, dict):
                state = {}
            before = json.dumps(state, sort_keys=True)
            result = change(state, time.time())
            after = json.dumps(state, sort_keys=True)
            if after != before:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, after.encode())
            return result
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _entry(state: dict[str, Any], endpoint: str) -> dict[str, Any]:
        entry = state.get(endpoint)
        if not isinstance(entry, dict):
            entry = state[endpoint] = {}
        return entry

    def claim(self, endpoint: str, token: str, busy_s: float) -> tuple[float, bool]:
        """Take the endpoint's turn: ``(0, False)`` when taken, else ``(seconds to wait, busy)``.

        ``busy`` says another process's call is in flight (its end is unknown: poll).
        """

        def change(state: dict[str, Any], now: float) -> tuple[float, bool]:
            entry = self._entry(state, endpoint)
            busy_until = float(entry.get("busy") or 0.0) if entry.get("by") != token else 0.0
            wait = max(float(entry.get("next") or 0.0), busy_until) - now
            if wait > 0:
                return wait, busy_until > now
            entry.update(busy=now + busy_s, by=token)
            return 0.0, False

        return self._update(change)  # type: ignore[no-any-return]

    def release(self, endpoint: str, token: str, interval_s: float) -> None:
        """The call answered: the next one no sooner than ``interval_s`` from now."""

        def change(state: dict[str, Any], now: float) -> None:
            entry = self._entry(state, endpoint)
            entry["next"] = max(float(entry.get("next") or 0.0), now + interval_s)
            if entry.get("by") == token:
                entry.pop("busy", None)
                entry.pop("by", None)

        self._update(change)

    def hold(self, endpoint: str, seconds: float) -> None:
        """No call of ``endpoint`` from any process before ``seconds`` from now (a 429 said so)."""

        def change(state: dict[str, Any], now: float) -> None:
            entry = self._entry(state, endpoint)
            entry["next"] = max(float(entry.get("next") or 0.0), now + seconds)

        self._update(change)


def _prune(folder: Path) -> None:
    """Remove schedule files of accounts unused for a week (best effort)."""
    cutoff = time.time() - _STALE_S
    for old in folder.glob("*.json"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


class Pacer:
    """The turns of one client's calls: per endpoint, in this process and (shared) across processes.

    ``enabled=False`` sends every call at once (tests of the retries); a 429 seen by any
    caller still holds the endpoint back for everyone (:meth:`hold`).
    """

    def __init__(self, intervals_s: Mapping[str, float], enabled: bool, *,
                 shared: SharedSchedule | None = None, busy_s: float = 30.0) -> None:
        self.intervals_s = dict(intervals_s)
        self.enabled = enabled
        self.shared = shared if enabled else None
        self.busy_s = busy_s
        self._token = secrets.token_hex(8)
        self._locks: dict[str, asyncio.Lock] = {}
        self._next_at: dict[str, float] = {}

    def interval(self, endpoint: str) -> float:
        return self.intervals_s.get(endpoint, 0.0)

    def wait_s(self, endpoint: str) -> float:
        """Seconds before ``endpoint``'s next turn, as far as this process knows."""
        return max(0.0, self._next_at.get(endpoint, 0.0) - time.monotonic())

    async def _wait_local(self, endpoint: str) -> None:
        delay = self._next_at.get(endpoint, 0.0) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _shared(self, method: str, *args: Any) -> Any:
        """``self.shared.<method>(*args)``, waiting (not blocking) while another process holds the file."""
        for _ in range(2000):  # 2 s: a holder keeps the lock for microseconds
            shared = self.shared
            if shared is None:
                return None
            try:
                return getattr(shared, method)(*args)
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError as e:  # a full disk or a removed folder must not stop the calls
                logger.info("shared pacing off for this process (%s)", e)
                self.shared = None
                return None
        logger.info("shared pacing off for this process (%s stayed locked)", self.shared)
        self.shared = None
        return None

    async def _claim_shared(self, endpoint: str) -> None:
        while True:
            claimed = await self._shared("claim", endpoint, self._token, self.busy_s)
            if claimed is None:
                return
            wait, busy = claimed
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, _BUSY_POLL_S) if busy else wait)

    @asynccontextmanager
    async def turn(self, endpoint: str) -> AsyncIterator[None]:
        """Wait for ``endpoint``'s turn, make the call inside, and pace the next from its answer."""
        if not self.enabled:
            await self._wait_local(endpoint)  # a 429 seen by another caller holds everyone back
            yield
            return
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            await self._wait_local(endpoint)
            if self.shared is not None:
                await self._claim_shared(endpoint)
            try:
                yield
            finally:
                interval = self.interval(endpoint)
                self._next_at[endpoint] = max(self._next_at.get(endpoint, 0.0), time.monotonic() + interval)
                await self._shared("release", endpoint, self._token, interval)

    async def hold(self, endpoint: str, seconds: float) -> None:
        """No call of ``endpoint`` before ``seconds`` from now, in this process and the others."""
        self._next_at[endpoint] = max(self._next_at.get(endpoint, 0.0), time.monotonic() + seconds)
        await self._shared("hold", endpoint, seconds)
