"""The GPU-demand policy and the adaptive loop without a cluster (as distributed's
``test_adaptive_core.py`` tests ``AdaptiveCore`` with a fake): hand-made views in,
decisions out; a fake cluster behind the ``AdaptiveCluster`` protocol for the loop."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest

from dask_vastai.adaptive import (
    AdaptiveCluster,
    GPUAdaptive,
    GPUDemandPolicy,
    InstanceView,
    PoolView,
    gpu_demand,
)
from dask_vastai.pools import Pool, PoolSet, PoolShape


def _idle(name: str, **kw: Any) -> InstanceView:
    return InstanceView(name=name, registered=True, **kw)


def _booting(name: str) -> InstanceView:
    return InstanceView(name=name, registered=False)


# ------------------------------------------------------------------ target
@pytest.mark.parametrize(
    ("demand", "per_instance", "minimum", "maximum", "target"),
    [
        (5, 1, 0, math.inf, 5),
        (5, 2, 0, math.inf, 3),   # whole instances
        (5, 2, 0, 2, 2),          # never above maximum
        (0, 1, 1, 4, 1),          # never below minimum
        (0.5, 1, 0, 4, 1),        # a short GPU task still needs a GPU
        (0, 4, 0, 4, 0),
    ],
)
def test_target_is_gpus_wanted_in_whole_instances_within_bounds(demand, per_instance, minimum, maximum, target) -> None:
    policy = GPUDemandPolicy(minimum=minimum, maximum=maximum)
    assert policy.target(PoolView(demand_gpus=demand, gpus_per_instance=per_instance)) == target


def test_bad_bounds_are_refused_with_the_values() -> None:
    with pytest.raises(ValueError, match="minimum=3, maximum=2"):
        GPUDemandPolicy(minimum=3, maximum=2)
    with pytest.raises(ValueError, match="minimum=-1"):
        GPUDemandPolicy(minimum=-1)
    with pytest.raises(ValueError, match="wait_count=0"):
        GPUDemandPolicy(wait_count=0)


# ------------------------------------------------------------------ renting
def test_rents_up_to_the_target_counting_booting_instances() -> None:
    policy = GPUDemandPolicy(maximum=3)
    [decision] = policy.decide(PoolView(demand_gpus=12, gpus_per_instance=1, instances=[_booting("a")]))
    assert decision.action == "rent" and decision.target == 3
    assert decision.text == "rent 2 (to 3)"
    assert "12 GPU(s) wanted" in decision.reason and "1 booting" in decision.reason


def test_nothing_more_is_rented_while_booting_instances_cover_the_demand() -> None:
    policy = GPUDemandPolicy(maximum=3)
    view = PoolView(demand_gpus=3, gpus_per_instance=1, instances=[_booting("a"), _booting("b"), _booting("c")])
    assert policy.decide(view) == []


def test_a_pool_whose_boots_keep_failing_stops_renting_and_says_so_once() -> None:
    policy = GPUDemandPolicy(maximum=3, max_failures_in_a_row=3)
    view = PoolView(demand_gpus=2, gpus_per_instance=1, failures_in_a_row=3)
    [note] = policy.decide(view)
    assert note.action == "not renting" and "last 3 instances" in note.reason and "adapt()" in note.reason
    assert policy.decide(view) == []  # not every round
    # Below the bound it rents again.
    [decision] = policy.decide(PoolView(demand_gpus=2, gpus_per_instance=1, failures_in_a_row=2))
    assert decision.action == "rent"


# ------------------------------------------------------------------ releasing
def test_an_idle_instance_is_released_only_after_wait_count_rounds() -> None:
    policy = GPUDemandPolicy(wait_count=3)
    view = PoolView(demand_gpus=0, gpus_per_instance=1, instances=[_idle("a")], workers_elsewhere=1)
    assert policy.decide(view) == []
    assert policy.decide(view) == []
    [decision] = policy.decide(view)
    assert decision.action == "release" and decision.instances == ("a",)
    assert "GPU" in decision.reason


def test_work_resets_the_idle_count() -> None:
    policy = GPUDemandPolicy(wait_count=2)
    idle = PoolView(demand_gpus=0, gpus_per_instance=1, instances=[_idle("a")], workers_elsewhere=1)
    busy = PoolView(demand_gpus=1, gpus_per_instance=1, instances=[_idle("a", busy=True)], workers_elsewhere=1)
    assert policy.decide(idle) == []
    assert policy.decide(busy) == []
    assert policy.decide(idle) == []  # counting from zero again
    assert [d.action for d in policy.decide(idle)] == ["release"]


def test_never_releases_below_the_minimum_nor_a_booting_instance() -> None:
    policy = GPUDemandPolicy(minimum=1, wait_count=1)
    view = PoolView(demand_gpus=0, gpus_per_instance=1, instances=[_idle("a"), _idle("b"), _booting("c")])
    [decision] = policy.decide(view)
    assert decision.instances == ("a", "b")[: len(decision.instances)]
    assert "c" not in decision.instances and len(decision.instances) == 2  # 3 held, minimum 1


def test_idle_instances_holding_results_stay_when_no_other_worker_would_take_them() -> None:
    policy = GPUDemandPolicy(wait_count=1)
    alone = PoolView(demand_gpus=0, gpus_per_instance=1, instances=[_idle("a", holds_data=True)])
    [keep] = policy.decide(alone)
    assert keep.action == "keep" and keep.instances == ("a",) and "futures" in keep.reason
    assert policy.decide(alone) == []  # said once
    # With a worker elsewhere to take the data, it goes.
    elsewhere = PoolView(demand_gpus=0, gpus_per_instance=1, instances=[_idle("a", holds_data=True)],
                         workers_elsewhere=1)
    assert [d.action for d in policy.decide(elsewhere)] == ["release"]


# ------------------------------------------------------------------ GPU demand
def _pool(name: str, **shape: Any) -> Pool:
    return Pool.from_shape(name, PoolShape(**shape), onstart="true")


def _task(**restrictions: float) -> SimpleNamespace:
    return SimpleNamespace(resource_restrictions=restrictions or None)


def test_gpu_demand_counts_running_and_unassigned_gpu_tasks_per_pool() -> None:
    default, big = _pool("default"), _pool("big", num_gpus=2, worker_per_gpu=False)
    scheduler = SimpleNamespace(
        workers={"w": SimpleNamespace(resources={"GPU": 1, "pool-default": 1e6},
                                      processing=[_task(GPU=1), _task(GPU=1)])},
        unrunnable=[_task(GPU=1), _task(GPU=2), _task(**{"pool-big": 1}), _task()],
        queued=[],
    )
    demand = gpu_demand(scheduler, [default, big])
    # 2 running + 1 unassigned on default; a 2-GPU task only big can run; a pool-only task takes a slot.
    assert demand == {"default": 3.0, "big": 3.0}


def test_tasks_without_restrictions_keep_one_default_instance() -> None:
    scheduler = SimpleNamespace(workers={}, unrunnable=[], queued=[object()])
    assert gpu_demand(scheduler, [_pool("default"), _pool("x")]) == {"default": 1.0, "x": 0.0}


# ------------------------------------------------------------------ the loop
class FakeCluster:
    """An ``AdaptiveCluster`` with no rentals: instances registered as soon as scaled."""

    def __init__(self) -> None:
        self.pools = PoolSet("c", onstart="true")
        self.pools.add("default", PoolShape())
        self.specs: dict[str, Any] = {}
        self.released: list[str] = []
        self.lines: list[str] = []
        self.scheduler = SimpleNamespace(workers={}, unrunnable=[], queued=[])

    def pool_instances(self, pool: str | None = None) -> list[str]:
        return list(self.specs)

    def worker_names_of(self, instance_name: str) -> list[str]:
        return [instance_name]

    def scale(self, n: int = 0, *, pool: str | None = None) -> None:
        while len(self.specs) < n:
            name = self.pools.new_instance_name("default")
            self.specs[name] = {}
            self.scheduler.workers[name] = SimpleNamespace(
                name=name, resources={"GPU": 1, "pool-default": 1e6}, processing=[], has_what=[])

    async def release_instances(self, names) -> None:
        for name in names:
            self.specs.pop(name)
            self.scheduler.workers.pop(name)
            self.released.append(name)

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_the_loop_observes_decides_and_acts_through_the_protocol() -> None:
    cluster: AdaptiveCluster = FakeCluster()  # the protocol is all the loop needs
    adaptive = GPUAdaptive(cluster, "default", GPUDemandPolicy(maximum=2, wait_count=2), interval="1s")
    fake = cluster
    assert isinstance(fake, FakeCluster)
    fake.scheduler.unrunnable = [_task(GPU=1), _task(GPU=1), _task(GPU=1)]
    asyncio.run(adaptive.step())
    assert len(fake.specs) == 2  # 3 GPUs wanted, maximum 2
    assert adaptive.log[-1][1] == "rent 2 (to 2)" and "3 GPU(s) wanted" in adaptive.log[-1][2]
    fake.scheduler.unrunnable = []
    asyncio.run(adaptive.step())
    assert fake.released == []
    asyncio.run(adaptive.step())
    assert sorted(fake.released) == ["c-0", "c-1"]
    assert fake.lines[-1].startswith("adapt default: release")


def test_a_new_adapt_forgives_the_pools_failures() -> None:
    cluster = FakeCluster()
    for k in range(3):
        cluster.pools.record_boot(f"c-{k}", "default", RuntimeError("pull rate limit"))
    assert cluster.pools.failures_in_a_row("default") == 3
    GPUAdaptive(cluster, "default", GPUDemandPolicy(), interval="1s")
    assert cluster.pools.failures_in_a_row("default") == 0
    assert list(cluster.pools.boot_errors) == ["c-0", "c-1", "c-2"]  # the record stays
