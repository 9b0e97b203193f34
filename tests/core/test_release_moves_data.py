"""An instance released while others stay hands its data over first: a result held only by
its worker is still there, on a worker that stays, once the instance is destroyed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.sandbox


def test_released_instance_hands_its_data_to_the_workers_that_stay(market) -> None:
    from distributed import Client, wait

    from dask_vastai import VastAICluster

    market.variants.set(destroy_linger_s=0)
    with VastAICluster(gpu="RTX_3090", n=2, api_url=market.url, api_key=market.api_key, name="rd", quiet=True,
                       boot_timeout=240, worker_options={"nthreads": 1}) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=240)
        by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        leaving, staying = sorted(by_name)
        held = client.submit(lambda: b"only here" * 1000, workers=[by_name[leaving]], pure=False)
        wait([held])
        assert list(client.who_has([held])[held.key]) == [by_name[leaving]]
        cluster.sync(cluster.release_instances, [leaving])
        assert leaving not in {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert list(client.who_has([held])[held.key]) == [by_name[staying]], "moved before the instance went"
        assert held.result(timeout=30) == b"only here" * 1000
        assert len(market.instances()) == 1
    assert market.instances() == []
