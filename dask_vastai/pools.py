"""Pools: one instance shape each (GPU model, GPU count, RAM), one scheduler for all.

A pool's workers carry a resource named after it (``pool-<name>``), so a task can ask for
a pool (``resources={"GPU": 1, "pool-a100": 1}``) or just for what it needs
(``{"GPU": 1}``, any pool). The resource is given a large capacity so that it selects a
pool without limiting how many tasks run there (``GPU`` does that).

* :class:`PoolShape` is the one home of the shape options: the cluster's keyword set, the
  Snakemake plugin's mapping, the validation and the option docs all come from its fields,
  and each field's default is in ``vastai.yaml``.
* :class:`Pool` is a shape made concrete: the offer query and the create request.
* :class:`PoolSet` owns the pools of a cluster, the names of their instances and their
  boot failures; :func:`make_worker_spec` builds a SpecCluster spec from a pool, alone
  (as dask-kubernetes' ``make_worker_spec``).
* :class:`ResourceGuard` fails a task at once when no pool could ever run it: distributed
  leaves such a task pending forever, and ``no-workers-timeout`` cannot tell an instance
  that is still booting from a shape nobody rents.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle

from .config import documented, option, option_docs, option_parameters
from .environment import split_env
from .exceptions import BootFailed, ImpossibleResources
from .images import check_image_name
from .network import DIRECT, TUNNEL, check_network, direct_container_ports, direct_ports_needed
from .offers import OfferRequirements
from .vast import CreateRequest

logger = logging.getLogger(__name__)

POOL_RESOURCE_PREFIX = "pool-"
#: capacity of a pool's resource on each worker: it selects, it does not limit
POOL_RESOURCE_CAPACITY = 1_000_000.0
#: resources every worker advertises (besides its pool's)
STANDARD_RESOURCES = ("GPU", "CPU", "MEMORY")
#: the pool the cluster's own options describe
DEFAULT_POOL = "default"


_doc = documented


@dataclass(frozen=True)
class PoolShape:
    """What one instance of a pool is: every field None means "the default in ``vastai.yaml``".

    ``VastAICluster(gpu=..., num_gpus=...)``, ``cluster.add_pool(name, ...)``,
    ``pools=[{"name": ..., ...}]`` and the Snakemake plugin's settings all take these names.
    """

    gpu: str | Sequence[str] | None = _doc(
        'GPU model (``"RTX_3090"``) or a list of acceptable models; None for any.')
    num_gpus: int | None = _doc(
        "GPUs per instance (offers are searched with exactly this many).")
    gpu_ram: float | None = _doc("GB of memory per GPU, at least.")
    cpu_ram: float | None = _doc("GB of RAM per instance, at least.")
    cpu_cores: float | None = _doc("effective CPU cores per instance, at least.")
    disk: float | None = _doc("GB of disk allocated per instance.")
    max_price: float | None = _doc("$/h per instance, at most (``dph_total``, storage included).")
    region: str | Sequence[str] | None = _doc(
        '``"EU"``, ``"NA"``, ``"AS"``, ... or country codes (``"DE,PL"``).')
    datacenter: bool | None = _doc(
        "only verified datacenter hosts (the default); False widens to hobbyist hosts.")
    reliability: float | None = _doc("host reliability, at least (0.98 = up 98% of the time).")
    query: str | None = _doc(
        'extra ``vastai search offers`` filters, e.g. ``"cuda_max_good>=12.4 inet_down>500"``.')
    order: str | None = _doc('the order offers are taken in (``"dph_total"``: cheapest first).')
    interruptible: bool | str | None = _doc(
        "True: rent interruptible instances (a bid, see ``bid``; cheaper, but a higher bid "
        "preempts them: a lost rental is destroyed and replaced). ``\"fallback\"``: the same, but "
        "rent on demand when no interruptible offer matches or after the pool was preempted "
        "often (``vastai.interruptible-fallback``).")
    bid: float | str | None = _doc(
        'interruptible rentals: ``"1x"`` bids each offer\'s ``min_bid`` (a batch bids its '
        'highest), ``"1.5x"`` half as much again (less likely to be outbid); a number is a bid in '
        "$/h (offers asking more are skipped).")
    image: str | None = _doc("the Docker image of the instances.")
    env: Mapping[str, Any] | None = _doc(
        "environment on the instances. Vast stores it and shows it in ``show instances``: wrap "
        'secret values, ``env={"WANDB_API_KEY": Secret(key)}``, or pass them in ``secret_env``; '
        "those reach the workers over SSH only, never Vast.")
    worker_options: Mapping[str, Any] | None = _doc(
        "extra options of each dask worker (``nthreads``, ``memory_limit``, ``resources``).")
    worker_per_gpu: bool | None = _doc(
        "a K-GPU instance runs K workers with ``CUDA_VISIBLE_DEVICES`` each; False gives one "
        "worker holding all K (for multi-GPU tasks).")
    network: str | None = _doc(
        '``"tunnel"``: every Dask connection inside SSH, worker-to-worker data relayed through this '
        'machine; ``"direct"``: workers listen on ports Vast maps and talk to each other and to the '
        "scheduler directly, with mutual TLS (offers with enough direct ports); ``\"auto\"``: direct "
        "where an instance's ports answer, tunnel otherwise. An instance whose direct ports do not "
        "answer (a firewall) uses the tunnel, and the cluster says so.")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, where: str = "pool") -> PoolShape:
        """A shape from keyword options; an unknown name is a ``ValueError`` naming the known ones."""
        unknown = set(options) - set(cls.option_names())
        if unknown:
            raise ValueError(
                f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(cls.option_names())}"
            )
        return cls(**dict(options))

    def options(self) -> dict[str, Any]:
        """The options given (not None), as keyword arguments."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def get(self, name: str) -> Any:
        """The value of option ``name``: the one given, else its default in ``vastai.yaml``."""
        return option(name.replace("_", "-"), getattr(self, name))

    @classmethod
    def docs(cls, indent: str = "    ") -> str:
        """The options' docs, numpydoc style, for the docstrings of the classes that take them."""
        return option_docs(cls, indent)


def with_shape_options(func: Callable[..., Any]) -> inspect.Signature:
    """``func``'s signature with its ``**options`` spelled out as the shape options.

    What ``help()``, IDEs and notebooks show for ``VastAICluster(...)`` and ``add_pool(...)``.
    """
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [p for p in option_parameters(PoolShape) if p.name not in taken]
    return sig.replace(parameters=params)


FALLBACK = "fallback"


def interruptible_option(value: Any) -> tuple[bool, bool]:
    """``(interruptible, fallback)`` from the ``interruptible`` option (True, False or "fallback")."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == FALLBACK:
            return True, True
        if text in ("true", "yes", "1", "false", "no", "0"):
            return text in ("true", "yes", "1"), False
    elif value is None or isinstance(value, bool):
        return bool(value), False
    raise ValueError(
        f"interruptible={value!r}: give True (bid for interruptible instances), False (on demand) "
        f"or {FALLBACK!r} (bid, and rent on demand when bids fail)"
    )


def bid_option(value: Any) -> tuple[float | None, float]:
    """``(bid in $/h or None, multiple of min_bid)`` from the ``bid`` option (0.25, "1.2x")."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), 1.0
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        for suffix in ("xmin_bid", "*min_bid", "x"):
            if text.endswith(suffix):
                try:
                    return None, float(text[: -len(suffix)])
                except ValueError:
                    break
        else:
            try:
                return float(text), 1.0
            except ValueError:
                pass
    raise ValueError(
        f"bid={value!r}: give a bid in $/h (bid=0.25) or a multiple of each offer's min_bid (bid='1.2x')"
    )


@dataclass
class Pool:
    """One instance shape made concrete: what to search for and how to rent it."""

    name: str
    requirements: OfferRequirements
    create_request: CreateRequest
    worker_per_gpu: bool = True
    worker_options: dict[str, Any] = field(default_factory=dict)
    #: "tunnel", "direct" or "auto" (``network.py``)
    network: str = TUNNEL
    #: ``interruptible="fallback"``: rent with ``on_demand`` when bids fail (None otherwise)
    on_demand: OfferRequirements | None = None

    @property
    def fallback(self) -> bool:
        return self.on_demand is not None

    @classmethod
    def from_shape(cls, name: str, shape: PoolShape, *, onstart: str, min_cuda: str | None = None) -> Pool:
        """Every option resolved against ``vastai.yaml`` and validated (``ValueError`` naming it).

        ``min_cuda``: the CUDA the cluster's packages need of the driver (``cuda_max_good>=``).
        """
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"pool name {name!r}: use letters, digits, '-' and '_'")
        get = shape.get
        network = check_network(get("network"), where=f"pool {name!r}: network")
        worker_per_gpu = bool(get("worker_per_gpu"))
        workers = int(get("num_gpus")) if worker_per_gpu else 1
        interruptible, fallback = interruptible_option(get("interruptible"))
        bid_usd, bid_factor = bid_option(get("bid"))
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
            interruptible=interruptible,
            bid_usd=bid_usd,
            bid_factor=bid_factor,
            min_cuda=min_cuda,
            # "auto" takes any offer: its instances without the ports use the tunnel
            min_direct_ports=direct_ports_needed(workers) if network == DIRECT else None,
        )
        requirements.validate()
        image = check_image_name(str(get("image")))
        env, secret = split_env(get("env"))
        if secret:
            raise ValueError(
                f"pool {name!r}: secret env entries {sorted(secret)} belong to the cluster "
                "(VastAICluster(env=..., secret_env=...)), which sends them to every pool over SSH"
            )
        return cls(
            name=name,
            requirements=requirements,
            create_request=CreateRequest(
                image=image,
                disk_gb=requirements.disk_gb,
                onstart=onstart,
                env=env,
                ports=direct_container_ports(workers) if network != TUNNEL else (),
                runtype="ssh_direc ssh_proxy",
            ),
            worker_per_gpu=worker_per_gpu,
            worker_options=dict(get("worker_options") or {}),
            network=network,
            # one object per pool: the broker batches rents by their requirements' identity
            on_demand=dataclasses.replace(requirements, interruptible=False) if fallback else None,
        )

    @property
    def resource_name(self) -> str:
        return f"{POOL_RESOURCE_PREFIX}{self.name}"

    @property
    def gpus_per_instance(self) -> int:
        return self.requirements.num_gpus

    @property
    def workers_per_instance(self) -> int:
        return self.gpus_per_instance if self.worker_per_gpu else 1

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.worker_per_gpu else self.gpus_per_instance

    def group(self) -> list[str] | None:
        """SpecCluster group suffixes: one worker per GPU on a multi-GPU instance."""
        if self.workers_per_instance > 1:
            return [f"-gpu{k}" for k in range(self.workers_per_instance)]
        return None

    def could_run(self, restrictions: Mapping[str, float]) -> bool:
        """Whether a worker of this pool could ever satisfy ``restrictions``."""
        for name, amount in restrictions.items():
            if name == "GPU":
                if amount > self.gpus_per_worker:
                    return False
            elif name in ("CPU", "MEMORY"):
                # Only known once rented (an offer may have more than the minimum asked for).
                continue
            elif name.startswith(POOL_RESOURCE_PREFIX):
                if name != self.resource_name:
                    return False
            else:
                if name not in self.worker_options.get("resources", {}):
                    return False
        return True

    def describe(self) -> str:
        gpu = self.requirements.gpu or "any GPU"
        return f"{self.name} ({self.gpus_per_instance}x {gpu}, {self.gpus_per_worker} GPU per worker)"


def make_worker_spec(pool: Pool, worker_cls: type, context: Any) -> dict[str, Any]:
    """The SpecCluster spec of one instance of ``pool`` (a group of workers on K-GPU instances)."""
    spec: dict[str, Any] = {"cls": worker_cls, "options": {"context": context, "pool": pool}}
    group = pool.group()
    if group:
        spec["group"] = group
        spec["options"]["group"] = group
    return spec


def spec_pool(spec: Mapping[str, Any]) -> Pool | None:
    """The pool a worker spec belongs to."""
    return spec.get("options", {}).get("pool")


def instance_worker_names(instance: str, spec: Mapping[str, Any] | None) -> list[str]:
    """The names the workers of one instance register under (its spec name, plus group suffixes)."""
    return [instance + s for s in (spec or {}).get("group", [])] or [instance]


#: the kind of loss Vast shows for an interruptible rental outbid (``stopped``)
OUTBID = "outbid"


@dataclass
class PoolLosses:
    """What became of one pool's rentals after renting: counted for ``repr``, logs and widget."""

    #: interruptible rentals outbid (Vast shows them ``stopped``)
    preempted: int = 0
    #: every rental lost, preemptions included: host offline, container exited, gone from
    #: Vast's list, or a link that did not come back within ``orphan_timeout``
    lost: int = 0
    #: rentals that replaced a lost one and registered
    replaced: int = 0
    #: on-demand rentals of an ``interruptible="fallback"`` pool
    on_demand: int = 0
    #: when (monotonic) each preemption was seen, newest last
    preempted_at: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100))

    def preemptions_within(self, window_s: float, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for t in self.preempted_at if now - t <= window_s)

    def __bool__(self) -> bool:
        return bool(self.lost or self.replaced or self.on_demand)

    def text(self) -> str:
        """``"2 preempted, 1 other lost, 3 replaced, 1 on demand"`` (what happened, nothing else)."""
        parts = []
        if self.preempted:
            parts.append(f"{self.preempted} preempted")
        if self.lost - self.preempted:
            parts.append(f"{self.lost - self.preempted} {'other ' if self.preempted else ''}lost")
        if self.replaced:
            parts.append(f"{self.replaced} replaced")
        if self.on_demand:
            parts.append(f"{self.on_demand} on demand")
        return ", ".join(parts) or "none lost"


class PoolSet:
    """The pools of one cluster, the names of their instances, their boots and losses.

    The one place a boot outcome is recorded: an instance reports each here, the cluster's
    first wait raises the first error, adaptive stops renting for a pool whose last
    instances all failed (each failure costs money), and the boot times measured here set
    how long adaptive keeps an idle instance (its ski-rental break-even). A pool that gave
    up (its last instance failed for good, or adaptive stopped renting for it) is marked
    here with its reasons, which ``wait_for_workers`` and the tasks only it could run then
    raise. Rentals lost after renting (preempted, host offline, ...) and their replacements
    are counted here too, and an ``interruptible="fallback"`` pool asks here whether it has
    been preempted often enough to rent on demand.
    """

    def __init__(self, cluster_name: str, *, onstart: str, min_cuda: str | None = None) -> None:
        self.cluster_name = cluster_name
        self.onstart = onstart
        self.min_cuda = min_cuda
        self._pools: dict[str, Pool] = {}
        self._counters: dict[str, int] = {}
        #: boot failures in a row, per pool (reset when one of its instances registers)
        self._failures_in_a_row: dict[str, int] = {}
        #: why each instance that gave up booting did, oldest first
        self.boot_errors: dict[str, BaseException] = {}
        #: seconds from rent to registration of each instance that registered, per pool
        self.boot_times_s: dict[str, list[float]] = {}
        self._boot_errors_by_pool: dict[str, list[tuple[str, BaseException]]] = {}
        #: pools that gave up, with the sentence that says why
        self.given_up: dict[str, str] = {}
        self._warned_give_up: set[str] = set()
        #: per pool: rentals lost after renting, and their replacements
        self.losses: dict[str, PoolLosses] = {}
        self._falling_back: set[str] = set()

    # -------------------------------------------------------------- the pools
    def add(self, name: str, shape: PoolShape) -> Pool:
        if name in self._pools:
            raise ValueError(f"pool {name!r} exists already; pools: {sorted(self._pools)}")
        pool = Pool.from_shape(name, shape, onstart=self.onstart, min_cuda=self.min_cuda)
        self._pools[name] = pool
        self.losses[name] = PoolLosses()
        return pool

    def get(self, name: str | None = None) -> Pool:
        """The pool called ``name`` (None: the default pool); a ``ValueError`` naming the pools."""
        name = DEFAULT_POOL if name is None else name
        if name not in self._pools:
            raise ValueError(f"pool={name!r} does not exist; pools: {sorted(self._pools)} (see add_pool)")
        return self._pools[name]

    @property
    def default(self) -> Pool:
        return self._pools[DEFAULT_POOL]

    def __getitem__(self, name: str) -> Pool:
        return self._pools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._pools

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def values(self) -> list[Pool]:
        """The pools, the default pool first."""
        return list(self._pools.values())

    def __repr__(self) -> str:
        return f"PoolSet({', '.join(p.describe() for p in self._pools.values())})"

    # ------------------------------------------------------------- instances
    def new_instance_name(self, pool: str) -> str:
        """A fresh spec name for one instance of ``pool`` (``<cluster>-<k>``, ``<cluster>-<pool>-<k>``)."""
        k = self._counters.get(pool, 0)
        self._counters[pool] = k + 1
        return f"{self.cluster_name}-{k}" if pool == DEFAULT_POOL else f"{self.cluster_name}-{pool}-{k}"

    def instances_of(self, pool: str, specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Spec names (one per instance) of ``pool`` among ``specs``, oldest first."""
        target = self.get(pool)
        return [name for name, spec in specs.items() if spec_pool(spec) is target]

    def planned_gpus(self, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """GPUs per pool of the instances in ``specs`` (registered, booting or about to be rented)."""
        out = {name: 0 for name in self._pools}
        for spec in specs.values():
            pool = spec_pool(spec)
            if pool is not None and pool.name in out:
                out[pool.name] += pool.gpus_per_instance
        return out

    # -------------------------------------------------------- boot outcomes
    def record_boot(self, instance: str, pool: str, error: BaseException | None,
                    boot_s: float | None = None) -> None:
        """An instance registered (``error=None``: its pool works, in ``boot_s`` seconds from
        rent to registration) or gave up booting."""
        if error is None:
            self._failures_in_a_row.pop(pool, None)
            if boot_s is not None:
                self.boot_times_s.setdefault(pool, []).append(float(boot_s))
            return
        self._failures_in_a_row[pool] = self._failures_in_a_row.get(pool, 0) + 1
        self.boot_errors[instance] = error
        self._boot_errors_by_pool.setdefault(pool, []).append((instance, error))

    def boot_seconds(self, pool: str) -> float:
        """What booting an instance of ``pool`` costs, in seconds: the median of its measured
        boots (one slow host does not set it), or ``adapt.boot-estimate`` before the first."""
        times = self.boot_times_s.get(pool)
        return statistics.median(times) if times else float(option("adapt.boot-estimate"))

    def failures_in_a_row(self, pool: str) -> int:
        return self._failures_in_a_row.get(pool, 0)

    def failure_reasons(self, pool: str, last: int = 3) -> list[str]:
        """The last boot failures of ``pool`` since one of its instances registered, as lines."""
        count = min(last, self.failures_in_a_row(pool))
        errors = self._boot_errors_by_pool.get(pool, [])[-count:] if count else []
        return [f"{instance}: {error}" for instance, error in errors]

    def give_up_message(self, pool: str, why: str) -> str:
        """The sentence that says ``pool`` gave up, and its last boot failures."""
        reasons = self.failure_reasons(pool)
        return f"pool {pool!r} gave up: {why}" + (
            ". Its last boot failures:\n  " + "\n  ".join(reasons) if reasons else "")

    def first_give_up_warning(self, pool: str) -> bool:
        """True the first time ``pool``'s giving up is to be said (until :meth:`forgive`): said
        once, whether adapt() first stops renting while an instance still boots or only later."""
        if pool in self._warned_give_up:
            return False
        self._warned_give_up.add(pool)
        return True

    def give_up(self, pool: str, why: str) -> str:
        """Mark ``pool`` as given up (nothing will rent for it); the sentence that says so."""
        self.given_up[pool] = message = self.give_up_message(pool, why)
        return message

    def given_up_error(self, pools: Iterable[str]) -> BootFailed | None:
        """One error naming every given-up pool among ``pools`` and its reasons (None: none gave up)."""
        messages = [self.given_up[p] for p in pools if p in self.given_up]
        return BootFailed("\n".join(messages)) if messages else None

    def forgive(self, pool: str) -> None:
        """Forget a pool's failures in a row and its giving up (``adapt()``/``scale()``: a new chance)."""
        self._failures_in_a_row.pop(pool, None)
        self.given_up.pop(pool, None)
        self._warned_give_up.discard(pool)

    # -------------------------------------------------------- losses
    def note_loss(self, pool: str, kind: str) -> str | None:
        """Count a rental of ``pool`` lost after renting; a sentence when the pool now falls back."""
        losses = self.losses.setdefault(pool, PoolLosses())
        losses.lost += 1
        if kind != OUTBID:
            return None
        losses.preempted += 1
        losses.preempted_at.append(time.monotonic())
        if pool in self._falling_back or not self.falls_back(pool):
            return None
        self._falling_back.add(pool)
        count, window_s = _fallback_limits()
        return (f"pool {pool!r}: {losses.preemptions_within(window_s)} preemptions within {window_s / 60:g} min "
                f"(vastai.interruptible-fallback: {count}): its next rentals are on demand")

    def falls_back(self, pool: str) -> bool:
        """Whether an ``interruptible="fallback"`` pool rents on demand now (preempted too often)."""
        if pool not in self._pools or not self._pools[pool].fallback:
            return False
        count, window_s = _fallback_limits()
        falling = self.losses[pool].preemptions_within(window_s) >= count
        if not falling:
            self._falling_back.discard(pool)
        return falling

    def note_replacement(self, pool: str) -> None:
        self.losses.setdefault(pool, PoolLosses()).replaced += 1

    def note_on_demand(self, pool: str) -> None:
        self.losses.setdefault(pool, PoolLosses()).on_demand += 1


def _fallback_limits() -> tuple[int, float]:
    """``(preemptions, window in seconds)`` after which a fallback pool rents on demand."""
    return (int(option("interruptible-fallback.preemptions")),
            float(parse_timedelta(option("interruptible-fallback.window"), default="s")))


def impossible_message(restrictions: Mapping[str, float], pools: Iterable[Pool]) -> str:
    asked = ", ".join(f"{k}={v:g}" for k, v in sorted(restrictions.items()))
    have = "; ".join(p.describe() for p in pools) or "none"
    return (
        f"no pool of this cluster can run a task asking for {{{asked}}}. Pools: {have}. "
        f"Ask for resources a pool provides (GPU, CPU, MEMORY, {POOL_RESOURCE_PREFIX}<pool>), "
        "or add a pool with cluster.add_pool(name, gpu=..., num_gpus=...)."
    )


class ResourceGuard(SchedulerPlugin):
    """Fails tasks whose resources no pool can provide, or only pools that gave up.

    At once when they arrive; and when a pool gives up (:meth:`sweep`), the tasks already
    waiting that only it could run, with its boot failures as their error: distributed
    would leave them pending forever.
    """

    name = "dask-vastai-resource-guard"

    def __init__(
        self, scheduler: Any, pools: Callable[[], Iterable[Pool]],
        given_up: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        # Given here: Scheduler.add_plugin does not call start() on an in-process scheduler.
        self.scheduler = scheduler
        self._pools = pools
        self._given_up = given_up or dict

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "no-worker":
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or not ts.resource_restrictions:
            return
        error = self._error_for(ts.resource_restrictions)
        if error is not None:
            # Not from inside a transition: the scheduler is in the middle of one.
            asyncio.get_running_loop().call_soon(self._fail, key, error)

    def sweep(self) -> None:
        """Fail the waiting tasks that only pools that gave up could run (call on the loop).

        Said in one line naming them: the give-up itself was just said at WARNING with its
        reasons, which each task's error carries; repeating them per task buries them.
        """
        failed = [ts.key for ts in list(self.scheduler.unrunnable)
                  if ts.resource_restrictions and (error := self._error_for(ts.resource_restrictions)) is not None
                  and self._fail(ts.key, error, say=False)]
        if failed:
            logger.warning("failed %d waiting task(s) that only pools that gave up could run (their error says "
                           "why): %s", len(failed), textwrap.shorten(", ".join(map(str, failed)), 300, placeholder=" ..."))

    def _error_for(self, restrictions: Mapping[str, float]) -> Exception | None:
        pools = list(self._pools())
        able = [pool for pool in pools if pool.could_run(restrictions)]
        if not able:
            return ImpossibleResources(impossible_message(restrictions, pools))
        given_up = self._given_up()
        if all(pool.name in given_up for pool in able):
            asked = ", ".join(f"{k}={v:g}" for k, v in sorted(restrictions.items()))
            return BootFailed(
                f"no instance can run a task asking for {{{asked}}}: "
                + "\n".join(given_up[pool.name] for pool in able)
                + "\nFix the pool's options, then call cluster.scale() or cluster.adapt() again."
            )
        return None

    def _fail(self, key: Any, error: Exception, *, say: bool = True) -> bool:
        failed = fail_task(self.scheduler, key, error, states=("no-worker",), stimulus=f"dask-vastai-unrunnable-{key}")
        if failed and say:
            logger.warning("failing task %s: %s", key, error)
        return failed


def fail_task(scheduler: Any, key: Any, error: Exception, *, states: Sequence[str], stimulus: str) -> bool:
    """Err the task ``key`` with ``error`` (what its future raises) if it is in one of ``states``.

    Waiting tasks (``no-worker``, ``queued``) only: the scheduler's own transition to
    ``erred`` then also errs every task depending on it. Not to be called from inside a
    transition (a plugin's ``transition`` hook defers it with ``call_soon``). True when it
    erred the task.
    """
    ts = scheduler.tasks.get(key)
    if ts is None or ts.state not in states:
        return False
    text = str(error)
    recommendations = scheduler.transition(
        key, "erred", stimulus_id=stimulus, cause=key, exception=pickle.dumps(error), exception_text=text,
    )
    scheduler.transitions(recommendations, stimulus)
    return True


def instances_wanted(n: int | None, *, instances: int | None = None, jobs: int | None = None,
                     workers: int | None = None, workers_per_instance: int = 1) -> int:
    """The instance count that ``scale``'s one given spelling asks for.

    ``n``, ``instances`` and ``jobs`` (dask-jobqueue's word) count instances; ``workers`` counts
    workers and rounds up to whole instances of ``workers_per_instance``.
    """
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
        return math.ceil(int(value) / workers_per_instance)
    return int(value)
