"""What must match: the client's Python minor and the packages that serialize what travels.

Dask breaks in obscure ways when the client and its workers differ (a pickling error hours
into a run). So before any worker starts on an instance, the instance's Python (minor) and
its ``dask``, ``distributed``, ``cloudpickle`` and ``msgpack`` are compared with the client's;
what differs is installed with the user's ``packages`` (``uv pip`` when the image has uv,
else ``pip``), and an instance whose Python differs is refused, naming both versions and the
fixes: functions pickled on the client carry its bytecode, which no install changes.

A scheduler plugin (:class:`VersionGate`) checks every worker again when it registers, as
``Client.get_versions`` would, and closes a mismatched one instead of admitting it.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ..exceptions import EnvironmentMismatch
from .cuda import CudaVersion, required_cuda
from .secrets import Secret, redact_urls

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

# The step keeps the one logger it had as a module, so that what filters on its name still works.
logger = logging.getLogger("dask_vastai.environment")

#: What must equal the client's on every worker (with Python's minor version): the packages
#: that serialize what travels between client, scheduler and workers.
SYNCED_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack")


def python_minor(version: str) -> str:
    """``"3.11"`` from ``"3.11.7"`` or distributed's ``"3.11.7.final.0"``."""
    return ".".join(str(version).split(".")[:2])


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` installed here; None when it is not."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class ClientEnvironment:
    """What the client runs: the versions every worker must share, and what the user adds.

    ``pip_args`` may hold a private index URL with its token: they are kept as
    :class:`Secret` values, shown by no repr, and reach the instance in a file, never on a
    command line (asyncssh logs commands).
    """

    python: str
    versions: Mapping[str, str | None]
    packages: tuple[str, ...] = ()
    pip_args: tuple[Secret, ...] = field(default=(), repr=False)

    def pip_arguments(self) -> list[str]:
        """``pip_args`` as the install needs them (revealed)."""
        return [a.reveal() if isinstance(a, Secret) else str(a) for a in self.pip_args]

    @classmethod
    def current(cls, packages: Sequence[str] = (), pip_args: Sequence[str] = ()) -> ClientEnvironment:
        """This process's environment, plus the user's extra ``packages`` and ``pip_args``."""
        if isinstance(packages, str) or isinstance(pip_args, str):
            raise TypeError(
                f"packages={packages!r} and pip_args={redact_urls(repr(pip_args))} must be lists of strings, "
                "e.g. packages=['xgboost==2.1.0'], pip_args=['--index-url', 'https://...']"
            )
        for spec in packages:
            _requirement_name(spec)  # a bad specifier fails here, at construction
        return cls(
            python="%d.%d.%d" % sys.version_info[:3],  # noqa: UP031 - the form platform uses
            versions={name: installed_version(name) for name in SYNCED_PACKAGES},
            packages=tuple(str(p) for p in packages),
            pip_args=tuple(Secret(a) for a in pip_args),
        )

    @property
    def python_minor(self) -> str:
        return python_minor(self.python)

    @property
    def cuda(self) -> tuple[CudaVersion, str] | None:
        """The CUDA the user's packages need of the driver, and which package or index says so."""
        return required_cuda(self.packages, self.pip_arguments())

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


#: Where the install's shell script is written over SFTP (a suffix makes it unique): the pip
#: arguments may hold an index token, and a command line is logged (asyncssh, at INFO).
INSTALL_SCRIPT_DIR = "/root/.dask-vastai"


def install_command(python: str, specs: Sequence[str], pip_args: Sequence[str], names: Sequence[str]) -> str:
    """Shell that installs ``specs`` into ``python`` (uv when present, else pip), then prints versions.

    uv is looked for on PATH and where its installer puts it (``~/.local/bin``), which is
    where the onstart leaves it when ``python="3.x"`` made it install an interpreter. It may
    hold secrets (``pip_args``, URL specifiers): it travels as a file (:data:`INSTALL_SCRIPT_DIR`).
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


# ----------------------------------------------------------------- at the worker's registration
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
