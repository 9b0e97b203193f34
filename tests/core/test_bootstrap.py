"""What runs on the instance, run here: the onstart text, the probe, the loader, the supervisor.

The supervisor and loader take their paths as arguments, so they run on this machine in a
temporary folder (the namespace tests in ``test_tunnel.py`` run them at their real paths).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dask_vastai.bootstrap import (
    LOADER,
    ONSTART_MAX_CHARS,
    BootstrapConfig,
    Incarnation,
    incarnation_path,
    incarnation_payload,
    onstart_script,
    parse_probe,
    probe_command,
    supervisor_program,
)
from dask_vastai.tunnel import ClusterKey
from tests.helpers.fake_vast import FakeVast
from tests.helpers.waiting import until, wait_until

KEY = ClusterKey.generate(comment="dask-vastai-a-cluster")


def _config(**kw) -> BootstrapConfig:
    defaults = dict(cluster_name="c1", public_key=KEY.public_openssh, api_url="https://console.vast.ai",
                    orphan_timeout_s=600)
    return BootstrapConfig(**{**defaults, **kw})


def test_onstart_fits_vast_and_holds_no_secret():
    long = _config(cluster_name="a-rather-long-cluster-name-" * 3, api_url="https://console.vast.ai/some/prefix",
                   python="/opt/conda/envs/work/bin/python3.11")
    script = onstart_script(long)
    assert len(script) < ONSTART_MAX_CHARS
    assert KEY.public_openssh in script
    assert "PRIVATE KEY" not in script and "BEGIN" not in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    assert "/opt/conda/envs/work/bin/python3.11" in script


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"public_key": "-----BEGIN OPENSSH PRIVATE KEY-----"}, "private key"),
        ({"public_key": "not a key"}, "not one OpenSSH public key"),
        ({"api_url": "console.vast.ai"}, "must start with http"),
        ({"orphan_timeout_s": 0}, "positive"),
        ({"cluster_name": "x" * 3000}, "over Vast's limit"),
    ],
)
def test_onstart_rejects_bad_configuration_with_a_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        onstart_script(_config(**change))


def test_incarnation_file_names_and_payload():
    assert incarnation_path("w-3-gpu1") == "/root/.dask-vastai/incarnations/w-3-gpu1.json"
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="worker_name"):
            incarnation_path(bad)
    inc = _incarnation("w", "tls://127.0.0.1:1", (2, 3), tls=("ca", "cert", "key"))
    data = json.loads(incarnation_payload(inc))
    assert data["worker_port"] == 2 and data["resources"]["GPU"] == 1.0 and data["extra_args"] == []


def test_probe_reports_gpus_cpus_memory_versions_and_installs_the_supervisor(tmp_path):
    import dask
    import distributed

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA GeForce RTX 3090, 24576, GPU-aaa'\necho '1, NVIDIA A100-SXM4-80GB, 81920, GPU-bbb'\n")
    smi.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "python").write_text(sys.executable + "\n")
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    out = subprocess.run(["sh", "-c", probe_command(str(state))], env=env, capture_output=True, text=True, timeout=60)
    probe = parse_probe(out.stdout)
    assert probe["gpus"] == [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576, "uuid": "GPU-aaa"},
        {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920, "uuid": "GPU-bbb"},
    ]
    assert 0 < probe["cpus"] <= os.cpu_count()
    assert 0 < probe["memory_bytes"] <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert probe["python"] == ".".join(map(str, sys.version_info[:3])) and probe["executable"] == sys.executable
    assert probe["versions"]["dask"] == dask.__version__
    assert probe["versions"]["distributed"] == distributed.__version__
    assert (state / "supervisor.py").read_bytes() == supervisor_program()
    # no nvidia-smi at all: no GPUs, not an error
    smi.unlink()
    out = subprocess.run(["sh", "-c", probe_command(str(state))], env=env, capture_output=True, text=True, timeout=60)
    assert parse_probe(out.stdout)["gpus"] == []


def test_parse_probe_errors_say_what_came_back():
    with pytest.raises(ValueError, match="no JSON.*command not found"):
        parse_probe("sh: 1: python3: command not found\n")
    with pytest.raises(ValueError, match="no python3 on this image"):
        parse_probe('{"error": "no python3 on this image (tried python3)"}')
    with pytest.raises(ValueError, match="lacks"):
        parse_probe('{"gpus": []}')


def test_supervisor_program_runs_on_python_38_syntax():
    # It must run on any image: no syntax newer than 3.8 (ast of 3.11 can check feature_version).
    import ast

    ast.parse(supervisor_program().decode(), feature_version=(3, 8))
    ast.parse(LOADER, feature_version=(3, 8))


def _start(program: list[str], tmp: Path, api_url: str, orphan_s: float, env: dict[str, str] | None = None):
    """The loader or supervisor with this test's folder as its state, as the onstart starts it."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    args = [api_url, str(orphan_s), str(state / "heartbeat"), str(state), str(tmp / "dask-vastai.log")]
    return subprocess.Popen(
        [sys.executable, *program, *args],
        env={**os.environ, "CONTAINER_ID": "4242", "CONTAINER_API_KEY": "k-4242", **(env or {})},
        stdin=subprocess.DEVNULL if program[0] != "-" else subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _supervisor_file(tmp: Path) -> str:
    path = tmp / "supervisor.py"
    path.write_bytes(supervisor_program())
    return str(path)


def test_supervisor_destroys_its_rental_when_heartbeats_stop_retrying_429(tmp_path):
    vast = FakeVast(statuses=[429, 503])
    proc = _start([_supervisor_file(tmp_path)], tmp_path, vast.url, orphan_s=2)
    try:
        heartbeat = tmp_path / "state" / "heartbeat"
        for _ in range(5):  # beating for 2.5 s > the orphan timeout: alive
            heartbeat.write_text(str(time.time()))
            time.sleep(0.5)
        assert vast.deletes == [] and proc.poll() is None
        wait_until(lambda: proc.poll() is not None, 20, "the supervisor to destroy and exit")
        assert vast.deletes == [("/api/v0/instances/4242/", "Bearer k-4242")] * 3
        assert proc.returncode == 0
        log = (tmp_path / "dask-vastai.log").read_text()
        assert "no heartbeat from the client" in log and "HTTP 429" in log and "HTTP 503" in log
        assert log in proc.stdout.read().decode()  # the same lines reach `vastai logs`
    finally:
        proc.kill()
        vast.shutdown()


def test_loader_destroys_when_no_client_comes_and_hands_over_when_one_does(tmp_path, fake_vast):
    vast = fake_vast
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    proc = _start(["-"], lonely, vast.url, orphan_s=1.5)
    proc.stdin.write(LOADER.encode())
    proc.stdin.close()
    assert proc.wait(20) == 0
    assert vast.deletes == [("/api/v0/instances/4242/", "Bearer k-4242")]
    # with a client: it installs the supervisor, the loader becomes it (same pid, orphan clock kept)
    vast.deletes.clear()
    proc = _start(["-"], tmp_path, vast.url, orphan_s=3)
    proc.stdin.write(LOADER.encode())
    proc.stdin.close()
    try:
        time.sleep(1)
        (tmp_path / "state" / "supervisor.py").write_bytes(supervisor_program())
        log = tmp_path / "dask-vastai.log"
        wait_until(lambda: log.exists() and "supervisor: watching" in log.read_text(), 10, "the supervisor to take over")
        assert proc.poll() is None
        # never a heartbeat: destroyed about 3 s after the *loader* started, not after the handover
        wait_until(lambda: proc.poll() is not None, 15, "the supervisor to destroy")
        assert vast.deletes == [("/api/v0/instances/4242/", "Bearer k-4242")]
    finally:
        proc.kill()


def _incarnation(name: str, scheduler: str, ports: tuple[int, int], *, tls: tuple[str, str, str]) -> Incarnation:
    return Incarnation(
        worker_name=name, scheduler_address=scheduler, worker_port=ports[0], nanny_port=ports[1], nthreads=1,
        memory_limit=2**30, resources={"GPU": 1.0, "CPU": 1.0}, env={"MY_TOKEN": "s3cr3t"},
        tls_ca=tls[0], tls_cert=tls[1], tls_key=tls[2], death_timeout_s=30,
    )


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_supervisor_starts_replaces_and_stops_workers(tmp_path):
    """Incarnation file -> registered worker; new file -> old group killed, new one up; removed -> killed."""
    from distributed import Scheduler
    from distributed.security import Security

    from dask_vastai.tunnel import TunnelHub

    security = Security.temporary()
    tls = (security.tls_ca_file, security.tls_worker_cert, security.tls_worker_key)
    proc = _start([_supervisor_file(tmp_path)], tmp_path, "http://127.0.0.1:9", orphan_s=600)
    incs = tmp_path / "state" / "incarnations"
    incs.mkdir(parents=True)

    def write(inc: Incarnation) -> None:
        tmp = incs / f".{inc.worker_name}.tmp"
        tmp.write_bytes(incarnation_payload(inc))
        tmp.rename(incs / f"{inc.worker_name}.json")

    def pids() -> list[int]:
        log = (tmp_path / "dask-vastai.log").read_text()
        return [int(line.split("(pid ")[1].split(")")[0]) for line in log.splitlines() if "started worker" in line]

    async def main() -> None:
        async with Scheduler(protocol="tls", host="127.0.0.1", port=0, security=security,
                             dashboard_address=":0") as s:
            hub = TunnelHub(KEY, scheduler_port=0)  # only for its port allocator
            first = tuple(await hub.allocate_ports(2))
            write(_incarnation("w", s.address, first, tls=tls))
            await until(lambda: [w.name for w in s.workers.values()] == ["w"], 60, "worker w")
            (w,) = s.workers.values()
            assert w.address == f"tls://127.0.0.1:{first[0]}" and w.resources == {"GPU": 1.0, "CPU": 1.0}
            key_file = tmp_path / "state" / f"w-{first[0]}" / "key.pem"
            assert oct(key_file.stat().st_mode & 0o777) == "0o600"
            second = tuple(await hub.allocate_ports(2))
            write(_incarnation("w", s.address, second, tls=tls))
            await until(lambda: [w.address for w in s.workers.values()] == [f"tls://127.0.0.1:{second[0]}"],
                        60, "the new incarnation to replace the old")
            old, new = pids()
            await until(lambda: not _group_alive(old), 15, "the old process group to end")
            (incs / "w.json").unlink()
            await until(lambda: not s.workers and not _group_alive(new), 20, "the worker to stop")

    try:
        asyncio.run(main())
        log = (tmp_path / "dask-vastai.log").read_text()
        assert "MY_TOKEN" in log and "s3cr3t" not in log and "PRIVATE KEY" not in log
        assert "a new incarnation replaces it" in log and "its incarnation file was removed" in log
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
