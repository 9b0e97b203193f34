"""Emulated instances as a user of Vast meets them: SSH, forwards, scp, ports, logs, GPUs.

Each test starts real sandboxes with :class:`SandboxRuntime` and talks to them only the
way a Vast user can: OpenSSH's ``ssh``/``scp``/``sftp`` against the mapped endpoints, the
mapped ``-p`` ports on 127.0.0.1 (the "public IP"), and the container log.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dask_vastai.emulator.sandbox import SandboxRuntime
from tests.helpers.sandbox import (
    SSH_OPTS,
    make_spec,
    requires_sandbox,
    run_scenario,
    ssh,
    wait_for_log,
)

pytestmark = [pytest.mark.sandbox, requires_sandbox]


async def run_tool(*argv: str, timeout_s: float = 30) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {out.decode()}"
    return out.decode()


async def http_get(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    return await asyncio.to_thread(get)


async def http_get_once_served(url: str, attempts: int = 100) -> str:
    """``http_get`` retried while nothing listens yet (a server the onstart starts, a forward)."""
    for _ in range(attempts - 1):
        try:
            return await http_get(url)
        except OSError:
            await asyncio.sleep(0.1)
    return await http_get(url)


async def host_service(greeting: bytes) -> tuple[asyncio.Server, int]:
    """A server on the host's 127.0.0.1 that sends ``greeting`` to whoever connects; (server, port)."""
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def read_port(port: int) -> str:
    """Python code (quoted for a shell) that prints what 127.0.0.1:``port`` sends, retrying 5 s."""
    return shlex.quote(
        "import socket, time\n"
        "for _ in range(50):\n"
        "    try:\n"
        f"        print(socket.create_connection(('127.0.0.1', {port}), 3).recv(100).decode()); break\n"
        "    except OSError: time.sleep(0.1)\n")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def test_instance_sees_nothing_of_the_host_and_is_reached_over_openssh(tmp_path: Path, key: Path) -> None:
    """The onstart cannot reach the host; the user reaches the instance with ssh -L/-R, scp, ports."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    cwd_file = Path.cwd() / "pyproject.toml"

    async def scenario() -> None:
        server, host_port = await host_service(b"hello from the host\n")
        onstart = f"""
python3 - <<'EOF'
import socket
try:
    socket.create_connection(("127.0.0.1", {host_port}), timeout=3)
    print("HOST PORT REACHABLE")
except OSError as exc:
    print("host port unreachable:", exc)
EOF
cat {secret} 2>/dev/null && echo "HOST TMP READABLE" || echo "tmp_path hidden"
test -e {cwd_file} && echo "HOST CWD VISIBLE" || echo "cwd hidden"
python3 -c "import dask_vastai" 2>/dev/null && echo "CHECKOUT IMPORTABLE" || echo "checkout not importable"
python3 -c "import distributed, socket; print('distributed', distributed.__version__, socket.gethostbyname(socket.gethostname()))"
echo "env: $FOO $PUBLIC_IPADDR $VAST_TCP_PORT_22 $VAST_TCP_PORT_8000 $HOME"
mkdir -p /workspace/www && echo "served from inside" > /workspace/www/index.txt
cd /workspace/www && nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
echo onstart-done
"""
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            ep = await runtime.start(make_spec(7, key, onstart=onstart, container_ports=(8000,)))
            assert set(ep.ports) == {22, 8000} and ep.public_ipaddr == "127.0.0.1"
            assert ep.ssh_host == "127.0.0.1" and ep.ssh_port not in ep.ports.values()
            log = await wait_for_log(runtime, 7, "onstart-done")
            assert "host port unreachable" in log and "HOST PORT REACHABLE" not in log
            assert "tmp_path hidden" in log and "HOST TMP READABLE" not in log
            assert "cwd hidden" in log and "checkout not importable" in log
            assert "distributed " in log and " 127.0.0.1\n" in log  # its own name resolves
            assert f"env: bar baz 127.0.0.1 {ep.ports[22]} {ep.ports[8000]} /root" in log

            # exec, through the direct port and through the "proxy" endpoint
            assert (await ssh(key, ep.ports[22], "hostname")).strip() == "C.7"
            assert "uid=0(root)" in await ssh(key, ep.ssh_port, "id")
            # the instance's env reaches SSH sessions too (Vast's do, via the image's profile)
            assert (await ssh(key, ep.ports[22], "echo $FOO")).strip() == "bar baz"

            # the mapped -p port reaches the server onstart started
            body = await http_get_once_served(f"http://127.0.0.1:{ep.ports[8000]}/index.txt")
            assert body == "served from inside\n"

            # -L: a local port to the server inside
            local = free_port()
            forward = await asyncio.create_subprocess_exec(
                "ssh", "-i", str(key), "-p", str(ep.ports[22]), *SSH_OPTS, "-N", "-o",
                "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:8000", "root@127.0.0.1")
            try:
                body = await http_get_once_served(f"http://127.0.0.1:{local}/index.txt")
                assert body == "served from inside\n"
            finally:
                forward.kill()
                await forward.wait()

            # -R: a port inside to the test's server on the host
            reached = await ssh(key, ep.ports[22], "python3", "-c", read_port(9000),
                                extra=("-o", "ExitOnForwardFailure=yes", "-R", f"9000:127.0.0.1:{host_port}"))
            assert reached.strip() == "hello from the host"

            # scp both ways (OpenSSH 9 scp speaks SFTP) and the legacy scp protocol
            up = tmp_path / "up.txt"
            up.write_text("uploaded\n")
            scp = ["scp", "-i", str(key), "-P", str(ep.ports[22]), *SSH_OPTS]
            await run_tool(*scp, str(up), "root@127.0.0.1:/root/up.txt")
            await run_tool(*scp, "-O", str(up), "root@127.0.0.1:/workspace/up-legacy.txt")
            assert (await ssh(key, ep.ports[22], "cat /root/up.txt /workspace/up-legacy.txt")) == "uploaded\n" * 2
            await run_tool(*scp, "root@127.0.0.1:/workspace/www/index.txt", str(tmp_path / "down.txt"))
            assert (tmp_path / "down.txt").read_text() == "served from inside\n"

            # sftp
            batch = tmp_path / "batch"
            batch.write_text(f"put {up} /tmp/sftp.txt\nls /tmp\n")
            out = await run_tool("sftp", "-i", str(key), "-P", str(ep.ports[22]), *SSH_OPTS, "-b", str(batch),
                                 "root@127.0.0.1")
            assert "sftp.txt" in out
        finally:
            await runtime.close()
            server.close()

    run_scenario(scenario())


def test_asyncssh_client_and_authorized_keys_from_onstart(tmp_path: Path, key: Path) -> None:
    """asyncssh (our tunnel's client) logs in; a key that onstart appends works, others do not."""
    import asyncssh

    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)

    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            onstart = f"echo '{other.with_suffix('.pub').read_text().strip()}' >> /root/.ssh/authorized_keys; echo keyed"
            ep = await runtime.start(make_spec(8, key, onstart=onstart))
            await wait_for_log(runtime, 8, "keyed")
            async with asyncssh.connect("127.0.0.1", ep.ports[22], username="root", client_keys=[str(key)],
                                        known_hosts=None) as conn:
                result = await conn.run("echo $VAST_TCP_PORT_22", check=True)
                assert result.stdout.strip() == str(ep.ports[22])
                async with conn.start_sftp_client() as sftp:
                    async with sftp.open("/workspace/f.txt", "w") as f:
                        await f.write("via asyncssh sftp")
                assert (await conn.run("cat /workspace/f.txt")).stdout == "via asyncssh sftp"
            assert "ok" in await ssh(other, ep.ports[22], "echo ok")
            jupyter = await runtime.start(make_spec(18, key, runtype="jupyter_proxy ssh_proxy"))
            assert "ok" in await ssh(key, jupyter.ssh_port + 1, "echo ok")  # as `vastai ssh-url` computes it
            with pytest.raises(AssertionError, match="Permission denied"):
                await ssh(stranger, ep.ports[22], "echo ok")
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_nvidia_smi_reports_the_rented_gpus(tmp_path: Path) -> None:
    onstart = ("nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits; "
               "nvidia-smi -L; nvidia-smi; echo CVD=$CUDA_VISIBLE_DEVICES; "
               "nvidia-smi --query-gpu=memory.total --format=csv; "
               "nvidia-smi --query-gpu=bogus --format=csv; echo rc=$?; echo smi-done")

    async def scenario() -> str:
        runtime = SandboxRuntime(tmp_path / "state", gpu_passthrough=False)
        try:
            await runtime.start(make_spec(9, onstart=onstart, num_gpus=2, gpu_name="RTX_4090", gpu_ram_mb=24564))
            return await wait_for_log(runtime, 9, "smi-done")
        finally:
            await runtime.close()

    log = run_scenario(scenario())
    csv = [line.split(", ") for line in log.splitlines() if line.startswith(("0, ", "1, "))]
    assert [row[:3] for row in csv] == [["0", "NVIDIA GeForce RTX 4090", "24564"],
                                        ["1", "NVIDIA GeForce RTX 4090", "24564"]]
    assert all(row[3].startswith("GPU-") for row in csv) and csv[0][3] != csv[1][3]
    assert f"GPU 1: NVIDIA GeForce RTX 4090 (UUID: {csv[1][3]})" in log
    assert "24564MiB" in log and "CVD=0,1" in log
    assert "memory.total [MiB]\n24564 MiB\n24564 MiB\n" in log  # header and units, as the driver's
    assert 'Field "bogus" is not a valid field to query.' in log and "rc=2" in log


def test_args_runtype_runs_the_entrypoint_and_reports_its_exit_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            ep = await runtime.start(make_spec(
                10, runtype="args", onstart="/bin/sh", args=["-c", "echo entry $FOO; test -e /run/sshd; exit 3"]))
            assert 22 not in ep.ports and ep.ssh_port is None
            for _ in range(400):
                if runtime.exited(10) is not None:
                    break
                await asyncio.sleep(0.05)
            assert runtime.exited(10) == 3
            assert "entry bar baz" in runtime.logs(10)
            await runtime.stop(10)
            assert "entry bar baz" in runtime.logs(10)  # vastai logs still works after the end
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_api_is_reachable_from_inside_at_the_same_url(tmp_path: Path) -> None:
    """The on-instance watchdog calls the API at the URL the client uses."""
    async def scenario() -> str:
        async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.readuntil(b"\r\n\r\n")
            body = b'{"seen": "' + request.split(b" ")[1] + b'"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(api, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            onstart = (f"python3 -c \"import urllib.request as u; print('api says', "
                       f"u.urlopen('{url}/api/v0/instances/11/').read().decode())\"; echo api-done")
            await runtime.start(make_spec(11, onstart=onstart, api_url=url))
            return await wait_for_log(runtime, 11, "api-done")
        finally:
            await runtime.close()
            server.close()

    assert 'api says {"seen": "/api/v0/instances/11/"}' in run_scenario(scenario())


def test_stop_kills_everything_and_closes_the_ports(tmp_path: Path, key: Path) -> None:
    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            ep = await runtime.start(make_spec(12, key, onstart="sleep 1000 & sleep 1000; echo never"))
            pid1 = runtime.pid1(12)
            assert pid1 is not None and alive(pid1)
            assert "ok" in await ssh(key, ep.ports[22], "echo ok")
            await runtime.stop(12)
            await runtime.stop(12)  # idempotent
            assert not alive(pid1)
            assert not (tmp_path / "state" / "12").exists()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", ep.ports[22])
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_with_one_uid_asyncssh_stands_in_for_openssh(tmp_path: Path, key: Path) -> None:
    """As an unprivileged user (one uid mapped) sshd cannot run; the user sees SSH work anyway."""
    async def scenario() -> None:
        server, host_port = await host_service(b"hello from the host\n")
        runtime = SandboxRuntime(tmp_path / "state", single_uid=True)
        try:
            ep = await runtime.start(make_spec(13, key, onstart="echo up > /workspace/up.txt"))
            assert (await ssh(key, ep.ports[22], "cat /workspace/up.txt; echo $FOO; id -u")).split("\n")[:3] == [
                "up", "bar baz", "0"]
            assert (await ssh(key, ep.ssh_port, "exit 5", check=False)) == (5, "")
            up = tmp_path / "up.txt"
            up.write_text("uploaded\n")
            await run_tool("scp", "-i", str(key), "-P", str(ep.ports[22]), *SSH_OPTS, str(up),
                           "root@127.0.0.1:/root/up.txt")
            assert await ssh(key, ep.ports[22], "cat /root/up.txt") == "uploaded\n"
            try:
                reached = await ssh(key, ep.ports[22], "python3", "-c", read_port(9000),
                                    extra=("-o", "ExitOnForwardFailure=yes", "-R", f"9000:127.0.0.1:{host_port}"))
            except AssertionError as exc:
                log = (tmp_path / "state" / "13" / "sshd.log").read_text()
                raise AssertionError(f"{exc}\n--- server log ---\n{log}") from None
            assert reached.strip() == "hello from the host"
        finally:
            await runtime.close()
            server.close()

    run_scenario(scenario())


def test_a_sandbox_that_cannot_boot_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        if not runtime._root:
            pytest.skip("OpenSSH runs only as root")
        runtime._sshd = "/nonexistent/sshd"  # an image whose sshd is broken
        try:
            with pytest.raises(RuntimeError, match="instance 15 failed to start") as failure:
                await runtime.start(make_spec(15, onstart="echo never"))
            assert "/nonexistent/sshd" in str(failure.value)  # the cause, in its own words
            assert runtime.logs(15) == "" and runtime.exited(15) is None
            assert not runtime._sandboxes and not runtime._slots
            assert not (tmp_path / "state" / "15").exists()
            await runtime.stop(15)  # harmless
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_sandboxes_die_with_a_killed_emulator(tmp_path: Path) -> None:
    """An emulator killed with SIGKILL leaves no instance running (nothing could stop it later)."""
    script = tmp_path / "emu.py"
    script.write_text(f"""
import asyncio, sys
from pathlib import Path
from dask_vastai.emulator.runtime import SandboxSpec
from dask_vastai.emulator.sandbox import SandboxRuntime

async def main():
    runtime = SandboxRuntime(Path({str(tmp_path / "state")!r}))
    spec = SandboxSpec(instance_id=1, image="i", runtype="ssh_proxy", onstart="sleep 1000", args=None, env={{}},
                       container_ports=(), authorized_keys=(), num_gpus=0, gpu_name="RTX_3090", gpu_ram_mb=1,
                       cpu_cores=1, cpu_ram_mb=1, disk_gb=1, api_url="")
    await runtime.start(spec)
    print(runtime.pid1(1), flush=True)
    await asyncio.sleep(1000)

asyncio.run(main())
""")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    emulator = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid1 = int(emulator.stdout.readline())
        assert alive(pid1)
    finally:
        emulator.kill()
        emulator.wait()
    for _ in range(100):
        if not alive(pid1) or open(f"/proc/{pid1}/stat").read().split(") ")[1][0] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the sandbox's pid 1 ({pid1}) outlived its killed emulator")


def test_identity_port_mapping_above_65535(tmp_path: Path) -> None:
    """``-p 70000:70000`` (Vast's identity mapping): serve on $VAST_TCP_PORT_70000 inside, same number outside."""
    async def scenario() -> None:
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            onstart = ("mkdir -p /w && echo same > /w/i.txt && cd /w && "
                       "python3 -m http.server $VAST_TCP_PORT_70000 --bind 127.0.0.1 >/dev/null 2>&1 &")
            ep = await runtime.start(make_spec(17, onstart=onstart, container_ports=(70000,)))
            port = ep.ports[70000]
            body = await http_get_once_served(f"http://127.0.0.1:{port}/i.txt")
            assert body == "same\n"
        finally:
            await runtime.close()

    run_scenario(scenario())


def test_instances_reach_each_others_mapped_ports_at_the_public_ip_and_nothing_else(
        tmp_path: Path, key: Path) -> None:
    """Direct mode: what one instance serves on a -p port, another reaches at PUBLIC_IPADDR:HOSTPORT."""
    async def scenario() -> None:
        server, host_port = await host_service(b"host only\n")
        runtime = SandboxRuntime(tmp_path / "state")
        try:
            a = await runtime.start(make_spec(31, key, container_ports=(8786,), onstart=(
                "mkdir -p /w && echo from-a > /w/a.txt && cd /w && "
                "python3 -m http.server 8786 --bind 127.0.0.1 >/dev/null 2>&1 &")))
            b = await runtime.start(make_spec(32, key))
            probe = shlex.quote(
                "import socket, sys, time, urllib.request\n"
                "for _ in range(50):\n"
                "    try:\n"
                f"        print(urllib.request.urlopen('http://127.0.0.1:{a.ports[8786]}/a.txt', timeout=3).read().decode().strip()); break\n"
                "    except OSError: time.sleep(0.1)\n"
                "try:\n"
                f"    print(socket.create_connection(('127.0.0.1', {host_port}), 3).recv(100))\n"
                "except OSError as e: print('host service unreachable')\n"
                "u = socket.socket(socket.AF_UNIX); u.connect('/run/vast-emu/public.sock')\n"
                f"u.sendall(b'CONNECT {host_port}\\n'); print('relay refused' if u.recv(100) == b'' else 'RELAYED')\n")
            out = await ssh(key, b.ports[22], "python3", "-c", probe)
            assert out.split("\n")[:3] == ["from-a", "host service unreachable", "relay refused"], out
            # a sandbox started later is announced to the earlier ones
            c = await runtime.start(make_spec(33, key, container_ports=(9000,), onstart=(
                "python3 -c \"import socket; s=socket.create_server(('127.0.0.1', 9000)); "
                "c,_=s.accept(); c.sendall(b'from-c')\" &")))
            out = await ssh(key, a.ports[22], "python3", "-c", read_port(c.ports[9000]))
            assert out.strip() == "from-c"
        finally:
            await runtime.close()
            server.close()

    run_scenario(scenario())
