"""Closing through an outage is one round of destroys, owned by the broker, within one deadline.

The instances hand their rentals to the broker's (batched) destroy as they close; the broker's
close then waits for that round and does not start a second one once the deadline
(``vastai.api.outage-timeout`` from the start of the close) has passed: close returns then,
raising once with what Vast answered, and the rentals it could not destroy stay in the
process's ledger, from which a later cleanup destroys them once Vast is back. Against the
emulator's control plane, rate limits on (a destroy call every 3 s at most, as on Vast).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import dask.config
import pytest

from dask_vastai.exceptions import VastError, VastServerError
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker
from dask_vastai.safety import LEDGER
from dask_vastai.vast import CreateRequest, VastAPI

OUTAGE_TIMEOUT_S = 5.0
#: what one round may take beyond its deadline: the last try's answer (requests end by the deadline)
SLACK_S = 2.0


def _broker(api: VastAPI) -> RentalBroker:
    return RentalBroker(api, cluster_name="oneround", requirements=OfferRequirements(gpu="RTX_3090"),
                        create_request=CreateRequest(image="vastai/pytorch", disk_gb=20, onstart="echo hi"),
                        poll_interval_s=1.0)


def test_close_through_an_outage_is_one_round_within_its_deadline(emulator_rate_limited) -> None:
    emu = emulator_rate_limited

    async def main() -> None:
        with dask.config.set({"vastai.api.outage-timeout": OUTAGE_TIMEOUT_S, "vastai.api.backoff-max": 1}):
            api = VastAPI(api_key=emu.api_key, api_url=emu.url)
        async with api:
            broker = _broker(api)
            records = await asyncio.gather(*(broker.rent(f"w-{i}") for i in range(3)))
            ids = sorted(r.instance_id for r in records)
            emu.faults.outage(600)
            started, wall_started = time.monotonic(), time.time()
            broker.begin_close()

            async def instance_closes(instance_id: int) -> None:
                # as VastInstance.close does: hand the rental in, never raise out of SpecCluster
                with contextlib.suppress(VastError):
                    await broker.destroy(instance_id)

            await asyncio.gather(*(instance_closes(i) for i in ids))
            with pytest.raises(VastServerError, match="503") as raised:
                await broker.close()
            took, wall_closed = time.monotonic() - started, time.time()
            print(f"\nclose of 3 rentals through an outage: {took:.1f} s (deadline {OUTAGE_TIMEOUT_S:.0f} s)")
            assert took <= OUTAGE_TIMEOUT_S + SLACK_S, took
            assert "over" in str(raised.value), raised.value  # how long Vast was tried
            said = broker.left_billing(raised.value)  # the one sentence the cluster logs
            assert all(str(i) in said for i in ids) and "may still bill" in said, said
            assert "`dask-vastai cleanup --cluster oneround`" in said and "503" in said, said
            deletes = [r for r in emu.requests
                       if r["method"] == "DELETE" and wall_started <= r["time"] <= wall_closed]
            assert deletes and all(r["status"] == 503 for r in deletes), deletes
            # paced 3 s apart, each retry of one round; a second round would start after the deadline
            late = [r for r in deletes if r["time"] > wall_started + OUTAGE_TIMEOUT_S + 0.5]
            assert not late, f"a second round after the deadline: {[(r['time'] - wall_started, r['path']) for r in deletes]}"
            # what could not be destroyed stays in the ledger, for the exit handler or a cleanup
            live = LEDGER.live().get(api.credentials(), set())
            assert set(ids) <= live, (ids, live)
            assert all(r.destroyed_at is None for r in broker.records.values())
            emu.faults.outage(0)
            report = await api.destroy_instances(sorted(live & set(ids)))  # the cleanup, Vast back
            assert set(report.ids) == set(ids)
            for i in ids:
                LEDGER.discard(api, i)
        assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []

    asyncio.run(main())


def test_a_short_outage_is_ridden_out_in_the_same_round(emulator_rate_limited) -> None:
    """An outage shorter than the deadline: the round's retries destroy everything, nothing raises."""
    emu = emulator_rate_limited

    async def main() -> None:
        with dask.config.set({"vastai.api.outage-timeout": 30, "vastai.api.backoff-max": 1}):
            api = VastAPI(api_key=emu.api_key, api_url=emu.url)
        async with api:
            broker = _broker(api)
            records = await asyncio.gather(*(broker.rent(f"w-{i}") for i in range(2)))
            ids = {r.instance_id for r in records}
            emu.faults.outage(4)
            started = time.monotonic()
            broker.begin_close()
            await asyncio.gather(*(broker.destroy(i) for i in ids))
            await broker.close()
            took = time.monotonic() - started
            print(f"\nclose through a 4 s outage: {took:.1f} s")
            assert 4 <= took <= 4 + 10, took
            assert all(r.destroyed_at is not None for r in broker.records.values())
            assert not ids & LEDGER.live().get(api.credentials(), set())
        assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []

    asyncio.run(main())
