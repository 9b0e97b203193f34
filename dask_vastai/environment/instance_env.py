"""The environment step of every boot, in its order: probe, install what differs, ship.

One :class:`InstanceEnvironment` per cluster. Right after SSH connects, the instance runs
the probe it asks for (the hardware probe, which also reports the versions we compare);
before any worker starts, :meth:`InstanceEnvironment.prepare` refuses an instance whose
Python differs, installs what differs and ships what no index installs. The cluster's
scheduler runs its two plugins: the version gate and the late-import warning.

The common case (the image already matches) costs the probe that runs anyway and no install.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .. import _testing
from ..exceptions import EnvironmentMismatch
from .late_imports import LateImportWarning
from .secrets import redact_urls
from .shipping import (
    SHIP_DIR,
    Shipment,
    build_shipment,
    local_modules,
    shipped_config,
    unpack_command,
)
from .versions import (
    INSTALL_SCRIPT_DIR,
    SYNCED_PACKAGES,
    ClientEnvironment,
    VersionGate,
    check_python,
    install_command,
    installed_version,
    packages_to_install,
    python_minor,
    version_mismatches,
)

if TYPE_CHECKING:
    from ..tunnel import InstanceLink


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

    def refusal(self, worker_names: Iterable[str]) -> str | None:
        """The version gate's reason for refusing one of these workers, if it did."""
        for name in worker_names:
            if name in self.refused:
                return self.refused[name]
        return None

    def probe_command(self, base: Callable[..., str]) -> str:
        """The probe (``bootstrap.probe_command``) asked for the versions we compare."""
        return base(packages=self.client.probe_names(), fake_versions=_testing.probe_versions())

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
        versions = await self._install(link, python_exe, probe, log=log, timeout_s=timeout_s)
        env = _testing.worker_env()  # {} unless a test switched its hook on
        env.update(await self._ship(link, python_exe, probe, versions, log=log, timeout_s=timeout_s))
        log(
            f"environment in step with the client (Python {python_minor(str(probe.get('python')))}, "
            + ", ".join(f"{n} {self.client.versions.get(n)}" for n in SYNCED_PACKAGES)
            + f") after {time.monotonic() - started:.1f}s"
        )
        return env

    async def _install(
        self, link: InstanceLink, python_exe: str, probe: Mapping[str, Any], *,
        log: Callable[[str], None], timeout_s: float,
    ) -> dict[str, str | None]:
        """Install what differs from the client; the instance's versions then (the probe's if none)."""
        versions = dict(probe.get("versions") or {})
        specs = packages_to_install(self.client, versions)
        if not specs:
            return versions
        shown = redact_urls(" ".join(specs))  # a URL specifier may carry a token
        log(f"installing {shown} into {python_exe}")
        t0 = time.monotonic()
        status, out, err = await self._run_install(link, install_command(
            python_exe, specs, self.client.pip_arguments(), self.client.probe_names()), timeout_s=timeout_s)
        before = version_mismatches(self.client, {**versions, "python": probe.get("python")}, who="instance")
        if status != 0:
            raise EnvironmentMismatch(
                f"the instance differs from the client ({'; '.join(before) or 'packages ' + shown}) "
                f"and installing {shown} failed (exit status {status}): {redact_urls(err.strip()[-1500:])}\n"
                "Use an image with these versions, or fix pip_args (an index the instance can reach)"
            )
        try:
            after = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            raise EnvironmentMismatch(
                f"installing {shown} printed no version report ({e}); its output was: "
                f"{redact_urls((out + err).strip()[-1500:])!r}"
            ) from e
        versions = _testing.after_install(after["versions"])
        still = version_mismatches(self.client, {**versions, "python": after["python"]}, who="instance")
        if still:
            raise EnvironmentMismatch(
                f"after installing {shown} the instance still differs from the client: "
                f"{'; '.join(still)}; pin these versions in the image or check pip_args"
            )
        log(f"installed {len(specs)} package(s) in {time.monotonic() - t0:.1f}s")
        return versions

    @staticmethod
    async def _run_install(link: InstanceLink, script: str, *, timeout_s: float) -> tuple[int, str, str]:
        """Run the install script from a file written over SFTP, then delete it.

        It holds the pip arguments (a private index URL and its token): on a command line
        they would be in asyncssh's log of every command; in a file they reach only the
        instance, which needs them, and are gone after the install.
        """
        path = f"{INSTALL_SCRIPT_DIR}/pip-install-{uuid.uuid4().hex[:8]}.sh"
        await link.put(path, script.encode(), mode=0o700)
        return await link.run(f"sh {path}; s=$?; rm -f {path}; exit $s", timeout_s=timeout_s, check=False)

    async def _ship(
        self, link: InstanceLink, python_exe: str, probe: Mapping[str, Any], versions: Mapping[str, str | None],
        *, log: Callable[[str], None], timeout_s: float,
    ) -> dict[str, str]:
        """Upload and unpack what no index installs; the env that puts it first for the workers."""
        include = []
        if not probe.get("dask_vastai_importable") or versions.get("dask-vastai") != installed_version("dask-vastai"):
            include.append("dask_vastai")
        shipment = await self.shipment(include=include)
        names = frozenset(m.name for m in shipment.modules)
        if self.shipped_everywhere is None:
            self.shipped_everywhere = names
        else:
            self.shipped_everywhere &= names
        if shipment.empty:
            return {}
        t0 = time.monotonic()
        archive = f"{SHIP_DIR}/{shipment.digest[:16]}.tar.gz"
        await link.put(archive, shipment.archive)
        await link.run(unpack_command(python_exe, archive, shipment.folder), timeout_s=max(30.0, timeout_s))
        log(f"shipped {shipment.describe()} in {time.monotonic() - t0:.1f}s")
        return shipment.env()

    async def shipment(self, *, include: Iterable[str] = ()) -> Shipment:
        """What to ship now (modules imported since the last boot are included), built once."""
        if self._shipment_lock is None:  # made on the cluster's loop, where boots run
            self._shipment_lock = asyncio.Lock()
        async with self._shipment_lock:  # instances booting together build it once
            mods = await asyncio.to_thread(local_modules, include=include)
            config, left_out = shipped_config() if self.ship_config else ({}, [])
            key = (*sorted(f"{m.name}:{m.path}" for m in mods), json.dumps(config, sort_keys=True, default=repr))
            if key not in self._shipments:
                self._shipments[key] = await asyncio.to_thread(build_shipment, mods, config, left_out)
            return self._shipments[key]
