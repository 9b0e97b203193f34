"""Bytes in and out of each rental, as this client can count them, and what Vast bills for them.

Vast bills bandwidth per byte at each offer's own rates (``inet_up_cost`` for what the instance
sends, ``inet_down_cost`` for what it receives, $ per GB). Every byte of a rental crosses one
of two kinds of connection, and each is counted once:

* its SSH links to this machine (``tunnel.py`` counts every byte of them as it passes: SSH
  framing, the tunnelled Dask traffic, files sent over SFTP, installs shipped from here);
* in direct mode, the connections its workers' public listeners accepted: each such worker
  counts the bytes of its connections per peer and reports them in its heartbeats
  (``roles.ListenerTraffic``). A connection from another worker is billed on both ends, so
  what a worker received from a peer is also what that peer's rental sent (and the reverse):
  :class:`TrafficBook` credits both.

Not counted (the README says so): the instance's own traffic that is not ours (image pulls,
``pip install`` from the package index during boot, the watchdog's API calls), TLS record
overhead of direct connections (a fraction of a percent), and bytes of a direct connection
between two workers of the same instance (it stays inside the machine). A host that lies in
its reports can shift its peers' estimates; Vast's own bill is the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Vast's bandwidth prices are $ per GB; a GB is 10^9 bytes
BYTES_PER_GB = 1e9


@dataclass
class Traffic:
    """Bytes a rental sent (``up``) and received (``down``) on its public network."""

    up: int = 0
    down: int = 0

    def add(self, up: int = 0, down: int = 0) -> None:
        self.up += int(up)
        self.down += int(down)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.up + other.up, self.down + other.down)

    def cost_usd(self, up_usd_per_gb: float, down_usd_per_gb: float) -> float:
        """What Vast bills for these bytes at an offer's rates ($/GB)."""
        return (self.up * up_usd_per_gb + self.down * down_usd_per_gb) / BYTES_PER_GB


class TrafficBook:
    """Turns the workers' cumulative listener reports into each rental's direct traffic.

    Reports are cumulative per worker process (a token names the process): the book keeps the
    last report of each and credits only what grew, so a restarted worker (new token) counts
    from zero and a repeated or older report (one heartbeat kept after a newer answer) counts
    nothing.
    """

    def __init__(self) -> None:
        #: worker name -> (process token, received, sent, {peer: (received, sent)})
        self._seen: dict[str, tuple[str, int, int, dict[str, tuple[int, int]]]] = {}

    def update(self, reports: Iterable[tuple[str, Mapping[str, Any]]], rentals: Mapping[str, Traffic],
               same_rental: Mapping[str, Any]) -> None:
        """Credit what each worker reported since its last report.

        ``reports``: (worker name, its ``dask-vastai-traffic`` metric); ``rentals``: worker name
        -> the direct :class:`Traffic` of its rental; ``same_rental``: worker name -> its
        rental's id (bytes between two workers of one rental never left the machine).
        """
        for name, report in reports:
            try:
                token = str(report["token"])
                received, sent = int(report["received"]), int(report["sent"])
                peers = {str(p): (int(v[0]), int(v[1])) for p, v in dict(report.get("peers") or {}).items()}
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # not a report of ours: nothing to credit
            last = self._seen.get(name)
            if last is None or last[0] != token:
                last = (token, 0, 0, {})
            elif received <= last[1] and sent <= last[2]:
                # an older report of the same process (a heartbeat kept after a newer answer):
                # nothing new, and the baseline must not go back, or what follows counts twice
                continue
            own = rentals.get(name)
            d_received, d_sent = max(0, received - last[1]), max(0, sent - last[2])
            for peer, (p_received, p_sent) in peers.items():
                before = last[3].get(peer, (0, 0))
                dr, ds = max(0, p_received - before[0]), max(0, p_sent - before[1])
                if peer in same_rental and same_rental.get(peer) == same_rental.get(name):
                    d_received -= dr  # inside one machine: nobody billed
                    d_sent -= ds
                    continue
                other = rentals.get(peer)
                if other is not None:
                    other.add(up=dr, down=ds)  # what this worker received, the peer sent
            if own is not None:
                own.add(up=max(0, d_sent), down=max(0, d_received))
            self._seen[name] = (token, received, sent, peers)


class TrafficCollector:
    """Collects the direct workers' listener reports at the scheduler and credits their rentals.

    Reports arrive three ways: in heartbeats (the ``dask-vastai-traffic`` metric, up to a
    second late), as the last event of a closing worker (which rarely arrives: the scheduler
    stops reading a worker's stream as it retires it), and as answers when the scheduler asks
    (:meth:`ask`), which is what the cluster does before workers go. A worker that left is
    still credited to its rental: the rental of each worker name is kept.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self._book = TrafficBook()
        #: worker name -> its rental record (kept after it left: its last reports still count)
        self._rental_of: dict[str, Any] = {}
        self._events_seen = 0.0

    def count(self, scheduler: Any, instances: Iterable[Any], asked: Iterable[tuple[str, Mapping[str, Any]]] = ()
              ) -> None:
        """Credit each rental with the direct traffic its workers reported since the last time.

        ``instances``: the cluster's instances (each with ``record`` and ``worker_names``).
        """
        if scheduler is None:
            return
        for instance in instances:
            record = getattr(instance, "record", None)
            if record is not None:
                for name in instance.worker_names:
                    self._rental_of[name] = record
        reports = [(str(ws.name), ws.metrics[self.metric]) for ws in list(scheduler.workers.values())
                   if isinstance(ws.metrics.get(self.metric), dict)]
        reports += list(asked)  # cumulative: the newest of a worker's reports wins, counted once
        for stamp, report in scheduler.get_events(self.metric):
            if stamp > self._events_seen and isinstance(report, dict) and report.get("name"):
                reports.append((str(report["name"]), report))
                self._events_seen = stamp
        self._book.update(
            reports, {n: r.direct_traffic for n, r in self._rental_of.items()},
            {n: r.instance_id for n, r in self._rental_of.items()},
        )

    def direct_addresses(self, scheduler: Any, names: Collection[str] | None = None) -> list[str]:
        """Addresses of the registered workers that count direct traffic (of ``names``: all)."""
        if scheduler is None:
            return []
        return [a for a, ws in list(scheduler.workers.items()) if self.metric in ws.metrics
                and (names is None or str(ws.name) in names)]

    async def ask(self, scheduler: Any, instances: Iterable[Any], addresses: Collection[str]) -> None:
        """Credit what these direct workers counted up to now, asking each (a request only the
        scheduler's role may make, which a retired worker still answers until it stops)."""
        if scheduler is None or not addresses:
            return
        rpc = scheduler.rpc

        async def ask_one(address: str) -> Any:
            with contextlib.suppress(Exception):  # one that does not answer keeps its last heartbeat's
                return await asyncio.wait_for(getattr(rpc(address), self.metric)(), 10)
            return None

        answers = await asyncio.gather(*(ask_one(a) for a in addresses))
        self.count(scheduler, instances,
                   [(str(r["name"]), r) for r in answers if isinstance(r, dict) and r.get("name")])
