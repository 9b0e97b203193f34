"""GPU placement on a VastAICluster (emulator, real sandboxes): tasks submitted while the
instances boot run one per instance, and adapt releases nothing while any of them waits.

The tasks hold their GPU until the test lets them go (a flag set on each worker through
``client.run``), so the check does not depend on how far apart the instances register.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


def test_gpu_tasks_submitted_while_booting_run_one_per_instance_under_adapt(market) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    # Asserts the destroyed rows are gone once close returns: no lingering rows (strict: 5 s, unbilled).
    market.variants.set(destroy_linger_s=0)

    # Defined here, so that they travel by value (the workers cannot import this module).
    def hold_gpu(i: int) -> str:
        import time

        from distributed import get_worker

        worker = get_worker()
        deadline = time.monotonic() + 1800
        while not getattr(worker, "let_go", False) and time.monotonic() < deadline:
            time.sleep(0.05)
        return worker.name

    def running(dask_worker) -> int:
        return len(dask_worker.state.executing)

    def let_go(dask_worker) -> None:
        dask_worker.let_go = True

    with VastAICluster(
        gpu="RTX_3090", api_url=market.url, api_key=market.api_key, name="place", boot_timeout=240,
        quiet=True, worker_options={"nthreads": 8},
    ) as cluster, Client(cluster) as client:
        adaptive = cluster.adapt(minimum=0, maximum=2, interval="1s", wait_count=1)
        futures = client.map(hold_gpu, range(2), resources={"GPU": 1}, pure=False)
        deadline = time.monotonic() + 180
        while sorted((now := client.run(running)).values()) != [1, 1]:
            assert time.monotonic() < deadline, f"the two GPU tasks did not run on the two instances: {now}"
            time.sleep(0.2)
        assert all(w["nthreads"] == 8 for w in client.scheduler_info()["workers"].values())
        client.run(let_go)
        assert len(set(client.gather(futures))) == 2
        # Nothing was released while a task waited (an idle wait of one interval would have).
        assert not [d for _, d, _ in adaptive.log if d.startswith("release")]
    assert market.instances() == []
    assert len(market.meter()["instances"]) == 2
