"""The role checks over real TLS, in one process: a guarded scheduler, guarded workers and a nanny.

Every server here is the class the cluster runs (``GuardedScheduler``; ``GuardedWorker`` and
the nanny preload, as the supervisor starts them), each worker with its own certificate from
a :class:`ClusterCA`. The user's client, holding the client certificate, keeps every power; a
worker's certificate opens only what a worker does.
"""

from __future__ import annotations

import asyncio
import os
import socket
from contextlib import AsyncExitStack
from typing import Any

import dask
import pytest
from distributed import Client, Nanny, Security
from distributed.core import rpc

from dask_vastai import WorkerClientsDisabled
from dask_vastai.roles import GuardedScheduler, GuardedWorker, scheduler_gate
from dask_vastai.security import ClusterCA, WorkerCredentials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_security(creds: WorkerCredentials, *, as_client: bool = False) -> Security:
    role = "client" if as_client else "worker"
    return Security(require_encryption=True, tls_ca_file=creds.ca_pem,
                    **{f"tls_{role}_cert": creds.cert_pem, f"tls_{role}_key": creds.key_pem})


class Cluster:
    """A scheduler and ``n`` guarded workers, each with its own certificate (names w0, w1, ...)."""

    def __init__(self, n: int, *, worker_clients: bool = False, nanny: bool = False) -> None:
        self.n, self.worker_clients, self.nanny = n, worker_clients, nanny
        self.ca = ClusterCA("t", lifetime_days=1)
        self.creds: list[WorkerCredentials] = []
        self.workers: list[Any] = []

    async def __aenter__(self) -> Cluster:
        self.stack = AsyncExitStack()
        self.scheduler = await self.stack.enter_async_context(GuardedScheduler(
            security=self.ca.security(), protocol="tls", host="127.0.0.1", port=0, dashboard_address=":0",
            gate=scheduler_gate(worker_clients=self.worker_clients, is_current=self.ca.is_current),
        ))
        for k in range(self.n):
            port, nanny_port = _free_port(), _free_port()
            address = f"tls://127.0.0.1:{port}"
            nanny_address = f"tls://127.0.0.1:{nanny_port}" if self.nanny else None
            creds = self.ca.issue_worker(f"w{k}", address=address, nanny=nanny_address)
            self.creds.append(creds)
            common = dict(security=_worker_security(creds), name=f"w{k}", nthreads=2)
            if self.nanny:
                server = Nanny(self.scheduler.address, worker_class=GuardedWorker, preload_nanny=["dask_vastai.roles"],
                               host="127.0.0.1", port=nanny_port, worker_port=port, contact_address=address,
                               listen_address=address, **common)
            else:
                server = GuardedWorker(self.scheduler.address, host="127.0.0.1", port=port,
                                       contact_address=address, **common)
            self.workers.append(await self.stack.enter_async_context(server))
        self.client = await self.stack.enter_async_context(
            Client(self.scheduler.address, security=self.ca.security(), asynchronous=True))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stack.aclose()

    def as_worker(self, k: int) -> dict[str, Any]:
        """Connection arguments presenting worker ``k``'s certificate (what its host holds)."""
        return _worker_security(self.creds[k], as_client=True).get_connection_args("client")


def test_the_users_client_keeps_every_power_and_workers_exchange_data(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import dask.dataframe as dd

    async def main() -> None:
        async with Cluster(2) as c:
            client = c.client
            w0, w1 = (w.address for w in c.workers)
            x = client.submit(lambda: 20, workers=[w0])
            assert await client.submit(lambda a: a + 1, x, workers=[w1]) == 21, "a dependency across workers"
            assert await client.gather(client.submit(bytes, 3_000_000, workers=[w1])) == bytes(3_000_000)
            assert set(await client.run(os.getpid)) == {w0, w1}
            assert await client.run_on_scheduler(lambda: "on the scheduler") == "on the scheduler"
            df = dd.from_pandas(pd.DataFrame({"k": range(2000), "v": range(2000)}), npartitions=8)
            with dask.config.set({"dataframe.shuffle.method": "p2p"}):
                out = await client.compute(df.shuffle("k").v.sum())
            assert out == sum(range(2000)), "a p2p shuffle between guarded workers"
            await client.retire_workers([w1])
            assert list(c.scheduler.workers) == [w0]

    asyncio.run(main())


def test_a_workers_certificate_opens_nothing_a_client_does(tmp_path) -> None:
    marker = tmp_path / "ran-on-the-scheduler"

    async def main() -> None:
        async with Cluster(2) as c:
            with pytest.raises((OSError, TimeoutError)):
                await Client(c.scheduler.address, security=_worker_security(c.creds[0], as_client=True),
                             asynchronous=True, timeout="3s")
            async with rpc(c.scheduler.address, connection_args=c.as_worker(0)) as scheduler:
                with pytest.raises(PermissionError, match="'run_function' is not something a worker does"):
                    await scheduler.run_function(function=lambda: marker.mkdir())
                with pytest.raises(PermissionError, match="not its own address"):
                    await scheduler.unregister(address=c.workers[1].address, stimulus_id="x")
            async with rpc(c.workers[1].address, connection_args=c.as_worker(0)) as other:
                with pytest.raises(PermissionError, match="'run' is not something a worker does"):
                    await other.run(function=lambda: marker.mkdir())
            assert len(c.scheduler.workers) == 2
            assert not marker.exists()

    asyncio.run(main())


def test_a_task_asking_for_a_client_fails_naming_the_option_unless_allowed() -> None:
    def submits() -> int:
        from distributed import get_client

        return get_client().submit(lambda: 5).result()

    async def main(allowed: bool) -> None:
        with dask.config.set({"vastai.allow-worker-clients": allowed}):
            async with Cluster(1, worker_clients=allowed) as c:
                future = c.client.submit(submits)
                if allowed:
                    assert await future == 5
                else:
                    with pytest.raises(WorkerClientsDisabled, match="allow_worker_clients=True"):
                        await future

    asyncio.run(main(False))
    asyncio.run(main(True))


def test_a_nanny_takes_control_only_from_the_client_role() -> None:
    async def main() -> None:
        async with Cluster(2, nanny=True) as c:
            pids = await c.client.run(os.getpid)
            async with rpc(c.workers[1].address, connection_args=c.as_worker(0)) as nanny_b:
                for op in ("kill", "restart", "close_gracefully"):
                    with pytest.raises(PermissionError, match="dask-vastai refused worker 'w0' at this nanny"):
                        await getattr(nanny_b, op)()
            assert await c.client.run(os.getpid) == pids, "no worker was killed or restarted by a peer"
            await c.client.restart()
            assert set((await c.client.run(os.getpid)).values()).isdisjoint(pids.values())

    asyncio.run(main())
