"""Adaptive scaling by GPU demand, one policy per pool.

Stock ``adapt()`` counts CPU occupancy: 12 queued half-second GPU tasks at a 3-minute
target duration ask for one worker; it cannot choose which kind of machine to rent; and it
tears down machines that took minutes to boot after seconds of idleness. Here a GPU task
needs a GPU, however short: each pool rents ``ceil(GPUs wanted / GPUs per instance)``
instances between ``minimum`` and ``maximum``, counting those still booting.

Releasing is the ski-rental problem. Vast bills per second with no minimum, so a second
idle and a second booting cost the same; an instance that stays idle until work comes back
pays the gap, one released at once pays a boot when work comes back. Keeping an idle
instance until it has been idle as long as its pool takes to boot (measured from rent to
registration, :meth:`PoolSet.boot_seconds`) and then releasing it never pays more than
twice what knowing the future would have paid (a gap shorter than the boot costs the gap,
exactly the optimum; a longer one costs one boot of idleness plus the re-boot, against one
boot). An explicit ``wait_count`` (times ``interval``) replaces the boot time as the idle
wait. An instance is never released while GPU tasks it could run wait elsewhere, nor when
it holds the only copy of results a client still references.

As distributed's ``AdaptiveCore``, the module has two halves:

* :class:`GPUDemandPolicy`, pure: a :class:`PoolView` (demand, instances, failures) in,
  :class:`Decision` s out. Tests drive it with hand-made views, no cluster at all.
* :class:`GPUAdaptive`, the loop that observes and acts, seeing the cluster only through
  the :class:`AdaptiveCluster` protocol. The scheduler runs in this process, so the loop
  reads its state directly instead of through RPC.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from dask.utils import parse_timedelta
from tornado.ioloop import PeriodicCallback

from .placement import gpus_of, waiting_gpus
from .pools import POOL_RESOURCE_PREFIX, Pool, PoolSet

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ GPU demand
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


def gpu_demand(scheduler: Any, pools: Sequence[Pool]) -> dict[str, float]:
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


def waiting_for(scheduler: Any, pool: Pool) -> float:
    """GPUs' worth of GPU tasks that wait (no worker yet, or behind a worker's busy GPUs)
    and that a worker of ``pool`` could run: while there are any, none of its instances goes."""
    waiting = sum(
        gpus_of(ts) for ts in scheduler.unrunnable
        if gpus_of(ts) and pool.could_run(ts.resource_restrictions)
    )
    for ws, over in waiting_gpus(scheduler).items():
        could = sum(
            gpus_of(ts) for ts in ws.processing
            if gpus_of(ts) and pool.could_run(ts.resource_restrictions)
        )
        waiting += min(over, could)
    return waiting


# ------------------------------------------------------------------ the policy
@dataclass(frozen=True)
class InstanceView:
    """One instance of the pool as the policy sees it."""

    name: str
    registered: bool = False
    busy: bool = False
    holds_data: bool = False
    workers: int = 1


@dataclass(frozen=True)
class PoolView:
    """What the policy decides from: one pool's demand and instances (oldest first)."""

    demand_gpus: float
    gpus_per_instance: int
    instances: Sequence[InstanceView] = ()
    failures_in_a_row: int = 0
    #: registered workers outside this pool (where retiring workers' results can go)
    workers_elsewhere: int = 0
    #: when the view was taken (monotonic seconds)
    now: float = 0.0
    #: seconds an instance of this pool takes from rent to registration (unknown: kept)
    boot_s: float = math.inf
    #: GPUs' worth of tasks waiting that this pool's workers could run
    waiting_gpus: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What to do: rent up to ``target`` instances, release ``instances``, or only note."""

    action: Literal["rent", "release", "keep", "not renting"]
    reason: str
    target: int | None = None
    instances: tuple[str, ...] = ()
    #: instances held when the decision was taken
    held: int = 0

    @property
    def text(self) -> str:
        if self.action == "rent":
            assert self.target is not None
            return f"rent {self.target - self.held} (to {self.target})"
        if self.action in ("release", "keep"):
            return f"{self.action} {', '.join(self.instances)}"
        return self.action


@dataclass
class GPUDemandPolicy:
    """Rents for the GPUs wanted; releases an idle instance at the ski-rental break-even.

    An instance goes once it has been idle ``idle_timeout_s`` seconds, or, when that is
    None (the default), as long as its pool takes to boot (``PoolView.boot_s``). It stays
    while GPU tasks it could run wait (``PoolView.waiting_gpus``), and, idle, while it holds
    results that futures still reference and no other worker would remain to take them:
    retiring moves data to the workers that stay, and with none left those results would
    be lost and recomputed, renting again (stock adapt does the same). Stops renting after
    ``max_failures_in_a_row`` boots failed in a row.
    """

    minimum: int = 0
    maximum: float = math.inf
    idle_timeout_s: float | None = None
    max_failures_in_a_row: int = 3
    #: since when (``PoolView.now``) each idle instance has been idle
    idle_since: dict[str, float] = field(default_factory=dict)
    _last_note: str | None = None

    def __post_init__(self) -> None:
        if self.minimum < 0 or self.maximum < self.minimum:
            raise ValueError(
                f"adapt(minimum={self.minimum}, maximum={self.maximum}): need 0 <= minimum <= maximum"
            )
        if self.idle_timeout_s is not None and self.idle_timeout_s < 0:
            raise ValueError(f"idle timeout {self.idle_timeout_s}s: must be at least 0")

    def target(self, view: PoolView) -> int:
        """Instances wanted: the GPUs wanted in whole instances, within minimum..maximum."""
        wanted = math.ceil(view.demand_gpus / max(1, view.gpus_per_instance))
        return int(min(self.maximum, max(self.minimum, wanted)))

    def idle_wait_s(self, view: PoolView) -> float:
        """Seconds an instance of this pool may stay idle before it goes."""
        return view.boot_s if self.idle_timeout_s is None else self.idle_timeout_s

    def decide(self, view: PoolView) -> list[Decision]:
        """One round's decisions (often none)."""
        target = self.target(view)
        held = len(view.instances)
        demand = f"{view.demand_gpus:g} GPU(s) wanted"
        if target > held:
            if view.failures_in_a_row >= self.max_failures_in_a_row:
                # Noted again when the pool's last instance has gone: only then can the tasks
                # that only it could run be failed (while one boots they may still run).
                return self._note(Decision(
                    "not renting",
                    f"{demand} but the last {view.failures_in_a_row} instances of this pool failed to "
                    "boot; see cluster.get_logs(), fix the pool's options, then call adapt() again",
                    held=held,
                ), key=f"not renting, {'some' if held else 'none'} held")
            self.idle_since.clear()
            self._last_note = None
            booting = sum(1 for i in view.instances if not i.registered)
            return [Decision(
                "rent",
                f"{demand}, {held} instance(s) held of which {booting} booting, maximum {self.maximum}",
                target=target, held=held,
            )]
        idle = [i for i in view.instances if i.registered and not i.busy]
        idle_names = {i.name for i in idle}
        for name in list(self.idle_since):
            if name not in idle_names:
                del self.idle_since[name]
        for i in idle:
            self.idle_since.setdefault(i.name, view.now)
        wait_s = self.idle_wait_s(view)
        removable = held - max(self.minimum, target)
        ripe = [i for i in idle if view.now - self.idle_since[i.name] >= wait_s][: max(0, removable)]
        if ripe and view.waiting_gpus > 0:
            # Placement is about to give them work (a task it moves is in flight).
            return self._note(Decision(
                "keep",
                f"idle, but {view.waiting_gpus:g} GPU task(s) they could run wait ({demand})",
                instances=tuple(i.name for i in ripe),
            ))
        decisions: list[Decision] = []
        ripe, kept = self._keep_data(view, ripe)
        if kept:
            decisions += self._note(Decision(
                "keep",
                f"idle but holding results that futures still reference ({demand}); release the "
                "futures (del / client.cancel) to let them go",
                instances=tuple(i.name for i in kept),
            ))
        if ripe:
            for i in ripe:
                self.idle_since.pop(i.name, None)
            self._last_note = None
            why = "the pool's boot time: break-even" if self.idle_timeout_s is None else "the idle timeout"
            decisions.append(Decision(
                "release",
                f"idle for {wait_s:.0f}s ({why}), {demand}, minimum {self.minimum}",
                instances=tuple(i.name for i in ripe),
            ))
        return decisions

    def _keep_data(
        self, view: PoolView, ripe: list[InstanceView]
    ) -> tuple[list[InstanceView], list[InstanceView]]:
        """``(to release, to keep)``: keep the ripe ones holding data when no worker would stay."""
        leaving = {i.name for i in ripe}
        staying = view.workers_elsewhere + sum(
            i.workers for i in view.instances if i.registered and i.name not in leaving
        )
        if staying:
            return ripe, []
        kept = [i for i in ripe if i.holds_data]
        return [i for i in ripe if not i.holds_data], kept

    def _note(self, decision: Decision, key: str | None = None) -> list[Decision]:
        """A note said once (per ``key``, its action by default) until something else happens."""
        key = decision.action if key is None else key
        if self._last_note == key:
            return []
        self._last_note = key
        return [decision]


# ------------------------------------------------------------------ adapt()'s keywords
_INSTANCE_SHAPE = "an instance's {what} are known only once it is rented; bound instances with " \
    "minimum/maximum and choose the shape with {option}="
#: keywords of stock ``Cluster.adapt``/``Adaptive`` (and the ``Scheduler.workers_to_close``
#: keywords stock passes on) that this adaptive accepts and does not use, and why
IGNORED_STOCK_KEYWORDS: dict[str, str] = {
    "Adaptive": "this cluster adapts with its own GPU-demand policy (GPUAdaptive)",
    "target_duration": "a GPU task needs a GPU however short: instances follow the GPUs wanted, "
                       "not a duration to aim at",
    "minimum_cores": _INSTANCE_SHAPE.format(what="cores", option="cpu_cores"),
    "maximum_cores": _INSTANCE_SHAPE.format(what="cores", option="cpu_cores"),
    "minimum_memory": _INSTANCE_SHAPE.format(what="memory", option="cpu_ram"),
    "maximum_memory": _INSTANCE_SHAPE.format(what="memory", option="cpu_ram"),
    "worker_key": "instances are released whole (a multi-GPU instance's workers together)",
    **dict.fromkeys(
        ("memory_ratio", "n", "key", "target", "attribute"),
        "the GPU policy chooses which idle instances go (never the last holder of results)",
    ),
}


def ignored_keywords(kwargs: dict[str, Any]) -> dict[str, str]:
    """``{keyword: why it is ignored}`` for stock keywords; a ``ValueError`` naming any other."""
    unknown = sorted(set(kwargs) - set(IGNORED_STOCK_KEYWORDS))
    if unknown:
        raise ValueError(
            f"adapt() got unknown keyword(s) {unknown}; it takes minimum, maximum, pool, interval, "
            f"wait_count and distributed's Adaptive keywords ({', '.join(IGNORED_STOCK_KEYWORDS)})"
        )
    return {name: IGNORED_STOCK_KEYWORDS[name] for name in kwargs}


def idle_timeout_s(wait_count: int | None, interval_s: float) -> float | None:
    """The idle wait ``wait_count`` intervals make; None (no count): the break-even."""
    if wait_count is None:
        return None
    if int(wait_count) < 1:
        raise ValueError(f"wait_count={wait_count}: must be at least 1 (or None for the boot-time break-even)")
    return int(wait_count) * interval_s


# ------------------------------------------------------------------ the loop
class AdaptiveCluster(Protocol):
    """All the adaptive loop sees of its cluster."""

    @property
    def scheduler(self) -> Any: ...  # the in-process Scheduler (None before start)

    @property
    def pools(self) -> PoolSet: ...

    def pool_instances(self, pool: str | None = None) -> list[str]: ...

    def worker_names_of(self, instance_name: str) -> list[str]: ...

    def scale(self, n: int = 0, *, pool: str | None = None) -> Any: ...

    async def release_instances(self, names: Sequence[str]) -> None: ...

    def give_up_pool(self, pool: str, why: str, *, fail_tasks: bool = True) -> None: ...

    def log(self, message: str) -> None: ...


class GPUAdaptive:
    """Observes one pool every ``interval`` and carries out its policy's decisions.

    Created by ``VastAICluster.adapt()``; :meth:`start` runs on the cluster's event loop.
    """

    def __init__(self, cluster: AdaptiveCluster, pool: str, policy: GPUDemandPolicy,
                 *, interval: str | float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.pool = pool
        self.policy = policy
        self.interval_s = parse_timedelta(interval)
        self._clock = clock
        cluster.pools.forgive(pool)  # a new adapt() call is a new chance
        #: (time, decision, reason) of every change, newest last
        self.log: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=1000)
        #: instances the policy wanted at its last round (None before the first)
        self.target: int | None = None
        self._periodic: PeriodicCallback | None = None

    @property
    def minimum(self) -> int:
        return self.policy.minimum

    @property
    def maximum(self) -> float:
        return self.policy.maximum

    def start(self) -> None:
        """Begin adapting (call on the cluster's event loop)."""
        self._periodic = PeriodicCallback(self._step, self.interval_s * 1000)
        self._periodic.start()
        self._periodic.io_loop.add_callback(self._step)

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None

    async def _step(self) -> None:
        try:
            await self.step()
        except Exception:  # noqa: BLE001 - one failed round must not stop adapting
            logger.exception("adaptive step for pool %s failed", self.pool)

    def observe(self) -> PoolView:
        """The pool as it is now, read from the scheduler and the cluster's specs."""
        cluster = self.cluster
        scheduler = cluster.scheduler
        pools = cluster.pools
        by_name = {ws.name: ws for ws in scheduler.workers.values()}
        instances = []
        ours: set[str] = set()
        for name in cluster.pool_instances(self.pool):
            workers = cluster.worker_names_of(name)
            ours.update(workers)
            present = [by_name[w] for w in workers if w in by_name]
            instances.append(InstanceView(
                name=name,
                registered=len(present) == len(workers),
                busy=any(ws.processing for ws in present),
                holds_data=any(ws.has_what for ws in present),
                workers=len(workers),
            ))
        return PoolView(
            demand_gpus=gpu_demand(scheduler, pools.values())[self.pool],
            gpus_per_instance=pools[self.pool].gpus_per_instance,
            instances=instances,
            failures_in_a_row=pools.failures_in_a_row(self.pool),
            workers_elsewhere=sum(1 for name in by_name if name not in ours),
            now=self._clock(),
            boot_s=pools.boot_seconds(self.pool),
            waiting_gpus=waiting_for(scheduler, pools[self.pool]),
        )

    async def step(self) -> None:
        """One round: observe, decide, act."""
        if self.cluster.scheduler is None:
            return
        view = self.observe()
        self.target = self.policy.target(view)
        for decision in self.policy.decide(view):
            self.log.append((time.time(), decision.text, decision.reason))
            if decision.action == "not renting":
                # Said once at WARNING, with the boot failures (the cluster says it once); with
                # no instance left (noted again then), the tasks only this pool could run fail with them.
                self.cluster.give_up_pool(self.pool, f"adapt() stopped renting: {decision.reason}",
                                          fail_tasks=not view.instances)
                continue
            if decision.action == "rent":
                self.cluster.scale(decision.target or 0, pool=self.pool)
            elif decision.action == "release":
                await self.cluster.release_instances(decision.instances)
            self.cluster.log(f"adapt {self.pool}: {decision.text} ({decision.reason})")
