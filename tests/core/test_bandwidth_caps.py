"""``max_cost`` counts bandwidth dollars: a rental whose time costs almost nothing but whose
bytes pass the cap closes the broker as time would (records-only instances: what is tested is
what is billed, not what boots)."""

from __future__ import annotations

import asyncio

import pytest

from dask_vastai import BudgetExhausted
from dask_vastai.budget import SpendingCaps
from dask_vastai.emulator import Emulator
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.vast import CreateRequest, VastAPI
from tests.helpers.waiting import until

#: a cheap GPU (a cap of 5 cents lasts 15 minutes of its time) whose bytes are dear
OFFER = {"id": 1_000_201, "machine_id": 30_201, "gpu_name": "RTX 3090", "dph_base": 0.2,
         "inet_up_cost": 0.5, "inet_down_cost": 0.25, "cpu_cores_effective": 4.0, "cpu_ram": 16384}


def test_max_cost_closes_when_bandwidth_reaches_it() -> None:
    with Emulator(runtime="record", rate_limits=False, boot_delay_s=0, catalog=[OFFER]) as emu:

        async def main() -> None:
            exhausted: list[BudgetExhausted] = []
            async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
                broker = RentalBroker(
                    api, cluster_name="bw", requirements=OfferRequirements(gpu="RTX_3090"),
                    create_request=CreateRequest(image="vastai/pytorch", disk_gb=40), poll_interval_s=0.5,
                    caps=SpendingCaps(max_cost_usd=0.05, check_interval_s=0.5, destroy_latency_s=3.0),
                    on_exhausted=exhausted.append,
                )
                record = await broker.rent("bw-0")
                await asyncio.sleep(1.5)
                assert not exhausted and broker.budget_left_usd > 0.04
                # 80 MB sent, 40 MB received: 4 cents + 1 cent at the offer's $/GB
                record.direct_traffic.add(up=80_000_000, down=40_000_000)
                assert record.bandwidth_cost_usd == pytest.approx(0.05)
                assert broker.cost_usd == pytest.approx(record.time_cost_usd + 0.05, rel=1e-3)
                await until(lambda: exhausted, 10, "the broker to close at max_cost")
                assert "max_cost=$0.0500" in str(exhausted[0]), exhausted
                await until(lambda: not emu.instances(), 15, "every rental destroyed")
                with pytest.raises(BudgetExhausted, match="max_cost"):
                    await broker.rent("bw-1")
                await broker.close()

        asyncio.run(main())
