"""A link that freezes comes back as the same rental; one gone past orphan_timeout is replaced.

The emulator freezes a rental's SSH servers and relays (SIGSTOP: connections hang, as on a
host whose network froze) while Vast still shows it ``running``. Frozen 60 s, shorter than
``orphan_timeout``: the cluster makes the link again as a new incarnation of the same
rental, no second rental. Frozen longer than a short ``orphan_timeout``: the rental is
given up (destroyed) and another one registers in its place. Results right in both, nothing
left rented after close.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from dask_vastai import VastAICluster
from dask_vastai.emulator import Emulator
from tests.helpers.waiting import wait_until_showing

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


def gpu_task(x: int) -> int:
    return x + 1


def _log(cluster: VastAICluster) -> str:
    return cluster.get_logs(scheduler=False, workers=False)["Cluster"]




def _compute(client: Any, tag: str) -> None:
    futures = client.map(gpu_task, range(10), resources={"GPU": 1}, key=[f"{tag}-{i}" for i in range(10)])
    assert client.gather(futures) == list(range(1, 11))


def _one_rental(emu: Emulator, cluster: VastAICluster) -> int:
    rows = [r for r in emu.instances() if (r.get("label") or "").startswith(f"dask-vastai:{cluster.name}:")
            and r["actual_status"] == "running"]
    assert len(rows) == 1, rows
    return int(rows[0]["id"])


def test_a_link_frozen_60s_returns_as_the_same_rental(market: Emulator) -> None:
    from distributed import Client

    emu = market
    with VastAICluster(gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name="frozen", quiet=True,
                       boot_timeout=240) as cluster, Client(cluster) as client:
        _compute(client, "before")
        rental = _one_rental(emu, cluster)
        emu.faults.freeze_ssh(rental)
        time.sleep(60)
        emu.faults.thaw_ssh(rental)
        wait_until_showing(lambda: "is back, a new incarnation" in _log(cluster), 120, "the link back",
                           lambda: _log(cluster))
        _compute(client, "after")
        assert _one_rental(emu, cluster) == rental
        assert len(emu.meter()["instances"]) == 1  # no second rental
        assert not cluster.losses["default"]
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []


def test_a_link_gone_past_orphan_timeout_is_replaced(market: Emulator) -> None:
    from distributed import Client

    emu = market
    with VastAICluster(gpu="RTX_3090", n=1, api_url=emu.url, api_key=emu.api_key, name="gonelink", quiet=True,
                       boot_timeout=240, orphan_timeout=20) as cluster, Client(cluster) as client:
        _compute(client, "before")
        rental = _one_rental(emu, cluster)
        emu.faults.freeze_ssh(rental)
        losses = cluster.losses["default"]
        wait_until_showing(lambda: losses.lost == 1 and losses.replaced == 1 and len(cluster.scheduler.workers) == 1,
              150, "a replacement", lambda: _log(cluster))
        assert cluster.broker.records[rental].destroyed_at is not None
        _compute(client, "after")
        assert _one_rental(emu, cluster) != rental
    assert [r for r in emu.meter()["instances"] if not r["destroyed"]] == []
