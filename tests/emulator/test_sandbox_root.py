"""Run as root, an instance still cannot harm the host: the emulator's promise to its users.

The instance's root may write anywhere in its own view, but nothing reaches the host's
files, it cannot make the system directories writable, and it cannot signal host processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime
from tests.helpers.sandbox import requires_sandbox

pytestmark = [
    pytest.mark.sandbox, pytest.mark.root, requires_sandbox,
    pytest.mark.skipif(os.geteuid() != 0, reason="host-safety checks must run as root"),
]


def spec(instance_id: int, onstart: str) -> SandboxSpec:
    return SandboxSpec(
        instance_id=instance_id, image="vastai/pytorch", runtype="ssh_proxy", onstart=onstart, args=None,
        env={}, container_ports=(), authorized_keys=(), num_gpus=1, gpu_name="RTX_3090", gpu_ram_mb=24576,
        cpu_cores=2, cpu_ram_mb=8192, disk_gb=1, api_url="",
    )


def run_onstart(tmp_path: Path, onstart: str, marker: str) -> tuple[str, int]:
    """Run ``onstart`` in a fresh instance until it prints ``marker``; (log, host uid of pid 1)."""

    async def scenario() -> tuple[str, int]:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            await runtime.start(spec(21, onstart))
            uid = await asyncio.to_thread(host_uid, runtime.pid1(21))
            for _ in range(400):
                if marker in runtime.logs(21):
                    break
                await asyncio.sleep(0.05)
            return runtime.logs(21), uid
        finally:
            await runtime.close()

    return asyncio.run(asyncio.wait_for(scenario(), 60))


def host_uid(pid: int | None) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def test_instance_root_cannot_write_system_directories_nor_signal_host_processes(tmp_path: Path) -> None:
    probe = f"vastemu-probe-{uuid.uuid4().hex[:8]}"
    victim = subprocess.Popen(["sleep", "300"])
    site = next(p for p in sys.path if p.endswith("site-packages"))
    try:
        onstart = f"""
touch /usr/{probe} 2>/dev/null && echo "USR WRITABLE" || echo "usr read-only"
mount -o remount,rw /usr 2>/dev/null && echo "USR REMOUNTED" || echo "remount refused"
mount -o remount,rw,bind /usr 2>/dev/null && echo "USR REMOUNTED" || echo "bind remount refused"
touch /usr/{probe} 2>/dev/null && echo "USR WRITABLE" || echo "usr still read-only"
touch /etc/{probe} 2>/dev/null && echo "ETC WRITABLE" || echo "etc read-only"
touch {site}/{probe}.pth 2>/dev/null && echo "SITE WRITABLE" || echo "site-packages read-only"
umount /usr 2>/dev/null && echo "USR UNMOUNTED" || echo "umount refused"
kill -9 {victim.pid} 2>/dev/null && echo "KILLED HOST PID" || echo "no such process here"
grep -q VASTEMU_HOST_SECRET /proc/1/environ && echo "HOST ENV VISIBLE" || echo "host env hidden"
kill -9 -1 2>/dev/null; echo "kill -1 done"
mkdir -p /workspace /root /{probe}-newdir /tmp
echo x > /workspace/{probe} && echo x > /root/{probe} && echo x > /{probe}-newdir/f && echo x > /tmp/{probe} && echo "writes ok"
echo safety-done
"""
        os.environ["VASTEMU_HOST_SECRET"] = "s3cret"  # e.g. the user's VAST_API_KEY
        try:
            log, uid = run_onstart(tmp_path, onstart, "safety-done")
        finally:
            del os.environ["VASTEMU_HOST_SECRET"]
        assert "safety-done" in log, log
        for bad in ("USR WRITABLE", "USR REMOUNTED", "ETC WRITABLE", "SITE WRITABLE", "USR UNMOUNTED",
                    "KILLED HOST PID", "HOST ENV VISIBLE"):
            assert bad not in log, log
        assert "writes ok" in log and "host env hidden" in log and "remount refused" in log, log
        time.sleep(0.2)
        assert victim.poll() is None, "the instance killed a host process"
        for path in (f"/usr/{probe}", f"/etc/{probe}", f"{site}/{probe}.pth", f"/workspace/{probe}",
                     f"/root/{probe}", f"/{probe}-newdir", f"/tmp/{probe}"):
            assert not os.path.exists(path), f"{path} reached the host"
        assert uid >= 0x10000, f"the instance's root runs as host uid {uid}, not an unprivileged one"
    finally:
        victim.kill()
        victim.wait()


@pytest.fixture
def world_dir():
    """A directory nobody can use (pytest's own are private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="vastemu-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_unprivileged_user_gets_working_sandboxes(world_dir: Path) -> None:
    """The emulator run by an ordinary user (here: nobody): the instance boots, SSH works."""
    import shutil

    if not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs util-linux's setpriv and unshare")
    tmp_path = world_dir
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    for path in (key, key.with_suffix(".pub")):
        os.chown(path, 65534, 65534)
    script = tmp_path / "emu.py"
    script.write_text(f"""
import asyncio, os
from pathlib import Path
from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime

async def main():
    runtime = SandboxRuntime(Path({str(tmp_path / "state")!r}))
    spec = SandboxSpec(instance_id=5, image="i", runtype="ssh_proxy", onstart="echo booted as $(id -u)", args=None,
                       env={{}}, container_ports=(), authorized_keys=(Path({str(key)!r} + ".pub").read_text(),),
                       num_gpus=1, gpu_name="RTX_3090", gpu_ram_mb=24576, cpu_cores=1, cpu_ram_mb=1, disk_gb=1,
                       api_url="")
    try:
        ep = await runtime.start(spec)
        proc = await asyncio.create_subprocess_exec(
            "ssh", "-i", {str(key)!r}, "-p", str(ep.ports[22]), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "root@127.0.0.1", "echo ssh as $(id -u) on $(hostname)")
        await proc.wait()
        for _ in range(100):
            if "booted" in runtime.logs(5):
                break
            await asyncio.sleep(0.05)
        print(runtime.logs(5), end="")
        print("emulator uid", os.getuid())
    finally:
        await runtime.close()

asyncio.run(main())
""")
    # nobody cannot traverse /root (the interpreter) nor the checkout: show them at /mnt. The
    # site-packages are bound where the base interpreter keeps its own (in a virtualenv they are
    # elsewhere), so that they sit under the prefix the emulator shows its sandboxes.
    repo = Path(__file__).resolve().parents[2]
    prefix = Path(sys.base_prefix)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    inner_site = f"/mnt/py/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    command = (f"mkdir -p /mnt/py /mnt/src && mount --bind {prefix} /mnt/py && mount --bind {site} {inner_site} && "
               f"mount --bind {repo} /mnt/src && cd {tmp_path} && HOME={tmp_path} PYTHONPATH=/mnt/src:{inner_site} "
               f"setpriv --reuid=65534 --regid=65534 --clear-groups /mnt/py/bin/python {script}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert "emulator uid 65534" in out.stdout, out.stdout + out.stderr
    assert "booted as 0" in out.stdout and "ssh as 0 on C.5" in out.stdout, out.stdout + out.stderr
    assert "its SSH server is asyncssh's instead" in out.stderr  # the warning the user sees
