"""``VastAICluster``: a SpecCluster whose scheduler runs here and whose workers are rentals.

This module only turns options into specs (as dask-jobqueue's ``JobQueueCluster`` does);
the machinery lives in ``rentals.py`` (renting, polling, destroying), ``tunnel.py`` (SSH),
``bootstrap.py`` (what runs on the instance) and ``instance.py`` (one rental's life).
Every option has one default, in ``vastai.yaml``, read once through ``config.option``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security
from distributed.utils import NoOpAwaitable

from .adaptive import GPUAdaptive
from .bootstrap import BootstrapConfig, onstart_script
from .config import option
from .environment import ClientEnvironment, InstanceEnvironment, Secret, python_option, split_env
from .exceptions import BootFailed, NoOfferAvailable
from .instance import ClusterContext, VastInstance
from .offers import OfferRequirements, no_match_message
from .pools import Pool, ResourceGuard
from .rentals import RentalBroker
from .safety import LEDGER
from .tunnel import ClusterKey, TunnelHub
from .vast import CreateRequest, Offer, VastAPI

logger = logging.getLogger(__name__)

#: the pool the cluster's own options describe
DEFAULT_POOL = "default"


@dataclass(frozen=True)
class OfferPreview:
    """What ``cluster.offers()`` shows: the query as sent and what it matched."""

    query_text: str
    query: dict[str, Any]
    offers: list[Offer]

    def __repr__(self) -> str:
        lines = [f"query: {self.query_text}", f"{len(self.offers)} offers:"]
        for o in self.offers:
            lines.append(
                f"  {o.id}: {o.num_gpus}x {o.gpu_name} {o.gpu_ram_mb / 1024:.0f} GB, "
                f"{o.cpu_cores_effective:g} CPUs, ${o.dph_total:.3f}/h, {o.geolocation}, "
                f"reliability {o.reliability:.3f}"
            )
        return "\n".join(lines)


class VastAICluster(SpecCluster):
    """A Dask cluster of rented Vast.ai GPU instances, scheduler on this machine.

    Every Dask connection runs inside SSH opened from here, with TLS inside it: nothing
    listens on a public port and the Vast API key never leaves this machine. Rentals are
    destroyed on close, on error, on Ctrl-C/SIGTERM/SIGHUP and at interpreter exit; an
    on-instance watchdog destroys a rental whose client vanished (``orphan_timeout``).

    Parameters
    ----------
    gpu: GPU model (``"RTX_3090"``) or a list of acceptable models; None for any.
    n: instances to rent at start (``n_workers`` is an alias).
    num_gpus, gpu_ram, cpu_ram, cpu_cores, disk, max_price, region, datacenter,
    reliability, query, order, interruptible: what to rent (see ``vastai.yaml``).
    image, env: the instance's image and environment. Vast stores ``env`` and shows it in
        ``show instances``: wrap secret values, ``env={"WANDB_API_KEY": Secret(key)}``
        (``from dask_vastai.environment import Secret``), or pass them in ``secret_env``;
        those reach the workers over SSH only, never Vast.
    packages, pip_args: pip specifiers installed on every instance (only what differs), and
        options for that install (``["--index-url", ...]``); dask, distributed, cloudpickle and
        msgpack are always made equal to this client's versions.
    python: ``"3.11"`` to have the onstart install that Python with uv (when the image's
        differs from this client's), or the path of the image's interpreter to use.
    worker_options: extra options of each dask worker (``nthreads``, ``memory_limit``, ``resources``).
    boot_timeout, orphan_timeout: seconds.
    api_key, api_url: Vast credentials and origin (defaults: ``VAST_API_KEY``, console.vast.ai).
    name: the cluster's name, in every rental's label ``dask-vastai:<name>:<worker>``.
    pools: more instance shapes, e.g. ``[{"name": "a100", "gpu": "A100_SXM4", "cpu_ram": 64}]``
        (same options as above); the options above shape the ``default`` pool.
    """

    def __init__(
        self,
        gpu: str | Sequence[str] | None = None,
        n: int | None = None,
        *,
        n_workers: int | None = None,
        num_gpus: int | None = None,
        gpu_ram: float | None = None,
        cpu_ram: float | None = None,
        cpu_cores: float | None = None,
        disk: float | None = None,
        max_price: float | None = None,
        region: str | Sequence[str] | None = None,
        datacenter: bool | None = None,
        reliability: float | None = None,
        query: str | None = None,
        order: str | None = None,
        interruptible: bool | None = None,
        image: str | None = None,
        env: Mapping[str, str | Secret] | None = None,
        secret_env: Mapping[str, str] | None = None,
        packages: Sequence[str] | None = None,
        pip_args: Sequence[str] | None = None,
        python: str | None = None,
        worker_options: Mapping[str, Any] | None = None,
        worker_per_gpu: bool | None = None,
        boot_timeout: float | None = None,
        orphan_timeout: float | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        name: str | None = None,
        pools: Sequence[Mapping[str, Any]] | None = None,
        dashboard_address: str = ":0",
        scheduler_options: Mapping[str, Any] | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        quiet: bool = False,
        _test_versions: Mapping[str, str] | None = None,
        _test_worker_versions: Mapping[str, str] | None = None,
    ) -> None:
        if n is not None and n_workers is not None and n != n_workers:
            raise ValueError(f"give n={n} or n_workers={n_workers}, not both")
        initial = n if n is not None else n_workers
        self._initial_n = int(option("n-workers", initial) or 0)
        if self._initial_n < 0:
            raise ValueError(f"n={self._initial_n}: the number of instances cannot be negative")
        self.boot_timeout_s = float(option("boot-timeout", boot_timeout))
        self.orphan_timeout_s = float(option("orphan-timeout", orphan_timeout))
        if self.boot_timeout_s <= 0 or self.orphan_timeout_s <= 0:
            raise ValueError(
                f"boot_timeout={self.boot_timeout_s} and orphan_timeout={self.orphan_timeout_s} must be "
                "positive numbers of seconds"
            )
        self.poll_interval_s = float(option("api-poll-interval"))
        cluster_name = option("name", name) or f"c{uuid.uuid4().hex[:8]}"
        if ":" in cluster_name or not cluster_name.strip():
            raise ValueError(f"name={cluster_name!r}: a cluster name cannot be empty or contain ':'")
        # Built now so that a bad key/URL configuration fails here, not inside a batch.
        self.api = VastAPI(api_key=option("api-key", api_key), api_url=option("api-url", api_url))
        self.key = ClusterKey.generate(comment=f"dask-vastai-{cluster_name}")
        # Secret entries travel in the incarnation (SSH); only the rest goes to Vast.
        env, self._secret_env = split_env(option("env", env), option("secret-env", secret_env))
        client_env = ClientEnvironment.current(
            packages=list(option("packages", packages) or ()), pip_args=list(option("pip-args", pip_args) or ())
        )
        python_path, python_version = python_option(option("python", python), client_env)
        self.environment = InstanceEnvironment(
            client_env, image=str(option("image", image)), test_versions=_test_versions,
            test_worker_versions=_test_worker_versions,
        )
        self._bootstrap = BootstrapConfig(
            cluster_name=cluster_name,
            public_key=self.key.public_openssh,
            api_url=self.api.api_url,
            orphan_timeout_s=int(self.orphan_timeout_s),
            python=python_path,
            python_version=python_version,
        )
        onstart_script(self._bootstrap)  # validate early, as jobqueue renders job_script()
        self.pools: dict[str, Pool] = {}
        default = self._make_pool(
            DEFAULT_POOL, gpu=gpu, num_gpus=num_gpus, gpu_ram=gpu_ram, cpu_ram=cpu_ram,
            cpu_cores=cpu_cores, disk=disk, max_price=max_price, region=region, datacenter=datacenter,
            reliability=reliability, query=query, order=order, interruptible=interruptible, image=image,
            env=env, worker_options=worker_options, worker_per_gpu=worker_per_gpu,
        )
        self.pools[DEFAULT_POOL] = default
        self.requirements = default.requirements
        for shape in pools or ():
            shape = dict(shape)
            pool_name = shape.pop("name", None)
            if not pool_name:
                raise ValueError(f"pools=[...{shape}...]: every pool needs a 'name'")
            self._add_pool_shape(str(pool_name), **shape)
        self._adaptives: dict[str, GPUAdaptive] = {}
        #: instances that gave up booting in a row, per pool (reset when one registers)
        self.pool_failures: dict[str, int] = {}
        self._pool_counters: dict[str, int] = {}

        self.security = Security.temporary()
        scheduler = {
            "cls": Scheduler,
            "options": {
                "protocol": "tls",
                "host": "127.0.0.1",
                "port": 0,
                "dashboard_address": dashboard_address,
                "security": self.security,
                **dict(scheduler_options or {}),
            },
        }
        # Refuses a worker whose versions differ from this client's; warns of late imports.
        scheduler["options"]["plugins"] = [*scheduler["options"].get("plugins", ()), *self.environment.scheduler_plugins]
        worker: dict[str, Any] = {"cls": VastInstance, "options": {"pool": default}}
        self.broker: RentalBroker | None = None
        self.hub: TunnelHub | None = None
        self.context: ClusterContext | None = None
        self._quiet = quiet
        # Here, on the caller's (normally the main) thread, where signal handlers can be set.
        LEDGER.install_handlers()
        try:
            super().__init__(
                scheduler=scheduler,
                worker=worker,
                asynchronous=asynchronous,
                loop=loop,
                security=self.security,
                name=cluster_name,
            )
        except BaseException:
            # SpecCluster leaves its loop thread running when _start() raises.
            loop_runner = getattr(self, "_loop_runner", None)
            if loop_runner is not None and not self.called_from_running_loop:
                loop_runner.stop()
            raise
        if not self.called_from_running_loop and self._initial_n:
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
        scheduler_port = int(self.scheduler.address.rsplit(":", 1)[1])
        self.hub = TunnelHub(self.key, scheduler_port=scheduler_port)
        default = self.pools[DEFAULT_POOL]
        self.broker = RentalBroker(
            self.api,
            cluster_name=self.name,
            requirements=default.requirements,
            create_request=default.create_request,
            poll_interval_s=self.poll_interval_s,
            log=self._log,
        )
        self.scheduler.add_plugin(ResourceGuard(self.scheduler, lambda: self.pools.values()))
        self.context = ClusterContext(
            broker=self.broker,
            hub=self.hub,
            scheduler_address=self.scheduler.address,
            tls_ca=self.security.tls_ca_file,
            tls_cert=self.security.tls_worker_cert,
            tls_key=self.security.tls_worker_key,
            boot_timeout_s=self.boot_timeout_s,
            heartbeat_interval_s=max(1.0, min(10.0, self.orphan_timeout_s / 6)),
            registered=self._registered,
            log=self._log,
            on_boot_outcome=self._on_boot_outcome,
            env=dict(self._secret_env),
            environment=self.environment,
        )
        self.new_spec = self._spec_for(default)
        for _ in range(self._initial_n):
            self.worker_spec.update(self._new_instance_spec(DEFAULT_POOL))

    async def _check_account_and_offers(self) -> None:
        """Fail at construction, with a sentence, on a rejected key or a query nothing matches."""
        await self.api.current_user()
        if self._initial_n:
            preview = await self._offers()
            if not preview.offers:
                default = self.pools[DEFAULT_POOL]
                broker = RentalBroker(
                    self.api, cluster_name=self.name, requirements=default.requirements,
                    create_request=default.create_request,
                )
                nearest = await broker.nearest_offers()
                raise NoOfferAvailable(no_match_message(self.requirements, preview.query, nearest))

    def _log(self, log: str) -> None:
        # Cluster.__init__ resets ``quiet`` before the first rentals are logged.
        import datetime

        self._cluster_manager_logs.append((datetime.datetime.now(), log))
        if not self._quiet:
            print(log, flush=True)

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self.name}-{worker_number}"

    # ------------------------------------------------------------------ pools
    def _make_pool(self, pool_name: str, **options: Any) -> Pool:
        """A pool from options, each falling back to its one default in ``vastai.yaml``."""
        known = {
            "gpu", "num_gpus", "gpu_ram", "cpu_ram", "cpu_cores", "disk", "max_price", "region",
            "datacenter", "reliability", "query", "order", "interruptible", "image", "env",
            "worker_options", "worker_per_gpu",
        }
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"pool {pool_name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if not pool_name or not all(c.isalnum() or c in "-_" for c in pool_name):
            raise ValueError(f"pool name {pool_name!r}: use letters, digits, '-' and '_'")

        def get(key: str) -> Any:
            return option(key.replace("_", "-"), options.get(key))

        requirements = OfferRequirements(
            gpu=get("gpu"),
            num_gpus=int(get("num_gpus")),
            gpu_ram_gb=get("gpu_ram"),
            cpu_ram_gb=get("cpu_ram"),
            cpu_cores=get("cpu_cores"),
            disk_gb=float(get("disk")),
            max_price=get("max_price"),
            region=get("region"),
            datacenter=bool(get("datacenter")),
            reliability=float(get("reliability")),
            query=get("query") or "",
            order=get("order"),
            interruptible=bool(get("interruptible")),
        )
        requirements.validate()
        env, secret = split_env(get("env"))
        if secret:
            raise ValueError(
                f"pool {pool_name!r}: secret env entries {sorted(secret)} belong to the cluster "
                "(VastAICluster(env=..., secret_env=...)), which sends them to every pool over SSH"
            )
        return Pool(
            name=pool_name,
            requirements=requirements,
            create_request=CreateRequest(
                image=str(get("image")),
                disk_gb=requirements.disk_gb,
                onstart=onstart_script(self._bootstrap),
                env=env,
                runtype="ssh_direc ssh_proxy",
            ),
            worker_per_gpu=bool(get("worker_per_gpu")),
            worker_options=dict(get("worker_options") or {}),
        )

    def _add_pool_shape(self, pool_name: str, **options: Any) -> Pool:
        if pool_name in self.pools:
            raise ValueError(f"pool {pool_name!r} exists already; pools: {sorted(self.pools)}")
        pool = self._make_pool(pool_name, **options)
        self.pools[pool_name] = pool
        return pool

    def add_pool(self, name: str, **options: Any) -> Pool:
        """Add an instance shape that scales on its own: ``add_pool("a100", gpu="A100_SXM4")``.

        Its workers carry the resource ``pool-<name>``; ``scale(n, pool=name)`` and
        ``adapt(..., pool=name)`` act on it alone.
        """
        return self._add_pool_shape(name, **options)

    def _pool(self, pool: str | None) -> Pool:
        name = DEFAULT_POOL if pool is None else pool
        if name not in self.pools:
            raise ValueError(f"pool={pool!r} does not exist; pools: {sorted(self.pools)} (see add_pool)")
        return self.pools[name]

    def _spec_for(self, pool: Pool) -> dict[str, Any]:
        spec: dict[str, Any] = {"cls": VastInstance, "options": {"context": self.context, "pool": pool}}
        group = pool.group()
        if group:
            spec["group"] = group
            spec["options"]["group"] = group
        return spec

    def _new_instance_spec(self, pool_name: str) -> dict[str, dict[str, Any]]:
        pool = self._pool(pool_name)
        i = self._pool_counters.get(pool_name, 0)
        self._pool_counters[pool_name] = i + 1
        name = f"{self.name}-{i}" if pool_name == DEFAULT_POOL else f"{self.name}-{pool_name}-{i}"
        return {name: self._spec_for(pool)}

    def pool_instances(self, pool: str | None = None) -> list[str]:
        """Spec names (one per instance) of a pool, oldest first."""
        target = self._pool(pool)
        return [k for k, v in self.worker_spec.items() if v["options"].get("pool") is target]

    def worker_names_of(self, instance_name: str) -> list[str]:
        spec = self.worker_spec.get(instance_name) or {}
        return [instance_name + s for s in spec.get("group", [])] or [instance_name]

    def _on_boot_outcome(self, instance: str, pool: str, error: BaseException | None) -> None:
        """An instance gave up booting (its rentals destroyed): drop it, count the failure.

        Called with ``error=None`` when an instance registered: the pool works again.

        Adaptive stops renting for a pool whose last instances all failed, instead of paying
        for the same failure again and again.
        """
        if error is None:
            self.pool_failures.pop(pool, None)
            return
        self.pool_failures[pool] = self.pool_failures.get(pool, 0) + 1
        self._log(f"{instance} failed for good ({self.pool_failures[pool]} in a row in pool {pool}): {error}")
        self.worker_spec.pop(instance, None)
        self.loop.add_callback(self._correct_state)

    def instance_registered(self, instance_name: str) -> bool:
        return self._registered(self.worker_names_of(instance_name))

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None, *, pool: str | None = None):  # type: ignore[override]
        """Hold ``n`` instances in ``pool`` (default: the default pool); counts instances, not workers."""
        if memory is not None or cores is not None:
            raise ValueError("scale(memory=/cores=) is not supported: scale counts instances; pick a pool shape")
        if n < 0:
            raise ValueError(f"scale({n}): the number of instances cannot be negative")
        pool_name = self._pool(pool).name
        names = self.pool_instances(pool_name)
        if len(names) > n:
            # Drop instances whose workers never registered first, then the newest.
            unregistered = [k for k in names if not self.instance_registered(k)]
            registered = [k for k in names if k not in unregistered]
            for name in (unregistered[::-1] + registered[::-1])[: len(names) - n]:
                del self.worker_spec[name]
        if self.status not in (Status.closing, Status.closed):
            for _ in range(n - len(names)):
                self.worker_spec.update(self._new_instance_spec(pool_name))
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            return NoOpAwaitable()
        return None

    async def release_instances(self, names: Sequence[str]) -> None:
        """Retire these instances' workers (their data moves first), then destroy them."""
        for name in names:
            self.worker_spec.pop(name, None)
        await self._correct_state()

    def adapt(  # type: ignore[override]
        self,
        minimum: int = 0,
        maximum: float = math.inf,
        *,
        pool: str | None = None,
        interval: str | float = "5s",
        wait_count: int = 24,
        **kwargs: Any,
    ) -> GPUAdaptive:
        """Follow the queued GPU demand with ``minimum``..``maximum`` instances of ``pool``."""
        if kwargs:
            raise ValueError(
                f"adapt() got {sorted(kwargs)}: this cluster adapts instances by GPU demand; "
                "use minimum, maximum, pool, interval, wait_count"
            )
        pool_name = self._pool(pool).name
        old = self._adaptives.pop(pool_name, None)
        if old is not None:
            old.stop()
        adaptive = GPUAdaptive(
            self, pool_name, minimum=minimum, maximum=maximum, interval=interval, wait_count=wait_count
        )
        self._adaptives[pool_name] = adaptive
        adaptive.start()
        return adaptive

    def _registered(self, names: Sequence[str]) -> bool:
        seen = {ws.name for ws in self.scheduler.workers.values()}
        return all(n in seen for n in names)

    async def _wait_for_initial_workers(self) -> None:
        """Wait until the first ``n`` instances' workers registered, or raise their boot error."""
        await self._correct_state()
        deadline = time.monotonic() + self.boot_timeout_s * 1.5 + 30
        while True:
            assert self.context is not None
            if self.context.failures:
                name, error = next(iter(self.context.failures.items()))
                raise BootFailed(f"worker {name} could not start: {error}") from error
            instances = list(self.workers.values())
            if instances and all(
                isinstance(w, VastInstance) and w.registered_at is not None for w in instances
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(instances)} instance(s) did not all register within {self.boot_timeout_s:.0f}s "
                    f"(boot_timeout); states: {self.instances}"
                )
            await asyncio.sleep(0.25)

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

    # ---------------------------------------------------------------- close
    async def _close(self) -> None:
        for adaptive in self._adaptives.values():
            adaptive.stop()
        # SpecCluster's close scales only what scale(0) reaches: empty every pool.
        self.worker_spec.clear()
        try:
            if self.status != Status.created:
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(super()._close(), timeout=max(30.0, self.boot_timeout_s / 4))
        finally:
            # Whatever happened above, nothing may stay rented.
            if self.broker is not None:
                await self.broker.close()
            if self.hub is not None:
                with contextlib.suppress(Exception):
                    await self.hub.close()
            await self.api.close()
        if self.status != Status.closed:
            self.status = Status.closed

    # -------------------------------------------------------------- previews
    async def _offers(self) -> OfferPreview:
        req = self.requirements
        offers = await self.api.search_offers(
            req.filters(), order=req.order, limit=10,
            type="bid" if req.interruptible else "on-demand", storage_gb=req.disk_gb,
        )
        return OfferPreview(query_text=req.query_text(), query=req.filters(), offers=offers)

    def offers(self) -> OfferPreview:
        """The query this cluster sends and the offers it matches now; rents nothing."""
        return self.sync(self._offers)

    def onstart_script(self) -> str:
        """The exact ``onstart`` text every rental gets (it holds no secret)."""
        return onstart_script(self._bootstrap)

    # ------------------------------------------------------------------ money
    @property
    def cost(self) -> float:
        """Dollars spent so far: each rental's ``dph_total`` times its uptime."""
        return self.broker.cost_usd if self.broker else 0.0

    @property
    def hourly_rate(self) -> float:
        """Dollars per hour of the rentals alive now."""
        return self.broker.hourly_rate_usd if self.broker else 0.0

    @property
    def instances(self) -> list[dict[str, Any]]:
        """One row per rental: id, GPU, state, $/h, uptime, worker names."""
        if self.broker is None:
            return []
        by_id = {w.instance_id: w for w in self.workers.values() if isinstance(w, VastInstance)}
        rows = []
        for record in self.broker.records.values():
            inst = by_id.get(record.instance_id)
            rows.append(
                {
                    "id": record.instance_id,
                    "gpu": f"{record.offer.num_gpus}x {record.offer.gpu_name}",
                    "state": "registered" if inst is not None and inst.registered_at else record.state,
                    "dph": record.dph_total,
                    "uptime_s": round(record.uptime_s, 1),
                    "cost_usd": record.cost_usd,
                    "workers": list(inst.worker_names) if inst is not None else [record.worker_name],
                }
            )
        return rows

    async def _get_logs(self, cluster=True, scheduler=True, workers=True):  # type: ignore[override]
        from distributed.utils import Log

        logs = await super()._get_logs(cluster=cluster, scheduler=scheduler, workers=workers)
        if self.broker is not None:
            for record in self.broker.records.values():
                if record.destroyed_at is None:
                    with contextlib.suppress(Exception):
                        text = await self.api.logs(record.instance_id, tail=1000)
                        logs[f"instance {record.instance_id} ({record.worker_name})"] = Log(text)
        return logs

    def __repr__(self) -> str:
        alive = [r for r in self.instances if r["state"] != "destroyed"]
        return (
            f"VastAICluster({self.name!r}, {self.scheduler_address!r}, "
            f"instances={len(alive)}, workers={len(self.scheduler_info.get('workers', {}))}, "
            f"${self.hourly_rate:.3f}/h, cost=${self.cost:.4f})"
        )
