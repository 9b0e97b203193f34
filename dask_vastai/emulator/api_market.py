"""The emulated marketplace's state: offers, rentals and their life cycle, keys, billing.

Everything here runs on the emulator's event loop (the HTTP handlers and the life-cycle
tasks); the :class:`~dask_vastai.emulator.Emulator` hops onto that loop for its Python API.

Life cycle of a rental (``actual_status``): ``None`` at create -> ``loading`` (a docker
pull message) for ``boot_delay_s`` -> the runtime's ``start(spec)`` -> ``running`` with
``ports``/``public_ipaddr``/``ssh_host``/``ssh_port``. An ``args`` workload that ends makes
it ``exited``; stop -> ``stopped``; start -> ``loading`` -> ``running`` again; reboot ->
``loading`` -> ``running``; destroy -> the row is gone and its offer is listed again. A
runtime that fails to start it -> ``exited`` with the error in ``status_msg``.

Billing (our choice, documented because Vast's exact rule is not public): from create to
destroy the rental pays ``dph_total`` per second while it is meant to run (``None``,
``loading``, ``running``: Vast bills a reserved GPU while the image pulls) and only its
storage (``storage_cost * disk_gb / 720`` $/h) while ``stopped``, ``exited`` or
``offline``; nothing after destroy. ``dph_total = dph_base + storage`` on-demand, or
``bid + storage`` for an interruptible rental (``price`` given at create). Bandwidth is billed
on top, per byte that crosses the rental's network boundary (the runtime meters it), at the
offer's ``inet_up_cost`` (bytes out) and ``inet_down_cost`` (bytes in), $ per GB.

Offers are single-use: a rented offer is hidden from search until its rental is destroyed.

Where Vast's behaviour is unknown the market plays the variants (``variants.py``): a boot
may stall in ``created``/``scheduling``/``frozen`` first (billed at the full rate), a
destroyed row may linger listed (unbilled, ``cur_state`` ``unloaded``), an outbid row's
``intended_status`` and ``status_msg`` vary, a long ``onstart`` may be refused, and what a
sandbox is asked to be (:class:`~dask_vastai.emulator.runtime.SandboxQuirks`: blocked
direct ports, a broken SSH proxy mended by one reboot, SSH sessions without the
container's env, a CPU/memory view, no ``CONTAINER_API_KEY``) is decided at each boot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import secrets
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .api_query import QueryError, matches, ordered
from .catalog import HOURS_PER_MONTH, priced
from .faults import Faults
from .runtime import InstanceRuntime, SandboxEndpoints, SandboxSpec
from .variants import STALL_MESSAGES, Variants, sandbox_quirks

logger = logging.getLogger("dask_vastai.emulator")

#: Vast's bandwidth prices (``inet_up_cost``, ``inet_down_cost``) are $ per GB; a GB is 10^9 bytes
BYTES_PER_GB = 1e9
#: statuses during which the whole dph_total is billed
_FULL_RATE = (None, "loading", "running", "rebooting")
#: seconds a requested log stays "not uploaded yet" (404) before it can be fetched
LOG_UPLOAD_DELAY_S = 0.2
#: instance-list columns Vast computes and refuses to filter on
_COMPUTED_COLUMNS = frozenset({"dph_total", "num_gpus"})
MAX_PAGE = 25


class ApiError(Exception):
    """An error the API answers with a Vast-shaped JSON body."""

    def __init__(self, status: int, error: str, msg: str, **extra: Any) -> None:
        super().__init__(msg)
        self.status = status
        self.body: dict[str, Any] = {"success": False, "error": error, "msg": msg, **extra}


class ManualClock:
    """A clock tests move by hand (``clock.advance(10)``) to check billing without sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Contract:
    """One instance as the market keeps it (Vast's word: a create answers ``new_contract``).

    What was asked, where it stands, what it has cost.
    """

    id: int
    offer: dict[str, Any]
    image: str
    env: dict[str, str]
    label: str | None
    onstart: str | None
    args: list[str] | None
    runtype: str
    disk_gb: float
    is_bid: bool
    gpu_dph: float
    storage_dph: float
    start_date: float
    api_key: str
    actual_status: str | None = None
    intended_status: str = "running"
    status_msg: str | None = None
    endpoints: SandboxEndpoints | None = None
    exit_code: int | None = None
    attached_keys: list[tuple[int, str]] = field(default_factory=list)
    reboots: int = 0
    task: asyncio.Task[None] | None = None
    destroyed: bool = False
    end_date: float | None = None
    # billing: money and seconds up to rate_since, and the rate kind since then
    billed_usd: float = 0.0
    full_seconds: float = 0.0
    storage_seconds: float = 0.0
    rate_since: float = 0.0
    rate_kind: str | None = "full"

    @property
    def dph_total(self) -> float:
        return self.gpu_dph + self.storage_dph

    def _rate(self) -> float:
        return {"full": self.dph_total, "storage": self.storage_dph}.get(self.rate_kind or "", 0.0)

    def settle(self, now: float) -> None:
        """Move what accrued since ``rate_since`` into the totals."""
        elapsed = max(0.0, now - self.rate_since)
        self.billed_usd += self._rate() * elapsed / 3600.0
        if self.rate_kind == "full":
            self.full_seconds += elapsed
        elif self.rate_kind == "storage":
            self.storage_seconds += elapsed
        self.rate_since = max(self.rate_since, now)

    def bill(self, kind: str | None, now: float) -> None:
        """From ``now`` on, pay ``kind``: "full", "storage" or None (nothing)."""
        self.settle(now)
        self.rate_kind = kind

    def cost(self, now: float) -> float:
        elapsed = max(0.0, now - self.rate_since)
        return self.billed_usd + self._rate() * elapsed / 3600.0


def parse_env(env: Mapping[str, Any] | str | None) -> dict[str, str]:
    """The create body's ``env`` as a dict; a docker-flag string is parsed as the SDK does."""
    if env is None:
        return {}
    if isinstance(env, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out: dict[str, str] = {}
    tokens = shlex.split(env)
    for flag, value in zip(tokens, tokens[1:], strict=False):
        if flag == "-e" and "=" in value:
            key, _, val = value.partition("=")
            out[key] = val
        elif flag in ("-p", "-v", "-n"):
            out[f"{flag} {value}"] = "1"
        elif flag == "-h":
            out["-h"] = value
    return out


def container_ports(env: Mapping[str, str], runtype: str) -> tuple[int, ...]:
    """TCP container ports the rental opens: ``-p H:C`` keys, plus 22 for ssh runtypes."""
    ports: list[int] = []
    for key in env:
        if not key.startswith("-p "):
            continue
        spec = key[3:].strip()
        if spec.endswith("/udp"):
            continue
        spec = spec.removesuffix("/tcp")
        inner = spec.rsplit(":", 1)[-1]
        if inner.isdigit() and int(inner) not in ports:
            ports.append(int(inner))
    if ("ssh" in runtype or "jupyter" in runtype) and 22 not in ports:
        ports.insert(0, 22)
    return tuple(ports)


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _page_offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise ApiError(400, "invalid_args", f"after_token {token!r} is not a token this server gave") from e


class Market:
    """Offers, rentals, keys and the meter of one emulated account."""

    def __init__(self, offers: Iterable[dict[str, Any]], runtime: InstanceRuntime, *,
                 api_url: str, clock: Callable[[], float] = time.time, boot_delay_s: float = 2.0,
                 balance_usd: float = 100.0, first_instance_id: int = 7_000_001,
                 variants: Variants | None = None) -> None:
        self.offers: dict[int, dict[str, Any]] = {o["id"]: o for o in offers}
        self.runtime = runtime
        self.api_url = api_url
        self.clock = clock
        self.boot_delay_s = float(boot_delay_s)
        self.initial_balance_usd = float(balance_usd)
        self.faults: Faults | None = None
        self.variants = variants or Variants()
        self.rentals: dict[int, Contract] = {}  # live ones
        self.ledger: dict[int, Contract] = {}  # every rental ever made, for the meter
        self.lingering: dict[int, float] = {}  # destroyed rental id -> until when it stays listed
        self.instance_keys: dict[str, int] = {}
        self.account_keys: list[dict[str, Any]] = []
        self._taken: dict[int, int | None] = {}  # offer id -> rental id (None: another user)
        self._next_id = first_instance_id
        self._next_key_id = 1
        self._logs: dict[str, tuple[float, str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._closed_at: float | None = None

    def now(self) -> float:
        return self.clock() if self._closed_at is None else self._closed_at

    # ------------------------------------------------------------------ search
    def search(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Offers for a search body (filters + order/limit/type/allocated_storage)."""
        try:
            storage_gb = float(body.get("allocated_storage") or 5.0)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "invalid_args", f"allocated_storage must be a number of GB, not {body.get('allocated_storage')!r}") from e
        bid = body.get("type") in ("bid", "interruptible")
        filters = body
        wants_rented = "rented" in filters
        rows = []
        for offer in self.offers.values():
            taken = offer["id"] in self._taken
            if taken and not wants_rented:
                continue
            row = priced(offer, allocated_storage_gb=storage_gb, bid=bid)
            row["rented"] = taken
            row["rentable"] = not taken
            try:
                if matches(row, filters):
                    rows.append(row)
            except QueryError as e:
                raise ApiError(400, "invalid_args", str(e)) from e
        rows = ordered(rows, body.get("order") or [["score", "desc"]])
        limit = body.get("limit")
        try:
            limit = int(limit) if limit else 1000
        except (TypeError, ValueError) as e:
            raise ApiError(400, "invalid_args", f"limit must be an integer, not {limit!r}") from e
        return rows[:limit]

    # ------------------------------------------------------------------ create
    def create(self, offer_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        """Rent ``offer_id``; answers Vast's create response or raises ApiError."""
        offer = self.offers.get(offer_id)
        raced = self.faults.take_race() if offer is not None and offer_id not in self._taken and self.faults else None
        if raced is not None:
            self._taken[offer_id] = None  # another user got it between search and create
            if raced == 410:
                raise ApiError(410, "no_such_ask",
                               f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available.",
                               ask_id=offer_id)
        if offer is None or offer_id in self._taken:
            raise ApiError(404, "no_such_ask",
                           f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
                           ask_id=offer_id)
        image = body.get("image")
        if not image:
            raise ApiError(400, "invalid_args", "error 400/3467: Invalid args: image is required "
                           "(give --image or a template)", ask_id=offer_id)
        label = body.get("label")
        if label is not None and len(str(label)) > 1024:
            raise ApiError(400, "invalid_args", "error 400/3467: Invalid args: label longer than 1024 characters",
                           ask_id=offer_id)
        try:
            disk_gb = float(body.get("disk") or 10.0)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "invalid_args", f"error 400/3467: Invalid args: disk {body.get('disk')!r} "
                           "is not a number of GB", ask_id=offer_id) from e
        if disk_gb > offer["disk_space"]:
            raise ApiError(400, "invalid_args", f"error 400/3467: Invalid args: disk {disk_gb} GB is more than "
                           f"the {offer['disk_space']} GB this offer has", ask_id=offer_id)
        price = body.get("price", body.get("bid_price"))
        is_bid = price is not None
        gpu_dph = offer["dph_base"]
        if is_bid:
            try:
                gpu_dph = float(price)
            except (TypeError, ValueError) as e:
                raise ApiError(400, "invalid_price", f"error 400/3467: price {price!r} is not a $/h number",
                               ask_id=offer_id) from e
            if gpu_dph < offer["min_bid"]:
                raise ApiError(400, "invalid_price", f"error 400/3467: bid price {gpu_dph} $/h is below this "
                               f"offer's minimum bid {offer['min_bid']} $/h", ask_id=offer_id)
        onstart_max = self.variants["onstart_max_chars"]
        if onstart_max is not None and len(str(body.get("onstart") or "")) > onstart_max:
            raise ApiError(400, "invalid_args", f"error 400/3467: Invalid args: onstart is "
                           f"{len(str(body['onstart']))} characters; the limit is {onstart_max}", ask_id=offer_id)
        args = body.get("args")
        if args is not None and not isinstance(args, list):
            args = shlex.split(str(args))
        elif args is None and body.get("args_str"):
            args = shlex.split(str(body["args_str"]))
        now = self.clock()
        rental = Contract(
            id=self._next_id, offer=dict(offer), image=str(image), env=parse_env(body.get("env")),
            label=None if label in (None, "") else str(label), onstart=body.get("onstart"), args=args,
            runtype=str(body.get("runtype") or "ssh"), disk_gb=disk_gb, is_bid=is_bid, gpu_dph=gpu_dph,
            storage_dph=offer["storage_cost"] * disk_gb / HOURS_PER_MONTH, start_date=now,
            api_key=secrets.token_hex(32), rate_since=now,
        )
        self._next_id += 1
        self.rentals[rental.id] = rental
        self.ledger[rental.id] = rental
        self.instance_keys[rental.api_key] = rental.id
        self._taken[offer_id] = rental.id
        if body.get("target_state") == "stopped":
            rental.intended_status = rental.actual_status = "stopped"
            rental.bill("storage", now)
        else:
            self._launch(rental, first=True)
        return {"success": True, "new_contract": rental.id, "instance_api_key": rental.api_key}

    def create_bulk(self, ids: Iterable[Any], body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One result per offer id; a failed one does not stop the others."""
        results = []
        for raw in ids:
            try:
                offer_id = int(raw)
                offer = self.offers.get(offer_id)
                if offer is not None and offer_id not in self._taken and self.variants.picks(
                        "bulk_create_refused", offer_id, offer_id=offer_id, machine_id=offer.get("machine_id")):
                    self._taken[offer_id] = None  # another user's, as a raced create
                out = self.create(offer_id, body)
                results.append({"ask_id": offer_id, "success": True, "new_contract": out["new_contract"],
                                "instance_api_key": out["instance_api_key"]})
            except ApiError as e:
                results.append({"ask_id": raw, **e.body})
            except (TypeError, ValueError):
                results.append({"ask_id": raw, "success": False, "error": "invalid_args",
                                "msg": f"offer id {raw!r} is not an integer"})
        return results

    # ------------------------------------------------------------------ life cycle
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _launch(self, r: Contract, *, first: bool = False) -> None:
        """Send ``r`` to loading now and to running after the boot delay."""
        now = self.clock()
        r.intended_status = "running"
        r.actual_status = None if first else "loading"
        r.status_msg = f"Pulling image {r.image}: downloading layers" if not first else None
        r.endpoints = None
        r.exit_code = None
        r.bill("full", now)
        r.task = self._spawn(self._boot(r))
        self._ensure_monitor()

    async def _boot(self, r: Contract) -> None:
        await asyncio.sleep(0)  # the create answer goes out with actual_status None
        stall = self.variants["boot_stall"]
        if stall != "none" and self.variants.picks_host("boot_stall_hosts", r.offer, r.id):
            r.actual_status, r.status_msg = stall, STALL_MESSAGES[stall].format(image=r.image)
            stall_s = self.variants["boot_stall_s"]
            await (asyncio.sleep(stall_s) if math.isfinite(stall_s) else asyncio.Event().wait())
        r.actual_status = "loading"
        r.status_msg = f"Pulling image {r.image}: downloading layers"
        fault = self.faults.take_boot() if self.faults else None
        await asyncio.sleep(self.boot_delay_s)
        if fault is not None:
            r.actual_status = fault.actual_status
            r.status_msg = fault.status_msg.format(image=r.image)
            if fault.actual_status != "loading":
                r.bill("storage", self.clock())
            return
        r.status_msg = f"Starting container {r.image}"
        spec = self._spec(r)
        if self.faults and self.faults.take_impostor():
            spec = replace(spec, quirks=replace(spec.quirks, ssh_impostor=True))
        try:
            endpoints = await self.runtime.start(spec)
        except asyncio.CancelledError:
            await self.runtime.stop(r.id)
            raise
        except Exception as e:  # the runtime's failure is the rental's boot failure, shown to the user
            logger.warning("instance %s failed to start: %s", r.id, e)
            r.actual_status = "exited"
            r.status_msg = f"Error response from daemon: failed to start container: {e}"
            r.bill("storage", self.clock())
            await self.runtime.stop(r.id)
            return
        r.endpoints = endpoints
        r.actual_status = "running"
        r.status_msg = f"success, running {r.image}/ssh"

    def _spec(self, r: Contract) -> SandboxSpec:
        keys = tuple([k["public_key"] for k in self.account_keys] + [k for _, k in r.attached_keys])
        env = {k: v for k, v in r.env.items() if not k.startswith("-")}
        env.update({
            "CONTAINER_ID": str(r.id),
            "GPU_COUNT": str(r.offer["num_gpus"]),
            "VAST_CONTAINERLABEL": f"C.{r.id}",
            "SSH_PUBLIC_KEY": keys[0] if keys else "",
            "DATA_DIRECTORY": "/workspace/",
        })
        if self.variants["container_api_key"] == "injected":
            env["CONTAINER_API_KEY"] = r.api_key
        ports = container_ports(r.env, r.runtype)
        return SandboxSpec(
            instance_id=r.id, image=r.image, runtype=r.runtype, onstart=r.onstart, args=r.args, env=env,
            container_ports=ports, authorized_keys=keys,
            num_gpus=int(r.offer["num_gpus"]), gpu_name=str(r.offer["gpu_name"]),
            gpu_ram_mb=int(r.offer["gpu_ram"]), cpu_cores=float(r.offer["cpu_cores_effective"]),
            cpu_ram_mb=int(r.offer["cpu_ram"]), disk_gb=r.disk_gb, api_url=self.api_url,
            quirks=sandbox_quirks(self.variants, r.offer, r.id, ports, r.reboots),
        )

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch_exits())

    async def _watch_exits(self, interval_s: float = 0.2) -> None:
        """Mark running ``args`` workloads ``exited`` once the runtime says they ended."""
        while self._closed_at is None:
            for r in list(self.rentals.values()):
                if r.actual_status != "running":
                    continue
                code = self.runtime.exited(r.id)
                if code is not None:
                    r.actual_status = "exited"
                    r.exit_code = code
                    r.status_msg = f"container exited with code {code}"
                    r.bill("storage", self.clock())
            await asyncio.sleep(interval_s)

    async def _halt(self, r: Contract) -> None:
        """Cancel the boot of ``r`` if under way and stop its sandbox."""
        task, r.task = r.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runtime.stop(r.id)

    def live(self, instance_id: int) -> Contract:
        r = self.rentals.get(instance_id)
        if r is None:
            raise ApiError(404, "not_found", "Instance not found")
        return r

    async def destroy(self, instance_id: int) -> None:
        if instance_id in self.lingering and instance_id not in self.rentals:
            return  # already being torn down: a second destroy succeeds and changes nothing
        r = self.live(instance_id)
        now = self.clock()
        r.bill(None, now)
        r.destroyed = True
        r.end_date = now
        del self.rentals[r.id]
        self.instance_keys.pop(r.api_key, None)
        self._taken = {o: i for o, i in self._taken.items() if i != r.id}
        linger_s = self.variants["destroy_linger_s"]
        if linger_s > 0:
            self.lingering[r.id] = now + linger_s
        # Vast answers a destroy at once and tears the container down behind it; answering
        # only after the sandbox stopped would bill the client's clock for our teardown.
        self._spawn(self._halt(r))

    async def set_state(self, instance_id: int, state: str) -> None:
        r = self.live(instance_id)
        if state == "stopped":
            if r.actual_status == "stopped":
                return
            r.intended_status = r.actual_status = "stopped"
            r.status_msg = "Instance stopped by user"
            r.endpoints = None
            r.bill("storage", self.clock())
            await self._halt(r)
        elif state == "running":
            if r.actual_status in ("stopped", "exited"):
                await self._halt(r)
                self._launch(r)
        else:
            raise ApiError(400, "invalid_args", f"state must be 'running' or 'stopped', not {state!r}")

    def set_label(self, instance_id: int, label: Any) -> None:
        r = self.live(instance_id)
        text = "" if label is None else str(label)
        if len(text) > 1024:
            raise ApiError(400, "invalid_args", f"label is {len(text)} characters; Vast allows 1024")
        r.label = text or None

    async def reboot(self, instance_id: int) -> None:
        r = self.live(instance_id)
        r.reboots += 1
        r.actual_status = "rebooting"
        await self._halt(r)
        self._launch(r)

    def preempt(self, instance_id: int) -> None:
        r = self.live(instance_id)
        if not r.is_bid:
            raise ValueError(f"instance {instance_id} is on-demand; only interruptible rentals "
                             "(created with a price) can be outbid")
        r.actual_status = "stopped"
        r.intended_status = self.variants["outbid_intended"]
        r.status_msg = self.variants["outbid_msg"] or r.status_msg
        r.endpoints = None
        r.bill("storage", self.clock())
        self._spawn(self._halt(r))

    def force_exit(self, instance_id: int, code: int) -> None:
        r = self.live(instance_id)
        if r.actual_status != "running":
            raise ValueError(f"instance {instance_id} is {r.actual_status}, not running: its container cannot die")
        r.actual_status = "exited"
        r.exit_code = code
        r.status_msg = f"container exited with code {code}"
        r.endpoints = None
        r.bill("storage", self.clock())
        self._spawn(self._halt(r))

    def set_offline(self, instance_id: int) -> None:
        r = self.live(instance_id)
        r.actual_status = "offline"
        r.status_msg = "host offline: no heartbeat from the machine"
        r.endpoints = None
        r.bill("storage", self.clock())
        self._spawn(self._halt(r))

    def signal_ssh(self, instance_id: int, action: str) -> None:
        """Freeze, thaw or drop the SSH link of a running rental (its runtime must be able to)."""
        r = self.live(instance_id)
        act = getattr(self.runtime, "signal_ssh", None)
        if act is None:
            raise ValueError(f"the {type(self.runtime).__name__} runtime runs no SSH server to {action}")
        if r.actual_status != "running":
            raise ValueError(f"instance {instance_id} is {r.actual_status}, not running: it has no SSH link")
        act(instance_id, action)

    # ------------------------------------------------------------------ rows
    def row(self, r: Contract) -> dict[str, Any]:
        """The instance as Vast's API shows it."""
        o = r.offer
        now = self.now()
        ep = r.endpoints
        row: dict[str, Any] = {k: o.get(k) for k in (
            "machine_id", "host_id", "bundle_id", "num_gpus", "gpu_name", "gpu_ram", "gpu_arch", "compute_cap",
            "cpu_name", "cpu_cores", "cpu_cores_effective", "cpu_ram", "cpu_arch", "disk_bw", "disk_name",
            "inet_up", "inet_down", "inet_up_cost", "inet_down_cost", "cuda_max_good", "driver_version",
            "reliability2", "geolocation", "verification", "direct_port_count", "total_flops", "dlperf",
            "mobo_name", "pci_gen", "pcie_bw", "storage_cost", "min_bid", "hosting_type", "static_ip",
            "os_version")}
        public_ip = ep.public_ipaddr if ep else getattr(self.runtime, "public_ipaddr", "127.0.0.1")
        ssh_host, ssh_port = None, None
        if ep is not None:
            if ep.ssh_host and ep.ssh_port:
                ssh_host, ssh_port = ep.ssh_host, ep.ssh_port
            elif 22 in ep.ports:
                ssh_host, ssh_port = ep.public_ipaddr, ep.ports[22]
        row.update({
            "id": r.id, "actual_status": r.actual_status, "intended_status": r.intended_status,
            "cur_state": "running" if r.intended_status == "running" else "stopped",
            "next_state": r.intended_status, "status_msg": r.status_msg, "label": r.label,
            "image_uuid": r.image, "image_args": list(r.args or []), "image_runtype": r.runtype,
            "extra_env": [[k, v] for k, v in r.env.items()], "onstart": r.onstart,
            "jupyter_token": None, "template_id": None, "template_hash_id": None,
            "public_ipaddr": public_ip, "local_ipaddrs": f"{public_ip} ",
            "ssh_host": ssh_host, "ssh_port": ssh_port, "ssh_idx": None, "machine_dir_ssh_port": None,
            "direct_port_start": None, "direct_port_end": None,
            "gpu_totalram": o["gpu_ram"] * o["num_gpus"], "gpu_util": 0.0, "gpu_temp": 35.0,
            "cpu_util": 0.0, "mem_usage": 0.0, "mem_limit": float(o["cpu_ram"]) / 1024,
            "disk_space": r.disk_gb, "disk_usage": 0.0, "disk_util": 0.0,
            "dph_base": r.gpu_dph, "dph_total": round(r.dph_total, 6), "is_bid": r.is_bid,
            "storage_total_cost": round(r.storage_dph, 6), "start_date": r.start_date, "end_date": None,
            "uptime_mins": round((now - r.start_date) / 60.0, 3), "duration": now - r.start_date,
            "exit_code": r.exit_code, "rentable": False, "rented": True, "client_run_time": 0.0,
            "host_run_time": 0.0,
            "instance": {"gpuCostPerHour": r.gpu_dph, "diskHour": r.storage_dph, "totalHour": r.dph_total,
                         "discountTotalHour": 0.0, "discountedTotalPerHour": r.dph_total},
        })
        if r.actual_status == "running" and ep is not None:
            row["ports"] = {f"{c}/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(h)}] for c, h in ep.ports.items()}
            row["direct_port_start"] = min(ep.ports.values(), default=None)
            row["direct_port_end"] = max(ep.ports.values(), default=None)
        return row

    def shown(self, instance_id: int) -> dict[str, Any] | None:
        """The row ``GET /instances/{id}/`` shows: a live rental's, a lingering one's, or None."""
        r = self.rentals.get(instance_id)
        if r is not None:
            return self.row(r)
        return self._lingering_row(instance_id)

    def rows(self) -> list[dict[str, Any]]:
        rows = [self.row(r) for r in self.rentals.values()]
        rows += filter(None, (self._lingering_row(i) for i in list(self.lingering)))
        return sorted(rows, key=lambda row: row["id"])

    def _lingering_row(self, instance_id: int) -> dict[str, Any] | None:
        """A destroyed rental still listed while its teardown runs (variant destroy_linger_s)."""
        until = self.lingering.get(instance_id)
        if until is None or self.now() >= until:
            self.lingering.pop(instance_id, None)
            return None
        r = self.ledger[instance_id]
        row = self.row(r)
        row.update({"actual_status": self.variants["destroy_linger_status"], "intended_status": "stopped",
                    "cur_state": "unloaded", "next_state": "unloaded", "end_date": r.end_date,
                    "status_msg": "Instance destroyed; tearing down the container"})
        row.pop("ports", None)
        return row

    def list_page(self, params: Mapping[str, str]) -> dict[str, Any]:
        """``GET /api/v1/instances/``: filtered, ordered, paginated rows with counts."""
        def loads(name: str, default: Any) -> Any:
            raw = params.get(name)
            if raw in (None, ""):
                return default
            try:
                return json.loads(raw)
            except json.JSONDecodeError as e:
                raise ApiError(400, "invalid_args", f"{name} must be JSON, not {raw!r}") from e
        filters = loads("select_filters", {}) or {}
        order_by = loads("order_by", [{"col": "id", "dir": "asc"}]) or [{"col": "id", "dir": "asc"}]
        cols = loads("select_cols", ["*"]) or ["*"]
        if not isinstance(filters, dict):
            raise ApiError(400, "invalid_args", f"select_filters must be a JSON object, not {filters!r}")
        bad = sorted(_COMPUTED_COLUMNS & set(filters))
        if bad:
            raise ApiError(400, "invalid_args", f"cannot filter on computed column(s) {', '.join(bad)}")
        try:
            limit = int(params.get("limit") or MAX_PAGE)
        except ValueError as e:
            raise ApiError(400, "invalid_args", f"limit must be an integer, not {params.get('limit')!r}") from e
        limit = 5 if limit <= 0 else min(limit, MAX_PAGE)
        try:
            found = [row for row in self.rows() if matches(row, filters)]
        except QueryError as e:
            raise ApiError(400, "invalid_args", str(e)) from e
        found = ordered(found, order_by)
        offset = _page_offset(params.get("after_token"))
        page = found[offset:offset + limit]
        if cols != ["*"] and isinstance(cols, list):
            keep = set(cols) | {"id"}
            page = [{k: v for k, v in row.items() if k in keep} for row in page]
        label_counts: dict[str, int] = {}
        for row in found:
            label_counts[row["label"] or ""] = label_counts.get(row["label"] or "", 0) + 1
        more = offset + limit < len(found)
        return {"success": True, "instances": page, "instances_found": len(page),
                "total_instances": len(found), "label_counts": label_counts,
                "next_token": _page_token(offset + limit) if more else None}

    # ------------------------------------------------------------------ logs
    def request_logs(self, instance_id: int, tail: Any = None, text_filter: Any = None) -> str:
        """Snapshot the container log now; return the token ``GET /logs/<token>`` serves."""
        r = self.rentals.get(instance_id)
        if r is None:
            raise ApiError(404, "invalid_id", "Invalid instance id.")
        lines = self.runtime.logs(r.id).splitlines()
        if text_filter:
            lines = [line for line in lines if str(text_filter) in line]
        if tail not in (None, ""):
            try:
                n = int(tail)
            except (TypeError, ValueError) as e:
                raise ApiError(400, "invalid_args", f"tail must be a number of lines, not {tail!r}") from e
            lines = lines[-n:] if n > 0 else []
        return self.publish("".join(f"{line}\n" for line in lines))

    def publish(self, text: str) -> str:
        """Put ``text`` behind a fresh ``/logs/<token>`` (404 for a moment, as an upload would be)."""
        token = secrets.token_urlsafe(16)
        self._logs[token] = (time.monotonic() + LOG_UPLOAD_DELAY_S, text)
        return token

    def log_text(self, token: str) -> str | None:
        """The uploaded log, or None while it is "not uploaded yet" or unknown."""
        entry = self._logs.get(token)
        if entry is None or time.monotonic() < entry[0]:
            return None
        return entry[1]

    # ------------------------------------------------------------------ ssh keys
    def _key_record(self, key: str) -> dict[str, Any]:
        record = {"id": self._next_key_id, "user_id": 1, "key": key, "public_key": key,
                  "created_at": self.clock(), "deleted_at": None}
        self._next_key_id += 1
        return record

    @staticmethod
    def _valid_key(key: Any) -> str:
        text = str(key or "").strip()
        if not text.startswith(("ssh-", "ecdsa-", "sk-")) or len(text.split()) < 2:
            raise ApiError(400, "no_ssh_key", f"not an OpenSSH public key: {text[:40]!r}; "
                           "give the line from your id_ed25519.pub")
        return text

    def add_account_key(self, key: Any) -> dict[str, Any]:
        record = self._key_record(self._valid_key(key))
        self.account_keys.append(record)
        return record

    def delete_account_key(self, key_id: int) -> None:
        before = len(self.account_keys)
        self.account_keys = [k for k in self.account_keys if k["id"] != key_id]
        if len(self.account_keys) == before:
            raise ApiError(404, "no_such_ssh_key", f"no SSH key with id {key_id}")

    def update_account_key(self, key_id: int, key: Any) -> dict[str, Any]:
        for record in self.account_keys:
            if record["id"] == key_id:
                record["key"] = record["public_key"] = self._valid_key(key)
                return record
        raise ApiError(404, "no_such_ssh_key", f"no SSH key with id {key_id}")

    def attach_key(self, instance_id: int, key: Any) -> None:
        """Attach ``key`` to a rental: it is in authorized_keys from the rental's next (re)start."""
        r = self.rentals.get(instance_id)
        if r is None:
            raise ApiError(404, "no_such_instance", f"no instance {instance_id}")
        text = self._valid_key(key)
        if text not in (k for _, k in r.attached_keys):
            r.attached_keys.append((self._key_record(text)["id"], text))

    def detach_key(self, instance_id: int, key_id: int) -> None:
        r = self.rentals.get(instance_id)
        if r is None:
            raise ApiError(404, "no_such_instance", f"no instance {instance_id}")
        before = len(r.attached_keys)
        r.attached_keys = [(i, k) for i, k in r.attached_keys if i != key_id]
        if len(r.attached_keys) == before:
            raise ApiError(404, "no_such_ssh_key", f"no SSH key {key_id} on instance {instance_id}")

    # ------------------------------------------------------------------ money
    def meter(self) -> dict[str, Any]:
        """What every rental has cost so far (USD), live and destroyed: its time and its bandwidth.

        ``time_usd`` is ``dph_total`` (or storage) per second as the status says; bandwidth is
        what the runtime counted at the rental's network boundary (``bytes_up`` left it,
        ``bytes_down`` entered it), billed at the offer's ``inet_up_cost``/``inet_down_cost``
        per GB (10^9 bytes). ``cost_usd`` is both, as the account's balance pays it.
        """
        now = self.now()
        records = []
        traffic = getattr(self.runtime, "traffic", None)
        for r in sorted(self.ledger.values(), key=lambda r: r.id):
            elapsed = max(0.0, now - r.rate_since)
            up, down = traffic(r.id) if traffic is not None else (0, 0)
            bandwidth = (up * float(r.offer.get("inet_up_cost") or 0.0)
                         + down * float(r.offer.get("inet_down_cost") or 0.0)) / BYTES_PER_GB
            time_usd = r.cost(now)
            records.append({
                "id": r.id, "label": r.label, "dph": round(r.dph_total, 6), "storage_dph": round(r.storage_dph, 6),
                "seconds": r.full_seconds + (elapsed if r.rate_kind == "full" else 0.0),
                "storage_seconds": r.storage_seconds + (elapsed if r.rate_kind == "storage" else 0.0),
                "time_usd": time_usd, "bytes_up": up, "bytes_down": down, "bandwidth_usd": bandwidth,
                "cost_usd": time_usd + bandwidth, "destroyed": r.destroyed,
            })
        return {"total_usd": sum(rec["cost_usd"] for rec in records),
                "time_usd": sum(rec["time_usd"] for rec in records),
                "bandwidth_usd": sum(rec["bandwidth_usd"] for rec in records), "instances": records}

    def balance(self) -> float:
        return self.initial_balance_usd - self.meter()["total_usd"]

    async def close(self) -> None:
        """Freeze the meter and stop everything this market started."""
        self._closed_at = self.clock()
        tasks = [r.task for r in self.rentals.values() if r.task] + list(self._background)
        if self._monitor is not None:
            tasks.append(self._monitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.runtime.close()
