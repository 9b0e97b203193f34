"""The seam between the emulated control plane and what a rental runs.

The control plane (``api_*`` modules) owns records, offers, billing and the status
life cycle; a runtime owns processes. The control plane calls a runtime with a
:class:`SandboxSpec` when a rental leaves ``loading`` and asks it to stop the sandbox
on stop/destroy. Two runtimes exist: :class:`RecordOnlyRuntime` (no processes, for
control-plane tests and platforms without namespaces) and the namespace sandbox of
``emulator.sandbox``, which runs OpenSSH and the onstart script for real.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SandboxQuirks:
    """How this rental's host differs from a plain one (the control plane decides, from ``variants``)."""

    #: what SSH sessions see: "container" (the container's env), "image" (the image's PATH and
    #: LANG only) or "none" (sshd's defaults)
    ssh_env: str = "container"
    #: container ports whose mapped (direct) port does not answer, and how ("hang": SYNs are
    #: dropped, "refuse": connections are reset)
    blocked_ports: tuple[int, ...] = ()
    blocked_mode: str = "hang"
    #: the proxy SSH endpoint: "ok", "no_remote_forward" (ssh -R refused) or "dead" (refused,
    #: and the container log says the proxy's port forwarding failed)
    proxy: str = "ok"
    #: (cores, RAM in MB) the instance's /proc and /sys show; None: the machine's own
    cpu_view: tuple[int, int] | None = None
    #: the SSH endpoints present a host key other than the instance's own (fault ``impostor_ssh``:
    #: a man in the middle); the instance's /etc/ssh and its log still show its own keys
    ssh_impostor: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a runtime needs to start one rental's "container"."""

    instance_id: int
    image: str
    #: Vast runtype as sent by the client: "ssh", "ssh_proxy", "ssh_direc ssh_proxy",
    #: "jupyter_proxy ssh_proxy", "args", ...
    runtype: str
    onstart: str | None
    #: argv for runtype "args" (then ``onstart`` is the entrypoint override, as on Vast)
    args: list[str] | None
    #: environment of the container: the user's ``-e`` vars plus what Vast injects
    #: (CONTAINER_ID, CONTAINER_API_KEY, GPU_COUNT, VAST_CONTAINERLABEL, ...). The runtime
    #: adds PUBLIC_IPADDR and VAST_TCP_PORT_<n> once it has mapped the ports.
    env: dict[str, str]
    #: container ports requested with ``-p N:N`` (tcp); 22 is added for ssh runtypes
    container_ports: tuple[int, ...]
    #: lines for ~/.ssh/authorized_keys (account keys plus keys attached to this rental)
    authorized_keys: tuple[str, ...]
    num_gpus: int
    gpu_name: str
    gpu_ram_mb: int
    cpu_cores: float
    cpu_ram_mb: int
    disk_gb: float
    #: the emulator's API origin, e.g. "http://127.0.0.1:5123"; a sandbox makes the same
    #: address reach the API from inside, as console.vast.ai is reachable from an instance
    api_url: str
    quirks: SandboxQuirks = SandboxQuirks()


@dataclass
class SandboxEndpoints:
    """How the outside reaches a running sandbox (Vast's ``ports``/``public_ipaddr``)."""

    public_ipaddr: str
    #: container port -> host port on ``public_ipaddr`` (22 is the direct SSH port)
    ports: dict[int, int] = field(default_factory=dict)
    #: Vast's proxy SSH endpoint (``ssh_host``/``ssh_port``); None where only direct exists
    ssh_host: str | None = None
    ssh_port: int | None = None


class InstanceRuntime(Protocol):
    """What the control plane needs from whatever runs rentals."""

    async def start(self, spec: SandboxSpec) -> SandboxEndpoints:
        """Start the sandbox and its SSH server; return once ports are reachable.

        Raises on failure; the control plane then marks the rental as failed to boot.
        """

    async def stop(self, instance_id: int) -> None:
        """Kill every process of the sandbox and remove its files. Idempotent."""

    def exited(self, instance_id: int) -> int | None:
        """Exit code of an ``args`` runtype workload once it ended, else None."""

    def logs(self, instance_id: int) -> str:
        """The container log (onstart/args output), as ``vastai logs`` shows it."""

    def traffic(self, instance_id: int) -> tuple[int, int]:
        """Bytes (up, down) that crossed the rental's network boundary so far, over all its boots."""

    async def close(self) -> None:
        """Stop every sandbox this runtime started."""


class RecordOnlyRuntime:
    """A runtime that starts nothing: rentals are records with made-up endpoints.

    Used by control-plane tests and by ``--no-sandbox``; no port it reports is open.
    """

    def __init__(self, public_ipaddr: str = "127.0.0.1", first_port: int = 40000) -> None:
        self._public_ipaddr = public_ipaddr
        self._next_port = first_port
        self._running: dict[int, SandboxSpec] = {}
        self._lock = asyncio.Lock()

    async def start(self, spec: SandboxSpec) -> SandboxEndpoints:
        async with self._lock:
            ports = {}
            for port in spec.container_ports:
                ports[port] = self._next_port
                self._next_port += 1
            self._running[spec.instance_id] = spec
        return SandboxEndpoints(public_ipaddr=self._public_ipaddr, ports=ports)

    async def stop(self, instance_id: int) -> None:
        self._running.pop(instance_id, None)

    def exited(self, instance_id: int) -> int | None:
        return None

    def logs(self, instance_id: int) -> str:
        spec = self._running.get(instance_id)
        return "" if spec is None else f"(record-only runtime: onstart of {instance_id} not run)\n"

    def traffic(self, instance_id: int) -> tuple[int, int]:
        return 0, 0  # nothing runs, nothing moves

    async def close(self) -> None:
        self._running.clear()
