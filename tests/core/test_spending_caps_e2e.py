"""Spending caps as a user meets them: real sandboxes, real workers, Vast's rate limits.

``max_cost`` on an expensive offer (an 8x H100 at about $15.5/h): the emulator's meter ends
at most at the cap, nothing stays rented, the tasks that were queued or running fail with
the budget error naming the cap, later ones too, and the user is told (the cluster's log, a
WARNING, the widget). ``max_hourly``: a scale-up past it is refused, naming the rate now.
"""

from __future__ import annotations

import logging
import time

import pytest

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_max_cost_on_an_expensive_offer(market, caplog) -> None:
    # Asserts no rentals are left right after closing: no lingering rows (strict: 5 s, unbilled).
    market.variants.set(destroy_linger_s=0)
    from distributed import Client, wait

    from dask_vastai import BudgetExhausted, VastAICluster

    cap = 0.10
    caplog.set_level(logging.WARNING, logger="dask_vastai")
    with VastAICluster(
        gpu="H100_SXM", num_gpus=8, worker_per_gpu=False, max_cost=cap, api_url=market.url,
        api_key=market.api_key, name="capped", quiet=True, boot_timeout=240,
    ) as cluster, Client(cluster) as client:
        assert cluster.budget_left_usd == pytest.approx(cap)
        # Queued before the instance exists: one may run once it registers, the others wait.
        futures = client.map(_sleep, [600, 601, 602], resources={"GPU": 8}, pure=False)
        cluster.scale(1)
        wait(futures, timeout=120)
        for future in futures:
            error = future.exception()
            assert isinstance(error, BudgetExhausted), (future, error)
            assert "max_cost=$0.1000" in str(error), error
        assert market.instances() == []
        meter = market.meter()
        rate = max(r["dph"] for r in meter["instances"])
        assert 0 < meter["total_usd"] <= cap, meter
        # Closing started when spend + rate x horizon reached the cap: most of it was used.
        caps = cluster.caps
        assert meter["total_usd"] >= cap - rate * (caps.horizon_s + caps.check_interval_s) / 3600, meter
        # Nothing more runs or is rented, and a task submitted now fails at once, saying why.
        with pytest.raises(BudgetExhausted):
            client.submit(_sleep, 1, resources={"GPU": 8}, pure=False).result(timeout=30)
        with pytest.raises(BudgetExhausted):
            cluster.scale(1)
        # The user is told: a WARNING, the cluster's log, the widget's budget line.
        assert any("max_cost=$0.1000 reached" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert "max_cost=$0.1000 reached" in cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        assert cluster.budget_left_usd is not None and 0 <= cluster.budget_left_usd <= cap - meter["total_usd"] + 1e-6
        assert "budget left" in cluster._repr_html_()
    assert market.instances() == []
    assert market.meter()["total_usd"] <= cap


def test_max_hourly_refuses_a_scale_up_past_it(market) -> None:
    market.variants.set(destroy_linger_s=0)  # as above: no rental left once closed
    from dask_vastai import VastAICluster

    # The cheapest RTX 3090 is about $0.17/h, the next about $0.18/h: one fits under $0.30/h.
    with VastAICluster(
        gpu="RTX_3090", n=1, max_hourly=0.30, api_url=market.url, api_key=market.api_key, name="hourly",
        quiet=True, boot_timeout=240,
    ) as cluster:
        rate = cluster.hourly_rate
        assert 0 < rate <= 0.30
        cluster.scale(3)
        deadline = time.monotonic() + 60
        while len(cluster.pool_instances()) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.pool_instances() == [next(iter(cluster.workers))], "the refused instances are dropped"
        log = cluster.get_logs(scheduler=False, workers=False)["Cluster"]
        assert "past max_hourly=$0.300/h" in log and f"(now ${rate:.3f}/h" in log, log
        assert len(market.instances()) == 1 and cluster.hourly_rate == pytest.approx(rate)
        assert "at most $0.300/h" in cluster._repr_html_()
    assert market.instances() == []
