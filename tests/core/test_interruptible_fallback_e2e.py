"""``interruptible="fallback"``: on-demand rentals take over, counted and logged.

Two ways a bidding pool falls back, as Coiled's ``spot_with_fallback`` does: no
interruptible offer matches (a bid below every offer's ``min_bid``), and a pool preempted
``vastai.interruptible-fallback.preemptions`` (3) times within its window, whose next
rental is then on demand. Nothing is left rented after close.
"""

from __future__ import annotations

from typing import Any

import pytest

from dask_vastai import VastAICluster
from dask_vastai.emulator import Emulator
from tests.helpers.waiting import wait_until, wait_until_showing


def _rows(emu: Emulator, name: str) -> list[dict[str, Any]]:
    return [r for r in emu.instances() if (r.get("label") or "").startswith(f"dask-vastai:{name}:")]


def _log(cluster: VastAICluster) -> str:
    return cluster.get_logs(scheduler=False, workers=False)["Cluster"]




def test_no_interruptible_offer_rents_on_demand(emulator: Emulator) -> None:
    emu = emulator
    with VastAICluster(gpu="RTX_3090", n=0, interruptible="fallback", bid=0.00001, api_url=emu.url,
                       api_key=emu.api_key, name="fallbackoffer", quiet=True) as cluster:
        cluster.scale(1)
        rows = wait_until(lambda: _rows(emu, cluster.name), 30, "a rental")
        assert [r["is_bid"] for r in rows] == [False], rows
        assert cluster.losses["default"].on_demand == 1
        assert "on_demand=1" in repr(cluster), repr(cluster)
        assert "no interruptible offer matches" in _log(cluster) and "rented on demand" in _log(cluster)
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []


@pytest.mark.sandbox
@pytest.mark.slow
def test_three_preemptions_in_a_row_rent_on_demand(market: Emulator) -> None:
    emu = market
    with VastAICluster(gpu="RTX_3090", n=1, interruptible="fallback", api_url=emu.url, api_key=emu.api_key,
                       name="fallbackpre", quiet=True, boot_timeout=240) as cluster:
        losses = cluster.losses["default"]
        for round_ in range(3):
            def running(round_: int = round_) -> list[dict[str, Any]]:
                return [r for r in _rows(emu, cluster.name) if r["actual_status"] == "running"
                        and len(cluster.scheduler.workers) == 1 and losses.replaced == round_]

            live = wait_until_showing(running, 180, f"a worker ({round_})", lambda: _log(cluster))
            assert [r["is_bid"] for r in live] == [True], live
            emu.faults.preempt(live[0]["id"])
            seen = round_ + 1
            wait_until_showing(lambda seen=seen: losses.preempted == seen, 30, f"preemption {seen} seen",
                               lambda: _log(cluster))
        wait_until_showing(lambda: losses.replaced == 3 and len(cluster.scheduler.workers) == 1, 180,
                           "the third replacement", lambda: _log(cluster))
        running = [r for r in _rows(emu, cluster.name) if r["actual_status"] == "running"]
        assert [r["is_bid"] for r in running] == [False], running
        assert losses.on_demand == 1 and losses.preempted == 3
        log = _log(cluster)
        assert "3 preemptions within 10 min" in log and "rented on demand" in log, log
        assert "preempted=3" in repr(cluster) and "on_demand=1" in repr(cluster), repr(cluster)
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []
