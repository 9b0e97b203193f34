"""GPU-slot placement: no GPU task waits on a busy worker while another has a free GPU.

distributed assigns a task with resource restrictions to a worker at once, whether that
worker's GPUs are busy or not (``ws.used_resources`` counts what is assigned, never what
runs; ``valid_workers`` looks only at what each worker declares), and nothing moves it
afterwards: work stealing takes only from a worker holding more tasks than threads, and a
rented instance has 8 threads or more for one GPU (dask/distributed#1851). Tasks submitted
while instances boot therefore all land on the first worker to register and run there one
after another while the others bill idle.

:class:`GPUPlacement` is a scheduler plugin that moves GPU tasks which have not started from
the workers most loaded (GPUs asked per GPU slot) to the least loaded workers of a pool that
can run them: a free slot always takes a waiting task, and queues spread over the workers as
they register, so that each worker runs its next task without asking the scheduler. It
acts each time the balance may have changed (a worker arrived or started running, a GPU
task was assigned, finished, failed or was released, a move was answered) and on a slow
periodic check (``placement.check-interval``). It moves with distributed's own steal
protocol (``WorkStealing.move_task_request``): the worker holding the task is asked to give
it up and refuses if it already started, so a running task is never moved or run twice. A
worker's GPU slots are ``resources["GPU"]``; a task occupies ``resource_restrictions["GPU"]``
of them; ``used_resources`` beyond the slots is what waits there.

Why moving and not holding. The other design keeps GPU tasks in the scheduler (as
``no-worker``) until a slot frees and sends one per freed slot. Measured in one run
(``benchmarks/placement.py``, ``benchmarks/RESULTS.md``) both reach the ideal makespan
given when the workers registered (within 0.1% for 10-20 s GPU tasks submitted while the
instances boot, where distributed alone takes 1.7-3.0x), and on 160 tasks of 0.1 s moving
came to 1.013x of it through the SSH tunnels against 1.022x for holding (1.025x against
1.041x on a LocalCluster): holding sends the next task only once the previous one is
reported done, a scheduler round trip per task start, small against GPU work of seconds.
Moving is kept for what a makespan does not show: a moved task waits on its worker, which
fetches its inputs meanwhile; distributed's transitions and ``valid_workers`` stay as they
are (holding must replace the scheduler's ``valid_workers``); and held tasks count as
``unrunnable``, which ``distributed.scheduler.no-workers-timeout`` fails while every worker
is merely busy.

Stock stealing moves a task between workers without moving its resources
(``move_task_confirm`` leaves ``used_resources`` on the victim), which would make the
counts above lie after the first move; the plugin wraps the ``steal-response`` handler to
carry them over, for its own moves and stock stealing's alike.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.stealing import WorkStealing
from tornado.ioloop import PeriodicCallback

from .config import option

logger = logging.getLogger(__name__)

GPU = "GPU"
#: the worker's answers to a steal request that mean "already running or done here"
_STARTED = frozenset({"memory", "executing", "long-running", "cancelled", "resumed"})


def gpus_of(ts: Any) -> float:
    """GPU slots task ``ts`` occupies (0 for a task without a GPU restriction)."""
    restrictions = ts.resource_restrictions
    return float(restrictions.get(GPU, 0)) if restrictions else 0.0


def slots_of(ws: Any) -> float:
    """GPU slots worker ``ws`` declares."""
    return float(ws.resources.get(GPU, 0))


@dataclass(frozen=True)
class Move:
    """One planned move of a not-yet-started GPU task to a less loaded worker."""

    task: Any
    victim: Any
    thief: Any


def waiting_gpus(scheduler: Any) -> dict[Any, float]:
    """GPU slots' worth of tasks assigned beyond each worker's slots (those wait there)."""
    out: dict[Any, float] = {}
    for ws in scheduler.workers.values():
        over = ws.used_resources.get(GPU, 0) - slots_of(ws)
        if over > 0:
            out[ws] = over
    return out


def plan_moves(scheduler: Any, in_flight: dict[Any, Any], refused: Iterable[Any] = ()) -> list[Move]:
    """The moves that even out the GPU tasks assigned per GPU slot, free slots first.

    A worker's load is the GPUs its tasks ask for per GPU slot it has (2.0: one task runs,
    one waits behind it). A task that waits moves from the most loaded worker to the least
    loaded one that can run it while that lowers the larger of the two loads: a free slot
    (load below 1) always takes a waiting task, and queues are spread over the workers as
    they register, so that a worker runs its next task without asking the scheduler.

    ``in_flight`` maps tasks being moved to ``{"victim": ws, "thief": ws}`` (the stealing
    extension's record), counted where they are going. ``refused`` are tasks their worker
    said it had started. A worker's candidates are taken lowest priority first (a worker
    starts its constrained tasks highest priority first, so those start last), and at most
    as many GPUs' worth as wait there. Pure: reads the scheduler's state, changes nothing.
    """
    refused = set(refused)
    assigned: defaultdict[Any, float] = defaultdict(float)
    for ws in scheduler.workers.values():
        assigned[ws] = ws.used_resources.get(GPU, 0)
    for ts, info in in_flight.items():
        assigned[info["thief"]] += gpus_of(ts)
        assigned[info["victim"]] -= gpus_of(ts)
    thieves = [ws for ws in scheduler.running if slots_of(ws) > 0]
    waiting = {ws: assigned[ws] - slots_of(ws) for ws in scheduler.workers.values() if assigned[ws] > slots_of(ws)}
    if not thieves or not waiting:
        return []

    def load(ws: Any, change: float = 0.0) -> float:
        return (assigned[ws] + change) / slots_of(ws)

    def helps(thief: Any, victim: Any, need: float) -> bool:
        # A free slot always takes it (it starts there at once); else only if it evens out.
        return thief is not victim and (
            assigned[thief] + need <= slots_of(thief) or load(thief, need) <= load(victim, -need)
        )

    def movable(ws: Any) -> list[Any]:
        return [ts for ts in ws.processing if gpus_of(ts) and ts not in in_flight and ts not in refused
                and ts not in ws.long_running and not ts.actor]

    queues: dict[Any, list[Any]] = {}
    valid_for: dict[tuple[Any, ...], Any] = {}  # valid_workers depends on the restrictions only
    failed: set[tuple[Any, tuple[Any, ...]]] = set()  # stays failed: moves only raise thieves' loads
    moves: list[Move] = []
    while waiting:
        victim = max(waiting, key=load)
        if victim not in queues:
            candidates = movable(victim)
            # Cheap before the sort: can any worker take even the smallest of them?
            smallest = min(map(gpus_of, candidates), default=0.0)
            if not candidates or not any(helps(ws, victim, smallest) for ws in thieves):
                del waiting[victim]
                continue
            # Last to start first (a worker starts its tasks highest priority first); popped from the end.
            queues[victim] = sorted(candidates, key=operator.attrgetter("priority"))
        queue = queues[victim]
        moved = False
        while queue and not moved:
            ts = queue.pop()
            need = gpus_of(ts)
            key = (tuple(sorted(ts.resource_restrictions.items())), frozenset(ts.worker_restrictions or ()),
                   frozenset(ts.host_restrictions or ()))
            if (victim, key) in failed:
                continue
            if key not in valid_for:
                valid_for[key] = scheduler.valid_workers(ts)
            valid = valid_for[key]
            fits = [ws for ws in thieves if (valid is None or ws in valid) and helps(ws, victim, need)]
            if not fits:
                failed.add((victim, key))
                continue
            # The least loaded worker first; among equals, the one holding most of the inputs.
            thief = min(fits, key=lambda ws: (load(ws), scheduler.get_comm_cost(ts, ws)))
            moves.append(Move(ts, victim, thief))
            assigned[victim] -= need
            assigned[thief] += need
            waiting[victim] -= need
            moved = True
        if not moved or waiting[victim] <= 0 or not queue:
            del waiting[victim]
    return moves


class GPUPlacement(SchedulerPlugin):
    """Keeps every free GPU slot busy while GPU tasks wait elsewhere (see the module doc).

    Installed on the scheduler of a ``VastAICluster`` (not on a scheduler one attaches to:
    that one belongs to its owner). ``check_interval_s`` is the backstop period for what no
    event announces (a paused worker resuming); events do the work.
    """

    name = "dask-vastai-gpu-placement"

    def __init__(self, scheduler: Any, *, check_interval_s: float | None = None) -> None:
        # Given here: Scheduler.add_plugin does not call start() on an in-process scheduler.
        self.scheduler = scheduler
        stealing = scheduler.extensions.get("stealing")
        if stealing is None:
            # Work stealing switched off: its protocol is still how a task moves safely. Not
            # started, so it does not balance by itself.
            stealing = WorkStealing(scheduler)
        self.stealing: WorkStealing = stealing
        self._confirm = scheduler.stream_handlers["steal-response"]
        scheduler.stream_handlers["steal-response"] = self._steal_response
        #: tasks their worker said it had started when asked to give them up
        self.refused: set[Any] = set()
        #: moves requested here, moves confirmed (stock stealing's too), requests refused
        self.counts = {"requested": 0, "moved": 0, "refused": 0}
        self._scheduled = False
        interval_s = parse_timedelta(option("placement.check-interval", check_interval_s), default="s")
        self._periodic = PeriodicCallback(self.balance, interval_s * 1000)
        scheduler.periodic_callbacks[self.name] = self._periodic
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # started by start() once the scheduler runs
        else:
            self._periodic.start()

    @classmethod
    def install(cls, scheduler: Any) -> GPUPlacement | None:
        """Add placement to ``scheduler`` unless ``placement.enabled`` is false in the config."""
        if not option("placement.enabled"):
            return None
        placement = cls(scheduler)
        scheduler.add_plugin(placement)
        return placement

    async def start(self, scheduler: Any = None) -> None:
        if not self._periodic.is_running():
            self._periodic.start()

    async def close(self) -> None:
        self._periodic.stop()

    # ------------------------------------------------------------ the events
    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        self._soon()

    def remove_worker(self, scheduler: Any = None, worker: str | None = None, **kwargs: Any) -> None:
        self._soon()

    def log_event(self, topic: str, msg: Any) -> None:
        # A worker registers as "init" and says "running" later: only then can it take tasks.
        if isinstance(msg, dict) and msg.get("action") == "worker-status-change":
            self._soon()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start != "processing" and finish != "processing":
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or not gpus_of(ts):
            return
        if start == "processing":
            self.refused.discard(ts)
        self._soon()

    def restart(self, scheduler: Any = None) -> None:
        self.refused.clear()

    def _steal_response(self, **msg: Any) -> None:
        """Stock confirmation, then carry the task's resources to where it went."""
        scheduler = self.scheduler
        ts = scheduler.tasks.get(msg.get("key"))
        before = ts.processing_on if ts is not None else None
        current = ts is not None and self.stealing.in_flight.get(ts, {}).get("stimulus_id") == msg.get("stimulus_id")
        self._confirm(**msg)
        if ts is None:
            return
        after = ts.processing_on
        if before is not None and after is not None and after is not before:
            scheduler.release_resources(ts, before)
            scheduler.acquire_resources(ts, after)
            self.counts["moved"] += 1
        elif current and msg.get("state") in _STARTED and after is before:
            self.refused.add(ts)
            self.counts["refused"] += 1
        self._soon()

    def _soon(self) -> None:
        """One balance per loop iteration, after the scheduler finished what it was doing."""
        if self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.balance()

    # ------------------------------------------------------------ the moves
    def balance(self) -> list[Move]:
        """Request the moves :func:`plan_moves` plans; returns them."""
        try:
            moves = plan_moves(self.scheduler, self.stealing.in_flight, self.refused)
            for move in moves:
                answer = self.stealing.move_task_request(move.task, move.victim, move.thief)
                if answer not in ("in-flight", "comm-closed"):
                    self.counts["requested"] += 1
                    logger.debug("moving %s from %s (GPUs busy) to %s (GPU free)",
                                 move.task.key, move.victim.address, move.thief.address)
            return moves
        except Exception:  # noqa: BLE001 - placement must never take the scheduler down
            logger.exception("GPU placement failed; tasks stay where distributed put them")
            return []
