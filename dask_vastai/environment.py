"""The workers' environment, seen from the client: what must match, what must travel.

Dask breaks in obscure ways when the client and its workers differ (a pickling error
hours into a run), so before any worker starts on an instance the client

* compares the instance's Python (minor) and its ``dask``, ``distributed``,
  ``cloudpickle`` and ``msgpack`` with its own, installs what differs and the user's
  ``packages`` (``uv pip`` when the image has uv, else ``pip``), and refuses an instance
  whose Python differs, naming both versions and the fixes;
* ships what no index can install: the user's local and editable packages and modules
  (``mylib.py`` next to the script, a development checkout of dask-vastai itself) and its
  non-default dask config, as one archive over SFTP, unpacked into a folder that the
  incarnation puts first on the worker's ``PYTHONPATH``;
* keeps secrets (``Secret`` values in ``env``, ``secret_env``) out of what Vast stores:
  they travel inside the incarnation file, over SSH.

A scheduler plugin (:class:`VersionGate`) checks every worker again when it registers, as
``Client.get_versions`` would, and closes a mismatched one instead of admitting it.

The common case (the image already matches) costs the probe that runs anyway and no
install; in the emulator the sandbox sees the client's own interpreter, so that is the
path taken there, while the development checkout is hidden and so is shipped.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import hashlib
import io
import json
import logging
import os
import shlex
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from . import _testing
from .exceptions import EnvironmentMismatch

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

    from .tunnel import InstanceLink

logger = logging.getLogger(__name__)

#: What must equal the client's on every worker (with Python's minor version): the packages
#: that serialize what travels between client, scheduler and workers.
SYNCED_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack")
#: Where the shipped archive is unpacked on the instance (one folder per archive digest).
SHIP_DIR = "/root/.dask-vastai/ship"
#: Files bigger than this are left out of a shipped package (with a warning): data files in
#: a source tree should not ride along with every boot.
MAX_SHIPPED_FILE_BYTES = 20 * 2**20
#: A shipment this big is worth a warning: it is uploaded to every instance at every boot.
LARGE_SHIPMENT_BYTES = 64 * 2**20
#: Config sections never shipped: ours holds the Vast API key, which never leaves this machine.
PRIVATE_CONFIG_SECTIONS = ("vastai",)
_SKIPPED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


# ------------------------------------------------------------------------------ secrets
class Secret:
    """An ``env`` value that must never be stored by Vast: it reaches workers over SSH only.

    ``VastAICluster(env={"WANDB_API_KEY": Secret(key)})``. Its repr and str hide the value,
    so it does not leak into logs or tracebacks either; ``reveal()`` gives it back.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)

    def reveal(self) -> str:
        """The secret value (what the worker's environment gets)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def split_env(
    env: Mapping[str, Any] | None, secret_env: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """``(public, secret)``: public entries go into Vast's create request, secret ones over SSH.

    Entries of ``env`` wrapped in :class:`Secret` and every entry of ``secret_env`` are secret.
    A name in both is an error: which value should win would be a guess.
    """
    public: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, value in dict(env or {}).items():
        if isinstance(value, Secret):
            secret[str(name)] = value.reveal()
        else:
            public[str(name)] = str(value)
    for name, value in dict(secret_env or {}).items():
        if str(name) in public or str(name) in secret:
            raise ValueError(
                f"{name!r} is in both env and secret_env; give it once (in secret_env, or as "
                f"env={{{name!r}: Secret(...)}})"
            )
        secret[str(name)] = value.reveal() if isinstance(value, Secret) else str(value)
    return public, secret


# ------------------------------------------------------------------------------ versions
def python_minor(version: str) -> str:
    """``"3.11"`` from ``"3.11.7"`` or distributed's ``"3.11.7.final.0"``."""
    return ".".join(str(version).split(".")[:2])


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class ClientEnvironment:
    """What the client runs: the versions every worker must share, and what the user adds."""

    python: str
    versions: Mapping[str, str | None]
    packages: tuple[str, ...] = ()
    pip_args: tuple[str, ...] = ()

    @classmethod
    def current(cls, packages: Sequence[str] = (), pip_args: Sequence[str] = ()) -> ClientEnvironment:
        """This process's environment, plus the user's extra ``packages`` and ``pip_args``."""
        if isinstance(packages, str) or isinstance(pip_args, str):
            raise TypeError(
                f"packages={packages!r} and pip_args={pip_args!r} must be lists of strings, "
                "e.g. packages=['xgboost==2.1.0'], pip_args=['--index-url', 'https://...']"
            )
        for spec in packages:
            _requirement_name(spec)  # a bad specifier fails here, at construction
        return cls(
            python="%d.%d.%d" % sys.version_info[:3],  # noqa: UP031 - the form platform uses
            versions={name: _version(name) for name in SYNCED_PACKAGES},
            packages=tuple(str(p) for p in packages),
            pip_args=tuple(str(a) for a in pip_args),
        )

    @property
    def python_minor(self) -> str:
        return python_minor(self.python)

    def probe_names(self) -> list[str]:
        """Distributions whose installed versions the probe must report."""
        names = [*SYNCED_PACKAGES, "dask-vastai"]
        for spec in self.packages:
            name = _requirement_name(spec)
            if name and name not in names:
                names.append(name)
        return names


def python_option(value: str | None, client: ClientEnvironment) -> tuple[str | None, str | None]:
    """``(interpreter path, version to install)`` from the ``python`` option.

    ``"3.11"`` asks the onstart to install that Python with uv; it must be this client's
    minor version (functions pickled here carry its bytecode). Anything else is the path or
    name of the image's interpreter to use.
    """
    if value is None or str(value).strip() == "":
        return None, None
    text = str(value).strip()
    parts = text.split(".")
    if all(p.isdigit() for p in parts) and len(parts) in (2, 3):
        if python_minor(text) != client.python_minor:
            raise ValueError(
                f"python={text!r}, but this client runs Python {client.python}: workers must run the "
                f"client's minor version. Pass python={client.python_minor!r}, or run the client under "
                f"Python {python_minor(text)}"
            )
        return None, python_minor(text)
    if any(c.isspace() for c in text):
        raise ValueError(f"python={text!r}: give a version such as '3.11' or an interpreter path without spaces")
    return text, None


def _requirement_name(spec: str) -> str | None:
    """The distribution a pip specifier names; None for URLs and paths (always installed)."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = str(spec).strip()
    if not text:
        raise ValueError("packages holds an empty string; give pip specifiers such as 'xgboost>=2'")
    if "://" in text or text.startswith((".", "/", "-")):
        if text.startswith("-"):
            raise ValueError(f"packages={text!r} looks like a pip option; put options in pip_args")
        return None
    try:
        return Requirement(text).name
    except InvalidRequirement as e:
        raise ValueError(f"packages holds {text!r}, which pip cannot read: {e}") from e


def python_mismatch_message(client_python: str, instance_python: str, image: str | None = None) -> str:
    """The error for an instance whose Python minor differs: both versions and the two fixes."""
    minor = python_minor(client_python)
    on = f" (image {image!r})" if image else ""
    return (
        f"the instance runs Python {instance_python}{on} but this client runs Python {client_python}; "
        f"functions pickled here carry Python {minor} bytecode, so workers must run Python {minor}. "
        f"Fix: use an image whose python3 is {minor} (image=...), or pass python={minor!r} so that "
        f"the onstart installs Python {minor} with uv and the packages into it (a longer boot)"
    )


def check_python(client: ClientEnvironment, instance_python: str, image: str | None = None) -> None:
    """Raise :class:`EnvironmentMismatch` when the instance's Python minor is not the client's."""
    if python_minor(instance_python) != client.python_minor:
        raise EnvironmentMismatch(python_mismatch_message(client.python, instance_python, image))


def packages_to_install(client: ClientEnvironment, installed: Mapping[str, str | None]) -> list[str]:
    """The pip specifiers that would make the instance match: only what differs.

    The synced packages are pinned to the client's versions; the user's ``packages`` are
    kept as written and skipped when the installed version already satisfies them.
    """
    from packaging.requirements import Requirement

    specs = []
    for name in SYNCED_PACKAGES:
        want = client.versions.get(name)
        if want is not None and installed.get(name) != want:
            specs.append(f"{name}=={want}")
    for spec in client.packages:
        name = _requirement_name(spec)
        if name is None:
            specs.append(spec)
            continue
        have = installed.get(name)
        req = Requirement(spec)
        if have is None or req.url or not req.specifier.contains(have, prereleases=True):
            specs.append(spec)
    return specs


def version_mismatches(
    client: ClientEnvironment, worker: Mapping[str, str | None], who: str = "worker"
) -> list[str]:
    """One line per difference that matters (Python minor, synced packages); [] when in step."""
    lines = []
    worker_python = worker.get("python")
    if worker_python and python_minor(worker_python) != client.python_minor:
        lines.append(f"python: client {client.python}, {who} {worker_python}")
    for name in SYNCED_PACKAGES:
        want, have = client.versions.get(name), worker.get(name)
        if want is not None and have != want:
            lines.append(f"{name}: client {want}, {who} {have or 'not installed'}")
    return lines


#: Run with the instance's interpreter after an install: the versions as they are now.
_VERSIONS_PY = (
    "import json,sys,platform\n"
    "from importlib import metadata as m\n"
    "def v(n):\n"
    "    try: return m.version(n)\n"
    "    except Exception: return None\n"
    "print(json.dumps({'python': platform.python_version(), 'versions': {n: v(n) for n in sys.argv[1:]}}))\n"
)


def install_command(python: str, specs: Sequence[str], pip_args: Sequence[str], names: Sequence[str]) -> str:
    """Shell that installs ``specs`` into ``python`` (uv when present, else pip), then prints versions.

    uv is looked for on PATH and where its installer puts it (``~/.local/bin``), which is
    where the onstart leaves it when ``python="3.x"`` made it install an interpreter.
    """
    py = shlex.quote(python)
    args = " ".join(shlex.quote(a) for a in [*pip_args, *specs])
    versions = f"{py} -c {shlex.quote(_VERSIONS_PY)} " + " ".join(shlex.quote(n) for n in names)
    return (
        "U=$(command -v uv 2>/dev/null || true); "
        '[ -z "$U" ] && [ -x /root/.local/bin/uv ] && U=/root/.local/bin/uv; '
        f'if [ -n "$U" ]; then echo "installing with $U" >&2; "$U" pip install --python {py} {args} >&2; '
        f'else echo "installing with pip" >&2; {py} -m pip install --disable-pip-version-check {args} >&2; fi '
        f"&& {versions}"
    )


# ----------------------------------------------------------------------------- shipping
def _installed_roots() -> list[str]:
    """Folders whose modules an index installed (or the interpreter carries): never shipped."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sysconfig.get_paths()
    roots.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except (AttributeError, ImportError):  # pragma: no cover - virtualenv's old site.py
        pass
    return sorted({os.path.realpath(r) for r in roots if r})


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@dataclass(frozen=True)
class LocalModule:
    """A top-level module or package the client imported and no index can install."""

    name: str
    #: the module's file, or the package's folder
    path: str
    #: why it is shipped: "next to the script" (its folder is on sys.path: the script's, the
    #: notebook's cwd), "editable install" (an installed distribution's code outside
    #: site-packages) or "missing on the instance" (installed here, not importable there)
    why: str


def local_modules(
    modules: Mapping[str, Any] | None = None,
    path: Sequence[str] | None = None,
    *,
    include: Iterable[str] = (),
) -> list[LocalModule]:
    """The imported top-level modules that workers need but cannot install from an index.

    A module qualifies when its code lives outside the interpreter's and site-packages'
    folders and it is importable by its name: its folder is on ``sys.path`` (the script's
    folder, the notebook's cwd) or an installed distribution provides it (an editable
    install, a development checkout). Names in ``include`` are shipped wherever they live
    (dask-vastai itself when the instance lacks this exact version).
    """
    modules = sys.modules if modules is None else modules
    search = [os.path.realpath(p or os.getcwd()) for p in (sys.path if path is None else path)]
    installed = _installed_roots()
    provided = _provided_modules()
    wanted = set(include)
    found = []
    for name, module in sorted(modules.items()):
        if "." in name or name == "__main__" or module is None:
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue  # builtins, namespace packages
        file = os.path.realpath(file)
        is_package = hasattr(module, "__path__") and os.path.basename(file).startswith("__init__.")
        source = os.path.dirname(file) if is_package else file
        if not is_package and not file.endswith(".py"):
            continue  # a compiled extension outside site-packages cannot run on another machine
        if os.path.basename(source).split(".")[0] != name:
            continue  # imported under another name (pytest's importlib mode): not importable by it
        root = os.path.dirname(source)
        if _under(root, installed):
            if name in wanted:
                found.append(LocalModule(name, source, "missing on the instance"))
        elif root in search:
            found.append(LocalModule(name, source, "next to the script"))
        elif name in provided:
            found.append(LocalModule(name, source, "editable install"))
    return found


@lru_cache(maxsize=1)
def _provided_modules() -> frozenset[str]:
    """Top-level names that installed distributions provide (scanning them takes ~0.3 s: once)."""
    try:
        return frozenset(metadata.packages_distributions())
    except Exception:  # noqa: BLE001 - a broken dist-info must not stop the cluster
        return frozenset()


def non_default_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The client's dask config that differs from the packages' defaults (our section left out).

    The user's YAML files, ``DASK_*`` variables and ``dask.config.set`` calls made before the
    cluster starts all show up here, and so reach the workers.
    """
    import dask.config

    defaults: dict[str, Any] = {}
    for d in dask.config.defaults:
        dask.config.update(defaults, copy.deepcopy(d))
    current = dask.config.config if config is None else config

    def diff(now: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in now.items():
            old = base.get(key, _MISSING) if isinstance(base, Mapping) else _MISSING
            if isinstance(value, Mapping) and isinstance(old, Mapping):
                sub = diff(value, old)
                if sub:
                    out[key] = sub
            elif value != old:
                out[key] = copy.deepcopy(value)
        return out

    out = diff(current, defaults)
    for section in PRIVATE_CONFIG_SECTIONS:
        out.pop(section, None)
    return out


_MISSING = object()


@dataclass(frozen=True)
class Shipment:
    """One gzip'd tar of the shipped modules (``site/``) and dask config (``dask-config/``)."""

    archive: bytes
    digest: str
    modules: tuple[LocalModule, ...]
    config_keys: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.modules and not self.config_keys

    @property
    def folder(self) -> str:
        """Where it is unpacked on the instance."""
        return f"{SHIP_DIR}/{self.digest[:16]}"

    def env(self) -> dict[str, str]:
        """What the incarnation adds to the worker's environment."""
        out = {}
        if self.modules:
            out["PYTHONPATH"] = f"{self.folder}/site"
        if self.config_keys:
            out["DASK_CONFIG"] = f"{self.folder}/dask-config"
        return out

    def describe(self) -> str:
        names = ", ".join(f"{m.name} ({m.why})" for m in self.modules) or "no modules"
        conf = f"dask config {', '.join(self.config_keys)}" if self.config_keys else "no dask config"
        return f"{names}; {conf}; {len(self.archive) / 1024:.0f} KiB"


def _config_yaml(config: Mapping[str, Any]) -> tuple[bytes, tuple[str, ...]]:
    import yaml

    keep: dict[str, Any] = {}
    for key, value in config.items():
        try:
            yaml.safe_dump({key: value})
        except yaml.YAMLError:
            logger.warning("dask config %r holds a value YAML cannot write; it is not shipped", key)
            continue
        keep[key] = value
    if not keep:
        return b"", ()
    return yaml.safe_dump(keep, sort_keys=True).encode(), tuple(sorted(keep))


def build_shipment(modules: Sequence[LocalModule], config: Mapping[str, Any]) -> Shipment:
    """The archive for ``modules`` and ``config``; the same inputs give the same digest."""
    buf = io.BytesIO()
    skipped: list[str] = []
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

            def add(arcname: str, data: bytes, mtime: float = 0) -> None:
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = len(data), 0o644, int(mtime)
                tar.addfile(info, io.BytesIO(data))

            for mod in modules:
                source = Path(mod.path)
                if source.is_file():
                    add(f"site/{source.name}", source.read_bytes(), source.stat().st_mtime)
                    continue
                for dirpath, dirnames, filenames in os.walk(source):
                    dirnames[:] = sorted(
                        d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
                    )
                    for fname in sorted(filenames):
                        f = Path(dirpath, fname)
                        # hidden files (.env, credentials) stay here: send nothing a task does not need
                        if fname.endswith((".pyc", ".pyo")) or fname.startswith(".") or not f.is_file():
                            continue
                        size = f.stat().st_size
                        rel = f.relative_to(source.parent).as_posix()
                        if size > MAX_SHIPPED_FILE_BYTES:
                            skipped.append(f"{rel} ({size / 2**20:.0f} MiB)")
                            continue
                        add(f"site/{rel}", f.read_bytes(), f.stat().st_mtime)
            text, keys = _config_yaml(config)
            if text:
                add("dask-config/client.yaml", text)
    if skipped:
        logger.warning("not shipped to the instances (over %d MiB each): %s", MAX_SHIPPED_FILE_BYTES >> 20,
                       ", ".join(skipped))
    data = buf.getvalue()
    if len(data) > LARGE_SHIPMENT_BYTES:
        logger.warning(
            "shipping %.0f MiB of local code to every instance (%s): move data files out of these packages "
            "or install them from an index with packages=[...]",
            len(data) / 2**20, ", ".join(m.name for m in modules),
        )
    return Shipment(data, hashlib.sha256(data).hexdigest(), tuple(modules), keys, tuple(skipped))


#: Unpacks the archive (argv: archive, folder) once per digest; a second boot finds it there.
_UNPACK_PY = (
    "import os,shutil,sys,tarfile\n"
    "a,d=sys.argv[1:3]\n"
    "if not os.path.isdir(d):\n"
    "    t=d+'.tmp%d'%os.getpid()\n"
    "    with tarfile.open(a) as f:\n"
    "        f.extractall(t,**({'filter':'data'} if hasattr(tarfile,'data_filter') else {}))\n"
    "    try: os.rename(t,d)\n"
    "    except OSError: shutil.rmtree(t,ignore_errors=True)\n"
    "os.remove(a)\n"
    "print(d)\n"
)


def unpack_command(python: str, archive_path: str, folder: str) -> str:
    """Shell that unpacks the uploaded archive into ``folder`` with the workers' interpreter."""
    return " ".join(shlex.quote(x) for x in (python, "-c", _UNPACK_PY, archive_path, folder))


# ---------------------------------------------------------------------- the cluster's part
class VersionGate(SchedulerPlugin):
    """Refuses, at registration, a worker whose Python minor or synced packages differ.

    The worker is paused at once (no task lands on it) and closed with its nanny; the
    reason is kept in ``refused`` under the worker's name, where the instance booting it
    finds it and fails with it (a clear message instead of a pickling error later).
    """

    name = "dask-vastai-version-gate"

    def __init__(self, client: ClientEnvironment, refused: dict[str, str]) -> None:
        self.client = client
        self.refused = refused
        self._tasks: set[asyncio.Task[Any]] = set()

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        packages = dict((ws.versions or {}).get("packages") or {})
        lines = version_mismatches(self.client, packages)
        if not lines:
            return
        message = (
            f"worker {ws.name} was refused: its environment differs from the client's ({'; '.join(lines)}). "
            "Pin the client's versions in the image or let dask-vastai install them (it does unless "
            "the install failed: see the instance's log)"
        )
        self.refused[str(ws.name)] = message
        logger.warning(message)
        stimulus = f"dask-vastai-version-mismatch-{time.time()}"
        scheduler.handle_worker_status_change("paused", worker, stimulus)
        task = asyncio.get_running_loop().create_task(
            scheduler.remove_worker(worker, stimulus_id=stimulus, close=True)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class LateImportWarning(SchedulerPlugin):
    """Warns, when a graph arrives, about tasks whose function lives in a module shipped too late.

    A module imported after the instances booted (``import mylib`` in a notebook cell after
    the cluster's) is not on their workers, and distributed kills a worker that cannot
    unpickle a task's function (the task then waits for a worker that never comes). The
    scheduler runs in the client's process, so it can see the function's module and say so
    before that happens. Instances booted later get the module.
    """

    name = "dask-vastai-late-imports"

    def __init__(self, shipped: Callable[[], frozenset[str] | None]) -> None:
        self.shipped = shipped
        self.warned: set[str] = set()

    def update_graph(self, scheduler: Scheduler, *, tasks: Iterable[Any] = (), **kwargs: Any) -> None:
        shipped = self.shipped()
        if shipped is None:  # no instance booted yet: each boot ships what is imported then
            return
        for key in tasks:
            ts = scheduler.tasks.get(key)
            func = getattr(getattr(ts, "run_spec", None), "func", None)
            top = str(getattr(func, "__module__", "") or "").split(".")[0]
            if not top or top in shipped or top in self.warned or top not in sys.modules:
                continue
            local = local_modules({top: sys.modules[top]})
            if not local:
                continue  # installed from an index: the image has it or the user's packages do
            self.warned.add(top)
            where = local[0].path
            logger.warning(
                "task %s calls %s.%s, but %s was imported after the instances booted, so their workers "
                "cannot import it (a worker that cannot unpickle a task dies). Import %s before starting "
                "the cluster, or run client.upload_file(%r) first; instances booted from now on get it",
                key, top, getattr(func, "__name__", "?"), top, top,
                where if where.endswith(".py") else where + " (zipped)",
            )


@dataclass
class InstanceEnvironment:
    """The cluster-wide environment step of every boot: probe, match, ship. One per cluster."""

    client: ClientEnvironment
    image: str | None = None
    #: worker name -> why the version gate refused it
    refused: dict[str, str] = field(default_factory=dict)
    ship_config: bool = True
    _shipments: dict[tuple[str, ...], Shipment] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.gate = VersionGate(self.client, self.refused)
        self._shipment_lock: asyncio.Lock | None = None
        #: modules that every instance booted so far received (None: none booted yet)
        self.shipped_everywhere: frozenset[str] | None = None
        self.late_imports = LateImportWarning(lambda: self.shipped_everywhere)

    @property
    def scheduler_plugins(self) -> list[SchedulerPlugin]:
        """What the cluster's scheduler runs for us: the version gate, the late-import warning."""
        return [self.gate, self.late_imports]

    def probe_command(self, base: Callable[..., str]) -> str:
        """The probe (``bootstrap.probe_command``) asked for the versions we compare."""
        return base(packages=self.client.probe_names(), fake_versions=_testing.probe_versions())

    def refusal(self, worker_names: Iterable[str]) -> str | None:
        """The version gate's reason for refusing one of these workers, if it did."""
        for name in worker_names:
            if name in self.refused:
                return self.refused[name]
        return None

    async def shipment(self, *, include: Iterable[str] = ()) -> Shipment:
        """What to ship now (modules imported since the last boot are included), built once."""
        if self._shipment_lock is None:  # made on the cluster's loop, where boots run
            self._shipment_lock = asyncio.Lock()
        async with self._shipment_lock:  # instances booting together build it once
            mods = await asyncio.to_thread(local_modules, include=include)
            config = non_default_config() if self.ship_config else {}
            key = (*sorted(f"{m.name}:{m.path}" for m in mods), json.dumps(config, sort_keys=True, default=repr))
            if key not in self._shipments:
                self._shipments[key] = await asyncio.to_thread(build_shipment, mods, config)
            return self._shipments[key]

    async def prepare(
        self, link: InstanceLink, probe: Mapping[str, Any], *, log: Callable[[str], None], timeout_s: float
    ) -> dict[str, str]:
        """Make the instance match the client and ship what it lacks; the workers' extra env.

        Raises :class:`EnvironmentMismatch` (not retried: another machine with the same
        image would differ the same way) when Python differs or an install did not take.
        """
        started = time.monotonic()
        python_exe = str(probe.get("executable") or "python3")
        check_python(self.client, str(probe.get("python")), self.image)
        versions = dict(probe.get("versions") or {})
        specs = packages_to_install(self.client, versions)
        if specs:
            log(f"installing {' '.join(specs)} into {python_exe}")
            t0 = time.monotonic()
            names = self.client.probe_names()
            status, out, err = await link.run(
                install_command(python_exe, specs, self.client.pip_args, names), timeout_s=timeout_s, check=False
            )
            before = version_mismatches(self.client, {**versions, "python": probe.get("python")}, who="instance")
            if status != 0:
                raise EnvironmentMismatch(
                    f"the instance differs from the client ({'; '.join(before) or 'packages ' + ' '.join(specs)}) "
                    f"and installing {' '.join(specs)} failed (exit status {status}): {err.strip()[-1500:]}\n"
                    "Use an image with these versions, or fix pip_args (an index the instance can reach)"
                )
            try:
                after = json.loads(out.strip().splitlines()[-1])
            except (IndexError, ValueError) as e:
                raise EnvironmentMismatch(
                    f"installing {' '.join(specs)} printed no version report ({e}); its output was: "
                    f"{(out + err).strip()[-1500:]!r}"
                ) from e
            versions = _testing.after_install(after["versions"])
            still = version_mismatches(self.client, {**versions, "python": after["python"]}, who="instance")
            if still:
                raise EnvironmentMismatch(
                    f"after installing {' '.join(specs)} the instance still differs from the client: "
                    f"{'; '.join(still)}; pin these versions in the image or check pip_args"
                )
            log(f"installed {len(specs)} package(s) in {time.monotonic() - t0:.1f}s")
        include = []
        here = _version("dask-vastai")
        if not probe.get("dask_vastai_importable") or versions.get("dask-vastai") != here:
            include.append("dask_vastai")
        shipment = await self.shipment(include=include)
        names = frozenset(m.name for m in shipment.modules)
        if self.shipped_everywhere is None:
            self.shipped_everywhere = names
        else:
            self.shipped_everywhere &= names
        env = _testing.worker_env()  # {} unless a test switched its hook on
        if not shipment.empty:
            t0 = time.monotonic()
            archive = f"{SHIP_DIR}/{shipment.digest[:16]}.tar.gz"
            await link.put(archive, shipment.archive)
            await link.run(unpack_command(python_exe, archive, shipment.folder), timeout_s=max(30.0, timeout_s))
            env.update(shipment.env())
            log(f"shipped {shipment.describe()} in {time.monotonic() - t0:.1f}s")
        log(
            f"environment in step with the client (Python {python_minor(str(probe.get('python')))}, "
            + ", ".join(f"{n} {self.client.versions.get(n)}" for n in SYNCED_PACKAGES)
            + f") after {time.monotonic() - started:.1f}s"
        )
        return env

