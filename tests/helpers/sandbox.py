"""Where tests run instances: the emulator's sandboxes, or sshd in a network namespace of ours.

- :data:`SANDBOX_OK` / :data:`SANDBOX_WHY` and the :data:`requires_sandbox` skip mark: whether the
  emulator's real sandboxes (``SandboxRuntime``) can run here, and if not why (the ``sandbox``
  fixture in ``conftest.py`` skips with the same sentence).
- :class:`SshdSandbox` and its :data:`requires_netns_sshd` skip mark: one fake instance without
  the emulator, OpenSSH's ``sshd`` in its own network namespace (its own 127.0.0.1; a veth pair
  with 10.231.x.y addresses is its only way in) and a mount/PID namespace where ``/root``,
  ``/run``, ``/var/log`` and ``/tmp`` are empty tmpfs (the interpreter's prefix is bound back
  read-only), so what the onstart script and the supervisor write never reaches this machine.
  Needs root, iproute2 and sshd. Used by ``tests/core/test_tunnel.py`` and
  ``benchmarks/tunnel_throughput.py``.
- How a user meets an emulated instance: :func:`ssh_options` / :data:`SSH_OPTS` (what they pass
  to OpenSSH), :func:`ssh` (OpenSSH's client), :func:`make_spec` (a ``SandboxSpec`` with test
  defaults), :func:`wait_for_log` (the container log) and :func:`run_scenario`.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime
from dask_vastai.tunnel import SSHEndpoint

T = TypeVar("T")


def _sandbox_support() -> tuple[bool, str]:
    ok, why = SandboxRuntime.available()
    return ok, "" if ok else f"sandbox runtime unavailable here: {why}"


#: whether the emulator's sandboxes run on this machine, and if not, why (a sentence)
SANDBOX_OK, SANDBOX_WHY = _sandbox_support()
requires_sandbox = pytest.mark.skipif(not SANDBOX_OK, reason=SANDBOX_WHY)

requires_netns_sshd = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not Path("/usr/sbin/sshd").exists(),
    reason="needs root, iproute2 and OpenSSH's sshd to build network namespaces",
)


def ssh_options(connect_timeout_s: int = 10) -> list[str]:
    """OpenSSH client options for an emulated instance: no host-key prompts, no agent, no chatter."""
    return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={connect_timeout_s}"]


SSH_OPTS = ssh_options()


#: /proc/net/tcp{,6} addresses of loopback: 127.0.0.1, ::1 and ::ffff:127.0.0.1
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def listening_sockets(proc_net_tcp: str) -> list[tuple[str, int]]:
    """(address, port) of the LISTEN sockets in ``cat /proc/net/tcp /proc/net/tcp6`` text
    (read inside an instance, which has neither ``ss`` nor ``netstat`` for sure)."""
    out = []
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
            address, port = fields[1].rsplit(":", 1)
            out.append((address, int(port, 16)))
    return out


def public_listeners(proc_net_tcp: str) -> set[int]:
    """The ports listening beyond loopback."""
    return {port for address, port in listening_sockets(proc_net_tcp) if address not in LOOPBACK}


def make_spec(instance_id: int, key: Path | None = None, **overrides: Any) -> SandboxSpec:
    """What the control plane hands the runtime for one rental: 2 RTX 3090s, ``key`` authorized."""
    fields = dict(
        instance_id=instance_id, image="vastai/pytorch", runtype="ssh_proxy", onstart=None, args=None,
        env={"CONTAINER_ID": str(instance_id), "FOO": "bar baz"}, container_ports=(),
        authorized_keys=(key.with_suffix(".pub").read_text(),) if key else (),
        num_gpus=2, gpu_name="RTX_3090", gpu_ram_mb=24576, cpu_cores=4, cpu_ram_mb=16384, disk_gb=1,
        api_url="",
    )
    fields.update(overrides)
    return SandboxSpec(**fields)


async def wait_for_log(runtime: SandboxRuntime, instance_id: int, text: str, timeout_s: float = 20) -> str:
    """The container log of ``instance_id`` once ``text`` is in it (``vastai logs``, polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = runtime.logs(instance_id)
        if text in log:
            return log
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log of instance {instance_id} after {timeout_s} s:\n"
                         f"{runtime.logs(instance_id)}")


async def ssh(key: Path, port: int, *command: str, extra: tuple[str, ...] = (), timeout_s: float = 30,
              check: bool = True):
    """OpenSSH's client as a user runs it: stdout (or, unchecked, (exit status, stdout))."""
    proc = await asyncio.create_subprocess_exec(
        "ssh", "-i", str(key), "-p", str(port), *SSH_OPTS, *extra, "root@127.0.0.1", *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    if not check:
        return proc.returncode, out.decode()
    assert proc.returncode == 0, f"ssh {command} failed ({proc.returncode}): {err.decode()}"
    return out.decode()


def run_scenario(coro: Coroutine[Any, Any, T]) -> T:
    """Run one async test scenario to its end, two minutes at the most."""
    return asyncio.run(asyncio.wait_for(coro, 120))


def _interpreter_folders() -> list[str]:
    """The folders of this interpreter and its site-packages, outermost first.

    Bound back, read-only, into the sandbox after its tmpfs mounts (``/root``, ``/tmp``, ...)
    would hide them: a pyenv interpreter under ``/root``, a virtualenv under ``/tmp`` (whose
    ``bin/python`` links to its base interpreter, elsewhere), or both.
    """
    folders = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    outer = [f for f in folders if not any(f != o and f.startswith(o + os.sep) for o in folders)]
    if any(" " in f for f in outer):
        raise RuntimeError(f"the sandbox helper cannot bind folders with spaces: {outer}")
    return sorted(outer)


INTERPRETER_FOLDERS = _interpreter_folders()

SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /run/dvt/host_key
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile /root/.ssh/authorized_keys
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
MaxStartups 64
MaxSessions 64
Subsystem sftp /usr/lib/openssh/sftp-server
"""

SETUP = r"""
set -e
mount --make-rprivate /
i=0; for p in $KEEP; do mkdir -p "$T/keep$i"; mount --rbind "$p" "$T/keep$i"; i=$((i+1)); done
mount -t tmpfs -o mode=700 tmpfs /root
mount -t tmpfs tmpfs /run && mkdir -p /run/sshd /run/dvt && chmod 755 /run/sshd
i=0; for p in $KEEP; do mkdir -p "/run/dvt/keep$i"; mount --move "$T/keep$i" "/run/dvt/keep$i"; i=$((i+1)); done
cp "$T/sshd_config" "$T/host_key" /run/dvt/ && chmod 600 /run/dvt/host_key
[ -f "$T/onstart.sh" ] && cp "$T/onstart.sh" /run/dvt/
[ -f "$T/authorized_keys" ] && mkdir -p /root/.ssh && cp "$T/authorized_keys" /root/.ssh/
mount -t tmpfs tmpfs /var/log
mount -t tmpfs tmpfs /tmp
i=0; for p in $KEEP; do
  mkdir -p "$p" && mount --move "/run/dvt/keep$i" "$p" && mount -o remount,bind,ro "$p"; i=$((i+1))
done
cd /root
if [ -f /run/dvt/onstart.sh ]; then
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root CONTAINER_ID="$CID" CONTAINER_API_KEY="$CKEY" \
    sh /run/dvt/onstart.sh >/run/dvt/onstart.log 2>&1 &
fi
exec /usr/sbin/sshd -D -e -f /run/dvt/sshd_config
"""


def _free_subnet() -> int:
    """A /30 in 10.231.0.0/16 not already on this machine (other sandboxes may use 10.x too)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(200):
        k = random.randrange(1, 16000)
        if f"10.231.{k // 64}.{(k % 64) * 4 + 1}/" not in used:
            return k
    raise RuntimeError("no free 10.231.x.y/30 subnet")


class SshdSandbox:
    """One fake instance: sshd in its own network, mount and PID namespaces."""

    def __init__(self, tmp: Path, tag: str, *, onstart: str | None = None, authorized_key: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tag = tag
        self.dir = tmp / tag
        self.dir.mkdir(parents=True)
        k = _free_subnet()
        self.host_ip = f"10.231.{k // 64}.{(k % 64) * 4 + 1}"
        self.ip = f"10.231.{k // 64}.{(k % 64) * 4 + 2}"
        suffix = f"{os.getpid() % 100000}{tag}"[-9:]
        self.netns = f"dvt-{suffix}"
        self.veth = f"dvh{suffix}"
        (self.dir / "sshd_config").write_text(SSHD_CONFIG)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key")], check=True)
        if onstart is not None:
            (self.dir / "onstart.sh").write_text(onstart)
        if authorized_key is not None:
            (self.dir / "authorized_keys").write_text(authorized_key + "\n")
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 15) -> SshdSandbox:
        ip = ["ip"]
        subprocess.run(ip + ["netns", "add", self.netns], check=True)
        subprocess.run(ip + ["link", "add", self.veth, "type", "veth", "peer", "name", "dvtin"], check=True)
        subprocess.run(ip + ["link", "set", "dvtin", "netns", self.netns], check=True)
        subprocess.run(ip + ["addr", "add", f"{self.host_ip}/30", "dev", self.veth], check=True)
        subprocess.run(ip + ["link", "set", self.veth, "up"], check=True)
        inside = ip + ["netns", "exec", self.netns, "ip"]
        subprocess.run(inside + ["addr", "add", f"{self.ip}/30", "dev", "dvtin"], check=True)
        subprocess.run(inside + ["link", "set", "dvtin", "up"], check=True)
        subprocess.run(inside + ["link", "set", "lo", "up"], check=True)
        env = dict(os.environ, T=str(self.dir), KEEP=" ".join(INTERPRETER_FOLDERS), CID=self.env.get("CONTAINER_ID", ""),
                   CKEY=self.env.get("CONTAINER_API_KEY", ""))
        self.log = open(self.dir / "sshd.log", "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--pid", "--fork", "--kill-child",
             "--mount-proc", "sh", "-c", SETUP],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((self.ip, 22), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox sshd did not start: {(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.1)

    @property
    def endpoint(self) -> SSHEndpoint:
        return SSHEndpoint(self.ip, 22)

    def init_pid(self) -> int:
        """Host pid of the namespace's init (sshd): its /proc/<pid>/root is the sandbox's view."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def path(self, inside: str) -> Path:
        """A file of the sandbox, as seen from this machine."""
        return Path(f"/proc/{self.init_pid()}/root{inside}")

    def processes(self, needle: str) -> list[int]:
        """Host pids of the sandbox's processes whose command line contains ``needle``."""
        ns = os.readlink(f"/proc/{self.init_pid()}/ns/pid")
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if os.readlink(d / "ns/pid") == ns and needle in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
