"""Adaptive scaling by GPU demand, pools per shape, multi-GPU instances (emulator, rate limits on)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator

pytestmark = [pytest.mark.sandbox, pytest.mark.slow, pytest.mark.usefixtures("sandbox")]



def _creates(emu) -> int:
    """Instances rented so far, from the marketplace's own meter (destroyed ones included)."""
    return len(emu.meter()["instances"])


#: Strict, but destroyed rows do not linger: these tests count rows and assert them gone at close.
NO_LINGER = {"destroy_linger_s": 0}


def test_adapt_rents_for_gpu_demand_and_releases_after_idle_wait(tmp_path: Path) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    idle_wait_s = 8 * 1.0
    with Emulator(runtime="sandbox", boot_delay_s=20.0, rate_limits=True, state_dir=tmp_path / "e",
                  profile="strict", variants=NO_LINGER) as emu:
        with VastAICluster(
            gpu="RTX_3090", api_url=emu.url, api_key=emu.api_key, name="adapt", quiet=True, boot_timeout=240
        ) as cluster, Client(cluster) as client:
            adaptive = cluster.adapt(minimum=0, maximum=3, interval="1s", wait_count=8)

            def half_second(i: int) -> int:
                import time

                time.sleep(0.5)
                return i

            futures = client.map(half_second, range(12), resources={"GPU": 1}, pure=False)
            # While they boot (20 s), the policy must not rent more than 3.
            time.sleep(12)
            assert len(emu.instances()) == 3, emu.instances()
            assert client.gather(futures) == list(range(12))
            del futures  # results held by futures keep their last instance (as stock adapt does)
            done_at = time.time()
            assert _creates(emu) == 3, "exactly three instances rented, none while the first ones booted"
            # Not released before the idle wait...
            time.sleep(idle_wait_s - 3)
            assert len(emu.instances()) == 3
            # ...but released after it.
            deadline = time.time() + 60
            while emu.instances() and time.time() < deadline:
                time.sleep(0.5)
            assert emu.instances() == []
            released_after = time.time() - done_at
            assert released_after >= idle_wait_s - 1
            decisions = [d for _, d, _ in adaptive.log]
            assert decisions[0].startswith("rent 3")
            assert any(d.startswith("release") for d in decisions)
            assert all("GPU" in reason for _, _, reason in adaptive.log)
    assert _creates(emu) == 3


def test_two_pools_rent_for_their_own_demand_and_impossible_fails_at_once(tmp_path: Path) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster
    from dask_vastai.exceptions import ImpossibleResources

    with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "e",
                  profile="strict", variants=NO_LINGER) as emu:
        with VastAICluster(
            gpu="RTX_3090", api_url=emu.url, api_key=emu.api_key, name="pools", quiet=True, boot_timeout=240,
            pools=[{"name": "a100", "gpu": "A100_SXM4"}],
        ) as cluster, Client(cluster) as client:
            cluster.adapt(minimum=0, maximum=2, interval="1s", wait_count=60)
            cluster.adapt(minimum=0, maximum=2, pool="a100", interval="1s", wait_count=60)

            def gpu_name() -> str:
                import subprocess

                return subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
                ).stdout.strip()

            t0 = time.monotonic()
            impossible = client.submit(gpu_name, resources={"GPU": 1, "pool-h100": 1}, pure=False)
            with pytest.raises(ImpossibleResources) as err:
                impossible.result(timeout=10)
            assert "pool-h100" in str(err.value) and "a100" in str(err.value)
            assert time.monotonic() - t0 < 10

            on_a100 = client.submit(gpu_name, resources={"GPU": 1, "pool-a100": 1}, pure=False)
            on_3090 = client.submit(gpu_name, resources={"GPU": 1, "pool-default": 1}, pure=False)
            anywhere = client.submit(gpu_name, resources={"GPU": 1}, pure=False)
            assert "A100" in on_a100.result(timeout=180)
            assert "3090" in on_3090.result(timeout=180)
            assert anywhere.result(timeout=180)
            rented = {row["label"]: row for row in emu.instances()}
            assert any(":pools-a100-" in label for label in rented)
            assert any(label.startswith("dask-vastai:pools:pools-0") for label in rented)
            assert len(cluster.pool_instances("a100")) == 1
            with pytest.raises(ValueError, match="h100"):
                cluster.scale(1, pool="h100")
    assert emu.instances() == []


def test_two_gpu_instances_run_one_worker_per_gpu(tmp_path: Path) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    with Emulator(runtime="sandbox", boot_delay_s=1.0, rate_limits=True, state_dir=tmp_path / "e",
                  profile="strict", variants=NO_LINGER) as emu:
        with VastAICluster(
            gpu="RTX_3090", num_gpus=2, n=1, api_url=emu.url, api_key=emu.api_key, name="multi",
            quiet=True, boot_timeout=240,
        ) as cluster, Client(cluster) as client:
            info = client.scheduler_info()["workers"]
            assert sorted(w["name"] for w in info.values()) == ["multi-0-gpu0", "multi-0-gpu1"]
            assert all(w["resources"]["GPU"] == 1 for w in info.values())
            seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
            assert sorted(seen.values()) == ["0", "1"]
            cluster.scale(2)
            client.wait_for_workers(4, timeout=240)
            assert len(emu.instances()) == 2
            assert len(client.scheduler_info()["workers"]) == 4
            assert all(row["num_gpus"] == 2 for row in emu.instances())
    assert emu.instances() == []
