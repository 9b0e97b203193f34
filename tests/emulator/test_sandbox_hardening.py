"""A hostile sandbox cannot reach the host through what the emulator hands it.

Its root runs whatever the onstart says: it must find no fd of the host's (no log file, no
status channel), must not name a pid for the host to kill, cannot fill the host's disk with
its log, and cannot take more memory or processes than its limits (cgroups, where the host
lets us make them).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.sandbox import make_spec, wait_for_log

pytestmark = pytest.mark.sandbox


@pytest.mark.timeout(120)
def test_the_workload_holds_no_fd_of_the_host_and_cannot_name_a_pid(sandbox, tmp_path: Path) -> None:
    from dask_vastai.emulator.sandbox import SandboxRuntime

    victim = subprocess.Popen(["sleep", "300"])  # a host process the sandbox would like killed
    forged = f'{{"pid": {victim.pid}}}\\n{{"ready": true}}\\n'
    onstart = (
        # every fd the onstart's shell holds, listed by a child writing to a file (a glob or a
        # command substitution would hold one more fd of the shell's own while it lists)
        "ls /proc/$$/fd > /tmp/fds; sed 's/^/fd /' /tmp/fds; "
        # and a forged report on every fd that would take one
        f"for n in $(seq 3 64); do if (printf '{forged}' >&$n) 2>/dev/null; then echo wrote-$n; fi; done; "
        "echo END-OF-ONSTART"
    )

    async def main() -> str:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            await runtime.start(make_spec(1, onstart=onstart))
            text = await wait_for_log(runtime, 1, "END-OF-ONSTART")
            assert runtime.pid1(1) != victim.pid
            await runtime.stop(1)
            return text
        finally:
            await runtime.close()

    try:
        text = asyncio.run(main())
        fds = sorted(int(line.split()[1]) for line in text.splitlines() if line.startswith("fd "))
        assert fds == [0, 1, 2], text
        assert "wrote-" not in text, text
        assert victim.poll() is None, "the host process named by the sandbox was signalled"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.timeout(120)
def test_a_flood_of_output_keeps_the_log_file_capped_and_its_tail(sandbox, tmp_path: Path) -> None:
    from dask_vastai.emulator.sandbox import LOG_TAIL_BYTES, SandboxRuntime

    cap = 1 << 21
    onstart = ("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 40000000; echo; echo END-OF-FLOOD; "
               "yes on-stderr | head -c 400000 >&2; echo; echo LAST-LINE")

    async def main() -> tuple[int, str]:
        runtime = SandboxRuntime(tmp_path / "state", log_max_bytes=cap)
        try:
            await runtime.start(make_spec(2, onstart=onstart))
            text = await wait_for_log(runtime, 2, "LAST-LINE", timeout_s=90)
            size = (tmp_path / "state" / "2" / "container.log").stat().st_size
            return size, text
        finally:
            await runtime.close()

    size, text = asyncio.run(main())
    assert size <= cap, f"the container log grew to {size} bytes"
    assert len(text.encode()) <= LOG_TAIL_BYTES
    assert text.rstrip().endswith("LAST-LINE") and "END-OF-FLOOD" in text


def _limits():
    from dask_vastai.emulator.sandbox.cgroups import CgroupLimits

    limits = CgroupLimits.detect()
    if limits.kind == "none":
        pytest.skip(f"no cgroup limits on this host: {limits.why}")
    return limits


@pytest.mark.timeout(120)
def test_memory_and_processes_are_limited_per_sandbox(sandbox, tmp_path: Path) -> None:
    from dask_vastai.emulator.sandbox import SandboxRuntime

    limits = _limits()
    hog = f"{sys.executable} -c 'b = bytearray(400 * 2**20); print(\"ALLOCATED\")'"
    forks = (f"{sys.executable} -c '"
             "import subprocess\n"
             "ps, refused = [], 0\n"
             "for i in range(120):\n"
             "    try: ps.append(subprocess.Popen([\"sleep\", \"30\"]))\n"
             "    except OSError: refused += 1\n"
             "print(\"STARTED\", len(ps), \"REFUSED\", refused)\n"
             "[p.kill() for p in ps]'")
    onstart = f"{hog}; echo hog-exit=$?; {forks}; echo END-OF-LIMITS"

    async def main() -> tuple[str, list[Path]]:
        runtime = SandboxRuntime(tmp_path / "state", memory_max_mb=200, pids_max=64)
        try:
            await runtime.start(make_spec(3, onstart=onstart))
            folders = list(runtime._sandboxes[3].cgroup.folders)
            assert all(f.is_dir() for f in folders)
            text = await wait_for_log(runtime, 3, "END-OF-LIMITS", timeout_s=90)
            await runtime.stop(3)
            return text, folders
        finally:
            await runtime.close()

    text, folders = asyncio.run(main())
    assert "ALLOCATED" not in text.splitlines() and "hog-exit=137" in text, f"({limits.kind}) {text[-2000:]}"
    started = int(text.split("STARTED ")[1].split()[0])
    assert started < 64 and "REFUSED" in text, text[-2000:]
    assert not any(f.exists() for f in folders), "the cgroups go with their sandbox"
