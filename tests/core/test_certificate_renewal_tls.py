"""Short-lived worker certificates, renewed while real ``dask worker`` processes run.

The scheduler is the cluster's (``GuardedScheduler``, the CA's serial check, the live-worker
list); each worker is a real ``dask worker --nanny`` started with the supervisor's own command
line (``supervisor.command``) and the incarnation's environment. Only the SSH link is replaced,
by a local file write (the same atomic put): the sandbox e2e drives the real one. Worker
certificates live 20 s here and are renewed at half their life.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

from distributed import Client, Scheduler
from distributed.comm import connect

from dask_vastai import supervisor
from dask_vastai.bootstrap import Incarnation, incarnation_payload
from dask_vastai.certificate_reload import reload_args
from dask_vastai.network import PeerRoster
from dask_vastai.renewal import CertificateRenewal
from dask_vastai.roles import ROSTER_ENV, WORKER_ARGS, GuardedScheduler, Peer, scheduler_gate
from dask_vastai.security import ClusterCA, WorkerCredentials
from tests.helpers.waiting import until

LIFETIME_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLink:
    """The instance's SSH link, for processes on this machine: an atomic write of a file."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def put(self, remote_path: str, data: bytes, *, mode: int = 0o600) -> None:
        tmp = f"{remote_path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, remote_path)


def start_worker(
    scheduler: str, name: str, ca: ClusterCA, folder: Path
) -> tuple[subprocess.Popen[bytes], str, WorkerCredentials]:
    """A ``dask worker --nanny`` as the supervisor starts it: (process, address, first credentials)."""
    port, nanny_port = _free_port(), _free_port()
    address = f"tls://127.0.0.1:{port}"
    creds = ca.issue_worker(name, address=address, nanny=f"tls://127.0.0.1:{nanny_port}")
    d = folder / name
    d.mkdir()
    env = {ROSTER_ENV: "1", **reload_args(str(folder / f"{name}-renewed.pem"), 0.5)}
    inc = Incarnation(
        worker_name=name, scheduler_address=scheduler, worker_port=port, nanny_port=nanny_port, nthreads=1,
        memory_limit=2**29, resources={}, env=env, tls_ca=creds.ca_pem, tls_cert=creds.cert_pem,
        tls_key=creds.key_pem, death_timeout_s=60, extra_args=WORKER_ARGS,
    )
    argv = supervisor.command(json.loads(incarnation_payload(inc)), str(d))
    log = open(d / "log", "wb")  # noqa: SIM115 - the process writes it until it ends
    proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=d, stdout=log, stderr=subprocess.STDOUT)
    return proc, address, creds


async def handshake_error(address: str, context: ssl.SSLContext) -> str | None:
    """Why a TLS connection to ``address`` presenting ``context``'s certificate fails (None: it did not).

    TLS 1.3 reports a refused client certificate after the client's side of the handshake, with
    the server's alert on the first read: the read is part of the test.
    """
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=context), 10)
        try:
            await asyncio.wait_for(reader.read(1), 2)
        except TimeoutError:
            return None  # accepted: the server waits for our first message
        finally:
            writer.close()
    except ssl.SSLError as e:
        return str(e)
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def presenting(creds: WorkerCredentials) -> ssl.SSLContext:
    """A TLS client context presenting a worker's certificate (what its host holds)."""
    from tests.core.test_live_peers_tls import _as

    return _as(creds)["ssl_context"]


async def serial_at(address: str, ca: ClusterCA) -> int:
    """The serial of the certificate a listener presents now (a new connection, as the client's)."""
    comm = await connect(address, **ca.security().get_connection_args("client"))
    try:
        peer = Peer.from_peercert(comm.extra_info.get("peercert"))
    finally:
        await comm.close()
    assert peer is not None and peer.serial is not None
    return peer.serial


def test_a_cluster_computes_across_renewals_and_the_expired_first_certificates_open_nothing(tmp_path: Path) -> None:
    ca = ClusterCA("renewals", lifetime_days=1, worker_lifetime_s=LIFETIME_S, switch_grace_s=2)

    async def main() -> None:
        async with GuardedScheduler(
            security=ca.security(), protocol="tls", host="127.0.0.1", port=0, dashboard_address=":0",
            gate=scheduler_gate(worker_clients=False, is_current=ca.is_current),
        ) as s:
            roster = PeerRoster(s, ca.live_serials)
            s.add_plugin(roster)
            ca.on_change(roster.push)
            t0 = time.time()
            started = {name: start_worker(s.address, name, ca, tmp_path) for name in ("w0", "w1")}
            # what a host that kept its first key holds
            first = {name: creds for name, (_, _, creds) in started.items()}
            addresses = {name: address for name, (_, address, _) in started.items()}
            try:
                async with Client(s.address, security=ca.security(), asynchronous=True) as client:
                    await client.wait_for_workers(2, timeout=60)
                    files = {name: str(tmp_path / f"{name}-renewed.pem") for name in started}
                    renewal = CertificateRenewal(ca, LocalLink, files, who="test")
                    task = asyncio.create_task(renewal.run())
                    x = client.submit(lambda: 20, workers=[addresses["w0"]], key="x")
                    assert await client.submit(lambda a: a + 1, x, workers=[addresses["w1"]]) == 21

                    # two renewals each, and the first certificates expired (plus the instance clock's slack)
                    await until(lambda: renewal.renewed >= 4 and time.time() > t0 + LIFETIME_S + 2,
                                3 * LIFETIME_S, "two renewals per worker and the first certificates' end")
                    for name in started:
                        # the scheduler switched: a connection showed it the renewed certificate
                        assert ca.current_serial(name) != first[name].serial
                    # new connections everywhere: idle pooled ones end, so each comm below is made now
                    await client.run(lambda dask_worker: dask_worker.rpc.collect())
                    s.rpc.collect()
                    for name, address in addresses.items():
                        assert await serial_at(address, ca) in ca.live_serials(name), "the listener's renewed one"
                    for name in started:  # the first key is worthless: its certificate ended
                        for address in (s.address, *addresses.values()):
                            why = await handshake_error(address, presenting(first[name]))
                            assert why is not None and "certificate expired" in why, (name, address, why)
                    y = client.submit(lambda: 22, workers=[addresses["w1"]], key="y")
                    z = client.submit(lambda a, b: a + b, x, y, workers=[addresses["w0"]], key="z")
                    assert await z == 42, "worker-to-worker transfers after the first certificates expired"
                    assert {ws.name for ws in s.workers.values()} == {"w0", "w1"}

                    # a nanny-restarted worker starts from the renewed files (the first ones expired)
                    await client.restart(timeout=60)
                    assert await client.submit(lambda: 5, workers=[addresses["w1"]]) == 5
                    task.cancel()
            finally:
                for proc, _, _ in started.values():
                    proc.terminate()
                for proc, _, _ in started.values():
                    proc.wait(timeout=30)
            log = "".join((tmp_path / name / "log").read_text(errors="replace") for name in started)
            assert "PRIVATE KEY" not in log, "a renewal shows no key in the worker's log"

    asyncio.run(main())


def test_an_expired_worker_certificate_fails_the_handshake_even_where_only_the_chain_is_checked() -> None:
    """Unrenewed, and still the current one for its name: its end alone refuses it, on the
    cluster's scheduler and on a plain one (a path that checks the chain and nothing else)."""
    ca = ClusterCA("expiry", lifetime_days=1, worker_lifetime_s=3)

    async def main() -> None:
        async with GuardedScheduler(
            security=ca.security(), protocol="tls", host="127.0.0.1", port=0, dashboard_address=":0",
            gate=scheduler_gate(worker_clients=False, is_current=ca.is_current),
        ) as guarded, Scheduler(security=ca.security(), protocol="tls", host="127.0.0.1", port=0,
                                dashboard_address=":0") as plain:
            creds = ca.issue_worker("w", address=None, nanny=None)
            for s in (guarded, plain):
                assert await handshake_error(s.address, presenting(creds)) is None, "valid: accepted"
            await asyncio.sleep(3.5)
            assert ca.current_serial("w") == creds.serial, "never replaced: only its end refuses it"
            for s in (guarded, plain):
                why = await handshake_error(s.address, presenting(creds))
                assert why is not None and "certificate expired" in why, why
            fresh = ca.renew_worker("w")
            assert await handshake_error(plain.address, presenting(fresh)) is None

    asyncio.run(main())

