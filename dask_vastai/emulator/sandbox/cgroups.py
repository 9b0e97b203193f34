"""Memory and process limits per sandbox, in a cgroup of its own.

A sandbox's root is hostile: without limits it can take the host's memory (its files live in a
tmpfs, which is memory too) or fork until the host has no pids left. Each sandbox's launcher is
put into a fresh cgroup before it forks anything, so everything the sandbox ever runs is
counted there: ``memory.max`` and ``pids.max`` (cgroup v2) or ``memory.limit_in_bytes`` and
``pids.max`` (v1's memory and pids hierarchies).

The sandbox does not see these limits (its ``/sys/fs/cgroup`` is empty and ``/proc/meminfo``
is the machine's unless the ``cpu_view`` variant says otherwise): they protect the host, they
do not describe the offer, so a worker sizes itself as before and a runaway one is killed.

Where: cgroup v2 when our own cgroup offers the memory and pids controllers to children (a
delegated subtree, or a cgroup we may enable them in); else v1 when its memory and pids
hierarchies are mounted and our cgroups in them are writable (root in most containers on a
v1 or hybrid host). Elsewhere (an unprivileged user without delegation, a read-only
``/sys/fs/cgroup``) sandboxes run without these limits, and :meth:`CgroupLimits.detect` says
why; the runtime logs that sentence once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")


@dataclass
class SandboxCgroup:
    """The cgroup (one folder per hierarchy) of one sandbox."""

    folders: list[Path]

    def add(self, pid: int) -> None:
        """Move ``pid`` (the launcher, before it forks) into the cgroup."""
        for folder in self.folders:
            (folder / "cgroup.procs").write_text(f"{pid}\n")

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the folders once the sandbox's processes are gone (killed ones take a moment)."""
        deadline = time.monotonic() + timeout_s
        for folder in self.folders:
            while True:
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove the sandbox's cgroup %s: %s", folder, e)
                        break
                    time.sleep(0.05)


@dataclass
class CgroupLimits:
    """Where this host lets us put sandboxes into limited cgroups: ``kind`` v2, v1, or none (``why``)."""

    kind: str
    #: v2: our cgroup's folder; v1: our folder in the memory and in the pids hierarchy
    parents: dict[str, Path] = field(default_factory=dict)
    why: str = ""

    @classmethod
    def detect(cls) -> CgroupLimits:
        own = _own_cgroups()
        mounts = _cgroup_mounts()
        reasons = []
        v2 = mounts.get("cgroup2")
        if v2 is not None and "" in own:
            parent = v2 / own[""].lstrip("/")
            try:
                available = set((parent / "cgroup.controllers").read_text().split())
                if set(CONTROLLERS) <= available:
                    enabled = set((parent / "cgroup.subtree_control").read_text().split())
                    if not set(CONTROLLERS) <= enabled:
                        (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
                    _check_writable(parent)
                    return cls("v2", {"": parent})
                reasons.append(f"cgroup v2 at {parent} offers only {sorted(available) or 'no'} controllers")
            except OSError as e:
                reasons.append(f"cgroup v2 at {parent} is not ours to divide ({e.strerror or e})")
        parents = {}
        for controller in CONTROLLERS:
            mount = mounts.get(controller)
            if mount is None or controller not in own:
                reasons.append(f"no cgroup v1 {controller} hierarchy")
                break
            parents[controller] = mount / own[controller].lstrip("/")
        else:
            try:
                for parent in parents.values():
                    _check_writable(parent)
                return cls("v1", parents)
            except OSError as e:
                reasons.append(f"cgroup v1 is not writable here ({e.strerror or e})")
        return cls("none", why="; ".join(reasons) or "no cgroup file system")

    def create(self, name: str, memory_bytes: int, pids: int) -> SandboxCgroup | None:
        """A fresh cgroup with these limits; None where none can be made (``kind == "none"``)."""
        if self.kind == "none":
            return None
        folders = [parent / name for parent in self.parents.values()]
        try:
            for folder in folders:
                folder.mkdir()
            if self.kind == "v2":
                (folders[0] / "memory.max").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):  # no swap configured: nothing to cap
                    (folders[0] / "memory.swap.max").write_text("0")
                (folders[0] / "pids.max").write_text(str(pids))
            else:
                memory, pid_folder = self.parents["memory"] / name, self.parents["pids"] / name
                (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
                with contextlib.suppress(OSError):  # memsw exists only with swap accounting
                    (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                (pid_folder / "pids.max").write_text(str(pids))
        except OSError:
            SandboxCgroup(folders).remove(timeout_s=0)
            raise
        return SandboxCgroup(folders)


def _own_cgroups() -> dict[str, str]:
    """Controller (``""`` for v2) -> our cgroup's path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _cgroup_mounts() -> dict[str, Path]:
    """``cgroup2`` -> its mount point, and each v1 controller -> its hierarchy's mount point."""
    out: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        before, _, after = line.partition(" - ")
        fstype, _source, options = (after.split() + ["", "", ""])[:3]
        mount_point = Path(before.split()[4])
        if fstype == "cgroup2":
            out.setdefault("cgroup2", mount_point)
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in CONTROLLERS:
                    out.setdefault(option, mount_point)
    return out


def _check_writable(parent: Path) -> None:
    """Raise OSError unless a child cgroup can be made under ``parent``."""
    probe = parent / f"vastemu-probe-{os.getpid()}"
    probe.mkdir()
    probe.rmdir()
