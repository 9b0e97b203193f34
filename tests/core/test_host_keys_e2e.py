"""A cluster refuses an SSH endpoint that is not the instance it rented, and rents another.

The emulator's fault ``impostor_ssh`` puts a man in the middle on a boot's SSH endpoints: they
present a host key other than the one the instance has in ``/etc/ssh`` and prints into its
log. The cluster reads the log through the API before connecting, so it refuses during the key
exchange: the impostor never gets the supervisor, an incarnation or a forward.
"""

from __future__ import annotations

import pytest

from dask_vastai.bootstrap import HOST_KEYS_MARK

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_a_man_in_the_middle_on_ssh_is_refused_and_the_rental_replaced(market) -> None:
    from distributed import Client

    from dask_vastai import VastAICluster

    market.faults.impostor_ssh(count=1)
    # It asserts no row is left right after close; strict keeps destroyed rows listed a while.
    market.variants.set(destroy_linger_s=0)
    with VastAICluster(
        gpu="RTX_3090", n=1, api_url=market.url, api_key=market.api_key, name="mitm", boot_timeout=180,
        quiet=True,
    ) as cluster, Client(cluster) as client:
        assert client.submit(lambda x: x + 1, 1).result() == 2
        records = sorted(cluster.broker.records.values(), key=lambda r: r.rented_at)
        assert len(records) == 2, records
        first, second = records
        assert first.destroyed_at is not None and second.destroyed_at is None
        log = str(cluster.get_logs(scheduler=False, workers=False)["Cluster"])
        assert f"instance {first.instance_id} failed: refused SSH" in log, log
        assert f"not the one pinned from the log of instance {first.instance_id}" in log
        assert "trusting the first key" not in log
        # The impostor's instance printed its real keys, and the client never installed anything
        # there (the loader would have become the supervisor).
        impostor_log = market.market.runtime.logs(first.instance_id)
        assert HOST_KEYS_MARK in impostor_log
        assert "dask-vastai supervisor:" not in impostor_log, impostor_log
        assert "dask-vastai supervisor: watching" in market.market.runtime.logs(second.instance_id)
    assert market.instances() == []
