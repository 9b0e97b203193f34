"""Closing: every rental destroyed in one bulk call, however the instances' closes straggle,
and a rental still waiting for its create refused at once.

At a cluster's close each instance tears its SSH link down, then asks the broker to destroy
its rental. Those calls arrive spread over the teardowns; with Vast's paced destroy endpoint
(3 s between calls of one account) each straggler used to cost a second call 3 s later,
every rental of the cluster billing meanwhile (a 4-instance close took 4.7-6.6 s, 2-3
DELETEs). Records-only emulator with Vast's rate limits.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dask_vastai.exceptions import BootFailed
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.vast import CreateRequest, VastAPI


def _broker(api: VastAPI, name: str) -> RentalBroker:
    return RentalBroker(api, cluster_name=name, requirements=OfferRequirements(gpu="RTX_3090"),
                        create_request=CreateRequest(image="vastai/pytorch", disk_gb=20), poll_interval_s=1.0)


def _deletes_since(emu, t0: float) -> list[dict]:
    """Every destroy call since ``t0`` (one of an already destroyed rental answers 404, and counts)."""
    return [r for r in emu.requests if r["endpoint"] == "destroy" and r["time"] >= t0 and r["status"] != 429]


def test_a_close_whose_instances_straggle_destroys_everything_in_one_call(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def scenario() -> tuple[float, float]:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, "strag")
            records = await asyncio.gather(*(broker.rent(f"strag-{i}") for i in range(4)))
            await asyncio.gather(*(broker.wait_until_ready(r.instance_id, 60) for r in records))
            started = time.time()
            broker.begin_close()

            async def instance_close(k: int) -> None:
                await asyncio.sleep(0.6 * k)  # its SSH teardown
                await broker.destroy(records[k].instance_id)

            await asyncio.gather(*(instance_close(k) for k in range(4)))
            instances_done = time.time() - started
            await broker.close()
            assert all(r.destroyed_at is not None for r in broker.records.values())
            return started, instances_done

    started, instances_done = asyncio.run(scenario())
    deletes = _deletes_since(emu, started)
    assert len(deletes) == 1, deletes
    assert emu.instances() == [], "every rental destroyed"
    # The last instance asked 1.8 s in: it joined the call already made, not a paced second one.
    assert instances_done < 1.8 + 3.0, instances_done


def test_a_rental_destroyed_twice_at_once_costs_one_call(emulator_rate_limited) -> None:
    """Outside a close too: a rental given up (destroy_soon) and then closed joins the call in
    flight. Here that call waits its turn: another rental's destroy went just before it, and
    Vast paces destroys 3 s apart."""
    emu = emulator_rate_limited

    async def scenario() -> float:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, "twice")
            first, second = [await broker.rent(f"twice-{i}") for i in range(2)]
            for record in (first, second):
                await broker.wait_until_ready(record.instance_id, 60)
            started = time.time()
            await broker.destroy(first.instance_id)
            waiting = asyncio.create_task(broker.destroy(second.instance_id))
            await asyncio.sleep(1.0)  # its call waits for the destroy endpoint's next turn
            assert not waiting.done()
            await broker.destroy(second.instance_id)
            await waiting
            await broker.close()
            return started

    started = asyncio.run(scenario())
    assert len(_deletes_since(emu, started)) == 2, _deletes_since(emu, started)
    assert emu.instances() == []


def test_a_rent_waiting_for_its_create_at_close_is_refused_at_once(emulator_rate_limited) -> None:
    """``scale(2)`` then ``close()`` at once: the second rental's create waits Vast's paced turn
    (4.5 s after the first). Close refuses it within a second (its instance's start, which
    SpecCluster's scale-down waits for, had waited forever), and nothing is left rented."""
    emu = emulator_rate_limited

    async def scenario() -> float:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, "late")
            await broker.rent("late-0")
            late = asyncio.create_task(broker.rent("late-1"))
            await asyncio.sleep(0.5)
            assert not late.done(), "its create waits for the endpoint's next turn"
            closing = time.monotonic()
            broker.begin_close()
            with pytest.raises(BootFailed, match="clos"):
                await asyncio.wait_for(late, 10)
            refused_s = time.monotonic() - closing
            with pytest.raises(BootFailed, match="the cluster is closing"):
                await broker.rent("late-2")
            await broker.close()
            return refused_s

    refused_s = asyncio.run(scenario())
    assert refused_s < 1.0, refused_s
    assert emu.instances() == []
