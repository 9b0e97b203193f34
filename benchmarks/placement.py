"""Do GPU tasks submitted while instances boot run on every instance, and how soon?

Question (issue 14): with workers of 8 threads and one GPU each (what a rented instance
has), GPU tasks submitted before the workers register all ran on the first worker to
register (dask/distributed#1851). For each scenario this runs three placements in one
process and reports the makespan against the ideal one given when each worker really
registered (each task to the worker free soonest; never more than the issue's
"registration + ideal", which takes the last registration):

* ``stock``: distributed as it is (``vastai.placement.enabled: false``);
* ``move``: dask-vastai's ``GPUPlacement`` (moves waiting tasks to free GPU slots);
* ``hold``: the alternative design, defined here: GPU tasks stay ``no-worker`` in the
  scheduler until a slot frees, then go to it.

Scenarios: 8 GPU tasks of ``--task`` s on ``scale(4)`` and under ``adapt(0, 4)``, 2 tasks
of twice that on ``scale(2)``, and ``--short`` tasks of 0.1 s on ``scale(4)`` (where a
scheduler round trip per task shows). Each runs on a VastAICluster against the emulator
(real sandboxes, SSH tunnels, TLS, rate limits, boot delay ``--boot``) and on a LocalCluster
whose worker processes are started after the submission (``--local-only`` for that part
alone). Under adapt it also counts instances released before the last task started, i.e.
while a GPU task waited.

    python -m benchmarks.placement [--task 10] [--boot 5] [--short 160] [--local-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import heapq
import logging
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_vastai.placement import GPU, GPUPlacement, gpus_of, slots_of

STRATEGIES = ("stock", "move", "hold")


# ------------------------------------------------------------------ the alternative design
class HoldGPUTasks(SchedulerPlugin):
    """GPU tasks wait in the scheduler (``no-worker``) until a worker has a free GPU slot.

    ``valid_workers`` is replaced on the scheduler so that a worker whose slots are taken is
    not valid for a GPU task; when a GPU task leaves a worker, the held ones are offered
    again (unrunnable tasks are otherwise re-checked only when a worker arrives). Not for the
    product: held tasks count as ``unrunnable``, so ``no-workers-timeout`` would fail them
    while every worker is merely busy, and the next task leaves the scheduler only once the
    previous one is reported done (one round trip per task start).
    """

    name = "hold-gpu-tasks"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._valid_workers = scheduler.valid_workers
        scheduler.valid_workers = self.valid_workers
        self._scheduled = False

    def valid_workers(self, ts: Any) -> Any:
        valid = self._valid_workers(ts)
        need = gpus_of(ts)
        if not need:
            return valid
        pool = self.scheduler.running if valid is None else valid
        return {ws for ws in pool if ws.used_resources.get(GPU, 0) + need <= slots_of(ws)}

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        ts = self.scheduler.tasks.get(key)
        if start == "processing" and ts is not None and gpus_of(ts) and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._offer)

    def _offer(self) -> None:
        self._scheduled = False
        held = sorted((ts for ts in self.scheduler.unrunnable if gpus_of(ts)),
                      key=lambda ts: ts.priority, reverse=True)  # transitions run last-in first
        if held:
            self.scheduler.transitions({ts.key: "processing" for ts in held}, stimulus_id=f"offer-held-{time.time()}")


class Registrations(SchedulerPlugin):
    """When each worker registered (the scheduler runs in this process)."""

    name = "registrations"

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        self.at[worker] = time.time()


async def install(scheduler: Any, strategy: str) -> Registrations:
    """Put ``strategy`` on ``scheduler``, on its event loop (placement is off by config for
    stock and hold)."""
    if strategy == "move" and GPUPlacement.name not in scheduler.plugins:
        GPUPlacement.install(scheduler)
    if strategy == "hold":
        scheduler.add_plugin(HoldGPUTasks(scheduler))
    registrations = Registrations()
    scheduler.add_plugin(registrations)
    return registrations


# ------------------------------------------------------------------ the work
def gpu_task(i: int, seconds: float) -> tuple[str, float, float]:
    import time

    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return get_worker().name, start, time.time()


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    workers: int
    tasks: int
    task_s: float
    adapt: bool = False


def ideal_makespan(offsets_s: list[float], tasks: int, task_s: float) -> float:
    """Each task to the worker free soonest, workers free from their registration on."""
    free = list(offsets_s)
    heapq.heapify(free)
    end = 0.0
    for _ in range(tasks):
        end = heapq.heappop(free) + task_s
        heapq.heappush(free, end)
    return max(end, max(offsets_s))


def measure(client: Client, scenario: Scenario, registrations: Registrations, t0: float,
            futures: list[Any]) -> dict[str, Any]:
    results = client.gather(futures)
    makespan = max(end for _, _, end in results) - t0
    offsets = sorted(t - t0 for t in registrations.at.values())[: scenario.workers]
    ideal = ideal_makespan(offsets, scenario.tasks, scenario.task_s)
    issue_ideal = offsets[-1] + scenario.task_s * -(-scenario.tasks // scenario.workers)
    shares = Counter(name for name, _, _ in results)
    return {
        "makespan_s": round(makespan, 2), "ideal_s": round(ideal, 2), "ratio": round(makespan / ideal, 3),
        "registration_s": [round(o, 1) for o in offsets], "issue_ratio": round(makespan / issue_ideal, 3),
        "shares": sorted(shares.values(), reverse=True), "last_start_s": max(s for _, s, _ in results) - t0,
    }


@contextlib.contextmanager
def placement_config(strategy: str) -> Iterator[None]:
    with dask.config.set({"vastai.placement.enabled": strategy == "move"}):
        yield


def run_vastai(emu: Any, scenario: Scenario, strategy: str) -> dict[str, Any]:
    from dask_vastai import VastAICluster

    with placement_config(strategy), VastAICluster(
        gpu="RTX_3090", api_url=emu.url, api_key=emu.api_key, name=f"p{strategy}", quiet=True,
        boot_timeout=300, worker_options={"nthreads": 8},
    ) as cluster, Client(cluster) as client:
        registrations = cluster.sync(install, cluster.scheduler, strategy)
        adaptive = cluster.adapt(minimum=0, maximum=scenario.workers) if scenario.adapt else None
        if not scenario.adapt:
            cluster.scale(scenario.workers)
        t0 = time.time()
        futures = client.map(gpu_task, range(scenario.tasks), seconds=scenario.task_s,
                             resources={"GPU": 1}, pure=False)
        out = measure(client, scenario, registrations, t0, futures)
        if adaptive is not None:
            releases = [t - t0 for t, d, _ in adaptive.log if d.startswith("release")]
            out["released_while_waiting"] = sum(1 for t in releases if t < out["last_start_s"])
            out["rented"] = sum(int(d.split()[1]) for _, d, _ in adaptive.log if d.startswith("rent"))
    return out


def run_local(scenario: Scenario, strategy: str) -> dict[str, Any]:
    with placement_config(strategy), LocalCluster(
        n_workers=0, threads_per_worker=8, resources={"GPU": 1}, dashboard_address=":0",
        processes=True,
    ) as cluster, Client(cluster) as client:
        registrations = cluster.sync(install, cluster.scheduler, strategy)
        adaptive = cluster.adapt(minimum=0, maximum=scenario.workers) if scenario.adapt else None
        t0 = time.time()
        futures = client.map(gpu_task, range(scenario.tasks), seconds=scenario.task_s,
                             resources={"GPU": 1}, pure=False)
        if not scenario.adapt:
            cluster.scale(scenario.workers)  # the workers start after the submission
        out = measure(client, scenario, registrations, t0, futures)
        if adaptive is not None:
            downs = [t - t0 for t, e in adaptive.log if isinstance(e, dict) and e.get("status") == "down"]
            out["released_while_waiting"] = sum(1 for t in downs if t < out["last_start_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=float, default=10.0, help="seconds per GPU task (the 2-task case: twice)")
    parser.add_argument("--boot", type=float, default=5.0, help="emulator boot delay, seconds")
    parser.add_argument("--short", type=int, default=160, help="0.1 s tasks in the short-task case (0: skip)")
    parser.add_argument("--local-only", action="store_true")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    strategies = args.strategies.split(",")
    scenarios = [
        Scenario("8 x task on scale(4)", 4, 8, args.task),
        Scenario("8 x task under adapt(0, 4)", 4, 8, args.task, adapt=True),
        Scenario("2 x 2task on scale(2)", 2, 2, 2 * args.task),
    ]
    if args.short:
        scenarios.append(Scenario(f"{args.short} x 0.1 s on scale(4)", 4, args.short, 0.1))
    rows = []
    for scenario in scenarios:
        for strategy in strategies:
            out = run_local(scenario, strategy)
            rows.append(("LocalCluster", scenario.name, strategy, out))
            print("LocalCluster", scenario.name, strategy, out, flush=True)
    if not args.local_only:
        from dask_vastai.emulator import Emulator

        with Emulator(runtime="sandbox", boot_delay_s=args.boot, rate_limits=True,
                      state_dir=Path(tempfile.mkdtemp(prefix="placement-"))) as emu:
            for scenario in scenarios:
                for strategy in strategies:
                    out = run_vastai(emu, scenario, strategy)
                    rows.append(("VastAICluster", scenario.name, strategy, out))
                    print("VastAICluster", scenario.name, strategy, out, flush=True)
    print("\n| cluster | scenario | placement | makespan s | ideal s | ratio | issue ratio | shares | released while waiting |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cluster, name, strategy, out in rows:
        print(f"| {cluster} | {name} | {strategy} | {out['makespan_s']} | {out['ideal_s']} | {out['ratio']} | "
              f"{out['issue_ratio']} | {out['shares']} | {out.get('released_while_waiting', '-')} |")
    worst = {s: max(o["ratio"] for c, n, st, o in rows if st == s) for s in strategies}
    print(f"\nworst ratio per placement: {worst}; median: "
          f"{ {s: statistics.median(o['ratio'] for _, _, st, o in rows if st == s) for s in strategies} }")


if __name__ == "__main__":
    main()
