"""Task round trip with and without the role checks: ``client.submit(inc, i).result()`` N times.

Two clusters in this process, the same except for the guard: a scheduler (Dask's
``Scheduler`` or ``GuardedScheduler``) and one nanny whose worker process is Dask's
``Worker`` or ``GuardedWorker`` (with the nanny preload), all over TLS with certificates from
one ``ClusterCA`` (the worker's own, the client's). Runs alternate (plain, guarded, plain,
...) so that the shared box's load hits both alike; prints the median and p90 per run.

    python -m benchmarks.task_round_trip [--tasks N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from distributed import Client, Nanny, Scheduler, Security, Worker

from dask_vastai.roles import GuardedScheduler, GuardedWorker, scheduler_gate
from dask_vastai.security import ClusterCA


def inc(x: int) -> int:
    return x + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def round_trips(guarded: bool, tasks: int) -> list[float]:
    ca = ClusterCA("bench", lifetime_days=1)
    port, nanny_port = _free_port(), _free_port()
    address = f"tls://127.0.0.1:{port}"
    creds = ca.issue_worker("w0", address=address, nanny=f"tls://127.0.0.1:{nanny_port}")
    scheduler_cls = GuardedScheduler if guarded else Scheduler
    extra = {"gate": scheduler_gate(worker_clients=False, is_current=ca.is_current)} if guarded else {}
    async with scheduler_cls(security=ca.security(), protocol="tls", host="127.0.0.1", port=0,
                             dashboard_address=":0", **extra) as scheduler:
        worker_security = Security(require_encryption=True, tls_ca_file=creds.ca_pem,
                                   tls_worker_cert=creds.cert_pem, tls_worker_key=creds.key_pem)
        async with Nanny(scheduler.address, security=worker_security, name="w0", nthreads=1,
                         worker_class=GuardedWorker if guarded else Worker,
                         preload_nanny=["dask_vastai.roles"] if guarded else [],
                         host="127.0.0.1", port=nanny_port, worker_port=port, contact_address=address,
                         listen_address=address):
            async with Client(scheduler.address, security=ca.security(), asynchronous=True) as client:
                await client.submit(inc, -1, pure=False)  # warm: the function travels once
                out = []
                for i in range(tasks):
                    t0 = time.perf_counter()
                    assert await client.submit(inc, i, pure=False) == i + 1
                    out.append(time.perf_counter() - t0)
                return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    medians: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for guarded in (False, True):
            times = asyncio.run(round_trips(guarded, args.tasks))
            p50, p90 = statistics.median(times) * 1e3, statistics.quantiles(times, n=10)[-1] * 1e3
            medians[guarded].append(p50)
            label = "guarded (GuardedScheduler + GuardedWorker)" if guarded else "plain (Scheduler + Worker)"
            print(f"round {r + 1}: {label:44s} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  ({args.tasks} tasks)")
    plain, guarded = statistics.median(medians[False]), statistics.median(medians[True])
    print(f"\nmedian of round medians: plain {plain:.2f} ms, guarded {guarded:.2f} ms, "
          f"guarded/plain {guarded / plain:.3f}")


if __name__ == "__main__":
    main()
