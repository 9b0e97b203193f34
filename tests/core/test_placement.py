"""GPU-slot placement on a real in-process scheduler with real workers (no cluster, no timing).

Workers of 8 threads and one GPU slot (what a rented instance has) join one by one after
the GPU tasks were submitted, as instances register after a script, ``adapt()`` or
Snakemake submitted. Tasks block until the test lets them go, so every check reads the
scheduler's and the workers' state at a point where nothing else moves: the property is
that no GPU task sits on a worker whose GPU slots are all busy while a worker that can run
it has a free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from distributed import Client, Event, Scheduler, Worker, get_worker

from dask_vastai.placement import GPU, GPUPlacement, plan_moves, slots_of
from tests.helpers import waiting

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def until(predicate: Callable[[], Any], what: str) -> Any:
    return await waiting.until(predicate, 20.0, what, interval_s=0.02)


def gpu_task(i: int) -> str:
    """Holds its GPU until the test sets ``go-<i>``; records where it started."""
    worker = get_worker()
    worker.__dict__.setdefault("gpu_starts", []).append(i)
    Event(f"go-{i}").wait(timeout=60)
    return worker.name


# ------------------------------------------------------------------ the property
def stranded(scheduler: Scheduler) -> dict[str, float]:
    """GPUs' worth of tasks waiting on a worker whose slots are full, per worker, counted
    only while a worker that can run one of them has a free slot (the scheduler cannot tell
    which of a worker's tasks runs; beyond its slots, the rest wait)."""
    free = [ws for ws in scheduler.running if ws.used_resources.get(GPU, 0) < slots_of(ws)]
    out = {}
    for ws in scheduler.workers.values():
        waiting = ws.used_resources.get(GPU, 0) - slots_of(ws)
        if waiting > 0 and any(
            valid is None or any(f in valid for f in free)
            for valid in map(scheduler.valid_workers, ws.processing)
        ) and free:
            out[ws.name] = waiting
    return out


def executing(workers: list[Worker]) -> dict[str, int]:
    """GPU tasks each worker is running now (the workers' own view)."""
    return {w.name: len(w.state.executing) for w in workers}


def settled(scheduler: Scheduler) -> bool:
    """No move asked and unanswered, and nothing more to move."""
    stealing = scheduler.extensions["stealing"]
    return not stealing.in_flight and not plan_moves(scheduler, stealing.in_flight)


@dataclass
class Run:
    scheduler: Scheduler
    client: Client
    futures: list[Any]
    workers: list[Worker] = field(default_factory=list)

    async def join(self, name: str, **resources: float) -> Worker:
        """A worker of 8 threads and one GPU slot (plus ``resources``) joins."""
        worker = await Worker(self.scheduler.address, nthreads=8, name=name, resources={"GPU": 1, **resources})
        self.workers.append(worker)
        await until(lambda: any(ws.name == name for ws in self.scheduler.running), f"{name} running")
        return worker

    async def go(self, i: int) -> None:
        await Event(f"go-{i}", client=self.client).set()


@contextlib.asynccontextmanager
async def gpu_tasks(n: int, *, placement: bool, **resources: float) -> AsyncIterator[Run]:
    """``n`` blocked GPU tasks submitted before any worker exists; all let go at the end."""
    async with Scheduler(dashboard_address=":0", validate=True) as scheduler:
        if placement:
            scheduler.add_plugin(GPUPlacement(scheduler))
        async with Client(scheduler.address, asynchronous=True) as client:
            futures = client.map(gpu_task, range(n), resources={"GPU": 1, **resources}, pure=False)
            await until(lambda: len(scheduler.unrunnable) == n, f"{n} tasks waiting for a worker")
            run = Run(scheduler, client, futures)
            try:
                yield run
            finally:
                for i in range(n):
                    await run.go(i)
                await asyncio.gather(*(w.close() for w in run.workers))


# ------------------------------------------------------------------ tests
def test_gpu_tasks_spread_over_workers_as_they_register_and_follow_free_slots() -> None:
    async def main() -> None:
        async with gpu_tasks(8, placement=True) as run:
            scheduler, workers = run.scheduler, run.workers
            for k in range(4):
                await run.join(f"w{k}")
                await until(lambda: settled(scheduler), "placement to settle")
                assert stranded(scheduler) == {}
                # Every worker that registered runs one GPU task, none runs two.
                await until(lambda: sum(executing(workers).values()) == len(workers), "one task per worker")
                assert set(executing(workers).values()) == {1}, executing(workers)
            # Let the tasks go one at a time, round robin from the last worker to join: a
            # slot freed there must take a task waiting on the first worker at once.
            index = {f.key: i for i, f in enumerate(run.futures)}
            for done in range(1, 9):
                [ts] = workers[-1 - (done - 1) % 4].state.executing
                await run.go(index[ts.key])
                await until(lambda d=done: sum(f.done() for f in run.futures) >= d, f"{done} done")
                await until(lambda: settled(scheduler), "placement to settle")
                assert stranded(scheduler) == {}
                await until(lambda d=done: sum(executing(workers).values()) == min(4, 8 - d),
                            f"{min(4, 8 - done)} tasks running")
            results = await run.client.gather(run.futures)
            # Every worker ran its share, every task ran once, resources add up again.
            assert sorted(results.count(f"w{k}") for k in range(4)) == [2, 2, 2, 2]
            assert sorted(i for w in workers for i in w.gpu_starts) == list(range(8))
            assert all(ws.used_resources[GPU] == 0 for ws in scheduler.workers.values())

    asyncio.run(main())


def test_without_placement_distributed_leaves_them_on_the_first_worker() -> None:
    """The baseline the property is about (dask/distributed#1851): the check can fail."""

    async def main() -> None:
        async with gpu_tasks(4, placement=False) as run:
            await run.join("w0")
            await run.join("w1")
            await until(lambda: sum(executing(run.workers).values()) == 1, "the first task running")
            assert stranded(run.scheduler) == {"w0": 3}
            assert executing(run.workers) == {"w0": 1, "w1": 0}

    asyncio.run(main())


def test_a_task_moves_only_to_a_worker_of_a_pool_that_can_run_it() -> None:
    async def main() -> None:
        async with gpu_tasks(2, placement=True, **{"pool-a": 1}) as run:
            await run.join("a0", **{"pool-a": 1e6})
            await run.join("b0", **{"pool-b": 1e6})  # a free GPU of another pool
            await until(lambda: settled(run.scheduler), "placement to settle")
            await until(lambda: executing(run.workers)["a0"] == 1, "a0 running one")
            assert executing(run.workers)["b0"] == 0
            assert stranded(run.scheduler) == {}  # b0 cannot run them: nothing is stranded
            await run.join("a1", **{"pool-a": 1e6})
            await until(lambda: executing(run.workers) == {"a0": 1, "b0": 0, "a1": 1}, "a1 takes the second")
            await run.go(0)
            await run.go(1)
            assert sorted(await run.client.gather(run.futures)) == ["a0", "a1"]

    asyncio.run(main())


def test_a_started_task_is_never_moved_nor_run_twice() -> None:
    """Whatever the planner asks, a worker keeps a task it started (the steal protocol)."""

    async def main() -> None:
        async with gpu_tasks(2, placement=True) as run:
            scheduler = run.scheduler
            placement: GPUPlacement = scheduler.plugins[GPUPlacement.name]
            w0 = await run.join("w0")
            await until(lambda: executing(run.workers) == {"w0": 1}, "w0 running one")
            [started] = w0.state.executing
            victim = scheduler.workers[w0.address]
            w1 = scheduler.workers[(await run.join("w1")).address]
            await until(lambda: settled(scheduler), "placement to settle")
            # Ask for the running one to move: its worker refuses, nothing moves.
            task = scheduler.tasks[started.key]
            placement.stealing.move_task_request(task, victim, w1)
            await until(lambda: not placement.stealing.in_flight, "the answer")
            assert task.processing_on is victim
            assert task in placement.refused and placement.counts["refused"] == 1
            assert (victim.used_resources[GPU], w1.used_resources[GPU]) == (1, 1)
            assert settled(scheduler)  # and it is not asked again
            await run.go(0)
            await run.go(1)
            assert sorted(await run.client.gather(run.futures)) == ["w0", "w1"]
            assert sorted(i for w in run.workers for i in w.gpu_starts) == [0, 1]
            assert not placement.refused

    asyncio.run(main())
