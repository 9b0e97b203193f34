"""``VastAICluster``: a SpecCluster whose scheduler runs here and whose workers are rentals.

This module turns options into specs (as dask-jobqueue's ``JobQueueCluster`` does) and
holds the user's entry points: scale/adapt, cost and previews. The machinery lives
elsewhere: ``pools.py`` (shapes, pools, worker specs, boot failures), ``adaptive.py`` (the
GPU-demand policy), ``rentals.py`` (renting, polling, destroying), ``tunnel.py`` (SSH),
``bootstrap.py`` (what runs on the instance) and ``instance.py`` (one rental's life).
Every option has one default, in ``vastai.yaml``, read once through ``config.option``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import textwrap
import time
import uuid
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.utils import NoOpAwaitable
from tornado.ioloop import PeriodicCallback

from .adaptive import GPUAdaptive, GPUDemandPolicy, idle_timeout_s, ignored_keywords
from .bootstrap import BootstrapConfig, onstart_script
from .budget import BudgetGuard, SpendingCaps
from .config import option
from .environment import ClientEnvironment, InstanceEnvironment, python_option, split_env
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
    PoolLosses,
    PoolSet,
    PoolShape,
    ResourceGuard,
    instance_worker_names,
    make_worker_spec,
    spec_pool,
    with_shape_options,
)
from .progress import Progress, choose_mode
from .rentals import RentalBroker, RentalRecord, nearest_offers
from .roles import TRAFFIC_METRIC, GuardedScheduler, scheduler_gate
from .safety import LEDGER
from .security import ClusterCA
from .status import GONE, InstanceTable, PhaseBook, instance_table
from .traffic import TrafficCollector
from .tunnel import ClusterKey, TunnelHub
from .vast import VastAPI
from .widget import ClusterWidget, cluster_html

logger = logging.getLogger(__name__)

_CLUSTER_OPTIONS = """\
n:
    instances to rent at start (``n_workers`` is an alias). ``n``, ``scale(n)`` and
    ``adapt()`` count instances, not workers: a K-GPU instance runs K workers.
secret_env:
    environment that reaches the workers over SSH only (API tokens), never Vast.
packages, pip_args:
    pip specifiers installed on every instance (only what differs), and options for that
    install (``["--index-url", ...]``); dask, distributed, cloudpickle and msgpack are always
    made equal to this client's versions.
python:
    ``"3.11"`` to have the onstart install that Python with uv (when the image's differs
    from this client's), or the path of the image's interpreter to use.
boot_timeout, orphan_timeout:
    seconds from rent to registered worker; seconds after which an instance that lost
    this client destroys itself.
api_key, api_url:
    Vast credentials and origin (defaults: ``VAST_API_KEY``, https://console.vast.ai).
name:
    the cluster's name, in every rental's label ``dask-vastai:<name>:<worker>``.
allow_worker_clients:
    let tasks submit tasks (``get_client()``/``worker_client()``, or a ``Future``, ``Event``,
    ``Lock``, ``Queue`` or ``Variable`` used inside a task). Off by default: hosts then act only
    as workers. Turning it on lets every host run code on every other host and on this
    machine (the scheduler unpickles the task graphs a client sends), so turn it on only for
    hosts you trust as much as this machine.
max_cost, max_hourly:
    spending caps, in dollars as Vast's meter counts them (``dph_total`` per second, storage
    included). ``max_cost``: for the cluster's whole life; closing starts when the spend plus
    the $/h times the seconds to notice and destroy (``api-poll-interval`` +
    ``spending.destroy-latency``) reaches it: every rental is destroyed, none is rented again,
    and waiting tasks fail with ``BudgetExhausted``. ``max_hourly``: the $/h of all rentals
    together; a rental that would pass it is refused (``BudgetExceeded``, naming the rate now).
    Both hold for every rental: ``scale``, ``adapt`` and replacements alike.
dashboard_address:
    where the scheduler's dashboard listens; default ``127.0.0.1:0``, this machine only
    (it is unauthenticated and shows logs, call stacks and tracebacks).
quiet:
    print nothing (no log lines, no boot progress); ``get_logs()`` still has the log.
silence_logs:
    level below which distributed's own log lines are not printed while the cluster runs
    (``"warning"``, as ``LocalCluster``); False leaves distributed's logging as it is.
pools:
    more instance shapes, e.g. ``[{"name": "a100", "gpu": "A100_SXM4", "cpu_ram": 64}]``
    (the shape options below); the cluster's own shape options make the ``default`` pool."""


class VastAICluster(SpecCluster):
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

    def __init__(
        self,
        gpu: str | Sequence[str] | None = None,
        n: int | None = None,
        *,
        n_workers: int | None = None,
        secret_env: Mapping[str, str] | None = None,
        packages: Sequence[str] | None = None,
        pip_args: Sequence[str] | None = None,
        python: str | None = None,
        boot_timeout: float | None = None,
        orphan_timeout: float | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        name: str | None = None,
        allow_worker_clients: bool | None = None,
        pools: Sequence[Mapping[str, Any]] | None = None,
        max_cost: float | None = None,
        max_hourly: float | None = None,
        dashboard_address: str | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        quiet: bool = False,
        silence_logs: str | int | bool | None = None,
        **shape_options: Any,
    ) -> None:
        if n is not None and n_workers is not None and n != n_workers:
            raise ValueError(f"give n={n} or n_workers={n_workers}, not both")
        self._initial_n = int(option("n-workers", n if n is not None else n_workers) or 0)
        if self._initial_n < 0:
            raise ValueError(f"n={self._initial_n}: the number of instances cannot be negative")
        self.boot_timeout_s = float(option("boot-timeout", boot_timeout))
        self.orphan_timeout_s = float(option("orphan-timeout", orphan_timeout))
        if self.boot_timeout_s <= 0 or self.orphan_timeout_s <= 0:
            raise ValueError(
                f"boot_timeout={self.boot_timeout_s} and orphan_timeout={self.orphan_timeout_s} must be "
                "positive numbers of seconds"
            )
        #: the spending caps (None: none), held by the rental broker
        self.caps = SpendingCaps.from_options(max_cost, max_hourly, check_interval_s=float(option("api-poll-interval")))
        cluster_name = option("name", name) or f"c{uuid.uuid4().hex[:8]}"
        if ":" in cluster_name or not cluster_name.strip():
            raise ValueError(f"name={cluster_name!r}: a cluster name cannot be empty or contain ':'")
        shape = PoolShape.from_options({"gpu": gpu, **shape_options}, where="VastAICluster")
        # Built now so that a bad key/URL configuration fails here, not inside a batch.
        self.api = VastAPI(api_key=option("api-key", api_key), api_url=option("api-url", api_url))
        self.api.on_outage = self.log  # "waiting for Vast": a scale-up or close riding out an outage
        self.key = ClusterKey.generate(comment=f"dask-vastai-{cluster_name}")
        # Secret entries travel in the incarnation (SSH); only the rest goes to Vast.
        public_env, self._secret_env = split_env(shape.get("env"), option("secret-env", secret_env))
        client_env = ClientEnvironment.current(
            packages=list(option("packages", packages) or ()), pip_args=list(option("pip-args", pip_args) or ())
        )
        python_path, python_version = python_option(option("python", python), client_env)
        self.environment = InstanceEnvironment(client_env, image=str(shape.get("image")))
        self._bootstrap = BootstrapConfig(
            cluster_name=cluster_name,
            public_key=self.key.public_openssh,
            api_url=self.api.api_url,
            orphan_timeout_s=int(self.orphan_timeout_s),
            python=python_path,
            python_version=python_version,
        )
        # Validated here, as jobqueue renders job_script(): a bad option fails now.
        cuda = client_env.cuda  # a CUDA build of torch: offers whose driver supports its CUDA
        self.pools = PoolSet(cluster_name, onstart=onstart_script(self._bootstrap),
                             min_cuda=str(cuda[0]) if cuda else None)
        self.pools.add(DEFAULT_POOL, PoolShape(**{**shape.options(), "env": public_env}))
        for extra in pools or ():
            extra = dict(extra)
            pool_name = extra.pop("name", None)
            if not pool_name:
                raise ValueError(f"pools=[...{extra}...]: every pool needs a 'name'")
            self.add_pool(str(pool_name), **extra)
        self._adaptives: dict[str, GPUAdaptive] = {}
        self._adapt_warned: set[str] = set()  # adapt() keywords already warned about
        self._traffic = TrafficCollector(TRAFFIC_METRIC)
        # The CA key stays in this process; Client(cluster) picks up the client-role Security.
        self.allow_worker_clients = bool(option("allow-worker-clients", allow_worker_clients))
        self.certificates = ClusterCA(cluster_name, lifetime_days=float(option("certificate-lifetime-days")))
        self.security = self.certificates.security()
        scheduler_opts: dict[str, Any] = {
            "protocol": "tls", "host": "127.0.0.1", "port": 0,
            "dashboard_address": option("dashboard-address", dashboard_address),
            "security": self.security,
            "gate": scheduler_gate(worker_clients=self.allow_worker_clients, is_current=self.certificates.is_current),
            **dict(scheduler_options or {}),
        }
        # Refuses a worker whose versions differ from this client's; warns of late imports.
        scheduler_opts["plugins"] = [*scheduler_opts.get("plugins", ()), *self.environment.scheduler_plugins]
        self.broker: RentalBroker | None = None
        self._budget_guard: BudgetGuard | None = None
        self.hub: TunnelHub | None = None
        self.context: ClusterContext | None = None
        self._quiet = quiet
        #: the last phase each instance reported (kept after it is gone: failures keep their reason)
        self._phases = PhaseBook()
        self._progress = Progress(
            lambda: self.instances, mode=choose_mode(quiet),
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
                silence_logs=option("silence-logs", silence_logs),
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
        self.scheduler.add_plugin(PeerRoster(self.scheduler, self.certificates.current_serial))
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
        n = self._instances_wanted(n, instances=instances, jobs=jobs, workers=workers, pool=pool)
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

    def _instances_wanted(
        self, n: int | None, *, instances: int | None, jobs: int | None, workers: int | None, pool: str | None
    ) -> int:
        """The instance count that ``scale``'s one given spelling asks for."""
        given = {k: v for k, v in {"n": n, "instances": instances, "jobs": jobs, "workers": workers}.items()
                 if v is not None}
        if len(given) > 1:
            raise ValueError(
                f"scale({', '.join(f'{k}={v}' for k, v in given.items())}): give one of n, instances, "
                "jobs (all count instances) or workers"
            )
        name, value = next(iter(given.items()), ("n", 0))
        if int(value) != value or value < 0:
            raise ValueError(f"scale({name}={value!r}): give a whole number, 0 or more")
        if name == "workers":
            return math.ceil(int(value) / self.pools.get(pool).workers_per_instance)
        return int(value)

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
        """SpecCluster's, with the leaving direct workers' counters read after their data moved
        off them (``retire_workers``, which SpecCluster would call next, finds them gone)."""
        leaving = set(self.workers) - set(self.worker_spec)
        names = {n for name in leaving for n in getattr(self.workers[name], "worker_names", ())}
        addresses = self._traffic.direct_addresses(self.scheduler, names) if names else []
        if addresses and self.scheduler.status == Status.running:
            with contextlib.suppress(Exception):  # SpecCluster retires them again below, as it would
                await self.scheduler_comm.retire_workers(workers=list(leaving))
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
        try:
            if self.status != Status.created:
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError, VastError):
                    await asyncio.wait_for(super()._close(), timeout=max(30.0, self.boot_timeout_s / 4))
                with contextlib.suppress(Exception):
                    self._count_traffic()  # the closing workers' last reports
        finally:
            # Whatever happened above, nothing may stay rented: the broker keeps trying through
            # an outage (vastai.api.outage-timeout), then says what may still bill.
            if self.broker is not None:
                try:
                    await self.broker.close()
                except VastError as e:
                    self._say_left_billing(e)
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

    def _say_left_billing(self, error: VastError) -> None:
        """Close could not destroy everything: which rentals may bill, and what stops them."""
        assert self.broker is not None
        left = sorted(i for i, r in self.broker.records.items() if r.destroyed_at is None)
        message = (
            f"could not destroy rental(s) {left} of cluster {self.name!r}: {error}. They may still "
            f"bill. Their watchdogs destroy them within orphan_timeout={self.orphan_timeout_s:.0f}s of "
            f"this client's last heartbeat; to destroy them sooner, once Vast answers again, run "
            f"`dask-vastai cleanup --cluster {self.name}`."
        )
        self.log(f"ERROR {message}")
        logger.error("%s", message)

    # -------------------------------------------------------------- previews
    async def _offers(self) -> OfferPreview:
        return await preview_offers(self.api, self.pools.default.requirements)

    def offers(self) -> OfferPreview:
        """The query this cluster sends and the offers it matches now; rents nothing."""
        return self.sync(self._offers)

    def onstart_script(self) -> str:
        """The exact ``onstart`` text every rental gets (it holds no secret)."""
        return onstart_script(self._bootstrap)

    # ------------------------------------------------------------------ money
    @property
    def cost(self) -> float:
        """Dollars spent so far: each rental's ``dph_total`` times its uptime, plus its bandwidth
        (bytes in and out at its offer's ``inet_down_cost``/``inet_up_cost``; see ``bandwidth_cost``)."""
        return self.broker.cost_usd if self.broker else 0.0

    @property
    def bandwidth_cost(self) -> float:
        """The dollars of :attr:`cost` that are bandwidth: the bytes this client counted on its SSH
        links and the workers reported for their direct connections (an estimate: see the README)."""
        return self.broker.bandwidth_cost_usd if self.broker else 0.0

    @property
    def hourly_rate(self) -> float:
        """Dollars per hour of the rentals alive now."""
        return self.broker.hourly_rate_usd if self.broker else 0.0

    @property
    def budget_left_usd(self) -> float | None:
        """Dollars left of ``max_cost`` (None without one): the widget's "budget left"."""
        if self.caps is None:
            return None
        return self.broker.budget_left_usd if self.broker is not None else self.caps.left_usd(0.0)

    @property
    def max_hourly_usd(self) -> float | None:
        """The ``max_hourly`` cap ($/h of all rentals together), or None."""
        return self.caps.max_hourly_usd if self.caps is not None else None

    def _on_budget_exhausted(self, error: BudgetExhausted) -> None:
        """``max_cost`` is reached (the broker is destroying every rental): stop asking for more,
        fail the tasks that wait for a worker (and every later one), let the instances go."""
        for adaptive in self._adaptives.values():
            adaptive.stop()
        if self._budget_guard is not None:
            self._budget_guard.exhaust(error)
        self.worker_spec.clear()
        self.loop.add_callback(self._correct_state)

    @property
    def instances(self) -> InstanceTable:
        """One row per rental, then one per instance still renting: a list that shows as a table.

        Each row (:class:`~dask_vastai.status.InstanceRow`, also a mapping: ``row["state"]``)
        has the rental id, GPU model x count, phase (renting, loading image, connecting,
        installing, starting workers, registered, failed with its reason, destroyed),
        Vast's status message, $/h, uptime, dollars so far, worker names and pool.
        """
        records = self.broker.records.values() if self.broker is not None else ()
        scheduler = self.scheduler
        registered = {ws.name for ws in list(scheduler.workers.values())} if scheduler is not None else set()
        return instance_table(records, self._phases, dict(self.worker_spec), registered)

    @property
    def losses(self) -> dict[str, PoolLosses]:
        """Per pool: rentals lost after renting (preempted or otherwise), replaced, rented on demand."""
        return dict(self.pools.losses)

    @property
    def adaptive_targets(self) -> dict[str, tuple[int, float, int | None]]:
        """Per adapting pool: (minimum, maximum, instances wanted at its last round)."""
        return {pool: (a.minimum, a.maximum, a.target) for pool, a in self._adaptives.items()}

    # --------------------------------------------------------------- notebook
    def _repr_html_(self, cluster_status: Any = None) -> str:  # type: ignore[override]
        return cluster_html(self)

    def _widget(self) -> Any:
        """The ipywidgets view (None without ipywidgets): distributed's ``_ipython_display_`` shows it."""
        if self._cluster_widget is None:
            try:
                import ipywidgets  # noqa: F401
            except ImportError:
                return None
            self._cluster_widget = ClusterWidget(self)
            refresh = PeriodicCallback(
                self._cluster_widget.update,
                1000 * parse_timedelta(dask.config.get("distributed.deploy.cluster-repr-interval"), default="ms"),
            )
            self.periodic_callbacks["cluster-repr"] = refresh
            if self.status == Status.running:
                self.loop.add_callback(refresh.start)
        else:
            # Displaying again shows the cluster as it is now, not as of the last tick.
            self._cluster_widget.update()
        return self._cluster_widget.root

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

    def __repr__(self) -> str:
        alive = [r for r in self.instances if r.phase not in GONE]
        losses = [lost for lost in self.pools.losses.values() if lost]
        counts = ""
        if losses:
            counts = (f", preempted={sum(x.preempted for x in losses)}, lost={sum(x.lost for x in losses)}, "
                      f"replaced={sum(x.replaced for x in losses)}")
            if any(x.on_demand for x in losses):
                counts += f", on_demand={sum(x.on_demand for x in losses)}"
        return (
            f"VastAICluster({self.name!r}, {self.scheduler_address!r}, "
            f"instances={len(alive)}, workers={len(self.scheduler_info.get('workers', {}))}{counts}, "
            f"${self.hourly_rate:.3f}/h, cost=${self.cost:.4f} (bandwidth ${self.bandwidth_cost:.4f}))"
        )


VastAICluster.__doc__ = (VastAICluster.__doc__ or "").replace(
    "CLUSTER_OPTIONS", textwrap.indent(_CLUSTER_OPTIONS, "    ").strip()
).replace("SHAPE_OPTIONS", PoolShape.docs(indent="        ").strip())
VastAICluster.__init__.__signature__ = with_shape_options(VastAICluster.__init__)  # type: ignore[attr-defined]
VastAICluster.add_pool.__signature__ = with_shape_options(VastAICluster.add_pool)  # type: ignore[attr-defined]
