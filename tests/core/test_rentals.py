"""The rental broker against the emulator's control plane (rate limits on).

What a user pays for is decided here: one bulk create for instances asked together,
labels per worker, one list call per poll interval, one bulk destroy, and a failed batch
that leaves nothing rented.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from dask_vastai.exceptions import NoOfferAvailable
from dask_vastai.labels import rental_label
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.vast import CreateRequest, VastAPI


def _broker(api: VastAPI, name: str = "t", **req) -> RentalBroker:
    return RentalBroker(
        api,
        cluster_name=name,
        requirements=OfferRequirements(gpu="RTX_3090", **req),
        create_request=CreateRequest(image="vastai/pytorch", disk_gb=20, onstart="echo hi"),
        poll_interval_s=1.0,
    )


def _paths(emu, fragment: str, method: str | None = None) -> list[dict]:
    return [
        r for r in emu.requests
        if fragment in r["path"] and (method is None or r["method"] == method)
    ]


def test_concurrent_rents_become_one_bulk_create_with_worker_labels(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api)
            records = await asyncio.gather(*(broker.rent(f"t-{i}") for i in range(5)))
            assert len({r.instance_id for r in records}) == 5
            # Labels are written behind the rentals (they boot meanwhile): every one, in the end.
            await broker.labels_written()
            rows = {row["id"]: row for row in emu.instances()}
            for r in records:
                assert rows[r.instance_id]["label"] == rental_label("t", r.worker_name)
            assert len(_paths(emu, "/asks/bulk", "POST")) == 1
            assert not [r for r in emu.requests if r["status"] == 429]
            await broker.close()
        assert emu.instances() == []

    asyncio.run(main())


def test_wait_until_ready_polls_with_one_list_call(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, name="poll")
            records = await asyncio.gather(*(broker.rent(f"p-{i}") for i in range(3)))
            rows = await asyncio.gather(*(broker.wait_until_ready(r.instance_id, 60) for r in records))
            assert all(row.actual_status == "running" for row in rows)
            assert not _paths(emu, "/api/v0/instances/", "GET"), "no per-instance GET: one list call serves all"
            assert _paths(emu, "/api/v1/instances", "GET")
            await broker.close()
        assert emu.instances() == []

    asyncio.run(main())


def test_no_offer_destroys_nothing_and_explains(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, max_price=0.0001)
            with pytest.raises(NoOfferAvailable) as err:
                await broker.rent("x-0")
            assert "dph_total" in str(err.value)
            await broker.close()

    asyncio.run(main())
    assert emu.instances() == []


def test_exit_handler_destroys_what_the_process_left(emulator_rate_limited) -> None:
    emu = emulator_rate_limited
    code = textwrap.dedent(
        f"""
        import asyncio
        from dask_vastai.vast import CreateRequest, VastAPI
        from dask_vastai.offers import OfferRequirements
        from dask_vastai.rentals import RentalBroker

        async def main():
            async with VastAPI(api_key={emu.api_key!r}, api_url={emu.url!r}) as api:
                broker = RentalBroker(api, cluster_name="left", requirements=OfferRequirements(gpu="RTX_3090"),
                                      create_request=CreateRequest(image="img", disk_gb=10))
                await asyncio.gather(broker.rent("left-0"), broker.rent("left-1"))
                print("RENTED", flush=True)
        asyncio.run(main())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RENTED" in proc.stdout, proc.stderr
    assert "destroying 2 rental(s)" in proc.stderr
    assert emu.instances() == []


def test_rent_arriving_during_a_batch_is_not_left_waiting(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, name="late")
            first = asyncio.create_task(broker.rent("late-0"))
            await asyncio.sleep(0.5)  # the first batch is now renting (search, create)
            second = await asyncio.wait_for(broker.rent("late-1"), timeout=30)
            assert (await first).instance_id != second.instance_id
            await broker.close()
        assert emu.instances() == []

    asyncio.run(main())
