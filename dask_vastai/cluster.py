"""``VastAICluster``: a SpecCluster whose scheduler runs here and whose workers are rentals.

This module turns options into specs (as dask-jobqueue's ``JobQueueCluster`` does) and
holds the user's entry points: scale/adapt, close and previews. The machinery lives
elsewhere: ``cluster_options.py`` (reading and checking the options), ``readout.py`` (cost,
rows, repr, widget), ``pools.py`` (shapes, pools, worker specs, boot failures), ``adaptive.py``
(the GPU-demand policy), ``rentals.py`` (renting, polling, destroying), ``traffic.py`` (bytes
and their dollars), ``tunnel.py`` (SSH), ``bootstrap.py`` (what runs on the instance) and
``instance.py`` (one rental's life).
Every option has one default, in ``vastai.yaml``, read once through ``config.option``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import logging
import math
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.utils import NoOpAwaitable
from tornado.ioloop import PeriodicCallback

from .adaptive import GPUAdaptive, GPUDemandPolicy, idle_timeout_s, ignored_keywords
from .bootstrap import onstart_script
from .budget import BudgetGuard
from .cluster_options import ClusterArguments, ClusterOptions, cluster_parameters
from .config import option
from .exceptions import (
    BootFailed,
    BudgetExceeded,
    BudgetExhausted,
    ClusterNotAttachable,
    NoOfferAvailable,
    VastError,
)
from .instance import ClusterContext, VastInstance
from .network import PeerRoster
from .offers import OfferPreview, no_match_message, preview_offers
from .placement import GPUPlacement
from .pools import (
    DEFAULT_POOL,
    Pool,
    PoolShape,
    ResourceGuard,
    instance_worker_names,
    instances_wanted,
    make_worker_spec,
    spec_pool,
    with_shape_options,
)
from .progress import Progress, choose_mode
from .readout import ClusterReadout
from .rentals import RentalBroker, RentalRecord, nearest_offers
from .roles import TRAFFIC_METRIC, GuardedScheduler
from .safety import LEDGER
from .status import PhaseBook
from .traffic import TrafficCollector
from .tunnel import TunnelHub
from .widget import ClusterWidget

logger = logging.getLogger(__name__)

class VastAICluster(ClusterReadout, SpecCluster):
    """A Dask cluster of rented Vast.ai GPU instances, scheduler on this machine.

    Every Dask connection runs inside SSH opened from here, with TLS inside it: nothing
    listens on a public port and the Vast API key never leaves this machine. Rentals are
    destroyed on close, on error, on Ctrl-C/SIGTERM/SIGHUP and at interpreter exit; an
    on-instance watchdog destroys a rental whose client vanished (``orphan_timeout``).
    Every option's default is in ``vastai.yaml`` (dask config ``vastai.*``).

    Parameters
    ----------
    CLUSTER_OPTIONS

    Instance shape (also for ``add_pool``)
    --------------------------------------
    SHAPE_OPTIONS

    Examples
    --------
    >>> with VastAICluster(gpu="RTX_3090", n=2, max_price=0.4) as cluster:  # doctest: +SKIP
    ...     client = Client(cluster)
    """

    def __init__(self, *args: Any, asynchronous: bool = False, loop: Any = None, **keywords: Any) -> None:
        # The signature shown (help(), notebooks) is built from ClusterArguments and the shape
        # options, where each option is written once (see the end of this module).
        arguments, shape_options = ClusterArguments.from_call(args, keywords, also=("asynchronous", "loop"))
        # ClusterOptions.read reads each option's default from vastai.yaml and fails here, on
        # a bad value, naming it.
        options = ClusterOptions.read(arguments, shape_options)
        cluster_name = options.name
        self._initial_n = options.initial_n
        self.boot_timeout_s, self.orphan_timeout_s = options.boot_timeout_s, options.orphan_timeout_s
        #: the spending caps (None: none), held by the rental broker
        self.caps = options.caps
        self.api, self.key, self.pools = options.api, options.key, options.pools
        self.api.on_outage = self.log  # "waiting for Vast": a scale-up or close riding out an outage
        self._secret_env, self.environment, self._bootstrap = options.secret_env, options.environment, options.bootstrap
        # The CA key stays in this process; Client(cluster) picks up the client-role Security.
        self.allow_worker_clients = options.allow_worker_clients
        self.certificates, self.security = options.certificates, options.security
        scheduler_opts = options.scheduler_options
        self._adaptives: dict[str, GPUAdaptive] = {}
        self._adapt_warned: set[str] = set()  # adapt() keywords already warned about
        self._traffic = TrafficCollector(TRAFFIC_METRIC)
        self.broker: RentalBroker | None = None
        self._budget_guard: BudgetGuard | None = None
        self.hub: TunnelHub | None = None
        self.context: ClusterContext | None = None
        self._quiet = options.quiet
        #: the last phase each instance reported (kept after it is gone: failures keep their reason)
        self._phases = PhaseBook()
        self._progress = Progress(
            lambda: self.instances, mode=choose_mode(options.quiet),
            message_every_s=float(option("progress.message-every")),
        )
        self._cluster_widget: ClusterWidget | None = None
        #: the last rental a spending cap refused (raised by the first wait)
        self._refused: BudgetExceeded | None = None
        # Here, on the caller's (normally the main) thread, where signal handlers can be set.
        LEDGER.install_handlers()
        try:
            super().__init__(
                scheduler={"cls": GuardedScheduler, "options": scheduler_opts},
                worker={"cls": VastInstance, "options": {"pool": self.pools.default}},
                asynchronous=asynchronous, loop=loop, security=self.security, name=cluster_name,
                silence_logs=options.silence_logs,
            )
        except BaseException:
            # SpecCluster leaves its loop thread running when _start() raises.
            loop_runner = getattr(self, "_loop_runner", None)
            if loop_runner is not None and not self.called_from_running_loop:
                loop_runner.stop()
            raise
        if not self.called_from_running_loop and self._initial_n:
            self._progress.show_in_notebook()
            try:
                self.sync(self._wait_for_initial_workers)
            except BaseException:
                self.close()
                raise

    # ---------------------------------------------------------------- start
    async def _start(self) -> None:
        if self.status != Status.created:
            return await super()._start()
        try:
            await self._check_account_and_offers()
        except BaseException:
            await self.api.close()
            self.status = Status.failed
            raise
        await super()._start()
        self.hub = TunnelHub(self.key, scheduler_port=int(self.scheduler.address.rsplit(":", 1)[1]))
        default = self.pools.default
        self.broker = RentalBroker(
            self.api, cluster_name=self.name, requirements=default.requirements,
            create_request=default.create_request, poll_interval_s=float(option("api-poll-interval")),
            log=self.log, caps=self.caps, on_exhausted=self._on_budget_exhausted,
            on_lost=self._on_rental_lost, orphan_timeout_s=self.orphan_timeout_s,
        )
        self._guard = ResourceGuard(self.scheduler, self.pools.values, given_up=lambda: self.pools.given_up)
        self.scheduler.add_plugin(self._guard)
        GPUPlacement.install(self.scheduler)
        self._budget_guard = BudgetGuard(self.scheduler)
        self.scheduler.add_plugin(self._budget_guard)
        # Workers accept worker peers only from this list (certificates of live incarnations).
        roster = PeerRoster(self.scheduler, self.certificates.live_serials)
        self.scheduler.add_plugin(roster)
        self.certificates.on_change(roster.push)  # a renewal offered, then switched to
        self.context = ClusterContext(
            broker=self.broker,
            hub=self.hub,
            scheduler_address=self.scheduler.address,
            certificates=self.certificates,
            worker_clients=self.allow_worker_clients,
            boot_timeout_s=self.boot_timeout_s,
            heartbeat_interval_s=max(1.0, min(10.0, self.orphan_timeout_s / 6)),
            registered=self._registered,
            log=self.log,
            on_boot_outcome=self._on_boot_outcome,
            env=self._secret_env,
            environment=self.environment,
            max_boot_attempts=int(option("max-boot-attempts")),
            on_phase=self._phases.note,
            ssh_direct_timeout_s=float(option("ssh-direct-timeout")),
            direct_probe_timeout_s=float(option("direct-probe-timeout")),
            orphan_timeout_s=self.orphan_timeout_s,
            pools=self.pools,
            forget_workers=self._forget_workers,
        )
        traffic = PeriodicCallback(
            self._count_traffic, 1000 * parse_timedelta(option("traffic-interval"), default="s")
        )
        self.periodic_callbacks["dask-vastai-traffic"] = traffic
        traffic.start()
        progress = PeriodicCallback(
            self._progress.refresh, 1000 * parse_timedelta(option("progress.refresh"), default="s")
        )
        self.periodic_callbacks["dask-vastai-progress"] = progress
        progress.start()
        self.new_spec = make_worker_spec(default, VastInstance, self.context)
        for _ in range(self._initial_n):
            self._add_instance(DEFAULT_POOL)

    async def _check_account_and_offers(self) -> None:
        """Fail at construction, with a sentence, on a rejected key, a query nothing matches, or
        spending caps that the first instances (at least one) on the cheapest offers would pass."""
        await self.api.current_user()
        if not self._initial_n and self.caps is None:
            return
        default = self.pools.default
        preview = await preview_offers(self.api, default.requirements, limit=max(10, self._initial_n))
        if not preview.offers and default.on_demand is not None:
            # interruptible="fallback": no bid matches, so its rentals will be on demand
            preview = await preview_offers(self.api, default.on_demand, limit=max(10, self._initial_n))
        if not preview.offers:
            if not self._initial_n:
                return  # nothing is rented now; an offer may match by the time one is wanted
            requirements = default.requirements
            nearest = await nearest_offers(self.api, requirements)
            raise NoOfferAvailable(no_match_message(requirements, preview.query, nearest))
        why = self.caps.start_refusal(self._initial_n, [o.dph_total for o in preview.offers]) if self.caps else None
        if why is not None:
            raise BudgetExceeded(why)

    def log(self, message: str) -> None:
        """A line in the cluster's log (``get_logs()``), shown unless ``quiet``."""
        self._log(message)

    def _log(self, log: str) -> None:
        # Not distributed's: it prints whenever ``self.quiet`` is False, which SpecCluster
        # leaves so; here a line goes where the user reads it (above a live display in a
        # terminal, stdout in a notebook), once.
        self._cluster_manager_logs.append((datetime.datetime.now(), log))
        self._progress.log(log)

    # ------------------------------------------------------------------ pools
    def add_pool(self, name: str, **options: Any) -> Pool:
        """Add an instance shape that scales on its own: ``add_pool("a100", gpu="A100_SXM4")``.

        Its workers carry the resource ``pool-<name>``; ``scale(n, pool=name)`` and
        ``adapt(..., pool=name)`` act on it alone. Options: those of the instance shape.
        """
        return self.pools.add(name, PoolShape.from_options(options, where=f"pool {name!r}"))

    def _add_instance(self, pool: str) -> None:
        spec = make_worker_spec(self.pools.get(pool), VastInstance, self.context)
        self.worker_spec[self.pools.new_instance_name(pool)] = spec

    def pool_instances(self, pool: str | None = None) -> list[str]:
        """Spec names (one per instance) of a pool, oldest first."""
        return self.pools.instances_of(self.pools.get(pool).name, self.worker_spec)

    def planned_gpus(self) -> dict[str, int]:
        """GPUs per pool of the instances held: registered, booting or about to be rented."""
        return self.pools.planned_gpus(self.worker_spec)

    def worker_names_of(self, instance_name: str) -> list[str]:
        return instance_worker_names(instance_name, self.worker_spec.get(instance_name))

    def _on_boot_outcome(self, instance: str, pool: str, error: BaseException | None) -> None:
        """An instance registered (``error=None``: how long it took counts) or gave up booting: drop its spec.

        The last instance of a pool giving up with none registered gives the pool up: the
        tasks only it could run fail with its boot failures, and so does ``wait_for_workers``.
        """
        if isinstance(error, BudgetExceeded):
            # Refused by a spending cap (the broker said why): no machine failed, nothing was rented.
            self._refused = error
            self.worker_spec.pop(instance, None)
            self.loop.add_callback(self._correct_state)
            return
        worker = self.workers.get(instance)
        record = worker.record if isinstance(worker, VastInstance) else None
        boot_s = time.time() - record.rented_at if error is None and record is not None else None
        self.pools.record_boot(instance, pool, error, boot_s)
        if error is None:
            return
        self.log(f"{instance} failed for good ({self.pools.failures_in_a_row(pool)} in a row in pool {pool}): {error}")
        self.worker_spec.pop(instance, None)
        self.loop.add_callback(self._correct_state)
        if pool not in self._adaptives and not self.pool_instances(pool):  # adapt decides for itself
            self.give_up_pool(pool, f"its last instance failed for good ({self.pools.failures_in_a_row(pool)} "
                                    "instance(s) in a row could not boot, each on up to vastai.max-boot-attempts "
                                    "machines)")

    def give_up_pool(self, pool: str, why: str, *, fail_tasks: bool = True) -> None:
        """Say, once at WARNING with its boot failures, that ``pool`` gave up.

        ``fail_tasks``: it holds no instance, so the tasks only it could run fail with that
        sentence (``gather`` and Snakemake see it) instead of waiting forever.
        """
        if pool in self.pools.given_up:
            return
        message = self.pools.give_up(pool, why) if fail_tasks else self.pools.give_up_message(pool, why)
        if self.pools.first_give_up_warning(pool):
            self.log(f"WARNING {message}")
            logger.warning("%s", message)
        if fail_tasks:
            self._guard.sweep()

    def _on_rental_lost(self, record: RentalRecord) -> None:
        """Count a rental lost after renting in its pool (the broker destroys it, its instance replaces it)."""
        spec = self.worker_spec.get(record.worker_name)
        pool = spec_pool(spec) if spec is not None else None
        if pool is None:
            return
        falls_back = self.pools.note_loss(pool.name, record.lost_kind or "lost")
        self.log(f"pool {pool.name}: {self.pools.losses[pool.name].text()}")
        if falls_back:
            self.log(falls_back)
            logger.warning("%s", falls_back)

    async def _forget_workers(self, names: Sequence[str]) -> None:
        """Remove workers of these names that the scheduler still lists (their incarnation is gone).

        Their tasks are rescheduled, and the names are free for the workers that replace them.
        """
        scheduler = self.scheduler
        stale = [ws.address for ws in list(scheduler.workers.values()) if ws.name in set(names)]
        for address in stale:
            with contextlib.suppress(Exception):
                await scheduler.remove_worker(address, stimulus_id=f"dask-vastai-lost-{time.time()}", close=False)

    def instance_registered(self, instance_name: str) -> bool:
        return self._registered(self.worker_names_of(instance_name))

    def _registered(self, names: Sequence[str] | Mapping[str, str]) -> bool:
        """Whether the scheduler has these workers (a mapping: each at the address given)."""
        seen = {ws.name: ws.address for ws in self.scheduler.workers.values()}
        if isinstance(names, Mapping):
            return all(seen.get(n) == address for n, address in names.items())
        return all(n in seen for n in names)

    def _update_worker_status(self, op: str, msg: Any) -> None:  # type: ignore[override]
        # SpecCluster closes (destroys) an instance whose worker left for lost-worker-timeout
        # and never starts another in its place. Each VastInstance owns that instead: it
        # reconnects a dropped link, or replaces a rental that is lost (instance.py). So the
        # scheduler's worker list is followed as Cluster does, without SpecCluster's close.
        Cluster._update_worker_status(self, op, msg)

    # ---------------------------------------------------------------- scaling
    def scale(  # type: ignore[override]
        self, n: int | None = None, memory: Any = None, cores: Any = None, *,
        instances: int | None = None, jobs: int | None = None, workers: int | None = None,
        pool: str | None = None,
    ):
        """Hold this many instances in ``pool`` (default: the default pool).

        ``scale(n)``, ``scale(instances=n)`` and ``scale(jobs=n)`` (dask-jobqueue's spelling)
        all count instances. ``scale(workers=w)`` counts workers and rents whole instances:
        ``ceil(w / workers per instance)`` (a 4-GPU instance runs 4 workers, so
        ``workers=6`` holds 2 instances, 8 workers). Instances being dropped go
        unregistered first, then newest first.
        """
        if memory is not None or cores is not None:
            raise ValueError("scale(memory=/cores=) is not supported: scale counts instances; pick a pool shape")
        n = instances_wanted(n, instances=instances, jobs=jobs, workers=workers,
                             workers_per_instance=self.pools.get(pool).workers_per_instance)
        if n and self.broker is not None and self.broker.exhausted is not None:
            raise self.broker.exhausted
        pool_name = self.pools.get(pool).name
        if n:
            self.pools.given_up.pop(pool_name, None)  # asked again: a new chance
        names = self.pool_instances(pool_name)
        if len(names) > n:
            # Drop instances whose workers never registered first, then the newest.
            unregistered = [k for k in names if not self.instance_registered(k)]
            registered = [k for k in names if k not in unregistered]
            for name in (unregistered[::-1] + registered[::-1])[: len(names) - n]:
                del self.worker_spec[name]
        if self.status not in (Status.closing, Status.closed):
            for _ in range(n - len(names)):
                self._add_instance(pool_name)
        self.loop.add_callback(self._correct_state)
        return NoOpAwaitable() if self.asynchronous else None

    async def release_instances(self, names: Sequence[str]) -> None:
        """Retire these instances' workers (their data moves first), then destroy them."""
        for name in names:
            self.worker_spec.pop(name, None)
        await self._correct_state()

    def adapt(  # type: ignore[override]
        self, minimum: int | None = 0, maximum: float | None = math.inf, *, pool: str | None = None,
        interval: str | float | None = None, wait_count: int | None = None, **stock: Any,
    ) -> GPUAdaptive:
        """Follow the queued GPU demand with ``minimum``..``maximum`` instances of ``pool``.

        An idle instance goes once it has been idle as long as its pool takes to boot (the
        break-even of paying idle seconds against boot seconds), or after ``wait_count``
        intervals when given. distributed's other ``Adaptive`` keywords (``target_duration``,
        ``minimum_cores``, ...) are accepted and ignored, with one warning saying why.
        """
        ignored = {k: v for k, v in ignored_keywords(stock).items() if k not in self._adapt_warned}
        if ignored:
            self._adapt_warned.update(ignored)
            warnings.warn(
                "adapt() ignores " + "; ".join(f"{k} ({why})" for k, why in ignored.items()),
                UserWarning, stacklevel=2,
            )
        if self.broker is not None and self.broker.exhausted is not None:
            raise self.broker.exhausted
        pool_name = self.pools.get(pool).name
        interval_s = parse_timedelta(option("adapt.interval", interval))
        policy = GPUDemandPolicy(
            minimum=int(minimum or 0), maximum=math.inf if maximum is None else maximum,
            idle_timeout_s=idle_timeout_s(option("adapt.wait-count", wait_count), interval_s),
            max_failures_in_a_row=int(option("adapt.max-failures-in-a-row")),
        )
        old = self._adaptives.pop(pool_name, None)
        if old is not None:
            old.stop()
        adaptive = GPUAdaptive(self, pool_name, policy, interval=interval_s)
        self._adaptives[pool_name] = adaptive
        self.loop.add_callback(adaptive.start)
        return adaptive

    async def _wait_for_initial_workers(self) -> None:
        """Wait until the first ``n`` instances' workers registered, or raise their boot error."""
        await self._correct_state()
        deadline = time.monotonic() + self.boot_timeout_s * 1.5 + 30
        while True:
            if self._refused is not None:
                raise self._refused
            if self.broker is not None and self.broker.exhausted is not None:
                raise self.broker.exhausted
            if self.pools.boot_errors:
                name, error = next(iter(self.pools.boot_errors.items()))
                raise BootFailed(f"worker {name} could not start: {error}") from error
            instances = list(self.workers.values())
            if instances and all(isinstance(w, VastInstance) and w.registered_at is not None for w in instances):
                # Each rental carries its worker's name once the cluster is up (`dask-vastai ls`);
                # the label calls ran while the instances booted, so this rarely waits.
                if self.broker is not None:
                    await self.broker.labels_written()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(instances)} instance(s) did not all register within {self.boot_timeout_s:.0f}s "
                    f"(boot_timeout); states: {self.instances}"
                )
            await asyncio.sleep(0.25)

    async def _wait_for_workers(  # type: ignore[override]
        self, n_workers: int = 0, timeout: Any = None,  # noqa: ASYNC109 - distributed's signature
    ) -> None:
        """Wait for ``n_workers`` registered workers; raise the boot failures when they cannot come.

        distributed's wait only times out ("Only 0/3 workers arrived after 90.0"); here, when
        the instances held can no longer give ``n_workers`` workers because boots failed (or a
        pool gave up), the error says why, with each failure's reason.
        """
        deadline = None if not timeout else time.monotonic() + parse_timedelta(timeout)
        while True:
            running = sum(1 for ws in list(self.scheduler.workers.values()) if ws.status == Status.running)
            if running >= n_workers:
                return
            held = sum(len(self.worker_names_of(name)) for name in list(self.worker_spec))
            if held < n_workers and (error := self._boot_failures_error(n_workers, held)) is not None:
                raise error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"wait_for_workers({n_workers}): {running} worker(s) registered within {timeout}, "
                    f"{held} held (registered or booting); states:\n{self.instances}"
                )
            await asyncio.sleep(0.25)

    def _boot_failures_error(self, wanted: int, held: int) -> BootFailed | None:
        """Why the workers held fall short of ``wanted``: the pools that gave up or whose boots fail."""
        lines = [self.pools.given_up[p] for p in self.pools if p in self.pools.given_up]
        for pool in self.pools:
            if pool in self.pools.given_up or not self.pools.failures_in_a_row(pool):
                continue
            if pool in self._adaptives:
                continue  # adapt rents again until its own limit, then gives the pool up
            lines.append(self.pools.give_up_message(pool, "instances failed to boot and were not replaced"))
        if not lines:
            return None
        return BootFailed(
            f"{wanted} worker(s) wanted, but only {held} can come (registered or booting):\n" + "\n".join(lines)
            + "\nFix the options, then call cluster.scale() or cluster.adapt() again."
        )

    def __await__(self):  # type: ignore[override]
        async def _() -> VastAICluster:
            if self.status == Status.created:
                await self._start()
            await self.scheduler
            try:
                if self._initial_n:
                    await self._wait_for_initial_workers()
                else:
                    await self._correct_state()
            except BaseException:
                await self._close()
                raise
            return self

        return _().__await__()

    # ---------------------------------------------------------------- traffic
    def _count_traffic(self) -> None:
        self._traffic.count(self.scheduler, list(self.workers.values()))

    async def _ask_traffic(self, addresses: Collection[str]) -> None:
        await self._traffic.ask(self.scheduler, list(self.workers.values()), addresses)

    async def _correct_state_internal(self) -> None:
        """SpecCluster's, with the leaving instances' workers retired first by their worker names
        (their data moves to the workers that stay), and the direct ones' counters read after
        that. SpecCluster retires by spec name as if it were an address; here a spec name is an
        instance's, which no worker has, so its own call retired nothing and the data of a
        released instance was lost (a Snakemake temp() output kept there, for one)."""
        leaving = set(self.workers) - set(self.worker_spec)
        names = {n for name in leaving for n in getattr(self.workers[name], "worker_names", ())}
        addresses = self._traffic.direct_addresses(self.scheduler, names) if names else []
        # Only where workers stay is there somewhere for the data to go: at close or scale(0)
        # a retired worker would go on heartbeating until its instance stops (a warning each).
        staying = set(self.workers) & set(self.worker_spec)
        if names and staying and self.scheduler.status == Status.running:
            with contextlib.suppress(Exception):  # SpecCluster closes them below all the same
                await self.scheduler_comm.retire_workers(names=sorted(names))
        if addresses and self.scheduler.status == Status.running:
            await self._ask_traffic(addresses)
        await super()._correct_state_internal()

    # ---------------------------------------------------------------- close
    async def _close(self) -> None:
        for adaptive in self._adaptives.values():
            adaptive.stop()
        with contextlib.suppress(Exception):
            await self._ask_traffic(self._traffic.direct_addresses(self.scheduler))  # what the workers counted last
        # SpecCluster's close scales only what scale(0) reaches: empty every pool.
        self.worker_spec.clear()
        if self.broker is not None:
            # The closing instances' destroys and the broker's close are one round, one deadline.
            self.broker.begin_close()
        if self.hub is not None:
            self.hub.expect_ends()
        try:
            if self.status != Status.created:
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError, VastError):
                    await asyncio.wait_for(super()._close(), timeout=max(30.0, self.boot_timeout_s / 4))
                with contextlib.suppress(Exception):
                    self._count_traffic()  # the closing workers' last reports
        finally:
            # Whatever happened above, nothing may stay rented: the broker's round rides out an
            # outage for up to vastai.api.outage-timeout, then this says once what may still bill.
            if self.broker is not None:
                try:
                    await self.broker.close()
                except VastError as e:
                    message = self.broker.left_billing(e)
                    self.log(f"ERROR {message}")
                    logger.error("%s", message)
            if self.hub is not None:
                with contextlib.suppress(Exception):
                    await self.hub.close()
            await self.api.close()
            if self.status != Status.closed:
                self.status = Status.closed
            # The last word: every instance destroyed, the final cost.
            self._progress.close()
            if self._cluster_widget is not None:
                with contextlib.suppress(Exception):
                    self._cluster_widget.update()

    # -------------------------------------------------------------- previews
    async def _offers(self) -> OfferPreview:
        return await preview_offers(self.api, self.pools.default.requirements)

    def offers(self) -> OfferPreview:
        """The query this cluster sends and the offers it matches now; rents nothing."""
        return self.sync(self._offers)

    def onstart_script(self) -> str:
        """The exact ``onstart`` text every rental gets (it holds no secret)."""
        return onstart_script(self._bootstrap)

    def _on_budget_exhausted(self, error: BudgetExhausted) -> None:
        """``max_cost`` is reached (the broker is destroying every rental): stop asking for more,
        fail the tasks that wait for a worker (and every later one), let the instances go."""
        for adaptive in self._adaptives.values():
            adaptive.stop()
        if self._budget_guard is not None:
            self._budget_guard.exhaust(error)
        self.worker_spec.clear()
        self.loop.add_callback(self._correct_state)

    @classmethod
    def from_name(cls, name: str) -> VastAICluster:
        """Not possible: a cluster lives in the process that made it (see the error)."""
        raise ClusterNotAttachable(
            f"VastAICluster.from_name({name!r}): a VastAICluster lives in the process that created "
            "it: its scheduler runs there, and only that process holds the cluster's SSH key and "
            "TLS certificates, so no other process can take it over. From that process, pass the "
            "cluster object (Client(cluster)); to find or destroy its rentals from anywhere, run "
            f"`dask-vastai ls --cluster {name}` or `dask-vastai cleanup --cluster {name}`."
        )

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):  # type: ignore[override]
        from distributed.utils import Log

        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        if self.broker is not None:
            for record in list(self.broker.records.values()):
                if record.destroyed_at is None:
                    with contextlib.suppress(Exception):
                        text = await self.api.logs(record.instance_id, tail=1000)
                        logs[f"instance {record.instance_id} ({record.worker_name})"] = Log(text)
        return logs


VastAICluster.__doc__ = (VastAICluster.__doc__ or "").replace(
    "CLUSTER_OPTIONS", ClusterArguments.docs(indent="        ").strip()
).replace("SHAPE_OPTIONS", PoolShape.docs(indent="        ").strip())
# What help(), IDEs and notebooks show: the options by name and type (ClusterArguments and
# PoolShape are their one list), then distributed's own two.
_init = inspect.signature(VastAICluster.__init__).parameters
VastAICluster.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_init["self"], *cluster_parameters(), _init["asynchronous"], _init["loop"]], return_annotation="None",
)
VastAICluster.add_pool.__signature__ = with_shape_options(VastAICluster.add_pool)  # type: ignore[attr-defined]
