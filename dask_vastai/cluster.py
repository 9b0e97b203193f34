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
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security

from .api import CreateRequest, Offer, VastAPI
from .bootstrap import BootstrapConfig, onstart_script
from .config import option
from .instance import ClusterContext, VastInstance
from .offers import OfferRequirements, no_match_message
from .rentals import NoOfferAvailable, RentalBroker
from .safety import LEDGER
from .tunnel import ClusterKey, TunnelHub

logger = logging.getLogger(__name__)


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
    image, env: the instance's image and (non-secret) environment.
    worker_options: extra options of each dask worker (``nthreads``, ``memory_limit``, ``resources``).
    boot_timeout, orphan_timeout: seconds.
    api_key, api_url: Vast credentials and origin (defaults: ``VAST_API_KEY``, console.vast.ai).
    name: the cluster's name, in every rental's label ``dask-vastai:<name>:<worker>``.
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
        env: Mapping[str, str] | None = None,
        worker_options: Mapping[str, Any] | None = None,
        worker_per_gpu: bool | None = None,
        boot_timeout: float | None = None,
        orphan_timeout: float | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        name: str | None = None,
        dashboard_address: str = ":0",
        scheduler_options: Mapping[str, Any] | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        quiet: bool = False,
    ) -> None:
        if n is not None and n_workers is not None and n != n_workers:
            raise ValueError(f"give n={n} or n_workers={n_workers}, not both")
        initial = n if n is not None else n_workers
        self._initial_n = int(option("n-workers", initial) or 0)
        if self._initial_n < 0:
            raise ValueError(f"n={self._initial_n}: the number of instances cannot be negative")
        self.requirements = OfferRequirements(
            gpu=option("gpu", gpu),
            num_gpus=int(option("num-gpus", num_gpus)),
            gpu_ram_gb=option("gpu-ram", gpu_ram),
            cpu_ram_gb=option("cpu-ram", cpu_ram),
            cpu_cores=option("cpu-cores", cpu_cores),
            disk_gb=float(option("disk", disk)),
            max_price=option("max-price", max_price),
            region=option("region", region),
            datacenter=bool(option("datacenter", datacenter)),
            reliability=float(option("reliability", reliability)),
            query=option("query", query) or "",
            order=option("order", order),
            interruptible=bool(option("interruptible", interruptible)),
        )
        self.requirements.validate()
        self.boot_timeout_s = float(option("boot-timeout", boot_timeout))
        self.orphan_timeout_s = float(option("orphan-timeout", orphan_timeout))
        if self.boot_timeout_s <= 0 or self.orphan_timeout_s <= 0:
            raise ValueError(
                f"boot_timeout={self.boot_timeout_s} and orphan_timeout={self.orphan_timeout_s} must be "
                "positive numbers of seconds"
            )
        self.image = str(option("image", image))
        self.instance_env = {str(k): str(v) for k, v in dict(option("env", env) or {}).items()}
        self.worker_options = dict(option("worker-options", worker_options) or {})
        self.worker_per_gpu = bool(option("worker-per-gpu", worker_per_gpu))
        self.poll_interval_s = float(option("api-poll-interval"))
        cluster_name = option("name", name) or f"c{uuid.uuid4().hex[:8]}"
        if ":" in cluster_name or not cluster_name.strip():
            raise ValueError(f"name={cluster_name!r}: a cluster name cannot be empty or contain ':'")
        # Built now so that a bad key/URL configuration fails here, not inside a batch.
        self.api = VastAPI(api_key=option("api-key", api_key), api_url=option("api-url", api_url))
        self.key = ClusterKey.generate(comment=f"dask-vastai-{cluster_name}")
        self._bootstrap = BootstrapConfig(
            cluster_name=cluster_name,
            public_key=self.key.public_openssh,
            api_url=self.api.api_url,
            orphan_timeout_s=int(self.orphan_timeout_s),
        )
        onstart_script(self._bootstrap)  # validate early, as jobqueue renders job_script()

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
        worker: dict[str, Any] = {"cls": VastInstance, "options": {}}
        if self.requirements.num_gpus > 1 and self.worker_per_gpu:
            worker["group"] = [f"-gpu{k}" for k in range(self.requirements.num_gpus)]
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
        self.broker = RentalBroker(
            self.api,
            cluster_name=self.name,
            requirements=self.requirements,
            create_request=CreateRequest(
                image=self.image,
                disk_gb=self.requirements.disk_gb,
                onstart=onstart_script(self._bootstrap),
                env=self.instance_env,
                runtype="ssh_direc ssh_proxy",
            ),
            poll_interval_s=self.poll_interval_s,
            log=self._log,
        )
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
            worker_per_gpu=self.worker_per_gpu,
            worker_options=self.worker_options,
        )
        self.new_spec["options"] = {"context": self.context}
        if "group" in self.new_spec:
            self.new_spec["options"]["group"] = self.new_spec["group"]
        while len(self.worker_spec) < self._initial_n:
            self.worker_spec.update(self.new_worker_spec())

    async def _check_account_and_offers(self) -> None:
        """Fail at construction, with a sentence, on a rejected key or a query nothing matches."""
        await self.api.current_user()
        if self._initial_n:
            preview = await self._offers()
            if not preview.offers:
                broker = RentalBroker(
                    self.api, cluster_name=self.name, requirements=self.requirements,
                    create_request=CreateRequest(image=self.image, disk_gb=self.requirements.disk_gb),
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
                raise RuntimeError(f"worker {name} could not start: {error}") from error
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
            req.query(), order=req.order, limit=10,
            type="bid" if req.interruptible else "on-demand", storage_gb=req.disk_gb,
        )
        return OfferPreview(query_text=req.query_text(), query=req.query(), offers=offers)

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
