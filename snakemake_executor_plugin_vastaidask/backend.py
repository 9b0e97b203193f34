"""Where the jobs run: an existing Dask scheduler, or rented Vast instances.

The executor needs three things from it: a ``distributed.Client``, how many GPU slots
exist or are on their way (to pace the hand-off of jobs), and a ``close()`` that leaves
nothing billing. dask-vastai is used only through its public API (``VastAICluster``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import threading
from typing import Any

from .settings import NETWORK_CHOICES, ExecutorSettings

logger = logging.getLogger(__name__)

#: resources a dask-vastai worker advertises; an attached cluster may have fewer
RESOURCE_NAMES = ("GPU", "CPU", "MEMORY")
#: seconds between two decisions of each pool's adaptive policy
ADAPT_INTERVAL_S = 1.0


def job_packages() -> list[str]:
    """Pins the instances need to run ``python -m snakemake ... --mode remote`` as this client does.

    The job command carries flags of this snakemake version and ``--storage-*`` flags of
    every storage plugin installed here, so the same versions go to the instances (the
    environment sync installs only what differs).
    """
    from importlib import metadata

    pins = []
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == "snakemake" or name.startswith(("snakemake-interface-", "snakemake-storage-plugin-")):
            pins.append(f"{name}=={dist.version}")
    return sorted(set(pins))


#: schemes whose connections are authenticated and encrypted (Dask's tls, and websockets over TLS)
SECURE_SCHEMES = ("tls", "wss")


def refuse_credentials_in_clear(address: str, *, storage_mode: bool, env_names: list[str]) -> None:
    """Raise a ``WorkflowError`` (one sentence, no traceback) when credentials would travel
    unencrypted to an attached scheduler.

    Every job carries its environment (snakemake's ``envvars``, storage plugins' secrets)
    to the scheduler and a worker; over ``tcp://`` anyone on the path reads it. A plain
    workflow without either may still use ``tcp://``.
    """
    scheme = address.split("://", 1)[0].lower() if "://" in address else "tcp"
    if scheme in SECURE_SCHEMES:
        return
    what = []
    if storage_mode:
        what.append("the storage provider's settings and credentials (--default-storage-provider)")
    if env_names:
        what.append(f"the jobs' environment ({', '.join(env_names)})")
    if what:
        from snakemake_interface_common.exceptions import WorkflowError

        raise WorkflowError(
            f"--vastaidask-scheduler-address={address} is {scheme}://, which is neither authenticated nor "
            f"encrypted, and every job would send {' and '.join(what)} over it. Give the scheduler's "
            "tls:// address (with the dask config distributed.comm.tls.* naming the CA and this client's "
            "certificate), or leave out --vastaidask-scheduler-address to rent instances"
        )


#: ``dask_vastai.PoolShape`` option -> the setting (``--vastaidask-<setting>``) that gives it
SHAPE_SETTINGS = {
    "gpu": "gpu",
    "num_gpus": "num_gpus",
    "max_price": "max_price",
    "region": "region",
    "interruptible": "interruptible",
    "bid": "bid",
    "image": "image",
    "disk": "disk",
    "reliability": "reliability",
    "order": "order",
    "query": "vastai_query",
    "datacenter": "no_datacenter",
    "network": "network",
}
#: VastAICluster option -> setting, for the options that are not shape options
CLUSTER_SETTINGS = {
    "n": "min_instances", "boot_timeout": "boot_timeout", "orphan_timeout": "orphan_timeout",
    "api_url": "api_url", "api_key": "api_key", "max_cost": "max_cost", "max_hourly": "max_hourly",
}
#: shape option -> the per-rule resource that overrides it
RULE_RESOURCES = {"gpu": "gpu_model", "query": "vastai_query", "disk": "disk_mb"}


def idle_wait_count(settings: ExecutorSettings) -> int | None:
    """``--vastaidask-idle-timeout`` in adapt intervals; None leaves dask-vastai's break-even
    (an idle instance goes once idle as long as its pool takes to boot)."""
    if settings.idle_timeout is None:
        return None
    return max(1, round(settings.idle_timeout / ADAPT_INTERVAL_S))


def pool_shape(settings: ExecutorSettings, **overrides: Any) -> dict[str, Any]:
    """The instance-shape options of ``dask_vastai.PoolShape`` the settings ask for.

    The one mapping of ``--vastaidask-*`` flags onto shapes, for the cluster's default pool
    and for every per-rule pool (``overrides``: a rule's ``gpu_model``, query, GPU count, disk).
    Unset settings stay out, so dask-vastai's defaults apply.
    """
    shape: dict[str, Any] = {option: getattr(settings, name) for option, name in SHAPE_SETTINGS.items()}
    shape["datacenter"] = False if settings.no_datacenter else None
    shape.update({k: v for k, v in overrides.items() if v is not None})
    return {k: v for k, v in shape.items() if v is not None}


def check_network(settings: ExecutorSettings) -> None:
    """``ValueError`` naming ``--vastaidask-network``'s value and its choices when it is none of them
    (argparse checks the flag itself; a profile's or an API caller's value arrives unchecked)."""
    if settings.network is not None and settings.network not in NETWORK_CHOICES:
        raise ValueError(
            f"--vastaidask-network={settings.network!r} is not a network mode: give one of "
            f"{', '.join(NETWORK_CHOICES)}, or leave it out to use the dask config's vastai.network"
        )


def flag(setting: str) -> str:
    """``--vastaidask-api-key`` for ``api_key``."""
    return "--vastaidask-" + setting.replace("_", "-")


def flag_and_env(setting: str) -> str:
    """The flag, and the environment variable where the setting has one."""
    from dataclasses import fields

    env = {f.name for f in fields(ExecutorSettings) if f.metadata.get("env_var")}
    return flag(setting) + (f" or SNAKEMAKE_VASTAIDASK_{setting.upper()}" if setting in env else "")


def given_flags(settings: ExecutorSettings) -> str:
    """The shape flags this run was given, as a user would type them."""
    out = []
    for name in SHAPE_SETTINGS.values():
        value = getattr(settings, name)
        if value is True:
            out.append(flag(name))
        elif value is not None and value is not False:
            out.append(f"{flag(name)}={value}")
    return " ".join(out)


#: quoted offer queries (``query: gpu_name=... num_gpus=1``): their ``name=`` are Vast's, kept
_QUERY_SEGMENT = re.compile(r"((?:query|sent): [^\n)]*)")


def with_flag_names(text: str, *, rule: bool = False) -> str:
    """``text`` with dask-vastai's option names (``max_price=``) written as the flags that set them.

    With ``rule=True`` the options a rule's resources override name those resources instead.
    Offer queries quoted in ``text`` keep Vast's field names.
    """
    names = {k: v for k, v in {**CLUSTER_SETTINGS, **SHAPE_SETTINGS}.items() if k != "datacenter"}
    pattern = re.compile(r"(?<![\w-])(" + "|".join(sorted(names, key=len, reverse=True)) + r")=")

    def replace(match: re.Match[str]) -> str:
        option = match.group(1)
        if rule and option in RULE_RESOURCES:
            return f"resources {RULE_RESOURCES[option]}="
        return flag(names[option]) + "="

    def translate(segment: str) -> str:
        segment = segment.replace("datacenter=True", f"datacenter hosts only (the default; {flag('no_datacenter')} widens it)")
        return pattern.sub(replace, segment)

    parts = _QUERY_SEGMENT.split(text)
    return "".join(part if k % 2 else translate(part) for k, part in enumerate(parts))


def configuration_error(error: BaseException, settings: ExecutorSettings) -> Exception:
    """A ``WorkflowError`` that says in a sentence which flag (and variable) to fix, or ``error``.

    Snakemake prints a ``WorkflowError``'s message without the ~40-line traceback, and users
    set ``--vastaidask-*`` flags, not Python arguments.
    """
    from snakemake_interface_common.exceptions import WorkflowError

    from dask_vastai import (
        DaskVastAIError,
        InvalidAPIKey,
        MissingAPIKey,
        NoOfferAvailable,
        VastUnreachable,
    )

    if isinstance(error, MissingAPIKey):
        return WorkflowError(
            "No Vast API key: export SNAKEMAKE_VASTAIDASK_API_KEY or VAST_API_KEY (or give "
            f"{flag('api_key')}, which other users of this machine can see in ps), made at "
            "https://cloud.vast.ai/manage-keys/, or try everything for free against `dask-vastai emulator`."
        )
    if isinstance(error, InvalidAPIKey):
        where = settings.api_url or "the Vast API"
        why = error.msg or str(error)
        return WorkflowError(
            f"{where} rejected the API key of {flag_and_env('api_key')} (else VAST_API_KEY): {why}"
            + ("" if error.msg is None else
               f"; check the key at https://cloud.vast.ai/manage-keys/, and {flag_and_env('api_url')} "
               "when the key is an emulator's.")
        )
    if isinstance(error, VastUnreachable):
        return WorkflowError(f"{with_flag_names(str(error))} (the API origin is {flag_and_env('api_url')})")
    if isinstance(error, NoOfferAvailable | DaskVastAIError | ValueError):
        return WorkflowError(with_flag_names(str(error)))
    if settings.scheduler_address is not None and isinstance(error, OSError | TimeoutError):
        return WorkflowError(
            f"Could not reach the Dask scheduler at {flag('scheduler_address')}={settings.scheduler_address}: "
            f"{error}"
        )
    return error


def quiet_dask_logs(quiet: bool) -> None:
    """distributed's INFO lines at WARNING (``quiet``), or as configured.

    Called after ``import distributed``, which sets its loggers' levels from the dask config.
    """
    import distributed  # noqa: F401  (configures its logging at import)

    if quiet:
        logging.getLogger("distributed").setLevel(logging.WARNING)


class DaskBackend:
    """Where the jobs run: a Dask client plus, in renting mode, the ``VastAICluster`` it talks to."""

    def __init__(self, settings: ExecutorSettings, run_name: str, *, verbose: bool = False) -> None:
        from distributed import Client

        self.settings = settings
        self.cluster: Any = None
        self.renting = settings.scheduler_address is None
        self._pools_lock = threading.Lock()
        self._closed = False
        check_network(settings)
        if not self.renting:
            if settings.network is not None:
                logger.warning("--vastaidask-network=%s is left unused: the workers of the cluster at "
                               "--vastaidask-scheduler-address keep their own addresses", settings.network)
            self.client = Client(settings.scheduler_address, timeout="30s", set_as_default=False)
            return
        from dask_vastai import NoOfferAvailable, VastAICluster

        if settings.api_key and os.environ.get("SNAKEMAKE_VASTAIDASK_API_KEY") != settings.api_key:
            logger.warning(
                "--vastaidask-api-key puts your Vast API key where every user of this machine can read it "
                "(ps) and in your shell history; export VAST_API_KEY (or SNAKEMAKE_VASTAIDASK_API_KEY) instead"
            )
        minimum = max(0, int(settings.min_instances))
        maximum = max(minimum, int(settings.max_instances))
        if maximum < 1:
            raise ValueError(
                f"--vastaidask-max-instances={settings.max_instances}: at least one instance is "
                "needed to run jobs; raise it, or give --vastaidask-scheduler-address"
            )
        self.cluster = VastAICluster(
            n=minimum,
            boot_timeout=settings.boot_timeout,
            orphan_timeout=settings.orphan_timeout,
            max_cost=settings.max_cost,
            max_hourly=settings.max_hourly,
            packages=job_packages(),
            api_url=settings.api_url,
            api_key=settings.api_key,
            name=run_name,
            # The executor reports rentals and boot phases through Snakemake's logger; the
            # cluster's own display would write around it. --verbose: distributed's INFO too.
            quiet=True,
            silence_logs=False if verbose else None,
            **pool_shape(settings),
        )
        try:
            # Validated now, before any job is staged: a query nothing matches fails the run
            # with the flags to relax, not each job after its instance never came.
            preview = self.cluster.offers()
            if not preview.offers:
                raise NoOfferAvailable(
                    f"No Vast offer matches {given_flags(settings) or 'the defaults'} "
                    f"(query: {preview.query_text}); relax "
                    "them (--vastaidask-max-price, --vastaidask-region, --vastaidask-reliability, "
                    "--vastaidask-gpu, --vastaidask-vastai-query), and see what is offered with "
                    "`dask-vastai offers`, which takes the same options."
                )
            self.cluster.adapt(
                minimum=maximum if settings.keep_instances else minimum,
                maximum=maximum,
                interval=f"{ADAPT_INTERVAL_S}s",
                wait_count=idle_wait_count(settings),
            )
            self.client = Client(self.cluster, set_as_default=False)
        except BaseException:
            self.cluster.close()
            raise

    # ----------------------------------------------------------------- pools
    def pool_resource(
        self, gpu_model: str | None, query: str | None, gpus: float = 1, disk_gb: float | None = None,
    ) -> dict[str, float]:
        """The resource that sends a job to the pool of its instance shape (renting mode).

        A rule's ``gpu_model`` / ``vastai_query`` differing from the executor's defaults, or a
        ``disk_mb`` beyond the default pool's disk, gets its own pool (created on first use,
        adapting between 0 and max-instances); the default shape needs no resource: its jobs
        go to the cluster's default pool.
        """
        if self.cluster is None:
            if gpu_model or query:
                logger.warning(
                    "gpu_model/vastai_query resources are ignored with --vastaidask-scheduler-address: "
                    "the attached cluster's workers are what they are"
                )
            return {}
        model = gpu_model or self.settings.gpu
        extra = query if query is not None else self.settings.vastai_query
        # A job needing several GPUs gets instances with that many, held by one worker.
        multi = int(gpus) if gpus > 1 else None
        # Whole GB, and only beyond the default pool's disk: every rule gets Snakemake's small
        # default disk_mb, which the default pool already covers.
        disk = math.ceil(disk_gb) if disk_gb and disk_gb > self.cluster.pools.default.requirements.disk_gb else None
        if model == self.settings.gpu and extra == self.settings.vastai_query and multi is None and disk is None:
            return {}
        digest = hashlib.sha1(f"{model}|{extra}|{multi}|{disk}".encode()).hexdigest()[:6]
        label = f"{model or 'any'}" + (f"-x{multi}" if multi else "") + (f"-{disk}gb" if disk else "")
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40] + f"-{digest}"
        with self._pools_lock:
            if name not in self.cluster.pools:
                try:
                    self.cluster.add_pool(name, **pool_shape(
                        self.settings, gpu=model, query=extra, disk=disk,
                        num_gpus=multi, worker_per_gpu=False if multi else None,
                    ))
                except ValueError as e:
                    raise ValueError(with_flag_names(str(e), rule=True)) from None
                self.cluster.adapt(
                    minimum=0, maximum=max(1, int(self.settings.max_instances)), pool=name,
                    interval=f"{ADAPT_INTERVAL_S}s",
                    wait_count=idle_wait_count(self.settings),
                )
        return {self.cluster.pools[name].resource_name: 1.0}

    # ---------------------------------------------------------------- facts
    def instances(self) -> list[dict[str, Any]]:
        """The cluster's rentals (``VastAICluster.instances``), read on its event loop; [] when attached."""
        if self.cluster is None:
            return []
        cluster = self.cluster
        if self._closed:
            return list(cluster.instances)  # its loop has stopped: nothing changes them any more

        async def rows() -> list[dict[str, Any]]:
            return list(cluster.instances)

        return cluster.sync(rows)

    @property
    def cost_usd(self) -> float:
        """Dollars the rentals cost (all of them, once closed); 0 when attached."""
        return float(self.cluster.cost) if self.cluster is not None else 0.0

    @property
    def bandwidth_usd(self) -> float:
        """The part of :attr:`cost_usd` that is bandwidth (bytes in and out at each offer's rates)."""
        return float(self.cluster.bandwidth_cost) if self.cluster is not None else 0.0

    def losses(self) -> str:
        """What became of the rentals lost after renting, per pool (``"default: 1 preempted, 1
        replaced"``; the pool's name only when several pools lost some); "" when none was lost."""
        if self.cluster is None:
            return ""
        lost = {pool: losses.text() for pool, losses in self.cluster.losses.items() if losses}
        if len(lost) == 1:
            return next(iter(lost.values()))
        return "; ".join(f"pool {pool}: {text}" for pool, text in lost.items())

    def workers(self) -> dict[str, dict[str, Any]]:
        return dict(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def gpu_slots(self) -> float:
        """GPUs registered, or rented and booting (renting mode), whichever is larger."""
        registered = sum(float(w.get("resources", {}).get("GPU", 0)) for w in self.workers().values())
        if self.cluster is None:
            return registered
        # Each pool's instances count with that pool's GPUs (a 2-GPU pool plans 2 per instance).
        planned = float(sum(self.cluster.planned_gpus().values()))
        return max(registered, planned)

    def impossible(self, resources: dict[str, float]) -> str | None:
        """Why no worker can ever run a task needing ``resources``, or None when one can (or may)."""
        if self.cluster is not None:
            # The cluster's own resource guard fails a task no pool can ever run, at once.
            return None
        workers = self.workers()
        if not workers:
            return None  # cannot tell yet
        for w in workers.values():
            have = w.get("resources", {})
            if all(have.get(name, 0) >= amount for name, amount in resources.items()):
                return None
        shapes = sorted({str(w.get("resources", {})) for w in workers.values()})
        return (
            f"no worker of the cluster at {self.settings.scheduler_address} has resources {resources}; "
            f"the workers advertise {', '.join(shapes)}. Start workers with e.g. "
            "`dask worker --resources 'GPU=1 CPU=8 MEMORY=32e9'`, or lower the rule's resources"
        )

    def advertised(self) -> set[str] | None:
        """Resource names some worker advertises (None in renting mode: all of them, once booted)."""
        if self.cluster is not None:
            return None
        names: set[str] = set()
        for w in self.workers().values():
            names.update(w.get("resources", {}))
        return names

    # --------------------------------------------------------------- close
    def close(self) -> None:
        """Close the client; in renting mode close the cluster, which destroys every rental."""
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        if self.cluster is not None:
            self.cluster.close()
        self._closed = True
