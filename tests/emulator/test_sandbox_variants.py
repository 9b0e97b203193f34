"""Host variants in real sandboxes, as a Vast user meets them: through SSH, ports and the log.

Blocked direct ports (hang or refuse, for the client and for other instances), an SSH
proxy that refuses ``ssh -R`` or is dead until one reboot, SSH sessions without the
container's environment, templates without ``CONTAINER_API_KEY``, and the CPU/memory
view an instance has of its host.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from dask_vastai.emulator.runtime import SandboxQuirks
from dask_vastai.emulator.sandbox import SandboxRuntime
from tests.helpers.control_plane import call, rent, wait_status
from tests.helpers.sandbox import (
    SSH_OPTS,
    make_spec,
    requires_sandbox,
    run_scenario,
    ssh,
    wait_for_log,
)

pytestmark = [pytest.mark.sandbox, requires_sandbox]


def connect_outcome(port: int, timeout_s: float = 1.5) -> str:
    """"open", "refused" or "hangs": what a TCP connect to 127.0.0.1:port meets."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout_s).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "hangs"


PROBE = """
import socket, sys
for port in map(int, sys.argv[1:]):
    try:
        socket.create_connection(('127.0.0.1', port), 1.5).close(); print('open')
    except ConnectionRefusedError: print('refused')
    except TimeoutError: print('hangs')
"""


async def ssh_with_stderr(key: Path, port: int, *command: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """(exit status, stdout + stderr) of OpenSSH's client."""
    proc = await asyncio.create_subprocess_exec(
        "ssh", "-i", str(key), "-p", str(port), *SSH_OPTS, *extra, "root@127.0.0.1", *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode()


REMOTE_FORWARD = ("-o", "ExitOnForwardFailure=yes", "-R", "9000:127.0.0.1:9")


def test_blocked_direct_ports_hang_or_refuse_for_the_client_and_other_instances(tmp_path: Path, key: Path) -> None:
    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            hanging = await runtime.start(make_spec(41, key, container_ports=(8000,), quirks=SandboxQuirks(
                blocked_ports=(22, 8000), blocked_mode="hang")))
            refusing = await runtime.start(make_spec(42, key, container_ports=(8000,), quirks=SandboxQuirks(
                blocked_ports=(22,), blocked_mode="refuse", proxy="dead"), onstart=(
                "python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &")))
            plain = await runtime.start(make_spec(43, key))
            started = time.monotonic()
            assert await asyncio.to_thread(connect_outcome, hanging.ports[22]) == "hangs"
            assert time.monotonic() - started >= 1.4, "a hanging port answers nothing until the client gives up"
            assert await asyncio.to_thread(connect_outcome, hanging.ports[8000]) == "hangs"  # all ports
            assert await asyncio.to_thread(connect_outcome, refusing.ports[22]) == "refused"
            assert await asyncio.to_thread(connect_outcome, refusing.ports[8000]) in ("open", "refused")
            # OpenSSH's client meets a timeout; the proxy endpoint still works
            code, out = await ssh_with_stderr(key, hanging.ports[22], "true", extra=("-o", "ConnectTimeout=2"))
            assert code == 255 and "timed out" in out, out
            assert (await ssh(key, hanging.ssh_port, "hostname")).strip() == "C.41"
            # a dead proxy refuses, and the container log says why
            assert await asyncio.to_thread(connect_outcome, refusing.ssh_port) == "refused"
            await wait_for_log(runtime, 42, f"remote port forwarding failed for listen port {refusing.ssh_port}")
            # another instance meets the same: hangs, refusals, and the unblocked port open
            for _ in range(50):
                out = await ssh(key, plain.ports[22], "python3", "-c", shlex.quote(PROBE), str(hanging.ports[22]),
                                str(hanging.ports[8000]), str(refusing.ports[22]), str(refusing.ports[8000]))
                if out.split()[3] == "open":
                    break
                await asyncio.sleep(0.1)  # the http.server is still starting
            assert out.split() == ["hangs", "hangs", "refused", "open"]
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_proxy_refuses_remote_forwards_until_the_instance_is_rebooted(tmp_path: Path, key: Path) -> None:
    with Emulator(runtime="sandbox", rate_limits=False, boot_delay_s=0, state_dir=tmp_path / "emu",
                  variants={"proxy_broken": "all"}) as emu:
        call(emu, "POST", "/api/v0/ssh/", {"ssh_key": key.with_suffix(".pub").read_text()})
        iid = rent(emu, 1000001, runtype="ssh_direc ssh_proxy")
        row = wait_status(emu, iid, "running", 30)

        async def forwards(row: dict) -> tuple[tuple[int, str], tuple[int, str], str]:
            proxy = await ssh_with_stderr(key, row["ssh_port"], "echo ok", extra=REMOTE_FORWARD)
            direct = await ssh_with_stderr(key, int(row["ports"]["22/tcp"][0]["HostPort"]), "echo ok",
                                           extra=REMOTE_FORWARD)
            # -W is a local forward (-L) on stdio: to the API, which an instance reaches at its own URL
            forward = await asyncio.create_subprocess_exec(
                "ssh", "-i", str(key), "-p", str(row["ssh_port"]), *SSH_OPTS, "-W", f"127.0.0.1:{emu.port}",
                "root@127.0.0.1", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            forward.stdin.write(b"GET /api/v0/users/current/ HTTP/1.0\r\n\r\n")  # stdin stays open: no EOF
            answer = await asyncio.wait_for(forward.stdout.readline(), 30)
            forward.kill()
            await forward.wait()
            return proxy, direct, answer.decode().strip()

        proxy, direct, local = run_scenario(forwards(row))
        assert proxy[0] == 255 and "remote port forwarding failed" in proxy[1], proxy
        assert direct == (0, "ok\n") and local.endswith(" 401 Unauthorized"), "-R direct and -L via the proxy work"
        assert call(emu, "PUT", f"/api/v0/instances/reboot/{iid}/")[0] == 200
        row = wait_status(emu, iid, "running", 30)
        proxy, _, _ = run_scenario(forwards(row))
        assert proxy == (0, "ok\n"), "one reboot mends it"


@pytest.mark.parametrize("single_uid", [False, True], ids=["openssh", "asyncssh"])
def test_ssh_sessions_see_the_container_env_or_not(tmp_path: Path, key: Path, single_uid: bool) -> None:
    show = ('echo "[$FOO][$CONTAINER_API_KEY][$VAST_TCP_PORT_22]"; echo "$PATH"; '
            'echo $(tr "\\0" "\\n" < /proc/1/environ | grep -c "^CONTAINER_API_KEY=sekrit$")'
            '$(tr "\\0" "\\n" < /proc/1/environ | grep -c "^LD_PRELOAD="); '
            'test -e /root/.ssh/environment && echo env-file || echo no-env-file')
    env = {"CONTAINER_ID": "51", "CONTAINER_API_KEY": "sekrit", "FOO": "bar baz", "LD_PRELOAD": "/nonexistent.so"}

    async def scenario() -> dict[str, list[str]]:
        runtime = SandboxRuntime(tmp_path / "state", single_uid=single_uid)
        seen = {}
        try:
            for i, mode in enumerate(("container", "image", "none")):
                ep = await runtime.start(make_spec(51 + i, key, env=env, quirks=SandboxQuirks(
                    ssh_env=mode, proxy="no_remote_forward"), onstart="echo \"onstart [$CONTAINER_API_KEY]\""))
                seen[mode] = (await ssh(key, ep.ports[22], show)).splitlines()
                assert "onstart [sekrit]" in await wait_for_log(runtime, 51 + i, "onstart")
                if mode == "none":  # the refusing proxy, with either SSH server
                    code, out = await ssh_with_stderr(key, ep.ssh_port, "echo ok", extra=REMOTE_FORWARD)
                    assert code == 255 and "remote port forwarding failed" in out, out
        finally:
            await runtime.close()
        return seen

    seen = run_scenario(scenario())
    port = seen["container"][0].rsplit("[", 1)[1]
    assert seen["container"][0] == f"[bar baz][sekrit][{port}" and port.rstrip("]").isdigit()
    assert seen["image"][0] == seen["none"][0] == "[][][]"
    assert "/bin" in seen["image"][1].split(":")[1], "the image's PATH: its Python first"
    assert seen["none"][1] == "/run/vast-emu/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for mode in seen:  # pid 1 has the container's env, as a container's entrypoint does, but never
        assert seen[mode][2] == "10", mode  # what steers the host's loader (it starts on the host)
    assert [seen[m][3] for m in seen] == ["env-file", "no-env-file", "no-env-file"]


def test_a_template_without_container_api_key(tmp_path: Path, key: Path) -> None:
    with Emulator(runtime="sandbox", rate_limits=False, boot_delay_s=0, state_dir=tmp_path / "emu",
                  variants={"container_api_key": "absent"}) as emu:
        call(emu, "POST", "/api/v0/ssh/", {"ssh_key": key.with_suffix(".pub").read_text()})
        iid = rent(emu, 1000001, runtype="ssh_proxy", onstart="echo \"onstart key=[$CONTAINER_API_KEY] id=$CONTAINER_ID\"")
        row = wait_status(emu, iid, "running", 30)
        out = run_scenario(ssh(key, row["ssh_port"], "echo \"ssh key=[$CONTAINER_API_KEY]\"; "
                                                     "tr '\\0' '\\n' < /proc/1/environ | grep -c CONTAINER_ || true"))
        assert out.splitlines() == ["ssh key=[]", "1"], "pid 1 has CONTAINER_ID only"
        _, body, _ = call(emu, "PUT", f"/api/v0/instances/request_logs/{iid}/", {})
        for _ in range(50):
            try:
                log = subprocess.run(["curl", "-sf", body["result_url"]], capture_output=True, text=True).stdout
            except FileNotFoundError:
                pytest.skip("curl is not installed")
            if log:
                break
            time.sleep(0.1)
        assert f"onstart key=[] id={iid}" in log


@pytest.mark.parametrize("view", ["honest", "soft"])
def test_the_cpu_and_memory_an_instance_sees(tmp_path: Path, key: Path, view: str) -> None:
    cores, ram_mb = (1, 8192) if view == "honest" else (384, 1024 * 1024)
    probe = ("nproc; python3 -c 'import os; print(os.cpu_count()); print(len(os.sched_getaffinity(0)))'; "
             "grep -c ^processor /proc/cpuinfo; awk '/^MemTotal/ {print $2}' /proc/meminfo; "
             "python3 -c 'import psutil; print(psutil.virtual_memory().total // 2**20, psutil.cpu_count())' "
             "2>/dev/null || echo no-psutil")

    async def scenario() -> list[str]:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            ep = await runtime.start(make_spec(61, key, quirks=SandboxQuirks(cpu_view=(cores, ram_mb))))
            return (await ssh(key, ep.ports[22], probe)).split()
        finally:
            await runtime.close()

    out = run_scenario(scenario())
    machine = len(__import__("os").sched_getaffinity(0))
    assert out[:2] == [str(cores), str(cores)], "nproc and os.cpu_count() say the view's cores"
    assert out[2] == str(min(cores, machine)), "the affinity: at most the machine's, narrowed to honest cores"
    assert out[3:5] == [str(cores), str(ram_mb * 1024)], "/proc/cpuinfo and /proc/meminfo"
    if out[5] != "no-psutil":
        assert out[5:7] == [str(ram_mb), str(cores)]
