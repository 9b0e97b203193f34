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

from collections.abc import Iterable, Mapping
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
