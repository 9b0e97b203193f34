"""The one place a cluster rents and destroys instances, and watches them boot.

Vast rate-limits every endpoint per account (create ~4.5 s, destroy 3 s, list 1 s), while
SpecCluster starts and closes all workers at once. So a cluster's rentals go through one
:class:`RentalBroker`: rent requests arriving together become one bulk create, destroys
become one bulk destroy, and one poller lists all the cluster's rentals per interval
instead of one GET per instance. Every rental is registered in a process-wide ledger the
moment Vast accepts it, so the exit and signal handlers (``safety.py``) can destroy it even
if the cluster object is gone.

A bulk create carries one label for the whole batch (``dask-vastai:<cluster>:batch-<token>``,
a token no other call shares) so that its rentals can be found whatever its answer says
(:mod:`dask_vastai.vast.bulk`); each rental is then relabelled with its worker's name, in the
background: the label calls are paced (about 1 s apart), and nothing waits for them (the
poller lists the cluster's prefix, which both labels share), so 16 rentals boot while their
labels are written instead of 15 s after. A rental that shows up under a batch label after
the batch was settled (a late row of an answer that said nothing) is destroyed by the poller:
it is billed and nobody waits for it.

Spending caps (:mod:`dask_vastai.budget`) act here, on every rental whoever asks for it: a
create that would pass ``max_hourly`` or ``max_cost`` is not sent (:class:`BudgetExceeded`),
and once ``max_cost`` is near every rental is destroyed and no more are made
(:class:`BudgetExhausted`).

Closing is one round, owned here: from :meth:`RentalBroker.begin_close` on, the destroys the
closing instances hand in (batched as always) and :meth:`RentalBroker.close`'s own share one
deadline, ``vastai.api.outage-timeout`` from the start of the close (every call of the round
stops retrying there: :meth:`VastAPI.until`). What is still not destroyed then stays in the
ledger (the exit handler and ``dask-vastai cleanup`` take it from there) and close raises once,
with what Vast last answered; it is never tried a second time over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .bootstrap import HOST_KEYS_MARK, parse_host_keys
from .budget import SpendingCaps
from .config import option
from .exceptions import (
    BootFailed,
    BudgetExceeded,
    BudgetExhausted,
    NoOfferAvailable,
    OfferUnavailable,
    VastError,
)
from .labels import cluster_label_prefix, rental_label
from .offers import OfferRequirements, no_match_message
from .safety import LEDGER
from .traffic import Traffic
from .vast import CreateRequest, Instance, Offer, VastAPI

logger = logging.getLogger(__name__)

#: Status messages Vast's own instance self-test (``vastai self-test``) treats as fatal.
_FATAL_STATUS_MSG = re.compile(
    r"error|failed|failure|exception|traceback|oci runtime|permission denied|pull rate limit|"
    r"manifest unknown|unauthorized|no space left",
    re.IGNORECASE,
)


@dataclass
class RentalRecord:
    """What the cluster knows of one rental: for cost, repr and cleanup."""

    instance_id: int
    worker_name: str
    offer: Offer
    dph_total: float
    rented_at: float
    destroyed_at: float | None = None
    instance: Instance | None = None
    #: rented with a bid (``interruptible``): a ``stopped`` row then means outbid
    interruptible: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: when (monotonic) the row's ``actual_status`` became what it is now
    status_since: float = field(default_factory=time.monotonic)
    #: rows of lists sent before this (monotonic) are stale: they predate a reboot
    fresh_after: float = 0.0
    #: bytes of this machine's SSH links to the rental (counted as they pass)
    ssh_traffic: Traffic = field(default_factory=Traffic)
    #: bytes of the rental's direct connections (its workers report them; ``traffic.py``)
    direct_traffic: Traffic = field(default_factory=Traffic)
    #: when (monotonic) the last list that showed this rental was sent (0: never listed)
    listed_at: float = 0.0
    #: lists in a row that did not show this rental (after it had been listed)
    missing: int = 0
    #: listed ``running`` since it was rented (or rebooted): from then on, a fatal state is a
    #: loss (before, it is a failed boot, which the boot itself handles)
    was_running: bool = False
    #: why the rental cannot come back (set once, by :meth:`RentalBroker.mark_lost`), its
    #: kind (``outbid``, ``stopped``, ``offline``, ``exited``, ``gone``, ``unreachable``) and when (wall clock)
    lost: str | None = None
    lost_kind: str | None = None
    lost_at: float | None = None

    @property
    def uptime_s(self) -> float:
        """Seconds billed so far (Vast bills from the rental's start until destroy)."""
        start = self.instance.start_date if self.instance and self.instance.start_date else self.rented_at
        end = self.destroyed_at if self.destroyed_at is not None else time.time()
        return max(0.0, end - start)

    @property
    def time_cost_usd(self) -> float:
        """Dollars of its time: ``dph_total`` times its uptime."""
        return self.dph_total * self.uptime_s / 3600.0

    @property
    def traffic(self) -> Traffic:
        """Bytes it sent and received, as far as this client counts them."""
        return self.ssh_traffic + self.direct_traffic

    @property
    def bandwidth_cost_usd(self) -> float:
        """Dollars of its bandwidth, at its offer's ``inet_up_cost``/``inet_down_cost`` ($/GB)."""
        return self.traffic.cost_usd(self.offer.inet_up_cost, self.offer.inet_down_cost)

    @property
    def cost_usd(self) -> float:
        """Everything this rental is billed so far: its time and its bandwidth. The cluster's
        cost and its spending caps (``max_cost``) count this one number."""
        return self.time_cost_usd + self.bandwidth_cost_usd

    @property
    def is_bid(self) -> bool:
        """Interruptible: rented with a bid (as asked, or as its row says)."""
        return self.interruptible or bool(self.instance is not None and self.instance.is_bid)

    @property
    def state(self) -> str:
        if self.destroyed_at is not None:
            return "destroyed"
        if self.instance is None or not self.instance.actual_status:
            return "created"
        return str(self.instance.actual_status)


def boot_failure(instance: Instance) -> str | None:
    """Why ``instance`` will never become usable, or None while it still may."""
    status = instance.actual_status
    if status in ("exited", "offline", "unknown"):
        return f"instance {instance.id} is {status}: {instance.status_msg or 'no message'}"
    if status == "stopped":  # never asked for: outbid, or its host stopped it
        return f"instance {instance.id} stopped (outbid or host problem): {instance.status_msg or ''}"
    if status != "running" and instance.status_msg and _FATAL_STATUS_MSG.search(instance.status_msg):
        return f"instance {instance.id} failed to boot ({status or 'no status yet'}): {instance.status_msg}"
    return None


def lost_state(instance: Instance, *, interruptible: bool) -> tuple[str, str] | None:
    """``(kind, why)`` when a listed rental can never serve this cluster again, else None.

    A cluster never stops its rentals, so any ``stopped`` is a loss: an outbid interruptible
    rental (whatever ``intended_status`` then says: it may resume only when it wins again,
    and bills its disk meanwhile) or a host that stopped it. ``offline`` (the host lost Vast)
    and ``exited`` (the container died) are losses too. Waiting on them bills storage for a
    machine whose workers are gone: the rental is destroyed and another one rented.
    """
    status = instance.actual_status
    message = f": {instance.status_msg}" if instance.status_msg else ""
    if status == "stopped":
        if interruptible:
            return "outbid", f"instance {instance.id} was stopped (outbid: a higher bid took its GPU){message}"
        return "stopped", f"instance {instance.id} was stopped by its host{message}"
    if status == "offline":
        return "offline", f"the host of instance {instance.id} went offline{message}"
    if status == "exited":
        return "exited", f"the container of instance {instance.id} exited{message}"
    return None


async def nearest_offers(api: VastAPI, requirements: OfferRequirements, limit: int = 5) -> list[Offer]:
    """The cheapest offers for the same GPU ignoring price, region and reliability limits.

    What an error shows when nothing matches, so the user sees how far off the query is.
    """
    relaxed = replace(requirements, max_price=None, region=None, reliability=0.0, datacenter=False, query="")
    try:
        return await api.search_offers(relaxed.filters(), order="dph_total", limit=limit)
    except VastError:
        return []


def ssh_ready(instance: Instance) -> bool:
    """Running with an SSH endpoint we can use."""
    return instance.actual_status == "running" and (
        instance.direct_ssh() is not None or instance.proxy_ssh() is not None
    )


class RentalBroker:
    """Rents, watches and destroys the instances of one cluster."""

    def __init__(
        self,
        api: VastAPI,
        *,
        cluster_name: str,
        requirements: OfferRequirements,
        create_request: CreateRequest,
        poll_interval_s: float = 2.0,
        batch_window_s: float = 0.2,
        log: Callable[[str], None] | None = None,
        caps: SpendingCaps | None = None,
        on_exhausted: Callable[[BudgetExhausted], None] | None = None,
        on_lost: Callable[[RentalRecord], None] | None = None,
        orphan_timeout_s: float | None = None,
    ) -> None:
        self.api = api
        self.cluster_name = cluster_name
        self.requirements = requirements
        self.create_request = create_request
        self.poll_interval_s = poll_interval_s
        self.batch_window_s = batch_window_s
        self.records: dict[int, RentalRecord] = {}
        self._log = log or logger.info
        self._rent_queue: list[tuple[str, Any, asyncio.Future[RentalRecord]]] = []
        self._rent_flush: asyncio.Task[None] | None = None
        self._destroy_queue: list[tuple[int, asyncio.Future[None]]] = []
        self._destroy_flush: asyncio.Task[None] | None = None
        #: rentals queued for or in a destroy call, and the future that call's end sets: a second
        #: destroy of one of them joins it (never a second paced call for the same rental)
        self._destroying: dict[int, asyncio.Future[None]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._tried_offers: set[int] = set()
        #: seconds a boot may sit in a state before it counts as failed (vastai.boot-state-grace)
        self.state_graces: dict[str, float] = {
            str(k): float(v) for k, v in dict(option("boot-state-grace") or {}).items()
        }
        #: labels of the bulk creates this broker sent: open while their answer is read
        self._batch_labels: set[str] = set()
        self._open_batches: set[str] = set()
        #: strays of those batches already destroyed (their rows may linger a while)
        self._swept: set[int] = set()
        #: the per-worker labels being written behind the creates (nothing waits for them)
        self._labelling: set[asyncio.Task[None]] = set()
        #: the spending caps (None: none), and what happens once max_cost is reached
        self.caps = caps
        self._on_exhausted = on_exhausted
        #: set once max_cost is reached: every rental destroyed, no new one
        self.exhausted: BudgetExhausted | None = None
        self._budget_watch: asyncio.Task[None] | None = None
        #: creates in flight: (their offers' $/h, when sent); billed before their rentals are known
        self._in_flight: dict[int, tuple[list[float], float]] = {}
        self._flights = itertools.count()
        #: the last refusal logged (the same one is not repeated at every adapt round)
        self._last_refusal: tuple[str, float] | None = None
        #: told each rental found lost (once), before it is destroyed
        self.on_lost = on_lost
        #: the instances' watchdog timeout: what a long pause of this process means for them
        self.orphan_timeout_s = orphan_timeout_s
        self._background: set[asyncio.Task[Any]] = set()
        #: when (``time.monotonic()``) the close's one round of destroys ends (None: not closing;
        #: inf: no deadline, each call's own attempts decide)
        self.close_deadline: float | None = None
        #: the last failed destroy of the close's round: what close says when time has run out
        self._close_error: VastError | None = None

    # ------------------------------------------------------------------ renting
    async def rent(
        self,
        worker_name: str,
        requirements: OfferRequirements | None = None,
        create_request: CreateRequest | None = None,
    ) -> RentalRecord:
        """Rent one instance for ``worker_name``; calls arriving together share one bulk create.

        ``requirements``/``create_request`` select a pool's shape (default: the broker's own).
        """
        if self.exhausted is not None:
            raise self.exhausted
        if self.closing:
            raise BootFailed(f"not renting for {worker_name}: the cluster is closing")
        if LEDGER.closing:
            # A signal or the interpreter's exit is destroying this process's rentals from
            # another thread: one rented now would outlive it (billing until its watchdog).
            raise BootFailed(f"not renting for {worker_name}: this process is exiting")
        fut: asyncio.Future[RentalRecord] = asyncio.get_running_loop().create_future()
        shape = (requirements or self.requirements, create_request or self.create_request)
        self._rent_queue.append((worker_name, shape, fut))
        if self._rent_flush is None or self._rent_flush.done():
            self._rent_flush = asyncio.create_task(self._flush_rents())
        return await fut

    async def _flush_rents(self) -> None:
        # Loops until the queue is empty: a rent() arriving while a batch is being rented
        # is taken by the next round, not left waiting for some later call.
        while self._rent_queue:
            await asyncio.sleep(self.batch_window_s)
            batch, self._rent_queue = self._rent_queue, []
            by_shape: dict[int, list[tuple[str, Any, asyncio.Future[RentalRecord]]]] = {}
            for item in batch:
                by_shape.setdefault(id(item[1][0]), []).append(item)
            for group in by_shape.values():
                await self._rent_group(group)

    async def _rent_group(self, group: list[tuple[str, Any, asyncio.Future[RentalRecord]]]) -> None:
        requirements, create_request = group[0][1]
        try:
            records = await self._rent_batch([name for name, _, _ in group], requirements, create_request)
        except BaseException as e:
            # Cancelled (the cluster closes while the create is in flight): its waiters get a
            # boot failure, never a CancelledError of a task that was not theirs.
            error = e if isinstance(e, Exception) else BootFailed("the cluster closed while this rental was being created")
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        for (_, _, fut), record in zip(group, records, strict=True):
            if isinstance(record, BaseException):
                if not fut.done():
                    fut.set_exception(record)
            elif fut.cancelled():
                # The waiter went away (its start was cancelled): nothing will use this rental.
                asyncio.create_task(self.destroy(record.instance_id))
            else:
                fut.set_result(record)

    async def _rent_batch(
        self, names: list[str], requirements: OfferRequirements, create_request: CreateRequest
    ) -> list[RentalRecord | BudgetExceeded]:
        """Rent one instance per name, taking the next offers when some are gone (races).

        A name whose rental would pass a spending cap gets a :class:`BudgetExceeded` instead
        (the cheapest offers go first, so as many as fit are rented).
        """
        rented: dict[str, RentalRecord] = {}
        refused: dict[str, BudgetExceeded] = {}
        for _attempt in range(4):
            wanted = [n for n in names if n not in rented and n not in refused]
            if not wanted:
                break
            offers = await self._candidate_offers(len(wanted), requirements)
            pairs = self._within_caps(list(zip(wanted, offers, strict=True)), refused)
            if not pairs:
                break
            self._tried_offers.update(offer.id for _, offer in pairs)
            # Vast's meter starts while it answers the create: counted from before it is sent.
            sent = time.time()
            flight = next(self._flights)
            self._in_flight[flight] = ([o.dph_total for _, o in pairs], sent)
            try:
                results = await self._create(pairs, requirements, create_request)
            finally:
                del self._in_flight[flight]
            for (name, offer), result in zip(pairs, results, strict=True):
                if isinstance(result, OfferUnavailable):
                    logger.info("offer %s was taken before we rented it; trying another", offer.id)
                    continue
                if isinstance(result, BaseException):
                    # Not a race: a rejected request. Destroy what this batch got, then raise.
                    await self._destroy_now([r.instance_id for r in rented.values()])
                    raise result
                record = RentalRecord(
                    instance_id=result,
                    worker_name=name,
                    offer=offer,
                    dph_total=offer.dph_total,
                    rented_at=sent,
                    interruptible=requirements.interruptible,
                )
                self.records[result] = record
                rented[name] = record
            if self.exhausted is not None:
                # max_cost was reached while this create ran: what it made is destroyed at once.
                await self._destroy_now([r.instance_id for r in rented.values()])
                raise self.exhausted
        missing = [n for n in names if n not in rented and n not in refused]
        if missing:
            await self._destroy_now([r.instance_id for r in rented.values()])
            raise NoOfferAvailable(
                f"could not rent {len(missing)} instance(s): every matching offer was taken "
                f"while we rented. Query: {requirements.query_text()}"
            )
        for record in rented.values():
            self._log(
                f"rented instance {record.instance_id} ({record.offer.num_gpus}x {record.offer.gpu_name}, "
                f"${record.dph_total:.3f}/h, {record.offer.geolocation}) for {record.worker_name}"
            )
        if rented:
            self._ensure_poller()
            self._ensure_budget_watch()
        return [rented.get(n) or refused[n] for n in names]

    def _within_caps(
        self, pairs: list[tuple[str, Offer]], refused: dict[str, BudgetExceeded]
    ) -> list[tuple[str, Offer]]:
        """The (worker, offer) pairs the spending caps allow, in order; the others go to ``refused``."""
        if self.exhausted is not None:
            raise self.exhausted
        if self.caps is None:
            return pairs
        spent, rates = self.cost_usd, self._rates_dph()
        allowed = []
        for name, offer in pairs:
            refusal = self.caps.refusal(spent, rates, offer.dph_total)
            if refusal is None:
                allowed.append((name, offer))
                rates.append(offer.dph_total)
                continue
            cap, why = refusal
            refused[name] = BudgetExceeded(f"{name} not rented: {why}")
            # Told once per cap and rate, not at every adapt round that asks again.
            if (cap, round(sum(rates), 6)) != self._last_refusal:
                self._last_refusal = (cap, round(sum(rates), 6))
                logger.warning("not renting %s: %s", name, why)
                self._log(f"WARNING not renting {name}: {why}")
        return allowed

    async def _candidate_offers(self, count: int, req: OfferRequirements) -> list[Offer]:
        offers = await self.api.search_offers(
            req.filters(), order=req.order, limit=max(3 * count, 10) + len(self._tried_offers),
            type="bid" if req.interruptible else "on-demand", storage_gb=req.disk_gb,
        )
        fresh = [o for o in offers if o.id not in self._tried_offers]
        if len(fresh) < count:
            if not fresh:
                nearest = await nearest_offers(self.api, req)
                raise NoOfferAvailable(no_match_message(req, req.filters(), nearest))
            raise NoOfferAvailable(
                f"only {len(fresh)} offer(s) match, {count} instance(s) wanted. "
                f"Query: {req.query_text()}. Ask for fewer instances or relax the requirements."
            )
        return fresh[:count]

    async def _create(
        self, pairs: list[tuple[str, Offer]], requirements: OfferRequirements, create_request: CreateRequest
    ) -> list[int | BaseException]:
        """Create one rental per (worker, offer): bulk for several, with per-worker labels."""
        if not pairs:
            return []
        if len(pairs) == 1:
            name, offer = pairs[0]
            request = self._request_for([offer], rental_label(self.cluster_name, name), requirements, create_request)
            try:
                rental = await self.api.create_instance(offer.id, request)
            except VastError as e:
                return [e]
            LEDGER.add(self.api, rental.instance_id)
            return [rental.instance_id]
        # One bulk call for the batch, under a label no other call shares: whatever the answer
        # says, its rentals can be found by it. Each is relabelled with its worker's name next.
        batch = rental_label(self.cluster_name, f"batch-{secrets.token_hex(4)}")
        request = self._request_for([o for _, o in pairs], batch, requirements, create_request)
        self._batch_labels.add(batch)
        self._open_batches.add(batch)
        try:
            results = await self.api.create_instances([o.id for _, o in pairs], request)
            return await self._settle_batch(batch, pairs, results)
        finally:
            # Open until its rentals are records (the caller makes them without awaiting): a
            # poller listing meanwhile must not take them for strays.
            self._open_batches.discard(batch)

    async def _settle_batch(self, batch: str, pairs: list[tuple[str, Offer]], results: list[Any]) -> list[int | BaseException]:
        """The ids a bulk create rented (or why not), each relabelled with its worker's name."""
        out: list[int | BaseException] = []
        for (name, _offer), result in zip(pairs, results, strict=True):
            if isinstance(result, BaseException):
                out.append(result)
                continue
            LEDGER.add(self.api, result.instance_id)
            out.append(result.instance_id)
            if not result.placed:
                self._log(f"instance {result.instance_id} (found under {batch}: the bulk answer did not say "
                          f"for which offer) is adopted for {name}")
        labels = [(r, rental_label(self.cluster_name, name)) for (name, _), r in zip(pairs, out, strict=True)
                  if isinstance(r, int)]
        task = asyncio.create_task(self._write_labels(labels), name=f"label {batch}")
        self._labelling.add(task)
        task.add_done_callback(self._labelling.discard)
        return out

    async def _write_labels(self, labels: list[tuple[int, str]]) -> None:
        """Give each rental of a bulk create its worker's label, while the rentals boot.

        One paced call each (the update endpoint, about 1 s apart). Until its call, a rental
        keeps its batch label, under the same cluster prefix: the poller, ``dask-vastai ls``
        and ``cleanup`` find it either way. A label that cannot be written is only logged.
        """
        for instance_id, label in labels:
            record = self.records.get(instance_id)
            if record is not None and record.destroyed_at is not None:
                continue
            try:
                await self.api.label_instance(instance_id, label)
            except VastError as e:
                logger.info("instance %s keeps its batch label (writing %r failed: %s)", instance_id, label, e)

    async def labels_written(self) -> None:
        """Wait until the per-worker labels of every bulk create so far are written."""
        while self._labelling:
            await asyncio.gather(*list(self._labelling), return_exceptions=True)

    @staticmethod
    def _request_for(
        offers: list[Offer], label: str, requirements: OfferRequirements, create_request: CreateRequest
    ) -> CreateRequest:
        """The request for one create call; interruptible: one bid for all its offers.

        A bulk call carries one ``price`` for all its ids, so it bids the highest ``min_bid``
        of its offers (times the pool's ``bid`` multiple, or the pool's ``bid`` in $/h): each
        offer accepts it, the overpay is bounded by the spread of the cheapest offers (which
        the query ranks together), the higher bid is less likely to be outbid, and one call
        stays one call (grouping by bid would send one create, paced 4.5 s apart, per distinct
        ``min_bid``: nearly one per offer). The rate each rental is billed is then read from
        its row (``dph_total``).
        """
        price = requirements.bid_price([o.min_bid for o in offers])
        return replace(create_request, label=label, price=price)

    # --------------------------------------------------------------- watching
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        """One list call per interval for all of this cluster's rentals; losses seen there."""
        prefix = cluster_label_prefix(self.cluster_name)
        while any(r.destroyed_at is None for r in self.records.values()):
            sent = time.monotonic()
            try:
                rows = {i.id: i for i in await self.api.list_instances(label_prefix=prefix)}
            except VastError as e:
                logger.warning("listing rentals failed (will retry): %s", e)
                rows = None
            if rows is not None:
                self._read_rows(rows, sent)
                await self._destroy_strays(rows.values())
            slept_from = time.time()
            await asyncio.sleep(self.poll_interval_s)
            self._note_pause(time.time() - slept_from - self.poll_interval_s)

    def _read_rows(self, rows: dict[int, Instance], sent: float) -> None:
        """Take one list's rows (sent at monotonic ``sent``): new states, and rentals lost."""
        for record in list(self.records.values()):
            if record.destroyed_at is not None or record.fresh_after > sent:
                continue
            row = rows.get(record.instance_id)
            if row is None:
                # Listed before, missing twice in a row: destroyed behind our back (its
                # watchdog while this client was away, or Vast). Twice: one list may lag.
                if record.listed_at:
                    record.missing += 1
                    if record.missing >= 2:
                        self.mark_lost(record.instance_id, "gone", (
                            f"instance {record.instance_id} is no longer listed by Vast (destroyed by its "
                            "watchdog, which destroys a rental after orphan_timeout without this client, or by Vast)"
                        ))
                continue
            record.missing = 0
            record.listed_at = sent
            if row != record.instance:
                if record.instance is None or row.actual_status != record.instance.actual_status:
                    record.status_since = time.monotonic()
                record.instance = row
                if row.dph_total:
                    record.dph_total = row.dph_total
                record.changed.set()
            record.was_running = record.was_running or row.actual_status == "running"
            loss = lost_state(row, interruptible=record.is_bid) if record.was_running else None
            if loss is not None:
                self.mark_lost(record.instance_id, *loss)

    def _note_pause(self, late_s: float) -> None:
        """Say so when this process did not run for a while (suspended, a laptop asleep)."""
        if late_s < max(30.0, 10 * self.poll_interval_s):
            return
        orphan = self.orphan_timeout_s
        if orphan is not None and late_s > orphan:
            self._log(
                f"this client did not run for {late_s:.0f}s (asleep or suspended), longer than "
                f"orphan_timeout={orphan:.0f}s: the instances' watchdogs have destroyed their rentals; "
                "each one found gone is replaced, to the size the cluster was asked for"
            )
        else:
            self._log(f"this client did not run for {late_s:.0f}s (asleep or suspended): checking every "
                      "rental; links that dropped are made again")

    def mark_lost(self, instance_id: int, kind: str, why: str) -> None:
        """``instance_id`` can never serve again: say why, tell the cluster, destroy it now.

        Now, not when its instance gets to it: a stopped rental bills its disk. Once per rental.
        """
        record = self.records.get(instance_id)
        if record is None or record.lost is not None or record.destroyed_at is not None or LEDGER.closing:
            return  # closing: the exit handler destroyed it, and nothing is rented in its place
        record.lost, record.lost_kind, record.lost_at = why, kind, time.time()
        record.changed.set()
        self._log(f"{record.worker_name}: lost instance {instance_id}: {why}; destroying it")
        if self.on_lost is not None:
            try:
                self.on_lost(record)
            except Exception:  # noqa: BLE001 - counting must not stop the destroy
                logger.exception("on_lost of instance %s failed", instance_id)
        self.destroy_soon(instance_id)

    def destroy_soon(self, instance_id: int) -> None:
        """Destroy ``instance_id`` in the background (with the next bulk destroy), not waiting for it.

        For a rental given up while another is rented in its place: checking a bulk destroy
        can take a while (lingering rows), and the replacement should not wait for that. A
        destroy that fails is logged; close and the exit handler destroy what is left.
        """
        task = asyncio.create_task(self._destroy_in_background(instance_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _destroy_in_background(self, instance_id: int) -> None:
        try:
            await self.destroy(instance_id)
        except Exception as e:  # noqa: BLE001 - close and the exit handler destroy it again
            logger.warning("destroying instance %s failed (retried at close): %s", instance_id, e)

    async def wait_lost(self, instance_id: int) -> str:
        """Return (why) once ``instance_id`` is found lost or destroyed."""
        record = self.records[instance_id]
        while record.lost is None and record.destroyed_at is None:
            record.changed.clear()
            await record.changed.wait()
        return record.lost or f"instance {instance_id} was destroyed"

    async def _destroy_strays(self, rows: Any) -> None:
        """Destroy rentals under this broker's settled batch labels that it does not know.

        A bulk answer that said nothing is settled after a grace; a rental of it that is
        listed only later is billed for nobody.
        """
        strays = [r for r in rows if self._is_stray(r)]
        for row in strays:
            self._log(f"instance {row.id} appeared under {row.label} after its bulk create was settled; "
                      "destroying it (nobody waits for it)")
        if strays:
            try:
                await self.api.destroy_instances([r.id for r in strays])
            except VastError as e:
                logger.warning("destroying stray rentals %s failed (will retry): %s", [r.id for r in strays], e)
            else:
                self._swept.update(r.id for r in strays)

    def _is_stray(self, row: Instance) -> bool:
        """A rental under one of this broker's settled batch labels that it neither holds nor destroyed."""
        return (row.label in self._batch_labels and row.label not in self._open_batches
                and row.id not in self.records and row.id not in self._swept)

    async def wait_until_ready(self, instance_id: int, timeout_s: float, *, fresh: bool = False) -> Instance:
        """The instance row once it runs with an SSH endpoint; BootFailed on a fatal state or timeout.

        A boot that sits in ``created``, ``scheduling`` or ``frozen`` longer than its grace
        (``vastai.boot-state-grace``) fails too: such a machine rarely recovers, and waiting
        the whole ``boot_timeout`` on it bills for nothing. ``fresh``: only a row listed
        after this call counts (a reconnect: the cached row may show an endpoint that is gone).
        """
        record = self.records[instance_id]
        self._ensure_poller()
        since = time.monotonic() if fresh else 0.0
        deadline = time.monotonic() + timeout_s
        while True:
            row = record.instance if record.listed_at >= since else None
            wake_in = deadline - time.monotonic()
            if record.lost is not None:
                raise BootFailed(record.lost)
            if record.destroyed_at is not None:
                raise BootFailed(f"instance {instance_id} was destroyed while booting")
            if row is not None:
                if ssh_ready(row):
                    return row
                failure = boot_failure(row)
                if failure:
                    raise BootFailed(failure)
                grace = self.state_graces.get(str(row.actual_status))
                if grace is not None:
                    stalled_s = time.monotonic() - record.status_since
                    if stalled_s >= grace:
                        raise BootFailed(
                            f"instance {instance_id} stayed {row.actual_status} for {stalled_s:.0f}s "
                            f"(vastai.boot-state-grace.{row.actual_status}={grace:g}): treated as a failed "
                            f"boot ({row.status_msg or 'no message'})"
                        )
                    wake_in = min(wake_in, grace - stalled_s + 0.05)
            if time.monotonic() >= deadline:
                status = row.actual_status if row else "not listed yet"
                raise BootFailed(
                    f"instance {instance_id} did not start within boot_timeout={timeout_s:.0f}s "
                    f"(last status: {status}, {row.status_msg if row else ''}); raise boot_timeout "
                    "for large images or pick another offer"
                )
            record.changed.clear()
            try:
                await asyncio.wait_for(record.changed.wait(), timeout=max(0.0, wake_in))
            except TimeoutError:
                pass

    async def host_keys(self, instance_id: int, wait_s: float) -> tuple[str, ...] | None:
        """The sshd host keys the instance printed into its log, read through Vast's API.

        The log is what the instance wrote, fetched over HTTPS with the account's key: a man
        in the middle of the SSH path cannot change it. Polls until the loader's line is there
        or ``wait_s`` passes; None then, ``()`` when the line says no key was found.
        """
        deadline = time.monotonic() + wait_s
        last = "no answer yet"
        while True:
            left = deadline - time.monotonic()
            try:
                text = await asyncio.wait_for(self.api.logs(instance_id, filter=HOST_KEYS_MARK), max(left, 1.0))
                keys = parse_host_keys(text)
                if keys is not None:
                    return keys
                last = "no host-key line in the log yet"
            except (VastError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            if deadline - time.monotonic() <= 0:
                logger.info("instance %s: no sshd host keys in its log after %.0fs (%s)", instance_id, wait_s, last)
                return None
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def reboot(self, instance_id: int) -> None:
        """Restart a rental's container (same machine, same disk); its next boot is watched afresh."""
        record = self.records[instance_id]
        await self.api.reboot_instance(instance_id)
        record.instance = None  # the row before the reboot says nothing of the boot to come
        record.was_running = False
        record.status_since = record.fresh_after = time.monotonic()
        record.changed.set()

    # -------------------------------------------------------------- destroying
    async def destroy(self, instance_id: int) -> None:
        """Destroy one rental; calls arriving together share one bulk destroy, and a rental
        already queued or in a destroy call is waited for, not destroyed again."""
        record = self.records.get(instance_id)
        if record is not None and record.destroyed_at is not None:
            return
        fut = self._destroying.get(instance_id)
        if fut is None:
            fut = self._queue_destroy(instance_id)
        await asyncio.shield(fut)

    def _queue_destroy(self, instance_id: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A destroy nobody awaits (the close's, below) must not warn "exception never retrieved".
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._destroying[instance_id] = fut
        self._destroy_queue.append((instance_id, fut))
        if self._destroy_flush is None or self._destroy_flush.done():
            self._destroy_flush = asyncio.create_task(self._flush_destroys())
        return fut

    async def _flush_destroys(self) -> None:
        while self._destroy_queue:  # as in _flush_rents: late arrivals get the next round
            await asyncio.sleep(self.batch_window_s)
            if self.closing:
                # Closing: every rental goes, so the first instance's destroy takes them all in
                # one bulk call. The instances close one by one (each tears its SSH link down
                # first); a straggler would wait Vast's paced destroy interval (3 s) for a
                # second call, every rental of the cluster billing meanwhile.
                for instance_id, record in list(self.records.items()):
                    if record.destroyed_at is None and instance_id not in self._destroying:
                        self._queue_destroy(instance_id)
            batch, self._destroy_queue = self._destroy_queue, []
            try:
                with self.api.until(self._until()):
                    await self._destroy_now(sorted({i for i, _ in batch}))
            except BaseException as e:
                if isinstance(e, VastError) and self.closing:
                    self._close_error = e  # close says it, once, if time runs out
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if not isinstance(e, Exception):
                    raise
                continue
            finally:
                for instance_id, fut in batch:
                    if self._destroying.get(instance_id) is fut:
                        del self._destroying[instance_id]
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _until(self) -> float | None:
        """The deadline of the calls made now: the close's, once closing has begun."""
        return None if self.close_deadline in (None, math.inf) else self.close_deadline

    async def _destroy_now(self, ids: list[int]) -> None:
        if not ids:
            return
        report = await self.api.destroy_instances(ids)
        now = time.time()
        for i in ids:
            LEDGER.discard(self.api, i)
            record = self.records.get(i)
            if record is not None and record.destroyed_at is None:
                record.destroyed_at = report.stopped_at.get(i, now)
                record.changed.set()
        again = ""
        if report.survivors:
            again += f"; {list(report.survivors)} were still running after the bulk call and were destroyed again"
        if report.lingering:
            again += f"; {list(report.lingering)} were still listed after the grace and were destroyed again"
        self._log(f"destroyed instance{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}{again}")

    async def destroy_all(self) -> None:
        """Destroy every rental of this cluster still alive (close path), strays of its bulk creates too."""
        alive = [i for i, r in self.records.items() if r.destroyed_at is None]
        if self._batch_labels:
            try:
                prefix = cluster_label_prefix(self.cluster_name)
                alive += [r.id for r in await self.api.list_instances(label_prefix=prefix) if self._is_stray(r)]
            except VastError as e:
                logger.warning("could not list this cluster's rentals for strays: %s", e)
        await self._destroy_now(alive)

    @property
    def closing(self) -> bool:
        """:meth:`begin_close` was called: nothing is rented any more, every destroy is the close's."""
        return self.close_deadline is not None

    def begin_close(self) -> None:
        """Stop renting; from now on every destroy (the closing instances', then :meth:`close`'s)
        belongs to one round that ends ``vastai.api.outage-timeout`` seconds from now."""
        if self.closing:
            return
        timeout_s = self.api.outage_timeout_s
        self.close_deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        flush = self._rent_flush
        if flush is not None and not flush.done():
            flush.cancel()
        # Rents still waiting for their batch: refused, or their instances' starts (which
        # SpecCluster's scale-down waits for) would wait forever.
        queued, self._rent_queue = self._rent_queue, []
        for worker_name, _, fut in queued:
            if not fut.done():
                fut.set_exception(BootFailed(f"not renting for {worker_name}: the cluster is closing"))

    async def close(self) -> None:
        """Stop renting, then destroy everything (strays of a bulk create cut short included), in
        the one round :meth:`begin_close` started: the instances' destroys in flight are waited
        for, then what is left is destroyed within the same deadline. Raises the round's
        :class:`VastError` when rentals are left (they stay in the ledger)."""
        self.begin_close()
        flush = self._rent_flush
        if flush is not None and not flush.done():
            with contextlib.suppress(BaseException):
                await flush
        try:
            # The instances' destroys first (they may be riding out an outage: not twice at once).
            destroying = self._destroy_flush
            if destroying is not None and not destroying.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(destroying)
            if not self._batch_labels and all(r.destroyed_at is not None for r in self.records.values()):
                return
            if self._close_error is not None:
                # Its calls retried until the deadline (or gave up for good): the round is over,
                # said once by the caller, not tried a second time.
                raise self._close_error
            with self.api.until(self._until()):
                await self.destroy_all()
        finally:
            for task in (self._poller, self._destroy_flush, self._budget_watch, *self._labelling, *self._background):
                if task is not None and not task.done():
                    task.cancel()

    def left_billing(self, error: VastError) -> str:
        """What to tell the user when :meth:`close` raised ``error``: the rentals that may bill, and what stops them."""
        left = sorted(i for i, r in self.records.items() if r.destroyed_at is None)
        watchdog = (f"Their watchdogs destroy them within orphan_timeout={self.orphan_timeout_s:.0f}s of this "
                    "client's last heartbeat; to destroy them sooner" if self.orphan_timeout_s else "To destroy them")
        return (
            f"could not destroy rental(s) {left} of cluster {self.cluster_name!r}: {error}. They may still "
            f"bill. {watchdog}, once Vast answers again, run `dask-vastai cleanup --cluster {self.cluster_name}`."
        )

    # ------------------------------------------------------------------ money
    @property
    def cost_usd(self) -> float:
        """Dollars billed so far: every rental's :attr:`RentalRecord.cost_usd` (time and bandwidth),
        and creates in flight."""
        now = time.time()
        flying = sum(sum(dphs) * max(0.0, now - sent) / 3600.0 for dphs, sent in self._in_flight.values())
        return sum(r.cost_usd for r in self.records.values()) + flying

    @property
    def bandwidth_cost_usd(self) -> float:
        """The part of :attr:`cost_usd` that is bandwidth."""
        return sum(r.bandwidth_cost_usd for r in self.records.values())

    @property
    def hourly_rate_usd(self) -> float:
        """$/h of the rentals alive now (and of the creates in flight)."""
        return sum(self._rates_dph())

    def _rates_dph(self) -> list[float]:
        """The $/h of each rental alive now, and of each one a create in flight may be making."""
        return ([r.dph_total for r in self.records.values() if r.destroyed_at is None]
                + [dph for dphs, _ in self._in_flight.values() for dph in dphs])

    @property
    def budget_left_usd(self) -> float | None:
        """Dollars left of ``max_cost``; None without one."""
        return None if self.caps is None else self.caps.left_usd(self.cost_usd)

    def _ensure_budget_watch(self) -> None:
        if self.caps is not None and self.caps.max_cost_usd is not None and self.exhausted is None and (
                self._budget_watch is None or self._budget_watch.done()):
            self._budget_watch = asyncio.create_task(self._watch_budget(), name=f"budget {self.cluster_name}")

    async def _watch_budget(self) -> None:
        """Every check interval: close before ``max_cost`` can be passed (see :mod:`dask_vastai.budget`)."""
        assert self.caps is not None
        while self.exhausted is None:
            why = self.caps.exhausted(self.cost_usd, self._rates_dph())
            if why is not None:
                await self._exhaust(BudgetExhausted(why))
                return
            await asyncio.sleep(self.caps.check_interval_s)

    async def _exhaust(self, error: BudgetExhausted) -> None:
        """Refuse every rental from now on, destroy all there are, and tell the cluster."""
        self.exhausted = error
        alive = [i for i, r in self.records.items() if r.destroyed_at is None]
        # The destroy goes out first: every second it waits is billed.
        destroying = asyncio.create_task(self._destroy_now(alive))
        logger.warning("%s", error)
        self._log(f"WARNING {error}")
        if self._on_exhausted is not None:
            try:
                self._on_exhausted(error)
            except Exception:  # noqa: BLE001 - the destroys must go on whatever the cluster does
                logger.exception("reacting to the exhausted budget failed")
        while True:
            try:
                await destroying
            except VastError as e:
                logger.warning("destroying the rentals at max_cost failed (trying again): %s", e)
            left = [i for i, r in self.records.items() if r.destroyed_at is None]
            if not left:
                return
            await asyncio.sleep(1.0)
            destroying = asyncio.create_task(self._destroy_now(left))
