"""What the run rented, how its instances boot, and what it all cost, as Snakemake log lines.

The executor reads ``VastAICluster.instances`` on each status check and this class turns
what changed into lines: one when an instance is rented (id, GPU, $/h), one per change
of its state (loading, running, registered, ... whatever states the cluster reports),
never one per poll. At the end, one line with the dollars spent: the cluster's own
meter (each rental's ``dph_total`` times its uptime, read after every rental is destroyed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dask_vastai.units import duration, rate, usd

from .joblog import PREFIX


class RentalProgress:
    """Turns successive snapshots of ``cluster.instances`` into the lines worth printing."""

    def __init__(self) -> None:
        self._states: dict[Any, str] = {}

    def update(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """The lines for what changed since the last snapshot (rentals, state changes)."""
        lines = []
        for row in rows:
            rid = row.get("id")
            state = str(row.get("state") or "created")
            before = self._states.get(rid)
            if before == state:
                continue
            self._states[rid] = state
            if before is None:
                lines.append(
                    f"{PREFIX}rented instance {rid}: {row.get('gpu')}, {rate(float(row.get('dph') or 0))}"
                    + ("" if state in ("created", "renting") else f", {state}")
                )
            elif state == "destroyed":
                lines.append(
                    f"{PREFIX}instance {rid} destroyed after {duration(float(row.get('uptime_s') or 0))}, "
                    f"{usd(float(row.get('cost_usd') or 0))}"
                )
            else:
                lines.append(self._state_line(rid, state, row))
        return lines

    @staticmethod
    def _state_line(rid: Any, state: str, row: Mapping[str, Any]) -> str:
        up = duration(float(row.get("uptime_s") or 0))
        if state == "registered":
            workers = ", ".join(map(str, row.get("workers") or ()))
            return f"{PREFIX}instance {rid} registered (workers {workers}) {up} after renting"
        why = row.get("reason") or row.get("status_msg")
        return f"{PREFIX}instance {rid} {state} ({up})" + (f": {why}" if why else "")

    @staticmethod
    def summary(rows: list[Mapping[str, Any]], cost_usd: float) -> str:
        """The closing line: how many rentals, for how long, and the dollars they cost."""
        if not rows:
            return f"{PREFIX}nothing was rented; cost $0.00"
        uptime = sum(float(r.get("uptime_s") or 0) for r in rows)
        n = len(rows)
        alive = [str(r.get("id")) for r in rows if r.get("state") != "destroyed"]
        left = (
            f"{len(alive)} NOT destroyed ({', '.join(alive)}): run `dask-vastai cleanup`" if alive
            else "all destroyed"
        )
        return (
            f"{PREFIX}{n} instance{'s' if n > 1 else ''} rented for {duration(uptime)} in all, "
            f"{left}; cost {usd(cost_usd)}"
        )
