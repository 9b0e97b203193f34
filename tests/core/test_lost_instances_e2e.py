"""Rentals lost after renting are replaced, never mourned: preemption and offline hosts.

End to end on the user's marketplace (real sandboxes, rate limits on, the strict profile):
an interruptible cluster of 3 runs GPU tasks; after some results two instances are outbid
and one host goes offline. Every result must come back right, every lost rental be
destroyed within 10 s of being seen lost, 3 replacements register (the pool back at its
size, whatever distributed's lost-worker-timeout says), and nothing be left rented after
close. Kept lean (60 short tasks, 1 s boots): the suite must stay quick on a small box.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dask_vastai.emulator import Emulator
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

N_TASKS = 60
FAULT_AFTER = 20
TASK_S = 0.2


def gpu_task(x: int) -> int:
    import time

    time.sleep(TASK_S)
    return x * x


def _running_rentals(emu: Emulator, cluster_name: str) -> list[dict[str, Any]]:
    return [r for r in emu.instances() if (r.get("label") or "").startswith(f"dask-vastai:{cluster_name}:")
            and r["actual_status"] == "running"]


def run_round(client: Any, cluster: Any, emu: Emulator, *, faults: bool, tag: str) -> dict[str, Any]:
    """``N_TASKS`` GPU tasks; with ``faults``, after ``FAULT_AFTER`` results two rentals are
    outbid and one host goes offline."""
    from distributed import as_completed

    started = time.monotonic()
    futures = client.map(gpu_task, range(N_TASKS), resources={"GPU": 1}, key=[f"{tag}-{i}" for i in range(N_TASKS)])
    hit: dict[int, float] = {}
    for done, _ in enumerate(as_completed(futures), start=1):
        if faults and done == FAULT_AFTER:
            live = _running_rentals(emu, cluster.name)
            assert len(live) == 3, live
            for row in live[:2]:
                emu.faults.preempt(row["id"])
                hit[row["id"]] = time.time()
            emu.faults.host_offline(live[2]["id"])
            hit[live[2]["id"]] = time.time()
    results = client.gather(futures)
    assert results == [x * x for x in range(N_TASKS)]
    return {"makespan_s": time.monotonic() - started, "hit": hit}


def check_replaced(cluster: Any, out: dict[str, Any], before: tuple[int, int, int]) -> dict[str, float]:
    """The lost rentals destroyed within 10 s of being seen lost, and 3 replacements registered."""
    records = {i: cluster.broker.records[i] for i in out["hit"]}
    wait_until(lambda: all(r.destroyed_at is not None for r in records.values()), 30,
               "the lost rentals to be destroyed")
    assert all(r.lost is not None for r in records.values()), {i: r.state for i, r in records.items()}
    seen_to_destroyed = {i: r.destroyed_at - r.lost_at for i, r in records.items()}
    assert max(seen_to_destroyed.values()) <= 10, seen_to_destroyed
    losses = cluster.losses["default"]
    wait_until(lambda: losses.replaced - before[2] >= 3, 180,
               f"3 replacements; log: {cluster.get_logs(scheduler=False, workers=False)['Cluster']}")
    assert (losses.preempted - before[0], losses.lost - before[1]) == (2, 3)
    wait_until(lambda: len(cluster.scheduler.workers) == 3, 60, "3 workers")
    return seen_to_destroyed


def test_preempted_and_offline_instances_are_replaced_under_scale(market: Emulator) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    emu = market
    with VastAICluster(gpu="RTX_3090", n=3, interruptible=True, api_url=emu.url, api_key=emu.api_key,
                       name="lost", boot_timeout=240, quiet=True) as cluster, Client(cluster) as client:
        base = run_round(client, cluster, emu, faults=False, tag="base")
        out = run_round(client, cluster, emu, faults=True, tag="scale")
        seen_to_destroyed = check_replaced(cluster, out, (0, 0, 0))
        # after the lost-worker timeout (15 s) has passed too, the pool still holds 3 instances
        time.sleep(16)
        assert len(cluster.pool_instances("default")) == 3
        assert len(_running_rentals(emu, cluster.name)) == 3
        again = run_round(client, cluster, emu, faults=False, tag="after")
        text = repr(cluster)
        assert "preempted=2" in text and "lost=3" in text and "replaced=3" in text, text
        assert "replaced" in cluster._repr_html_()
        log = "\n".join(cluster.get_logs(scheduler=False, workers=False)["Cluster"].splitlines())
    meter = emu.meter()["instances"]
    assert [r["id"] for r in meter if not r["destroyed"]] == []
    assert len(meter) == 3 + 3
    assert "outbid" in log and "offline" in log and "replaces lost instance" in log
    print(f"\nfault-free {base['makespan_s']:.1f} s, with faults {out['makespan_s']:.1f} s, after "
          f"{again['makespan_s']:.1f} s; seen lost -> destroyed max {max(seen_to_destroyed.values()):.1f} s")


def test_preempted_and_offline_instances_are_replaced_under_adapt(market: Emulator) -> None:
    """The same under adapt(0, 3), with the other plausible record of an outbid rental
    (``intended_status`` ``stopped`` and a message)."""
    from distributed import Client

    from dask_vastai import VastAICluster

    emu = market
    emu.variants.set(outbid_intended="stopped", outbid_msg="Instance outbid by a higher bid")
    with VastAICluster(gpu="RTX_3090", n=0, interruptible=True, api_url=emu.url, api_key=emu.api_key,
                       name="lostadapt", boot_timeout=240, quiet=True) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=3)
        warm = run_round(client, cluster, emu, faults=False, tag="warm")
        wait_until(lambda: len(_running_rentals(emu, cluster.name)) == 3, 60, "3 rentals under adapt")
        out = run_round(client, cluster, emu, faults=True, tag="adapt")
        seen_to_destroyed = check_replaced(cluster, out, (0, 0, 0))
    meter = emu.meter()["instances"]
    assert [r["id"] for r in meter if not r["destroyed"]] == []
    print(f"\nadapt: warm-up {warm['makespan_s']:.1f} s, with faults {out['makespan_s']:.1f} s; seen lost -> "
          f"destroyed max {max(seen_to_destroyed.values()):.1f} s")
