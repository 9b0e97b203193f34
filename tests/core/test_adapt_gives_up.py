"""``adapt()`` giving up on a pool whose boots all fail: said once, at WARNING, with the reasons,
and the tasks only that pool could run fail with them (``gather`` and Snakemake see why).

Every boot fails (pull rate limits, the emulator's ``fail_boot``) while GPU tasks wait under
``adapt(0, 2)``: the policy stops renting after ``adapt.max-failures-in-a-row`` instances
failed; the user must read one WARNING naming the pool and the failures' reasons (not one per
adapt round), the waiting tasks must raise :class:`BootFailed` with those reasons instead of
waiting forever, and nothing may be left rented.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from dask_vastai import VastAICluster
from dask_vastai.exceptions import BootFailed


def test_adapt_gives_up_once_at_warning_and_the_pools_tasks_fail_with_the_reasons(
    emulator: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    from distributed import Client, wait

    emu = emulator
    emu.faults.fail_boot("pull rate limit", count=100)  # every boot this test makes
    caplog.set_level(logging.WARNING, logger="dask_vastai")
    with VastAICluster(gpu="RTX_3090", n=0, api_url=emu.url, api_key=emu.api_key, quiet=True,
                       boot_timeout=60, name="giveup") as cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, interval="200ms")
        futures = client.map(lambda x: x + 1, range(2), resources={"GPU": 1})
        started = time.monotonic()
        wait(futures, timeout=90)
        took = time.monotonic() - started
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, BootFailed) for e in errors), errors
        for e in errors:
            assert "'default' gave up" in str(e) and "adapt() stopped renting" in str(e), str(e)
            assert "pull rate limit" in str(e), str(e)
        time.sleep(1.5)  # several more adapt rounds: the warning must not repeat
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        reasons = [w for w in warnings if "pull rate limit" in w]
        assert len(reasons) == 1, reasons  # the give-up, with its reasons, said once
        assert reasons[0].startswith("pool 'default' gave up: adapt() stopped renting"), reasons[0]
        log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        assert log.count("WARNING pool 'default' gave up") == 1, log
        rented = len(emu.meter()["instances"])
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []
    print(f"\nadapt gave up after {took:.1f} s and {rented} failed rentals")


def test_giving_up_while_an_instance_still_boots_is_noted_again_once_it_has_gone() -> None:
    """adapt() may stop renting while the pool's last instance still boots (its tasks may yet
    run); when that instance fails too, the policy must say so again so that the loop fails the
    tasks, else they wait forever (the note is said once per situation, not once for good)."""
    from dask_vastai.adaptive import GPUDemandPolicy, InstanceView, PoolView

    policy = GPUDemandPolicy(maximum=2, max_failures_in_a_row=3)
    booting = PoolView(demand_gpus=2, gpus_per_instance=1, failures_in_a_row=3,
                       instances=(InstanceView(name="giveup-4"),))
    [first] = policy.decide(booting)
    assert first.action == "not renting" and first.held == 1
    assert policy.decide(booting) == []  # not every round
    gone = PoolView(demand_gpus=2, gpus_per_instance=1, failures_in_a_row=4)
    [second] = policy.decide(gone)
    assert second.action == "not renting" and second.held == 0
    assert policy.decide(gone) == []


def test_the_give_up_warning_is_said_once_until_forgiven() -> None:
    from dask_vastai.pools import PoolSet

    pools = PoolSet("c", onstart="")
    assert pools.first_give_up_warning("default") is True
    assert pools.first_give_up_warning("default") is False
    pools.forgive("default")  # adapt()/scale() called again: a new chance, a new warning if it fails
    assert pools.first_give_up_warning("default") is True
