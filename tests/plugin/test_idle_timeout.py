"""``--vastaidask-idle-timeout``: unset, instances go at their pool's boot-time break-even;
set, it overrides (both for the default pool and the per-rule pools)."""

from __future__ import annotations

from dask_vastai.emulator import Emulator
from snakemake_executor_plugin_vastaidask.backend import DaskBackend
from snakemake_executor_plugin_vastaidask.settings import ExecutorSettings


def _idle_waits(idle_timeout: int | None) -> dict[str, float | None]:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0) as emu:
        settings = ExecutorSettings(gpu="RTX_3090", api_url=emu.url, api_key=emu.api_key,
                                    max_instances=2, idle_timeout=idle_timeout)
        backend = DaskBackend(settings, run_name="smk-idle")
        try:
            backend.pool_resource("A100_SXM4", None)
            return {pool: a.policy.idle_timeout_s for pool, a in backend.cluster._adaptives.items()}
        finally:
            backend.close()


def test_unset_idle_timeout_leaves_the_break_even_and_a_set_one_overrides_it() -> None:
    unset = _idle_waits(None)
    assert len(unset) == 2 and set(unset.values()) == {None}
    assert set(_idle_waits(45).values()) == {45.0}
