"""The cluster-wide options of ``VastAICluster``: their documentation, and reading them.

:meth:`ClusterOptions.read` takes ``VastAICluster``'s arguments, fills each missing one from
``vastai.yaml`` (``config.option``), checks them (a bad value fails at construction, named,
before anything is rented) and builds what they make: the Vast client, the cluster's SSH key
and CA, the pools with their onstart, the instances' environment and the scheduler's options.
The cluster keeps what this returns; nothing here starts or rents.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distributed.security import Security

from .bootstrap import BootstrapConfig, onstart_script
from .budget import SpendingCaps
from .config import option
from .environment import ClientEnvironment, InstanceEnvironment, python_option, split_env
from .pools import DEFAULT_POOL, PoolSet, PoolShape
from .roles import scheduler_gate
from .security import ClusterCA
from .tunnel import ClusterKey
from .vast import VastAPI

CLUSTER_OPTIONS_DOC = """\
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


@dataclass(repr=False)  # holds the CA and the secret environment: no repr
class ClusterOptions:
    """What ``VastAICluster``'s options make, read and checked (see :meth:`read`)."""

    #: the arguments of ``VastAICluster.__init__`` that :meth:`read` takes by name
    ARGUMENTS = frozenset({
        "gpu", "n", "n_workers", "secret_env", "packages", "pip_args", "python", "boot_timeout",
        "orphan_timeout", "api_key", "api_url", "name", "allow_worker_clients", "pools", "max_cost",
        "max_hourly", "dashboard_address", "scheduler_options",
    })

    name: str
    initial_n: int
    boot_timeout_s: float
    orphan_timeout_s: float
    caps: SpendingCaps | None
    api: VastAPI
    key: ClusterKey
    pools: PoolSet
    environment: InstanceEnvironment
    bootstrap: BootstrapConfig
    allow_worker_clients: bool
    certificates: ClusterCA
    security: Security
    #: the secret part of ``env``/``secret_env``: travels over SSH only, never to Vast
    secret_env: dict[str, str] = field(default_factory=dict)
    scheduler_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(
        cls, *, gpu: str | Sequence[str] | None = None, n: int | None = None, n_workers: int | None = None,
        secret_env: Mapping[str, str] | None = None, packages: Sequence[str] | None = None,
        pip_args: Sequence[str] | None = None, python: str | None = None, boot_timeout: float | None = None,
        orphan_timeout: float | None = None, api_key: str | None = None, api_url: str | None = None,
        name: str | None = None, allow_worker_clients: bool | None = None,
        pools: Sequence[Mapping[str, Any]] | None = None, max_cost: float | None = None,
        max_hourly: float | None = None, dashboard_address: str | None = None,
        scheduler_options: Mapping[str, Any] | None = None, shape_options: Mapping[str, Any] | None = None,
    ) -> ClusterOptions:
        if n is not None and n_workers is not None and n != n_workers:
            raise ValueError(f"give n={n} or n_workers={n_workers}, not both")
        initial_n = int(option("n-workers", n if n is not None else n_workers) or 0)
        if initial_n < 0:
            raise ValueError(f"n={initial_n}: the number of instances cannot be negative")
        boot_timeout_s = float(option("boot-timeout", boot_timeout))
        orphan_timeout_s = float(option("orphan-timeout", orphan_timeout))
        if boot_timeout_s <= 0 or orphan_timeout_s <= 0:
            raise ValueError(
                f"boot_timeout={boot_timeout_s} and orphan_timeout={orphan_timeout_s} must be "
                "positive numbers of seconds"
            )
        caps = SpendingCaps.from_options(max_cost, max_hourly, check_interval_s=float(option("api-poll-interval")))
        cluster_name = option("name", name) or f"c{uuid.uuid4().hex[:8]}"
        if ":" in cluster_name or not cluster_name.strip():
            raise ValueError(f"name={cluster_name!r}: a cluster name cannot be empty or contain ':'")
        shape = PoolShape.from_options({"gpu": gpu, **dict(shape_options or {})}, where="VastAICluster")
        # Built now so that a bad key/URL configuration fails here, not inside a batch.
        api = VastAPI(api_key=option("api-key", api_key), api_url=option("api-url", api_url))
        key = ClusterKey.generate(comment=f"dask-vastai-{cluster_name}")
        # Secret entries travel in the incarnation (SSH); only the rest goes to Vast.
        public_env, secret = split_env(shape.get("env"), option("secret-env", secret_env))
        client_env = ClientEnvironment.current(
            packages=list(option("packages", packages) or ()), pip_args=list(option("pip-args", pip_args) or ())
        )
        python_path, python_version = python_option(option("python", python), client_env)
        environment = InstanceEnvironment(client_env, image=str(shape.get("image")))
        bootstrap = BootstrapConfig(
            cluster_name=cluster_name, public_key=key.public_openssh, api_url=api.api_url,
            orphan_timeout_s=int(orphan_timeout_s), python=python_path, python_version=python_version,
        )
        # Validated here, as jobqueue renders job_script(): a bad option fails now.
        cuda = client_env.cuda  # a CUDA build of torch: offers whose driver supports its CUDA
        pool_set = PoolSet(cluster_name, onstart=onstart_script(bootstrap), min_cuda=str(cuda[0]) if cuda else None)
        pool_set.add(DEFAULT_POOL, PoolShape(**{**shape.options(), "env": public_env}))
        for extra in pools or ():
            extra = dict(extra)
            pool_name = extra.pop("name", None)
            if not pool_name:
                raise ValueError(f"pools=[...{extra}...]: every pool needs a 'name'")
            pool_set.add(str(pool_name), PoolShape.from_options(extra, where=f"pool {pool_name!r}"))
        worker_clients = bool(option("allow-worker-clients", allow_worker_clients))
        certificates = ClusterCA(cluster_name, lifetime_days=float(option("certificate-lifetime-days")))
        security = certificates.security()
        scheduler_opts: dict[str, Any] = {
            "protocol": "tls", "host": "127.0.0.1", "port": 0,
            "dashboard_address": option("dashboard-address", dashboard_address),
            "security": security,
            "gate": scheduler_gate(worker_clients=worker_clients, is_current=certificates.is_current),
            **dict(scheduler_options or {}),
        }
        # Refuses a worker whose versions differ from this client's; warns of late imports.
        scheduler_opts["plugins"] = [*scheduler_opts.get("plugins", ()), *environment.scheduler_plugins]
        return cls(
            name=cluster_name, initial_n=initial_n, boot_timeout_s=boot_timeout_s, orphan_timeout_s=orphan_timeout_s,
            caps=caps, api=api, key=key, pools=pool_set, environment=environment, bootstrap=bootstrap,
            allow_worker_clients=worker_clients, certificates=certificates, security=security,
            secret_env=secret, scheduler_options=scheduler_opts,
        )
