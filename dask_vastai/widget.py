"""The cluster as a notebook shows it: instances, money, workers, adaptive target, dashboard.

distributed's generic cluster widget shows a scheduler's registered workers only, so right
after ``VastAICluster(n=2)`` returned it or while instances boot it reads "Workers: 0",
with no GPU, no price and no state. Here the view is built from the cluster's instance
rows (:mod:`dask_vastai.status`): one row per instance (id, GPU, phase with its reason,
$/h, uptime, $ so far, workers), totals ($/h now, $ spent, budget left when a spending
cap is set), the dashboard link and, per pool that adapts, its bounds and last target.

:func:`cluster_html` is the ``_repr_html_`` (also what a notebook without ipywidgets
shows); :class:`ClusterWidget` wraps it in ipywidgets, refreshed by a periodic callback on
the cluster's event loop, with the scaling controls distributed's widget has (counted in
instances, as ``scale`` counts).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, Protocol

from .display import CELL_STYLE, TABLE_STYLE, usd, usd_per_hour
from .status import BOOTING, GONE, InstanceTable, Phase


class ClusterView(Protocol):
    """What the view reads of a cluster (``VastAICluster``)."""

    name: str
    status: Any

    @property
    def dashboard_link(self) -> str: ...

    @property
    def scheduler_address(self) -> str: ...

    @property
    def instances(self) -> InstanceTable: ...

    @property
    def hourly_rate(self) -> float: ...

    @property
    def cost(self) -> float: ...

    @property
    def bandwidth_cost(self) -> float: ...

    @property
    def adaptive_targets(self) -> Mapping[str, tuple[int, float, int | None]]: ...

    @property
    def losses(self) -> Mapping[str, Any]: ...  # per pool: a PoolLosses (``.text()``, truthy when any)


def _summary(cluster: ClusterView, rows: InstanceTable) -> list[tuple[str, str]]:
    """(label, text) lines above the instance table."""
    alive = [r for r in rows if r.phase not in GONE]
    registered = [r for r in alive if r.phase == Phase.REGISTERED]
    booting = [r for r in alive if r.phase in BOOTING]
    failed = [r for r in rows if r.phase == Phase.FAILED]
    parts = [f"{len(registered)} registered"]
    if booting:
        phases = sorted({str(r.phase) for r in booting})
        parts.append(f"{len(booting)} booting ({', '.join(phases)})")
    if failed:
        parts.append(f"{len(failed)} failed")
    instances = f"{len(alive)}: " + ", ".join(parts)
    n_workers = sum(len(r.workers) for r in alive)
    n_registered = sum(len(r.registered_workers) for r in alive)
    workers = f"{n_registered} registered of {n_workers}"
    if n_registered < n_workers:
        workers += " (the others start when their instance has booted)"
    money = f"{usd_per_hour(cluster.hourly_rate)} now"
    # Spending caps (when the cluster has them) say how much is left.
    hourly_cap = getattr(cluster, "max_hourly_usd", None)
    if hourly_cap is not None:
        money += f" (at most {usd_per_hour(hourly_cap)})"
    money += f", {usd(cluster.cost)} spent (bandwidth {usd(cluster.bandwidth_cost)})"
    budget = getattr(cluster, "budget_left_usd", None)
    if budget is not None:
        money += f", {usd(budget)} budget left"
    lines = [("Instances", instances), ("Workers", workers), ("Cost", money)]
    # Rentals lost after renting (preempted, host offline, ...) and replaced, per pool.
    lost = {pool: losses for pool, losses in getattr(cluster, "losses", {}).items() if losses}
    if lost:
        lines.append(("Lost", "; ".join(f"{pool}: {losses.text()}" for pool, losses in lost.items())))
    targets = cluster.adaptive_targets
    if targets:
        lines.append(("Adaptive", "; ".join(
            f"{pool}: {low}..{'∞' if high == float('inf') else int(high)} instances, "
            f"target {'-' if target is None else target}"
            for pool, (low, high, target) in targets.items()
        )))
    else:
        lines.append(("Scaling", "manual (cluster.scale(n) holds n instances)"))
    lines.append(("Scheduler", cluster.scheduler_address))
    return lines


def cluster_html(cluster: ClusterView) -> str:
    """The cluster as one HTML fragment (``VastAICluster._repr_html_``)."""
    esc = html.escape
    rows = cluster.instances
    status = getattr(cluster.status, "name", str(cluster.status))
    link = cluster.dashboard_link
    dashboard = (
        f"<a href='{esc(link)}' target='_blank'>{esc(link)}</a>" if link else "<i>not running</i>"
    )
    summary = "".join(
        f"<tr><th style='{CELL_STYLE}'>{esc(label)}</th><td style='{CELL_STYLE}'>{esc(text)}</td></tr>"
        for label, text in [*_summary(cluster, rows)]
    )
    return (
        "<div class='dask-vastai-cluster' style='font-family: sans-serif;'>"
        f"<div style='font-size: 1.2em; font-weight: bold;'>VastAICluster {esc(cluster.name)} "
        f"<span style='font-weight: normal; color: #777;'>({esc(status)})</span></div>"
        f"<table style='{TABLE_STYLE}'>"
        f"<tr><th style='{CELL_STYLE}'>Dashboard</th><td style='{CELL_STYLE}'>{dashboard}</td></tr>"
        f"{summary}</table>"
        f"<div style='margin-top: 6px;'>{rows.text_table(totals=False).html()}</div>"
        "</div>"
    )


class ClusterWidget:
    """The ipywidgets view: the HTML above, refreshed, plus scale and adapt controls."""

    def __init__(self, cluster: Any) -> None:
        from ipywidgets import HTML, Accordion, Button, HBox, IntText, Layout, VBox

        self.cluster = cluster
        self.status = HTML(cluster_html(cluster))
        layout = Layout(width="150px")
        request = IntText(0, description="Instances", layout=layout)
        scale = Button(description="Scale", layout=layout)
        minimum = IntText(0, description="Minimum", layout=layout)
        maximum = IntText(0, description="Maximum", layout=layout)
        adapt = Button(description="Adapt", layout=layout)
        controls = Accordion(
            [HBox([request, scale]), HBox([minimum, maximum, adapt])], layout=Layout(min_width="500px")
        )
        controls.selected_index = None
        controls.set_title(0, "Scale (instances)")
        controls.set_title(1, "Adapt (instances)")
        scale.on_click(lambda _: self._act(lambda: cluster.scale(request.value)))
        adapt.on_click(lambda _: self._act(lambda: cluster.adapt(minimum=minimum.value, maximum=maximum.value)))
        self.root = VBox([self.status, controls])
        #: the last refused click, shown above the cluster until the next one
        self._error = ""

    def _act(self, action: Any) -> None:
        self._error = ""
        try:
            action()
        except Exception as e:  # noqa: BLE001 - shown where the user clicked, not lost in a log
            self._error = f"<div style='color: #b00;'>{html.escape(str(e))}</div>"
        self.update()

    def update(self) -> None:
        value = self._error + cluster_html(self.cluster)
        if value != self.status.value:
            self.status.value = value
