"""Workers accept worker peers only from the live-worker list, over real TLS, in one process.

Direct mode puts workers on public ports, where a host whose rental was replaced, preempted
or released still holds a certificate signed by the cluster's CA (valid until it expires).
Each worker (started with ``roles.ROSTER_ENV``) accepts a worker peer only while the
scheduler's list (``network.PeerRoster``) names it with the serial of its current
certificate; the user's client, presenting the client certificate, is never held to it.
"""

from __future__ import annotations

import asyncio

import pytest
from distributed.comm.core import CommClosedError
from distributed.core import ConnectionPool
from distributed.worker import get_data_from_worker

from dask_vastai import roles
from dask_vastai.network import PeerRoster
from dask_vastai.security import WorkerCredentials
from tests.core.test_roles_tls import Cluster, _worker_security


def _as(creds: WorkerCredentials) -> dict:
    return _worker_security(creds, as_client=True).get_connection_args("client")


async def _fetch(address: str, key: str, connection_args: dict) -> object:
    """``get_data`` as a worker asks it (``gather_dep``), presenting ``connection_args``' certificate."""
    pool = await ConnectionPool(connection_args=connection_args, timeout=5)
    try:
        response = await get_data_from_worker(rpc=pool, keys=[key], worker=address, who=None)
    finally:
        await pool.close()
    return response["data"][key]


def test_only_listed_workers_with_their_current_certificate_get_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(roles.ROSTER_ENV, "1")
    monkeypatch.setattr(roles, "ROSTER_WAIT_S", 1.0)

    async def main() -> None:
        async with Cluster(2) as c:
            roster = PeerRoster(c.scheduler, c.ca.current_serial)
            c.scheduler.add_plugin(roster)
            w0, w1 = c.workers
            x = c.client.submit(lambda: 41, workers=[w1.address], key="x")
            await x
            roster.push()
            # the user's client is never held to the list; a listed worker gets the data
            assert await c.client.submit(lambda v: v + 1, x, workers=[w0.address]) == 42
            assert await _fetch(w1.address, "x", _as(c.creds[0])) == 41

            # w0's rental is replaced: a new certificate for its name, the list says so
            c.ca.issue_worker("w0", address=w0.address, nanny=None)
            roster.push()
            with pytest.raises((CommClosedError, OSError, PermissionError)):
                await _fetch(w1.address, "x", _as(c.creds[0]))

            # a worker that left the list (released, preempted) is refused too
            roster.push(leaving=w0.address)
            await asyncio.sleep(0.2)
            assert w1.gate.live is not None and "w0" not in w1.gate.live._serials
            with pytest.raises((CommClosedError, OSError, PermissionError)):
                await _fetch(w1.address, "x", _as(c.creds[0]))

    asyncio.run(main())


def test_a_connection_waits_a_moment_for_a_list_naming_its_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The list reaches each worker on its own stream, maybe after the new worker's first fetch."""
    monkeypatch.setenv(roles.ROSTER_ENV, "1")

    async def main() -> None:
        async with Cluster(2) as c:
            roster = PeerRoster(c.scheduler, c.ca.current_serial)
            w0, w1 = c.workers
            y = c.client.submit(lambda: 7, workers=[w1.address], key="y")
            await y
            fetch = asyncio.ensure_future(_fetch(w1.address, "y", _as(c.creds[0])))
            await asyncio.sleep(0.5)
            assert not fetch.done(), "w0 is not on w1's (empty) list yet: it waits"
            roster.push()
            assert await asyncio.wait_for(fetch, 5) == 7
            del y

    asyncio.run(main())
