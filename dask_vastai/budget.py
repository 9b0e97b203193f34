"""Spending caps: ``max_cost`` (dollars for the cluster's life) and ``max_hourly`` ($/h in all).

Vast bills each rental per second from its start at its ``dph_total`` (storage included)
until it is destroyed, and nothing but a destroy stops the meter. So the caps act in the
rental broker, the one place every rental goes through (a first rent, a scale-up, adapt, a
replacement): a create that would pass a cap is not sent, and once ``max_cost`` is near, every
rental is destroyed and nothing new is rented.

A cap must hold against Vast's meter, which runs on between the moment we decide and the
moment Vast has processed the destroy. So the broker checks every ``check_interval_s`` and
starts closing when ``spent + rate x (check_interval_s + destroy latency)`` reaches
``max_cost``: the spend it would reach if the next check came too late. The destroy latency
is ``destroy_latency_s`` for one rental (the destroy endpoint is paced: a destroy sent just
before delays ours by its 3 s interval) and one destroy interval more for each further one:
a bulk destroy is checked by listing, and a rental it left running is destroyed again one by
one, 3 s apart (measured on the emulator's strict profile: ``benchmarks/destroy_latency.py``).
The most expensive rental is assumed to be destroyed last. ``spent`` is our own
estimate, never below the meter: each rental from the moment its create was *sent* (Vast
starts the meter while answering) at its full ``dph_total`` (Vast bills only storage while a
rental is stopped), until its destroy was *answered*, plus whatever else a rental's record
reports (:attr:`~dask_vastai.rentals.RentalRecord.cost_usd`).

:class:`BudgetGuard` is the scheduler's side: once the budget is exhausted, every task that
waits for a worker fails with :class:`~dask_vastai.exceptions.BudgetExhausted`, now and
whenever one arrives later (none will ever run), as :class:`~dask_vastai.pools.ResourceGuard`
fails impossible tasks.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from .config import option
from .display import usd, usd_per_hour
from .exceptions import BudgetExhausted
from .pools import fail_task

logger = logging.getLogger(__name__)

#: task states in which a task waits for a worker: what an exhausted budget fails
WAITING_STATES = ("no-worker", "queued")


def _cap(name: str, value: Any) -> float | None:
    """A cap's value in dollars, or None for no cap; a ValueError naming it when it is not one."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: give dollars as a number (or None for no cap)") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}={value!r}: a spending cap must be a positive number of dollars (None: no cap)")
    return number


@dataclass(frozen=True)
class SpendingCaps:
    """A cluster's caps and the timing its ``max_cost`` check allows for."""

    #: dollars for the cluster's whole life, at most (None: no cap)
    max_cost_usd: float | None = None
    #: $/h of all the cluster's rentals together, at most (None: no cap)
    max_hourly_usd: float | None = None
    #: seconds between two checks of the spend
    check_interval_s: float = 2.0
    #: seconds from deciding to close to Vast's meter having stopped, for one rental
    destroy_latency_s: float = 8.0
    #: seconds more for each further rental (the destroy endpoint's pacing)
    destroy_interval_s: float = 3.0

    @classmethod
    def from_options(cls, max_cost: Any = None, max_hourly: Any = None, *,
                     check_interval_s: float) -> SpendingCaps | None:
        """The caps the options and config ask for (``vastai.max-cost``, ``vastai.max-hourly``), or None."""
        cost = _cap("max_cost", option("max-cost", max_cost))
        hourly = _cap("max_hourly", option("max-hourly", max_hourly))
        if cost is None and hourly is None:
            return None
        return cls(cost, hourly, check_interval_s=float(check_interval_s),
                   destroy_latency_s=float(option("spending.destroy-latency")),
                   destroy_interval_s=float(option("api.min-intervals.destroy")))

    @property
    def horizon_s(self) -> float:
        """Seconds one rental's meter may run on after a check: until the next check, then its destroy."""
        return self.check_interval_s + self.destroy_latency_s

    def reserve_usd(self, rates_dph: Sequence[float]) -> float:
        """Dollars the meter may still add after a check, for rentals billed at ``rates_dph``:
        each until the next check and its destroy, the k-th cheapest ``k`` destroy intervals later."""
        return sum(rate * (self.horizon_s + self.destroy_interval_s * k) / 3600.0
                   for k, rate in enumerate(sorted(rates_dph)))

    def left_usd(self, spent_usd: float) -> float | None:
        """Dollars left of ``max_cost`` (None without one)."""
        return None if self.max_cost_usd is None else max(0.0, self.max_cost_usd - spent_usd)

    def exhausted(self, spent_usd: float, rates_dph: Sequence[float]) -> str | None:
        """Why the cluster must close now to stay under ``max_cost``, or None while it need not."""
        cap = self.max_cost_usd
        if cap is None or spent_usd + self.reserve_usd(rates_dph) < cap:
            return None
        return (
            f"max_cost={usd(cap)} reached: {usd(spent_usd)} spent at {usd_per_hour(sum(rates_dph))} would pass "
            "it before the next check and the destroys; every rental is destroyed and tasks still waiting "
            "fail. A new cluster with a higher cap can go on"
        )

    def refusal(self, spent_usd: float, rates_dph: Sequence[float], offer_dph: float) -> tuple[str, str] | None:
        """``(cap, why)`` when renting one more instance at ``offer_dph`` now, beside rentals billed
        at ``rates_dph``, must be refused; else None."""
        hourly = self.max_hourly_usd
        rate_dph = sum(rates_dph)
        if hourly is not None and rate_dph + offer_dph > hourly + 1e-9:
            return "max_hourly", (
                f"renting one more instance at {usd_per_hour(offer_dph)} would bring this cluster to "
                f"{usd_per_hour(rate_dph + offer_dph)}, past max_hourly={usd_per_hour(hourly)} (now "
                f"{usd_per_hour(rate_dph)} for the rentals it holds). Raise the cap, scale down another pool, "
                "or pick cheaper offers"
            )
        cap = self.max_cost_usd
        if cap is not None and spent_usd + self.reserve_usd([*rates_dph, offer_dph]) >= cap:
            return "max_cost", (
                f"renting one more instance at {usd_per_hour(offer_dph)} would pass max_cost={usd(cap)} "
                f"({usd(spent_usd)} spent, {usd_per_hour(rate_dph)} now) before it could be destroyed "
                f"(from {self.horizon_s:g} s to notice and destroy). Raise the cap or pick cheaper offers"
            )
        return None


    def start_refusal(self, n: int, rates_dph: list[float]) -> str | None:
        """Why a cluster starting ``n`` instances (at least one) on offers at ``rates_dph`` (the
        cheapest first) must not start, or None: checked before anything is rented."""
        wanted = rates_dph[: max(1, n)]
        total = sum(wanted)
        what = (f"n={n} instances on the cheapest matching offers cost {usd_per_hour(total)} together" if n
                else f"one instance on the cheapest matching offer costs {usd_per_hour(total)}")
        hourly = self.max_hourly_usd
        if hourly is not None and total > hourly + 1e-9:
            fit = sum(1 for k in range(len(wanted)) if sum(wanted[: k + 1]) <= hourly + 1e-9)
            return (
                f"{what}, past max_hourly={usd_per_hour(hourly)}" + (f" ({fit} fit)" if n else "")
                + ". Raise the cap" + (", ask for fewer instances" if n else "") + " or pick cheaper offers"
            )
        cap = self.max_cost_usd
        if cap is not None and self.reserve_usd(wanted) >= cap:
            return (
                f"{what}: more than max_cost={usd(cap)} before {'they' if n > 1 else 'it'} could be destroyed "
                f"(from {self.horizon_s:g} s to notice and destroy). Raise the cap or pick cheaper offers"
            )
        return None


class BudgetGuard(SchedulerPlugin):
    """Once the budget is exhausted, fails every task waiting for a worker with its error."""

    name = "dask-vastai-budget-guard"

    def __init__(self, scheduler: Any) -> None:
        # Given here: Scheduler.add_plugin does not call start() on an in-process scheduler.
        self.scheduler = scheduler
        self.error: BudgetExhausted | None = None

    def exhaust(self, error: BudgetExhausted) -> None:
        """From now on no task will run: fail those waiting now and every one that comes to wait."""
        if self.error is not None:
            return
        self.error = error
        waiting = [key for key, ts in self.scheduler.tasks.items() if ts.state in WAITING_STATES]
        failed = sum(self._fail(key) for key in waiting)
        if failed:
            logger.warning("failed %d waiting task(s): %s", failed, error)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if self.error is not None and finish in WAITING_STATES:
            # Not from inside a transition: the scheduler is in the middle of one.
            asyncio.get_running_loop().call_soon(self._fail, key)

    def _fail(self, key: Any) -> bool:
        assert self.error is not None
        return fail_task(self.scheduler, key, self.error, states=WAITING_STATES,
                         stimulus=f"dask-vastai-budget-{key}")
