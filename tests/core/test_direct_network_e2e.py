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
        cluster._count_traffic()
        d2_direct = cluster.workers[d2].record.direct_traffic
        assert d2_direct.down >= 20 * MB, f"d1's array reached d2 directly: {d2_direct}"
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
