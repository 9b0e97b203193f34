"""Renewing the certificates of one instance's running workers, before they expire.

A worker certificate lives ``vastai.worker-certificate-lifetime`` (hours: ``security.py``
says why). While its incarnation runs, :class:`CertificateRenewal` asks the cluster's CA for
a fresh one after ``vastai.worker-certificate-renew-at`` of its life, offers it to the other
workers (the CA's change reaches the live-worker list), and writes key and certificate, as
one PEM, to the incarnation's renewal file over the instance's pinned SSH link: the same
authenticated channel the first certificate took, so no key ever crosses a Dask message, a
log or the onstart text. On the instance, ``certificate_reload`` loads it into the worker's
and the nanny's live TLS contexts; the scheduler switches to it at its first use.

A renewal that cannot be delivered (the link is gone) is tried again a quarter of the time
left later, and said once: the instance is then the lost-instance path's business, and the
worker's certificate keeps its own end (after which every endpoint refuses it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from dask.utils import parse_timedelta

from .bootstrap import STATE_DIR
from .certificate_reload import reload_args, renewal_path
from .config import option
from .exceptions import TunnelError
from .security import ClusterCA

logger = logging.getLogger(__name__)


class RenewalLink(Protocol):
    """What a renewal needs of an instance's SSH link (``tunnel.InstanceLink``)."""

    closed: asyncio.Event

    async def put(self, remote_path: str, data: bytes, *, mode: int = 0o600) -> None: ...


def incarnation_env(worker_name: str, serial: int) -> dict[str, str]:
    """The environment entries that make an incarnation's processes take up renewals."""
    interval_s = float(parse_timedelta(option("certificate-reload-interval")))
    return reload_args(renewal_path(STATE_DIR, worker_name, serial), interval_s)


class CertificateRenewal:
    """Keeps the certificates of one instance's worker incarnations fresh while they run.

    ``files``: worker name -> the incarnation's renewal file on the instance (from the
    environment :func:`incarnation_env` gave it). ``link()``: the instance's link now (None:
    none). ``say``: a line for the user (the cluster's log).
    """

    def __init__(
        self, ca: ClusterCA, link: Callable[[], RenewalLink | None], files: Mapping[str, str], *,
        who: str, say: Callable[[str], None] | None = None,
    ) -> None:
        self.ca = ca
        self.link = link
        self.files = dict(files)
        self.who = who
        self.say = say
        self.renewed = 0
        self._retry_at: dict[str, float] = {}
        self._failing: set[str] = set()

    def next_due(self) -> tuple[str, float] | None:
        """The worker renewed next and when (epoch seconds); None: nothing to renew."""
        due = []
        for name in self.files:
            at = self.ca.renewal_due(name)
            if at is not None:
                due.append((min(at, self._retry_at.get(name, at)), name))
        if not due:
            return None
        at, name = min(due)
        return name, at

    async def run(self) -> None:
        """Renew each certificate when due, until cancelled (with the incarnation)."""
        while (due := self.next_due()) is not None:
            name, at = due
            await asyncio.sleep(max(0.0, at - time.time()))
            await self.renew(name)

    async def renew(self, name: str) -> bool:
        """Mint and deliver one renewed certificate; whether it reached the instance."""
        self._retry_at.pop(name, None)
        link = self.link()
        why = "its SSH link is gone"
        if link is not None and not link.closed.is_set():
            creds = self.ca.renew_worker(name)  # offered to the other workers before it is delivered
            try:
                await link.put(self.files[name], creds.renewal_pem())
            except TunnelError as e:
                why = f"writing it failed ({e})"
            except Exception as e:  # noqa: BLE001 - said and tried again, never a silent end of renewals
                why = f"writing it failed ({type(e).__name__}: {e})"
            else:
                self.renewed += 1
                self._failing.discard(name)
                logger.debug("%s: renewed worker %s's certificate (serial %x)", self.who, name, creds.serial)
                return True
        expires = self.ca.expires_at(name) or time.time()
        left_s = expires - time.time()
        if left_s <= 0:
            self.files.pop(name)  # expired: refused everywhere; a new incarnation gets a new one
            logger.warning("%s: worker %s's certificate expired unrenewed (%s)", self.who, name, why)
            return False
        self._retry_at[name] = time.time() + max(1.0, left_s / 4)
        if name not in self._failing:
            self._failing.add(name)
            message = (f"{self.who}: cannot renew worker {name}'s certificate: {why}; it expires "
                       f"{time.strftime('%H:%M:%S', time.localtime(expires))} ({max(0, left_s):.0f}s), "
                       "after which every endpoint refuses it. Tried again until then; an instance that "
                       "stays unreachable is replaced as a lost one")
            logger.warning(message)
            if self.say is not None:
                self.say(message)
        return False

    def __repr__(self) -> str:
        return f"<CertificateRenewal {self.who}: {sorted(self.files)}, {self.renewed} renewed>"
