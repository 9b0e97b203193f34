"""Spending caps in the rental broker, against the emulator's control plane and its meter.

``max_hourly``: a rental that would take the cluster's $/h past the cap is not sent, and the
refusal names the rate now. ``max_cost``: the broker closes (every rental destroyed, none
rented again, the cluster told) before the emulator's meter can pass the cap. Records-only
instances: what is tested is what is billed, not what boots (the e2e is
``test_spending_caps_e2e.py``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dask_vastai import BudgetExceeded, BudgetExhausted, VastAICluster
from dask_vastai.budget import SpendingCaps
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.vast import CreateRequest, VastAPI
from tests.helpers.waiting import until


def _broker(api: VastAPI, caps: SpendingCaps, *, gpu: str = "RTX_3090", num_gpus: int = 1,
            exhausted: list[BudgetExhausted] | None = None) -> RentalBroker:
    return RentalBroker(
        api, cluster_name="caps", requirements=OfferRequirements(gpu=gpu, num_gpus=num_gpus),
        create_request=CreateRequest(image="vastai/pytorch", disk_gb=40), poll_interval_s=0.5,
        caps=caps, on_exhausted=(exhausted.append if exhausted is not None else None),
    )


def _creates(emu) -> list[dict]:
    return [r for r in emu.requests if r["endpoint"] == "create"]


def test_caps_are_validated_and_name_the_option() -> None:
    with pytest.raises(ValueError, match="max_cost=-1"):
        SpendingCaps.from_options(max_cost=-1, check_interval_s=2)
    with pytest.raises(ValueError, match="max_hourly='lots'"):
        SpendingCaps.from_options(max_hourly="lots", check_interval_s=2)
    assert SpendingCaps.from_options(check_interval_s=2) is None  # no cap: nothing to check
    caps = SpendingCaps.from_options(max_cost=5, check_interval_s=2)
    assert caps is not None and caps.max_cost_usd == 5.0 and caps.horizon_s > 2


def test_the_reserve_destroys_the_most_expensive_last_one_interval_apart() -> None:
    caps = SpendingCaps(max_cost_usd=1.0, check_interval_s=2, destroy_latency_s=8, destroy_interval_s=3)
    assert caps.horizon_s == 10
    # $36/h is a cent a second: the cheaper rental 10 s, the dearer 13 s (a survivor destroyed again).
    assert caps.reserve_usd([36.0, 3.6]) == pytest.approx(0.01 * 13 + 0.001 * 10)
    assert caps.exhausted(0.85, [36.0, 3.6]) is None
    assert "max_cost=$1.00 reached" in caps.exhausted(0.87, [36.0, 3.6])


def test_max_hourly_rents_what_fits_and_refuses_the_rest_naming_the_rate(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = _broker(api, SpendingCaps(max_hourly_usd=0.30))
            first = await broker.rent("caps-0")  # the cheapest RTX 3090, about $0.17/h
            rate = broker.hourly_rate_usd
            assert rate == pytest.approx(first.dph_total) and rate < 0.30
            more = await asyncio.gather(*(broker.rent(f"caps-{i}") for i in (1, 2)), return_exceptions=True)
            for refused in more:
                assert isinstance(refused, BudgetExceeded), more
                assert "max_hourly=$0.300/h" in str(refused), refused
                assert f"(now ${rate:.3f}/h" in str(refused), refused
            assert len(_creates(emu)) == 1, "a refused rental sends no create"
            assert len(emu.instances()) == 1
            await broker.close()
        assert emu.instances() == []

    asyncio.run(main())


def test_max_cost_closes_before_the_meter_passes_it(emulator_rate_limited) -> None:
    emu = emulator_rate_limited
    cap = 0.03

    async def main() -> None:
        exhausted: list[BudgetExhausted] = []
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            # An 8x H100 at about $15.5/h: $0.03 lasts 7 s; the check allows 0.5 s + 3 s for the destroy.
            caps = SpendingCaps(max_cost_usd=cap, check_interval_s=0.5, destroy_latency_s=3.0)
            broker = _broker(api, caps, gpu="H100_SXM", num_gpus=8, exhausted=exhausted)
            record = await broker.rent("caps-0")
            assert record.dph_total > 15
            await until(lambda: exhausted, 30, "the broker to close at max_cost")
            [error] = exhausted
            assert "max_cost=$0.0300" in str(error), error
            await until(lambda: not emu.instances(), 15, "every rental destroyed")
            spent_at_close = broker.cost_usd
            with pytest.raises(BudgetExhausted, match="max_cost"):
                await broker.rent("caps-1")
            assert len(_creates(emu)) == 1, "nothing rented after the budget ran out"
            assert broker.budget_left_usd is not None and broker.budget_left_usd >= 0
            await broker.close()
        meter = emu.meter()["total_usd"]
        assert 0 < meter <= cap, meter
        # Our estimate never undercounts the meter, and the cap was used, not thrown away:
        # closing started one check interval at most before spend + rate x horizon reached it.
        assert spent_at_close >= meter - 1e-9
        assert meter >= cap - record.dph_total * (caps.horizon_s + caps.check_interval_s) / 3600, meter

    asyncio.run(main())


def test_max_cost_holds_when_a_bulk_destroy_leaves_every_rental_running(sandbox_free_pricey) -> None:
    """The strict profile's worst case: the bulk destroy answers success and destroys nothing; the
    broker finds them by listing and destroys them again one by one, 3 s apart."""
    emu = sandbox_free_pricey
    emu.variants.set(bulk_destroy_survivors="all")
    cap = 0.25

    async def main() -> None:
        exhausted: list[BudgetExhausted] = []
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            caps = SpendingCaps.from_options(max_cost=cap, check_interval_s=0.5)
            broker = _broker(api, caps, gpu="H100_SXM", num_gpus=8, exhausted=exhausted)
            await asyncio.gather(broker.rent("caps-0"), broker.rent("caps-1"))  # $60/h together
            await until(lambda: exhausted, 30, "the broker to close at max_cost")
            await until(lambda: not emu.instances(), 30, "every rental destroyed")
            await broker.close()
        destroys = [r for r in emu.requests if r["method"] == "DELETE" and r["status"] < 300]
        assert any(r["path"].rstrip("/").endswith("/instances") for r in destroys), "one bulk destroy"
        assert len(destroys) >= 3, "the survivors were destroyed again, one by one"
        meter = emu.meter()["total_usd"]
        assert 0 < meter <= cap, meter

    asyncio.run(main())


@pytest.fixture
def sandbox_free_pricey():
    """Vast's rate limits and strict answers, records only, with four 8x H100 at $30/h."""
    from dask_vastai.emulator import Emulator

    offers = [{"gpu_name": "H100 SXM", "num_gpus": 8, "gpu_ram": 81920, "dph_base": 30.0, "min_bid": 15.0,
               "machine_id": 30000 + k} for k in range(4)]
    with Emulator(runtime="record", rate_limits=True, boot_delay_s=0, profile="strict", catalog=offers) as emu:
        yield emu


def test_a_rental_that_would_pass_max_cost_is_not_sent(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            # $0.01 is gone in 2.3 s at $15.5/h: less than it takes to notice and destroy.
            broker = _broker(api, SpendingCaps(max_cost_usd=0.01, check_interval_s=2, destroy_latency_s=6),
                             gpu="H100_SXM", num_gpus=8)
            with pytest.raises(BudgetExceeded, match=r"would pass max_cost=\$0.0100"):
                await broker.rent("caps-0")
            await broker.close()
        assert _creates(emu) == [] and emu.instances() == []

    asyncio.run(main())


def test_a_first_n_past_max_hourly_fails_at_construction_renting_nothing(emulator) -> None:
    started = time.monotonic()
    with pytest.raises(BudgetExceeded) as err:
        VastAICluster(gpu="RTX_3090", n=3, max_hourly=0.4, api_url=emulator.url, api_key=emulator.api_key,
                      quiet=True)
    message = str(err.value)
    assert "n=3 instances" in message and "past max_hourly=$0.400/h (2 fit)" in message, message
    assert _creates(emulator) == [] and emulator.instances() == []
    assert time.monotonic() - started < 60
