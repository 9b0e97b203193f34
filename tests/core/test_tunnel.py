"""The SSH tunnel network against real OpenSSH servers, each in its own network namespace.

Each "instance" is a :class:`~tests.helpers.sandbox.SshdSandbox`: ``sshd`` in a network namespace
of ours and a mount/PID namespace of empty tmpfs, so what the onstart script and the supervisor
write never reaches this machine. The onstart script runs for real, with the env Vast injects.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dask_vastai.bootstrap import (
    PROBE_COMMAND,
    BootstrapConfig,
    Incarnation,
    incarnation_path,
    incarnation_payload,
    onstart_script,
    parse_probe,
)
from dask_vastai.tunnel import ClusterKey, InstanceLink, SSHEndpoint, TunnelHub
from tests.helpers.fake_vast import FakeVast
from tests.helpers.sandbox import SshdSandbox, requires_netns_sshd
from tests.helpers.waiting import until, wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.root, requires_netns_sshd]

@pytest.fixture
def key() -> ClusterKey:
    return ClusterKey.generate(comment="dask-vastai-test")


def test_connect_waits_for_the_key_then_runs_commands_and_files(tmp_path, key):
    box = SshdSandbox(tmp_path, "a").start()
    try:
        async def main() -> None:
            hub = TunnelHub(key, scheduler_port=1, stop_command=None)
            # The key is not authorized yet (the onstart has not run): connect keeps trying.
            connecting = asyncio.ensure_future(hub.connect("a", box.endpoint, timeout_s=20))
            await asyncio.sleep(1.5)
            assert not connecting.done()
            ssh = box.path("/root/.ssh")
            ssh.mkdir(exist_ok=True)
            (ssh / "authorized_keys").write_text(key.public_openssh + "\n")
            link = await connecting
            assert isinstance(link, InstanceLink)
            assert link.conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
            rc, out, _ = await link.run("echo $HOSTNAME-ok; ip -4 -o addr show dvtin | wc -l", timeout_s=10)
            assert rc == 0 and out.split()[1] == "1"  # we are inside the namespace
            rc, _, err = await link.run("echo boom >&2; exit 3", timeout_s=10, check=False)
            assert (rc, err.strip()) == (3, "boom")
            with pytest.raises(RuntimeError, match="status 3"):
                await link.run("exit 3", timeout_s=10)
            await link.put("/root/x/y/secret.pem", b"data" * 1000, mode=0o600)
            assert await link.get("/root/x/y/secret.pem") == b"data" * 1000
            _, out, _ = await link.run("stat -c %a /root/x/y/secret.pem; ls -a /root/x/y", timeout_s=10)
            assert out.split() == ["600", ".", "..", "secret.pem"]  # no temporary left behind
            lost: list[str] = []
            link.on_lost(lambda: lost.append("lost"))
            # A port busy on the client: expose_worker picks fresh ones and says which.
            with socket.socket() as squat:
                busy = (await hub.allocate_ports(1))[0]
                squat.bind(("127.0.0.1", busy))
                squat.listen()
                worker_port, nanny_port = await hub.expose_worker(link, busy, (await hub.allocate_ports(1))[0])
                assert worker_port != busy
            await hub.unexpose_worker(worker_port)
            await hub.close()
            assert link.closed.is_set() and lost == []  # closing on purpose is not a loss
            with pytest.raises(TimeoutError, match=rf"{box.ip}:2222.*ConnectionRefused"):
                await hub.connect("b", SSHEndpoint(box.ip, 2222), timeout_s=2)

        asyncio.run(main())
    finally:
        box.stop()


def test_link_loss_is_reported(tmp_path, key):
    box = SshdSandbox(tmp_path, "l", authorized_key=key.public_openssh).start()
    try:
        async def main() -> None:
            hub = TunnelHub(key, scheduler_port=1, keepalive_interval_s=1, keepalive_count_max=2)
            link = await hub.connect("l", box.endpoint, timeout_s=10)
            lost = asyncio.Event()
            link.on_lost(lost.set)
            # A silent drop: packets to the instance vanish (no FIN, no RST).
            down = await asyncio.create_subprocess_exec("ip", "netns", "exec", box.netns, "ip", "link", "set", "dvtin", "down")
            assert await down.wait() == 0
            t0 = time.monotonic()
            await asyncio.wait_for(lost.wait(), 15)
            assert link.closed.is_set()
            await asyncio.sleep(0.1)
            assert "l" not in hub.links  # forgotten: a new link will not mirror its forwards
            print(f"silent link loss noticed after {time.monotonic() - t0:.1f}s")
            await hub.close()

        asyncio.run(main())
    finally:
        box.stop()


def _incarnation(name: str, scheduler: str, security, ports: tuple[int, int], gpu: float) -> Incarnation:
    return Incarnation(
        worker_name=name,
        scheduler_address=scheduler,
        worker_port=ports[0],
        nanny_port=ports[1],
        nthreads=1,
        memory_limit=2 * 2**30,
        resources={"GPU": gpu, "CPU": 1.0, "MEMORY": float(2 * 2**30)},
        env={"CUDA_VISIBLE_DEVICES": "0", "SOME_SECRET": "hunter2"},
        tls_ca=security.tls_ca_file,
        tls_cert=security.tls_worker_cert,
        tls_key=security.tls_worker_key,
        death_timeout_s=30,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_instances_run_dask_through_the_tunnels(tmp_path, key, fake_vast):
    """Onstart -> connect -> probe -> forwards -> incarnations -> workers; then tasks, mesh, gather, TLS."""
    from distributed import Client, Scheduler, wait
    from distributed.security import Security

    vast = fake_vast  # on 127.0.0.1, not reachable from inside: these instances must not destroy themselves
    config = BootstrapConfig("t", key.public_openssh, vast.url, orphan_timeout_s=600, python=sys.executable)
    boxes = [
        SshdSandbox(tmp_path, tag, onstart=onstart_script(config),
                env={"CONTAINER_ID": str(100 + i), "CONTAINER_API_KEY": "instance-key"}).start()
        for i, tag in enumerate("xy")
    ]
    timings: dict[str, float] = {}

    async def main() -> None:
        security = Security.temporary()
        async with Scheduler(protocol="tls", host="127.0.0.1", port=0, security=security,
                             dashboard_address=":0") as scheduler:
            port = int(scheduler.address.rsplit(":", 1)[1])
            hub = TunnelHub(key, scheduler_port=port)
            t0 = time.monotonic()
            links = await asyncio.gather(*(hub.connect(f"inst-{b.ip}", b.endpoint, timeout_s=30) for b in boxes))
            probes = [parse_probe((await link.run(PROBE_COMMAND, timeout_s=60))[1]) for link in links]
            assert probes[0]["python"] == ".".join(map(str, sys.version_info[:3]))
            import distributed

            assert probes[0]["versions"]["distributed"] == distributed.__version__
            assert probes[0]["gpus"] == [] and probes[0]["cpus"] > 0 and probes[0]["memory_bytes"] > 0
            names = ["w-x", "w-y"]
            ports = await hub.allocate_ports(4)
            assert len(set(ports)) == 4 and port not in ports
            # Someone on y already listens on x's port: the mesh forward there fails, fresh ports replace it.
            squat = f"import socket,time;s=socket.socket();s.bind(('127.0.0.1',{ports[0]}));s.listen();time.sleep(120)"
            await links[1].run(f'setsid python3 -c "{squat}" >/dev/null 2>&1 &', timeout_s=10)
            await asyncio.sleep(0.5)
            exposed = [
                await hub.expose_worker(links[i], ports[2 * i], ports[2 * i + 1]) for i in range(2)
            ]
            assert exposed[0] != (ports[0], ports[1]) and exposed[1] == (ports[2], ports[3])
            await asyncio.gather(*(
                links[i].put(incarnation_path(names[i]),
                             incarnation_payload(_incarnation(names[i], scheduler.address, security,
                                                              exposed[i], gpu=1.0 if i == 0 else 0.0)))
                for i in range(2)
            ))
            while {w.name for w in scheduler.workers.values()} != set(names):
                assert time.monotonic() - t0 < 90, f"workers did not register: {boxes[0].path('/var/log/dask-vastai.log').read_text()}"
                await asyncio.sleep(0.1)
            timings["connect_to_registered_s"] = time.monotonic() - t0
            by_name = {w.name: w for w in scheduler.workers.values()}
            assert by_name["w-x"].resources == {"GPU": 1.0, "CPU": 1.0, "MEMORY": float(2 * 2**30)}
            assert by_name["w-x"].address == f"tls://127.0.0.1:{exposed[0][0]}"
            assert by_name["w-x"].nanny == f"tls://127.0.0.1:{exposed[0][1]}"

            async with Client(scheduler.address, security=security, asynchronous=True) as client:
                # resources: only the worker with a GPU runs it
                where = await client.submit(lambda: os.environ["CUDA_VISIBLE_DEVICES"] + socket.gethostname(),
                                            resources={"GPU": 1}, pure=False)
                assert where.startswith("0")
                assert await client.submit(lambda: 1, resources={"GPU": 1}, pure=False).result() == 1
                # mesh: a task on y needs data held on x (y fetches it through the client)
                a = client.submit(lambda: b"x" * 1000, workers=["w-x"], pure=False)
                b = client.submit(len, a, workers=["w-y"], pure=False)
                assert await b == 1000
                # y's own record of the transfer (who_has races y dropping its copy once b is done)
                fetched = await client.run(
                    lambda dask_worker: [(t["who"], list(t["keys"])) for t in dask_worker.transfer_incoming_log],
                    workers=[by_name["w-y"].address])
                assert fetched[by_name["w-y"].address] == [(by_name["w-x"].address, [a.key])]
                # task round trip through the tunnel
                samples = []
                for i in range(30):
                    s = time.perf_counter()
                    await client.submit(lambda v: v + 1, i, workers=["w-y"], pure=False)
                    samples.append(time.perf_counter() - s)
                timings["round_trip_ms_p50"] = sorted(samples)[15] * 1000
                # 50 MB gather from an instance
                big = client.submit(lambda: os.urandom(50 * 2**20), workers=["w-x"], pure=False)
                await asyncio.wait_for(wait([big]), 60)
                s = time.perf_counter()
                data = await client.gather(big)
                timings["gather_MBps"] = 50 * 2**20 / (time.perf_counter() - s) / 1e6
                assert len(data) == 50 * 2**20
            # A connection to a forwarded worker port without the cluster's certificate is refused;
            # the same connection with it works (so the refusal is about the certificate).
            from distributed.comm import connect

            worker = f"tls://127.0.0.1:{exposed[0][0]}"
            comm = await connect(worker, timeout=5, **security.get_connection_args("client"))
            await comm.close()
            with pytest.raises((OSError, TimeoutError)):
                comm = await connect(worker, timeout=5, **Security.temporary().get_connection_args("client"))
                await asyncio.wait_for(comm.read(), 5)
            with pytest.raises((OSError, TimeoutError)):  # plain, unauthenticated tcp
                comm = await connect(f"tcp://127.0.0.1:{exposed[0][0]}", timeout=5)
                await asyncio.wait_for(comm.read(), 5)
            # The supervisor logs the env names, never the values nor the TLS key.
            log = boxes[0].path("/var/log/dask-vastai.log").read_text()
            assert "SOME_SECRET" in log and "hunter2" not in log and "PRIVATE KEY" not in log
            # Closing a link stops its workers (process group gone) and drops them from the scheduler.
            assert boxes[0].processes("dask_worker")
            t_close = time.monotonic()
            await hub.close_link(links[0])
            timings["close_link_s"] = time.monotonic() - t_close
            # The workers stopped while the tunnel was up: they said goodbye to the scheduler.
            await until(lambda: "w-x" not in {w.name for w in scheduler.workers.values()}, 2, "w-x to leave")
            await until(lambda: not boxes[0].processes("dask_worker") and not boxes[0].processes("multiprocessing"),
                        5, "the worker's processes on x to end")
            log = boxes[0].path("/var/log/dask-vastai.log").read_text()
            assert "its incarnation file was removed" in log and "SIGKILL" not in log
            assert "w-y" in {w.name for w in scheduler.workers.values()}
            await hub.close()
            await until(lambda: not boxes[1].processes("dask_worker"), 20, "the worker's processes on y to end")
            assert vast.deletes == []

    try:
        asyncio.run(main())
    finally:
        for b in boxes:
            b.stop()
    print("tunnel timings:", json.dumps(timings))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_orphaned_instances_destroy_themselves(tmp_path, key):
    """No client ever (the loader) and a client that stops beating (the supervisor): both DELETE."""
    boxes: list[SshdSandbox] = []
    vasts: list[FakeVast] = []
    try:
        for tag, cid in (("n", "7"), ("h", "8")):
            box = SshdSandbox(tmp_path, tag, env={"CONTAINER_ID": cid, "CONTAINER_API_KEY": f"key-{cid}"}).start()
            boxes.append(box)
            # The API listens on the host side of the sandbox's veth: reachable from inside, as Vast is.
            vasts.append(FakeVast(box.host_ip))
            config = BootstrapConfig("o", key.public_openssh, vasts[-1].url, orphan_timeout_s=4, python=sys.executable)
            box.path("/run/dvt/onstart.sh").write_text(onstart_script(config))
            subprocess.Popen(
                ["nsenter", "-t", str(box.init_pid()), "-n", "-m", "-p", "env", "-i", "PATH=/usr/bin:/bin",
                 "HOME=/root", f"CONTAINER_ID={cid}", f"CONTAINER_API_KEY=key-{cid}", "sh", "/run/dvt/onstart.sh"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

        async def main() -> None:
            hub = TunnelHub(key, scheduler_port=1)
            link = await hub.connect("h", boxes[1].endpoint, timeout_s=20)
            await link.run(PROBE_COMMAND, timeout_s=60)  # installs the supervisor: the loader becomes it
            for _ in range(8):  # 8 s of beats: longer than the orphan timeout, so no DELETE yet
                await link.heartbeat()
                await asyncio.sleep(1)
            assert vasts[1].deletes == []
            await hub.close()

        asyncio.run(main())
        wait_until(lambda: vasts[0].deletes and vasts[1].deletes, 30, "both instances to DELETE themselves")
        assert vasts[0].deletes == [("/api/v0/instances/7/", "Bearer key-7")]
        assert vasts[1].deletes == [("/api/v0/instances/8/", "Bearer key-8")]
        assert "loader: no client within the orphan timeout" in boxes[0].path("/var/log/dask-vastai.log").read_text()
        assert "supervisor: no heartbeat from the client" in boxes[1].path("/var/log/dask-vastai.log").read_text()
    finally:
        for box in boxes:
            box.stop()
        for vast in vasts:
            vast.shutdown()
