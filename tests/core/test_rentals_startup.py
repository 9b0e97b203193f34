"""Start-up: rentals boot while their labels are written, with API calls flat in N.

A bulk create carries one label for its whole batch; each rental then gets its worker's
label, one paced call each (about 1 s apart). Nothing waits for those calls: the rentals are
watched (one list call per poll interval, whatever N) and booted meanwhile. Records-only
emulator with Vast's rate limits; the 16-instance timing with real sandboxes is
``benchmarks/startup_many.py``.
"""

from __future__ import annotations

import asyncio
import time

from dask_vastai.labels import rental_label
from dask_vastai.offers import OfferRequirements
from dask_vastai.rentals import RentalBroker, ssh_ready
from dask_vastai.vast import CreateRequest, VastAPI

POLL_S = 1.0


def _broker(api: VastAPI, name: str) -> RentalBroker:
    return RentalBroker(api, cluster_name=name, requirements=OfferRequirements(gpu="RTX_3090"),
                        create_request=CreateRequest(image="vastai/pytorch", disk_gb=20), poll_interval_s=POLL_S)


async def _start(emu, n: int, window_s: float) -> dict[str, float]:
    """Rent ``n``, wait until all are ready; what the account's API saw in the first ``window_s``."""
    name = f"s{n}"
    async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
        broker = _broker(api, name)
        started = time.time()
        records = await asyncio.gather(*(broker.rent(f"{name}-{i}") for i in range(n)))
        rows = await asyncio.gather(*(broker.wait_until_ready(r.instance_id, 60) for r in records))
        ready_s = time.time() - started
        assert all(ssh_ready(row) for row in rows)
        labels_at_ready = sum(1 for r in emu.requests if r["endpoint"] == "update" and r["time"] >= started)
        await asyncio.sleep(max(0.0, window_s - (time.time() - started)))
        await broker.labels_written()
        listed = {row["id"]: row["label"] for row in emu.instances()}
        assert all(listed[r.instance_id] == rental_label(name, r.worker_name) for r in records), listed
        await broker.close()
    calls = [r for r in emu.requests if started <= r["time"] <= started + window_s]
    return {
        "ready_s": ready_s,
        "labels_at_ready": labels_at_ready,
        "lists": sum(1 for r in calls if r["endpoint"] == "list"),
        "429s": sum(1 for r in calls if r["status"] == 429),
    }


def test_rentals_boot_while_labels_are_written_and_list_calls_stay_flat(emulator_rate_limited) -> None:
    emu = emulator_rate_limited
    window_s = 6.0
    small = asyncio.run(_start(emu, 2, window_s))
    large = asyncio.run(_start(emu, 8, window_s))
    # 8 labels take 7 s of paced calls: the rentals were watched and ready long before.
    assert large["labels_at_ready"] < 8 and large["ready_s"] < 5, large
    # One poller: list calls per interval do not grow with N (the window holds ~6 polls).
    assert large["lists"] <= small["lists"] + 1, (small, large)
    assert large["lists"] <= window_s / POLL_S + 2, large
    assert small["429s"] == large["429s"] == 0
