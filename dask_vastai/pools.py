"""Pools: one instance shape each (GPU model, GPU count, RAM), one scheduler for all.

A pool's workers carry a resource named after it (``pool-<name>``), so a task can ask for
a pool (``resources={"GPU": 1, "pool-a100": 1}``) or just for what it needs
(``{"GPU": 1}``, any pool). The resource is given a large capacity so that it selects a
pool without limiting how many tasks run there (``GPU`` does that).

:class:`ResourceGuard` fails a task at once when no pool could ever run it: distributed
leaves such a task pending forever, and ``no-workers-timeout`` cannot tell an instance
that is still booting from a shape nobody rents.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle

from .exceptions import ImpossibleResources
from .offers import OfferRequirements
from .vast import CreateRequest

logger = logging.getLogger(__name__)

POOL_RESOURCE_PREFIX = "pool-"
#: capacity of a pool's resource on each worker: it selects, it does not limit
POOL_RESOURCE_CAPACITY = 1_000_000.0
#: resources every worker advertises (besides its pool's)
STANDARD_RESOURCES = ("GPU", "CPU", "MEMORY")


@dataclass
class Pool:
    """One instance shape, scaled and adapted on its own."""

    name: str
    requirements: OfferRequirements
    create_request: CreateRequest
    worker_per_gpu: bool = True
    worker_options: dict[str, Any] = field(default_factory=dict)

    @property
    def resource_name(self) -> str:
        return f"{POOL_RESOURCE_PREFIX}{self.name}"

    @property
    def gpus_per_instance(self) -> int:
        return self.requirements.num_gpus

    @property
    def workers_per_instance(self) -> int:
        return self.gpus_per_instance if self.worker_per_gpu else 1

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.worker_per_gpu else self.gpus_per_instance

    def group(self) -> list[str] | None:
        """SpecCluster group suffixes: one worker per GPU on a multi-GPU instance."""
        if self.workers_per_instance > 1:
            return [f"-gpu{k}" for k in range(self.workers_per_instance)]
        return None

    def could_run(self, restrictions: Mapping[str, float]) -> bool:
        """Whether a worker of this pool could ever satisfy ``restrictions``."""
        for name, amount in restrictions.items():
            if name == "GPU":
                if amount > self.gpus_per_worker:
                    return False
            elif name in ("CPU", "MEMORY"):
                # Only known once rented (an offer may have more than the minimum asked for).
                continue
            elif name.startswith(POOL_RESOURCE_PREFIX):
                if name != self.resource_name:
                    return False
            else:
                if name not in self.worker_options.get("resources", {}):
                    return False
        return True

    def describe(self) -> str:
        gpu = self.requirements.gpu or "any GPU"
        return f"{self.name} ({self.gpus_per_instance}x {gpu}, {self.gpus_per_worker} GPU per worker)"


def impossible_message(restrictions: Mapping[str, float], pools: Iterable[Pool]) -> str:
    asked = ", ".join(f"{k}={v:g}" for k, v in sorted(restrictions.items()))
    have = "; ".join(p.describe() for p in pools) or "none"
    return (
        f"no pool of this cluster can run a task asking for {{{asked}}}. Pools: {have}. "
        f"Ask for resources a pool provides (GPU, CPU, MEMORY, {POOL_RESOURCE_PREFIX}<pool>), "
        "or add a pool with cluster.add_pool(name, gpu=..., num_gpus=...)."
    )


class ResourceGuard(SchedulerPlugin):
    """Fails, when they arrive, tasks whose resources no pool can ever provide."""

    name = "dask-vastai-resource-guard"

    def __init__(self, scheduler: Any, pools: Callable[[], Iterable[Pool]]) -> None:
        # Given here: Scheduler.add_plugin does not call start() on an in-process scheduler.
        self.scheduler = scheduler
        self._pools = pools

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "no-worker":
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or not ts.resource_restrictions:
            return
        pools = list(self._pools())
        if any(pool.could_run(ts.resource_restrictions) for pool in pools):
            return
        # Not from inside a transition: the scheduler is in the middle of one.
        message = impossible_message(ts.resource_restrictions, pools)
        asyncio.get_running_loop().call_soon(self._fail, key, message)

    def _fail(self, key: Any, message: str) -> None:
        scheduler = self.scheduler
        ts = scheduler.tasks.get(key)
        if ts is None or ts.state != "no-worker":
            return
        logger.warning("failing task %s: %s", key, message)
        stimulus_id = f"dask-vastai-impossible-{key}"
        recommendations = scheduler.transition(
            key,
            "erred",
            stimulus_id=stimulus_id,
            cause=key,
            exception=pickle.dumps(ImpossibleResources(message)),
            exception_text=message,
        )
        scheduler.transitions(recommendations, stimulus_id)
