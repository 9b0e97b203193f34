"""Where each instance of a cluster stands, as the user sees it: one row per rental.

A rental's life has phases (:class:`Phase`) that only the instance knows (it connects,
installs, starts workers), and money and Vast's own status message that only the broker
knows (its poller reads every rental's row). :class:`PhaseBook` keeps the last phase each
instance reported, also after the instance object is gone (a failed instance keeps its
reason), and :func:`instance_table` joins the two into :class:`InstanceRow` s: what
``cluster.instances`` returns, what the widget and the boot progress display.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .display import TextTable, data_size, duration, shorten, usd, usd_per_hour
from .pools import instance_worker_names, spec_pool

if TYPE_CHECKING:
    from .rentals import RentalRecord


class Phase(StrEnum):
    """Where one instance is in its life (a ``str``: ``row["state"] == "registered"`` holds)."""

    RENTING = "renting"
    #: rented; Vast pulls the image and starts the container (its ``status_msg`` says how far)
    LOADING = "loading image"
    CONNECTING = "connecting"
    #: the environment step: versions, the user's packages, shipped code
    INSTALLING = "installing"
    STARTING = "starting workers"
    REGISTERED = "registered"
    FAILED = "failed"
    #: lost after renting (outbid, host offline, container exited, gone, link not back): destroyed
    LOST = "lost"
    DESTROYED = "destroyed"

    @property
    def booting(self) -> bool:
        return self in BOOTING


#: phases of an instance that is on its way to registered
BOOTING = frozenset({Phase.RENTING, Phase.LOADING, Phase.CONNECTING, Phase.INSTALLING, Phase.STARTING})
#: phases of a rental that no longer runs
GONE = frozenset({Phase.DESTROYED, Phase.FAILED, Phase.LOST})


@dataclass(frozen=True)
class PhaseEntry:
    """The last phase one instance reported, and when it began."""

    name: str
    instance_id: int | None
    phase: Phase
    since: float
    reason: str | None
    workers: tuple[str, ...]
    pool: str
    #: when this instance (spec name) was first seen renting
    started: float


class PhaseBook:
    """The phases instances reported, by spec name and by rental id."""

    def __init__(self) -> None:
        self.by_name: dict[str, PhaseEntry] = {}
        self.by_rental: dict[int, PhaseEntry] = {}

    def note(self, instance: Any) -> None:
        """Record ``instance``'s phase (a ``VastInstance``: name, instance_id, phase, ...)."""
        name = instance.name
        previous = self.by_name.get(name)
        phase = Phase(instance.phase)
        # Renting again after a failure: the old rental keeps its failure, no id is new yet.
        rental = None if phase == Phase.RENTING else instance.instance_id
        entry = PhaseEntry(
            name=name, instance_id=rental, phase=phase, since=instance.phase_since,
            reason=instance.phase_reason, workers=tuple(instance.worker_names), pool=instance.pool.name,
            started=previous.started if previous is not None else instance.phase_since,
        )
        self.by_name[name] = entry
        if rental is not None:
            self.by_rental[rental] = entry


_KEYS = ("id", "name", "gpu", "state", "phase", "status_msg", "reason", "dph", "uptime_s", "cost_usd",
         "bandwidth_usd", "bytes_up", "bytes_down", "workers", "pool")


@dataclass(frozen=True)
class InstanceRow(Mapping[str, Any]):
    """One instance: also a read-only mapping (``row["state"]``, ``row["dph"]``, ...)."""

    id: int | None
    name: str
    gpu: str
    phase: Phase
    #: Vast's ``status_msg`` for the rental (the image pull's progress while loading)
    status_msg: str
    #: why it failed (``phase == "failed"``)
    reason: str | None
    dph: float
    uptime_s: float
    cost_usd: float
    workers: tuple[str, ...]
    registered_workers: tuple[str, ...]
    pool: str
    #: seconds in the current phase, and since the instance was first asked for
    in_phase_s: float = 0.0
    elapsed_s: float = 0.0
    #: the part of ``cost_usd`` that is bandwidth, and the bytes it sent and received (as counted here)
    bandwidth_usd: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def state(self) -> str:
        return str(self.phase)

    @property
    def detail(self) -> str:
        """What to say next to the phase: the failure's reason, or Vast's message while booting."""
        if self.phase in (Phase.FAILED, Phase.LOST):
            return self.reason or ""
        if self.phase == Phase.LOADING:
            return self.status_msg
        return ""

    # Mapping: code written for the list of dicts this used to be keeps working.
    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if key == "workers" else value

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    def cells(self) -> list[str]:
        phase = str(self.phase)
        if self.phase.booting:
            phase += f" ({duration(self.in_phase_s)})"
        workers = ", ".join(self.workers)
        if self.workers and self.phase != Phase.DESTROYED and len(self.registered_workers) < len(self.workers):
            workers += f" ({len(self.registered_workers)}/{len(self.workers)} registered)"
        return [
            "-" if self.id is None else str(self.id), self.pool, self.gpu, phase,
            usd_per_hour(self.dph if self.id is not None else None), duration(self.uptime_s),
            usd(self.cost_usd), f"{data_size(self.bytes_up + self.bytes_down)}, {usd(self.bandwidth_usd)}",
            workers, shorten(self.detail, 240 if self.phase in (Phase.FAILED, Phase.LOST) else 70),
        ]


COLUMNS = ("instance", "pool", "GPU", "phase", "$/h", "uptime", "$ so far", "bandwidth", "workers", "status")
PHASE_COLUMN = COLUMNS.index("phase")


def tone(phase: Phase) -> str:
    """How a phase reads at a glance (see ``display.TONES_CSS``)."""
    if phase == Phase.REGISTERED:
        return "ok"
    if phase in (Phase.FAILED, Phase.LOST):
        return "bad"
    return "dim" if phase == Phase.DESTROYED else "busy"


class InstanceTable(list[InstanceRow]):
    """``cluster.instances``: a list of :class:`InstanceRow`, shown as a table.

    HTML in a notebook, a ``rich`` table in a terminal, plain text in ``str()``.
    """

    def text_table(self, *, totals: bool = True) -> TextTable:
        alive = [r for r in self if r.phase not in GONE]
        note = (
            f"{len(alive)} instance(s) alive, {usd_per_hour(sum(r.dph for r in alive if r.id is not None))} "
            f"now, {usd(sum(r.cost_usd for r in self))} spent "
            f"(bandwidth {usd(sum(r.bandwidth_usd for r in self))})"
        )
        tones = [[tone(r.phase) if c == PHASE_COLUMN else "" for c in range(len(COLUMNS))] for r in self]
        return TextTable(COLUMNS, [r.cells() for r in self], notes=(note,) if totals else (),
                         empty="no instances", tones=tones)

    def _repr_html_(self) -> str:
        return self.text_table().html()

    def __rich__(self) -> Any:
        return self.text_table().rich()

    def __str__(self) -> str:
        return self.text_table().text()

    __repr__ = __str__


def instance_table(
    records: Iterable[RentalRecord],
    book: PhaseBook,
    specs: Mapping[str, Mapping[str, Any]],
    registered: set[str],
    *,
    now: float | None = None,
) -> InstanceTable:
    """One row per rental (oldest first), then one per instance still waiting for its rental.

    ``specs`` are the cluster's worker specs (instances held), ``registered`` the names of
    the workers the scheduler knows.
    """
    now = time.time() if now is None else now
    rows = InstanceTable()
    renting = dict(specs)
    for record in list(records):
        entry = book.by_rental.get(record.instance_id)
        phase = entry.phase if entry is not None else Phase.LOADING
        if record.destroyed_at is not None and phase not in (Phase.FAILED, Phase.LOST):
            phase = Phase.DESTROYED
        if record.destroyed_at is None:
            renting.pop(record.worker_name, None)
        spec = specs.get(record.worker_name)
        pool = entry.pool if entry is not None else getattr(spec_pool(spec or {}), "name", "")
        workers = entry.workers if entry is not None else tuple(instance_worker_names(record.worker_name, spec))
        row = record.instance
        rows.append(InstanceRow(
            id=record.instance_id,
            name=record.worker_name,
            gpu=f"{record.offer.num_gpus}x {record.offer.gpu_name}",
            phase=phase,
            status_msg=(row.status_msg or "") if row is not None else "",
            reason=entry.reason if entry is not None else None,
            dph=record.dph_total,
            uptime_s=record.uptime_s,
            cost_usd=record.cost_usd,
            bandwidth_usd=record.bandwidth_cost_usd,
            bytes_up=record.traffic.up,
            bytes_down=record.traffic.down,
            workers=workers,
            registered_workers=tuple(w for w in workers if w in registered),
            pool=pool,
            in_phase_s=now - entry.since if entry is not None else now - record.rented_at,
            elapsed_s=now - entry.started if entry is not None else now - record.rented_at,
        ))
    for name, spec in renting.items():
        pool = spec_pool(spec)
        entry = book.by_name.get(name)
        gpu = "?"
        if pool is not None:
            gpu = f"{pool.gpus_per_instance}x {'/'.join(pool.requirements.gpu_names()) or 'any GPU'}"
        workers = tuple(instance_worker_names(name, spec))
        rows.append(InstanceRow(
            id=None, name=name, gpu=gpu, phase=Phase.RENTING, status_msg="", reason=None,
            dph=0.0, uptime_s=0.0, cost_usd=0.0, workers=workers,
            registered_workers=tuple(w for w in workers if w in registered),
            pool=pool.name if pool is not None else "",
            in_phase_s=now - entry.since if entry is not None else 0.0,
            elapsed_s=now - entry.started if entry is not None else 0.0,
        ))
    return rows
