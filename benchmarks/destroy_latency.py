"""How long after the broker decides to close at ``max_cost`` does Vast's meter stop?

``max_cost`` starts closing when ``spent + rate x (check interval + destroy latency)`` reaches
the cap, so the destroy latency it assumes (``vastai.spending.destroy-latency``) must cover
the worst case: the destroy endpoint is paced (3 s between calls of an account), so a destroy
sent just before (a scale-down, a failed boot) delays ours by up to 3 s. Measured on the
emulator (strict profile, Vast's rate limits): from the decision to the moment the emulator
handled the accepted destroy (when its meter stops), for

* ``idle``: no destroy before;
* ``after a destroy``: another rental of the cluster destroyed just before the decision.

    python -m benchmarks.destroy_latency [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from dask_vastai.budget import SpendingCaps


async def one(alive: int, after_destroy: bool, survivors: str) -> list[float]:
    """Seconds from the decision to each rental's meter stopping, the last one last."""
    from dask_vastai.emulator import Emulator
    from dask_vastai.exceptions import BudgetExhausted
    from dask_vastai.offers import OfferRequirements
    from dask_vastai.rentals import RentalBroker
    from dask_vastai.vast import CreateRequest, VastAPI

    emu = Emulator(runtime="record", rate_limits=True, boot_delay_s=0, profile="strict")
    await emu.start()
    try:
        emu.variants.set(bulk_destroy_survivors=survivors)
        async with VastAPI(api_key=emu.api_key, api_url=emu.url) as api:
            broker = RentalBroker(
                api, cluster_name="lat", requirements=OfferRequirements(gpu="RTX_3090"),
                create_request=CreateRequest(image="vastai/pytorch", disk_gb=40), poll_interval_s=2.0,
                caps=SpendingCaps(max_cost_usd=1000.0),
            )
            records = await asyncio.gather(*(broker.rent(f"lat-{i}") for i in range(alive + after_destroy)))
            if after_destroy:
                await broker.destroy(records[0].instance_id)
            targets = [r.instance_id for r in records[after_destroy:]]
            decided = time.time()
            await broker._exhaust(BudgetExhausted("benchmark"))
            await broker.close()
        # When each rental's meter stopped: the emulator's own record of its end.
        ends = {r.id: r.end_date for r in emu.market.ledger.values()}
        return sorted(ends[i] - decided for i in targets)
    finally:
        await emu.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = (
        ("1 rental, destroy endpoint idle", 1, False, "none"),
        ("1 rental, just after another destroy", 1, True, "none"),
        ("4 rentals, bulk destroy, none survives, after a destroy", 4, True, "none"),
        ("4 rentals, bulk destroy, all survive it, after a destroy", 4, True, "all"),
    )
    for case, alive, after, survivors in cases:
        rounds = [asyncio.run(one(alive, after, survivors)) for _ in range(args.rounds)]
        print(f"{case}: meter stopped after " + "; ".join(", ".join(f"{t:.2f}" for t in r) for r in rounds)
              + " s", flush=True)


if __name__ == "__main__":
    main()
