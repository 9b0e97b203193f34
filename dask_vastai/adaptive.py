"""Adaptive scaling by GPU demand, one policy per pool.

Stock ``adapt()`` counts CPU occupancy: 12 queued half-second GPU tasks at a 3-minute
target duration ask for one worker; it cannot choose which kind of machine to rent; and it
tears down machines that took minutes to boot after seconds of idleness. Here a GPU task
needs a GPU, however short: each pool rents ``ceil(GPUs wanted / GPUs per instance)``
instances between ``minimum`` and ``maximum``, counting those still booting, and releases
an instance only after it has been idle ``wait_count`` intervals in a row (defaults in the
spirit of Coiled: 5 s x 24 = 2 minutes, short against per-second billing, long against
minute-long boots). The scheduler runs in this process, so the policy reads its state
directly instead of through RPC.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from tornado.ioloop import PeriodicCallback

from .pools import POOL_RESOURCE_PREFIX, Pool

if TYPE_CHECKING:
    from .cluster import VastAICluster

logger = logging.getLogger(__name__)

#: a pool whose last instances all failed to boot stops renting (each failure costs money)
MAX_FAILURES_IN_A_ROW = 3


def _pool_of_worker(ws: Any) -> str | None:
    for name in ws.resources:
        if name.startswith(POOL_RESOURCE_PREFIX):
            return name[len(POOL_RESOURCE_PREFIX) :]
    return None


def _slots(restrictions: dict[str, float] | None) -> float:
    """GPUs a task occupies (a task restricted to a pool without GPUs still takes a slot)."""
    if not restrictions:
        return 0.0
    return max(float(restrictions.get("GPU", 0)), 1.0)


def gpu_demand(scheduler: Any, pools: list[Pool]) -> dict[str, float]:
    """GPUs wanted per pool: tasks running or waiting on its workers plus unassigned ones.

    A task nobody can run yet goes to the pool it names, else to the first pool that could
    run it (the cluster's default pool comes first). Tasks without resource restrictions
    count only to keep one instance in the default pool while they wait.
    """
    demand = {p.name: 0.0 for p in pools}
    for ws in scheduler.workers.values():
        pool = _pool_of_worker(ws)
        if pool in demand:
            demand[pool] += sum(_slots(ts.resource_restrictions) for ts in ws.processing)
    for ts in scheduler.unrunnable:
        restrictions = ts.resource_restrictions
        if not restrictions:
            continue
        for pool in pools:
            if pool.could_run(restrictions):
                demand[pool.name] += _slots(restrictions)
                break
    if pools and (scheduler.queued or any(not ts.resource_restrictions for ts in scheduler.unrunnable)):
        demand[pools[0].name] = max(demand[pools[0].name], 1.0)
    return demand


class GPUAdaptive:
    """Rents for one pool's queued GPU demand; releases its instances after an idle wait."""

    def __init__(
        self,
        cluster: VastAICluster,
        pool: str,
        *,
        minimum: int = 0,
        maximum: float = math.inf,
        interval: str | float = "5s",
        wait_count: int = 24,
    ) -> None:
        if minimum < 0 or maximum < minimum:
            raise ValueError(f"adapt(minimum={minimum}, maximum={maximum}): need 0 <= minimum <= maximum")
        if wait_count < 1:
            raise ValueError(f"wait_count={wait_count}: must be at least 1")
        self.cluster = cluster
        self.pool = pool
        self.minimum = int(minimum)
        self.maximum = maximum
        self.interval_s = parse_timedelta(interval)
        self.wait_count = int(wait_count)
        self.idle_counts: dict[str, int] = {}
        cluster.pool_failures.pop(pool, None)  # a new adapt() call is a new chance
        #: (time, decision, reason) of every change, newest last
        self.log: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=1000)
        self._periodic: PeriodicCallback | None = None

    def start(self) -> None:
        self._periodic = PeriodicCallback(self._step, self.interval_s * 1000)
        self.cluster.loop.add_callback(self._periodic.start)
        self.cluster.loop.add_callback(self._step)

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None

    def _record(self, decision: str, reason: str) -> None:
        self.log.append((time.time(), decision, reason))
        self.cluster._log(f"adapt {self.pool}: {decision} ({reason})")

    async def _step(self) -> None:
        try:
            await self.step()
        except Exception:  # noqa: BLE001 - one failed round must not stop adapting
            logger.exception("adaptive step for pool %s failed", self.pool)

    async def step(self) -> None:
        """One round: compute the target, rent up to it now, release idle instances slowly."""
        cluster = self.cluster
        if cluster.scheduler is None or cluster.status.name not in ("running", "starting"):
            return
        pools = list(cluster.pools.values())
        pool = cluster.pools[self.pool]
        demand = gpu_demand(cluster.scheduler, pools)[self.pool]
        wanted = math.ceil(demand / max(1, pool.gpus_per_instance))
        target = int(min(self.maximum, max(self.minimum, wanted)))
        instances = cluster.pool_instances(self.pool)
        current = len(instances)
        failures = cluster.pool_failures.get(self.pool, 0)
        if target > current and failures >= MAX_FAILURES_IN_A_ROW:
            if not self.log or not self.log[-1][1].startswith("not renting"):
                self._record(
                    "not renting",
                    f"{demand:g} GPU(s) wanted but the last {failures} instances of this pool failed to "
                    "boot; see cluster.get_logs(), fix the pool's options, then call adapt() again",
                )
            return
        if target > current:
            booting = sum(1 for name in instances if not cluster.instance_registered(name))
            self.idle_counts.clear()
            cluster.scale(target, pool=self.pool)
            self._record(
                f"rent {target - current} (to {target})",
                f"{demand:g} GPU(s) wanted, {current} instance(s) held of which {booting} booting, "
                f"maximum {self.maximum}",
            )
            return
        idle = self._idle_instances(instances)
        for name in list(self.idle_counts):
            if name not in idle:
                del self.idle_counts[name]
        for name in idle:
            self.idle_counts[name] = self.idle_counts.get(name, 0) + 1
        removable = current - max(self.minimum, target)
        ripe = [n for n in idle if self.idle_counts[n] >= self.wait_count][: max(0, removable)]
        ripe = self._keep_data(ripe)
        if ripe:
            for name in ripe:
                self.idle_counts.pop(name, None)
            await cluster.release_instances(ripe)
            self._record(
                f"release {', '.join(ripe)}",
                f"idle for {self.wait_count} x {self.interval_s:g}s, {demand:g} GPU(s) wanted, "
                f"minimum {self.minimum}",
            )

    def _keep_data(self, ripe: list[str]) -> list[str]:
        """Keep instances holding results when no other worker would remain to take them.

        Retiring moves data to the workers that stay; with none left the results a client
        still holds futures to would be lost and recomputed, renting again. As stock adapt
        does, hold them until the client lets go of its futures.
        """
        cluster = self.cluster
        by_name = {ws.name: ws for ws in cluster.scheduler.workers.values()}
        leaving = {w for n in ripe for w in cluster.worker_names_of(n)}
        staying = [ws for name, ws in by_name.items() if name not in leaving]
        if staying:
            return ripe
        kept = [
            n for n in ripe
            if any(by_name[w].has_what for w in cluster.worker_names_of(n) if w in by_name)
        ]
        if kept and not (self.log and self.log[-1][1].startswith("keep")):
            self._record(
                f"keep {', '.join(kept)}",
                "idle but holding results that futures still reference (0 GPU wanted); release the "
                "futures (del / client.cancel) to let them go",
            )
        return [n for n in ripe if n not in kept]

    def _idle_instances(self, instances: list[str]) -> list[str]:
        """Registered instances none of whose workers is running or holding queued work."""
        scheduler = self.cluster.scheduler
        busy_names = {ws.name for ws in scheduler.workers.values() if ws.processing}
        idle = []
        for name in instances:
            workers = self.cluster.worker_names_of(name)
            if self.cluster.instance_registered(name) and not any(w in busy_names for w in workers):
                idle.append(name)
        return idle
