"""What the run rented, how its instances boot, and what it all cost, as Snakemake log lines.

The cluster runs quiet (its own progress display would write around Snakemake's log); the
executor reads ``VastAICluster.instances`` on each status check instead and this class turns
what changed into lines: one when an instance is rented (id, GPU, $/h), one per change of
its phase (loading image, connecting, installing, starting workers, registered, failed with
its reason, destroyed), never one per poll. At the end, one line with the dollars spent:
the cluster's own meter (each rental's ``dph_total`` times its uptime), read after every
rental is destroyed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dask_vastai.display import duration, shorten, usd, usd_per_hour

from .joblog import PREFIX

#: phases a row may be in before its rental exists (no id to name yet: nothing to say)
_UNRENTED = ("renting",)


class RentalProgress:
    """Turns successive snapshots of ``cluster.instances`` into the lines worth printing."""

    def __init__(self) -> None:
        self._phases: dict[Any, str] = {}

    def update(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        """The lines for what changed since the last snapshot (rentals, phase changes)."""
        lines = []
        for row in rows:
            rid = row.get("id")
            phase = str(row.get("state") or "")
            if rid is None or phase in _UNRENTED:
                continue
            before = self._phases.get(rid)
            if before == phase:
                continue
            self._phases[rid] = phase
            if before is None:
                lines.append(
                    f"{PREFIX}rented instance {rid}: {row.get('gpu')}, {usd_per_hour(float(row.get('dph') or 0))}"
                    + (f", {phase}" if phase else "")
                )
            else:
                lines.append(self._phase_line(rid, phase, row))
        return lines

    @staticmethod
    def _phase_line(rid: Any, phase: str, row: Mapping[str, Any]) -> str:
        up = duration(float(row.get("uptime_s") or 0))
        if phase == "registered":
            workers = ", ".join(map(str, row.get("workers") or ()))
            return f"{PREFIX}instance {rid} registered (workers {workers}) {up} after renting"
        if phase == "destroyed":
            return f"{PREFIX}instance {rid} destroyed after {up}, {usd(float(row.get('cost_usd') or 0))}"
        why = row.get("reason") if phase in ("failed", "lost") else row.get("status_msg") if phase == "loading image" else None
        return f"{PREFIX}instance {rid} {phase} ({up})" + (f": {shorten(str(why), 200)}" if why else "")

    @staticmethod
    def summary(rows: list[Mapping[str, Any]], cost_usd: float, bandwidth_usd: float = 0.0, losses: str = "") -> str:
        """The closing line: how many rentals, for how long, what became of the ones lost
        after renting (``losses``, e.g. ``"1 preempted, 1 replaced"``: a rental count that
        exceeds the pool's size is explained there), and the dollars they cost (the
        bandwidth's part said apart, before the total)."""
        rented = [r for r in rows if r.get("id") is not None]
        if not rented:
            return f"{PREFIX}nothing was rented; cost $0.00"
        uptime = sum(float(r.get("uptime_s") or 0) for r in rented)
        n = len(rented)
        alive = [str(r.get("id")) for r in rented if r.get("state") not in ("destroyed", "failed", "lost")]
        left = (
            f"{len(alive)} NOT destroyed ({', '.join(alive)}): run `dask-vastai cleanup`" if alive
            else "all destroyed"
        )
        return (
            f"{PREFIX}{n} instance{'s' if n > 1 else ''} rented for {duration(uptime)} in all, "
            f"{left}{'; ' + losses if losses else ''}; bandwidth {usd(bandwidth_usd)} of the cost {usd(cost_usd)}"
        )
