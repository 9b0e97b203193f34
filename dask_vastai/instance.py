"""``VastInstance``: one rental as a SpecCluster ``ProcessInterface``.

The life of a rental, in order: rent (through the cluster's broker) -> wait until it runs
with SSH -> connect (tunnel hub) -> probe the hardware -> forward fresh ports -> write the
worker incarnation(s) over SFTP -> the on-instance supervisor starts ``dask worker`` ->
registered. ``start()`` returns once Vast accepted the rental, like dask-jobqueue's
``sbatch``; the boot continues in a task so that ``scale()``/``close()`` never wait minutes
behind a booting machine. ``close()`` always destroys, whatever state the boot was in.

SSH goes to the direct endpoint (the public IP and the host port mapped to 22) when the row
has one, for at most ``ssh_direct_timeout`` while no SSH server answers there (some hosts'
direct ports are firewalled: the connection hangs), then to Vast's proxy (``ssh_host:
ssh_port``). A proxy that refuses remote forwards (every tunnel needs one), or a host where
neither endpoint answers, gets one reboot (the Snakemake plugin's remedy for "remote port
forwarding failed"); a second failure is a failed boot, and another machine is tried.

Once registered, the instance serves until it is closed, and owns what happens when it is
lost (distributed's ``SpecCluster`` would close it after ``lost-worker-timeout`` and never
start another): a link that drops while Vast still shows the rental ``running`` is made
again, for up to ``orphan_timeout`` (the instance's watchdog waits that long), as a new
incarnation (the row listed afresh, fresh ports and certificates, the same pinned host
keys); a rental that cannot come back (outbid, host offline, container exited, gone, or a
link that did not return in time) is destroyed at once and a new one is rented in its
place, so the pool keeps the size it was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from .bootstrap import (
    PROBE_COMMAND,
    Incarnation,
    incarnation_path,
    incarnation_payload,
    parse_probe,
    probe_command,
)
from .certificate_reload import RENEWAL_FILE_ENV
from .config import option
from .environment import CudaVersion, InstanceEnvironment, SecretEnv, driver_cuda
from .exceptions import (
    BootFailed,
    BudgetExceeded,
    EnvironmentMismatch,
    NoOfferAvailable,
    PortBusy,
    SSHUnreachable,
    VastError,
)
from .network import DIRECT, TUNNEL, DirectPort, direct_ports, probe_direct
from .pools import POOL_RESOURCE_CAPACITY, Pool, PoolSet
from .renewal import CertificateRenewal, incarnation_env
from .rentals import RentalBroker, RentalRecord
from .roles import LISTEN_HOST_ENV, ROSTER_ENV, WORKER_ARGS, WORKER_CLIENTS_ENV
from .security import ClusterCA
from .status import Phase
from .tunnel import HostKeyPin, InstanceLink, SSHEndpoint, TunnelHub

if TYPE_CHECKING:
    from .vast import Instance

logger = logging.getLogger(__name__)


@dataclass
class ClusterContext:
    """What every instance of one cluster shares (one object, not copied per worker)."""

    broker: RentalBroker
    hub: TunnelHub
    scheduler_address: str
    #: mints each worker incarnation's certificate once its addresses are known
    certificates: ClusterCA
    boot_timeout_s: float
    heartbeat_interval_s: float
    #: whether the scheduler has these workers, each at the address given (name -> address)
    registered: Callable[[Mapping[str, str]], bool]
    log: Callable[[str], None]
    #: the cluster's secret env, for every worker's incarnation (values shown by no repr)
    env: Mapping[str, str] = field(default_factory=SecretEnv, repr=False)
    #: rentals tried per instance before it gives up (each on another machine)
    max_boot_attempts: int = 3
    #: told (instance, pool, error) when an instance gave up booting, or (.., None) when it
    #: registered; the cluster's PoolSet is the one record of boot failures
    on_boot_outcome: Callable[[str, str, BaseException | None], None] | None = None
    #: versions, installs and shipped code before workers start (None: the image as it is)
    environment: InstanceEnvironment | None = None
    #: whether tasks may act as clients (``allow_worker_clients``): told to every worker
    worker_clients: bool = False
    #: told each instance whose phase changed (the cluster's PhaseBook: widget, progress)
    on_phase: Callable[[VastInstance], None] | None = None
    #: seconds to wait for a rental's sshd host keys in its log before its first connection
    host_key_timeout_s: float = field(default_factory=lambda: float(option("host-key-timeout")))
    #: seconds the direct SSH endpoint may stay silent before Vast's proxy is tried
    ssh_direct_timeout_s: float = 45.0
    #: seconds a direct worker port may take to answer before its instance uses the tunnel
    direct_probe_timeout_s: float = 10.0
    #: seconds an instance's watchdog waits for this client: how long a dropped link is retried
    orphan_timeout_s: float = 600.0
    #: the cluster's pools: losses and replacements are counted there, fallbacks asked there
    pools: PoolSet | None = None
    #: removes workers of these names the scheduler still lists (a lost incarnation's), so
    #: that their tasks are rescheduled and the names are free for the new incarnation
    forget_workers: Callable[[Sequence[str]], Awaitable[None]] | None = None


class VastInstance(ProcessInterface):
    """One rented instance running one dask worker per GPU (or one for all of them)."""

    def __init__(
        self,
        scheduler: str,
        name: str,
        *,
        context: ClusterContext,
        pool: Pool,
        group: Sequence[str] | None = None,
    ) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.name = name
        self.context = context
        self.pool = pool
        self.worker_names = [name + suffix for suffix in group] if group else [name]
        self.record: RentalRecord | None = None
        #: the host keys pinned for one rental (instance id): its first connection and every reconnect
        self.host_keys: tuple[int, HostKeyPin] | None = None
        self.link: InstanceLink | None = None
        #: the hub's keys of this incarnation's forwards (tunnel: worker ports; direct: nanny ports)
        self.worker_ports: list[int] = []
        #: how this incarnation's workers are reached: "tunnel" or "direct" (network.py)
        self.network: str | None = None
        #: rentals whose direct ports did not answer (said once each; they use the tunnel)
        self._direct_refused: set[int] = set()
        self.registered_at: float | None = None
        #: worker name -> the address its worker advertises, this incarnation (not the incarnations:
        #: they carry the secret env, and whatever the instance keeps is reachable from the cluster)
        self._worker_addresses: dict[str, str] = {}
        #: the lost rental whose replacement this instance is booting (None: not replacing)
        self._replacing: int | None = None
        self._boot: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        #: renews the running incarnations' certificates (a new one with each set of incarnations)
        self._renewal: asyncio.Task[None] | None = None
        self._enter(Phase.RENTING)

    # ----------------------------------------------------------------- start
    async def start(self) -> None:
        try:
            self.record = await self._rent()
        except BudgetExceeded as e:
            # Raising here would leave SpecCluster holding a worker that never starts.
            self._refused(e)
            await super().start()
            return
        self._enter(Phase.LOADING)
        self._boot = asyncio.create_task(self._live(), name=f"life of {self.name}")
        await super().start()

    async def _rent(self) -> RentalRecord:
        """Rent with the pool's requirements; on demand where an ``interruptible="fallback"`` pool must."""
        ctx, pool = self.context, self.pool
        requirements = pool.requirements
        if pool.on_demand is not None and ctx.pools is not None and ctx.pools.falls_back(pool.name):
            requirements = pool.on_demand
        try:
            record = await ctx.broker.rent(self.name, requirements, pool.create_request)
        except NoOfferAvailable as e:
            if pool.on_demand is None or requirements is pool.on_demand:
                raise
            first = str(e).splitlines()[0]
            ctx.log(f"{self.name}: no interruptible offer matches ({first}); renting on demand "
                    "(interruptible='fallback')")
            logger.warning("%s: no interruptible offer matches; renting on demand (interruptible='fallback')",
                           self.name)
            requirements = pool.on_demand
            record = await ctx.broker.rent(self.name, requirements, pool.create_request)
        if requirements is pool.on_demand and ctx.pools is not None:
            ctx.pools.note_on_demand(pool.name)
            ctx.log(f"{self.name}: instance {record.instance_id} rented on demand (interruptible='fallback')")
        return record

    async def _live(self) -> None:
        """Boot; then serve until closed: a dropped link comes back, a lost rental is replaced."""
        if not await self._bring_up():
            return
        while True:
            record = self.record
            assert record is not None
            await self._until_lost(record)
            if record.lost is None and (record.destroyed_at is not None
                                        or (self.link is not None and self.link.end_expected)):
                return  # destroyed, or its link closed, on purpose (the cluster closes): no loss
            if record.lost is None:
                await self._reconnect(record)
            if record.lost is not None:
                await self._give_up_rental(record)
                if not await self._bring_up():
                    return

    async def _until_lost(self, record: RentalRecord) -> None:
        """Return when the link drops or Vast shows the rental lost, whichever comes first."""
        waits = [asyncio.ensure_future(self.context.broker.wait_lost(record.instance_id))]
        if self.link is not None:
            waits.append(asyncio.ensure_future(self.link.closed.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _bring_up(self) -> bool:
        """Boot, connect and start the workers; retry on a different machine up to a bound.

        Rents first when there is no rental (a replacement, a retry). False when it gave up.
        """
        attempts = 0
        while True:
            attempts += 1
            try:
                if self.record is None:
                    self._enter(Phase.RENTING)
                    self.record = await self._rent()
                    self._enter(Phase.LOADING)
                await self._boot_unless_lost(self.record)
                return True
            except asyncio.CancelledError:
                raise
            except BudgetExceeded as refused:  # a spending cap: nothing rented, nothing to retry
                self.status = Status.failed
                self._refused(refused)
                return False
            except Exception as e:  # noqa: BLE001 - every boot failure destroys and maybe retries
                retry = isinstance(e, BootFailed | TimeoutError | OSError)
                if self.record is not None:
                    if self.record.lost is not None:
                        self._replacing = self.record.instance_id
                    await self._drop_rental(self.record, e)
                if self.context.broker.closing:
                    # The cluster is closing: no retry, and not a boot failure of the pool's.
                    self.status = Status.failed
                    return False
                if attempts >= self.context.max_boot_attempts or not retry:
                    self.status = Status.failed
                    if self.context.on_boot_outcome is not None:
                        self.context.on_boot_outcome(self.name, self.pool.name, e)
                    return False

    def _refused(self, error: BudgetExceeded) -> None:
        """A spending cap refused this instance's rental: nothing was rented; the cluster drops it."""
        self._enter(Phase.FAILED, str(error))
        if self.context.on_boot_outcome is not None:
            self.context.on_boot_outcome(self.name, self.pool.name, error)

    async def _drop_rental(self, record: RentalRecord, error: BaseException) -> None:
        """Destroy a rental that failed its boot (or was lost); the next attempt rents anew.

        The destroy goes with the broker's next bulk destroy and is not waited for: the next
        rental need not wait for the check of the destroy.
        """
        if record.lost is None:
            self.context.log(f"{self.name}: instance {record.instance_id} failed: {error}")
        self._enter(Phase.LOST if record.lost is not None else Phase.FAILED, str(error))
        await self._teardown_link()
        self.context.broker.destroy_soon(record.instance_id)
        self.record = None

    async def _reconnect(self, record: RentalRecord) -> None:
        """A worker cannot rejoin a scheduler it lost: new link, new ports, new incarnation.

        Tried for up to ``orphan_timeout`` from the loss (the instance's watchdog keeps the
        rental that long without this client), each time on a row listed afresh: the cached
        one may show an endpoint that is gone. Returns reconnected, or with ``record.lost``
        set (by Vast's state, or here when the time is up).
        """
        ctx = self.context
        lost_at = time.monotonic()
        deadline = lost_at + ctx.orphan_timeout_s
        why = (self.link.lost_reason if self.link is not None else None) or "lost"
        ctx.log(f"{self.name}: SSH link to instance {record.instance_id} lost ({why}); reconnecting "
                f"(for up to orphan_timeout={ctx.orphan_timeout_s:.0f}s)")
        self.registered_at = None
        last: BaseException | None = None
        while record.lost is None:
            await self._teardown_link()
            if time.monotonic() >= deadline:
                ctx.broker.mark_lost(record.instance_id, "unreachable", (
                    f"its SSH link did not come back within orphan_timeout={ctx.orphan_timeout_s:.0f}s "
                    f"(last error: {last})"))
                return
            self._enter(Phase.CONNECTING, f"reconnecting: {why}")
            try:
                await self._boot_unless_lost(record, fresh=True, deadline=deadline)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - retried until the deadline or a loss
                last = e
                logger.info("%s: reconnecting to instance %s failed: %s", self.name, record.instance_id, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.broker.wait_lost(record.instance_id),
                                           max(0.0, min(2.0, deadline - time.monotonic())))
                continue
            ctx.log(f"{self.name}: instance {record.instance_id} is back, a new incarnation "
                    f"{time.monotonic() - lost_at:.0f}s after its link dropped")
            return

    async def _give_up_rental(self, record: RentalRecord) -> None:
        """The rental is lost: destroy it (the broker did already), free its workers' names."""
        self._replacing = record.instance_id
        await self._drop_rental(record, BootFailed(record.lost or "lost"))
        if self.context.forget_workers is not None:
            await self.context.forget_workers(self.worker_names)
        self.registered_at = None
        self.context.log(f"{self.name}: renting a replacement for instance {record.instance_id}")

    async def _boot_unless_lost(self, record: RentalRecord, **options: Any) -> None:
        """:meth:`_boot_once`, given up (BootFailed) as soon as the rental is found lost.

        A rental outbid while its workers start would otherwise be waited on until the boot's
        deadline (``boot_timeout``: its workers never register), billing its disk meanwhile.
        """
        boot = asyncio.ensure_future(self._boot_once(record, **options))
        lost = asyncio.ensure_future(self.context.broker.wait_lost(record.instance_id))
        try:
            await asyncio.wait([boot, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not boot.done():
                boot.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await boot
        if boot.done() and not boot.cancelled():
            return boot.result()
        raise BootFailed(record.lost or f"instance {record.instance_id} was destroyed while booting")

    async def _boot_once(self, record: RentalRecord, *, fresh: bool = False, deadline: float | None = None) -> None:
        """One rental to registered workers; ``fresh``: a reconnect (no reboot, the row listed anew)."""
        ctx = self.context
        started = time.monotonic()
        deadline = started + ctx.boot_timeout_s if deadline is None else deadline
        row = await ctx.broker.wait_until_ready(record.instance_id, max(1.0, deadline - started), fresh=fresh)
        self._enter(Phase.CONNECTING)
        if self.host_keys is None or self.host_keys[0] != record.instance_id:
            self.host_keys = (record.instance_id, await self._host_keys_from_log(record))
        self.link = await self._connect(record, row, deadline=deadline, reboot=not fresh)
        self._enter(Phase.INSTALLING)
        # Heartbeats start at once: the watchdog's orphan clock runs from boot.
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat())
        # The probe also installs the supervisor that will start the workers.
        env = ctx.environment
        probe_timeout_s = max(60.0, deadline - time.monotonic())
        command = env.probe_command(probe_command) if env is not None else PROBE_COMMAND
        _, out, _ = await self.link.run(command, timeout_s=probe_timeout_s)
        probe = parse_probe(out)
        self._check_probe(probe, record)
        extra_env: dict[str, str] = {}
        if env is not None:
            # Versions in step with the client, the user's packages, shipped code: before any worker.
            extra_env = await env.prepare(
                self.link, probe, log=lambda m: ctx.log(f"{self.name}: {m}"),
                timeout_s=max(60.0, deadline - time.monotonic()),
            )
        self._enter(Phase.STARTING)
        if ctx.forget_workers is not None:
            await ctx.forget_workers(self.worker_names)  # a lost incarnation the scheduler still lists
        incarnations = self._incarnations(probe, record, extra_env)
        direct = await self._direct_ports(row, record, len(incarnations), str(probe.get("executable") or "python3"))
        await self._start_workers(incarnations, direct)
        left = max(5.0, deadline - time.monotonic())
        # each worker at the address it advertises (a lost incarnation's worker may linger under its name)
        expected = dict(self._worker_addresses)

        def registered_or_refused() -> bool:
            return ctx.registered(expected) or (env is not None and env.refusal(self.worker_names) is not None)

        await _wait_for(registered_or_refused, left, f"workers {self.worker_names} to register")
        if env is not None and (refusal := env.refusal(self.worker_names)) is not None:
            raise EnvironmentMismatch(refusal)
        self.registered_at = time.time()
        self._enter(Phase.REGISTERED)
        if self.context.on_boot_outcome is not None:
            self.context.on_boot_outcome(self.name, self.pool.name, None)
        if fresh:
            return
        replaced, self._replacing = self._replacing, None
        ctx.log(
            f"{self.name}: instance {record.instance_id} ready, workers {', '.join(self.worker_names)} "
            f"registered {time.time() - record.rented_at:.0f}s after renting"
            + (f" (it replaces lost instance {replaced})" if replaced is not None else "")
        )
        if replaced is not None and ctx.pools is not None:
            ctx.pools.note_replacement(self.pool.name)

    async def _host_keys_from_log(self, record: RentalRecord) -> HostKeyPin:
        """Pin the keys the rental's sshd printed into its log; trust on first use if none came."""
        ctx = self.context
        keys = await ctx.broker.host_keys(record.instance_id, ctx.host_key_timeout_s)
        pin = HostKeyPin(keys or (), source=f"the log of instance {record.instance_id}")
        if pin.first_use:
            why = "it found none in /etc/ssh" if keys == () else f"none within {ctx.host_key_timeout_s:.0f}s"
            ctx.log(
                f"{self.name}: instance {record.instance_id} printed no sshd host key into its log ({why}): "
                "trusting the first key its SSH endpoint presents, and refusing any other from then on"
            )
        return pin

    async def _connect(self, record: RentalRecord, row: Instance, *, deadline: float, reboot: bool = True) -> InstanceLink:
        """An SSH link: direct, else Vast's proxy; one reboot where neither gives a usable link.

        ``reboot=False`` (a reconnect): never reboot a machine whose workers may be running.
        """
        ctx = self.context
        try:
            return await self._connect_once(record, row, deadline)
        except (SSHUnreachable, PortBusy) as e:
            if not reboot:
                raise
            why = e
        ctx.log(f"{self.name}: instance {record.instance_id}: {why}; rebooting it once")
        logger.warning("%s: instance %s: %s; rebooting it once", self.name, record.instance_id, why)
        try:
            await ctx.broker.reboot(record.instance_id)
        except VastError as e:
            raise BootFailed(f"instance {record.instance_id}: {why}; rebooting it failed: {e}") from e
        self._enter(Phase.LOADING)
        row = await ctx.broker.wait_until_ready(record.instance_id, max(1.0, deadline - time.monotonic()))
        self._enter(Phase.CONNECTING)
        try:
            return await self._connect_once(record, row, deadline)
        except (SSHUnreachable, PortBusy) as e:
            raise BootFailed(f"instance {record.instance_id}, rebooted once, still gives no usable SSH: {e}") from e

    async def _connect_once(self, record: RentalRecord, row: Instance, deadline: float) -> InstanceLink:
        """Direct for at most ``ssh_direct_timeout_s`` of silence, then the proxy; the path is logged.

        Raises :class:`SSHUnreachable` when no endpoint answered, :class:`PortBusy` when the
        proxy refused the scheduler's remote forward.
        """
        ctx = self.context
        pin = self.host_keys[1] if self.host_keys is not None else None  # the same sshd behind both
        direct, proxy = row.direct_ssh(), row.proxy_ssh()
        tried = ""
        if direct is not None:
            endpoint = SSHEndpoint(*direct)
            try:
                link = await ctx.hub.connect(
                    self.name, endpoint, timeout_s=max(1.0, deadline - time.monotonic()), host_keys=pin,
                    silent_timeout_s=ctx.ssh_direct_timeout_s if proxy is not None else None,
                    traffic=record.ssh_traffic,
                )
            except SSHUnreachable as e:
                if proxy is None:
                    raise
                tried = f" (direct: {e})"
            else:
                ctx.log(f"{self.name}: SSH to instance {record.instance_id} direct, {endpoint}")
                return link
        if proxy is None:
            raise SSHUnreachable(f"instance {record.instance_id} lists no SSH endpoint (no port 22, no proxy)")
        endpoint = SSHEndpoint(*proxy)
        ctx.log(f"{self.name}: SSH to instance {record.instance_id} through Vast's proxy {endpoint}{tried}")
        try:
            return await ctx.hub.connect(
                self.name, endpoint, timeout_s=max(1.0, deadline - time.monotonic()), host_keys=pin,
                silent_timeout_s=ctx.ssh_direct_timeout_s, traffic=record.ssh_traffic,
            )
        except PortBusy as e:
            raise PortBusy(f"Vast's SSH proxy {endpoint} refused a remote forward ({e})", e.port) from e

    def _check_probe(self, probe: dict[str, Any], record: RentalRecord) -> None:
        """Say when the watchdog has no key; fail a box whose driver is older than the packages need."""
        ctx = self.context
        if not probe.get("api_key_source"):
            message = (
                f"WARNING {self.name}: instance {record.instance_id} has no CONTAINER_API_KEY (not in its "
                "environment, /proc/1/environ nor /etc/environment: its template does not inject it), so "
                "its watchdog cannot destroy it if this client dies: the orphan backstop is OFF for it. "
                "If this process is killed, run `dask-vastai cleanup` to stop its billing."
            )
            ctx.log(message)
            logger.warning(message)
        env = ctx.environment
        needed = env.client.cuda if env is not None else None
        if needed is None:
            return
        driver = driver_cuda(str(probe.get("nvidia_smi") or ""))
        if driver is None:
            logger.warning("%s: instance %s: nvidia-smi shows no CUDA version; cannot check %s's CUDA %s",
                           self.name, record.instance_id, needed[1], needed[0])
        elif driver < needed[0]:
            offer = record.offer.cuda_max_good
            raise BootFailed(
                f"instance {record.instance_id}: {needed[1]} needs CUDA {needed[0]}, but its driver supports "
                f"CUDA {driver} (nvidia-smi; the offer said cuda_max_good={CudaVersion.parse(str(offer))}). "
                "Trying another machine; pin an older CUDA build or add a higher cuda_max_good to query."
            )

    def _incarnations(
        self, probe: dict[str, Any], record: RentalRecord, extra_env: dict[str, str] | None = None
    ) -> list[Incarnation]:
        """Worker specs from what the box really has, checked against what was rented.

        ``extra_env`` (what the environment step shipped: ``PYTHONPATH``, ``DASK_CONFIG``) and
        the cluster's secret env reach the worker inside the incarnation, over SFTP only.
        """
        gpus = probe.get("gpus") or []
        wanted = record.offer.num_gpus
        if len(gpus) < wanted:
            raise BootFailed(
                f"instance {record.instance_id} shows {len(gpus)} GPU(s) in nvidia-smi but {wanted} were rented"
            )
        per_gpu = self.pool.worker_per_gpu and len(self.worker_names) > 1
        count = len(self.worker_names)
        cpus, memory = instance_size(probe, record)
        opts = self.pool.worker_options
        out = []
        for k, worker_name in enumerate(self.worker_names):
            if per_gpu:
                visible = str(gpus[k].get("index", k))
                n_gpu = 1
            else:
                visible = ",".join(str(g.get("index", i)) for i, g in enumerate(gpus[:wanted]))
                n_gpu = wanted
            cpu = max(1.0, cpus / count)
            mem = memory // count
            resources = {"GPU": float(n_gpu), "CPU": cpu, "MEMORY": float(mem)}
            resources[self.pool.resource_name] = POOL_RESOURCE_CAPACITY
            resources.update(opts.get("resources", {}))
            env = dict(self.context.env)
            env.update(extra_env or {})
            env["CUDA_VISIBLE_DEVICES"] = visible
            env[WORKER_CLIENTS_ENV] = str(bool(self.context.worker_clients))
            env[ROSTER_ENV] = "1"  # worker peers only from the scheduler's live-worker list
            out.append(
                Incarnation(
                    worker_name=worker_name,
                    scheduler_address=self.context.scheduler_address,
                    worker_port=0,
                    nanny_port=0,
                    nthreads=int(opts.get("nthreads", max(1, int(cpu)))),
                    memory_limit=int(opts.get("memory_limit", mem)),
                    resources=resources,
                    env=env,
                    # The CA's certificate only: each worker's own is minted with its ports.
                    tls_ca=self.context.certificates.ca_pem,
                    tls_cert="",
                    tls_key="",
                    death_timeout_s=int(opts.get("death_timeout", 60)),
                    # Every worker and nanny checks its peers' roles (dask_vastai.roles).
                    extra_args=WORKER_ARGS,
                    python=probe.get("executable") if self.context.environment is not None else None,
                )
            )
        return out

    async def _direct_ports(self, row: Instance, record: RentalRecord, workers: int, python: str) -> list[DirectPort] | None:
        """The direct ports of this boot's workers, or None for the tunnel (said once per rental)."""
        ctx = self.context
        if self.pool.network == TUNNEL or self.link is None:
            return None
        ports = direct_ports(row, workers)
        if ports is None:
            why = (f"it lists no direct port for its {workers} worker(s) (mapped: {sorted(row.ports)})"
                   if row.public_ipaddr else "it has no public address")
        else:
            why = await probe_direct(self.link, python, ports, ctx.direct_probe_timeout_s)
        if why is None:
            return ports
        if record.instance_id not in self._direct_refused:
            self._direct_refused.add(record.instance_id)
            message = (f"{self.name}: instance {record.instance_id}: {why}; its workers use the SSH tunnel "
                       f"instead of direct connections (network={self.pool.network!r})")
            ctx.log(message)  # the user's one line about it (also in get_logs())
            logger.info(message)
        return None

    async def _start_workers(self, incarnations: list[Incarnation], direct: list[DirectPort] | None = None) -> None:
        """Fresh ports, forwards in place everywhere, certificates for them, then the incarnation files.

        ``direct``: the workers' public ports (direct mode): each listens there, is reached there,
        and only its nanny gets a forward (from the client).
        """
        from dataclasses import replace

        assert self.link is not None
        hub = self.context.hub
        ready = []
        if direct is None:
            ports = await hub.allocate_ports(2 * len(incarnations))
            for k, inc in enumerate(incarnations):
                # The hub may swap a port that turned out busy somewhere for a fresh one.
                worker_port, nanny_port = await hub.expose_worker(self.link, ports[2 * k], ports[2 * k + 1])
                # The supervisor's worker listens and advertises tls://127.0.0.1:<worker_port>: the
                # certificate pins that address and the nanny's, which the scheduler holds it to.
                creds = self.context.certificates.issue_worker(
                    inc.worker_name, address=f"tls://127.0.0.1:{worker_port}", nanny=f"tls://127.0.0.1:{nanny_port}"
                )
                ready.append(replace(inc, worker_port=worker_port, nanny_port=nanny_port,
                                     env={**inc.env, **incarnation_env(inc.worker_name, creds.serial)},
                                     tls_cert=creds.cert_pem, tls_key=creds.key_pem))
            self.worker_ports = [inc.worker_port for inc in ready]
        else:
            nanny_ports = await hub.allocate_ports(len(incarnations))
            for inc, port, nanny_port in zip(incarnations, direct, nanny_ports, strict=True):
                nanny_port = await hub.expose_nanny(self.link, nanny_port)
                # Reached at its public address, which its certificate pins (the scheduler holds
                # it to it); it binds every interface of the container (Vast maps the port there).
                creds = self.context.certificates.issue_worker(
                    inc.worker_name, address=port.address, nanny=f"tls://127.0.0.1:{nanny_port}"
                )
                ready.append(replace(
                    inc, worker_port=port.listen_port, nanny_port=nanny_port, contact_address=port.address,
                    env={**inc.env, LISTEN_HOST_ENV: "0.0.0.0", **incarnation_env(inc.worker_name, creds.serial)},
                    tls_cert=creds.cert_pem, tls_key=creds.key_pem,
                ))
            self.worker_ports = [inc.nanny_port for inc in ready]
        self.network = TUNNEL if direct is None else DIRECT
        self._worker_addresses = {inc.worker_name: inc.contact_address or f"tls://127.0.0.1:{inc.worker_port}"
                                  for inc in ready}
        await asyncio.gather(
            *(self.link.put(incarnation_path(inc.worker_name), incarnation_payload(inc)) for inc in ready)
        )
        self._renew(ready)

    def _renew(self, incarnations: list[Incarnation]) -> None:
        """Keep these incarnations' short-lived certificates fresh while they run."""
        if self._renewal is not None:
            self._renewal.cancel()
        files = {inc.worker_name: inc.env[RENEWAL_FILE_ENV] for inc in incarnations}
        renewal = CertificateRenewal(self.context.certificates, lambda: self.link, files, who=self.name,
                                     say=getattr(self.context, "log", None))
        self._renewal = asyncio.create_task(renewal.run())

    async def _beat(self) -> None:
        """Tell the on-instance watchdog the client is alive."""
        while self.link is not None and not self.link.closed.is_set():
            with contextlib.suppress(Exception):
                await self.link.heartbeat()
            await asyncio.sleep(self.context.heartbeat_interval_s)

    # ----------------------------------------------------------------- close
    async def _teardown_link(self) -> None:
        for port in self.worker_ports:
            with contextlib.suppress(Exception):
                await self.context.hub.unexpose_worker(port)
        self.worker_ports = []
        if self.link is not None:
            link, self.link = self.link, None
            with contextlib.suppress(Exception):
                await self.context.hub.close_link(link)

    async def close(self) -> None:
        """Close SSH, then destroy the rental: always, whatever the boot reached."""
        for task in (self._boot, self._heartbeat, self._renewal):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._teardown_link()
        if self.record is not None:
            try:
                await self.context.broker.destroy(self.record.instance_id)
            except VastError as e:
                # Vast stays down: the record stays undestroyed (and in the ledger). At the
                # cluster's close this destroy was part of the broker's one round, whose close
                # says once what may still bill; raised from here it was a traceback out of
                # SpecCluster's scale-down.
                logger.debug("could not destroy instance %s now: %s", self.record.instance_id, e)
            else:
                if self.phase not in (Phase.FAILED, Phase.LOST):
                    self._enter(Phase.DESTROYED)
        await super().close()

    # ------------------------------------------------------------------ info
    def _enter(self, phase: Phase, reason: str | None = None) -> None:
        """Note where the boot stands (``phase``, since when, why it failed) for the user."""
        self.phase, self.phase_since, self.phase_reason = phase, time.time(), reason
        on_phase = getattr(self.context, "on_phase", None)  # a partial context (tests) has none
        if on_phase is not None:
            on_phase(self)

    @property
    def instance_id(self) -> int | None:
        return self.record.instance_id if self.record else None

    def __repr__(self) -> str:
        rid = self.record.instance_id if self.record else None
        return f"<VastInstance {self.name}: instance={rid} status={self.status.name}>"


def instance_size(probe: dict[str, Any], record: RentalRecord) -> tuple[float, int]:
    """``(CPUs, memory bytes)`` a rental's workers share: the smaller of what the box shows
    and what was rented.

    Vast's CPU and memory are soft shares: a container may see all of a big host (384
    cores, a terabyte) while its offer says 16 cores and 64 GB. Sized by what it sees, a
    worker runs hundreds of threads and never spills before the OOM killer; sized by the
    offer alone, a box that shows less than it promised would be overcommitted. The rental's
    own row (``cpu_cores_effective``, ``cpu_ram`` in MB) is the offer's word, else the offer.
    """
    said = record.instance if record.instance is not None and record.instance.cpu_cores_effective else record.offer
    offer_cpus, offer_mem = float(said.cpu_cores_effective or 0), int(said.cpu_ram_mb * 2**20)
    seen_cpus, seen_mem = float(probe.get("cpus") or 0), int(probe.get("memory_bytes") or 0)
    cpus = min((c for c in (seen_cpus, offer_cpus) if c > 0), default=1.0)
    memory = min((m for m in (seen_mem, offer_mem) if m > 0), default=0)
    return cpus, memory


async def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)
