"""VastAICluster end to end against the emulator: rate limits on, real sandboxes, real workers.

These are the user's stories: rent, register with the right resources, compute, pay
what the marketplace billed, and leave nothing billing however the process ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

def test_user_story_four_instances(market, caplog) -> None:
    # Asserts the destroyed rows are gone once close returns: no lingering rows (strict: 5 s, unbilled).
    market.variants.set(destroy_linger_s=0)
    from distributed import Client, get_worker

    from dask_vastai import VastAICluster

    def where(i: int) -> tuple[int, str]:
        return i * 2, get_worker().name

    def gpu_names() -> str:
        import subprocess

        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()

    with VastAICluster(
        gpu="RTX_3090", n=4, api_url=market.url, api_key=market.api_key, name="story", boot_timeout=240,
        quiet=True,
    ) as cluster, Client(cluster) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == 4
        for address, w in info.items():
            assert address.startswith("tls://127.0.0.1:")
            assert w["resources"]["GPU"] == 1
            assert w["resources"]["CPU"] >= 1
            assert w["resources"]["MEMORY"] > 2**28
        futures = client.map(where, range(40), resources={"GPU": 1}, pure=False)
        results = client.gather(futures)
        assert [r[0] for r in results] == [2 * i for i in range(40)]
        assert len({r[1] for r in results}) >= 2, "tasks should spread over the instances"
        assert "3090" in client.submit(gpu_names, resources={"GPU": 1}).result()
        rows = cluster.instances
        assert len(rows) == 4 and all(r["state"] == "registered" for r in rows)
        assert "instances=4" in repr(cluster)
        caplog.clear()
    # after the with block: nothing rented, the meter stopped, the cost agrees with it
    assert market.instances() == []
    # The close destroyed all four in one call while links were still being torn down: none
    # of those ends is a loss (no "SSH link ... lost" warning, no reconnect).
    ends = [r.getMessage() for r in caplog.records if "lost" in r.getMessage() or "reconnect" in r.getMessage()]
    assert ends == [], ends
    meter = market.meter()
    billed = meter["total_usd"]
    assert billed > 0
    assert abs(cluster.cost - billed) <= 0.005 * billed, (cluster.cost, billed)
    time.sleep(1.0)
    assert market.meter()["total_usd"] == pytest.approx(billed, rel=1e-9)


def test_dependencies_across_instances_and_large_gather(market) -> None:
    import numpy as np
    from distributed import Client

    from dask_vastai import VastAICluster

    with VastAICluster(
        gpu="RTX_3090", n=2, api_url=market.url, api_key=market.api_key, name="mesh", quiet=True,
        boot_timeout=240,
    ) as cluster, Client(cluster) as client:
        names = [w["name"] for w in client.scheduler_info()["workers"].values()]
        addrs = list(client.scheduler_info()["workers"])
        assert len(addrs) == 2
        big = client.submit(lambda: np.ones(50 * 2**20 // 8), workers=[addrs[0]], pure=False)
        total = client.submit(lambda a: float(a.sum()), big, workers=[addrs[1]], pure=False)
        assert total.result() == 50 * 2**20 // 8
        assert set(client.who_has(big)[big.key]) == set(addrs), "data should have moved worker to worker"
        arr = big.result()
        assert arr.nbytes == 50 * 2**20
        assert names
        logs = cluster.get_logs()
        instance_logs = [k for k in logs if k.startswith("instance ")]
        assert len(instance_logs) == 2, list(logs)
        assert "Cluster" in logs and "rented instance" in logs["Cluster"]


def test_async_with_cluster(market) -> None:
    # Asserts the destroyed rows are gone once close returns: no lingering rows (strict: 5 s, unbilled).
    market.variants.set(destroy_linger_s=0)
    import asyncio

    from distributed import Client

    from dask_vastai import VastAICluster

    async def main() -> None:
        async with VastAICluster(
            gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="asy", quiet=True,
            boot_timeout=240, asynchronous=True,
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                result = await client.submit(lambda x: x + 1, 41, resources={"GPU": 1})
                assert result == 42
                assert len(market.instances()) == 1
                assert cluster.cost > 0

    asyncio.run(main())
    assert market.instances() == []


def test_forwarded_ports_refuse_clients_without_the_cluster_certificate(market) -> None:
    from distributed import Client
    from distributed.security import Security

    from dask_vastai import VastAICluster

    with VastAICluster(
        gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="tls", quiet=True,
        boot_timeout=240,
    ) as cluster:
        worker_addr = next(iter(cluster.scheduler_info["workers"]))
        for address in (cluster.scheduler_address, worker_addr):
            with pytest.raises((OSError, TimeoutError)):
                Client(address, security=Security.temporary(), timeout="3s")
            with pytest.raises((OSError, TimeoutError, ValueError)):
                Client(address.replace("tls://", "tcp://"), timeout="3s")


def test_exception_inside_with_destroys_everything(market) -> None:
    # Asserts the destroyed rows are gone once close returns: no lingering rows (strict: 5 s, unbilled).
    market.variants.set(destroy_linger_s=0)
    from dask_vastai import VastAICluster

    with pytest.raises(ZeroDivisionError):
        with VastAICluster(
            gpu="RTX_3090", n=2, api_url=market.url, api_key=market.api_key, name="boom", quiet=True,
            boot_timeout=240,
        ):
            1 / 0  # noqa: B018
    assert market.instances() == []


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from dask_vastai import VastAICluster
    url, key, n, orphan = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cluster = VastAICluster(gpu="RTX_3090", n=n, api_url=url, api_key=key, name="held",
                            orphan_timeout=orphan, boot_timeout=240, quiet=True)
    print("READY", flush=True)
    if sys.argv[5] == "exit":
        sys.exit(0)          # left unclosed at interpreter exit
    time.sleep(600)
    """
)


def _hold(market, n: int, mode: str, orphan: float = 600) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, market.url, market.api_key, str(n), str(orphan), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "READY" in line or not line:
            break
    if "READY" not in line:
        proc.kill()
        raise AssertionError(f"cluster holder did not start: {proc.stderr.read() if proc.stderr else ''}")
    assert len(market.instances()) == n
    return proc


def _wait_no_rentals(market, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while market.instances() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert market.instances() == [], market.instances()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_destroy_every_rental(market, sig: signal.Signals) -> None:
    proc = _hold(market, 2, "sleep")
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    _wait_no_rentals(market, 30)


def test_sigkill_leaves_it_to_the_watchdog(market) -> None:
    proc = _hold(market, 1, "sleep", orphan=8)
    proc.kill()
    proc.wait(timeout=10)
    assert len(market.instances()) == 1
    _wait_no_rentals(market, 90)


def test_unclosed_cluster_of_eight_at_interpreter_exit(market) -> None:
    proc = _hold(market, 8, "exit")
    proc.wait(timeout=180)
    _wait_no_rentals(market, 30)
