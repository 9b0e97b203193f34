"""Dask through the SSH tunnels against Dask direct on this machine, in one process.

Two fake instances (OpenSSH in network namespaces: ``tests.helpers.sandbox.SshdSandbox``, run
as root) run one TLS worker each through a TunnelHub; the baseline is a LocalCluster with two
TLS worker processes. Prints time from connect() to registered, sequential task round trip,
50 MB gather to the client and 50 MB worker-to-worker, and the tunnel/direct ratios.

Run it as a module from the repository root, so that ``tests.helpers`` imports:

    sudo python -m benchmarks.tunnel_throughput [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster, Scheduler, wait
from distributed.security import Security

from dask_vastai.bootstrap import (
    PROBE_COMMAND,
    BootstrapConfig,
    Incarnation,
    incarnation_path,
    incarnation_payload,
    onstart_script,
    parse_probe,
)
from dask_vastai.tunnel import ClusterKey, TunnelHub
from tests.helpers.sandbox import SshdSandbox

MB = 2**20


async def measure(client: Client, workers: list[str], rounds: int) -> dict[str, float]:
    """Round trip p50 (ms), gather MB/s and worker-to-worker MB/s (medians over ``rounds``)."""
    samples = []
    for i in range(200):
        t = time.perf_counter()
        await client.submit(lambda v: v + 1, i, workers=[workers[1]], pure=False)
        samples.append(time.perf_counter() - t)
    gather, w2w = [], []
    for _ in range(rounds):
        big = client.submit(lambda: os.urandom(50 * MB), workers=[workers[0]], pure=False)
        await wait([big])
        t = time.perf_counter()
        await client.gather(big)
        gather.append(50 * MB / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        await client.submit(len, big, workers=[workers[1]], pure=False)
        w2w.append(50 * MB / (time.perf_counter() - t) / 1e6)
        del big
    return {
        "round_trip_ms_p50": statistics.median(samples) * 1000,
        "gather_50MB_MBps": statistics.median(gather),
        "worker_to_worker_50MB_MBps": statistics.median(w2w),
    }


async def direct(rounds: int) -> dict[str, float]:
    security = Security.temporary()
    async with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tls", host="127.0.0.1",
                            security=security, dashboard_address=":0", asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2)
            workers = sorted(cluster.scheduler.workers)
            return await measure(client, workers, rounds)


async def tunnel(rounds: int, tmp: Path) -> dict[str, float]:
    key = ClusterKey.generate("dask-vastai-bench")
    config = BootstrapConfig("bench", key.public_openssh, "http://127.0.0.1:9", 600, python=sys.executable)
    boxes = [SshdSandbox(tmp, tag, onstart=onstart_script(config)).start() for tag in ("p", "q")]
    security = Security.temporary()
    try:
        async with Scheduler(protocol="tls", host="127.0.0.1", port=0, security=security,
                             dashboard_address=":0") as scheduler:
            hub = TunnelHub(key, scheduler_port=int(scheduler.address.rsplit(":", 1)[1]))
            t0 = time.monotonic()
            links = await asyncio.gather(*(hub.connect(b.tag, b.endpoint, timeout_s=30) for b in boxes))
            names = []
            for link in links:
                parse_probe((await link.run(PROBE_COMMAND, timeout_s=60))[1])
                worker_port, nanny_port = await hub.expose_worker(link, *await hub.allocate_ports(2))
                inc = Incarnation(f"w-{link.name}", scheduler.address, worker_port, nanny_port, 1, 4 * 2**30,
                                  {"GPU": 1.0}, {}, security.tls_ca_file, security.tls_worker_cert,
                                  security.tls_worker_key, 30)
                await link.put(incarnation_path(inc.worker_name), incarnation_payload(inc))
                names.append(inc.worker_name)
            while {w.name for w in scheduler.workers.values()} != set(names):
                if time.monotonic() - t0 > 120:
                    raise TimeoutError("workers did not register within 120 s")
                await asyncio.sleep(0.05)
            registered = time.monotonic() - t0
            async with Client(scheduler.address, security=security, asynchronous=True) as client:
                result = await measure(client, names, rounds)
            await hub.close()
            return {"connect_to_registered_s": registered, **result}
    finally:
        for b in boxes:
            b.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the fake instances live in network namespaces")
    with tempfile.TemporaryDirectory() as tmp:
        base = asyncio.run(direct(args.rounds))
        tun = asyncio.run(tunnel(args.rounds, Path(tmp)))
    print(json.dumps({"direct": base, "tunnel": tun}, indent=1))
    for k, v in base.items():
        print(f"{k:30s} direct {v:9.2f}   tunnel {tun[k]:9.2f}   tunnel/direct {tun[k] / v:6.2f}")
    print(f"{'connect_to_registered_s':30s} tunnel {tun['connect_to_registered_s']:.2f}")


if __name__ == "__main__":
    main()
