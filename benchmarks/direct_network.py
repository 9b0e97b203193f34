"""Direct mode against tunnel mode and a TLS LocalCluster, in one run (ratios within it).

The emulator runs in a process of its own (``benchmarks.emulator_process``), so the CPU read
here (``getrusage(RUSAGE_SELF)``: user + system) is the client's process alone: the scheduler,
the SSH links and the user's client, as on a laptop talking to Vast.

* ``throughput``: 100 MB worker-to-worker (made on one worker, read on another), TLS
  LocalCluster of 2 worker processes, ``network="tunnel"`` and ``"direct"`` (2 instances each):
  MB/s per round, the median, and the client's CPU seconds per 100 MB moved.
* ``shuffle``: a dask.dataframe p2p shuffle and a groupby on 4 workers (2 million rows, 16
  partitions made on the workers), wall time for each of the three.
* ``cost``: 2 GB moved at a priced offer (1 GB worker-to-worker, 1 GB gathered to this
  machine) in each network mode: ``cluster.cost`` (time and bandwidth) against the emulator's
  meter, which counts bytes at each sandbox's network boundary.
* ``fallback``: a pool whose hosts block every direct port (``direct_blocked=all``,
  ``direct_blocked_ports=all``) with ``network="direct"``: it runs (tunnel), and says so once
  per instance.

    python -m benchmarks.direct_network [throughput shuffle cost fallback] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster, wait
from distributed.security import Security

from benchmarks.emulator_process import EmulatorProcess

MB = 10**6
#: offers priced for bandwidth: $/GB up and down (a few cents, as some Vast hosts charge)
PRICED = {"inet_up_cost": 0.02, "inet_down_cost": 0.01}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def catalog(n: int, **extra: Any) -> list[dict[str, Any]]:
    """``n`` identical RTX 3090 offers (one per instance a run rents) with ``extra`` fields."""
    return [{"id": 1_000_001 + k, "machine_id": 20_001 + k, "gpu_name": "RTX 3090", "dph_base": 0.2,
             "cpu_cores_effective": 4.0, "cpu_ram": 16384, **extra} for k in range(n)]


@contextlib.contextmanager
def local_cluster(n: int) -> Iterator[Client]:
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, protocol="tls", host="127.0.0.1",
                      security=Security.temporary(), dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(n)
        yield client


@contextlib.contextmanager
def vast_cluster(emu: EmulatorProcess, network: str, n: int, log: io.StringIO | None = None) -> Iterator[tuple[Any, Client]]:
    from dask_vastai import VastAICluster

    with contextlib.redirect_stdout(log) if log is not None else contextlib.nullcontext(), VastAICluster(
        gpu="RTX_3090", n=n, api_url=emu.url, api_key=emu.api_key, name=f"b{network[0]}{n}", quiet=log is None,
        boot_timeout=300, network=network, worker_options={"nthreads": 1},
    ) as cluster, Client(cluster) as client:
        yield cluster, client


def w2w(client: Client, rounds: int) -> dict[str, Any]:
    """100 MB made on the first worker and read on the second, ``rounds`` times."""
    workers = sorted(client.scheduler_info()["workers"])[:2]
    rates, cpus = [], []
    for _ in range(rounds + 1):  # the first round opens the connections: not counted
        big = client.submit(os.urandom, 100 * MB, workers=[workers[0]], pure=False)
        wait(big)
        t, c = time.perf_counter(), cpu_s()
        assert client.submit(len, big, workers=[workers[1]], pure=False).result() == 100 * MB
        rates.append(100 * MB / (time.perf_counter() - t) / 1e6)
        cpus.append(cpu_s() - c)
        del big
    rates, cpus = rates[1:], cpus[1:]
    return {"MBps": [round(r, 1) for r in rates], "MBps_median": round(statistics.median(rates), 1),
            "client_cpu_s_per_100MB": round(statistics.median(cpus), 3)}


def shuffle_and_groupby(client: Client) -> dict[str, float]:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    def part(i: int) -> pd.DataFrame:
        rng = np.random.default_rng(i)
        return pd.DataFrame({"k": rng.integers(0, 100_000, 125_000), "v": rng.random(125_000)})

    df = dd.from_map(part, range(16))
    out = {}
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        t = time.perf_counter()
        shuffled = df.shuffle("k", npartitions=16)
        assert int(shuffled.map_partitions(len).sum().compute()) == 2_000_000
        out["p2p_shuffle_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        sums = df.groupby("k").v.sum(split_out=16).compute()
        assert len(sums) > 90_000
        out["groupby_s"] = round(time.perf_counter() - t, 2)
    return out


def throughput(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with local_cluster(2) as client:
        results["local_tls"] = w2w(client, rounds)
    with EmulatorProcess(catalog=catalog(2)) as emu:
        for network in ("tunnel", "direct"):
            with vast_cluster(emu, network, 2) as (_, client):
                results[network] = w2w(client, rounds)
    base = results["local_tls"]["MBps_median"]
    for network in ("tunnel", "direct"):
        results[network]["ratio_to_local"] = round(results[network]["MBps_median"] / base, 2)
    return results


def shuffle() -> dict[str, Any]:
    results: dict[str, Any] = {}
    with local_cluster(4) as client:
        results["local_tls"] = shuffle_and_groupby(client)
    with EmulatorProcess(catalog=catalog(4)) as emu:
        for network in ("tunnel", "direct"):
            with vast_cluster(emu, network, 4) as (_, client):
                results[network] = shuffle_and_groupby(client)
    for network in ("tunnel", "direct"):
        results[network]["ratio_to_local"] = {
            k: round(v / results["local_tls"][k], 2) for k, v in results[network].items()}
    return results


def cost() -> dict[str, Any]:
    """2 GB in each mode at a priced offer: the cluster's cost against the emulator's meter."""
    results: dict[str, Any] = {}
    for network in ("tunnel", "direct"):
        with EmulatorProcess(catalog=catalog(2, **PRICED)) as emu:
            with vast_cluster(emu, network, 2) as (cluster, client):
                workers = sorted(client.scheduler_info()["workers"])
                for _ in range(10):  # 1 GB worker to worker
                    big = client.submit(os.urandom, 100 * MB, workers=[workers[0]], pure=False)
                    client.submit(len, big, workers=[workers[1]], pure=False).result()
                    del big
                for _ in range(10):  # 1 GB to this machine
                    big = client.submit(os.urandom, 100 * MB, workers=[workers[1]], pure=False)
                    assert len(big.result()) == 100 * MB
                    del big
            meter = emu.meter()
        time_usd = sum(r.time_cost_usd for r in cluster.broker.records.values())
        results[network] = {
            "cluster_cost_usd": cluster.cost, "meter_usd": meter["total_usd"],
            "cost_error": round(cluster.cost / meter["total_usd"] - 1, 4),
            "cluster_bandwidth_usd": cluster.bandwidth_cost, "meter_bandwidth_usd": meter["bandwidth_usd"],
            "bandwidth_error": round(cluster.bandwidth_cost / meter["bandwidth_usd"] - 1, 4),
            "cluster_time_usd": time_usd, "meter_time_usd": meter["time_usd"],
            "time_error": round(time_usd / meter["time_usd"] - 1, 4),
            "meter_GB": round(sum(r["bytes_up"] + r["bytes_down"] for r in meter["instances"]) / 1e9, 3),
        }
    return results


def fallback() -> dict[str, Any]:
    blocked = {"direct_blocked": "all", "direct_blocked_ports": "all"}
    log = io.StringIO()
    with dask.config.set({"vastai.ssh-direct-timeout": 5, "vastai.direct-probe-timeout": 3}):
        with EmulatorProcess(catalog=catalog(2), variants=blocked) as emu:
            with vast_cluster(emu, "direct", 2, log=log) as (cluster, client):
                addresses = sorted(client.scheduler_info()["workers"])
                ok = client.submit(lambda x: x + 1, 1).result() == 2
                networks = [w.network for w in cluster.workers.values()]
    said = [line for line in log.getvalue().splitlines() if "use the SSH tunnel" in line]
    return {"ran": ok, "worker_addresses": addresses, "networks": networks, "said": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["throughput", "shuffle", "cost", "fallback"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    out: dict[str, Any] = {}
    for part in args.parts:
        t = time.monotonic()
        out[part] = throughput(args.rounds) if part == "throughput" else globals()[part]()
        out[part]["_seconds"] = round(time.monotonic() - t, 1)
        print(part, json.dumps(out[part], indent=1), flush=True)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
