"""A pool whose boots all fail gives up, and the user sees why, not a generic timeout.

Under ``scale()``, every boot failing (pull rate limits, OCI errors): ``wait_for_workers``
raises the pool's boot failures with their reasons (distributed's own says only "Only 0/2
workers arrived"), and a task that only that pool could run fails with them too. Nothing
is left rented.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dask_vastai import VastAICluster
from dask_vastai.exceptions import BootFailed


def test_wait_for_workers_raises_the_boot_failures(emulator: Any) -> None:
    from distributed import Client

    emu = emulator
    emu.faults.fail_boot("pull rate limit", count=6)  # 2 instances x 3 rentals each (max-boot-attempts)
    with VastAICluster(gpu="RTX_3090", n=0, api_url=emu.url, api_key=emu.api_key, quiet=True,
                       boot_timeout=60) as cluster, Client(cluster) as client:
        future = client.submit(sum, [1, 2], resources={"GPU": 1})
        cluster.scale(2)
        started = time.monotonic()
        with pytest.raises(BootFailed) as caught:
            cluster.wait_for_workers(2, timeout=120)
        took = time.monotonic() - started
        text = str(caught.value)
        assert text.count("pull rate limit") == 2, text  # each instance's last failure, with its reason
        assert "default" in text and "scale()" in text, text
        assert took < 60, took
        # the task only that pool could run fails with the same reasons instead of waiting
        with pytest.raises(BootFailed) as task_error:
            future.result(timeout=10)
        assert "gave up" in str(task_error.value) and "pull rate limit" in str(task_error.value)
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []
