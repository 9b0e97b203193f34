"""Direct mode as a user meets it: a pool with network="auto" on three emulated hosts, one of
which blocks every direct port (a firewall), on the strict marketplace.

What must hold: the two open hosts' workers are reached at their public ports, the blocked
one's through the tunnel (said once); a task whose inputs come from both kinds runs, and data
moves between the kinds both ways; bytes between direct workers never pass this machine; the
cluster's cost, bandwidth included, matches the emulator's own meter; and once an instance is
released, its certificate (which its host still holds) opens nothing on the others.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dask_vastai.emulator import Emulator
from dask_vastai.tunnel import PORT_RANGE
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.sandbox

MB = 10**6
OPEN, BLOCKED = (30_001, 30_002), 30_003
OFFERS = [{"id": 1_000_001 + k, "machine_id": m, "gpu_name": "RTX 3090", "dph_base": 0.2 + 0.01 * k,
           "inet_up_cost": 0.02, "inet_down_cost": 0.01, "cpu_cores_effective": 4.0, "cpu_ram": 16384}
          for k, m in enumerate((*OPEN, BLOCKED))]


@pytest.fixture
def blocked_market(sandbox: None, tmp_path: Path):
    """The strict marketplace, with every direct port of one host blocked (SYNs dropped)."""
    with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict", catalog=OFFERS,
                  variants={"direct_blocked": f"machines:{BLOCKED}", "direct_blocked_ports": "all",
                            "direct_blocked_mode": "hang"}) as emu:
        yield emu


def _certificate_of(cluster: Any, name: str) -> dict[str, str]:
    """The files a worker's host holds: its certificate, key and the CA's (read over SSH, as root there)."""
    instance = cluster.workers[name]
    port = next(ws.address for ws in cluster.scheduler.workers.values() if ws.name == name).rsplit(":", 1)[1]
    folder = f"/root/.dask-vastai/{name}-{port}"

    async def read(file: str) -> str:
        return (await instance.link.run(f"cat {folder}/{file}", timeout_s=30))[1]

    return {f: cluster.sync(read, f) for f in ("ca.pem", "cert.pem", "key.pem")}


def _fetch_as(creds: dict[str, str], address: str, key: str) -> Any:
    """``get_data`` from ``address`` as a worker asks it, presenting ``creds``' certificate."""
    import asyncio

    from distributed.core import ConnectionPool
    from distributed.security import Security
    from distributed.worker import get_data_from_worker

    security = Security(require_encryption=True, tls_ca_file=creds["ca.pem"], tls_client_cert=creds["cert.pem"],
                        tls_client_key=creds["key.pem"])

    async def fetch() -> Any:
        pool = await ConnectionPool(connection_args=security.get_connection_args("client"), timeout=10)
        try:
            return (await get_data_from_worker(pool, [key], address, who=None))["data"][key]
        finally:
            await pool.close()

    return asyncio.run(asyncio.wait_for(fetch(), 60))


def test_auto_goes_direct_where_ports_answer_and_both_kinds_work_together(blocked_market: Emulator) -> None:
    import numpy as np
    from distributed import Client, wait

    from dask_vastai import VastAICluster

    emu = blocked_market
    with VastAICluster(
        gpu="RTX_3090", n=3, api_url=emu.url, api_key=emu.api_key, name="dn", quiet=True, boot_timeout=240,
        network="auto", worker_options={"nthreads": 1},
    ) as cluster, Client(cluster) as client:
        by_machine = {inst.record.offer.raw["machine_id"]: inst for inst in cluster.workers.values()}
        assert sorted(by_machine) == [*OPEN, BLOCKED]
        assert [by_machine[m].network for m in (*OPEN, BLOCKED)] == ["direct", "direct", "tunnel"]
        addresses = {name: a for a, name in ((a, w["name"]) for a, w in client.scheduler_info()["workers"].items())}
        d1, d2, t = (by_machine[m].name for m in (*OPEN, BLOCKED))
        for name in (d1, d2):  # reached at the public port Vast maps to its container port 70000
            assert addresses[name].endswith(f":{cluster.workers[name].record.instance.ports[70000]}")
        assert PORT_RANGE[0] <= int(addresses[t].rsplit(":", 1)[1]) <= PORT_RANGE[1], "the tunnel's address"
        said = [line for _, line in cluster._cluster_manager_logs if "use the SSH tunnel" in line]
        assert len(said) == 1 and f"instance {by_machine[BLOCKED].record.instance_id}:" in said[0], said

        # a task on d2 whose inputs come from d1 (direct) and t (tunnel); and direct -> tunnel
        x = client.submit(lambda: np.ones(20 * MB // 8), workers=[addresses[d1]], pure=False)
        y = client.submit(lambda: np.full(20 * MB // 8, 2.0), workers=[addresses[t]], pure=False)
        wait([x, y])
        ssh_before = {n: cluster.workers[n].record.ssh_traffic.up + cluster.workers[n].record.ssh_traffic.down
                      for n in (d1, d2)}
        z = client.submit(lambda a, b: float((a + b).sum()), x, y, workers=[addresses[d2]], pure=False)
        assert z.result() == 3.0 * (20 * MB // 8)
        assert client.submit(lambda a: float(a.sum()), x, workers=[addresses[t]], pure=False).result() == 20 * MB // 8
        d2_direct = cluster.workers[d2].record.direct_traffic

        def d2_received() -> bool:  # workers report their counters in heartbeats: up to one late
            cluster._count_traffic()
            return d2_direct.down >= 20 * MB

        wait_until(d2_received, 15, f"d1's array to reach d2 directly (d2's direct traffic: {d2_direct})")
        moved_over_ssh = {n: cluster.workers[n].record.ssh_traffic.up + cluster.workers[n].record.ssh_traffic.down
                          - ssh_before[n] for n in (d1, d2)}
        # x left d1 directly (it never passed here); y, a tunnel worker's, came to d2 through here
        assert moved_over_ssh[d1] < MB and 20 * MB <= moved_over_ssh[d2] < 25 * MB, moved_over_ssh

        # revocation: d1's host keeps its certificate, which opens d2 while d1 is live, then nothing
        keep = client.submit(lambda: b"secret of d2", workers=[addresses[d2]], pure=False)
        wait(keep)
        creds = _certificate_of(cluster, d1)
        assert _fetch_as(creds, addresses[d2], keep.key) == b"secret of d2"
        cluster.sync(cluster.release_instances, [d1])
        assert d1 not in {w["name"] for w in client.scheduler_info()["workers"].values()}
        with pytest.raises(Exception, match=r"(?i)closed|refused|reset|timed out|eof"):
            _fetch_as(creds, addresses[d2], keep.key)
        assert client.submit(lambda a: a[:6], keep, workers=[addresses[t]]).result() == b"secret"

    meter = emu.meter()
    assert meter["bandwidth_usd"] > 0
    assert cluster.bandwidth_cost == pytest.approx(meter["bandwidth_usd"], rel=0.05), (cluster.bandwidth_cost, meter)
    time_usd = sum(r.time_cost_usd for r in cluster.broker.records.values())
    assert time_usd == pytest.approx(meter["time_usd"], rel=0.005)
    assert re.search(r"bandwidth \$\d", repr(cluster)), repr(cluster)


PRICED = [{"id": 1_000_101 + k, "machine_id": 30_101 + k, "gpu_name": "RTX 3090", "dph_base": 0.25,
           "inet_up_cost": 0.05, "inet_down_cost": 0.03, "cpu_cores_effective": 4.0, "cpu_ram": 16384}
          for k in range(2)]


def _ask(security: Any, address: str, key: str) -> str:
    """How a direct listener answers ``get_data`` of ``key`` from ``security``'s certificate."""
    import asyncio

    from distributed.core import ConnectionPool
    from distributed.worker import get_data_from_worker

    async def fetch() -> str:
        pool = await ConnectionPool(connection_args=security.get_connection_args("client"), timeout=10)
        try:
            got = await get_data_from_worker(pool, [key], address, who=None)
            return f"answered: {got.get('status')} {sorted(got.get('data') or {})}"
        except Exception as e:  # what the stranger sees: the point of the test
            return f"refused: {type(e).__name__}: {e}"
        finally:
            await pool.close()

    return asyncio.run(asyncio.wait_for(fetch(), 60))


def test_direct_pair_moves_data_between_workers_directly_and_refuses_strangers(
    sandbox: None, tmp_path: Path
) -> None:
    """network="direct", 2 instances at an offer priced for bandwidth: a task on B whose inputs
    come from A and B gets A's bytes straight from A (B's listener counts them, this machine's
    SSH links carry almost none), a few hundred MB move, and the cluster's bill (bandwidth
    included) matches the emulator's meter; certificates the live-worker list does not name are
    refused at the public port; nothing stays rented."""
    import numpy as np
    from distributed import Client, wait
    from distributed.security import Security

    from dask_vastai import VastAICluster

    with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "emu",
                  profile="strict", catalog=PRICED, variants={"destroy_linger_s": "0"}) as emu:
        with VastAICluster(
            gpu="RTX_3090", n=2, api_url=emu.url, api_key=emu.api_key, name="dp", quiet=True,
            boot_timeout=240, network="direct", worker_options={"nthreads": 1},
        ) as cluster, Client(cluster) as client:
            assert [w.network for w in cluster.workers.values()] == ["direct", "direct"]
            addresses = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            a, b = addresses["dp-0"], addresses["dp-1"]
            for name, address in addresses.items():
                assert address.endswith(f":{cluster.workers[name].record.instance.ports[70000]}"), address

            def ssh_bytes() -> int:
                return sum(w.record.ssh_traffic.up + w.record.ssh_traffic.down for w in cluster.workers.values())

            x = client.submit(lambda: np.ones(50 * MB // 8), workers=[a], pure=False)
            y = client.submit(lambda: np.full(50 * MB // 8, 2.0), workers=[b], pure=False)
            wait([x, y])
            cluster._count_traffic()
            b_before = cluster.workers["dp-1"].record.direct_traffic
            direct_before, up_before, ssh_before = b_before.down, b_before.up, ssh_bytes()
            z = client.submit(lambda u, v: float((u + v).sum()), x, y, workers=[b], pure=False)
            assert z.result() == 3.0 * (50 * MB // 8)
            # a few hundred MB more between the workers, and 50 MB to this machine (from B's public port)
            for k in range(3):
                big = client.submit(np.full, 100 * MB // 8, float(k), workers=[a], pure=False)
                assert client.submit(lambda u: float(u.sum()), big, workers=[b], pure=False).result() == (
                    k * (100 * MB // 8))
                del big
            assert float(client.gather(y).sum()) == 2.0 * (50 * MB // 8)
            # B's listener reports what it received in its heartbeats, credited each traffic-interval
            b_direct = cluster.workers["dp-1"].record.direct_traffic
            wait_until(lambda: b_direct.down - direct_before >= 350 * MB and b_direct.up - up_before >= 50 * MB,
                       15, f"B's direct listener counted A's arrays in and y out: {b_direct}")
            moved_direct = b_direct.down - direct_before
            moved_ssh = ssh_bytes() - ssh_before
            assert 350 * MB <= moved_direct < 360 * MB, f"A's arrays reached B directly: {moved_direct}"
            # nothing of the 400 MB crossed the SSH links (only the workers' control messages did)
            assert moved_ssh < MB, moved_ssh

            # strangers at B's public port: another CA's certificate; this CA's for a name no live worker has
            # (A's own certificate, as A's host holds it, gets y: the same request can succeed)
            a_creds = _certificate_of(cluster, "dp-0")
            a_security = Security(require_encryption=True, tls_ca_file=a_creds["ca.pem"],
                                  tls_client_cert=a_creds["cert.pem"], tls_client_key=a_creds["key.pem"])
            assert _ask(a_security, b, y.key) == f"answered: OK {[y.key]}"
            refused = r"^refused: .*(?i:closed|refused|reset|timed out|eof|certificate|ssl)"
            stranger = _ask(Security.temporary(), b, y.key)
            assert re.search(refused, stranger), stranger
            creds = cluster.certificates.issue_worker("dp-9", address=None, nanny=None)
            unlisted = _ask(Security(require_encryption=True, tls_ca_file=creds.ca_pem,
                                     tls_client_cert=creds.cert_pem, tls_client_key=creds.key_pem), b, y.key)
            assert re.search(refused, unlisted), unlisted
            assert client.submit(lambda u: u[:2].tolist(), x, workers=[b]).result() == [1.0, 1.0]
            # 100 MB more to this machine just before close, before any heartbeat reports it:
            # the bill still counts it (the scheduler asks the workers before they go)
            last = client.submit(np.full, 100 * MB // 8, 1.0, workers=[a], pure=False)
            assert float(last.result().sum()) == 100 * MB // 8

        assert emu.instances() == [], "nothing stays rented"
        meter = emu.meter()
    assert sum(r["bytes_up"] + r["bytes_down"] for r in meter["instances"]) > 900 * MB
    assert cluster.bandwidth_cost == pytest.approx(meter["bandwidth_usd"], rel=0.05), (cluster.bandwidth_cost, meter)
    time_usd = sum(r.time_cost_usd for r in cluster.broker.records.values())
    assert time_usd == pytest.approx(meter["time_usd"], rel=0.005), (time_usd, meter)
    assert cluster.cost == pytest.approx(meter["total_usd"], rel=0.05)


def test_a_pool_whose_hosts_block_direct_ports_runs_through_the_tunnel(sandbox: None, tmp_path: Path) -> None:
    """network="direct" where every host's firewall drops the mapped ports: each instance falls
    back to the tunnel, says so once, and the cluster computes across both workers."""
    import dask
    from distributed import Client

    from dask_vastai import VastAICluster

    with dask.config.set({"vastai.ssh-direct-timeout": 5, "vastai.direct-probe-timeout": 3}), Emulator(
        runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "emu", profile="strict",
        variants={"direct_blocked": "all", "direct_blocked_ports": "all", "destroy_linger_s": "0"},
    ) as emu:
        with VastAICluster(
            gpu="RTX_3090", n=2, api_url=emu.url, api_key=emu.api_key, name="fb", quiet=True,
            boot_timeout=240, network="direct", worker_options={"nthreads": 1},
        ) as cluster, Client(cluster) as client:
            assert [w.network for w in cluster.workers.values()] == ["tunnel", "tunnel"]
            addresses = sorted(client.scheduler_info()["workers"])
            assert all(PORT_RANGE[0] <= int(a.rsplit(":", 1)[1]) <= PORT_RANGE[1] for a in addresses), addresses
            x = client.submit(lambda: list(range(1000)), workers=[addresses[0]], pure=False)
            assert client.submit(sum, x, workers=[addresses[1]], pure=False).result() == sum(range(1000))
            said = [line for _, line in cluster._cluster_manager_logs if "use the SSH tunnel" in line]
            ids = sorted(w.record.instance_id for w in cluster.workers.values())
            assert sorted(int(re.search(r"instance (\d+):", line).group(1)) for line in said) == ids, said
        assert emu.instances() == []
