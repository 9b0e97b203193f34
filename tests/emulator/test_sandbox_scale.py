"""Sixteen instances at once on a small machine: how long until all accept SSH, what each
costs in memory, and that nothing of them is left after stop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime
from tests.helpers.sandbox import requires_sandbox, ssh_options

pytestmark = [pytest.mark.sandbox, requires_sandbox]

N = 16
SSH_OPTS = ssh_options(connect_timeout_s=20)


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) in KiB summed over ``pids``."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            pass
    return pss, rss


def alive_not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sixteen_instances_come_up_together_and_leave_nothing(tmp_path: Path) -> None:
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    async def scenario() -> tuple[float, float, int, int, list[int]]:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            specs = [SandboxSpec(
                instance_id=100 + i, image="vastai/pytorch", runtype="ssh_proxy", onstart="sleep infinity",
                args=None, env={}, container_ports=(8786,), authorized_keys=(key.with_suffix(".pub").read_text(),),
                num_gpus=1, gpu_name="RTX_3090", gpu_ram_mb=24576, cpu_cores=2, cpu_ram_mb=8192, disk_gb=1,
                api_url="") for i in range(N)]
            t0 = time.monotonic()
            endpoints = await asyncio.gather(*(runtime.start(s) for s in specs))
            started_s = time.monotonic() - t0

            async def login(port: int) -> str:
                proc = await asyncio.create_subprocess_exec(
                    "ssh", "-i", str(key), "-p", str(port), *SSH_OPTS, "root@127.0.0.1", "hostname",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
                return out.decode().strip()

            names = await asyncio.gather(*(login(ep.ports[22]) for ep in endpoints))
            ssh_s = time.monotonic() - t0
            assert sorted(names) == sorted(f"C.{s.instance_id}" for s in specs)
            launchers = [runtime._sandboxes[s.instance_id].process.pid for s in specs]
            pids = await asyncio.to_thread(lambda: [p for pid in launchers for p in descendants(pid)])
            assert len(pids) >= 3 * N  # launcher, pid 1 and the onstart's sleep, at least
            pss, rss = await asyncio.to_thread(memory_kib, pids)
            return started_s, ssh_s, pss // N, rss // N, pids
        finally:
            await runtime.close()

    started_s, ssh_s, pss, rss, pids = asyncio.run(asyncio.wait_for(scenario(), 240))
    print(f"\n{N} sandboxes: all started after {started_s:.2f} s, all accepted SSH after {ssh_s:.2f} s; "
          f"per instance (idle, onstart sleeping): PSS {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB")
    assert ssh_s < 60
    time.sleep(0.2)
    leftovers = [p for p in pids if alive_not_zombie(p)]
    assert not leftovers, f"processes of stopped sandboxes are still alive: {sorted(leftovers)}"
    assert not any((tmp_path / "state").iterdir())
