"""Fixtures of the plugin's tests: a pool of real Dask worker processes to attach to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def dask_pool() -> Iterator[str]:
    """The scheduler address of a ``LocalCluster`` of 2 worker processes advertising GPU, CPU and MEMORY."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0",
        resources={"GPU": 1, "CPU": 2, "MEMORY": 8e9},
    ) as cluster:
        yield cluster.scheduler_address
