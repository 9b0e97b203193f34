"""Nothing left billing: the process-wide ledger of live rentals and its exit handlers.

SpecCluster's own exit hook closes clusters with a 10 s timeout and swallows the timeout,
which would leak a larger cluster (and the loop it needs may already be gone). So every
rental is written into :data:`LEDGER` the moment Vast accepts it and struck out when it is
destroyed, and at interpreter exit or on SIGTERM/SIGHUP we bulk-destroy what is left,
from a fresh thread with its own event loop, before anything else shuts down. The bulk
destroy is checked as every bulk destroy is (:meth:`VastAPI.destroy_instances`): what is still
listed afterwards is destroyed again, one by one. SIGKILL cannot be caught: the on-instance
watchdog (``supervisor.py``) covers it, where the instance has its ``CONTAINER_API_KEY``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .vast import VastAPI

logger = logging.getLogger(__name__)

#: seconds the exit handler may spend destroying (a bulk destroy is one call, its check a few
#: list calls and the linger grace, survivors one call each)
EMERGENCY_TIMEOUT_S = 60.0


class RentalLedger:
    """Live rental ids per (API origin, key): enough to destroy them with a fresh client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[str, str], set[int]] = {}
        self._installed = False
        #: set once this process destroys everything (a signal, interpreter exit): from then
        #: on nothing is rented, and rentals found gone are not replaced (their destroy did it)
        self.closing = False

    def add(self, api: VastAPI, instance_id: int) -> None:
        with self._lock:
            self._live.setdefault(api.credentials(), set()).add(instance_id)
        self.install_handlers()

    def discard(self, api: VastAPI, instance_id: int) -> None:
        with self._lock:
            ids = self._live.get(api.credentials())
            if ids is not None:
                ids.discard(instance_id)

    def live(self) -> dict[tuple[str, str], set[int]]:
        with self._lock:
            return {k: set(v) for k, v in self._live.items() if v}

    def install_handlers(self) -> None:
        """Register the exit hook and, from the main thread, the SIGTERM/SIGHUP handlers."""
        if self._installed:
            return
        self._installed = True
        # atexit runs handlers last-registered-first: registering now (after distributed's
        # import registered its close_clusters hook) makes ours run before it.
        atexit.register(self.destroy_everything, "interpreter exit")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                _chain_signal(sig, self._on_signal)
        else:  # pragma: no cover - clusters are normally made on the main thread
            logger.warning("dask-vastai: cluster created off the main thread; SIGTERM/SIGHUP will not destroy rentals")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.destroy_everything(f"signal {signal.Signals(signum).name}")

    def destroy_everything(self, reason: str) -> None:
        """Synchronously bulk-destroy every live rental of this process (idempotent)."""
        self.closing = True
        live = self.live()
        if not live:
            return
        count = sum(len(v) for v in live.values())
        print(f"dask-vastai: {reason}: destroying {count} rental(s) still billing", file=sys.stderr, flush=True)
        errors: list[BaseException] = []
        again: list[int] = []

        def work() -> None:
            try:
                again.extend(asyncio.run(_destroy(live)))
            except BaseException as e:  # noqa: BLE001 - reported below, never raised from a hook
                errors.append(e)

        thread = threading.Thread(target=work, name="dask-vastai-emergency-destroy", daemon=True)
        thread.start()
        thread.join(EMERGENCY_TIMEOUT_S)
        if thread.is_alive() or errors:
            why = "timed out" if thread.is_alive() else errors[0]
            ids = sorted(i for v in live.values() for i in v)
            print(
                f"dask-vastai: could not destroy rentals {ids} ({why}); run `dask-vastai cleanup`",
                file=sys.stderr, flush=True,
            )
            return
        if again:
            print(f"dask-vastai: rentals {sorted(again)} were still listed after the bulk destroy; "
                  "destroyed them again one by one", file=sys.stderr, flush=True)
        with self._lock:
            for key, ids in live.items():
                self._live.get(key, set()).difference_update(ids)


async def _destroy(live: dict[tuple[str, str], set[int]]) -> list[int]:
    """Destroy every live rental; the ids that had to be destroyed again after the bulk call."""
    from .vast import VastAPI

    again: list[int] = []
    for (url, key), ids in live.items():
        async with VastAPI(api_key=key, api_url=url) as api:
            report = await api.destroy_instances(sorted(ids))
            again += [*report.survivors, *report.lingering]
    return again


def _chain_signal(sig: signal.Signals, handler: Callable[[int, FrameType | None], None]) -> None:
    """Install ``handler`` for ``sig`` and then do what was there before (default: die by it)."""
    previous: Any = signal.getsignal(sig)

    def chained(signum: int, frame: FrameType | None) -> None:
        handler(signum, frame)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(sig, chained)


LEDGER = RentalLedger()
