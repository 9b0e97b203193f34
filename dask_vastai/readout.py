"""What a user reads of a cluster: dollars, rates, caps, the instance table, losses, its repr and widget.

A mixin of ``VastAICluster``, so that the cluster module holds what it does (options -> specs,
scale, adapt, close) and this one what it shows. It reads the cluster's parts by name, and
only reads them: ``broker`` (the rental records and their dollars), ``caps``, ``pools``
(losses), ``_phases``, ``_adaptives``, ``worker_spec`` and distributed's own attributes
(``scheduler``, ``status``, ``loop``, ``periodic_callbacks``).
"""

from __future__ import annotations

from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from tornado.ioloop import PeriodicCallback

from .pools import PoolLosses
from .status import GONE, InstanceTable, instance_table
from .widget import ClusterWidget, cluster_html


class ClusterReadout:
    """Cost, rates, caps, instance rows, losses, ``repr`` and the notebook views of a cluster."""

    broker: Any
    caps: Any
    pools: Any
    worker_spec: dict[str, Any]
    _phases: Any
    _adaptives: dict[str, Any]
    _cluster_widget: ClusterWidget | None

    @property
    def cost(self) -> float:
        """Dollars spent so far: each rental's ``dph_total`` times its uptime, plus its bandwidth
        (bytes in and out at its offer's ``inet_down_cost``/``inet_up_cost``; see ``bandwidth_cost``)."""
        return self.broker.cost_usd if self.broker else 0.0

    @property
    def bandwidth_cost(self) -> float:
        """The dollars of :attr:`cost` that are bandwidth: the bytes this client counted on its SSH
        links and the workers reported for their direct connections (an estimate: see the README)."""
        return self.broker.bandwidth_cost_usd if self.broker else 0.0

    @property
    def hourly_rate(self) -> float:
        """Dollars per hour of the rentals alive now."""
        return self.broker.hourly_rate_usd if self.broker else 0.0

    @property
    def budget_left_usd(self) -> float | None:
        """Dollars left of ``max_cost`` (None without one): the widget's "budget left"."""
        if self.caps is None:
            return None
        return self.broker.budget_left_usd if self.broker is not None else self.caps.left_usd(0.0)

    @property
    def max_hourly_usd(self) -> float | None:
        """The ``max_hourly`` cap ($/h of all rentals together), or None."""
        return self.caps.max_hourly_usd if self.caps is not None else None

    @property
    def instances(self) -> InstanceTable:
        """One row per rental, then one per instance still renting: a list that shows as a table.

        Each row (:class:`~dask_vastai.status.InstanceRow`, also a mapping: ``row["state"]``)
        has the rental id, GPU model x count, phase (renting, loading image, connecting,
        installing, starting workers, registered, failed with its reason, destroyed),
        Vast's status message, $/h, uptime, dollars so far, worker names and pool.
        """
        records = self.broker.records.values() if self.broker is not None else ()
        scheduler = self.scheduler
        registered = {ws.name for ws in list(scheduler.workers.values())} if scheduler is not None else set()
        return instance_table(records, self._phases, dict(self.worker_spec), registered)

    @property
    def losses(self) -> dict[str, PoolLosses]:
        """Per pool: rentals lost after renting (preempted or otherwise), replaced, rented on demand."""
        return dict(self.pools.losses)

    @property
    def adaptive_targets(self) -> dict[str, tuple[int, float, int | None]]:
        """Per adapting pool: (minimum, maximum, instances wanted at its last round)."""
        return {pool: (a.minimum, a.maximum, a.target) for pool, a in self._adaptives.items()}

    def _repr_html_(self, cluster_status: Any = None) -> str:  # type: ignore[override]
        return cluster_html(self)

    def _widget(self) -> Any:
        """The ipywidgets view (None without ipywidgets): distributed's ``_ipython_display_`` shows it."""
        if self._cluster_widget is None:
            try:
                import ipywidgets  # noqa: F401
            except ImportError:
                return None
            self._cluster_widget = ClusterWidget(self)
            refresh = PeriodicCallback(
                self._cluster_widget.update,
                1000 * parse_timedelta(dask.config.get("distributed.deploy.cluster-repr-interval"), default="ms"),
            )
            self.periodic_callbacks["cluster-repr"] = refresh
            if self.status == Status.running:
                self.loop.add_callback(refresh.start)
        else:
            # Displaying again shows the cluster as it is now, not as of the last tick.
            self._cluster_widget.update()
        return self._cluster_widget.root

    def __repr__(self) -> str:
        alive = [r for r in self.instances if r.phase not in GONE]
        losses = [lost for lost in self.pools.losses.values() if lost]
        counts = ""
        if losses:
            counts = (f", preempted={sum(x.preempted for x in losses)}, lost={sum(x.lost for x in losses)}, "
                      f"replaced={sum(x.replaced for x in losses)}")
            if any(x.on_demand for x in losses):
                counts += f", on_demand={sum(x.on_demand for x in losses)}"
        return (
            f"{type(self).__name__}({self.name!r}, {self.scheduler_address!r}, "
            f"instances={len(alive)}, workers={len(self.scheduler_info.get('workers', {}))}{counts}, "
            f"${self.hourly_rate:.3f}/h, cost=${self.cost:.4f} (bandwidth ${self.bandwidth_cost:.4f}))"
        )

