"""The executor's backend in renting mode: settings become pool shapes, GPU slots per pool."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dask_vastai.emulator import Emulator
from snakemake_executor_plugin_vastaidask.backend import DaskBackend, pool_shape
from snakemake_executor_plugin_vastaidask.settings import ExecutorSettings


def test_settings_map_onto_shape_options_once_for_every_pool() -> None:
    settings = ExecutorSettings(gpu="RTX_3090", num_gpus=2, max_price=0.5, vastai_query="inet_down>100",
                                no_datacenter=True, disk=None)
    assert pool_shape(settings) == {
        "gpu": "RTX_3090", "num_gpus": 2, "max_price": 0.5, "query": "inet_down>100", "datacenter": False,
    }
    # A rule's own model and GPU count override; unset overrides keep the executor's settings.
    assert pool_shape(settings, gpu="A100_SXM4", num_gpus=None, worker_per_gpu=False) == {
        "gpu": "A100_SXM4", "num_gpus": 2, "max_price": 0.5, "query": "inet_down>100", "datacenter": False,
        "worker_per_gpu": False,
    }
    assert pool_shape(ExecutorSettings()) == {}  # dask-vastai's defaults apply


@pytest.fixture
def slow_market() -> Iterator[Emulator]:
    """Instances that stay loading: rented, billed, never registered (GPUs planned, not there)."""
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=600) as emu:
        yield emu


def test_gpu_slots_count_each_pools_own_gpus_per_instance(slow_market: Emulator) -> None:
    settings = ExecutorSettings(gpu="RTX_3090", api_url=slow_market.url, api_key=slow_market.api_key,
                                max_instances=2, boot_timeout=600)
    backend = DaskBackend(settings, run_name="smk-slots")
    try:
        resource = backend.pool_resource("A100_SXM4", None, gpus=2)
        [name] = [p for p in backend.cluster.pools if p != "default"]
        assert resource == {f"pool-{name}": 1.0}
        backend.cluster.scale(1, pool=name)
        backend.cluster.scale(1)
        # One default instance (1 GPU) and one 2-GPU instance: 3 slots on their way, not 2.
        assert backend.cluster.planned_gpus() == {"default": 1, name: 2}
        assert backend.gpu_slots() == 3.0
    finally:
        backend.close()
    assert slow_market.instances() == []
