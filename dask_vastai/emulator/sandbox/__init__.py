"""Emulated instances as real sandboxes: namespaces, OpenSSH, onstart, mapped ports, GPUs.

:class:`SandboxRuntime` implements :class:`~dask_vastai.emulator.runtime.InstanceRuntime`.
Each rental becomes a process tree started by ``nsinit.py`` (read its docstring for the
namespaces and the root it builds). The host side, here, only makes the listening sockets
on the host's loopback (the "public IP"), the relay sockets (``apirelay``: the API at its
own URL from inside; ``publicnet``: other instances' mapped ports), the log pipes and the
host keys, hands them to the launcher, and waits for it to report ready.

What runs inside is treated as hostile. The host trusts one line from it: pid 1's host pid,
which only the launcher (host code, before the sandbox exists) writes, on a pipe the sandbox
never holds; pid 1's own "ready" comes on another pipe and names nothing the host acts on.
The logs are pipes that a thread here copies into capped files (``logpump``), and each
sandbox runs in a cgroup of its own with memory and process limits (``cgroups``: v2 where
delegated, else v1; where neither is writable, a warning says so and none apply).

Modules: ``nsinit`` (the launcher and pid 1, run as a script), ``sshd`` (OpenSSH's
configuration and host keys), ``fallback_ssh`` (asyncssh's server where OpenSSH cannot run),
``gpus`` and ``fake_nvidia_smi`` (what ``nvidia-smi`` shows), ``fake_nproc`` (``nproc`` under a
faked CPU view), ``blackhole`` (ports that hang or refuse), ``support`` (``available()``),
``logpump`` (capped logs), ``cgroups`` (memory and process limits).

The host of a rental may differ from a plain one as the control plane's variants say
(:class:`~dask_vastai.emulator.runtime.SandboxQuirks`): direct ports that hang (SYNs
dropped) or refuse, an SSH proxy that refuses ``-R`` or is dead until a reboot, SSH
sessions without the container's env, and a CPU/memory view (``/proc/cpuinfo``,
``/proc/meminfo``, ``/sys/devices/system/cpu/online``, ``nproc``) that says what the offer
says ("honest") or shows a bigger host ("soft"). The view is made of files bound over the
kernel's: the CPU affinity (``os.sched_getaffinity``, hence ``dask.system.CPU_COUNT``)
cannot exceed the machine's real CPUs, and "honest" narrows it to the offer's cores where
the machine has more. Pid 1's environment (``/proc/1/environ``) is the container's env,
as a container's entrypoint has it, less the variables that steer the host's loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import SandboxEndpoints, SandboxSpec
from . import gpus as gpu_mod
from .apirelay import ApiRelay
from .blackhole import hold_syns
from .cgroups import CgroupLimits, SandboxCgroup
from .logpump import LogPump
from .publicnet import PublicNet
from .sshd import (
    DEFAULT_SESSION_PATH,
    HOST_KEY_DIR,
    HOST_KEY_NAMES,
    IMPOSTOR_KEY,
    find_sshd,
    new_host_key,
    new_host_keys,
    sshd_config,
)
from .support import available

__all__ = ["SandboxRuntime"]

log = logging.getLogger(__name__)

NSINIT = Path(__file__).with_name("nsinit.py")
FAKE_NVIDIA_SMI = Path(__file__).with_name("fake_nvidia_smi.py")
FALLBACK_SSH = Path(__file__).with_name("fallback_ssh.py")
FAKE_NPROC = Path(__file__).with_name("fake_nproc.py")
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
UID_RANGE = 65536
#: where the sandboxes' uid ranges start on the host when we run as root: far above any
#: real account or subuid range, so a sandbox's root owns nothing of the host's
UID_BASE = 0x60000000
UID_SLOTS = (0xFFFF0000 - UID_BASE) // UID_RANGE
LOG_TAIL_BYTES = 1 << 20
#: a log file past this size keeps only its last LOG_TAIL_BYTES (a sandbox cannot fill the disk)
LOG_MAX_BYTES = 4 << 20
#: per-sandbox limits (where cgroups allow, see ``cgroups.py``): memory (at most the offer's RAM)
#: and processes/threads; a hostile or runaway instance cannot take the host down
MEMORY_MAX_MB = 4096
MEMORY_MIN_MB = 1024
PIDS_MAX = 4096
#: variables of the container's env kept off the launcher (pid 1's environment is the
#: launcher's): they would steer the host's dynamic loader or libc before the sandbox exists
HOST_UNSAFE_ENV_PREFIXES = ("LD_", "GCONV_", "GLIBC_", "MALLOC_")
HOST_UNSAFE_ENV = frozenset({"LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN", "TZDIR"})


@dataclass
class _Sandbox:
    spec: SandboxSpec
    directory: Path
    process: asyncio.subprocess.Process
    sockets: list[socket.socket]
    slot: int
    #: the container log and the sshd log, in this order
    logs: tuple[LogPump, LogPump]
    cgroup: SandboxCgroup | None = None
    #: our own connections that keep the accept queues of hanging ports full
    fillers: list[socket.socket] = field(default_factory=list)
    gpus: list[gpu_mod.HostGPU] = field(default_factory=list)
    pidfd: int | None = None
    pid1_host: int | None = None
    exit_code: int | None = None
    stopping: bool = False
    waiter: asyncio.Task | None = None
    #: bytes (up, down) across the sandbox's boundary, as its pid 1 last reported them
    traffic: tuple[int, int] = (0, 0)
    metered: asyncio.Event = field(default_factory=asyncio.Event)
    meter_reader: asyncio.Task | None = None


class SandboxRuntime:
    """Runs each rental in its own Linux namespaces with OpenSSH and its onstart script.

    ``state_dir`` holds one directory per running instance (its logs); the instance's own
    files live in a size-limited tmpfs that vanishes with it.
    """

    available = staticmethod(available)

    def __init__(
        self,
        state_dir: Path,
        *,
        public_ipaddr: str = "127.0.0.1",
        tmpfs_max_mb: int = 4096,
        gpu_passthrough: bool | None = None,
        boot_timeout_s: float = 30.0,
        single_uid: bool | None = None,
        memory_max_mb: int = MEMORY_MAX_MB,
        pids_max: int = PIDS_MAX,
        log_max_bytes: int = LOG_MAX_BYTES,
    ) -> None:
        ok, reason = available()
        if not ok:
            raise RuntimeError(reason)
        self.state_dir = Path(state_dir)
        self.public_ipaddr = public_ipaddr
        self.tmpfs_max_mb = tmpfs_max_mb
        self.boot_timeout_s = boot_timeout_s
        #: a uid range (and OpenSSH) where we are root; else one uid and asyncssh's server.
        #: ``single_uid=True`` as root behaves as an unprivileged user would (for tests).
        self._root = os.geteuid() == 0 and not single_uid
        self._sshd = find_sshd()
        self._sandboxes: dict[int, _Sandbox] = {}
        self._logs_after_stop: dict[int, str] = {}
        #: bytes (up, down) of the sandboxes a rental had before its current one (reboots, stops)
        self._traffic_before: dict[int, tuple[int, int]] = {}
        self._traffic_lock = threading.Lock()
        #: each rental's /etc/ssh host keys, made at its first boot and kept across reboots
        self._host_keys: dict[int, dict[str, str]] = {}
        self._api = ApiRelay()
        self._public = PublicNet(public_ipaddr)
        self._socket_dir: str | None = None
        self._gpu_passthrough = gpu_passthrough
        self._host_gpus: list[gpu_mod.HostGPU] | None = None
        self._lock = asyncio.Lock()
        self._slots: set[int] = set()  # uid ranges in use, reserved before the sandbox exists
        # another emulator on this host gets other uids (up to 1024 sandboxes each here)
        self._slot_offset = secrets.randbelow(UID_SLOTS // 1024) * 1024
        self._gpus_taken: set[int] = set()
        self._fallback_source = FALLBACK_SSH.read_text()
        self._fake_nvidia_smi = FAKE_NVIDIA_SMI.read_text()
        self._fake_nproc = FAKE_NPROC.read_text()
        self.memory_max_mb = memory_max_mb
        self.pids_max = pids_max
        self.log_max_bytes = log_max_bytes
        self._limits = CgroupLimits.detect()
        if self._limits.kind == "none":
            log.warning("sandboxes run without memory and process limits here: %s", self._limits.why)

    # ------------------------------------------------------------------ InstanceRuntime

    async def start(self, spec: SandboxSpec) -> SandboxEndpoints:
        """Start the sandbox; return once its init reports its relays and sshd ready."""
        if spec.instance_id in self._sandboxes:
            raise RuntimeError(f"instance {spec.instance_id} already has a running sandbox")
        ssh = not _is_args_runtype(spec.runtype)
        ports = list(dict.fromkeys(([22] if ssh else []) + list(spec.container_ports)))
        if ssh and not (self._root and self._sshd):
            log.warning("instance %s: OpenSSH cannot run here (it needs root to map a uid range, and "
                        "sshd installed); its SSH server is asyncssh's instead", spec.instance_id)
        slot = next(i for i in range(len(self._slots) + 1) if i not in self._slots)
        self._slots.add(slot)
        sockets: list[socket.socket] = []
        host_gpus: list[gpu_mod.HostGPU] = []
        quirks = spec.quirks
        fillers: list[socket.socket] = []
        try:
            # a blocked port or a dead proxy is bound (the port is ours and listed) but never served
            sockets = [_listen(self.public_ipaddr, p not in quirks.blocked_ports) for p in ports]
            if ssh:
                sockets.append(_listen(self.public_ipaddr, quirks.proxy != "dead"))
            if quirks.blocked_mode == "hang":
                for port, sock in zip(ports, sockets, strict=False):
                    if port in quirks.blocked_ports:
                        fillers += await asyncio.to_thread(hold_syns, sock)
            host_gpus = await self._allocate_gpus(spec)
            return await self._launch(spec, ssh, ports, sockets, fillers, slot, host_gpus)
        finally:
            if spec.instance_id not in self._sandboxes or self._sandboxes[spec.instance_id].slot != slot:
                # never registered (or already stopped by _launch): release what we reserved
                for sock in sockets + fillers:
                    sock.close()
                self._slots.discard(slot)
                self._gpus_taken.difference_update(g.index for g in host_gpus)

    async def _launch(self, spec: SandboxSpec, ssh: bool, ports: list[int], all_sockets: list[socket.socket],
                      fillers: list[socket.socket], slot: int, host_gpus: list[gpu_mod.HostGPU]) -> SandboxEndpoints:
        sockets, proxy = all_sockets[: len(ports)], (all_sockets[-1] if ssh else None)
        mapped = {port: sock.getsockname()[1] for port, sock in zip(ports, sockets, strict=True)}
        quirks = spec.quirks
        blocked = {port for port in ports if port in quirks.blocked_ports}
        served = [(p, s) for p, s in zip(ports, sockets, strict=True) if p not in blocked]
        proxy_served = proxy is not None and quirks.proxy != "dead"
        directory = self.state_dir / str(spec.instance_id)
        await asyncio.to_thread(_fresh_directory, directory)
        async with self._lock:  # concurrent starts: one directory
            if self._socket_dir is None:
                self._socket_dir = await asyncio.to_thread(self._make_socket_dir)
        api_sock = await self._api.socket_for(spec.api_url, self._socket_dir) if spec.api_url else None
        public_sock = await self._public.socket_in(self._socket_dir)
        env = self._environment(spec, mapped, host_gpus)
        session_env, set_env = self._session_env(spec, env)
        fake = [] if host_gpus else gpu_mod.fake_gpus(spec.instance_id, spec.num_gpus, spec.gpu_name,
                                                      spec.gpu_ram_mb)
        if spec.instance_id not in self._host_keys:
            self._host_keys[spec.instance_id] = await asyncio.to_thread(new_host_keys)
        host_keys = self._host_keys[spec.instance_id]
        impostor = (await asyncio.to_thread(new_host_key))[0] if quirks.ssh_impostor else None
        # what sshd presents: the image's keys, or the man in the middle's
        presented = (IMPOSTOR_KEY,) if impostor else tuple(f"{HOST_KEY_DIR}/{n}" for n in HOST_KEY_NAMES)
        # Two channels: the launcher's (pid 1's host pid: what stop() signals) never enters the
        # sandbox; pid 1's (ready, or why not) is closed once it is ready.
        status_r, status_w = os.pipe()
        report_r, report_w = os.pipe()
        # pid 1 meters the sandbox's boundary and writes its totals here for as long as it lives
        meter_r, meter_w = os.pipe()
        logs = (LogPump(directory / "container.log", max_bytes=self.log_max_bytes, keep_bytes=LOG_TAIL_BYTES),
                LogPump(directory / "sshd.log", max_bytes=self.log_max_bytes, keep_bytes=LOG_TAIL_BYTES))
        log_fd, sshd_log_fd = logs[0].writer, logs[1].writer
        if proxy is not None and quirks.proxy == "dead":  # what the container's tunnel to the proxy says
            logs[0].write(f"Error: remote port forwarding failed for listen port {proxy.getsockname()[1]}\n".encode())
        cfg = {
            "status_fd": status_w, "report_fd": report_w, "log_fd": log_fd, "sshd_log_fd": sshd_log_fd,
            "meter_fd": meter_w,
            "hostname": f"C.{spec.instance_id}",
            "uid_base": UID_BASE + (self._slot_offset + slot) * UID_RANGE if self._root else None,
            "uid_count": UID_RANGE if self._root else 1,
            # root behaving as unprivileged maps the sandbox's root onto "nobody", never uid 0
            "single_uid": (65534, 65534) if not self._root and os.geteuid() == 0 else None,
            "site_paths": [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))],
            "fallback_source": self._fallback_source,
            "tmpfs_size": f"{min(int(spec.disk_gb * 1024) or 1024, self.tmpfs_max_mb)}m",
            "system_paths": list(SYSTEM_PATHS),
            "python_prefixes": list(dict.fromkeys([sys.base_prefix, sys.prefix])),
            "api_sock": api_sock,
            "public_sock": public_sock,
            "own_host_ports": [s.getsockname()[1] for s in all_sockets],
            "api_port": ApiRelay.api_port(spec.api_url)[1] if spec.api_url else None,
            # Vast's identity mapping: a "port" above 65535 asks for inside == outside (random)
            "listen": [{"fd": s.fileno(), "port": p if p <= 65535 else mapped[p],
                        "kind": "ssh" if p == 22 and ssh else "tcp", "sshd": "direct"}
                       for p, s in served]
            + ([{"fd": proxy.fileno(), "port": 22, "kind": "ssh", "sshd": "proxy"}] if proxy_served else []),
            "mode": "ssh" if ssh else "args",
            "onstart": spec.onstart,
            "args": list(spec.args or []),
            "env": env,
            # ~/.ssh/environment, where sessions see the container's env; else sshd's SetEnv
            "ssh_environment": env if set_env is None else None,
            "session_env": session_env,
            "openssh": bool(self._root and self._sshd),
            "sshd": self._sshd or "/usr/sbin/sshd",
            "sshd_configs": {
                "direct": sshd_config(set_env, host_keys=presented),
                "proxy": sshd_config(set_env, remote_forward=quirks.proxy != "no_remote_forward", host_keys=presented),
            },
            # the image's own sshd_config in /etc/ssh: what the instance believes it serves
            "image_sshd_config": sshd_config(set_env),
            "proxy_remote_forward": quirks.proxy != "no_remote_forward",
            "cpu_view": None if quirks.cpu_view is None else
            {"cores": quirks.cpu_view[0], "ram_mb": quirks.cpu_view[1]},
            "host_keys": host_keys,
            "impostor_key": impostor,
            "served_host_keys": [impostor] if impostor else [host_keys[n] for n in HOST_KEY_NAMES],
            "authorized_keys": "".join(k.strip() + "\n" for k in spec.authorized_keys if k.strip()),
            "fake_gpus": fake,
            "gpu_devices": gpu_mod.device_nodes(host_gpus) if host_gpus else [],
            "bin_files": self._bin_files(host_gpus, quirks.cpu_view is not None),
        }
        try:  # status_r and report_r are ours until the end of start(), whatever happens
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(NSINIT),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=sshd_log_fd,
                # never the emulator's environment: pid 1's is readable from inside (API keys)
                env=_launcher_env(env),
                pass_fds=[status_w, report_w, meter_w, log_fd, sshd_log_fd, *(s.fileno() for _, s in served),
                          *([proxy.fileno()] if proxy is not None and proxy_served else [])],
            )
        except BaseException:
            os.close(status_r)
            os.close(report_r)
            os.close(meter_r)
            raise
        finally:
            for fd in (status_w, report_w, meter_w):
                os.close(fd)
            for pump in logs:
                pump.close_writer()
        box = _Sandbox(spec, directory, process, all_sockets, slot, logs, None, fillers, host_gpus)
        self._sandboxes[spec.instance_id] = box
        box.waiter = asyncio.create_task(self._wait(box))
        box.meter_reader = asyncio.create_task(self._read_meter(box, meter_r))
        try:
            # The launcher waits for its configuration: in its cgroup before it forks anything.
            box.cgroup = await asyncio.to_thread(self._limit, spec, process.pid)
            assert process.stdin is not None
            process.stdin.write(json.dumps(cfg).encode())
            await process.stdin.drain()
            process.stdin.close()
            await asyncio.wait_for(self._until_ready(box, status_r, report_r), self.boot_timeout_s)
        except BaseException as exc:
            reason = (f"did not report ready within {self.boot_timeout_s:.0f} s"
                      if isinstance(exc, TimeoutError) else str(exc))
            sshd_log = await asyncio.to_thread(logs[1].tail, 2000)
            await self.stop(spec.instance_id)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise RuntimeError(
                f"the sandbox of instance {spec.instance_id} failed to start: {reason}"
                + (f"\n--- its sshd/init log ---\n{sshd_log}" if sshd_log.strip() else "")
            ) from exc
        finally:
            os.close(status_r)
            os.close(report_r)
        self._public.publish(s.getsockname()[1] for p, s in served)
        if proxy_served:
            self._public.publish([proxy.getsockname()[1]])
        if quirks.blocked_mode == "hang":  # other instances meet the same hang
            self._public.publish((mapped[p] for p in blocked), hang=True)
        return SandboxEndpoints(
            public_ipaddr=self.public_ipaddr,
            ports=mapped,
            ssh_host=self.public_ipaddr if proxy else None,
            # Vast's jupyter instances report the proxy's jupyter port; SSH is the next one
            # (the CLI's ssh-url adds 1), so report one below the port sshd is reached on
            ssh_port=(proxy.getsockname()[1] - ("jupyter" in spec.runtype)) if proxy else None,
        )

    async def stop(self, instance_id: int) -> None:
        """Kill the sandbox's pid 1 (the kernel then kills all it holds) and remove its files."""
        box = self._sandboxes.get(instance_id)
        if box is None:
            return
        box.stopping = True
        if box.pidfd is not None:
            await self._last_reading(box)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(box.pidfd, signal.SIGKILL)
        elif box.process.returncode is None:
            # no pid 1 yet: killing the launcher cuts pid 1's lifeline, which ends it
            with contextlib.suppress(ProcessLookupError):
                box.process.kill()
        try:
            await asyncio.wait_for(asyncio.shield(box.process.wait()), 10)
        except TimeoutError:
            log.error("sandbox of instance %s: launcher pid %s did not exit 10 s after SIGKILL",
                      instance_id, box.process.pid)
        self._public.withdraw(s.getsockname()[1] for s in box.sockets if s.fileno() != -1)
        for sock in box.sockets + box.fillers:
            sock.close()
        if box.pidfd is not None:
            os.close(box.pidfd)
            box.pidfd = None
        for pump in box.logs:  # the sandbox is gone: its pipes end once the kernel reaped it
            await asyncio.to_thread(pump.join, 5)
        if box.cgroup is not None:
            await asyncio.to_thread(box.cgroup.remove)
        self._logs_after_stop[instance_id] = await asyncio.to_thread(box.logs[0].tail, LOG_TAIL_BYTES)
        if box.meter_reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(box.meter_reader), 2)  # the pipe ends with pid 1
            box.meter_reader.cancel()
        # One step under the lock (the meter is read from other threads): a read between the
        # two would count this sandbox's bytes twice, or not at all.
        with self._traffic_lock:
            before = self._traffic_before.get(instance_id, (0, 0))
            self._traffic_before[instance_id] = (before[0] + box.traffic[0], before[1] + box.traffic[1])
            self._sandboxes.pop(instance_id, None)
        await asyncio.to_thread(shutil.rmtree, box.directory, True)
        self._slots.discard(box.slot)
        self._gpus_taken.difference_update(g.index for g in box.gpus)

    def traffic(self, instance_id: int) -> tuple[int, int]:
        """Bytes (up, down) that crossed the rental's network boundary, over all its boots.

        Counted by each sandbox's pid 1 at the boundary (SSH connections through the kernel's
        TCP counters, relayed ports as they pass): what the instance sent and received on its
        "public" network, SSH and TLS overhead, installs and API calls included.
        """
        with self._traffic_lock:
            before = self._traffic_before.get(instance_id, (0, 0))
            box = self._sandboxes.get(instance_id)
            now = box.traffic if box is not None else (0, 0)
        return before[0] + now[0], before[1] + now[1]

    async def _read_meter(self, box: _Sandbox, fd: int) -> None:
        """Keep the totals pid 1 writes on the meter pipe (it ends when pid 1 dies)."""
        try:
            async for message in _messages(fd):
                up, down = message.get("up"), message.get("down")
                if isinstance(up, int) and isinstance(down, int):
                    box.traffic = (max(box.traffic[0], up), max(box.traffic[1], down))
                    box.metered.set()
        finally:
            os.close(fd)

    async def _last_reading(self, box: _Sandbox, timeout_s: float = 1.0) -> None:
        """Ask pid 1 for its totals now (SIGUSR1) and wait a moment for them, before it is killed."""
        box.metered.clear()
        try:
            signal.pidfd_send_signal(box.pidfd, signal.SIGUSR1)
        except (ProcessLookupError, OSError):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(box.metered.wait(), timeout_s)

    def exited(self, instance_id: int) -> int | None:
        """Exit code of the workload once the sandbox ended on its own (args runtype)."""
        box = self._sandboxes.get(instance_id)
        return None if box is None or box.stopping else box.exit_code

    def logs(self, instance_id: int) -> str:
        """The container log: what onstart (or the args workload) wrote to stdout/stderr."""
        box = self._sandboxes.get(instance_id)
        if box is None:
            return self._logs_after_stop.get(instance_id, "")
        return box.logs[0].tail(LOG_TAIL_BYTES)

    async def close(self) -> None:
        """Stop every sandbox, then the API relay."""
        await asyncio.gather(*(self.stop(i) for i in list(self._sandboxes)))
        await self._api.close()
        await self._public.close()
        if self._socket_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._socket_dir, True)
            self._socket_dir = None

    # ------------------------------------------------------------------ internals

    def pid1(self, instance_id: int) -> int | None:
        """Host pid of the sandbox's init (for tests and diagnostics)."""
        box = self._sandboxes.get(instance_id)
        return None if box is None else box.pid1_host

    def signal_ssh(self, instance_id: int, action: str) -> None:
        """``freeze`` (SIGSTOP), ``thaw`` (SIGCONT) or ``drop`` (SIGKILL the connections) an SSH link.

        pid 1 accepts every SSH connection and relays the API and the public ports; each
        connection is an ``sshd -i`` (and its privilege-separated children) under it. Freezing
        stops both, so open connections and new ones hang while the rest of the sandbox (its
        workers, its watchdog) runs on; dropping kills the sshd processes, which closes their
        connections, and leaves pid 1 to accept new ones.
        """
        pid1 = self.pid1(instance_id)
        if pid1 is None:
            raise ValueError(f"instance {instance_id} has no running sandbox")
        sshd = [pid for pid in _descendants(pid1) if _comm(pid).startswith("sshd")]
        if action == "drop":
            if not sshd and not self._root:
                raise ValueError("asyncssh's fallback server serves SSH inside pid 1: connections cannot be cut alone")
            targets, sig = sshd, signal.SIGKILL
        elif action in ("freeze", "thaw"):
            targets, sig = [pid1, *sshd], signal.SIGSTOP if action == "freeze" else signal.SIGCONT
        else:
            raise ValueError(f"unknown SSH action {action!r}; use freeze, thaw or drop")
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _make_socket_dir(self) -> str:
        """A directory for the relays' unix sockets: in state_dir, unless its path is too long
        for a socket name (107 bytes), then a private temporary one."""
        directory = self.state_dir / "sockets"
        if len(str(directory)) < 80:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            return str(directory)
        return tempfile.mkdtemp(prefix="vastemu-")

    def _limit(self, spec: SandboxSpec, pid: int) -> SandboxCgroup | None:
        """Put the launcher ``pid`` (not started yet) into a cgroup of its own, with the sandbox's limits."""
        # the offer's RAM (but never below what sshd and a worker need), at most memory_max_mb
        memory_mb = min(max(int(spec.cpu_ram_mb), MEMORY_MIN_MB), self.memory_max_mb)
        cgroup = self._limits.create(f"vastemu-{os.getpid()}-{spec.instance_id}-{secrets.token_hex(3)}",
                                     memory_mb * 2**20, self.pids_max)
        if cgroup is not None:
            cgroup.add(pid)
        return cgroup

    async def _until_ready(self, box: _Sandbox, status_r: int, report_r: int) -> None:
        """Pid 1's host pid from the launcher, then "ready" from pid 1; raise with pid 1's error."""
        launcher = asyncio.ensure_future(self._pid1_from_launcher(box, status_r))
        try:
            async for message in _messages(report_r):
                if "error" in message:
                    trace = message.get("trace")
                    raise RuntimeError(f"{message['error']}" + (f"\n{trace}" if trace else ""))
                if message.get("ready") is True:
                    await launcher  # it reported before pid 1 could start
                    return
            await launcher
            code = await box.process.wait()
            raise RuntimeError(f"its launcher exited with code {code} before pid 1 reported ready")
        finally:
            launcher.cancel()

    async def _pid1_from_launcher(self, box: _Sandbox, status_r: int) -> None:
        """The one line trusted to name a host pid: the launcher's, on a pipe the sandbox never holds."""
        async for message in _messages(status_r):
            if "error" in message:
                raise RuntimeError(str(message["error"]))
            if isinstance(message.get("pid"), int) and message["pid"] > 1:
                box.pid1_host = message["pid"]
                with contextlib.suppress(OSError):
                    box.pidfd = os.pidfd_open(message["pid"])
                return
        code = await box.process.wait()
        raise RuntimeError(f"its launcher exited with code {code} before reporting pid 1")

    async def _wait(self, box: _Sandbox) -> None:
        box.exit_code = await box.process.wait()

    def _environment(self, spec: SandboxSpec, mapped: dict[int, int],
                     host_gpus: list[gpu_mod.HostGPU]) -> dict[str, str]:
        env = {"PATH": _image_path(), "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash",
               "LANG": "C.UTF-8", "TERM": "xterm"}
        env.update(spec.env)
        env["PUBLIC_IPADDR"] = self.public_ipaddr
        for container_port, host_port in mapped.items():
            env[f"VAST_TCP_PORT_{container_port}"] = str(host_port)
        if host_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in host_gpus)
        elif spec.num_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(spec.num_gpus))
        return env

    @staticmethod
    def _session_env(spec: SandboxSpec, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str] | None]:
        """(the env of an SSH session, the SetEnv of sshd or None for the container's whole env)."""
        base = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash"}
        mode = spec.quirks.ssh_env
        if mode == "container":
            return env, None
        if mode == "image":  # what the image's own profile gives a login: its PATH and locale
            set_env = {"PATH": _image_path(), "LANG": "C.UTF-8"}
        else:
            set_env = {"PATH": DEFAULT_SESSION_PATH}
        return {**base, **set_env}, set_env

    def _bin_files(self, host_gpus: list[gpu_mod.HostGPU], cpu_view: bool) -> dict[str, str]:
        """The tools a sandbox gets in /run/vast-emu/bin (first on its PATH)."""
        files = {}
        if not host_gpus:
            files["nvidia-smi"] = f"#!{sys.executable} -IS\n" + self._fake_nvidia_smi
        if cpu_view:
            files["nproc"] = f"#!{sys.executable} -IS\n" + self._fake_nproc
        return files

    async def _allocate_gpus(self, spec: SandboxSpec) -> list[gpu_mod.HostGPU]:
        """Real GPUs for this rental where the host has enough free ones, else none (fake)."""
        if self._gpu_passthrough is False or spec.num_gpus <= 0:
            return []
        async with self._lock:
            if self._host_gpus is None:
                self._host_gpus = await asyncio.to_thread(gpu_mod.probe_host_gpus)
            free = [g for g in self._host_gpus if g.index not in self._gpus_taken]
            if len(free) >= spec.num_gpus:
                self._gpus_taken.update(g.index for g in free[: spec.num_gpus])
                return free[: spec.num_gpus]
        if self._gpu_passthrough:
            raise RuntimeError(f"instance {spec.instance_id} rents {spec.num_gpus} GPUs but only "
                               f"{len(free)} of the host's are free; rent fewer or stop one")
        if self._host_gpus:
            log.warning("instance %s: not enough free host GPUs, it gets fake ones", spec.instance_id)
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """Host pids of every process under ``root`` (read from /proc, children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _is_args_runtype(runtype: str) -> bool:
    return "args" in runtype.split()


def _image_path() -> str:
    """The "image's" PATH: the driver's tools, our interpreter's prefix, the system's."""
    bins = list(dict.fromkeys(os.path.join(p, "bin") for p in (sys.prefix, sys.base_prefix)))
    return ":".join(["/run/vast-emu/bin", *bins, "/usr/local/sbin", "/usr/local/bin",
                     "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def _launcher_env(env: dict[str, str]) -> dict[str, str]:
    """The container's env as pid 1 gets it, less what would steer the host side of the launch."""
    return {k: v for k, v in env.items()
            if not k.startswith(HOST_UNSAFE_ENV_PREFIXES) and k not in HOST_UNSAFE_ENV
            and "=" not in k and "\0" not in k + v}


def _listen(address: str, listening: bool = True) -> socket.socket:
    """A socket on a free port of ``address``: listening, or only bound (connections refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    if listening:
        sock.listen(128)
    return sock


def _fresh_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


async def _messages(fd: int):
    """The JSON objects, one per line, on pipe ``fd`` (a duplicate is read); other lines are skipped."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", 0))
    try:
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message
    finally:
        transport.close()
