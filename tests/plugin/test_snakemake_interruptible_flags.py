"""The interruptible flags reach the cluster: ``--vastaidask-interruptible``, ``--vastaidask-bid``.

A bad value fails the run at start with one sentence naming it, before anything is rented
(records-only emulator: nothing needs to boot for that); good values make a pool that bids.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_vastai.emulator import Emulator
from snakemake_executor_plugin_vastaidask.backend import pool_shape
from snakemake_executor_plugin_vastaidask.settings import ExecutorSettings
from tests.plugin.test_snakemake_config_errors import _error_text, snakemake


@pytest.fixture
def emu() -> Emulator:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        yield emu


@pytest.mark.parametrize(("flag", "value"), [
    ("--vastaidask-interruptible", "maybe"),
    ("--vastaidask-bid", "0.5x"),
])
def test_a_bad_interruptible_flag_fails_naming_it(emu: Emulator, tmp_path: Path, flag: str, value: str) -> None:
    message = _error_text(snakemake(tmp_path, "--vastaidask-api-url", emu.url, "--vastaidask-api-key", emu.api_key,
                                    "--vastaidask-gpu", "RTX_3090", flag, value))
    assert value in message, message
    assert [r for r in emu.requests if r["endpoint"] == "create"] == [] and emu.instances() == []


def test_interruptible_flags_make_a_bidding_pool() -> None:
    from dask_vastai.pools import Pool, PoolShape

    settings = ExecutorSettings(interruptible="fallback", bid="1.5x", gpu="RTX_3090")
    pool = Pool.from_shape("default", PoolShape.from_options(pool_shape(settings), where="test"), onstart="")
    assert pool.requirements.interruptible and pool.fallback and pool.requirements.bid_factor == 1.5
    assert pool.on_demand is not None and not pool.on_demand.interruptible
    assert pool.requirements.bid_price([0.1, 0.2]) == pytest.approx(0.3)
