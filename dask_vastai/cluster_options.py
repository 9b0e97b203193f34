"""The cluster-wide options of ``VastAICluster``: the one list of them, and reading them.

:class:`ClusterArguments` is that list (name, type, doc line each): ``VastAICluster``'s
signature and docstring are built from it. :meth:`ClusterOptions.read` takes those arguments, fills each missing one from
``vastai.yaml`` (``config.option``), checks them (a bad value fails at construction, named,
before anything is rented) and builds what they make: the Vast client, the cluster's SSH key
and CA, the pools with their onstart, the instances' environment and the scheduler's options.
The cluster keeps what this returns; nothing here starts or rents.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distributed.security import Security

from .bootstrap import BootstrapConfig, onstart_script
from .budget import SpendingCaps
from .config import documented, option, option_docs, option_parameters
from .environment import ClientEnvironment, InstanceEnvironment, python_option, split_env
from .pools import DEFAULT_POOL, PoolSet, PoolShape
from .roles import scheduler_gate
from .security import ClusterCA
from .tunnel import ClusterKey
from .vast import VastAPI


@dataclass(frozen=True, repr=False)  # holds api_key and secret_env as given: no repr
class ClusterArguments:
    """``VastAICluster``'s own options as given (None: the default in ``vastai.yaml``).

    The one list of them: each field's name, type and doc line make the parameter that
    ``inspect.signature(VastAICluster)`` (so ``help()``, IPython and notebooks) shows and the
    docstring's entry (:func:`cluster_parameters`, :meth:`docs`); :meth:`from_call` sorts a call's
    arguments into these and the shape options (:class:`PoolShape`), and
    :meth:`ClusterOptions.read` reads every field. Adding an option is one field here (and its
    default in ``vastai.yaml``). The signature is built rather than written out because the
    options would otherwise be written three times (the signature, the names read, the docs) and
    drift apart; the cost is that static type checkers see ``**options``.
    """

    n: int | None = documented(
        "instances to rent at start (``n_workers`` is an alias). ``n``, ``scale(n)`` and ``adapt()`` "
        "count instances, not workers: a K-GPU instance runs K workers.")
    n_workers: int | None = documented("an alias of ``n`` (distributed's name).")
    secret_env: Mapping[str, str] | None = documented(
        "environment that reaches the workers over SSH only (API tokens), never Vast.")
    packages: Sequence[str] | None = documented(
        "pip specifiers installed on every instance (only what differs); dask, distributed, "
        "cloudpickle and msgpack are always made equal to this client's versions.")
    pip_args: Sequence[str] | None = documented(
        'options for that install (``["--index-url", ...]``).')
    python: str | None = documented(
        '``"3.11"`` to have the onstart install that Python with uv (when the image\'s differs from '
        "this client's), or the path of the image's interpreter to use.")
    boot_timeout: float | None = documented("seconds from rent to registered worker.")
    orphan_timeout: float | None = documented(
        "seconds after which an instance that lost this client destroys itself.")
    api_key: str | None = documented("the Vast API key (default: ``VAST_API_KEY``).")
    api_url: str | None = documented("Vast's origin (default: https://console.vast.ai).")
    name: str | None = documented(
        "the cluster's name, in every rental's label ``dask-vastai:<name>:<worker>``.")
    allow_worker_clients: bool | None = documented(
        "let tasks submit tasks (``get_client()``/``worker_client()``, or a ``Future``, ``Event``, "
        "``Lock``, ``Queue`` or ``Variable`` used inside a task). Off by default: hosts then act only "
        "as workers. Turning it on lets every host run code on every other host and on this machine "
        "(the scheduler unpickles the task graphs a client sends), so turn it on only for hosts you "
        "trust as much as this machine.")
    max_cost: float | None = documented(
        "spending cap for the cluster's whole life, in dollars as Vast's meter counts them "
        "(``dph_total`` per second, storage included). Closing starts when the spend plus the $/h "
        "times the seconds to notice and destroy (``api-poll-interval`` + "
        "``spending.destroy-latency``) reaches it: every rental is destroyed, none is rented again, "
        "and waiting tasks fail with ``BudgetExhausted``. Holds for every rental: ``scale``, "
        "``adapt`` and replacements alike.")
    max_hourly: float | None = documented(
        "spending cap on the $/h of all rentals together; a rental that would pass it is refused "
        "(``BudgetExceeded``, naming the rate now), whether ``scale``, ``adapt`` or a replacement "
        "rents it.")
    dashboard_address: str | None = documented(
        "where the scheduler's dashboard listens; default ``127.0.0.1:0``, this machine only (it is "
        "unauthenticated and shows logs, call stacks and tracebacks).")
    scheduler_options: Mapping[str, Any] | None = documented(
        "more keyword arguments of the scheduler (distributed's ``Scheduler``).")
    quiet: bool = documented(
        "print nothing (no log lines, no boot progress); ``get_logs()`` still has the log.", default=False)
    silence_logs: str | int | bool | None = documented(
        "level below which distributed's own log lines are not printed while the cluster runs "
        '(``"warning"``, as ``LocalCluster``); False leaves distributed\'s logging as it is.')
    pools: Sequence[Mapping[str, Any]] | None = documented(
        'more instance shapes, e.g. ``[{"name": "a100", "gpu": "A100_SXM4", "cpu_ram": 64}]`` (the '
        "shape options below); the cluster's own shape options make the ``default`` pool.")

    #: the options a call may give by position, in order (``gpu`` is a shape option)
    POSITIONAL: ClassVar[tuple[str, ...]] = ("gpu", "n")

    @classmethod
    def docs(cls, indent: str = "    ") -> str:
        """The options' docs, numpydoc style, for ``VastAICluster``'s docstring."""
        return option_docs(cls, indent)

    @classmethod
    def from_call(
        cls, args: Sequence[Any], keywords: Mapping[str, Any], *, also: Iterable[str] = (),
    ) -> tuple[ClusterArguments, dict[str, Any]]:
        """``VastAICluster(*args, **keywords)`` sorted into these options and the shape options.

        ``also``: the other keywords the caller takes itself (distributed's). An unknown keyword is
        a ``ValueError`` naming it and the known names closest to it (a typo of an option would
        otherwise be a shape option nobody reads, or Python's bare ``unexpected keyword``).
        """
        known = {f.name for f in dataclasses.fields(cls)} | set(PoolShape.option_names()) | set(also)
        unknown = sorted(set(keywords) - known)
        if unknown:
            hints = "; ".join(
                f"{k!r}: did you mean {' or '.join(map(repr, close))}?"
                for k in unknown if (close := difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.75))
            )
            raise ValueError(
                f"VastAICluster: unknown option(s) {unknown}" + (f" ({hints})" if hints else "")
                + f"; known: {sorted(known)}"
            )
        try:
            bound = inspect.Signature(cluster_parameters()).bind(*args, **keywords)
        except TypeError as e:  # too many by position, or one option given twice
            raise TypeError(
                f"VastAICluster: {e}; only {' and '.join(cls.POSITIONAL)} may be given by position "
                "(VastAICluster(\"RTX_3090\", 2)), every other option by name"
            ) from None
        mine = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in bound.arguments.items() if k in mine}
        return cls(**given), {k: v for k, v in bound.arguments.items() if k not in mine}


def cluster_parameters() -> list[inspect.Parameter]:
    """``VastAICluster``'s parameters but ``self`` and distributed's: ``gpu`` and ``n`` by position
    (as in every example), then the other options and the shape options, keyword-only."""
    shape = {p.name: p for p in option_parameters(PoolShape)}
    mine = {p.name: p for p in option_parameters(ClusterArguments)}
    every = {**shape, **mine}
    positional = [every[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for name in ClusterArguments.POSITIONAL]
    rest = [p for name, p in {**mine, **shape}.items() if name not in ClusterArguments.POSITIONAL]
    return positional + rest


@dataclass(repr=False)  # holds the CA and the secret environment: no repr
class ClusterOptions:
    """What ``VastAICluster``'s options make, read and checked (see :meth:`read`)."""

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
    quiet: bool = False
    #: distributed's log level while the cluster runs (False: left as it is)
    silence_logs: str | int | bool | None = None

    @classmethod
    def read(cls, arguments: ClusterArguments, shape_options: Mapping[str, Any]) -> ClusterOptions:
        """Every option of ``arguments`` (each field is read) and the default pool's shape, checked."""
        a = arguments
        if a.n is not None and a.n_workers is not None and a.n != a.n_workers:
            raise ValueError(f"give n={a.n} or n_workers={a.n_workers}, not both")
        initial_n = int(option("n-workers", a.n if a.n is not None else a.n_workers) or 0)
        if initial_n < 0:
            raise ValueError(f"n={initial_n}: the number of instances cannot be negative")
        boot_timeout_s = float(option("boot-timeout", a.boot_timeout))
        orphan_timeout_s = float(option("orphan-timeout", a.orphan_timeout))
        if boot_timeout_s <= 0 or orphan_timeout_s <= 0:
            raise ValueError(
                f"boot_timeout={boot_timeout_s} and orphan_timeout={orphan_timeout_s} must be "
                "positive numbers of seconds"
            )
        caps = SpendingCaps.from_options(a.max_cost, a.max_hourly, check_interval_s=float(option("api-poll-interval")))
        cluster_name = option("name", a.name) or f"c{uuid.uuid4().hex[:8]}"
        if ":" in cluster_name or not cluster_name.strip():
            raise ValueError(f"name={cluster_name!r}: a cluster name cannot be empty or contain ':'")
        shape = PoolShape.from_options(shape_options, where="VastAICluster")
        # Built now so that a bad key/URL configuration fails here, not inside a batch.
        api = VastAPI(api_key=option("api-key", a.api_key), api_url=option("api-url", a.api_url))
        key = ClusterKey.generate(comment=f"dask-vastai-{cluster_name}")
        # Secret entries travel in the incarnation (SSH); only the rest goes to Vast.
        public_env, secret = split_env(shape.get("env"), option("secret-env", a.secret_env))
        client_env = ClientEnvironment.current(
            packages=list(option("packages", a.packages) or ()), pip_args=list(option("pip-args", a.pip_args) or ())
        )
        python_path, python_version = python_option(option("python", a.python), client_env)
        environment = InstanceEnvironment(client_env, image=str(shape.get("image")))
        bootstrap = BootstrapConfig(
            cluster_name=cluster_name, public_key=key.public_openssh, api_url=api.api_url,
            orphan_timeout_s=int(orphan_timeout_s), python=python_path, python_version=python_version,
        )
        # Validated here, as jobqueue renders job_script(): a bad option fails now.
        cuda = client_env.cuda  # a CUDA build of torch: offers whose driver supports its CUDA
        pool_set = PoolSet(cluster_name, onstart=onstart_script(bootstrap), min_cuda=str(cuda[0]) if cuda else None)
        pool_set.add(DEFAULT_POOL, PoolShape(**{**shape.options(), "env": public_env}))
        for extra in a.pools or ():
            extra = dict(extra)
            pool_name = extra.pop("name", None)
            if not pool_name:
                raise ValueError(f"pools=[...{extra}...]: every pool needs a 'name'")
            pool_set.add(str(pool_name), PoolShape.from_options(extra, where=f"pool {pool_name!r}"))
        worker_clients = bool(option("allow-worker-clients", a.allow_worker_clients))
        certificates = ClusterCA(cluster_name, lifetime_days=float(option("certificate-lifetime-days")))
        security = certificates.security()
        scheduler_opts: dict[str, Any] = {
            "protocol": "tls", "host": "127.0.0.1", "port": 0,
            "dashboard_address": option("dashboard-address", a.dashboard_address),
            "security": security,
            "gate": scheduler_gate(worker_clients=worker_clients, is_current=certificates.is_current),
            **dict(a.scheduler_options or {}),
        }
        # Refuses a worker whose versions differ from this client's; warns of late imports.
        scheduler_opts["plugins"] = [*scheduler_opts.get("plugins", ()), *environment.scheduler_plugins]
        return cls(
            name=cluster_name, initial_n=initial_n, boot_timeout_s=boot_timeout_s, orphan_timeout_s=orphan_timeout_s,
            caps=caps, api=api, key=key, pools=pool_set, environment=environment, bootstrap=bootstrap,
            allow_worker_clients=worker_clients, certificates=certificates, security=security,
            secret_env=secret, scheduler_options=scheduler_opts, quiet=a.quiet,
            silence_logs=option("silence-logs", a.silence_logs),
        )
